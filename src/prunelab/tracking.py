"""The only module that imports mlflow: connect, log, load models, find runs,
and run or reuse the steps of a study.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from prunelab import checkpoints, paths
from prunelab.errors import ConfigError, ModelError, PrunelabError, TrackingError
from prunelab.server import healthy

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
        if not healthy(uri, timeout):
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
def main_run(experiment: str, tags: dict[str, Any]) -> Iterator[Run]:
    """The parent run of a whole study; steps started while it is active are its children."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="main") as active:
        handle = Run(active.info.run_id)
        handle.set_tags(tags)
        yield handle


def project_dir() -> Path:
    """The folder holding MLproject: the working directory under `mlflow run`, else the repository."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "MLproject").is_file():
            return candidate
    raise ConfigError("no MLproject found: run the study from the prunelab repository")


def _git_commit(project: Path) -> str | None:
    try:
        import git

        return git.Repo(project, search_parent_directories=True).head.commit.hexsha
    except Exception:
        return None


def already_ran(experiment: str, entry_point: str, params: dict[str, str], commit: str | None):
    """A finished run of `entry_point` with exactly these params (and commit), if any."""
    for found in find_runs(experiment, f"tags.`mlflow.project.entryPoint` = '{entry_point}'"):
        logged = found.data.params
        # `mlflow run` logs each parameter as it put it on the command line (shell-quoted).
        if any(logged.get(k, "") not in (str(v), shlex.quote(str(v))) for k, v in params.items()):
            continue
        run_commit = found.data.tags.get("mlflow.source.git.commit")
        if commit and run_commit and run_commit != commit:
            continue
        return found
    return None


def run_step(experiment: str, entry_point: str, params: dict[str, str], reuse: bool = True) -> str:
    """Run one MLproject entry point (or reuse a finished run of it with the same
    params and code commit); returns its run id."""
    import mlflow.projects

    project = project_dir()
    commit = _git_commit(project)
    if reuse:
        found = already_ran(experiment, entry_point, params, commit)
        if found is not None:
            print(f"prunelab: reusing finished {entry_point} run {found.info.run_id}", flush=True)
            return found.info.run_id
    # Each step runs `python -m prunelab ...`: make that `python` this interpreter
    # even when the virtual environment was not activated.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    try:
        submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                        env_manager="local", experiment_name=experiment, synchronous=True)
    except Exception as exc:
        raise PrunelabError(f"step {entry_point} ({params}) failed: {str(exc).splitlines()[0]}; "
                            "its own error is printed above") from None
    return submitted.run_id
