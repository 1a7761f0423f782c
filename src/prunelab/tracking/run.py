"""A run and what it logs: the `Run` handle, which writes to one of two sinks
(MLflow while the server answers, the on-disk spool once it has gone), the
context managers that open a stage's run and a study's `main` run, and child runs.
How a run starts and ends on the spool is `tracking.spool_sink`'s.

Metrics are buffered and sent with `log_batch` (a synchronous call to a
server costs tens of milliseconds, so never one call per value). A model is
logged at a step, after the buffer is flushed, so MLflow links that step's
metrics to it; metrics logged later at the same step name it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from prunelab import paths
from prunelab.errors import ConfigError, TrackingError, first_line, input_accepted
from prunelab.tracking import lineage, models
from prunelab.tracking.connection import client, one_try, outage, param_text, server_gone, tracking_uri
from prunelab.tracking.query import experiment_of, get_run
from prunelab.tracking.owner import process_tags
from prunelab.tracking.spool_sink import SpoolSink, left_on_disk
from prunelab.tracking.spool_writer import SpoolWriter

# The experiment's kind as the MLflow UI names it: model training, not GenAI. (Which view
# a browser opens an experiment on is that browser's choice: see `query.runs_url`.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # a run's description in the UI (markdown)
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's tag: the UI nests a run under this one
T = TypeVar("T")


class MlflowSink:
    """What a run handle writes while the server answers: MLflow calls for one run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._client = client()
        self._model_at: dict[int, str] = {}  # step -> id of the model logged at that step
        self._sent = models.SentMetrics()  # what a model logged at a step is linked to
        self._params: dict[str, str] | None = None  # the run's params, once read

    def log_params(self, params: dict[str, str]) -> None:
        # `mlflow run` has already logged the MLproject params; MLflow refuses a
        # param logged twice with another value, so existing keys are skipped.
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):  # the server takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=todo[i : i + 100])
        self._params = {**params, **existing}  # a logged model copies them

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, metrics: list[tuple]) -> None:
        """(key, value, time, step, linked): a linked metric names the model logged at its step."""
        from mlflow.entities import Metric

        batch = [Metric(key, value, when, step, model_id=self._model_at.get(step) if linked else None)
                 for key, value, when, step, linked in metrics]
        self._client.log_batch(self.run_id, metrics=batch)
        self._sent.add(batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, value: dict | list, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, value, artifact_file)

    def log_figure(self, figure, artifact_file: str, dpi: int) -> None:
        self._client.log_figure(self.run_id, figure, artifact_file, save_kwargs={"dpi": dpi})

    def log_table(self, table, artifact_file: str) -> None:
        self._client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_inputs(self, splits, model_refs) -> None:
        lineage.log_inputs(self.run_id, splits, model_refs)

    def log_model(self, model, name: str, example, step: int, final: bool, checkpoint, metadata, carry,
                  weights_only: bool = False) -> str:
        logged = models.log_model(self.run_id, model, name, example, step, final, checkpoint, metadata, carry,
                                  sent=self._sent, params=self._params, weights_only=weights_only)
        self._model_at[step] = logged.model_id
        return logged.uri

    def log_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int, files: list[Path] | None, splits) -> str:
        return create_child_run(self.run_id, run_name, tags, params, metrics, step, files, splits=splits)

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status)


