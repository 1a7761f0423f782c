"""Merging clustered filters for real: a physically narrower network.
(Over 200 lines: the CIFAR ResNet's blocks and any network's graph are two ways
of finding the same thing, channels that may merge, feeding one exact merge.)

In a CIFAR ResNet only block-internal channels are merged (the first conv of each basic block),
whose outputs pass BatchNorm and ReLU into the block's second conv and nowhere
else. For those, with BN folded into the conv (w * g/s, b - g*m/s, s =
sqrt(var + eps)), channels whose folded filter and bias are identical produce
identical feature maps, so the consumer may keep one of them and sum its input
weights over the others: exact, not an approximation. Clustering the folded
(filter, bias) rows and replacing each by its centroid makes the channels of a
cluster identical; merging then removes all but one per cluster.

The merged block keeps the standard layout (conv1 without bias, then bn1): the
folded bias goes into a BatchNorm set to the identity plus a shift (mean 0,
var 1 - eps, weight 1), so the result is an ordinary ResNet with narrower
blocks, rebuilt from its `spec()` and loadable from a weights-only checkpoint.

Any other network (one from a factory) is merged where its graph allows the
same exact argument (`mergeable`): Torch-Pruning's dependency graph gives, for
each conv, every layer coupled to its output channels; the channels may merge
when one conv (with the BatchNorm right after it) makes them and only convs and
linear layers read them, through parameter-free steps alone (activations,
pooling, flatten, concatenation), which keep identical channels identical. A
residual sum (two convs make the channels), a depthwise conv or a
squeeze-and-excitation scale (they change each channel on its own), a second
normalisation, or the network's output rules a conv out. So does a conv that
reads channels another merged conv makes (in a chain like VGG's every other
conv merges), so that every cluster is planned on the weights it is applied to.
The consumers' input weights are summed through the graph's index mapping, so a
flatten in front of a Linear layer is handled, and Torch-Pruning removes the
merged channels from every coupled layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError
from prunelab.pruning.clustering import Clusters, kmeans, network_of


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv with the (eval-mode) BatchNorm folded in."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - scale * bn.running_mean
    if conv.bias is not None:
        bias = bias + scale * conv.bias
    return weight, bias


@torch.no_grad()
def _set_shift_bn(bn: nn.BatchNorm2d, bias: torch.Tensor) -> None:
    """Make `bn` compute x + bias in eval mode."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) == 1
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)


def cluster_block(block: nn.Module, k: int, seed: int, distance: str = "euclidean", importance: str = "none",
                  n_init: int = 10, name: str = "block") -> Clusters:
    """k-means on the block's first conv with BN folded in: rows are (filter, bias)."""
    weight, bias = fold_bn(block.conv1, block.bn1)
    rows = torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], dim=1)
    return kmeans(rows, k, seed, distance, importance, n_init, f"{name}.conv1")


def _split(block: nn.Module, clusters: Clusters) -> tuple[torch.Tensor, torch.Tensor]:
    shape = block.conv1.weight.shape[1:]
    n = shape.numel()
    return clusters.centroids[:, :n].reshape(-1, *shape), clusters.centroids[:, n]


@torch.no_grad()
def apply_centroids(block: nn.Module, clusters: Clusters) -> None:
    """The unmerged centroid network: every folded channel replaced by its
    cluster's centroid, widths unchanged (the reference the merge must match)."""
    weight, bias = _split(block, clusters)
    block.conv1.weight.copy_(weight[clusters.labels])
    if block.conv1.bias is not None:
        block.conv1.bias.zero_()
    _set_shift_bn(block.bn1, bias[clusters.labels])


@torch.no_grad()
def merge_block(block: nn.Module, clusters: Clusters) -> None:
    """Keep one channel per cluster (its centroid) and sum the second conv's input
    weights over each cluster's channels, in place: conv1/bn1/conv2 get K channels."""
    old1, old2 = block.conv1, block.conv2
    if clusters.labels.numel() != old1.out_channels:
        raise ConfigError(f"clusters cover {clusters.labels.numel()} channels, the block has {old1.out_channels}")
    weight, bias = _split(block, clusters)
    k = clusters.k
    like = {"device": old1.weight.device, "dtype": old1.weight.dtype}  # the new layers live where the old ones did
    conv1 = nn.Conv2d(old1.in_channels, k, old1.kernel_size, old1.stride, old1.padding, bias=False, **like)
    conv1.weight.copy_(weight)
    bn1 = nn.BatchNorm2d(k, eps=block.bn1.eps, momentum=block.bn1.momentum, **like)
    _set_shift_bn(bn1, bias)
    conv2 = nn.Conv2d(k, old2.out_channels, old2.kernel_size, old2.stride, old2.padding, bias=old2.bias is not None,
                      **like)
    conv2.weight.zero_().index_add_(1, clusters.labels, old2.weight)  # sum inputs of each cluster
    if old2.bias is not None:
        conv2.bias.copy_(old2.bias)
    block.conv1, block.bn1, block.conv2 = conv1, bn1, conv2
    block.train(block.training)  # new modules start in training mode; take the block's


