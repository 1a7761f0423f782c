"""Unstructured masks for lottery tickets (Frankle & Carbin 2019).

A `Mask` maps each prunable weight (the weight of every conv and linear layer;
biases are never pruned) to a bool tensor of its shape: True = the weight
survives. A pruning strategy is a pure function `prune(hparams, model, mask)
-> Mask` that removes a fraction of each layer's *surviving* weights, so
iterating is calling it again and masks only ever shrink.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from prunelab.errors import ConfigError, ModelError
from prunelab.models.factory import FactoryNetwork


class Rates(Protocol):
    """The pruning settings a strategy reads (the lottery-ticket kind's `lottery` section)."""

    conv_rate: float    # fraction of a conv layer's surviving weights pruned per round
    fc_rate: float      # ... of a hidden fully connected layer's
    output_rate: float  # ... of the output layer's
    strategy: str       # a key of STRATEGIES


def prunable_layers(model: nn.Module) -> dict[str, str]:
    """Prunable weight name -> layer kind ('conv', 'fc' or 'output'): the last linear layer is the output."""
    names = [(n, "conv" if isinstance(m, nn.Conv2d) else "fc") for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise ModelError(f"{type(model).__name__} has no conv or linear layer to prune")
    kinds = {f"{n}.weight": kind for n, kind in names}
    last_fc = [n for n, kind in names if kind == "fc"]
    if last_fc:
        kinds[f"{last_fc[-1]}.weight"] = "output"
    return kinds


def layer_rates(hparams: Rates, model: nn.Module) -> dict[str, float]:
    """Per-round pruning rate of each prunable weight."""
    rate = {"conv": hparams.conv_rate, "fc": hparams.fc_rate, "output": hparams.output_rate}
    return {name: rate[kind] for name, kind in prunable_layers(model).items()}


class Mask(dict):
    """{weight name: bool tensor}; validated on construction."""

    def __init__(self, entries: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
                raise ModelError(f"mask entry {name!r} is not a bool tensor: a mask holds True (keep) / False (pruned)")
            self[name] = value

    @classmethod
    def ones_like(cls, model: nn.Module) -> "Mask":
        params = dict(model.named_parameters())
        return cls({name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_layers(model)})

    def check_fits(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        expected = set(prunable_layers(model))
        if set(self) != expected:
            raise ModelError(f"the mask covers {sorted(self)}, the model's prunable weights are {sorted(expected)}")
        for name, value in self.items():
            if value.shape != params[name].shape:
                raise ModelError(f"mask entry {name} has shape {tuple(value.shape)}, the weight {tuple(params[name].shape)}")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight in place (cheap: one multiply per prunable tensor)."""
        params = dict(model.named_parameters())
        for name, keep in self.items():
            params[name].mul_(keep)

    def applier(self, model: nn.Module):
        """`apply` for the training loop's every step: the weights and float copies of
        the masks are looked up once, and one fused multiply zeroes them all."""
        params = dict(model.named_parameters())
        weights = [params[name] for name in self]
        keeps = [keep.to(params[name].dtype) for name, keep in self.items()]

        @torch.no_grad()
        def apply() -> None:
            torch._foreach_mul_(weights, keeps)
        return apply

    # ---- sparsity report
    def remaining(self) -> dict[str, int]:
        return {name: int(v.sum()) for name, v in self.items()}

    def sizes(self) -> dict[str, int]:
        return {name: v.numel() for name, v in self.items()}

    def fraction_remaining(self) -> float:
        """Surviving prunable weights / all prunable weights (the paper's Pm)."""
        return sum(self.remaining().values()) / sum(self.sizes().values())

    def report(self) -> str:
        rows = [f"{name:28s} {int(v.sum()):>10d} / {v.numel():<10d} {int(v.sum()) / v.numel():7.2%}" for name, v in self.items()]
        return "\n".join(rows + [f"{'total':28s} {sum(self.remaining().values()):>10d} / {sum(self.sizes().values()):<10d} "
                                 f"{self.fraction_remaining():7.2%}"])

    def state(self) -> dict[str, torch.Tensor]:
        """Plain dict of bool CPU tensors (saves and loads with weights_only=True, on any machine)."""
        return {name: keep.cpu().contiguous() for name, keep in self.items()}


# --------------------------------------------------------------------------- strategies

def _count_to_prune(kept: int, rate: float) -> int:
    # Rounded as OpenLTH does, so the fraction after n rounds is (1 - rate)^n within rounding.
    return int(math.ceil(rate * kept)) if rate > 0 else 0


def _prune_by_score(hparams: Rates, model: nn.Module, mask: Mask,
                    score: Callable[[str, torch.Tensor], torch.Tensor]) -> Mask:
    mask.check_fits(model)
    params = dict(model.named_parameters())
    out = {}
    for name, rate in layer_rates(hparams, model).items():
        keep = mask[name]
        n = _count_to_prune(int(keep.sum()), rate)
        s = score(name, params[name].detach()).flatten().clone()
        s[~keep.flatten()] = float("inf")  # already pruned weights are never chosen again
        new = keep.flatten().clone()
        if n:
            new[torch.topk(s, n, largest=False).indices] = False
        out[name] = new.view_as(keep)
    return Mask(out)


def magnitude_prune(hparams: Rates, model: nn.Module, mask: Mask, seed: int = 0) -> Mask:
    """Remove the smallest-magnitude surviving weights of each layer, at its own rate."""
    return _prune_by_score(hparams, model, mask, lambda _name, w: w.abs())


def random_prune(hparams: Rates, model: nn.Module, mask: Mask, seed: int = 0) -> Mask:
    """Control: remove as many surviving weights per layer as magnitude pruning would, at random."""
    generator = torch.Generator().manual_seed(seed)
    return _prune_by_score(hparams, model, mask, lambda _name, w: torch.rand(w.shape, generator=generator).to(w.device))


STRATEGIES: dict[str, Callable[..., Mask]] = {"magnitude": magnitude_prune, "random": random_prune}


def prune(hparams: Rates, model: nn.Module, mask: Mask, seed: int = 0) -> Mask:
    """One round of the configured strategy: a new, smaller mask (the input mask is left as it was)."""
    strategy = STRATEGIES.get(hparams.strategy)
    if strategy is None:
        raise ConfigError(f"unknown lottery.strategy {hparams.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy(hparams, model, mask, seed)


def check_rounds(hparams: Rates, model: nn.Module, rounds: int) -> None:
    """Refuse a number of rounds that would leave some layer without a single weight."""
    params = dict(model.named_parameters())
    for name, rate in layer_rates(hparams, model).items():
        kept = params[name].numel()
        for k in range(1, rounds + 1):
            kept -= _count_to_prune(kept, rate)
            if kept == 0:
                raise ConfigError(f"lottery.rounds={rounds} would prune every weight of {name} (empty after round {k}): "
                                  f"use at most {k - 1} rounds or a lower rate")


# --------------------------------------------------------------------------- rewinding and controls

@torch.no_grad()
def rewind(model: nn.Module, weights: dict[str, torch.Tensor], mask: Mask) -> None:
    """Reset every parameter to the saved `weights` (iteration 0 or k), then zero the pruned ones."""
    model.load_state_dict(weights)
    mask.apply(model)


def reinitialise(model: nn.Module, mask: Mask, seed: int) -> None:
    """Control: fresh random weights (the model's own initialiser, seeded) under the same mask."""
    fresh_rng = torch.random.fork_rng()
    with fresh_rng:
        torch.manual_seed(seed)
        # A network from a factory is made again by its factory (torchvision's initialisers
        # live in its constructors); a registered one by its class at its spec.
        fresh = model.initialised_again() if isinstance(model, FactoryNetwork) else type(model)(**model.spec())
    rewind(model, fresh.state_dict(), mask)
