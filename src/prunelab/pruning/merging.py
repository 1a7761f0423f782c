"""Merging clustered filters for real: a physically narrower network.

Only block-internal channels are merged (the first conv of each basic block),
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
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.pruning.clustering import Clusters, kmeans


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
               n_init: int = 10) -> dict[str, Clusters]:
    """Clusters of every block-internal conv of a CIFAR ResNet at K = max(1, round(keep * C))."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"keep must be a fraction in (0, 1], got {keep!r}")
    was_training = model.training
    model.eval()  # folding uses the running statistics
    plan = {name: cluster_block(block, max(1, round(keep * block.conv1.out_channels)), seed, distance, importance,
                                n_init, name)
            for name, block in model.blocks()}
    model.train(was_training)
    return plan


def apply_merge(model: nn.Module, plan: dict[str, Clusters], centroids_only: bool = False) -> dict[str, int]:
    """Merge each planned block in place (or, with centroids_only, build the
    unmerged centroid network); returns {block: K}."""
    blocks = dict(model.blocks())
    for name, clusters in plan.items():
        if name not in blocks:
            raise ConfigError(f"no block {name!r} in this model: valid ones are {', '.join(blocks)}")
        (apply_centroids if centroids_only else merge_block)(blocks[name], clusters)
    return {name: clusters.k for name, clusters in plan.items()}
