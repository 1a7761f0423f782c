"""Model registry: name -> nn.Module class.

Every model class follows `base.Model`: it takes its widths as constructor
arguments and `spec()` returns them, so a pruned network is rebuilt from
(name, spec) alone. What else a model offers (prunable convs, stages, blocks)
is declared in `base.py`.
"""

from __future__ import annotations

import inspect

from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.conv import Conv2, Conv4, Conv6
from prunelab.models.lenet import LeNet300100
from prunelab.models.resnet_cifar import DEPTHS as RESNET_CIFAR
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.models.vgg import VGG16Transfer

MODELS: dict[str, type[nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "conv2": Conv2,
    "conv4": Conv4,
    "conv6": Conv6,
    "lenet_300_100": LeNet300100,
    "vgg16": VGG16Transfer,
    **RESNET_CIFAR,  # resnet20/32/44/56/110/1202 for CIFAR
}


def model_class(name: str) -> type[nn.Module]:
    cls = MODELS.get(name)
    if cls is None:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return cls


def get(name: str, **kwargs) -> nn.Module:
    return model_class(name)(**kwargs)


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh `name` sized for the data: passes whichever of in_channels,
    num_classes and image_size its constructor takes."""
    cls = model_class(name)
    wanted = inspect.signature(cls).parameters
    offered = {"in_channels": input_shape[0], "num_classes": num_classes, "image_size": input_shape[-1]}
    return cls(**{k: v for k, v in offered.items() if k in wanted})


def name_of(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a registered model")


def is_registered(model: nn.Module) -> bool:
    """Whether `model` is a registered architecture (a network prunelab can rebuild and prune)."""
    return type(model) in MODELS.values()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
