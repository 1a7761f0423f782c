"""The only module that imports mlflow: connect, log, load models, find runs,
register models, and run or reuse the steps of a study.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value). A model is
logged at a step, after the buffer is flushed, so MLflow copies that step's
metrics onto it; metrics logged later at the same step name it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prunelab import checkpoints, export, paths
from prunelab.errors import ConfigError, ModelError, PrunelabError, TrackingError
from prunelab.server import healthy

DEFAULT_URI = "http://127.0.0.1:5000"
# Pinned so a logged model reinstalls the versions that trained it; listing them
# also spares MLflow from inferring requirements (slow) at every log_model.
MODEL_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]
# The experiment's kind as the MLflow UI names it: model training, not GenAI. (Which view
# a browser opens an experiment on is that browser's choice: see `runs_url`.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # a run's description in the UI (markdown)
DATASET_CONTEXT = "mlflow.data.context"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None = None, timeout: float = 5.0) -> str:
    """Point MLflow at `uri` and make sure a server answers there (fails within `timeout` s)."""
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        if not healthy(uri, timeout):
            raise TrackingError(f"no MLflow tracking server answers at {uri}: start one with `make server` "
                                "or point MLFLOW_TRACKING_URI at a running one")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow.run) inherit it
    mlflow.set_tracking_uri(uri)
    return uri


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def param_text(value: Any) -> str | None:
    """A param's value as logged; None for an empty one, which is not logged (the UI
    would show a blank '' column): an unset setting is simply absent."""
    text = str(value)
    return text if text else None


class Run:
    """A thin handle on the active run: buffered metrics, params once, artifacts, models."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._buffer: list = []
        self._client = client()
        self._model_at: dict[int, str] = {}  # step -> id of the model logged at that step

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged the MLproject params; MLflow refuses a
        # param logged twice with another value, so existing keys are skipped.
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        todo = [Param(k, text) for k, v in params.items() if k not in existing and (text := param_text(v)) is not None]
        for i in range(0, len(todo), 100):
            self._client.log_batch(self.run_id, params=todo[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True, model_linked: bool = True) -> None:
        """Buffer metrics at `step`; at a step where a model was logged they name that model
        (unless `model_linked` is False: values that describe another state of the network)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        model_id = self._model_at.get(step) if model_linked else None
        self._buffer += [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
        if flush or len(self._buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, value: dict | list, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, value, artifact_file)

    def log_figure(self, figure, artifact_file: str, dpi: int = 120) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": dpi})

    def log_table(self, table, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (JSON), which the UI shows as a table."""
        self._client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_inputs(self, splits=(), model_refs=()) -> None:
        """Lineage: the image sets the run reads (`data.base.Split`s) and the logged models it
        starts from (each run id or model URI that names one; others are skipped)."""
        from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

        datasets = [DatasetInput(_dataset(s), [InputTag(DATASET_CONTEXT, s.context)]) for s in splits]
        model_ids = list(dict.fromkeys(m for ref in model_refs if (m := logged_model_id(ref))))
        if datasets or model_ids:
            self._client.log_inputs(self.run_id, datasets=datasets or None,
                                    models=[LoggedModelInput(m) for m in model_ids] or None)

    def log_model(self, model, name: str, example, step: int, final: bool = False, checkpoint=None,
                  metadata: dict | None = None, carry: tuple[str, ...] = ()) -> str:
        """Log `model` (a module taking batches like `example`, float32) as an MLflow model
        at `step`, in the traced 'pt2' format, which reloads without any of prunelab's
        code and unpickles nothing. Metrics are flushed first: MLflow copies the run's
        metrics at `step` onto the model. A final model is also exported to ONNX (an
        artifact of the same model, `onnx/model.onnx`) and the run's tag names it;
        `checkpoint`, the bare network, goes out as the weights-only checkpoint the
        next stage reads. `carry` names metrics logged at earlier steps that still
        describe this model (a size that training did not change): their newest
        values are linked to it too. Returns the model URI."""
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        self.flush()
        if example.device.type != "cpu":  # exported from a CPU copy: a model trained on a GPU loads anywhere
            model, example = copy.deepcopy(model).cpu(), example.cpu()
        was_training = model.training
        model.eval()  # exported as it predicts (a traced pt2 module cannot switch modes later)
        try:
            with torch.no_grad():
                out = model(example)
            # Unnamed specs (a named one makes pyfunc pass a dict); -1: any batch size.
            # The example holds two images: torch.export fixes a batch dimension of 1.
            signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                                       outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
            info = mlflow.pytorch.log_model(model, name=name, step=step, signature=signature,
                                            input_example=example.numpy(), serialization_format="pt2",
                                            pip_requirements=MODEL_REQUIREMENTS, metadata=metadata)
            self._model_at[step] = info.model_id
            self._link_newest(info.model_id, carry)
            if final:
                with tempfile.TemporaryDirectory() as tmp:
                    onnx_file = export.to_onnx(model, example, Path(tmp) / export.ONNX_FILE)
                    self._client.log_model_artifact(info.model_id, str(onnx_file), paths.ONNX_DIR)
                    if checkpoint is not None:
                        self.log_file(checkpoints.save(checkpoint, Path(tmp) / paths.CHECKPOINT))
                self.set_tags({paths.TAG_MODEL_URI: info.model_uri})
        finally:
            model.train(was_training)
        return info.model_uri

    def _link_newest(self, model_id: str, keys: tuple[str, ...]) -> None:
        # The same metric entity (key, value, step, timestamp) again, now naming the
        # model: the run's history keeps one entry, the model gains the metric.
        from mlflow.entities import Metric

        newest = []
        for key in keys:
            history = self._client.get_metric_history(self.run_id, key)
            if history:
                m = max(history, key=lambda m: (m.step, m.timestamp))
                newest.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id))
        if newest:
            self._client.log_batch(self.run_id, metrics=newest)


