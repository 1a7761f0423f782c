"""Physical filter removal with Torch-Pruning's dependency graph.

Removing output filters of a conv also removes the matching input channels of
every consumer (the next conv, a BatchNorm, the Linear columns behind a
Flatten); the dependency graph finds those couplings so no model needs
hand-written surgery.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError
from prunelab.pruning.schedule import Plan


def remove_filters(model: nn.Module, plan: Plan, example_input: torch.Tensor) -> None:
    """Remove, in place, the filters `plan` names (indices in each layer's current numbering)."""
    modules = dict(model.named_modules())
    for name, idxs in plan.items():
        if not idxs:
            continue
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"{name!r} is not a conv layer of this model")
        if len(set(idxs)) >= conv.out_channels:
            raise ConfigError(f"plan removes every filter of {name}: keep at least one")
        # Rebuilt per layer: cheap for these networks, and immune to index
        # bookkeeping left over from the previous group.
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(set(idxs)))
        if not graph.check_pruning_group(group):
            raise ConfigError(f"Torch-Pruning refuses to remove {len(idxs)} filters of {name}")
        group.prune()
