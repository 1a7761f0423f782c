"""`prunelab sync`: upload a run that was kept on disk while the server was gone.

A spool folder may have come from anyone, so sync trusts nothing in it: the
whole folder is checked before any run is created or touched (`Spool.open`,
then every model it would log is loaded), files are read only by their
recorded names and only inside the folder (never through a link; copied into
a private folder of sync's own before MLflow reads them), and the server is the
one the caller connected to, never the one the folder names. Once the target run
is open, anything that stops the upload ends it FAILED, never RUNNING, and a
second `sync` goes on where the first stopped.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from prunelab import checkpoints, paths
from prunelab.errors import ConfigError, ModelError, TrackingError, first_line
from prunelab.tracking import models
from prunelab.tracking.connection import client, is_mlflow_error, one_try, outage, server_gone
from prunelab.tracking.run import Run, create_child_run
from prunelab.tracking.spool import REFUSED, Spool


def sync(folder: str | Path | Spool) -> tuple[str, bool]:
    """Upload a spooled run to the connected server; returns (run id, whether anything was uploaded).

    The run goes into the run it was spooled from when the server still has it
    (its params, tags, metrics, artifacts, models and child runs completed,
    then its status set to the spooled one: FINISHED when the stage had
    finished offline), or else into a new run of the same experiment tagged
    with the original run id. Either way the run carries `prunelab.synced_from`
    (the folder) and `prunelab.outage` (why it was spooled). Its models are
    logged as models of that run, in its experiment. Each part is recorded in
    the folder once uploaded, so an interrupted sync resumes."""
    import mlflow

    spooled = folder if isinstance(folder, Spool) else Spool.open(folder)
    record = spooled.record
    if record["synced_to"]:
        return record["synced_to"], False
    with tempfile.TemporaryDirectory(prefix="prunelab-sync-") as staging:
        for model in record["models"]:  # a model that cannot be logged is refused before any run is touched
            if not spooled.done(f"model:{model['name']}"):
                _model_from(spooled, model["name"], Path(staging, "check"))
        c = client()
        target = _spooled_run(c, spooled)
        if target is None:
            experiment_id = mlflow.set_experiment(record["experiment"] or "Default").experiment_id
            created = c.create_run(experiment_id, run_name=record["run_name"] or None, start_time=record["spooled_at"],
                                   tags={paths.TAG_SYNCED_RUN: record["run_id"]})
            target = created.info.run_id
            c.set_terminated(target, "FAILED")  # until the upload below completes it
        if record["target_run"] != target:
            # What an earlier sync marked done went into another run (on another server): not into this one.
            record["target_run"], record["synced"] = target, []
            spooled.save()
        with _open(target, spooled.folder):
            _upload(c, spooled, target, Path(staging))
    record["synced_to"] = target
    spooled.save()
    return target, True


def _spooled_run(c, spooled: Spool) -> str | None:
    """The server's run this folder completes (the one an earlier sync created, else the one
    it was spooled from), or None when the server has neither. A run that finished on the
    server without this folder's upload is not completed from it."""
    record = spooled.record
    for run_id in dict.fromkeys(r for r in (record["target_run"], record["run_id"]) if r):
        run = _run_or_none(c, run_id)
        if run is None:
            continue
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"run {run_id}, which {spooled.folder} completes, is deleted on the server: restore "
                                f"it (`mlflow runs restore --run-id {run_id}`) and sync again")
        if run.info.status == "FINISHED" and run.data.tags.get(paths.TAG_SYNCED_FROM) != str(spooled.folder.resolve()):
            raise ConfigError(f"run {run_id}, which {spooled.folder} says it completes, finished on the server without "
                              f"it; {REFUSED}")
        return run_id
    return None


def _run_or_none(c, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException as exc:
        if server_gone(exc):
            raise
        return None


@contextlib.contextmanager
def _open(target: str, folder: Path):
    """The target run as MLflow's active run (a model is logged into the active run and its
    experiment); whatever stops the upload ends it FAILED, and a refusal by the server is one line."""
    import mlflow

    run = client().get_run(target)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)  # start_run checks the run is of the active one
    mlflow.start_run(run_id=target, nested=mlflow.active_run() is not None)
    try:
        yield
    except BaseException as exc:
        with one_try(), contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        if isinstance(exc, Exception) and is_mlflow_error(exc):
            raise outage(exc) or TrackingError(
                f"the server refused part of {folder} ({first_line(exc)[:160]}); run {target} was marked FAILED: "
                "a second `prunelab sync` goes on where this one stopped") from None
        raise


