"""Reading runs back: a run, an experiment's runs, a metric's history, an artifact."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from prunelab.errors import ConfigError, ModelError
from prunelab.tracking.connection import client, is_mlflow_error, outage, tracking_uri


def is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def get_run(run_id: str):
    """A run by id, or a one-line error when the server has none."""
    try:
        return client().get_run(run_id)
    except Exception as exc:
        if is_mlflow_error(exc):
            raise outage(exc) or ModelError(f"no run {run_id} on the tracking server {tracking_uri()}: "
                                            "check the run id") from None
        raise


def status(run_id: str) -> str:
    return client().get_run(run_id).info.status


@functools.lru_cache(maxsize=16)
def experiment_of(run_id: str) -> str:
    return client().get_run(run_id).info.experiment_id


def experiment_id(name: str) -> str | None:
    exp = client().get_experiment_by_name(name)
    return exp.experiment_id if exp else None


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's Default experiment: where runs land when nobody chose one


def active_run_experiment() -> str | None:
    """The name of the experiment of the run active in this process (`with mlflow.start_run()`), or None."""
    import mlflow

    active = mlflow.active_run()
    return _experiment_name(active.info.experiment_id) if active else None


def chosen_experiment() -> str | None:
    """The name of the experiment the user made active in this process: the active run's, else
    the one `mlflow.set_experiment` chose (MLflow keeps its id in MLFLOW_EXPERIMENT_ID) or the
    environment names (MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME); None when there is none,
    or it is MLflow's Default experiment (nobody chose that one)."""
    chosen = active_run_experiment()
    if chosen is not None:
        return chosen
    experiment = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if not experiment:
        return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or None
    return _experiment_name(experiment) if experiment != DEFAULT_EXPERIMENT_ID else None


def _experiment_name(experiment: str) -> str:
    try:
        return client().get_experiment(experiment).name
    except Exception as exc:
        if is_mlflow_error(exc):
            raise outage(exc) or ConfigError(f"MLFLOW_EXPERIMENT_ID={experiment} names no experiment on {tracking_uri()}: "
                                             "unset it, or choose one with mlflow.set_experiment(NAME)") from None
        raise


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


def newest_metrics(ref: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The newest values of `keys` that the run `ref` logged (none when `ref` is no run id)."""
    if not is_run_id(ref):
        return {}
    metrics = get_run(ref).data.metrics
    return {k: metrics[k] for k in keys if k in metrics}


def download(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """One artifact of a run, downloaded into `dst`."""
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception as exc:
        if is_mlflow_error(exc) or isinstance(exc, OSError):
            raise outage(exc) or ModelError(f"run {run_id} has no artifact {artifact_path}: "
                                            "pass a finished run of this study") from None
        raise


def download_uri(uri: str, dst: str | Path) -> Path:
    """Whatever an artifact URI names (s3://, gs://, ... with their own packages and
    credentials; mlflow-artifacts:/ and runs:/ through the tracking server), into `dst`."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def run_url(experiment_id: str, run_id: str, uri: str | None = None) -> str:
    """One run's page in the MLflow UI, in the model-training view (see `runs_url`)."""
    return f"{(uri or tracking_uri()).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def runs_url(experiment_id: str, uri: str | None = None) -> str:
    """The experiment's runs in the MLflow UI. The link names the UI's model-training view:
    without it a fresh browser opens every experiment on its GenAI overview (the UI keeps
    that choice per browser; the experiment's kind tag does not change it)."""
    return f"{(uri or tracking_uri()).rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