def plan_merge(model: nn.Module, keep: float, seed: int, distance: str = "euclidean", importance: str = "none",
               n_init: int = 10, example: torch.Tensor | None = None) -> dict[str, Clusters]:
    """Clusters of every mergeable conv at K = max(1, round(keep * C)): each block-internal conv
    of a CIFAR ResNet, or each conv its graph lets merge (`mergeable`, traced on `example`)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"keep must be a fraction in (0, 1], got {keep!r}")
    was_training = model.training
    model.eval()  # folding uses the running statistics
    try:
        if _has_blocks(model):
            return {name: cluster_block(block, max(1, round(keep * block.conv1.out_channels)), seed, distance,
                                        importance, n_init, name)
                    for name, block in model.blocks()}
        return {name: kmeans(_folded_rows(unit), max(1, round(keep * unit.conv.out_channels)), seed, distance,
                             importance, n_init, name)
                for name, unit in mergeable(model, _example(model, example)).items()}
    finally:
        model.train(was_training)


def apply_merge(model: nn.Module, plan: dict[str, Clusters], centroids_only: bool = False,
                example: torch.Tensor | None = None) -> dict[str, int]:
    """Merge each planned block or conv in place (or, with centroids_only, build the
    unmerged centroid network); returns {block or conv: K}."""
    if not _has_blocks(model):
        return _apply_graph_merge(model, plan, centroids_only, _example(model, example))
    blocks = dict(model.blocks())
    for name, clusters in plan.items():
        if name not in blocks:
            raise ConfigError(f"no block {name!r} in this model: valid ones are {', '.join(blocks)}")
        (apply_centroids if centroids_only else merge_block)(blocks[name], clusters)
    return {name: clusters.k for name, clusters in plan.items()}


def can_merge(model: nn.Module, example: torch.Tensor | None = None) -> bool:
    """Whether `model` has anything to merge: blocks, or convs its graph lets merge."""
    return bool(model.blocks()) if _has_blocks(model) else bool(mergeable(model, _example(model, example)))


def _has_blocks(model: nn.Module) -> bool:
    return callable(getattr(model, "blocks", None))


# --------------------------------------------------------------------------- any network, from its graph

@dataclass
class Mergeable:
    """A conv whose output channels may merge: the BatchNorm right after it (if any) and the
    convs and linear layers that read its channels."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    readers: tuple[nn.Module, ...]


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError("merging a network without blocks needs an example input to trace its graph")
    return torch.zeros(1, *shape, device=next(model.parameters()).device)


def _graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()  # tracing runs the network: BatchNorm's running statistics stay as they are
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        model.train(was_training)


def mergeable(model: nn.Module, example: torch.Tensor, graph: tp.DependencyGraph | None = None) -> dict[str, Mergeable]:
    """Conv name (as the network names it) -> what merging its channels touches, for every conv
    whose channels the graph lets merge exactly (see the module's docstring), in network order."""
    graph = graph or _graph(model, example)
    names = {m: n for n, m in network_of(model).named_modules()}
    found: dict[str, Mergeable] = {}
    made, read = set(), set()  # convs already chosen, and the layers reading their channels
    for conv in (m for m in network_of(model).modules() if isinstance(m, nn.Conv2d)):
        unit = _unit(graph, conv) if conv.groups == 1 else None
        if unit is None or conv in read or any(r in made for r in unit.readers):
            continue
        found[names[conv]] = unit
        made.add(conv)
        read.update(unit.readers)
    return found