class Run:
    """A handle on one run: buffered metrics, params once, artifacts, models, child runs.

    While the server answers, everything goes to it (`MlflowSink`). Once a call
    fails because the server is gone, the run is spooled: the params and tags it
    was given, and from then on everything else, go to a local folder
    (`SpoolSink`) and no further call is made."""

    def __init__(self, run_id: str, experiment: str = "", stage: str = "", run_name: str = "",
                 spool_on_outage: bool = True):
        self.run_id = run_id
        self.experiment, self.stage, self.run_name = experiment, stage, run_name
        self.spool: SpoolWriter | None = None
        self._spool_on_outage = spool_on_outage
        self._sink: MlflowSink | SpoolSink = MlflowSink(run_id)
        self._buffer: list[tuple] = []
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._unkept: TrackingError | None = None  # the server went away and the spool could not be made

    def _write(self, action: Callable[[Any], T], replay: bool = True) -> T | None:
        """`action` on the sink; when MLflow's call fails because the server is gone, the run
        is spooled from here on (with every param and tag it was given) and `action` goes there
        (unless `replay` is False: the caller then decides what the spool gets first)."""
        if self._unkept is not None:
            raise self._unkept
        if self.spool is None:
            try:
                return action(self._sink)
            except Exception as exc:
                gone = server_gone(exc)
                if gone is None:
                    raise
                if not self._spool_on_outage:
                    raise outage(exc) from None
                reason = f"{gone}: {first_line(exc)}"
                try:
                    self._sink = SpoolSink.start(experiment=self.experiment, run_id=self.run_id,
                                                 run_name=self.run_name, stage=self.stage, params=self._params,
                                                 tags=self._tags, reason=reason)
                except TrackingError as unkept:
                    self._unkept = unkept
                    raise
                self.spool = self._sink.spool
                if not replay:
                    return None
        return action(self._sink)

    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: text for k, v in params.items() if (text := param_text(v)) is not None}
        self._params.update(params)
        self._write(lambda sink: sink.log_params(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self._tags.update(tags)
        self._write(lambda sink: sink.set_tags(tags))

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True, model_linked: bool = True) -> None:
        """Buffer metrics at `step`; at a step where a model was logged they name that model
        (unless `model_linked` is False: values that describe another state of the network)."""
        now = int(time.time() * 1000)
        self._buffer += [(k, float(v), now, step, model_linked) for k, v in metrics.items()]
        if flush or len(self._buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._write(lambda sink: sink.log_metrics(chunk))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(lambda sink: sink.log_text(text, artifact_file))

    def log_dict(self, value: dict | list, artifact_file: str) -> None:
        self._write(lambda sink: sink.log_dict(value, artifact_file))

    def log_figure(self, figure, artifact_file: str, dpi: int = 120) -> None:
        self._write(lambda sink: sink.log_figure(figure, artifact_file, dpi))

    def log_table(self, table, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (JSON), which the UI shows as a table."""
        self._write(lambda sink: sink.log_table(table, artifact_file))

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write(lambda sink: sink.log_file(path, artifact_path))

    def log_inputs(self, splits=(), model_refs=()) -> None:
        """Lineage: the image sets the run reads (`data.base.Split`s) and the logged models it
        starts from (each run id or model URI that names one; others are skipped)."""
        self._write(lambda sink: sink.log_inputs(splits, model_refs))

    def log_model(self, model, name: str, example, step: int, final: bool = False, checkpoint=None,
                  metadata: dict | None = None, carry: tuple[str, ...] = (), weights_only: bool = False) -> str:
        """Log `model` at `step` (see `tracking.models.log_model`), after the buffered metrics,
        so the model carries that step's numbers. Returns the model URI; spooled, the bare
        network is kept as a checkpoint with its example input (returns the folder), before
        the buffered metrics."""
        self._flush_live()
        if example.device.type != "cpu":  # exported from a CPU copy: a model trained on a GPU loads anywhere
            model, example = copy.deepcopy(model).cpu(), example.cpu()
        uri = self._write(lambda sink: sink.log_model(model, name, example, step, final, checkpoint, metadata, carry,
                                                      weights_only))
        if final and self.spool is None:
            self._tags[paths.TAG_MODEL_URI] = uri  # a spool made later keeps it
        self.flush()  # spooled, the metrics come after the model: on a disk short of room, the model is kept
        return uri

    def _flush_live(self) -> None:
        """Send the buffered metrics while the server answers (MLflow then links those of the
        model's step to it); once the run is spooled they stay buffered."""
        while self._buffer and self.spool is None:
            chunk = self._buffer[:1000]
            self._write(lambda sink: sink.log_metrics(chunk), replay=False)
            if self.spool is None:
                self._buffer = self._buffer[len(chunk):]

    def log_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int = 0, files: list[Path] | None = None, splits=(), description: str = "") -> str:
        """One finished child run, written in a few calls (create, one batch, its inputs,
        terminate): for sweeps with many points, where a process per point would cost seconds
        each. Its values are computed before it is created, so a failure never leaves a
        half-written run behind. A spooled run keeps it for `sync` (returns "")."""
        all_tags = {**tags, **({NOTE: description} if description else {})}
        return self._write(lambda sink: sink.log_child(run_name, all_tags, params, metrics, step, files, splits))

    def end(self, status: str) -> None:
        """Flush and end the run with `status`. A spooled run is closed on disk
        instead, and this raises the one-line error that names its folder."""
        try:
            self.flush()
        finally:
            try:
                if self._unkept is None:
                    self._write(lambda sink: sink.end(status))
            finally:
                if self.spool is not None or self._unkept is not None:
                    left_on_disk(self.run_id, self.stage, status, self.spool, self._unkept)


def create_child_run(parent_id: str, run_name: str, tags: dict[str, Any], params: dict[str, Any],
                     metrics: dict[str, float], step: int = 0, files: list[Path] | None = None,
                     when: int | None = None, splits=()) -> str:
    """A finished child run of `parent_id` (see `Run.log_child`); FAILED if writing it fails."""
    from mlflow.entities import Metric, Param

    c = client()
    all_tags = {PARENT_RUN_ID: parent_id, **tags}
    child = c.create_run(experiment_of(parent_id), run_name=run_name, tags={k: str(v) for k, v in all_tags.items()},
                         start_time=when)
    run_id = child.info.run_id
    try:
        now = when or int(time.time() * 1000)
        items = [Param(k, text) for k, v in params.items() if (text := param_text(v)) is not None]
        for i in range(0, max(len(items), 1), 100):  # the server takes at most 100 params per batch
            c.log_batch(run_id, params=items[i : i + 100],
                        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()] if i == 0 else [])
        if splits:
            lineage.log_inputs(run_id, splits)
        for f in files or []:
            c.log_artifact(run_id, str(f))
        c.set_terminated(run_id, "FINISHED", end_time=when)
    except BaseException:
        with one_try(), contextlib.suppress(Exception):
            c.set_terminated(run_id, "FAILED")
        raise
    return run_id


# --------------------------------------------------------------------------- opening runs

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


@contextlib.contextmanager
def resuming(run_id: str) -> Iterator[None]:
    """The next stage run opened in the block (`start_run`) resumes run `run_id` instead of starting one."""
    token = _STEP_RUN.set(run_id)
    try:
        yield
    finally:
        _STEP_RUN.reset(token)


def check_handed_run(experiment: str) -> None:
    """Refuse the run `mlflow run` handed this process (MLFLOW_RUN_ID) when it is not in the
    study's experiment `experiment`, before anything else runs.

    `mlflow run` without `--experiment-name` makes its run in the Default experiment, while
    every step, the report and the printed link use the study's: the study would be split,
    and MLflow cannot move a run to another experiment. The run exists already (MLflow made
    it before starting prunelab), so it is ended FAILED with a tag saying why, not left RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    handed = get_run(run_id)
    where = client().get_experiment(handed.info.experiment_id).name
    if where == experiment:
        return
    fix = f"add `--experiment-name {experiment}` to the `mlflow run` command"
    fail(run_id, f"refused: `mlflow run` made this run in experiment {where!r}, not in the study's experiment "
                 f"{experiment!r}; {fix}")
    raise ConfigError(f"`mlflow run` made its run in experiment {where!r}, not in the study's experiment {experiment!r}, "
                      f"where all its runs go (MLflow cannot move a run): {fix}")


@contextlib.contextmanager
def start_run(experiment: str, stage: str, tags: dict[str, Any], run_name: str | None = None,
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
            input_accepted()  # the warnings the CLI held while checking the input print now
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


@contextlib.contextmanager
def main_run(experiment: str, tags: dict[str, Any], description: str = "") -> Iterator[Run]:
    """The parent run of a whole study; steps started while it is active are its children."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="main") as active:
        input_accepted()
        _mark_model_training(active.info.experiment_id)
        handle = Run(active.info.run_id)
        handle.set_tags({**tags, **process_tags(), **({NOTE: description} if description else {})})
        yield handle


# --------------------------------------------------------------------------- runs someone else started

def set_parent(run_id: str, parent_id: str) -> None:
    """Nest run `run_id` under `parent_id` in the UI."""
    Run(run_id).set_tags({PARENT_RUN_ID: parent_id})


def end_with(run_id: str, status: str, why: str) -> None:
    """End a run that its own process did not end, with a tag saying why."""
    c = client()
    c.set_tag(run_id, paths.TAG_FAILED_BECAUSE, why[:250])
    c.set_terminated(run_id, status)


def fail(run_id: str, why: str) -> None:
    end_with(run_id, "FAILED", why)