def _upload(c, spooled: Spool, target: str, staging: Path) -> None:
    """Everything of the spool the server lacks, into the active run `target`, then its status."""
    import mlflow
    from mlflow.entities import Metric

    record = spooled.record
    handle = Run(target, record["experiment"], record["stage"], record["run_name"], spool_on_outage=False)
    handle.log_params(record["params"])
    outage_text = record["reason"] + (f"; then the disk filled up: {record['full']} was not kept" if record["full"] else "")
    handle.set_tags({**record["tags"], paths.TAG_SYNCED_FROM: str(spooled.folder.resolve()),
                     paths.TAG_OUTAGE: outage_text[:500]})
    if not spooled.done("metrics"):
        metrics = [Metric(m["key"], float(m["value"]), m["timestamp"], m["step"]) for m in spooled.metrics()]
        for i in range(0, len(metrics), 1000):
            c.log_batch(target, metrics=metrics[i : i + 1000])
        spooled.mark("metrics")
    if not spooled.done("artifacts"):
        for i, name in enumerate(spooled.artifact_files()):  # file by file, each copied out of the folder first
            staged = spooled.copy_out(f"artifacts/{name}", staging / "artifacts" / str(i))
            c.log_artifact(target, str(staged), name.rpartition("/")[0] or None)
            staged.unlink()
        spooled.mark("artifacts")
    _drop_unfinished_models(c, target, {m["name"] for m in record["models"]})
    for model in record["models"]:
        if spooled.done(f"model:{model['name']}"):
            continue
        network, example = _model_from(spooled, model["name"], staging / "models")
        models.log_model(target, network, model["name"], example, model["step"], model["final"],
                         network if model["final"] else None)
        spooled.mark(f"model:{model['name']}")
    for i, child in enumerate(record["children"]):
        if spooled.done(f"child:{i}"):
            continue
        files = [spooled.copy_out(f, staging / "children" / str(i)) for f in spooled.child_files(i)]
        create_child_run(target, child["run_name"], child["tags"], child["params"], child["metrics"],
                         child["step"], files, when=child["time"])
        spooled.mark(f"child:{i}")
    status = record["status"] if record["status"] in ("FINISHED", "FAILED", "KILLED") else "FAILED"
    mlflow.end_run(status)
    c.set_terminated(target, status, end_time=record["end_time"])  # when the stage ended, not now


def _drop_unfinished_models(c, target: str, spooled_names: set[str]) -> None:
    """A model whose upload the outage cut short stays PENDING in the run's experiment: the
    spooled copy replaces it (deleted); one the spool does not hold either is marked FAILED."""
    experiment_id = c.get_run(target).info.experiment_id
    for model in c.search_logged_models([experiment_id], filter_string=f"source_run_id = '{target}'"):
        if str(model.status) in ("PENDING", "LoggedModelStatus.PENDING"):
            if model.name in spooled_names:
                c.delete_logged_model(model.model_id)
            else:
                c.finalize_logged_model(model.model_id, "FAILED")


def _model_from(spooled: Spool, name: str, staging: Path):
    """(network, example input) of a spooled model, checked to run on its example; one line if not.
    The bare network the stage kept: its normalisation is not inside (the spool holds no data set)."""
    import torch

    weights_file, example_file = spooled.model_files(name)
    into = staging / name
    staged = spooled.copy_out(weights_file, into)
    try:
        network = checkpoints.load(staged)
    except ModelError as exc:  # named by the file in the folder, not by sync's private copy
        raise ModelError(f"{str(exc).replace(str(staged), str(spooled.folder / weights_file))}; {REFUSED}") from None
    example_path = spooled.copy_out(example_file, into)
    try:
        example = torch.load(example_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{spooled.folder / example_file} is not a saved example input ({type(exc).__name__}): "
                         f"{REFUSED}") from None
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise ModelError(f"{spooled.folder / example_file} holds no float tensor: {REFUSED}")
    try:
        with torch.no_grad():
            network.eval()(example.float())
    except Exception as exc:
        raise ModelError(f"the model {name} of {spooled.folder} does not take its own example input "
                         f"({first_line(exc)[:120]}): {REFUSED}") from None
    for f in into.iterdir():
        f.unlink()
    return network, example.float()
