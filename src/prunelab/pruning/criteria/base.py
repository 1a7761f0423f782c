"""What every criterion is: a name, a paper, its own settings, and scores per layer.

A criterion maps {layer name: conv} to {layer name: scores}, one score per output
filter, higher = more important. A layer may stand for several coupled convs
(`structure.Prunable`): `coupled` names every conv that loses a filter with it,
`outputs` the feature maps (modules) removing one deletes.

A data-free criterion (`needs_data = False`) scores the weights in `score` and
never sees an image. A data-driven one (`needs_data = True`) is fed by the one
ranking loop (`ranking.py`), which owns the hooks and the forward and backward
passes over the ranking batches: the criterion only accumulates what each
feature map and its gradient say (`start`, `accumulate`) and scores (`result`).
"""

from __future__ import annotations

from typing import ClassVar, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.errors import ConfigError
from prunelab.pruning.criteria import ranking

Layers = dict[str, nn.Conv2d]
Maps = dict[str, tuple[nn.Module, ...]]


def l2_normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scores over their L2 norm, so that layers of different scale rank against each other
    (Molchanov et al. 2017, section 2.3)."""
    norm = scores.norm(p=2)
    return scores / norm if norm > 0 else scores


def as_tuple(modules) -> tuple[nn.Module, ...]:
    return tuple(modules) if isinstance(modules, (tuple, list)) else (modules,)


def feature_maps(layers: Layers, outputs: dict | None) -> Maps:
    """Each layer's feature-map modules (default: the conv's own output)."""
    return {name: as_tuple((outputs or {}).get(name, conv)) for name, conv in layers.items()}


def filters(layers: Layers, coupled: dict | None) -> dict[str, tuple[nn.Conv2d, ...]]:
    """Each layer's convs, its own first, then the others that lose a filter with it in their order."""
    return {name: (conv,) + tuple(c for c in (coupled or {}).get(name, (conv,)) if c is not conv)
            for name, conv in layers.items()}


class Criterion:
    """The interface. A subclass sets `name`, `paper`, `needs_data` and `settings` (its own
    settings: name -> (default, help)); a data-free one writes `score`, a data-driven one
    `start`, `accumulate` and `result`; one that needs what a network may lack writes `check`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    needs_data: ClassVar[bool] = False
    normalise: ClassVar[bool] = True  # L2-normalise each layer's scores
    per_image: ClassVar[bool] = False  # second order: the ranking loop backpropagates each image alone
    settings: ClassVar[dict[str, tuple[object, str]]] = {}

    def __init__(self, seed: int = 0, **settings):
        unknown = sorted(set(settings) - set(self.settings))
        if unknown:
            known = ", ".join(sorted(self.settings)) or "none"
            raise ConfigError(f"criterion {self.name} has no setting {unknown[0]!r} (its settings: {known})")
        self.seed = seed
        for key, (default, _help) in self.settings.items():
            setattr(self, key, settings.get(key, default))

    def check(self, model: nn.Module, layers: Layers, outputs: dict | None = None, coupled: dict | None = None) -> None:
        """Refuse, in one line, a network this criterion cannot score (default: any can be)."""

    def score(self, model: nn.Module, layers: Layers, outputs: dict | None, coupled: dict | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def start(self, layers: Layers, maps: Maps) -> None:
        raise NotImplementedError

    def accumulate(self, name: str, j: int, activation: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def accumulate_image(self) -> None:
        """A `per_image` criterion reads the weights' gradients of one image's loss here."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, layers: Layers, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 total: int | None = None, outputs: dict | None = None, coupled: dict | None = None) -> dict[str, torch.Tensor]:
        """One score per output filter of each layer in `layers`; a data-driven criterion ranks
        over `batches` (`total` of them, for the progress bar), a data-free one never reads them."""
        self.check(model, layers, outputs, coupled)
        if self.needs_data:
            if batches is None:
                raise ConfigError(f"criterion {self.name} ranks filters on images: it needs ranking batches")
            self.coupled_convs = filters(layers, coupled)  # every conv one filter index removes, per layer
            self.start(layers, feature_maps(layers, outputs))
            ranking.run(model, feature_maps(layers, outputs), batches, total, self.accumulate,
                        per_image=self.accumulate_image if self.per_image else None)
            raw = self.result()
        else:
            raw = self.score(model, layers, outputs, coupled)
        return {name: l2_normalise(raw[name]) if self.normalise else raw[name] for name in layers}


def tp_group(modules: Iterable[nn.Module]):
    """A Torch-Pruning group holding the output channels of `modules` (convs or BatchNorms) and
    nothing else, so that its importance classes score exactly the filters one index removes.
    The group the dependency graph would give also holds the input channels of every layer that
    reads the map, which Li et al.'s, He et al.'s and Liu et al.'s criteria do not count; a
    registered model's hand-chosen layers have no graph group at all."""
    import torch_pruning as tp
    from torch_pruning.pruner import function

    group = tp.dependency.Group()
    for module in modules:
        fn = function.prune_batchnorm_out_channels if isinstance(module, _BatchNorm) else function.prune_conv_out_channels
        node = tp.dependency.Node(module, None)
        idxs = list(range(module.weight.shape[0]))
        group.add_dep(tp.dependency.Dependency(fn, fn, node, node), idxs)
        group[len(group.items) - 1].root_idxs = idxs
    return group
