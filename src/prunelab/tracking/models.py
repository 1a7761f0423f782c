"""Models in MLflow: logging one (pt2, ONNX, weights-only checkpoint, its metrics), which
logged model a reference names and its numbers, and the registry. Loading one back is
`tracking.loading`'s."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab import checkpoints, export, paths
from prunelab.errors import ModelError, TrackingError
from prunelab.tracking.connection import client, is_mlflow_error, server_gone, \
    tracking_uri
from prunelab.tracking.query import experiment_of, get_run, is_run_id

# Pinned so a logged model reinstalls the version that trained it; listing it also spares
# MLflow from inferring requirements (slow) at every log_model. Only what loading and
# serving the model imports: the traced network needs torch alone (MLflow adds itself,
# and brings numpy and pandas, which the pyfunc flavour uses).
MODEL_REQUIREMENTS = ["torch==2.14.1"]
PT2_FILE = "model.pt2"  # what mlflow.pytorch writes for serialization_format='pt2', alone in its data folder
PT2_DATA = "data"       # that folder (the flavour's model_data); pickle models write model.pth and
                        # pickle_module_info.txt there instead
PYFUNC_CODE = "code"  # the model's folder holding its pyfunc loader module (pixel_classifier.py)
TAG_WEIGHTS_ONLY = "prunelab.weights_only"  # a logged model holding only checkpoint.pt (no pt2)


@dataclass(frozen=True)
class LoggedModel:
    model_id: str
    uri: str


# --------------------------------------------------------------------------- logging

class SentMetrics:
    """The metrics a run handle sent, by step, and the newest value of each key: what a model
    logged at a step is linked to, known without reading the run's history back."""

    def __init__(self):
        self._at: dict[int, list] = {}
        self._newest: dict = {}

    def add(self, metrics: list) -> None:
        for m in metrics:
            if m.model_id is None:
                self._at.setdefault(m.step, []).append(m)
            newest = self._newest.get(m.key)
            if newest is None or (m.step, m.timestamp) >= (newest.step, newest.timestamp):
                self._newest[m.key] = m

    def at(self, step: int) -> list | None:
        return self._at.get(step)

    def newest(self, key: str):
        return self._newest.get(key)


