"""Networks from factories: `torchvision:NAME` and the user's own `PACKAGE.MODULE:FUNCTION`.

A model setting with a colon names a factory rather than a registered model.
`torchvision:NAME` is any classifier `torchvision.models.get_model` builds,
always from scratch (`weights=None`: nothing is downloaded). Anything else is a
function in the user's code, imported from the working folder or the
environment and called with whichever of `num_classes` and `in_channels` it
takes. Either way the network is held in a `FactoryNetwork`, which remembers
how it was made, so a checkpoint rebuilds it from the factory's name, its
arguments and the input shape (and `checkpoints` re-applies the pruned widths).

Importing a user's factory runs that module's code. It happens only when the
user names the factory (the `model` setting, `prunelab evaluate --model`): a
checkpoint or model URI that names a user factory is refused unless the caller
named that same factory (`rebuild`'s `trusted`), so a file can never make
prunelab import anything. A torchvision name only ever builds torchvision's
own classifiers.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import sys
from typing import Callable, NamedTuple

import torch
from torch import nn

from prunelab.config import MAX_IMAGE_SIZE
from prunelab.errors import ConfigError, ModelError, first_line
from prunelab.hardware import check_memory

SEPARATOR = ":"
# The arguments prunelab offers a factory, from the data; a factory gets those it names.
OFFERED = ("num_classes", "in_channels")
MAX_CLASSES = 100_000  # a checkpoint asking for more classes is damaged, not a classifier
TRAINING_BYTES_PER_PARAM = 16  # as models.TRAINING_BYTES_PER_PARAM: weights, gradients, Adam's two moments


class Factory(NamedTuple):
    """A resolved factory: how to call it and which of `OFFERED` it takes."""

    call: Callable[..., object]
    takes: frozenset[str]


def is_factory(name: str) -> bool:
    """Whether a model setting names a factory (`torchvision:NAME`, `module:function`), not a registered model."""
    return SEPARATOR in name


# --------------------------------------------------------------------------- the sources

@functools.lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    """The names torchvision's classification models are registered under (no detection,
    segmentation, video or quantised ones: those live in submodules)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str) -> Factory:
    names = torchvision_classifiers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(f'torchvision:{c}' for c in close)}?" if close else \
            "see torchvision.models.list_models() for the classifiers it builds"
        raise ConfigError(f"torchvision has no classification model {name!r}: {hint}")
    import torchvision

    # Every torchvision classifier takes num_classes; weights=None builds it untrained, offline.
    return Factory(functools.partial(torchvision.models.get_model, name, weights=None), frozenset({"num_classes"}))


# Library sources by prefix; any other `module:function` is the user's own code.
SOURCES: dict[str, Callable[[str], Factory]] = {"torchvision": _torchvision}


def _working_folder_importable() -> None:
    """The working folder on the import path, where the user's module lives: `python -m` puts
    it there, the `prunelab` command does not. Last, so it shadows no installed package, and
    for good, so the factory's own later imports find their modules too."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def _user_function(target: str) -> Factory:
    module_name, _, function_name = target.rpartition(SEPARATOR)
    if not (module_name and all(p.isidentifier() for p in module_name.split(".")) and function_name.isidentifier()):
        raise ConfigError(f"model {target!r} is not a factory: write torchvision:NAME or PACKAGE.MODULE:FUNCTION "
                          "(a function in your own code that returns the network)")
    _working_folder_importable()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"model {target!r}: no module {module_name!r} in the working folder ({os.getcwd()}) or the "
                              "environment: run from the folder that holds it, or install it") from None
        raise ConfigError(f"model {target!r}: importing {module_name} failed: {first_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # whatever the user's module raises while it imports
        raise ConfigError(f"model {target!r}: importing {module_name} failed: {type(exc).__name__}: {first_line(exc)}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"model {target!r}: module {module_name} has no {function_name!r}")
    if not callable(function):
        raise ConfigError(f"model {target!r}: {module_name}.{function_name} is a {type(function).__name__}, "
                          "not a function that returns the network")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    return Factory(function, frozenset(p for p in OFFERED if p in parameters))


def resolve(name: str) -> Factory:
    """The factory a model setting names; one line when torchvision has no such classifier,
    or the user's module does not import or holds no such function."""
    prefix, _, rest = name.partition(SEPARATOR)
    source = SOURCES.get(prefix)
    return source(rest) if source is not None else _user_function(name)


def runs_user_code(name: str) -> bool:
    """Whether building `name` imports and runs the user's code (no import happens here)."""
    return name.partition(SEPARATOR)[0] not in SOURCES


# --------------------------------------------------------------------------- the network

class FactoryNetwork(nn.Module):
    """A factory's network as prunelab trains, prunes and saves it, with how it was made.

    Grey images (1 channel) meet a network made for colour (its first conv takes 3)
    by repeating the grey channel, here, rather than by narrowing that conv: the
    factory's network then stays exactly what the factory builds (its layer names,
    its state dict, RGB filters a user may load into it, code that reads the input's
    channels), so a checkpoint rebuilds it from the factory alone; the cost is the
    first conv's multiply-adds over three identical channels.
    """

    def __init__(self, network: nn.Module, factory: str, arguments: dict, input_shape: tuple[int, ...]):
        super().__init__()
        self.network = network
        self.factory, self.arguments, self.input_shape = factory, dict(arguments), tuple(input_shape)
        self.channels = _channels_taken(network, input_shape[0], arguments)

    def forward(self, x: torch.Tensor):
        if self.channels != self.input_shape[0]:
            x = x.expand(-1, self.channels, -1, -1)
        return self.network(x)

    def initialised_again(self) -> "FactoryNetwork":
        """A new network from the same factory call, initialised afresh by the factory's own
        initialiser (seeded by the caller), at the widths the factory builds."""
        return _make(self.factory, resolve(self.factory), self.arguments, self.input_shape)

    def spec(self) -> dict:
        """How to rebuild it at its current widths: the factory's arguments, the input shape,
        and every conv's output channels (plain ints, so a checkpoint unpickles nothing)."""
        return {"arguments": dict(self.arguments), "input_shape": list(self.input_shape),
                "widths": {n: m.out_channels for n, m in self.named_modules() if isinstance(m, nn.Conv2d)}}


