"""k-means filter clustering: group a conv's filters, replace each by its cluster's centroid.

A conv with C filters clustered into K < C groups computes only K distinct
feature maps; "clusters pruned away" is C - K. A registered model names its
convs and stages (`models.base.Clusterable`); a network from a factory offers
every conv it has, and any of its modules that holds convs is a stage. Replacing filters in place
(`replace_by_centroids`) measures how much accuracy that costs without changing
the network's shape; `merging.py` then removes the duplicates for real.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunelab.errors import ConfigError

DISTANCES = ("euclidean", "cosine")
IMPORTANCES = ("none", "l1")


@dataclass
class Clusters:
    labels: torch.Tensor     # (C,) cluster of each filter, in 0..K-1
    centroids: torch.Tensor  # (K, D) one representative row per cluster

    @property
    def k(self) -> int:
        return self.centroids.shape[0]


def check_k(k: int, c: int, layer: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
        raise ConfigError(f"{layer} has {c} filters: the number of clusters K must be in 1..{c}, got {k!r}")


def kmeans(rows: torch.Tensor, k: int, seed: int, distance: str = "euclidean", importance: str = "none",
           n_init: int = 10, layer: str = "layer") -> Clusters:
    """Cluster the rows of a (C, D) matrix into k groups (scikit-learn KMeans, fixed seed).

    Cosine distance clusters the unit-normalised rows (spherical k-means), so
    filters that differ only in scale group together. Either way a cluster's
    centroid is the mean of its members' original rows (weighted by their L1
    norm with importance='l1', so strong filters dominate), which is what the
    merged network computes.
    """
    c = rows.shape[0]
    check_k(k, c, layer)
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}: choose one of {', '.join(DISTANCES)}")
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown importance {importance!r}: choose one of {', '.join(IMPORTANCES)}")
    # scikit-learn clusters on the CPU; the clusters go back to the rows' device.
    data = rows.detach().double().cpu()
    if k == c:
        # Every filter its own cluster: exact identity (KMeans would only warn on duplicates).
        return Clusters(torch.arange(c, device=rows.device), rows.detach().clone())
    from sklearn.cluster import KMeans

    points = data / data.norm(dim=1, keepdim=True).clamp_min(1e-12) if distance == "cosine" else data
    fitted = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points.numpy())
    labels = torch.from_numpy(fitted.labels_.astype(np.int64))
    weights = data.abs().sum(dim=1) if importance == "l1" else torch.ones(c, dtype=torch.float64)
    centroids = torch.zeros(k, data.shape[1], dtype=torch.float64)
    centroids.index_add_(0, labels, data * weights[:, None])
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, weights).clamp_min(1e-12)
    return Clusters(labels.to(rows.device), (centroids / total[:, None]).to(rows.device, rows.dtype))


def network_of(model: nn.Module) -> nn.Module:
    """The network whose layer names a user writes: a factory's own network inside the
    grey-channel wrapper (`models.factory.FactoryNetwork`), else the model itself."""
    inner = getattr(model, "network", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "factory") else model


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every conv in network order: the model's own list (`Clusterable.conv_layers`), or, for a
    network from a factory, every Conv2d it holds, named as its `named_modules()` names them."""
    own = getattr(model, "conv_layers", None)
    if callable(own):
        return own()
    return {name: m for name, m in network_of(model).named_modules() if isinstance(m, nn.Conv2d)}


def stage_convs(model: nn.Module, stage: str) -> list[str] | None:
    """The convs of `stage`: a stage the model names (`Clusterable.stage_convs`), or, for a
    network from a factory, any module of it (`layer1`, `features.3`) that holds convs."""
    own = getattr(model, "stage_convs", None)
    if callable(own):
        return own().get(stage)
    module = dict(network_of(model).named_modules()).get(stage) if stage else None
    if module is None:
        return None
    inside = {m for m in module.modules() if isinstance(m, nn.Conv2d)}
    return [name for name, conv in conv_layers(model).items() if conv in inside] or None


def stage_names(model: nn.Module) -> list[str]:
    """The stages an error lists: the model's own, or a factory network's top-level modules that hold convs."""
    own = getattr(model, "stage_convs", None)
    if callable(own):
        return list(own())
    return [name for name, child in network_of(model).named_children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())]


def resolve_layers(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, nn.Conv2d]:
    """The named convs of `model`; an unknown name fails listing the valid ones."""
    convs = conv_layers(model)
    for name in names:
        if name not in convs:
            raise ConfigError(f"no conv layer {name!r} in this model: valid ones are {_listed(list(convs))}")
    return {name: convs[name] for name in names}


def resolve_stage(model: nn.Module, stage: str) -> list[str]:
    names = stage_convs(model, stage)
    if not names:
        raise ConfigError(f"no stage {stage!r} in this model: valid ones are {_listed(stage_names(model))}"
                          + ("" if callable(getattr(model, "stage_convs", None)) else
                             " (or any module holding convs, as named_modules() names it)"))
    return names


def _listed(names: list[str], most: int = 24) -> str:
    """Names for a one-line error: all of a registered model's, the first `most` of a large network's."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


@torch.no_grad()
def replace_by_centroids(conv: nn.Conv2d, k: int, seed: int, distance: str = "euclidean", importance: str = "none",
                         n_init: int = 10, layer: str = "layer") -> Clusters:
    """Cluster the conv's flattened filters (with its bias, if any) into k and
    overwrite each filter by its centroid, in place."""
    w = conv.weight
    rows = w.reshape(w.shape[0], -1)
    if conv.bias is not None:
        rows = torch.cat([rows, conv.bias[:, None]], dim=1)
    clusters = kmeans(rows, k, seed, distance, importance, n_init, layer)
    new = clusters.centroids[clusters.labels]
    w.copy_(new[:, : w[0].numel()].reshape_as(w))
    if conv.bias is not None:
        conv.bias.copy_(new[:, -1])
    return clusters


def cluster_layers(model: nn.Module, names: list[str], clusters_pruned: int, seed: int, distance: str = "euclidean",
                   importance: str = "none", n_init: int = 10) -> dict[str, int]:
    """Replace the filters of each named conv by k-means centroids with K = C - clusters_pruned;
    returns {layer: K}."""
    convs = resolve_layers(model, names)
    out = {}
    for name, conv in convs.items():
        k = conv.out_channels - clusters_pruned
        replace_by_centroids(conv, k, seed, distance, importance, n_init, name)
        out[name] = k
    return out
