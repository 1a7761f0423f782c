"""How many filters go and when: pick the lowest-ranked filters across layers.

A plan is {layer name: sorted filter indices to remove}. Planning never
empties a layer; a target that could only be met by emptying one is refused
before any work is done.
"""

from __future__ import annotations

import torch

from prunelab.errors import ConfigError

Plan = dict[str, list[int]]


def plan_step(scores: dict[str, torch.Tensor], n: int) -> Plan:
    """The `n` lowest-scored filters across all layers, keeping >= 1 per layer."""
    candidates = []
    for name, s in scores.items():
        order = torch.argsort(s)
        # The best filter of each layer is never a candidate: a layer cannot be emptied.
        candidates += [(s[i].item(), name, int(i)) for i in order[:-1]]
    _check_step(n, len(candidates))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    plan: Plan = {}
    for _, name, idx in candidates[:n]:
        plan.setdefault(name, []).append(idx)
    return {name: sorted(idxs) for name, idxs in plan.items()}


def check_step(n: int, widths: dict[str, int]) -> None:
    """Refuse, before any work, a step of more filters than can go at once (all but one of every layer)."""
    _check_step(n, sum(w - 1 for w in widths.values()))


def _check_step(n: int, removable: int) -> None:
    if n > removable:
        raise ConfigError(
            f"a step of {n} filters would remove every filter of a layer (only {removable} can go): "
            "lower prune.filters_per_step"
        )


def check_reachable(target: float, kind: str, smallest: float, first_layer: str) -> None:
    """Refuse a target below what one filter per layer leaves (`smallest`, as a fraction)."""
    if target < smallest:
        raise ConfigError(
            f"prune.target={target} {kind} cannot be reached without removing every filter of a layer "
            f"(e.g. {first_layer}); one filter per layer still leaves {smallest:.3f}: raise prune.target"
        )