def _dataset(split):
    import json

    from mlflow.entities import Dataset

    spec = [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, *split.image_shape]}}]
    return Dataset(name=split.name, digest=split.digest, source_type="local",
                   source=json.dumps({"uri": split.source}),
                   schema=json.dumps({"mlflow_tensorspec": {"features": json.dumps(spec)}}),
                   profile=json.dumps({"num_rows": split.images}))


def _mark_model_training(experiment_id: str) -> None:
    """Tag the experiment's kind (model training), once."""
    c = client()
    tags = c.get_experiment(experiment_id).tags
    for key, value in EXPERIMENT_KIND.items():
        if tags.get(key) != value:
            c.set_experiment_tag(experiment_id, key, value)


# The run an in-process step of `main` created for the stage to resume (as `mlflow run`
# hands its child process MLFLOW_RUN_ID); None outside such a step.
_STEP_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("step_run", default=None)

TAG_PID, TAG_HOST, TAG_PROCESS_START = "prunelab.pid", "prunelab.host", "prunelab.process_start"
TAG_STEP_KEY, TAG_CODE_VERSION = "prunelab.step_key", "prunelab.code_version"
TAG_STEP_RUNNER = "prunelab.step_runner"  # in-process | process: how `main` ran the step
TAG_FAILED_BECAUSE = "prunelab.failed_because"


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, Linux), so a reused pid is not taken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Which process owns a run: `main` marks a RUNNING run whose process is gone as abandoned."""
    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname(), TAG_PROCESS_START: _process_start(os.getpid())}


@contextlib.contextmanager
def run(experiment: str, stage: str, tags: dict[str, Any], run_name: str | None = None,
        description: str = "") -> Iterator[Run]:
    """Start a run, or resume the one `mlflow run` or an in-process step of `main`
    created for this stage; a failure marks it FAILED."""
    import mlflow

    step_run = _STEP_RUN.get()
    if step_run is None and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    token = _STEP_RUN.set(None)  # a stage resumes its step's run once; later runs are its own
    try:
        with mlflow.start_run(run_id=step_run, run_name=run_name, nested=mlflow.active_run() is not None) as active:
            _mark_model_training(active.info.experiment_id)
            handle = Run(active.info.run_id)
            handle.set_tags({paths.TAG_STAGE: stage, **tags, **process_tags(), **({NOTE: description} if description else {})})
            try:
                yield handle
            finally:
                handle.flush()
    finally:
        _STEP_RUN.reset(token)


def runs_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs in the MLflow UI. The link names the UI's model-training view:
    without it a fresh browser opens every experiment on its GenAI overview (the UI keeps
    that choice per browser; the experiment's kind tag does not change it)."""
    return f"{(uri or tracking_uri()).rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def system_metrics() -> None:
    """Log CPU, memory (and GPU, when present) as `system/...` metrics in every run
    this process and the steps it starts open; refused when psutil is missing."""
    import mlflow

    try:
        import psutil  # noqa: F401  (MLflow's monitors need it; without it a run would start and fail)
    except ImportError:
        raise ConfigError("--system-metrics needs the psutil package: install it (`pip install psutil`, "
                          "pinned in pyproject.toml) or leave the flag out") from None
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true"  # steps run by `mlflow run` inherit it
    mlflow.enable_system_metrics_logging()


