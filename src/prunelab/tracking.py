"""The only module that imports mlflow: connect, log, load models, find runs,
register models, run or reuse the steps of a study, and upload runs kept while
the server was gone.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value). A model is
logged at a step, after the buffer is flushed, so MLflow copies that step's
metrics onto it; metrics logged later at the same step name it too.

A server that stops answering costs at most `PRUNELAB_TRACKING_PATIENCE`
seconds (30 by default) of MLflow's own retries; after that the run goes on
offline: what it would have sent is kept in a spool folder (`prunelab.spool`),
the stage ends with one line naming that folder, and `prunelab sync FOLDER`
uploads it once the server is back.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from prunelab import checkpoints, export, paths, server
from prunelab.config import check_range
from prunelab.data.base import cache_dir
from prunelab.errors import ConfigError, DataError, ModelError, PrunelabError, TrackingError
from prunelab.spool import Spool

DEFAULT_URI = "http://127.0.0.1:5000"
# Pinned so a logged model reinstalls the versions that trained it; listing them
# also spares MLflow from inferring requirements (slow) at every log_model.
MODEL_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]
# The experiment's kind as the MLflow UI names it: model training, not GenAI. (Which view
# a browser opens an experiment on is that browser's choice: see `runs_url`.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # a run's description in the UI (markdown)
DATASET_CONTEXT = "mlflow.data.context"
PATIENCE_ENV = "PRUNELAB_TRACKING_PATIENCE"
DEFAULT_PATIENCE = 30.0
# How long a probe may take to tell a server that stopped answering from one that refused a request.
PROBE_SECONDS = 3.0
# The server `connect` checked: only a failure talking to it can be blamed on it going away.
_connected: list[str] = []


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def patience() -> float:
    """Seconds a tracking call may keep retrying a server that does not answer ($PRUNELAB_TRACKING_PATIENCE)."""
    raw = os.environ.get(PATIENCE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_PATIENCE
    except ValueError:
        raise ConfigError(f"{PATIENCE_ENV}={raw!r} is not a number of seconds (e.g. 30)") from None
    check_range(PATIENCE_ENV, value, 8, 3600, hint="seconds a tracking call may retry a server that does not answer")
    return value


def retry_settings(seconds: float) -> dict[str, str]:
    """MLflow's HTTP settings that give up on a silent server within `seconds`:
    three attempts, the third 4-5 s after the second (urllib3's backoff
    2 * 2**(n-1) plus up to 1 s of jitter, none before the first retry), each
    waiting at most T s for an answer, so 3T + 5 <= seconds (tests/test_tracking.py
    times it against a closed port and against one that never answers)."""
    timeout = max(1, int((seconds - 5) // 3))
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}


def forbid_pickle() -> None:
    """MLflow's own guard: no model it loads may be unpickled (pt2 archives are checked to be pickle-free)."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def connect(uri: str | None = None, timeout: float = 5.0) -> str:
    """Point MLflow at `uri` and make sure an MLflow tracking server answers there
    (fails within `timeout` s); bound MLflow's retries unless the user set them."""
    uri = uri or tracking_uri()
    for key, value in retry_settings(patience()).items():
        os.environ.setdefault(key, value)  # the user's own MLflow settings win
    forbid_pickle()
    if uri.startswith(("http://", "https://")):
        problem = server.probe(uri, timeout)  # before importing mlflow: the answer comes within `timeout`
        if problem:
            raise TrackingError(f"no MLflow tracking server at {uri}: {problem}; start one with `make server` "
                                "or point MLFLOW_TRACKING_URI (or --tracking-uri) at a running one")
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        try:  # a local store (file:, sqlite:, ...): MLflow says whether it can use it
            client().search_experiments(max_results=1)
        except Exception as exc:
            mlflow.set_tracking_uri(previous)  # as it was: a refused URI leaves nothing behind
            raise TrackingError(f"cannot use the tracking URI {uri!r}: {_first_line(exc)[:160]}; pass an "
                                "http://host:port of an MLflow server (or a file:/sqlite: store)") from None
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow.run) inherit it
    _connected[:] = [uri]
    return uri


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def param_text(value: Any) -> str | None:
    """A param's value as logged; None for an empty one, which is not logged (the UI
    would show a blank '' column): an unset setting is simply absent."""
    text = str(value)
    return text if text else None


