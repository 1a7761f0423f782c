"""MLflow Projects: an entry point's run made here, run as a `mlflow run` process, or
submitted to Kubernetes. What to run, and when to reuse, is `prunelab.pipeline`'s."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prunelab.errors import PrunelabError, first_line
from prunelab.tracking.connection import client
from prunelab.tracking.query import experiment_id, find_runs
from prunelab.tracking.run import PARENT_RUN_ID, Run, fail

ENTRY_POINT = "mlflow.project.entryPoint"  # MLflow's tag: which entry point a project run ran


def create_step_run(project: Path, experiment: str, entry_point: str, params: dict[str, str],
                    parent_id: str | None, tags: dict[str, str]) -> str:
    """The run `mlflow run -e <entry point>` would create: the same tags (entry point, source,
    git commit, user) and the entry point's parameters, under `parent_id`, plus `tags`."""
    from mlflow.projects.utils import get_or_create_run
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND

    exp_id = experiment_id(experiment) or client().create_experiment(experiment)
    created = get_or_create_run(None, str(project), exp_id, str(project), None, entry_point, params)
    Run(created.info.run_id).set_tags({MLFLOW_PROJECT_BACKEND: "local", **tags,
                                       **({PARENT_RUN_ID: parent_id} if parent_id else {})})
    return created.info.run_id


def run_entry_point(project: Path, experiment: str, entry_point: str, params: dict[str, str]) -> str:
    """`mlflow run -e <entry point>` as a process of its own, waited for; returns its run id."""
    import mlflow.projects

    # The step runs `python -m prunelab ...`: make that `python` this interpreter
    # even when the virtual environment was not activated.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    try:
        submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                        env_manager="local", experiment_name=experiment, synchronous=True)
    except Exception as exc:
        raise PrunelabError(f"step {entry_point} ({params}) failed: {str(exc).splitlines()[0]}; "
                            "its own error is printed above") from None
    return submitted.run_id


def submit_to_kubernetes(project: Path, experiment: str, entry_point: str, params: dict[str, str], parent_id: str,
                         backend_config: dict):
    """Submit one entry point as a Kubernetes Job through MLflow, not waiting for it; returns
    MLflow's submitted run (`run_id`, `wait()`, `cancel()`). A submission that fails leaves
    no run RUNNING (MLflow makes the step's run before it builds and submits anything)."""
    import mlflow.projects

    try:
        return mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                   experiment_name=experiment, backend="kubernetes",
                                   backend_config=backend_config, synchronous=False)
    except Exception as exc:
        why = f"not submitted: {first_line(exc)}"
        for r in find_runs(experiment, f"attributes.status = 'RUNNING' and tags.`{PARENT_RUN_ID}` = '{parent_id}' "
                                       f"and tags.`{ENTRY_POINT}` = '{entry_point}'", finished_only=False):
            fail(r.info.run_id, why)
        raise PrunelabError(f"step {entry_point} could not be submitted to Kubernetes: {first_line(exc)}") from None

