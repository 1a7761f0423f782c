"""How many filters go and when: pick the lowest-ranked filters across layers (scope
`global`) or the same share of each layer (scope `uniform`).

A plan is {layer name: sorted filter indices to remove}. Planning never
empties a layer; a target that could only be met by emptying one is refused
before any work is done.
"""

from __future__ import annotations

from typing import Callable

import torch

from prunelab.errors import ConfigError

Plan = dict[str, list[int]]


def plan_step(scores: dict[str, torch.Tensor], n: int, round_to: int = 1,
              widths0: dict[str, int] | None = None) -> Plan:
    """The `n` lowest-scored filters across all layers, never emptying a layer.

    With `round_to` > 1 every layer the step touches is cut further, to the next
    multiple of `round_to` below what those picks leave (taking its next
    lowest-scored filters), so widths stay multiples of it: vector units and
    blocked memory layouts then run the pruned convs without idle lanes. A layer
    never goes below `round_to` filters (or below its width, if that is smaller).
    `widths0` (the original widths) is read by `plan_uniform_step` only: one signature for both.
    """
    def kept(width: int, removed: int) -> int:
        return (width - removed) // round_to * round_to

    widths = {name: len(s) for name, s in scores.items()}
    # The filters that may go, lowest first; a layer offers at most width - round_to of them.
    candidates = sorted((s[i].item(), name, int(i)) for name, s in scores.items()
                        for i in torch.argsort(s)[: max(0, len(s) - round_to)])
    _check_step(n, len(candidates), round_to)
    picked: dict[str, int] = {}
    for _, name, _ in candidates[:n]:
        picked[name] = picked.get(name, 0) + 1
    plan: Plan = {}
    for name, count in picked.items():
        cut = widths[name] - kept(widths[name], count)  # >= count: rounded down to a multiple
        plan[name] = sorted(int(i) for i in torch.argsort(scores[name])[:cut])
    return plan


def plan_uniform_step(scores: dict[str, torch.Tensor], n: int, round_to: int = 1,
                      widths0: dict[str, int] | None = None) -> Plan:
    """`n` filters taken so that every layer keeps the same share of its original width
    (`widths0`; default: its width now): each pick goes to the layer that keeps the largest
    share, and takes that layer's lowest-scored filter. Layers rank only within themselves,
    so scales that differ between layers do not matter. `round_to` as in `plan_step`.
    """
    widths = {name: len(s) for name, s in scores.items()}
    widths0 = widths0 or widths
    floor = {name: min(w, round_to) for name, w in widths.items()}
    _check_step(n, sum(w - floor[name] for name, w in widths.items()), round_to)
    left = dict(widths)
    for _ in range(n):
        # The layer keeping the largest share of its width (the first in network order on a tie).
        name = max((name for name in left if left[name] > floor[name]), key=lambda m: left[m] / widths0[m])
        left[name] -= 1
    plan: Plan = {}
    for name, kept in left.items():
        kept = max(floor[name], kept // round_to * round_to)
        if kept < widths[name]:
            plan[name] = sorted(int(i) for i in torch.argsort(scores[name])[: widths[name] - kept])
    return plan


# How a step shares its filters among the layers (`prune.scope`).
SCOPES = {"global": plan_step, "uniform": plan_uniform_step}


def fewest_to_reach(plan_of: Callable[[int], Plan], n: int, left_after: Callable[[Plan], float],
                    target: float) -> Plan:
    """The plan of a step of `n` filters or, where fewer already bring what remains down to
    `target`, of the fewest that do: the last step stops at the target instead of passing it by
    up to a whole step (16 filters of a thin ResNet20 layer are 1.5x its size at 16x).
    `left_after(plan)` is the fraction a plan would leave. A step's plans grow with its count
    (each takes the next lowest-ranked filters on top of the last), so what they leave falls
    with it and bisection finds the fewest in log2(n) trials."""
    plan = plan_of(n)
    if n == 1 or left_after(plan) > target:
        return plan
    fewest, most = 1, n  # `most` filters reach the target
    while fewest < most:
        middle = (fewest + most) // 2
        if left_after(plan_of(middle)) <= target:
            most = middle
        else:
            fewest = middle + 1
    return plan_of(most)


def without(scores: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The scores of the filters a step kept, in their new order (a one-shot schedule plans
    every step from its one ranking)."""
    out = {}
    for name, s in scores.items():
        keep = torch.ones(len(s), dtype=torch.bool)
        keep[plan.get(name, [])] = False
        out[name] = s[keep]
    return out


def check_step(n: int, widths: dict[str, int], round_to: int = 1) -> None:
    """Refuse, before any work, a step of more filters than can go at once (all but one, or
    all but `round_to`, of every layer)."""
    _check_step(n, sum(max(0, w - round_to) for w in widths.values()), round_to)


def _check_step(n: int, removable: int, round_to: int) -> None:
    if n > removable:
        raise ConfigError(
            f"a step of {n} filters would remove every filter of a layer (only {removable} can go"
            + (f" while each layer keeps a multiple of prune.round_to={round_to}" if round_to > 1 else "")
            + "): lower prune.filters_per_step"
        )


def check_reachable(target: float, kind: str, smallest: float, first_layer: str) -> None:
    """Refuse a target below what one filter per layer leaves (`smallest`, as a fraction)."""
    if target < smallest:
        raise ConfigError(
            f"prune.target={target} {kind} cannot be reached without removing every filter of a layer "
            f"(e.g. {first_layer}); one filter per layer still leaves {smallest:.3f}: raise prune.target"
        )