def _unit(graph: tp.DependencyGraph, conv: nn.Conv2d) -> Mergeable | None:
    """What merging `conv`'s channels touches, or None when the graph does not allow it."""
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    after = {node.module for node in graph.module2node[conv].outputs}
    bn, readers = None, []
    for item in group.items:
        node, module = item.dep.target, item.dep.target.module
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return None  # its channels are the network's output
        if module is conv:
            continue
        if isinstance(module, nn.BatchNorm2d) and bn is None and module in after:
            bn = module
        elif (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)) \
                and not graph.is_out_channel_pruning_fn(item.dep.handler):
            if not _reads_every_channel_alike(item, conv.out_channels):
                return None  # a slice of the channels: a merged channel could be read where its keeper is not
            readers.append(module)
        elif isinstance(module, nn.Parameter) or (isinstance(module, nn.Module) and any(True for _ in module.parameters())):
            return None  # another producer, a depthwise conv, a second norm, ...: channels would differ
    return Mergeable(conv, bn, tuple(dict.fromkeys(readers))) if readers else None


def _reads_every_channel_alike(item, channels: int) -> bool:
    """Whether a reader takes every channel, each as many inputs (one, or a flatten's block)."""
    counts: dict[int, int] = {}
    for root in item.root_idxs:
        counts[root] = counts.get(root, 0) + 1
    return set(counts) == set(range(channels)) and len(set(counts.values())) == 1


@torch.no_grad()
def _folded_rows(unit: Mergeable) -> torch.Tensor:
    """(filter, bias) rows of the conv with its BatchNorm folded in (as `fold_bn`)."""
    if unit.bn is not None:
        weight, bias = fold_bn(unit.conv, unit.bn)
    else:
        weight = unit.conv.weight
        bias = unit.conv.bias if unit.conv.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], dim=1)


def _apply_graph_merge(model: nn.Module, plan: dict[str, Clusters], centroids_only: bool,
                       example: torch.Tensor) -> dict[str, int]:
    graph = _graph(model, example)
    units = mergeable(model, example, graph)
    unknown = [name for name in plan if name not in units]
    if unknown:
        raise ConfigError(f"no mergeable conv {unknown[0]!r} in this model: mergeable ones are {', '.join(units)}")
    for name, clusters in plan.items():
        unit = units[name]
        if clusters.labels.numel() != unit.conv.out_channels:
            raise ConfigError(f"clusters cover {clusters.labels.numel()} channels, {name} has {unit.conv.out_channels}")
        keeper = [int((clusters.labels == j).nonzero()[0]) for j in range(clusters.k)]  # first member of each cluster
        if not centroids_only:
            _sum_readers(graph, unit, clusters.labels.tolist(), keeper)
        _set_centroids(unit, clusters)
        gone = sorted(set(range(unit.conv.out_channels)) - set(keeper))
        if not centroids_only and gone:
            graph.get_pruning_group(unit.conv, tp.prune_conv_out_channels, gone).prune()
    return {name: clusters.k for name, clusters in plan.items()}


@torch.no_grad()
def _sum_readers(graph: tp.DependencyGraph, unit: Mergeable, labels: list[int], keeper: list[int]) -> None:
    """Add each merged channel's input weights, in every layer reading it, to its cluster's kept
    channel. The graph maps a channel to a reader's inputs (one for a conv, a spatial block of
    them behind a flatten; moved by a concatenation), in the same order for every channel."""
    group = graph.get_pruning_group(unit.conv, tp.prune_conv_out_channels, list(range(unit.conv.out_channels)))
    done = set()
    for item in group.items:
        reader = item.dep.target.module
        key = (reader, tuple(item.idxs))  # a reader reading the channels twice (twice concatenated) sums both
        if reader not in unit.readers or key in done or graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        done.add(key)
        inputs: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs):
            inputs.setdefault(root, []).append(idx)
        weight = reader.weight
        for channel, label in enumerate(labels):
            kept = keeper[label]
            if channel != kept:
                weight[:, inputs[kept]] += weight[:, inputs[channel]]


@torch.no_grad()
def _set_centroids(unit: Mergeable, clusters: Clusters) -> None:
    """Every channel of the conv made its cluster's centroid, BatchNorm folded: the conv takes the
    folded filters, and the BatchNorm (or the conv's bias, where none follows) the folded bias."""
    conv = unit.conv
    n = conv.weight[0].numel()
    rows = clusters.centroids[clusters.labels]
    conv.weight.copy_(rows[:, :n].reshape_as(conv.weight))
    if unit.bn is not None:
        if conv.bias is not None:
            conv.bias.zero_()
        _set_shift_bn(unit.bn, rows[:, n])
    elif conv.bias is not None:
        conv.bias.copy_(rows[:, n])