@contextlib.contextmanager
def _one_try(timeout: int = 3) -> Iterator[None]:
    """MLflow calls in the block make one attempt of at most `timeout` s (MLflow
    reads these settings at every request): for calls to a server already known gone."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def server_gone(exc: BaseException) -> str | None:
    """When `exc` is a failed call to a tracking server that no longer answers
    (checked with one quick probe): what answers there instead; else None."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    if not isinstance(exc, (MlflowException, OSError)) or uri not in _connected or not uri.startswith(("http://", "https://")):
        return None
    return server.probe(uri, PROBE_SECONDS)


def outage(exc: BaseException) -> TrackingError | None:
    """A one-line error for a failure caused by the tracking server going away, else None."""
    gone = server_gone(exc)
    if gone is None:
        return None
    return TrackingError(f"the tracking server {tracking_uri()} stopped answering ({gone}); start it again "
                         f"(`make server`) and rerun: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


class Run:
    """A handle on one run: buffered metrics, params once, artifacts, models.

    While the server answers, everything goes to it. Once a call fails because
    the server is gone, the run is spooled (`self.spool`): the params and tags
    it was given, and from then on everything else, go to a local folder and
    no further call is made."""

    def __init__(self, run_id: str, experiment: str = "", stage: str = "", run_name: str = "",
                 spool_on_outage: bool = True):
        self.run_id = run_id
        self.experiment, self.stage, self.run_name = experiment, stage, run_name
        self.spool: Spool | None = None
        self._spool_on_outage = spool_on_outage
        self._buffer: list = []
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._client = client()
        self._model_at: dict[int, str] = {}  # step -> id of the model logged at that step

    def _send(self, call) -> bool:
        """Make `call` to the server: True when it went through, False when the run is (now) spooled."""
        if self.spool is not None:
            return False
        try:
            call()
            return True
        except Exception as exc:
            gone = server_gone(exc)
            if gone is None:
                raise
            if not self._spool_on_outage:
                raise outage(exc) from None
            self.spool = Spool.create(tracking_uri=tracking_uri(), experiment=self.experiment, run_id=self.run_id,
                                      run_name=self.run_name, stage=self.stage, params=self._params,
                                      tags=self._tags, reason=f"{gone}: {_first_line(exc)}")
            return False

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged the MLproject params; MLflow refuses a
        # param logged twice with another value, so existing keys are skipped.
        from mlflow.entities import Param

        params = {k: text for k, v in params.items() if (text := param_text(v)) is not None}
        self._params.update(params)

        def send():
            existing = self._client.get_run(self.run_id).data.params
            todo = [Param(k, v) for k, v in params.items() if k not in existing]
            for i in range(0, len(todo), 100):
                self._client.log_batch(self.run_id, params=todo[i : i + 100])

        if not self._send(send):
            self.spool.set_params(self._params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in tags.items()}
        self._tags.update(tags)
        if not self._send(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])):
            self.spool.set_tags(self._tags)

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True, model_linked: bool = True) -> None:
        """Buffer metrics at `step`; at a step where a model was logged they name that model
        (unless `model_linked` is False: values that describe another state of the network)."""
        now = int(time.time() * 1000)
        model_id = self._model_at.get(step) if model_linked else None
        self._buffer += [(k, float(v), now, step, model_id) for k, v in metrics.items()]
        if flush or len(self._buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric

        while self._buffer:
            chunk = self._buffer[:1000]
            if not self._send(lambda: self._client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])):
                self.spool.add_metrics([m[:4] for m in self._buffer])  # (key, value, time, step)
                self._buffer = []
                return
            self._buffer = self._buffer[1000:]

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._send(lambda: self._client.log_text(self.run_id, text, artifact_file)):
            self.spool.add_text(text, artifact_file)

    def log_dict(self, value: dict | list, artifact_file: str) -> None:
        if not self._send(lambda: self._client.log_dict(self.run_id, value, artifact_file)):
            self.spool.add_text(json.dumps(value, indent=2), artifact_file)

    def log_figure(self, figure, artifact_file: str, dpi: int = 120) -> None:
        if not self._send(lambda: self._client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": dpi})):
            self.spool.add_figure(figure, artifact_file)

    def log_table(self, table, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (JSON), which the UI shows as a table."""
        if not self._send(lambda: self._client.log_table(self.run_id, data=table, artifact_file=artifact_file)):
            self.spool.add_text(table.to_json(orient="split"), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self._send(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)):
            self.spool.add_file(path, artifact_path)

    def log_inputs(self, splits=(), model_refs=()) -> None:
        """Lineage: the image sets the run reads (`data.base.Split`s) and the logged models it
        starts from (each run id or model URI that names one; others are skipped). Offline,
        lineage is not kept: `sync` uploads results, not inputs."""
        from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

        datasets = [DatasetInput(_dataset(s), [InputTag(DATASET_CONTEXT, s.context)]) for s in splits]

        def send():
            model_ids = list(dict.fromkeys(m for ref in model_refs if (m := logged_model_id(ref))))
            if not (datasets or model_ids):
                return
            models = [LoggedModelInput(m) for m in model_ids] or None
            for attempt in range(INPUT_RACE_TRIES):
                try:
                    self._client.log_inputs(self.run_id, datasets=datasets or None, models=models)
                    return
                except Exception as exc:
                    if attempt == INPUT_RACE_TRIES - 1 or not lost_insert_race(exc):
                        raise

        self._send(send)

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
        values are linked to it too. Returns the model URI. Spooled, the bare network
        is kept as a checkpoint with its example input (returns the folder)."""
        self.flush()
        if example.device.type != "cpu":  # exported from a CPU copy: a model trained on a GPU loads anywhere
            model, example = copy.deepcopy(model).cpu(), example.cpu()
        uri: list[str] = []
        if self._send(lambda: uri.append(self._log_model(model, name, example, step, final, checkpoint, metadata, carry))):
            return uri[0]
        bare = checkpoint if checkpoint is not None else getattr(model, "network", model)
        return str(self.spool.add_model(bare, name, example, final, step))

    def _log_model(self, model, name: str, example, step: int, final: bool, checkpoint, metadata: dict | None,
                   carry: tuple[str, ...]) -> str:
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

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
                        self._client.log_artifact(self.run_id, str(checkpoints.save(checkpoint, Path(tmp) / paths.CHECKPOINT)))
                self._client.set_tag(self.run_id, paths.TAG_MODEL_URI, info.model_uri)
                self._tags[paths.TAG_MODEL_URI] = info.model_uri
        finally:
            model.train(was_training)
        return info.model_uri

    def end(self, status: str) -> None:
        """Flush and end the run with `status`. A spooled run is closed on disk
        instead, and this raises the one-line error that names its folder."""
        import mlflow

        try:
            self.flush()
        finally:
            ended = self._send(lambda: mlflow.end_run(status))
            if not ended:
                self._end_spooled(status)

    def _end_spooled(self, status: str) -> None:
        import mlflow

        self.spool.close(status)
        folder = self.spool.folder
        # One quick try each: a server that is back by now learns the run failed and
        # where its rest is; `sync` completes it. Either way the run leaves MLflow's stack.
        with _one_try():
            with contextlib.suppress(Exception):
                self._client.set_tag(self.run_id, paths.TAG_SPOOLED_TO, str(folder))
            active = mlflow.active_run()
            with contextlib.suppress(Exception):
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run("FAILED")
                else:
                    self._client.set_terminated(self.run_id, "FAILED")
        what = "its model, metrics and params" if self.spool.record["models"] else "its metrics and params"
        raise TrackingError(
            f"the tracking server {self.spool.record['tracking_uri']} stopped answering during {self.stage or 'the run'} "
            f"({self.spool.record['reason'][:120]}); the run went on ({status}) and {what} are kept in {folder}: "
            f"upload them with `prunelab sync {folder}` once the server is back")



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


# MLflow's server records a run's data sets by looking each one up and inserting the missing
# ones, not atomically: two runs logging the same new data set at once (parallel trials) can
# both find it missing, and the second insert fails on the table's unique key. Its transaction
# is rolled back whole, and by then the data set exists, so the same call is simply made again.
INPUT_RACE_TRIES = 5
_UNIQUE_KEY_FAILURES = ("UNIQUE constraint failed", "duplicate key value violates unique constraint")


def lost_insert_race(exc: BaseException) -> bool:
    """Whether the server refused a call because a concurrent call inserted the same row first
    (SQLite's and PostgreSQL's words for a unique-key violation)."""
    return any(words in str(exc) for words in _UNIQUE_KEY_FAILURES)


def _dataset(split):
    import json

    from mlflow.entities import Dataset

    spec = [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, *split.image_shape]}}]
    return Dataset(name=split.name, digest=split.digest, source_type="local",
                   source=json.dumps({"uri": split.source}),
                   schema=json.dumps({"mlflow_tensorspec": {"features": json.dumps(spec)}}),
                   profile=json.dumps({"num_rows": split.images}))


