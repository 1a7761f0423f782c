"""Filter importance criteria: one small class each, one `__call__`.

A criterion maps {layer name: conv} to {layer name: scores}, one score per
output filter, higher = more important. Scores are L2-normalised per layer
so that layers of different scale rank against each other (Molchanov et al.
2017, section 2.3).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from prunelab import layout, progress
from prunelab.errors import ConfigError


def l2_normalise(scores: torch.Tensor) -> torch.Tensor:
    norm = scores.norm(p=2)
    return scores / norm if norm > 0 else scores


class TaylorCriterion:
    """First-order Taylor expansion of the loss change when a feature map is removed.

    Per feature map k of a layer: |mean over samples and positions of a_k * dL/da_k|,
    where a_k is the conv's output. For a conv followed by ReLU this equals the
    same product taken after the ReLU (where the ReLU is off both factors vanish),
    so hooking the conv output serves either reading of the paper.

    Where a BatchNorm sits between the conv and its ReLU, `outputs` names it and
    its output is a_k: removing the filter deletes the normalised map (BN's channel
    goes too), while zeroing the conv's output would leave BN's shift in place, a
    different change of the loss.
    """

    name = "taylor"

    def __call__(self, model: nn.Module, layers: dict[str, nn.Conv2d],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None,
                 outputs: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Scores of each conv in `layers`; `outputs` maps a layer to the module whose output
        is its feature map (`FilterPrunable.feature_maps`; default: the conv itself)."""
        # Accumulated in float64 (long ranking passes), except on Apple's MPS, which has no float64.
        dtype = torch.float32 if next(iter(layers.values())).weight.device.type == "mps" else torch.float64
        sums = {name: torch.zeros(conv.out_channels, dtype=dtype, device=conv.weight.device)
                for name, conv in layers.items()}
        counts = dict.fromkeys(layers, 0)
        handles = []

        def hook(name):
            def on_forward(_module, _inputs, output):
                # The gradient hook holds a detached view, never `output` itself: a hook that
                # refers to the tensor it is registered on is a cycle through autograd's C++
                # side, which Python's collector cannot see, and every ranked batch's feature
                # maps would stay in memory for the life of the process (GBs per study).
                activation = output.detach()

                def on_grad(grad):
                    # Sum over batch and positions now; divide by the count at the end.
                    sums[name] += (activation * grad).sum(dim=(0, 2, 3)).to(dtype)
                    counts[name] += activation.shape[0] * activation.shape[2] * activation.shape[3]
                output.register_hook(on_grad)
            return on_forward

        for name, conv in layers.items():
            handles.append((outputs or {}).get(name, conv).register_forward_hook(hook(name)))
        was_training = model.training
        model.eval()  # rank the network as it predicts: no dropout noise in the scores
        try:
            with layout.native(model):
                for xb, yb in progress.bar(batches, "rank", total=total):
                    model.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return {name: l2_normalise((sums[name] / max(counts[name], 1)).abs().float().cpu()) for name in layers}


class L1Criterion:
    """L1 norm of each filter's weights (Li et al. 2017); needs no data."""

    name = "l1"

    def __call__(self, model, layers, batches=None, total=None, outputs=None):
        return {name: l2_normalise(conv.weight.detach().abs().sum(dim=(1, 2, 3)).cpu()) for name, conv in layers.items()}


class RandomCriterion:
    """Random scores: the control every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model, layers, batches=None, total=None, outputs=None):
        return {name: torch.rand(conv.out_channels, generator=self.generator) for name, conv in layers.items()}


CRITERIA = {c.name: c for c in (TaylorCriterion, L1Criterion, RandomCriterion)}


def get(name: str, seed: int = 0):
    cls = CRITERIA.get(name)
    if cls is None:
        raise ConfigError(f"unknown pruning method {name!r}: choose one of {', '.join(sorted(CRITERIA))}")
    return cls(seed) if cls is RandomCriterion else cls()
