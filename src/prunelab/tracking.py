"""The only module that talks to MLflow: connect, log, load, find runs.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from prunelab import paths
from prunelab.errors import ModelError, TrackingError

DEFAULT_URI = "http://127.0.0.1:5000"
# Pinned so a logged model reinstalls the versions that trained it; listing them
# also spares MLflow from inferring requirements (slow) at every log_model.
MODEL_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None = None, timeout: float = 5.0) -> str:
    """Point MLflow at `uri` and make sure a server answers there (fails within `timeout` s)."""
    import mlflow

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                ok = response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            ok = False
        if not ok:
            raise TrackingError(f"no MLflow tracking server answers at {uri}: start one with `make server` "
                                "or point MLFLOW_TRACKING_URI at a running one")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow.run) inherit it
    mlflow.set_tracking_uri(uri)
    return uri


def client():
    from mlflow import MlflowClient

    return MlflowClient()


class Run:
    """A thin handle on the active run: buffered metrics, params once, artifacts."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._buffer: list = []
        self._client = client()

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged the MLproject params; MLflow refuses a
        # param logged twice with another value, so existing keys are skipped.
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):
            self._client.log_batch(self.run_id, params=todo[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if flush or len(self._buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model, name: str, example, final: bool = False) -> str:
        """Log the module as an MLflow model in the traced 'pt2' format, which
        reloads without any of prunelab's code and unpickles nothing; the final
        model also goes out as a weights-only checkpoint, which the next stage reads."""
        import mlflow.pytorch

        from prunelab import checkpoints

        was_training = model.training
        info = mlflow.pytorch.log_model(model.eval(), name=name, input_example=example.numpy(),
                                        serialization_format="pt2", pip_requirements=MODEL_REQUIREMENTS)
        model.train(was_training)
        if final:
            with tempfile.TemporaryDirectory() as tmp:
                self.log_file(checkpoints.save(model, Path(tmp) / paths.CHECKPOINT))
            self.set_tags({paths.TAG_MODEL_URI: info.model_uri})
        return info.model_uri


@contextlib.contextmanager
def run(experiment: str, stage: str, tags: dict[str, Any], run_name: str | None = None) -> Iterator[Run]:
    """Start (or, under `mlflow run`, resume) a run; a failure marks it FAILED."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as active:
        handle = Run(active.info.run_id)
        handle.set_tags({paths.TAG_STAGE: stage, **tags})
        try:
            yield handle
        finally:
            handle.flush()


@functools.lru_cache(maxsize=16)
def _experiment_of(run_id: str) -> str:
    return client().get_run(run_id).info.experiment_id


def log_child_run(parent: Run, run_name: str, tags: dict[str, Any], params: dict[str, Any],
                  metrics: dict[str, float], step: int = 0, files: list[Path] | None = None) -> str:
    """One finished child run of `parent`, written in three calls (create, one
    batch, terminate): for sweeps with many points, where a process per point
    would cost seconds each. Its values are computed before it is created, so a
    failure never leaves a half-written run behind."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = parent._client
    experiment_id = _experiment_of(parent.run_id)
    all_tags = {MLFLOW_PARENT_RUN_ID: parent.run_id, **tags}
    child = c.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = child.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the server takes at most 100 params per batch
            c.log_batch(run_id, params=items[i : i + 100],
                        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()] if i == 0 else [])
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


def load_model(ref: str):
    """The nn.Module behind a run id (its weights-only checkpoint) or a model URI, on the CPU."""
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
    from prunelab import checkpoints

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
