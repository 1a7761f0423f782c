"""Loading a model back, with nothing unpickled: a weights file, a run's weights-only
checkpoint, a weights-only logged model, or an MLflow PyTorch model in the pt2 format,
checked from its files before anything of it is read (`check_pt2`, which serving shares).
Which run made a model (`source_run`) is answered here too."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prunelab import checkpoints, files, paths
from prunelab.errors import ModelError, PrunelabError, first_line, one_line, shown
from prunelab.tracking.connection import client, forbid_pickle, is_mlflow_error, outage, server_gone, tracking_uri
from prunelab.tracking.models import PT2_DATA, PT2_FILE, TAG_WEIGHTS_ONLY
from prunelab.tracking.query import download, get_run, is_run_id


def load_model(ref: str, model_name: str | None = None):
    """The nn.Module behind a weights file, a run id or a model URI, on the CPU; nothing is unpickled.

    A run id, and a URI of a run's final model (`runs:/<run>/model`, or the
    `models:/m-...` its `prunelab.model_uri` tag names), give the run's
    weights-only checkpoint. Any other URI must be an MLflow PyTorch model in
    the traced pt2 format: its MLmodel and file list are read first, and a
    pickle-format model is refused before a byte of it is loaded. A checkpoint of
    a network from the user's own factory loads only when `model_name` names
    that factory: loading imports it."""
    path = weights_file(ref)
    if path is not None:
        return checkpoints.load(path, model_name)
    if not ref.startswith(("runs:/", "models:/")):
        if is_run_id(ref):
            return _load_run_checkpoint(ref, model_name)
        raise ModelError(f"{shown(ref)} is neither a weights file, a run id nor a model URI (runs:/... or models:/...)")
    forbid_pickle()
    run_id = _final_model_run(ref)
    if run_id:
        return _load_run_checkpoint(run_id, model_name)
    weights = _weights_only_model(ref)
    if weights:
        with tempfile.TemporaryDirectory() as tmp:
            import mlflow.artifacts

            return checkpoints.load(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{weights.rstrip('/')}/{paths.CHECKPOINT}", dst_path=tmp), model_name)
    return _load_pt2(ref)


def _weights_only_model(ref: str) -> str | None:
    """The artifact location of the logged model `ref` names when it holds only a checkpoint."""
    model_id = ref.removeprefix("models:/").strip("/")
    if not ref.startswith("models:/") or not model_id.startswith("m-") or "/" in model_id:
        return None
    try:
        logged = client().get_logged_model(model_id)
    except Exception as exc:
        if not is_mlflow_error(exc) or server_gone(exc):
            raise
        return None
    return logged.artifact_location if logged.tags.get(TAG_WEIGHTS_ONLY) == "true" else None


def weights_file(ref: str) -> Path | None:
    """The weights file a model reference names (a checkpoint's suffix, or an existing
    file), checked to be a path; None for a run id or a model URI."""
    if not ref.strip():
        raise ModelError("the model reference is empty: pass a weights file, a run id or a model URI")
    if ref.startswith(("runs:/", "models:/")):
        return None
    path = files.checked_path(ref, "model")  # a name no file system takes is one line, not an OSError
    return path if path.suffix in (".pt", ".pth", ".th", ".tar") or path.is_file() else None


def source_run(ref: str) -> str | None:
    """The run that made the model `ref` names (a run id, `runs:/<run>/...`, a logged model
    `models:/m-...`, or a registered `models:/<name>/<version>` or `models:/<name>@<alias>`);
    None for a weights file, or a model no run made."""
    if is_run_id(ref):
        return ref
    if ref.startswith("runs:/"):
        run_id = ref.removeprefix("runs:/").partition("/")[0]
        return run_id if is_run_id(run_id) else None
    if not ref.startswith("models:/"):
        return None
    name = ref.removeprefix("models:/").strip("/")
    c = client()
    try:
        if name.startswith("m-") and "/" not in name:
            return c.get_logged_model(name).source_run_id or None
        registered, _, version = name.partition("/")
        if "@" in registered:
            registered, _, alias = registered.partition("@")
            return c.get_model_version_by_alias(registered, alias).run_id or None
        if not version:
            return None
        return c.get_model_version(registered, version).run_id or None
    except Exception as exc:
        if not is_mlflow_error(exc) or server_gone(exc):
            raise
        return None  # unknown: loading it says so in one line


def normalisation(ref: str) -> tuple[list[float], list[float]] | None:
    """The per-channel mean and std the network behind `ref` takes its images standardised with:
    its data set's, as the final model of the run that made it records them (the metadata of
    its MLmodel, read as plain YAML); None when no run made it."""
    from mlflow.models import Model

    run_id = source_run(ref)
    uri = get_run(run_id).data.tags.get(paths.TAG_MODEL_URI) if run_id else None
    if not uri:
        return None
    try:
        metadata = Model.load(uri).metadata or {}
    except Exception as exc:
        if is_mlflow_error(exc) or isinstance(exc, OSError):
            raise _model_error(uri, exc) from None
        raise
    mean, std = metadata.get("mean"), metadata.get("std")
    numbers = all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) for v in (mean, std))
    if not numbers or len(mean) != len(std) or min(std) <= 0:
        raise ModelError(f"{uri} records no usable normalisation (mean {shown(mean)}, std {shown(std)}): it was not "
                         "logged by a prunelab stage; load it with mlflow.pytorch.load_model")
    return [float(x) for x in mean], [float(x) for x in std]


def _final_model_run(ref: str) -> str | None:
    """The run whose final model `ref` is, when it has a weights-only checkpoint of it."""
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        if is_run_id(run_id) and path.strip("/") == paths.MODEL:
            return run_id if paths.TAG_MODEL_URI in get_run(run_id).data.tags else None
        return None
    model_id = ref.removeprefix("models:/").strip("/")
    if not model_id.startswith("m-") or "/" in model_id:
        return None  # a registered model name/version: not one of a run's final models
    try:
        source = client().get_logged_model(model_id).source_run_id
    except Exception as exc:
        if not is_mlflow_error(exc) or server_gone(exc):
            raise
        return None  # unknown: _load_pt2 says so in one line
    if source and get_run(source).data.tags.get(paths.TAG_MODEL_URI) == ref:
        return source
    return None


def _model_error(ref: str, exc: Exception) -> PrunelabError:
    return outage(exc) or ModelError(f"cannot load model {ref} from {tracking_uri()}: {first_line(exc)[:160]}")


def _pt2_problem(flavour: Any, data: Any, names: set[str]) -> str | None:
    """Why a model whose MLmodel has the pytorch flavour `flavour`, and whose data folder
    `data` holds `names`, is not a pt2 model as MLflow writes one; None when it is.

    MLflow's MLmodel does not say which format a PyTorch model was saved in (its
    flavour is {code, model_data, pytorch_version} either way); its loader decides
    by the files: a `model.pth` means pickle, and it then imports the module that
    `pickle_module_info.txt` names before anything refuses the pickle. So the data
    folder must hold `model.pt2` and nothing else, and the flavour must carry no
    code and name MLflow's own data folder."""
    if not isinstance(flavour, dict):
        return "it is not a PyTorch MLflow model"
    if flavour.get("code"):
        return f"it carries code ({shown(flavour['code'])}) that loading it would import"
    if data != PT2_DATA:
        return f"its model data is in {shown(data)}, not the {PT2_DATA}/ folder MLflow writes"
    if names != {PT2_FILE}:
        found = ", ".join(sorted(names)) or "nothing"
        return f"it is a pickle-format MLflow model, or not one MLflow wrote ({PT2_DATA}/ holds {one_line(found, 160)})"
    return None


