"""Weights files that carry their own architecture.

A checkpoint is a plain dict of tensors and primitives (so it loads with
`torch.load(weights_only=True)`): the model's registry name, its `spec()` and
its state dict. Foreign files (a bare state dict, or {'state_dict': ...} with
the `module.` prefix of nn.DataParallel) load too when the architecture is
named.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

from prunelab import models
from prunelab.errors import ModelError

FORMAT = "prunelab-checkpoint-v1"


def save(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "model": models.name_of(model), "spec": model.spec(), "state_dict": model.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


def load(path: str | Path, model_name: str | None = None) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no weights file at {path}: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path} is not a plain weights file (it would unpickle code or is not a checkpoint: {str(exc).splitlines()[0][:120]}); "
            "save a state dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise ModelError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); check the file") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        name = payload["model"]
        if model_name and model_name != name:
            raise ModelError(f"{path} holds a {name} checkpoint, not {model_name}: pass --model {name}")
        model = models.get(name, **payload["spec"])
        return _load_state(model, payload["state_dict"], path, name)
    if not model_name:
        raise ModelError(f"{path} does not say which architecture it holds: pass --model NAME ({', '.join(sorted(models.MODELS))})")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict: expected a dict of tensors or {{'state_dict': ...}}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cls = models.MODELS.get(model_name)
    if cls is None:
        models.get(model_name)  # raises the listing error
    spec = cls.spec_from_state_dict(state) if hasattr(cls, "spec_from_state_dict") else {}
    return _load_state(models.get(model_name, **spec), state, path, model_name)


def _load_state(model: nn.Module, state: dict, path: Path, name: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ModelError(f"{path} does not fit {name}: {first}") from None
    return model.eval()