def _mark_model_training(experiment_id: str) -> None:
    """Tag the experiment's kind (model training), once per server and experiment in a process:
    every run start calls this, and a study starts dozens of runs."""
    _mark_once(tracking_uri(), experiment_id)


@functools.lru_cache(maxsize=64)
def _mark_once(uri: str, experiment_id: str) -> None:
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
    created for this stage; it ends FINISHED, or FAILED on any exception (a signal
    included), or spooled when the server went away."""
    import mlflow

    step_run = _STEP_RUN.get()
    token = _STEP_RUN.set(None)  # a stage resumes its step's run once; later runs are its own
    try:
        try:
            if step_run is None and not os.environ.get("MLFLOW_RUN_ID"):
                mlflow.set_experiment(experiment)
            active = mlflow.start_run(run_id=step_run, run_name=run_name, nested=mlflow.active_run() is not None)
            _mark_model_training(active.info.experiment_id)
        except Exception as exc:
            raise outage(exc) or exc from None
        handle = Run(active.info.run_id, experiment, stage, active.info.run_name or run_name or "")
        status = "FAILED"
        try:
            handle.set_tags({paths.TAG_STAGE: stage, **tags, **process_tags(), **({NOTE: description} if description else {})})
            yield handle
            status = "FINISHED"
        finally:
            handle.end(status)
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
    a failure never leaves a half-written run behind. A spooled parent keeps it
    for `sync` (returns "")."""
    all_tags = {**tags, **({NOTE: description} if description else {})}
    child: list[str] = []
    if parent._send(lambda: child.append(_log_child_run(parent._client, parent.run_id, run_name, all_tags, params,
                                                        metrics, step, files, splits=splits))):
        return child[0]
    parent.spool.add_child(run_name, all_tags, params, metrics, step, files)
    return ""