def _pt2_refused(ref: str, problem: str) -> ModelError:
    return ModelError(f"{ref} is refused: {problem}, and unpickling or importing what it carries could run any code: "
                      "prunelab loads only pt2 models (a data folder of model.pt2 alone) and weights-only checkpoints "
                      "(log it with serialization_format='pt2', or pass a checkpoint file)")


def check_pt2(ref: str):
    """The MLmodel of `ref`, checked on the server to be an MLflow PyTorch model in the pt2
    format as MLflow writes one (see `_pt2_problem`); a one-line ModelError otherwise. Reads
    the MLmodel and the file list only: a pickle model is refused before its files are
    downloaded."""
    import mlflow.artifacts
    from mlflow.models import Model

    try:
        meta = Model.load(ref)  # the MLmodel file alone, read as plain YAML
        flavour = meta.flavors.get("pytorch")
        data = flavour.get("model_data") if isinstance(flavour, dict) else None
        names: set[str] = set()
        if isinstance(data, str) and data == PT2_DATA:
            names = {Path(f.path).name + ("/" if f.is_dir else "")
                     for f in mlflow.artifacts.list_artifacts(artifact_uri=f"{artifact_base(ref)}/{data}")}
    except Exception as exc:
        if is_mlflow_error(exc) or isinstance(exc, OSError):
            raise _model_error(ref, exc) from None
        raise
    if not isinstance(flavour, dict):
        raise ModelError(f"{ref} is not a PyTorch MLflow model (its flavours: {', '.join(meta.flavors) or 'none'}): "
                         "pass a train, prune or finetune run, its model URI or a weights file")
    problem = _pt2_problem(flavour, data, names)
    if problem:
        raise _pt2_refused(ref, problem)
    return meta


