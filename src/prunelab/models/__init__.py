"""Model registry: name -> nn.Module class.

Every model class takes its widths as constructor arguments and has `spec()`
returning them, so a pruned network is rebuilt from (name, spec) alone, and
`prunable_convs()` naming the convs whose filters may be removed.
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


def get(name: str, **kwargs) -> nn.Module:
    cls = MODELS.get(name)
    if cls is None:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return cls(**kwargs)


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh `name` sized for the data: passes whichever of in_channels,
    num_classes and image_size its constructor takes."""
    cls = MODELS.get(name)
    if cls is None:
        get(name)  # raises the listing error
    wanted = inspect.signature(cls).parameters
    offered = {"in_channels": input_shape[0], "num_classes": num_classes, "image_size": input_shape[-1]}
    return cls(**{k: v for k, v in offered.items() if k in wanted})


def name_of(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a registered model")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
