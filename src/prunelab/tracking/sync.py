"""`prunelab sync`: upload a run that was kept on disk while the server was gone."""

from __future__ import annotations

from pathlib import Path

from prunelab import checkpoints, paths
from prunelab.errors import ModelError
from prunelab.tracking import models
from prunelab.tracking.connection import client, server_gone
from prunelab.tracking.run import Run, create_child_run
from prunelab.tracking.spool import Spool


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
        models.log_model(target, network, model["name"], _read_example(example), model.get("step", 0), model["final"],
                         network if model["final"] else None)
        spooled.mark(f"model:{model['name']}")
    for i, child in enumerate(record["children"]):
        if spooled.done(f"child:{i}"):
            continue
        create_child_run(target, child["run_name"], child["tags"], child["params"], child["metrics"],
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