def artifact_base(ref: str) -> str:
    """Where the files of the model `ref` are (a registered name or alias resolved), to add paths to."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    return (ModelsArtifactRepository.get_underlying_uri(ref) if ref.startswith("models:/") else ref).rstrip("/")


def _load_pt2(ref: str):
    """An MLflow PyTorch model in the pt2 format, checked before anything of it is loaded:
    its MLmodel and file list on the server (`check_pt2`), then the very files downloaded
    (what MLflow loads is what was checked)."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    check_pt2(ref)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp))
            # What was listed may have changed since: check the copy MLflow will read.
            copied = Model.load(str(local)).flavors.get("pytorch")
            folder = local / PT2_DATA
            names = {p.name + ("/" if p.is_dir() or p.is_symlink() else "") for p in folder.iterdir()} \
                if folder.is_dir() and not folder.is_symlink() else set()
        except Exception as exc:
            if is_mlflow_error(exc) or isinstance(exc, OSError):
                raise _model_error(ref, exc) from None
            raise
        problem = _pt2_problem(copied, copied.get("model_data") if isinstance(copied, dict) else None, names)
        if problem:
            raise _pt2_refused(ref, problem)
        try:
            # MLflow checks the archive holds no pickled record before it loads (forbid_pickle).
            return mlflow.pytorch.load_model(str(local), map_location="cpu")  # traced, fixed in eval mode
        except Exception as exc:
            if is_mlflow_error(exc) or isinstance(exc, OSError):
                raise _model_error(ref, exc) from None
            raise


def _load_run_checkpoint(run_id: str, trusted: str | None = None):
    """The run's weights-only checkpoint; `trusted`: the user's factory the caller named, which
    a checkpoint of a network from that factory may import (the run's own files never decide)."""
    run_ = get_run(run_id)
    if paths.TAG_MODEL_URI not in run_.data.tags:
        raise ModelError(f"run {run_id} logged no final model (stage {run_.data.tags.get(paths.TAG_STAGE, '?')}, "
                         f"status {run_.info.status}): pass a finished train, prune or finetune run")
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoints.load(download(run_id, paths.CHECKPOINT, tmp), trusted=trusted)