@functools.lru_cache(maxsize=16)
def experiment_of(run_id: str) -> str:
    return client().get_run(run_id).info.experiment_id


def log_child_run(parent: Run, run_name: str, tags: dict[str, Any], params: dict[str, Any],
                  metrics: dict[str, float], step: int = 0, files: list[Path] | None = None,
                  splits=(), description: str = "") -> str:
    """One finished child run of `parent`, written in a few calls (create, one
    batch, its inputs, terminate): for sweeps with many points, where a process per
    point would cost seconds each. Its values are computed before it is created, so
    a failure never leaves a half-written run behind."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = parent._client
    experiment_id = experiment_of(parent.run_id)
    all_tags = {MLFLOW_PARENT_RUN_ID: parent.run_id, **tags, **({NOTE: description} if description else {})}
    child = c.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = child.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Param(k, text) for k, v in params.items() if (text := param_text(v)) is not None]
        for i in range(0, max(len(items), 1), 100):  # the server takes at most 100 params per batch
            c.log_batch(run_id, params=items[i : i + 100],
                        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()] if i == 0 else [])
        Run(run_id).log_inputs(splits)
        for f in files or []:
            c.log_artifact(run_id, str(f))
        c.set_terminated(run_id, "FINISHED")
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    return run_id


# --------------------------------------------------------------------------- reading back

def _mlflow_error(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def load_model(ref: str, model_name: str | None = None):
    """The nn.Module behind a weights file, a run id (its weights-only checkpoint) or a model URI, on the CPU."""
    if Path(ref).suffix in (".pt", ".pth", ".th", ".tar") or Path(ref).is_file():
        return checkpoints.load(ref, model_name)
    if _is_run_id(ref):
        return _load_run_checkpoint(ref)
    if not ref.startswith(("runs:/", "models:/")):
        raise ModelError(f"{ref!r} is neither a weights file, a run id nor a model URI (runs:/... or models:/...)")
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(ref, map_location="cpu")
    except Exception as exc:
        if _mlflow_error(exc) or isinstance(exc, OSError):
            raise ModelError(f"cannot load model {ref} from {tracking_uri()}: {str(exc).splitlines()[0][:160]}") from None
        raise
    return model  # pt2 models come back traced in eval mode


def _load_run_checkpoint(run_id: str):
    run_ = get_run(run_id)
    if paths.TAG_MODEL_URI not in run_.data.tags:
        raise ModelError(f"run {run_id} logged no final model (stage {run_.data.tags.get(paths.TAG_STAGE, '?')}, "
                         f"status {run_.info.status}): pass a finished train, prune or finetune run")
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoints.load(download(run_id, paths.CHECKPOINT, tmp))


def get_run(run_id: str):
    """A run by id, or a one-line error when the server has none."""
    try:
        return client().get_run(run_id)
    except Exception as exc:
        if _mlflow_error(exc):
            raise ModelError(f"no run {run_id} on the tracking server {tracking_uri()}: check the run id") from None
        raise


def download(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """One artifact of a run, downloaded into `dst`."""
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception as exc:
        if _mlflow_error(exc) or isinstance(exc, OSError):
            raise ModelError(f"run {run_id} has no artifact {artifact_path}: pass a finished run of this study") from None
        raise


def logged_model_id(ref: str) -> str | None:
    """The id of the logged model `ref` names: a run's final model (run id), `models:/<id>`,
    or a registered `models:/<name>@<alias>` / `models:/<name>/<version>`; None for a file."""
    if _is_run_id(ref):
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
        if _mlflow_error(exc) or isinstance(exc, TypeError):
            return None
        raise
    # The server does not return the version's model_id; its source names the model.
    return version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None


def newest_metrics(ref: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The newest values of `keys` that the run `ref` logged (none when `ref` is no run id)."""
    if not _is_run_id(ref):
        return {}
    metrics = get_run(ref).data.metrics
    return {k: metrics[k] for k in keys if k in metrics}