def log_model(run_id: str, model, name: str, example, step: int, final: bool = False, checkpoint=None,
              metadata: dict | None = None, carry: tuple[str, ...] = (), sent: SentMetrics | None = None,
              params: dict[str, str] | None = None, weights_only: bool = False) -> LoggedModel:
    """Log `model` (a CPU module taking batches like `example`, float32) as an MLflow
    model of run `run_id` at `step`, in the traced 'pt2' format, which reloads without
    any of prunelab's code and unpickles nothing; the run's metrics at `step` are linked
    to it. A final model is also exported to ONNX (an artifact of the same model,
    `onnx/model.onnx`) and the run's tag names it; `checkpoint`, the bare network, goes
    out as the weights-only checkpoint the next stage reads. `carry` names metrics logged
    at earlier steps that still describe this model: their newest values are linked to
    it too. `sent` (what this run's handle sent) and `params` (the run's params), when
    given, spare reading them back from the server.

    The steps of `mlflow.pytorch.log_model`, without two of them: it reloads the pt2 file
    to run it on the input example (serving-input validation) and reads the whole history
    of every metric of the run, a request per key, to find those at `step`; together about
    half of what a model took. The model is created, named as the run's output at `step`,
    given its metrics, written by `mlflow.pytorch.save_model` (the same files) and
    uploaded, then marked READY (FAILED if any of it fails).

    The pyfunc flavour (`mlflow.pyfunc`, `mlflow models serve`) is `pixel_classifier`, shipped
    in the model: it refuses pixels outside `metadata['pixel_range']` with a 400 and names the
    outputs by `metadata['classes']`, which the signature's outputs name too.

    `weights_only` (a model of a step in between, never a final one): the model holds only
    the weights-only checkpoint of the bare network (`checkpoint.pt`, no pt2 export; tagged
    `prunelab.weights_only`): `load_model` reads it, `mlflow.pytorch.load_model` cannot."""
    import mlflow
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    c = client()
    weights_only = weights_only and not final
    was_training = model.training
    model.eval()  # exported as it predicts (a traced pt2 module cannot switch modes later)
    try:
        outputs = None if weights_only else _outputs(model, example)
        classes = None if weights_only else _class_names(metadata, outputs)
        signature = None if weights_only else _signature(example, outputs, classes)
        logged = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, experiment_id=experiment_of(run_id),
            tags={TAG_WEIGHTS_ONLY: "true"} if weights_only else None,
            params=params if params is not None else c.get_run(run_id).data.params)  # as MLflow: the run's params
        try:
            c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
            links = _links(c, run_id, logged.model_id, step, carry, sent)
            if links:
                c.log_batch(run_id, metrics=links)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                if weights_only:
                    local.mkdir()
                    checkpoints.save(checkpoint if checkpoint is not None else getattr(model, "network", model),
                                     local / paths.CHECKPOINT)
                else:
                    mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                         run_id=run_id, metadata=metadata, model_id=logged.model_id)
                    mlflow.pytorch.save_model(
                        model, str(local), serialization_format="pt2", signature=signature,
                        input_example=example.numpy(), pip_requirements=MODEL_REQUIREMENTS, metadata=metadata,
                        mlflow_model=mlflow_model)
                    _pyfunc_checks_pixels(mlflow_model, local, classes, (metadata or {}).get("pixel_range"))
                # The model's own artifact store (what `log_model_artifacts` looks up with one more request).
                store = get_artifact_repository(logged.artifact_location, tracking_uri=tracking_uri())
                store.log_artifacts(str(local))
                if final:
                    store.log_artifact(str(export.to_onnx(model, example, Path(tmp) / export.ONNX_FILE)), paths.ONNX_DIR)
                    if checkpoint is not None:
                        c.log_artifact(run_id, str(checkpoints.save(checkpoint, Path(tmp) / paths.CHECKPOINT)))
            c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException as exc:
            # As MLflow's log_model does; not when the server is gone (its retries would cost the
            # outage's patience a second time: the run is spooled and `sync` logs the model again).
            if not (isinstance(exc, Exception) and server_gone(exc)):
                with contextlib.suppress(Exception):
                    c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        uri = f"models:/{logged.model_id}"
        if final:
            c.set_tag(run_id, paths.TAG_MODEL_URI, uri)
    finally:
        model.train(was_training)
    return LoggedModel(logged.model_id, uri)


def _outputs(model, example) -> tuple[int, ...]:
    import torch

    with torch.no_grad():
        return tuple(model(example).shape[1:])


def _class_names(metadata: dict | None, outputs: tuple[int, ...]) -> list[str] | None:
    """The class names the pyfunc flavour names its outputs by: the metadata's, when they are
    as many as the network's outputs (`outputs`: an output's shape, batch left out), each
    once; else None (the bare array)."""
    classes = [str(c) for c in (metadata or {}).get("classes") or []]
    if classes and len(set(classes)) == len(classes) and outputs == (len(classes),):
        return classes
    return None


def _signature(example, outputs: tuple[int, ...], classes: list[str] | None = None):
    """Input: one unnamed tensor spec (a named one makes pyfunc pass a dict); -1: any batch
    size. The example holds two images: torch.export fixes a batch dimension of 1. Output:
    what the pyfunc flavour returns, a float32 column per class name (else the bare tensor)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))])
    if classes:
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("float", name) for name in classes]))
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *outputs))]))


def _pyfunc_checks_pixels(mlflow_model, local: Path, classes: list[str] | None, pixel_range) -> None:
    """Make the saved model's pyfunc flavour `pixel_classifier` (its module copied into the
    model's `code/`, nothing pickled): pixels outside `pixel_range` are refused, outputs named
    by `classes`. The pytorch flavour stays as MLflow wrote it (no code), so
    `mlflow.pytorch.load_model` and prunelab's `load_model` read the same pt2 file as before."""
    import shutil

    from mlflow.pyfunc import FLAVOR_NAME

    from prunelab.tracking import pixel_classifier

    source = Path(pixel_classifier.__file__)
    (local / PYFUNC_CODE).mkdir()
    shutil.copyfile(source, local / PYFUNC_CODE / source.name)
    flavour = mlflow_model.flavors[FLAVOR_NAME]
    flavour.pop("pickle_module_name", None)  # mlflow.pytorch's loader's; this one reads only the pt2 file
    config = dict(flavour.get("config") or {})
    if classes:
        config[pixel_classifier.CLASSES] = list(classes)
    if pixel_range is not None:
        config[pixel_classifier.PIXEL_RANGE] = [float(v) for v in pixel_range]
    flavour.update(loader_module=source.stem, code=PYFUNC_CODE, config=config)
    mlflow_model.save(str(local / "MLmodel"))


