"""What filter pruning may remove from a network, found from its structure.

Torch-Pruning's dependency graph groups the layers whose channels are coupled:
a conv with its BatchNorm and the input channels of everything that reads it;
every conv feeding the same residual sum; a depthwise conv with the conv
before it; channel ranges through a concatenation. Each such group is one
prunable *layer* here, named after its first conv in network order: removing
its filter k removes channel k from every member at once.

Never pruned: a group whose channels reach the network's output (a conv
classifier's classes; a Linear classifier is never a root), a group holding a
layer named in `prune.ignored_layers`, and a group that reaches a grouped (not
depthwise) conv, whose input or output channels could only go a whole conv
group at a time (ResNeXt, RegNet: their residual streams stay prunable).

A registered model names its layers itself (`FilterPrunable.prunable_convs` and
`feature_maps`, in `models/base.py`): those hand-written choices override the
graph, so its studies keep their numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Prunable:
    """The prunable layers of one network, in network order."""

    convs: dict[str, nn.Conv2d]                      # layer name -> its first conv (out_channels: the layer's width)
    feature_maps: dict[str, tuple[nn.Module, ...]]   # the modules whose outputs removing a filter deletes
    filters: dict[str, tuple[nn.Conv2d, ...]]        # every conv that loses a filter when the layer does

    def widths(self) -> dict[str, int]:
        return {name: conv.out_channels for name, conv in self.convs.items()}


def named_layers(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[nn.Module]:
    """The modules `names` name, as `model.named_modules()` has them or, for a wrapper that holds
    its network as `.network` (a factory's network), as that network has them. A name that names
    no layer is one line listing close ones."""
    modules = dict(model.named_modules())
    inner = "network." if isinstance(getattr(model, "network", None), nn.Module) else ""
    found = []
    for name in names:
        module = modules.get(name) if name else None
        if module is None and inner:
            module = modules.get(inner + name)
        if module is None:
            import difflib

            known = [n.removeprefix(inner) for n in modules if n]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            raise ConfigError(f"prune.ignored_layers names {name!r}, which is no layer of the model"
                              + (f": did you mean {', '.join(close)}?" if close else
                                 " (names as model.named_modules() gives them, e.g. layer4.1.conv2)"))
        found.append(module)
    return found


def find(model: nn.Module, example: torch.Tensor, ignored: tuple[str, ...] | list[str] = ()) -> Prunable:
    """The layers filter pruning may thin, each with the feature maps a data-driven criterion scores;
    layers named in `ignored` (and every layer inside them) keep all their filters. One line when
    nothing is left to prune."""
    skip = {m for module in named_layers(model, ignored) for m in module.modules()}
    if callable(getattr(model, "prunable_convs", None)):
        prunable = _hand_written(model, skip)
    else:
        prunable = _from_graph(model, example, skip)
    if not prunable.convs:
        why = " outside prune.ignored_layers" if ignored else ""
        raise ModelError(f"the model has no conv whose filters can be removed{why}: filter pruning needs a "
                         "Conv2d whose output channels do not reach the network's output directly")
    return prunable


def _hand_written(model: nn.Module, skip: set[nn.Module]) -> Prunable:
    convs = {n: c for n, c in model.prunable_convs().items() if c not in skip}
    maps = model.feature_maps()
    return Prunable(convs, {n: (maps.get(n, c),) for n, c in convs.items()}, {n: (c,) for n, c in convs.items()})


def _from_graph(model: nn.Module, example: torch.Tensor, skip: set[nn.Module]) -> Prunable:
    order = {m: i for i, m in enumerate(model.modules())}
    names = {m: n for n, m in model.named_modules()}
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:  # whatever tracing a foreign network raises
        raise ModelError(f"Torch-Pruning cannot trace the model's layers: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}") from None
    layers = []
    for group in graph.get_all_groups(ignored_layers=list(skip), root_module_types=[nn.Conv2d]):
        if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group):
            continue  # its channels are the network's output: the classes
        if any(isinstance(dep.target.module, nn.Conv2d) and _grouped(dep.target.module) for dep, _ in group):
            continue  # a grouped conv loses its input or output channels only a conv group at a time
        losing = [dep.target for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        convs = sorted({node.module for node in losing if isinstance(node.module, nn.Conv2d)}, key=order.__getitem__)
        if not convs:
            continue
        nodes = {node.module: node for node in losing}
        maps = tuple(_feature_map(nodes[conv], set(nodes)) for conv in convs)
        layers.append((names[convs[0]], convs, maps))
    layers.sort(key=lambda layer: order[layer[1][0]])
    return Prunable({n: convs[0] for n, convs, _ in layers}, {n: maps for n, _, maps in layers},
                    {n: tuple(convs) for n, convs, _ in layers})


def _grouped(conv: nn.Conv2d) -> bool:
    """A grouped conv that is not depthwise (one filter per input channel)."""
    return conv.groups > 1 and not (conv.groups == conv.in_channels == conv.out_channels)


def _feature_map(node, members: set[nn.Module]) -> nn.Module:
    """What removing one of a conv's filters deletes: the output of the BatchNorm right after it
    (that BatchNorm loses the channel too), else the conv's own output."""
    for after in node.outputs:
        if isinstance(after.module, nn.modules.batchnorm._BatchNorm) and after.module in members:
            return after.module
    return node.module
