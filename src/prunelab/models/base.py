"""What a model offers, declared once.

Every registered model follows `Model`: it is rebuilt from (registry name,
`spec()`) alone and reads its widths off a state dict. A study kind names the
protocol its model must follow on top of that (`StudyKind.model_protocol`),
and its `check` refuses a model that lacks a method before anything loads.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class Model(Protocol):
    """Every registered model: rebuilt from its registry name and `spec()`."""

    def spec(self) -> dict:
        """Constructor arguments that rebuild this network at its current widths."""

    @classmethod
    def spec_from_state_dict(cls, state: dict) -> dict:
        """Constructor arguments read off a (possibly pruned) state dict."""


class FilterPrunable(Model, Protocol):
    """Filter pruning: convs whose output filters may be removed physically."""

    def prunable_convs(self) -> dict[str, nn.Conv2d]:
        """Layer name -> conv; removing its filters never breaks a residual sum."""

    def feature_maps(self) -> dict[str, nn.Module]:
        """Layer name (as in `prunable_convs`) -> the module whose output is the feature map
        that removing one of the conv's filters deletes: the conv itself, or the BatchNorm
        after it. What a data-driven criterion scores."""


class Clusterable(Model, Protocol):
    """k-means filter clustering: convs grouped into stages, and basic blocks to merge."""

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """Every conv in network order."""

    def stage_convs(self) -> dict[str, list[str]]:
        """Stage name -> the names of its convs."""

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, block) of every block whose internal channels may be merged."""


class TransferBackbone(FilterPrunable, Protocol):
    """Transfer learning: pretrained features, frozen, under a new trainable head."""

    def head(self) -> nn.Module:
        """The new head: what trains on the cached features."""

    def head_input(self, x):
        """What the head sees (cached while the features are frozen)."""

    def set_features_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the feature extractor."""

    def load_features(self, state: dict, source: str) -> None:
        """Copy the feature extractor's weights from a pretrained state dict (`source` names
        it); the head stays new. Another architecture's state dict is a one-line ModelError."""

    @classmethod
    def published_features(cls) -> tuple[dict, str]:
        """The published pretrained weights (fetched when needed) and where they came from;
        a one-line ModelError naming the file to pass where they cannot be had."""


def members(protocol: type) -> list[str]:
    """The methods a protocol (and the protocols it extends) declares."""
    names: dict[str, None] = {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or not getattr(base, "_is_protocol", False):
            continue
        names.update(dict.fromkeys(n for n in vars(base) if not n.startswith("_")))
    return list(names)


def missing(cls: type, protocol: type) -> list[str]:
    """The methods of `protocol` that the model class `cls` does not offer."""
    return [name for name in members(protocol) if not callable(getattr(cls, name, None))]
