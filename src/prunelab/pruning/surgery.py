"""Physical filter removal with Torch-Pruning's dependency graph.

Removing output filters of a conv also removes the matching input channels of
every consumer (the next conv, a BatchNorm, the Linear columns behind a
Flatten); the dependency graph finds those couplings so no model needs
hand-written surgery. Building the graph traces the network (seconds for a
VGG16 at 224 px), so a `FilterRemover` builds it once and keeps it for every
later removal: Torch-Pruning updates the graph's modules in place as it prunes.

A pruned network of a factory is saved as its factory plus each conv's width
(`models.factory.FactoryNetwork.spec`); `shrink_to` thins a fresh copy to those
widths, so the saved state dict fits it without anything being unpickled.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError, ModelError
from prunelab.pruning.schedule import Plan


class FilterRemover:
    """Removes planned filters from one model, tracing it once."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model, self.example_input = model, example_input
        self._graph: tp.DependencyGraph | None = None

    def remove(self, plan: Plan) -> None:
        """Remove, in place, the filters `plan` names (indices in each layer's current numbering)."""
        modules = dict(self.model.named_modules())
        for name, idxs in plan.items():
            conv = modules.get(name)
            if not isinstance(conv, nn.Conv2d):
                raise ConfigError(f"{name!r} is not a conv layer of this model")
            if len(set(idxs)) >= conv.out_channels:
                raise ConfigError(f"plan removes every filter of {name}: keep at least one")
        if self._graph is None:
            self._graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example_input)
        for name, idxs in plan.items():
            if not idxs:
                continue
            group = self._graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=sorted(set(idxs)))
            if not self._graph.check_pruning_group(group):
                raise ConfigError(f"Torch-Pruning refuses to remove {len(idxs)} filters of {name}: a layer coupled to it "
                                  "would lose every channel; name it in prune.ignored_layers")
            group.prune()


def remove_filters(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> None:
    """Remove, in place, the filters `plan` names: one-off surgery (a `FilterRemover` of its own)."""
    FilterRemover(model, example_input).remove(plan)


def shrink_to(model: nn.Module, widths: dict[str, int], example_input: torch.Tensor) -> None:
    """Thin a freshly built `model`, in place, to the conv widths (output channels) a pruned copy
    of it had: each conv wider than its stored width loses its last filters, with every layer
    coupled to them. Which filters go does not matter: the state dict loaded next overwrites
    every weight. Widths that no pruning of this network reaches are one line."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = sorted(set(widths) - set(convs))
    if unknown:
        raise ModelError(f"the network has no conv {unknown[0]!r} ({len(unknown)} unknown layer(s))")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    for name, conv in convs.items():
        want = widths.get(name, conv.out_channels)
        if 1 <= want < conv.out_channels:
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(want, conv.out_channels)))
            if graph.check_pruning_group(group):
                group.prune()
    wrong = [(name, conv.out_channels, widths[name]) for name, conv in convs.items()
             if name in widths and conv.out_channels != widths[name]]
    if wrong:
        name, got, want = wrong[0]
        raise ModelError(f"its widths do not come from pruning this network: {name} has {got} filters, not {want} "
                         f"({len(wrong)} layer(s) differ)")
