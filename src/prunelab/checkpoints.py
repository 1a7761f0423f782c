"""Weights files that carry their own architecture, and plain state-dict files.

A checkpoint is a plain dict of tensors and primitives (so it loads with
`torch.load(weights_only=True)`): the model's registry name, its `spec()` and
its state dict. A network from a factory (`models/factory.py`) is saved under
the factory's name, with its arguments, the input shape and every conv's width:
loading builds the factory's network afresh, thins it to those widths with
Torch-Pruning (`surgery.shrink_to`) and loads the state dict into it. A user's
factory is imported only when the caller names it (`trusted`). Foreign files
(a bare state dict, or {'state_dict': ...} with the `module.` prefix of
nn.DataParallel) load too when the architecture is named. Nothing here ever
unpickles code.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from prunelab import models
from prunelab.errors import ModelError, first_line
from prunelab.files import atomic_path, checked_path
from prunelab.models import factory
from prunelab.pruning import surgery

FORMAT = "prunelab-checkpoint-v1"


def save(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    # CPU tensors in the default layout: a checkpoint made on a GPU, or in a device's own
    # layout (channels-last on the CPU), reads the same everywhere.
    whole = model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in whole.items()}
    name = models.name_of(model)
    payload = {"format": FORMAT, "model": name, "spec": model.spec(), "state_dict": state}
    if factory.is_factory(name):
        # The version each module's state was saved at (plain ints): a foreign network may read
        # it while loading (torchvision's MNASNet refuses a state dict without it).
        payload["versions"] = {k: v["version"] for k, v in getattr(whole, "_metadata", {}).items()
                               if isinstance(v.get("version"), int)}
    # Never a half-written checkpoint under the real name. Through a Python file: a full
    # disk is then an OSError that says so (ENOSPC), not torch's own RuntimeError.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


def read(path: str | Path, hint: str = "save a state dict with torch.save(model.state_dict(), path)"):
    """The payload of a weights file, loaded with weights_only=True (no code runs)."""
    path = checked_path(path, "weights file")
    if not path.is_file():
        raise ModelError(f"no weights file at {path}: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path} is not a plain weights file (it would unpickle code or is not a checkpoint: "
            f"{str(exc).splitlines()[0][:120]}); {hint}") from None
    except Exception as exc:
        raise ModelError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); check the file") from None


def state_dict_of(payload, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a payload (bare, or under 'state_dict'), without any `module.` prefix."""
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict: expected a dict of tensors or {{'state_dict': ...}}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load(path: str | Path, model_name: str | None = None, trusted: str | None = None) -> nn.Module:
    """The network in a weights file. `model_name` names its architecture (needed for a bare
    state dict; a checkpoint of another one is refused); `trusted` (or `model_name`) is the
    user's factory the caller names, the only one a checkpoint may make prunelab import."""
    payload = read(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        name, spec = payload.get("model"), payload.get("spec")
        if not isinstance(name, str) or not isinstance(spec, dict) or "state_dict" not in payload:
            raise ModelError(f"{path} is a damaged prunelab checkpoint: it needs 'model' (a name), 'spec' (a dict) "
                             f"and 'state_dict', and holds {', '.join(map(repr, sorted(payload, key=str)))}; save it again")
        if model_name and model_name != name:
            raise ModelError(f"{path} holds a {name} checkpoint, not {model_name}: pass --model {name}")
        if factory.is_factory(name):
            return _load_state(_pruned_factory_network(name, spec, path, trusted or model_name),
                               _with_versions(state_dict_of(payload, path), payload.get("versions")), path, name)
        if name not in models.MODELS:
            raise ModelError(f"{path} holds an unknown model {name!r}: known ones are {', '.join(sorted(models.MODELS))}")
        model = models.from_spec(name, spec, str(path))
        return _load_state(model, state_dict_of(payload, path), path, name)
    if not model_name:
        raise ModelError(f"{path} does not say which architecture it holds: pass --model NAME ({', '.join(sorted(models.MODELS))})")
    state = state_dict_of(payload, path)
    if factory.is_factory(model_name):
        raise ModelError(f"{path} is a bare state dict, which does not say the input shape or widths of the "
                         f"{model_name} network it holds: pass it as model_weights={path} (a fresh network starts "
                         "from it), or a prunelab checkpoint or run of that network")
    cls = models.model_class(model_name)
    try:
        spec = cls.spec_from_state_dict(state)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise ModelError(f"{path} is not a {model_name} state dict ({type(exc).__name__}: {str(exc)[:80]}): "
                         "pass the --model it was saved from") from None
    return _load_state(models.from_spec(model_name, spec, str(path)), state, path, model_name)


def _pruned_factory_network(name: str, spec: dict, path: str | Path, trusted: str | None) -> nn.Module:
    """The factory's network afresh, thinned to the checkpoint's widths."""
    network = factory.rebuild(name, spec, str(path), trusted)
    try:
        surgery.shrink_to(network, spec["widths"], torch.zeros(1, *network.input_shape))
    except ModelError as exc:
        raise ModelError(f"{path} does not fit {name}: {exc}") from None
    return network


def _with_versions(state: dict, versions) -> dict:
    """`state` carrying the modules' state versions a checkpoint recorded (ignored unless plain)."""
    ordered = OrderedDict(state)
    if isinstance(versions, dict) and all(isinstance(k, str) and type(v) is int for k, v in versions.items()):
        ordered._metadata = OrderedDict((k, {"version": v}) for k, v in versions.items())
    return ordered


def _load_state(model: nn.Module, state: dict, path: str | Path, name: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ModelError(f"{path} does not fit {name}: {first}") from None
    return model.eval()


# --------------------------------------------------------------------------- pretrained weights

DEFAULT_WEIGHTS = "DEFAULT"


def pretrained_state(source: str, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict `model_weights` names: a weights file (read weights-only), or `DEFAULT`,
    torchvision's own weights for a `torchvision:NAME` network, downloaded as torchvision
    downloads them (into its cache). Offline, `DEFAULT` is one line naming the file to fetch
    and pass instead."""
    if source != DEFAULT_WEIGHTS:
        return state_dict_of(read(source, "pass the network's own weights file (a state dict)"), source)
    if not model_name.startswith("torchvision:"):
        raise ModelError(f"model_weights=DEFAULT names torchvision's weights, which {model_name!r} has none of: "
                         "pass a weights file (model_weights=PATH)")
    import torchvision

    name = model_name.partition(":")[2]
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"torchvision publishes no weights for {name!r}: pass a weights file (model_weights=PATH)") from None
    try:
        # torch.hub announces the download on stderr; a failed one would be a second line there.
        with contextlib.redirect_stderr(io.StringIO()):
            return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, refused, or a damaged download
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ModelError(f"could not download torchvision's {name} weights ({first_line(exc)[:80]}): fetch {weights.url} "
                         f"where you are online, then pass model_weights=PATH (or put it at {cached})") from None


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load a pretrained state dict into `model` (into the factory's own network for one from a
    factory, whose keys a torchvision weights file has). Every tensor must be there with its
    shape, except the output layer's where the data has another number of classes than the
    weights were trained for (that layer keeps its fresh weights: a new head, as in transfer
    learning). Anything else is a file of another network: one line. Returns the tensors loaded."""
    target = model.network if isinstance(model, factory.FactoryNetwork) else model
    own = target.state_dict()
    linears = [n for n, m in target.named_modules() if isinstance(m, nn.Linear)]
    head = {f"{linears[-1]}.{p}" for p in ("weight", "bias")} if linears else set()
    # BatchNorm fills in a counter older files lack (torchvision's ResNet weights have none).
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    misfits = [k for k in own if k in state and state[k].shape != own[k].shape and k not in head]
    foreign = [k for k in state if k not in own]
    if missing or misfits or foreign:
        what = (f"lacks {missing[0]!r}" if missing else f"has {misfits[0]!r} of shape {list(state[misfits[0]].shape)}, "
                f"the network {list(own[misfits[0]].shape)}" if misfits else f"has {foreign[0]!r}, which the network lacks")
        raise ModelError(f"{source} holds the weights of another network ({what}; {len(missing) + len(misfits)} of "
                         f"{len(own)} tensors do not fit {models.name_of(model)}): pass that network's own weights")
    fitting = {k: v for k, v in state.items() if v.shape == own[k].shape}
    target.load_state_dict(fitting, strict=False)
    return len(fitting)
