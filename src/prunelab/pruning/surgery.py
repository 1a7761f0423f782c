"""Physical filter removal with Torch-Pruning's dependency graph.

Removing output filters of a conv also removes the matching input channels of
every consumer (the next conv, a BatchNorm, the Linear columns behind a
Flatten); the dependency graph finds those couplings so no model needs
hand-written surgery. Building the graph traces the network (seconds for a
VGG16 at 224 px), so a `FilterRemover` builds it once and keeps it for every
later removal: Torch-Pruning updates the graph's modules in place as it prunes.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError
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
                raise ConfigError(f"Torch-Pruning refuses to remove {len(idxs)} filters of {name}")
            group.prune()


def remove_filters(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> None:
    """Remove, in place, the filters `plan` names: one-off surgery (a `FilterRemover` of its own)."""
    FilterRemover(model, example_input).remove(plan)