def _log_child_run(c, parent_id: str, run_name: str, tags: dict[str, Any], params: dict[str, Any],
                   metrics: dict[str, float], step: int = 0, files: list[Path] | None = None,
                   when: int | None = None, splits=()) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = experiment_of(parent_id)
    all_tags = {MLFLOW_PARENT_RUN_ID: parent_id, **tags}
    child = c.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()},
                         start_time=when)
    run_id = child.info.run_id
    try:
        now = when or int(time.time() * 1000)
        items = [Param(k, text) for k, v in params.items() if (text := param_text(v)) is not None]
        for i in range(0, max(len(items), 1), 100):  # the server takes at most 100 params per batch
            c.log_batch(run_id, params=items[i : i + 100],
                        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()] if i == 0 else [])
        if splits:
            Run(run_id).log_inputs(splits)
        for f in files or []:
            c.log_artifact(run_id, str(f))
        c.set_terminated(run_id, "FINISHED", end_time=when)
    except BaseException:
        with _one_try(), contextlib.suppress(Exception):
            c.set_terminated(run_id, "FAILED")
        raise
    return run_id


# --------------------------------------------------------------------------- uploading a spooled run

def sync(folder: str | Path) -> tuple[str, bool]:
    """Upload a spooled run to the connected server; returns (run id, whether anything was uploaded).

    The run goes into the run it was spooled from when the server still has it
    (its params, tags, metrics, artifacts, models and child runs completed,
    then its status set to the spooled one: FINISHED when the stage had
    finished offline), or else into a new run of the same experiment tagged
    with the original run id. Either way the run carries `prunelab.synced_from`
    (the folder) and `prunelab.outage` (why it was spooled). Each part is
    recorded in the folder once uploaded, so an interrupted sync resumes."""
    import mlflow
    from mlflow.entities import Metric

    spooled = Spool.open(folder)
    record = spooled.record
    if record["synced_to"]:
        return record["synced_to"], False
    c = client()
    target = record.get("target_run") or _existing_run(c, record["run_id"]) or ""
    if not target:
        experiment_id = mlflow.set_experiment(record["experiment"] or "Default").experiment_id
        created = c.create_run(experiment_id, run_name=record["run_name"] or None, start_time=record["spooled_at"],
                               tags={paths.TAG_SYNCED_RUN: record["run_id"]})
        target = created.info.run_id
    if record.get("target_run") != target:
        record["target_run"] = target
        spooled.save()
    handle = Run(target, record["experiment"], record["stage"], record["run_name"], spool_on_outage=False)
    handle.log_params(record["params"])
    handle.set_tags({**record["tags"], paths.TAG_SYNCED_FROM: str(spooled.folder.resolve()),
                     paths.TAG_OUTAGE: record["reason"][:500]})
    if not spooled.done("metrics"):
        metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in spooled.metrics()]
        for i in range(0, len(metrics), 1000):
            c.log_batch(target, metrics=metrics[i : i + 1000])
        spooled.mark("metrics")
    artifacts = spooled.artifacts()
    if artifacts is not None and not spooled.done("artifacts"):
        c.log_artifacts(target, str(artifacts))
        spooled.mark("artifacts")
    for model in record["models"]:
        if spooled.done(f"model:{model['name']}"):
            continue
        weights, example = spooled.model_files(model["name"])
        # The bare network the stage kept (its normalisation is not inside: the spool holds no data set).
        network = checkpoints.load(weights)
        handle._log_model(network, model["name"], _read_example(example), model.get("step", 0), model["final"],
                          network if model["final"] else None, None, ())
        spooled.mark(f"model:{model['name']}")
    for i, child in enumerate(record["children"]):
        if spooled.done(f"child:{i}"):
            continue
        _log_child_run(c, target, child["run_name"], child["tags"], child["params"], child["metrics"],
                       child["step"], spooled.child_files(i), when=child["time"])
        spooled.mark(f"child:{i}")
    c.set_terminated(target, record["status"] if record["status"] in ("FINISHED", "FAILED") else "FAILED",
                     end_time=record["end_time"])
    record["synced_to"] = target
    spooled.save()
    return target, True


