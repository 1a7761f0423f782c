"""Filter importance criteria: one small class each, one `__call__`.

A criterion maps {layer name: conv} to {layer name: scores}, one score per
output filter, higher = more important. Scores are L2-normalised per layer
so that layers of different scale rank against each other (Molchanov et al.
2017, section 2.3). A layer may stand for several coupled convs
(`structure.Prunable`): `outputs` and `coupled` then name all of them.
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

    A layer whose channels are coupled (convs feeding one residual sum, a depthwise
    conv and the conv before it) deletes several maps with one filter index: `outputs`
    then names them all, and the score is |sum over those maps of each one's mean
    a_k * dL/da_k|, the first-order change of the loss when all of them go together.
    """

    name = "taylor"

    def __call__(self, model: nn.Module, layers: dict[str, nn.Conv2d],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None,
                 outputs: dict[str, nn.Module | tuple[nn.Module, ...]] | None = None,
                 coupled=None) -> dict[str, torch.Tensor]:
        """Scores of each conv in `layers`; `outputs` maps a layer to the module (or modules)
        whose output is its feature map (`FilterPrunable.feature_maps`, `structure.Prunable`;
        default: the conv itself)."""
        # Accumulated in float64 (long ranking passes), except on Apple's MPS, which has no float64.
        dtype = torch.float32 if next(iter(layers.values())).weight.device.type == "mps" else torch.float64
        maps = {name: _as_tuple((outputs or {}).get(name, conv)) for name, conv in layers.items()}
        sums = {name: [torch.zeros(conv.out_channels, dtype=dtype, device=conv.weight.device) for _ in maps[name]]
                for name, conv in layers.items()}
        counts = {name: [0] * len(maps[name]) for name in layers}
        handles = []

        def hook(name, j):
            def on_forward(_module, _inputs, output):
                # The gradient hook holds a detached copy, never `output` itself: a hook that
                # refers to the tensor it is registered on is a cycle through autograd's C++
                # side, which Python's collector cannot see, and every ranked batch's feature
                # maps would stay in memory for the life of the process (GBs per study). A copy,
                # not a view: a residual sum added in place onto the map (`out += identity`)
                # would otherwise change the values it holds. (An in-place ReLU changes nothing
                # that counts: where it zeroes the map the gradient is zero too.)
                activation = output.detach().clone()

                def on_grad(grad):
                    # Sum over batch and positions now; divide by the count at the end.
                    sums[name][j] += (activation * grad).sum(dim=(0, 2, 3)).to(dtype)
                    counts[name][j] += activation.shape[0] * activation.shape[2] * activation.shape[3]
                output.register_hook(on_grad)
            return on_forward

        for name in layers:
            handles += [module.register_forward_hook(hook(name, j)) for j, module in enumerate(maps[name])]
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
        return {name: l2_normalise(_mean_change(sums[name], counts[name]).abs().float().cpu()) for name in layers}


def _as_tuple(modules) -> tuple[nn.Module, ...]:
    return tuple(modules) if isinstance(modules, (tuple, list)) else (modules,)


def _mean_change(sums: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Each feature map's mean a * dL/da, summed over the maps one filter index deletes."""
    total = sums[0] / max(counts[0], 1)
    for s, c in zip(sums[1:], counts[1:]):
        total = total + s / max(c, 1)
    return total


class L1Criterion:
    """L1 norm of each filter's weights (Li et al. 2017); needs no data."""

    name = "l1"

    def __call__(self, model, layers, batches=None, total=None, outputs=None, coupled=None):
        """`coupled` maps a layer to every conv that loses a filter with it (default: its conv
        alone); a coupled layer's score is the L1 norm of all the filters one index removes."""
        def l1(conv: nn.Conv2d) -> torch.Tensor:
            return conv.weight.detach().abs().sum(dim=(1, 2, 3)).cpu()

        scores = {}
        for name, conv in layers.items():
            score = l1(conv)
            for other in (coupled or {}).get(name, (conv,)):
                if other is not conv:
                    score = score + l1(other)
            scores[name] = l2_normalise(score)
        return scores


class RandomCriterion:
    """Random scores: the control every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model, layers, batches=None, total=None, outputs=None, coupled=None):
        return {name: torch.rand(conv.out_channels, generator=self.generator) for name, conv in layers.items()}


CRITERIA = {c.name: c for c in (TaylorCriterion, L1Criterion, RandomCriterion)}


def get(name: str, seed: int = 0):
    cls = CRITERIA.get(name)
    if cls is None:
        raise ConfigError(f"unknown pruning method {name!r}: choose one of {', '.join(sorted(CRITERIA))}")
    return cls(seed) if cls is RandomCriterion else cls()