def logged_model_metrics(model_id: str) -> dict[str, float]:
    """The metrics linked to a logged model (the newest value of each)."""
    metrics = sorted(client().get_logged_model(model_id).metrics or [], key=lambda m: (m.step, m.timestamp))
    return {m.key: m.value for m in metrics}


def dataset_inputs(run_id: str) -> list:
    """The dataset inputs a run logged (as `mlflow.entities.DatasetInput`s)."""
    inputs = get_run(run_id).inputs
    return list(inputs.dataset_inputs) if inputs and inputs.dataset_inputs else []


def copy_dataset_inputs(run: Run, source_run_ids: list[str]) -> None:
    """Record on `run` the image sets its source runs read (each once): lineage for a run
    that reads runs, not images (a study's main run, a report)."""
    seen, todo = set(), []
    for run_id in source_run_ids:
        for d in dataset_inputs(run_id):
            key = (d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
            if key not in seen:
                seen.add(key)
                todo.append(d)
    if todo:
        run._client.log_inputs(run.run_id, datasets=todo)


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
            if not _mlflow_error(exc):
                raise
            c.create_registered_model(name, description=f"The final pruned models of study {name}, one version per trial.")
        found = [v for v in c.search_model_versions(f"name = '{_quote(name)}'") if v.source == source]
        version = found[0] if found else c.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
        for key, value in tags.items():
            c.set_model_version_tag(name, version.version, key, str(value))
    except Exception as exc:
        if _mlflow_error(exc):
            raise TrackingError(f"cannot register run {run_id}'s model as {name!r}: {str(exc).splitlines()[0][:160]}") from None
        raise
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def experiment_id(name: str) -> str | None:
    exp = client().get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def find_runs(experiment: str, filter_string: str = "", finished_only: bool = True) -> list:
    """All runs of an experiment matching `filter_string`, newest first."""
    exp_id = experiment_id(experiment)
    if exp_id is None:
        return []
    if finished_only:
        filter_string = " and ".join(f for f in (filter_string, "attributes.status = 'FINISHED'") if f)
    runs, token = [], None
    while True:
        page = client().search_runs([exp_id], filter_string, max_results=1000, order_by=["attributes.start_time DESC"],
                                    page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


# --------------------------------------------------------------------------- running and reusing steps

@contextlib.contextmanager
def main_run(experiment: str, tags: dict[str, Any], description: str = "") -> Iterator[Run]:
    """The parent run of a whole study; steps started while it is active are its children."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="main") as active:
        _mark_model_training(active.info.experiment_id)
        handle = Run(active.info.run_id)
        handle.set_tags({**tags, **process_tags(), **({NOTE: description} if description else {})})
        yield handle


def project_dir() -> Path:
    """The folder holding MLproject: the working directory under `mlflow run`, else the repository."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "MLproject").is_file():
            return candidate
    raise ConfigError("no MLproject found: run the study from the prunelab repository")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of prunelab's own source files: a step is reused only by the code that made it,
    committed or not."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        digest.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def step_key(entry_point: str, settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """What makes two runs of a step the same: its entry point, the resolved settings (never
    their spelling on a command line), the runs it reads, and the code version."""
    text = json.dumps({"entry_point": entry_point, "settings": settings, "inputs": inputs, "code": code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def already_ran(experiment: str, key: str):
    """The newest finished run with this step key, if any."""
    found = find_runs(experiment, f"tags.`{TAG_STEP_KEY}` = '{key}'")
    return found[0] if found else None


def _alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run still runs: None when that cannot be told here."""
    pid, host = tags.get(TAG_PID), tags.get(TAG_HOST)
    if not pid or host != socket.gethostname():
        return None
    started = _process_start(int(pid))
    return bool(started) and started == tags.get(TAG_PROCESS_START, started)


def fail_abandoned(experiment: str) -> list[str]:
    """Mark FAILED (with a tag saying why) every RUNNING run of the experiment whose process
    on this host is gone, and every RUNNING run under such a run; returns their ids. Runs of
    live processes and of other hosts are left alone."""
    running = find_runs(experiment, "attributes.status = 'RUNNING'", finished_only=False)
    dead = {r.info.run_id: f"abandoned: its process {r.data.tags[TAG_PID]} on {r.data.tags[TAG_HOST]} is gone"
            for r in running if _alive(r.data.tags) is False}
    changed = True
    while changed:  # children of abandoned runs, however deep
        changed = False
        for r in running:
            parent = r.data.tags.get("mlflow.parentRunId")
            if r.info.run_id not in dead and parent in dead and _alive(r.data.tags) is not True:
                dead[r.info.run_id] = f"abandoned: its parent run {parent} was abandoned"
                changed = True
    c = client()
    for run_id, why in dead.items():
        c.set_tag(run_id, TAG_FAILED_BECAUSE, why)
        c.set_terminated(run_id, "FAILED")
    return list(dead)


def _create_step_run(project: Path, experiment: str, entry_point: str, params: dict[str, str], parent_id: str | None):
    """The run `mlflow run -e <entry point>` would create: the same tags (entry point, source,
    git commit, user) and the entry point's parameters, under `parent_id`."""
    from mlflow.projects.utils import get_or_create_run
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_BACKEND

    exp_id = experiment_id(experiment) or client().create_experiment(experiment)
    created = get_or_create_run(None, str(project), exp_id, str(project), None, entry_point, params)
    tags = {MLFLOW_PROJECT_BACKEND: "local", TAG_STEP_RUNNER: "in-process"}
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    Run(created.info.run_id).set_tags(tags)
    return created.info.run_id


def run_step(experiment: str, entry_point: str, params: dict[str, str], key: str | None = None,
             call: Callable[[], Any] | None = None, parent_id: str | None = None) -> str:
    """Run one MLproject entry point as its own MLflow run; returns its run id.

    A finished run with the same step `key` is reused instead (and moved under
    `parent_id`). With `call`, the step runs in this process: a run is created as
    `mlflow run -e <entry point>` would create it and `call()` resumes it, which
    spares the ~10 s start of a process per step; without, `mlflow run` starts one.
    """
    import mlflow.projects
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if key is not None:
        found = already_ran(experiment, key)
        if found is not None:
            print(f"prunelab: reusing finished {entry_point} run {found.info.run_id}", flush=True)
            if parent_id:
                Run(found.info.run_id).set_tags({MLFLOW_PARENT_RUN_ID: parent_id})
            return found.info.run_id
    project = project_dir()
    if call is not None:
        run_id = _create_step_run(project, experiment, entry_point, params, parent_id)
        token = _STEP_RUN.set(run_id)
        try:
            call()
        except BaseException as exc:
            c = client()
            if c.get_run(run_id).info.status == "RUNNING":  # failed before the stage opened its run
                c.set_tag(run_id, TAG_FAILED_BECAUSE, f"{type(exc).__name__}: {str(exc)[:200]}")
                c.set_terminated(run_id, "FAILED")
            raise
        finally:
            _STEP_RUN.reset(token)
    else:
        # The step runs `python -m prunelab ...`: make that `python` this interpreter
        # even when the virtual environment was not activated.
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        try:
            submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                            env_manager="local", experiment_name=experiment, synchronous=True)
        except Exception as exc:
            raise PrunelabError(f"step {entry_point} ({params}) failed: {str(exc).splitlines()[0]}; "
                                "its own error is printed above") from None
        run_id = submitted.run_id
        tags = {TAG_STEP_RUNNER: "process", **({MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {})}
        Run(run_id).set_tags(tags)
    if key is not None:  # only a step that finished can be reused
        Run(run_id).set_tags({TAG_STEP_KEY: key, TAG_CODE_VERSION: code_version()})
    return run_id
