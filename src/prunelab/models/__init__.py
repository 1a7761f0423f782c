"""Model registry: name -> nn.Module class, and networks from factories.

Every model class follows `base.Model`: it takes its widths as constructor
arguments and `spec()` returns them, so a pruned network is rebuilt from
(name, spec) alone. What else a model offers (prunable convs, stages, blocks)
is declared in `base.py`. A model setting with a colon (`torchvision:NAME`,
`PACKAGE.MODULE:FUNCTION`) names a factory instead (`factory.py`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from prunelab.hardware import check_memory
from prunelab.errors import ConfigError, ModelError
from prunelab.models import factory
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


# Bytes per parameter while training: the weights, their gradients and Adam's two moments, as float32.
TRAINING_BYTES_PER_PARAM = 16


def from_spec(name: str, spec: dict, where: str = "") -> nn.Module:
    """`name` built from constructor arguments (a checkpoint's spec, or a model's
    size for the data). Arguments its constructor does not take, and a network
    too large for this machine's memory, are refused in one line before any
    weight is allocated: the network is first built on the meta device, which
    allocates nothing."""
    cls = model_class(name)
    where = f"{where}: " if where else ""
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise ModelError(f"{where}the {name} spec must map argument names to values, got {spec!r:.120}")
    try:
        with torch.device("meta"):
            shape_only = cls(**spec)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise ModelError(f"{where}cannot build {name} from {spec!r:.160}: {str(exc).splitlines()[0][:120]}") from None
    n = count_params(shape_only)
    check_memory(n * TRAINING_BYTES_PER_PARAM, f"{where}a {name} with {n:,} parameters",
                 "its spec asks for far wider layers than the model was made with; check the file or the settings")
    return cls(**spec)


def get(name: str, **kwargs) -> nn.Module:
    return from_spec(name, kwargs)


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """A fresh `name` sized for the data: passes whichever of in_channels,
    num_classes and image_size its constructor takes, and `options` as they are
    (one its constructor does not take is refused in one line). A factory's name
    builds its network (`factory.build`), which takes no options."""
    if factory.is_factory(name) and not options:
        return factory.build(name, tuple(input_shape), num_classes)
    cls = model_class(name)
    wanted = inspect.signature(cls).parameters
    offered = {"in_channels": input_shape[0], "num_classes": num_classes, "image_size": input_shape[-1]}
    return from_spec(name, {**{k: v for k, v in offered.items() if k in wanted}, **options})


def takes(name: str, argument: str) -> bool:
    """Whether the constructor of model `name` takes `argument` (e.g. `hidden`, a head's width)."""
    return argument in inspect.signature(model_class(name)).parameters


def name_of(model: nn.Module) -> str:
    """The registry name of `model`'s class, or the factory that built it."""
    if isinstance(model, factory.FactoryNetwork):
        return model.factory
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a registered model")


def is_registered(model: nn.Module) -> bool:
    """Whether `model` is a registered architecture (a network prunelab can rebuild and prune)."""
    return type(model) in MODELS.values()


def is_rebuildable(model: nn.Module) -> bool:
    """Whether `model` is a bare network prunelab can save, rebuild and prune: a registered
    architecture or a factory's network (not a traced graph loaded from a logged model)."""
    return is_registered(model) or isinstance(model, factory.FactoryNetwork)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