def _channels_taken(network: nn.Module, channels: int, arguments: dict) -> int:
    """The input channels `network` takes: the data's, unless the data is grey, the factory
    was not told (no in_channels argument) and its first conv, the stem of every torchvision
    classifier, takes 3."""
    if channels != 1 or "in_channels" in arguments:
        return channels
    first = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
    return 3 if first is not None and first.in_channels == 3 else channels


def _call(factory: Factory, arguments: dict, name: str):
    try:
        return factory.call(**arguments)
    except (Exception, SystemExit) as exc:  # whatever the factory raises
        raise ModelError(f"model {name!r}: calling the factory with {arguments} failed: "
                         f"{type(exc).__name__}: {first_line(exc)[:160]}") from None


def _make(name: str, factory: Factory, arguments: dict, input_shape: tuple[int, ...]) -> FactoryNetwork:
    """The factory's network, refused in one line when it is not a module or would not fit
    in memory. The size is checked on the meta device first (nothing allocated) where the
    factory can build there."""
    try:
        with torch.device("meta"):
            shape_only = factory.call(**arguments)
    except (Exception, SystemExit):
        shape_only = None  # a factory meta tensors cannot build: it is sized as built, below
    if shape_only is None and torch.get_default_device().type == "meta":
        # Asked for a shape-only network (studies.common sizes images on the meta device) by a
        # factory that cannot build there (RegNet computes its widths with tensors): not a refusal.
        raise NotImplementedError(f"model {name!r} cannot be built on the meta device")
    if isinstance(shape_only, nn.Module):
        n = sum(p.numel() for p in shape_only.parameters())
        check_memory(n * TRAINING_BYTES_PER_PARAM, f"model {name!r} with {n:,} parameters", "choose a smaller network")
        _check_training_output(shape_only, arguments, input_shape, name)
    network = _call(factory, arguments, name)
    if not isinstance(network, nn.Module):
        raise ModelError(f"model {name!r}: the factory returned a {type(network).__name__}, not a torch.nn.Module")
    return FactoryNetwork(network, name, arguments, input_shape)


def _check_training_output(network: nn.Module, arguments: dict, input_shape: tuple[int, ...], name: str) -> None:
    """Refuse a network that returns more than class scores while it trains (GoogLeNet's and
    Inception's auxiliary heads), which the training loop cannot use. Run on the meta device:
    nothing computed, no BatchNorm statistics touched; a forward pass the meta device cannot
    run is left to the checks that follow."""
    channels = _channels_taken(network, input_shape[0], arguments)
    try:
        with torch.no_grad():
            out = network.train()(torch.empty(2, channels, *input_shape[1:], device="meta"))
    except Exception:
        return
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model {name!r} returns a {type(out).__name__} while training, not a tensor of class "
                         "scores: build it without auxiliary outputs (e.g. aux_logits=False) in a factory of your own")


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> FactoryNetwork:
    """A fresh network from the factory `name` for images of `input_shape` and `num_classes` classes."""
    factory = resolve(name)
    offered = {"num_classes": num_classes, "in_channels": input_shape[0]}
    return _make(name, factory, {k: v for k, v in offered.items() if k in factory.takes}, tuple(input_shape))


def rebuild(name: str, spec: dict, where: str, trusted: str | None = None) -> FactoryNetwork:
    """The unpruned network a checkpoint's (factory `name`, `spec`) was made from. The spec is
    checked first (plain ints where ints belong); a user's factory is imported only when the
    caller named it (`trusted`), never because a file says so."""
    arguments, shape, widths = spec.get("arguments"), spec.get("input_shape"), spec.get("widths")
    if not (isinstance(arguments, dict) and set(arguments) <= set(OFFERED)
            and all(_is_int(v, 1, MAX_CLASSES) for v in arguments.values())):
        raise ModelError(f"{where}: the {name} checkpoint's arguments must be {' and/or '.join(OFFERED)} "
                         f"(whole numbers), got {arguments!r:.120}")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and _is_int(shape[0], 1, 64)
            and all(_is_int(s, 1, MAX_IMAGE_SIZE) for s in shape[1:])):
        raise ModelError(f"{where}: the {name} checkpoint's input_shape must be [channels, height, width], got {shape!r:.80}")
    if not (isinstance(widths, dict) and all(isinstance(k, str) and _is_int(v, 1, 2**20) for k, v in widths.items())):
        raise ModelError(f"{where}: the {name} checkpoint's widths must map layer names to channel counts")
    if runs_user_code(name) and trusted != name:
        raise ModelError(f"{where} holds a network built by {name!r}, code of yours that loading it would import "
                         f"and run: name that factory (--model {name}; in a study, model={name}) if you trust it")
    return _make(name, resolve(name), arguments, tuple(shape))


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