def _links(c, run_id: str, model_id: str, step: int, carry: tuple[str, ...], sent: SentMetrics | None) -> list:
    """The metrics that name the model: each one logged at `step` that names no model yet (the
    ones MLflow's log_model links), and the newest value of each `carry` key. The same metric
    entity (key, value, step, timestamp) again, now naming the model: the run's history keeps
    one entry, the model gains the metric. Read from the server only where `sent` does not know."""
    from mlflow.entities import Metric

    at = sent.at(step) if sent is not None else None
    if at is None:
        at = [m for key in c.get_run(run_id).data.metrics for m in c.get_metric_history(run_id, key)
              if m.step == step and m.model_id is None]
    chosen = {(m.key, m.timestamp, m.step, m.value): m for m in at}
    for key in carry:
        m = sent.newest(key) if sent is not None else None
        if m is None:
            history = c.get_metric_history(run_id, key)
            m = max(history, key=lambda m: (m.step, m.timestamp)) if history else None
        if m is not None:
            chosen.setdefault((m.key, m.timestamp, m.step, m.value), m)
    return [Metric(key, value, ts, s, model_id=model_id) for (key, ts, s, value) in chosen]


# --------------------------------------------------------------------------- which model, and its numbers

def logged_model_id(ref: str) -> str | None:
    """The id of the logged model `ref` names: a run's final model (run id), `models:/<id>`,
    or a registered `models:/<name>@<alias>` / `models:/<name>/<version>`; None for a file."""
    if is_run_id(ref):
        uri = get_run(ref).data.tags.get(paths.TAG_MODEL_URI, "")
        return uri.removeprefix("models:/") or None
    if not ref.startswith("models:/"):
        return None
    name = ref.removeprefix("models:/")
    if name.startswith("m-") and "/" not in name and "@" not in name:
        return name
    c = client()
    try:
        if "@" in name:
            version = c.get_model_version_by_alias(*name.split("@", 1))
        else:
            version = c.get_model_version(*name.rsplit("/", 1))
    except Exception as exc:
        if is_mlflow_error(exc) or isinstance(exc, TypeError):
            return None
        raise
    # The server does not return the version's model_id; its source names the model.
    return version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None


def logged_model_metrics(model_id: str) -> dict[str, float]:
    """The metrics linked to a logged model (the newest value of each)."""
    metrics = sorted(client().get_logged_model(model_id).metrics or [], key=lambda m: (m.step, m.timestamp))
    return {m.key: m.value for m in metrics}


# --------------------------------------------------------------------------- the registry

def register(name: str, run_id: str, tags: dict[str, Any]) -> str:
    """The final model of `run_id` as a version of the registered model `name` (created
    when missing), with `tags`; a model registered before is not registered twice.
    Returns the version."""
    model_id = logged_model_id(run_id)
    if model_id is None:
        raise ModelError(f"run {run_id} logged no final model to register")
    source = f"models:/{model_id}"
    c = client()
    try:
        try:
            c.get_registered_model(name)
        except Exception as exc:
            if not is_mlflow_error(exc):
                raise
            c.create_registered_model(name, description=f"The final pruned models of study {name}, one version per trial.")
        found = [v for v in c.search_model_versions(f"name = '{_quote(name)}'") if v.source == source]
        version = found[0] if found else c.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
        for key, value in tags.items():
            c.set_model_version_tag(name, version.version, key, str(value))
    except Exception as exc:
        if is_mlflow_error(exc):
            raise TrackingError(f"cannot register run {run_id}'s model as {name!r}: {str(exc).splitlines()[0][:160]}") from None
        raise
    return str(version.version)


def set_alias(name: str, alias: str, version: str, chosen_on: str | None = None) -> None:
    """Point `alias` at `version`; `chosen_on` (the metric that chose it) becomes the
    registered model's tag `<alias>_chosen_on`, shown on its page in the UI."""
    c = client()
    c.set_registered_model_alias(name, alias, version)
    if chosen_on is not None:
        c.set_registered_model_tag(name, f"{alias}_chosen_on", chosen_on)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
