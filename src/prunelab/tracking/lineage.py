"""Lineage: the image sets a run reads and the logged models it starts from, as
MLflow inputs, so the UI shows where every number came from."""

from __future__ import annotations

import json

from prunelab.tracking.connection import client
from prunelab.tracking.models import logged_model_id
from prunelab.tracking.query import get_run

DATASET_CONTEXT = "mlflow.data.context"
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


def log_inputs(run_id: str, splits=(), model_refs=()) -> None:
    """Record on the run the image sets it reads (`data.base.Split`s) and the logged models
    it starts from (each run id or model URI that names one; others are skipped)."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    datasets = [DatasetInput(_dataset(s), [InputTag(DATASET_CONTEXT, s.context)]) for s in splits]
    model_ids = list(dict.fromkeys(m for ref in model_refs if (m := logged_model_id(ref))))
    if not (datasets or model_ids):
        return
    models = [LoggedModelInput(m) for m in model_ids] or None
    for attempt in range(INPUT_RACE_TRIES):
        try:
            client().log_inputs(run_id, datasets=datasets or None, models=models)
            return
        except Exception as exc:
            if attempt == INPUT_RACE_TRIES - 1 or not lost_insert_race(exc):
                raise


def _dataset(split):
    from mlflow.entities import Dataset

    spec = [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, *split.image_shape]}}]
    return Dataset(name=split.name, digest=split.digest, source_type="local",
                   source=json.dumps({"uri": split.source}),
                   schema=json.dumps({"mlflow_tensorspec": {"features": json.dumps(spec)}}),
                   profile=json.dumps({"num_rows": split.images}))


def dataset_inputs(run_id: str) -> list:
    """The dataset inputs a run logged (as `mlflow.entities.DatasetInput`s)."""
    inputs = get_run(run_id).inputs
    return list(inputs.dataset_inputs) if inputs and inputs.dataset_inputs else []


def copy_dataset_inputs(run_id: str, source_run_ids: list[str]) -> None:
    """Record on run `run_id` the image sets its source runs read (each once): lineage for
    a run that reads runs, not images (a study's main run, a report)."""
    seen, todo = set(), []
    for source in source_run_ids:
        for d in dataset_inputs(source):
            key = (d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
            if key not in seen:
                seen.add(key)
                todo.append(d)
    if todo:
        client().log_inputs(run_id, datasets=todo)