def _existing_run(c, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id).info.run_id
    except MlflowException as exc:
        if server_gone(exc):
            raise
        return None


def _read_example(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a saved example input ({type(exc).__name__}): the spool folder is damaged") from None


# --------------------------------------------------------------------------- reading back

def _mlflow_error(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def load_model(ref: str, model_name: str | None = None):
    """The nn.Module behind a weights file, a run id or a model URI, on the CPU; nothing is unpickled.

    A run id, and a URI of a run's final model (`runs:/<run>/model`, or the
    `models:/m-...` its `prunelab.model_uri` tag names), give the run's
    weights-only checkpoint. Any other URI must be an MLflow PyTorch model in
    the traced pt2 format: its MLmodel and file list are read first, and a
    pickle-format model is refused before a byte of it is loaded."""
    if Path(ref).suffix in (".pt", ".pth", ".th", ".tar") or Path(ref).is_file():
        return checkpoints.load(ref, model_name)
    if _is_run_id(ref):
        return _load_run_checkpoint(ref)
    if not ref.startswith(("runs:/", "models:/")):
        raise ModelError(f"{ref!r} is neither a weights file, a run id nor a model URI (runs:/... or models:/...)")
    forbid_pickle()
    run_id = _final_model_run(ref)
    if run_id:
        return _load_run_checkpoint(run_id)
    return _load_pt2(ref)


def _final_model_run(ref: str) -> str | None:
    """The run whose final model `ref` is, when it has a weights-only checkpoint of it."""
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        if _is_run_id(run_id) and path.strip("/") == paths.MODEL:
            return run_id if paths.TAG_MODEL_URI in get_run(run_id).data.tags else None
        return None
    model_id = ref.removeprefix("models:/").strip("/")
    if not model_id.startswith("m-") or "/" in model_id:
        return None  # a registered model name/version: not one of a run's final models
    try:
        source = client().get_logged_model(model_id).source_run_id
    except Exception as exc:
        if not _mlflow_error(exc) or server_gone(exc):
            raise
        return None  # unknown: _load_pt2 says so in one line
    if source and get_run(source).data.tags.get(paths.TAG_MODEL_URI) == ref:
        return source
    return None


def _model_error(ref: str, exc: Exception) -> PrunelabError:
    return outage(exc) or ModelError(f"cannot load model {ref} from {tracking_uri()}: {_first_line(exc)[:160]}")


def _load_pt2(ref: str):
    """An MLflow PyTorch model in the pt2 format, checked before anything of it is read."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    try:
        meta = Model.load(ref)  # the MLmodel file alone, read as plain YAML
        flavour = meta.flavors.get("pytorch")
        base = ModelsArtifactRepository.get_underlying_uri(ref) if ref.startswith("models:/") else ref
        data = str((flavour or {}).get("model_data", "data"))
        files = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=f"{base.rstrip('/')}/{data}")}
    except Exception as exc:
        if _mlflow_error(exc) or isinstance(exc, OSError):
            raise _model_error(ref, exc) from None
        raise
    if not isinstance(flavour, dict):
        raise ModelError(f"{ref} is not a PyTorch MLflow model (its flavours: {', '.join(meta.flavors) or 'none'}): "
                         "pass a train, prune or finetune run, its model URI or a weights file")
    if flavour.get("code"):
        raise ModelError(f"{ref} carries code ({flavour['code']}) that loading it would import: prunelab loads only "
                         "pt2 models and weights-only checkpoints")
    if PT2_FILE not in files or ".." in data:
        found = ", ".join(sorted(files)) or "no model file"
        raise ModelError(f"{ref} is a pickle-format MLflow model ({data}/: {found}), and unpickling it could run any "
                         "code it carries: prunelab loads only pt2 models and weights-only checkpoints "
                         "(log it with serialization_format='pt2', or pass a checkpoint file)")
    try:
        # MLflow checks the archive holds no pickled record before it loads (forbid_pickle).
        return mlflow.pytorch.load_model(ref, map_location="cpu")  # traced, fixed in eval mode
    except Exception as exc:
        if _mlflow_error(exc) or isinstance(exc, OSError):
            raise _model_error(ref, exc) from None
        raise


PT2_FILE = "model.pt2"  # what mlflow.pytorch writes for serialization_format='pt2'


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
            raise outage(exc) or ModelError(f"no run {run_id} on the tracking server {tracking_uri()}: "
                                            "check the run id") from None
        raise


def download(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """One artifact of a run, downloaded into `dst`."""
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception as exc:
        if _mlflow_error(exc) or isinstance(exc, OSError):
            raise outage(exc) or ModelError(f"run {run_id} has no artifact {artifact_path}: "
                                            "pass a finished run of this study") from None
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
    """The folder holding MLproject: the working directory under `mlflow run`, else the
    repository of a source checkout, else the copy shipped in the package (an installed
    prunelab runs its steps from any folder)."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "MLproject").is_file():
            return candidate
    return shipped_project()


def shipped_project(variant: str = "") -> Path:
    """The MLproject folder shipped as package data: the local one, or a variant
    (`kubernetes`: the project MLflow's Kubernetes backend builds an image from)."""
    folder = Path(str(importlib.resources.files("prunelab") / "project")) / variant
    if not (folder / "MLproject").is_file():
        raise ConfigError(f"no MLproject in {folder}: reinstall prunelab (`pip install .` ships it)")
    return folder


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


@contextlib.contextmanager
def fetched(uri: str) -> Iterator[Path]:
    """A data set named by a URI, downloaded through MLflow's artifact repositories (s3://,
    gs://, ... with their own packages and credentials; mlflow-artifacts:/ and runs:/
    through the tracking server) into a folder of the cache, removed once it has been read."""
    import mlflow.artifacts

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetched-", dir=folder) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:
            raise DataError(f"data.data_dir {uri} could not be downloaded: {_first_line(exc)}") from None
        yield Path(local)


# --------------------------------------------------------------------------- steps on a cluster

KUBE_TRACKING_ENV = "KUBE_MLFLOW_TRACKING_URI"  # the server's address as the cluster's pods reach it (MLflow's)
KUBE_CONFIG_KEYS = ("repository-uri", "kube-job-template-path")  # what MLflow requires of a backend config


def kubernetes_backend(config_file: str | None, uri: str) -> dict:
    """The backend config of `--backend kubernetes`, checked before any run starts: the
    optional packages, MLflow's keys, the Job template, Docker, and a tracking server the
    pods can reach (`uri` here, or KUBE_MLFLOW_TRACKING_URI). Every problem is one line."""
    try:
        import docker  # noqa: F401  (MLflow pulls and pushes the step image with it)
        import kubernetes  # noqa: F401  (MLflow submits and watches the Jobs with it)
    except ImportError as exc:
        raise ConfigError(f"--backend kubernetes needs the {exc.name} package: pip install 'prunelab[kubernetes]'") from None
    if not config_file:
        raise ConfigError("--backend kubernetes needs --backend-config FILE (deploy/kubernetes/backend-config.json "
                          "is an example)")
    try:
        config = json.loads(Path(config_file).read_text())
    except OSError as exc:
        raise ConfigError(f"--backend-config {config_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--backend-config {config_file} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--backend-config {config_file} is not a JSON object of MLflow's Kubernetes settings")
    missing = [k for k in KUBE_CONFIG_KEYS if not isinstance(config.get(k), str) or not config[k]]
    if missing:
        raise ConfigError(f"--backend-config {config_file} lacks {missing[0]!r}: MLflow's Kubernetes backend needs "
                          f"{' and '.join(KUBE_CONFIG_KEYS)}")
    template = Path(config["kube-job-template-path"])
    try:
        job = yaml.safe_load(template.read_text())
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert isinstance(container, dict) and isinstance(job["metadata"], dict)
    except OSError as exc:
        raise ConfigError(f"kube-job-template-path {template} (relative to this folder): "
                          f"{exc.strerror or exc}") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError, AssertionError):
        raise ConfigError(f"kube-job-template-path {template} is not a Kubernetes Job with a container "
                          "(spec.template.spec.containers): see deploy/kubernetes/job-template.yaml") from None
    if "image" in config and (not isinstance(config["image"], str) or not config["image"]):
        raise ConfigError(f"--backend-config {config_file}: 'image' must name the step image (registry/name:tag)")
    reached_at = os.environ.get(KUBE_TRACKING_ENV) or uri
    host = urllib.parse.urlparse(reached_at).hostname or ""
    if host in ("localhost", "") or host.startswith("127.") or host == "::1":
        raise ConfigError(f"the cluster's pods cannot reach the tracking server at {reached_at}: export "
                          f"{KUBE_TRACKING_ENV}=<its address as the cluster sees it> (a team server, docs/scaling.md)")
    found = shutil.which("docker")
    if found is None:
        raise ConfigError("--backend kubernetes pulls and pushes the step image with Docker: no docker on PATH")
    info = subprocess.run([found, "info"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if info.returncode != 0:
        said = (info.stderr or info.stdout).strip().splitlines()
        raise ConfigError(f"--backend kubernetes: the Docker daemon does not answer (`docker info`: "
                          f"{said[-1] if said else info.returncode}): start it")
    return config


def kubernetes_project(config: dict) -> Path:
    """The project MLflow's Kubernetes backend runs: the shipped one (docker_env), or, when the
    backend config names an "image", a copy of it naming that image instead."""
    project = shipped_project("kubernetes")
    if "image" not in config:
        return project
    spec = yaml.safe_load((project / "MLproject").read_text())
    spec["docker_env"]["image"] = config["image"]
    folder = Path(tempfile.mkdtemp(prefix="prunelab-kubernetes-project-"))
    (folder / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


class PendingStep:
    """A step submitted to the cluster (or reused: then `submitted` is None)."""

    def __init__(self, entry_point: str, run_id: str, submitted=None, key: str | None = None):
        self.entry_point, self.run_id, self.submitted, self.key = entry_point, run_id, submitted, key


def submit_step(experiment: str, entry_point: str, params: dict[str, str], key: str | None, parent_id: str,
                project: Path, config: dict) -> PendingStep:
    """Submit one MLproject entry point as a Kubernetes Job through MLflow (not waiting for
    it), or reuse a finished run with the same step key, as `run_step` does."""
    import mlflow.projects
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if key is not None:
        found = already_ran(experiment, key)
        if found is not None:
            print(f"prunelab: reusing finished {entry_point} run {found.info.run_id}", flush=True)
            Run(found.info.run_id).set_tags({MLFLOW_PARENT_RUN_ID: parent_id})
            return PendingStep(entry_point, found.info.run_id)
    backend_config = {k: v for k, v in config.items() if k != "image"}
    try:
        submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                        experiment_name=experiment, backend="kubernetes",
                                        backend_config=backend_config, synchronous=False)
    except Exception as exc:
        # MLflow makes the step's run before it builds and submits anything: do not leave it RUNNING.
        _fail_children(experiment, parent_id, entry_point, f"not submitted: {_first_line(exc)}")
        raise PrunelabError(f"step {entry_point} could not be submitted to Kubernetes: {_first_line(exc)}") from None
    Run(submitted.run_id).set_tags({TAG_STEP_RUNNER: "kubernetes", MLFLOW_PARENT_RUN_ID: parent_id})
    print(f"prunelab: submitted {entry_point} run {submitted.run_id} as Kubernetes Job "
          f"{getattr(submitted, '_job_name', '?')}", flush=True)
    return PendingStep(entry_point, submitted.run_id, submitted, key)


def run_on_cluster(experiment: str, steps: list[tuple[str, dict[str, str], str | None]], parent_id: str,
                   project: Path, config: dict) -> list[str]:
    """Submit every (entry point, params, step key) at once as Kubernetes Jobs, then wait for
    all of them; returns their run ids in order. A step whose Job failed (or whose pod died
    before its run ended) ends FAILED, and then this raises one line; when a submission
    fails, or on Ctrl-C or a signal, the Jobs already submitted are cancelled."""
    pending: list[PendingStep] = []
    failed = []
    try:
        for entry_point, params, key in steps:
            pending.append(submit_step(experiment, entry_point, params, key, parent_id, project, config))
        for step in pending:
            if step.submitted is None:
                continue
            ok = step.submitted.wait()
            c = client()
            if c.get_run(step.run_id).info.status == "RUNNING":  # the pod ended without ending its run
                c.set_tag(step.run_id, TAG_FAILED_BECAUSE, f"its Kubernetes Job ended {'' if ok else 'un'}successfully "
                          "without ending the run")
                c.set_terminated(step.run_id, "FINISHED" if ok else "FAILED")
            if ok and step.key is not None:  # only a step that finished can be reused
                Run(step.run_id).set_tags({TAG_STEP_KEY: step.key, TAG_CODE_VERSION: code_version()})
            elif not ok:
                failed.append(step)
    except BaseException:
        for step in pending:
            if step.submitted is not None:
                step.submitted.cancel()
                c = client()
                if c.get_run(step.run_id).info.status == "RUNNING":
                    c.set_tag(step.run_id, TAG_FAILED_BECAUSE, "cancelled: another step of its study could not go on")
                    c.set_terminated(step.run_id, "FAILED")
        raise
    if failed:
        first = failed[0]
        raise PrunelabError(f"{len(failed)} step(s) failed on the cluster, first {first.entry_point} run {first.run_id} "
                            f"(`kubectl logs job/{getattr(first.submitted, '_job_name', '<its Job>')}` says why)")
    return [step.run_id for step in pending]


def _fail_children(experiment: str, parent_id: str, entry_point: str, why: str) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

    c = client()
    for r in find_runs(experiment, f"attributes.status = 'RUNNING' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' "
                                   f"and tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}'", finished_only=False):
        c.set_tag(r.info.run_id, TAG_FAILED_BECAUSE, why[:250])
        c.set_terminated(r.info.run_id, "FAILED")
