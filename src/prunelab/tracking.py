"""The only module that imports mlflow: connect, log, load models, find runs,
and run or reuse the steps of a study.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value).
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

        # Exported from a CPU copy, so a model trained on a GPU loads on a machine without one.
        cpu_model = copy.deepcopy(model).cpu().eval() if example.device.type != "cpu" else model
        was_training = model.training
        info = mlflow.pytorch.log_model(cpu_model.eval(), name=name, input_example=example.cpu().numpy(),
                                        serialization_format="pt2", pip_requirements=MODEL_REQUIREMENTS)
        model.train(was_training)
        if final:
            with tempfile.TemporaryDirectory() as tmp:
                self.log_file(checkpoints.save(model, Path(tmp) / paths.CHECKPOINT))
            self.set_tags({paths.TAG_MODEL_URI: info.model_uri})
        return info.model_uri


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
def run(experiment: str, stage: str, tags: dict[str, Any], run_name: str | None = None) -> Iterator[Run]:
    """Start a run, or resume the one `mlflow run` or an in-process step of `main`
    created for this stage; a failure marks it FAILED."""
    import mlflow

    step_run = _STEP_RUN.get()
    if step_run is None and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    token = _STEP_RUN.set(None)  # a stage resumes its step's run once; later runs are its own
    try:
        with mlflow.start_run(run_id=step_run, run_name=run_name, nested=mlflow.active_run() is not None) as active:
            handle = Run(active.info.run_id)
            handle.set_tags({paths.TAG_STAGE: stage, **tags, **process_tags()})
            try:
                yield handle
            finally:
                handle.flush()
    finally:
        _STEP_RUN.reset(token)


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
        handle.set_tags({**tags, **process_tags()})
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
