"""A whole study: the MLproject entry points chained with `mlflow.run`.

Like MLflow's multistep example, a step whose entry point already finished
with the same parameters (and the same code commit) is reused, not re-run.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from prunelab import config, paths, tracking
from prunelab.errors import ConfigError, PrunelabError

def chain(*entries: str) -> list[tuple[str, int | None]]:
    """A linear chain: each step reads the previous step's run."""
    return [(entry, i - 1 if i else None) for i, entry in enumerate(entries)]


def _lottery_steps(cfg):
    from prunelab import lottery

    return lottery.steps(cfg)


STAGES = {
    # kind -> cfg -> the per-trial steps: (entry point, index of the earlier step whose run it reads, or None).
    "filter_pruning": lambda cfg: chain("train", "prune", "finetune"),
    "lottery_ticket": _lottery_steps,  # one prune step per round, each followed by its re-init control
    "transfer_pruning": lambda cfg: chain("train", "prune", "finetune"),  # train = transfer on cached features
    # pretrained weights in, one sweep process per k-means seed (its points are child runs)
    "kmeans_clustering": lambda cfg: chain("prune"),
}


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
    for run in tracking.find_runs(experiment, f"tags.`mlflow.project.entryPoint` = '{entry_point}'"):
        logged = run.data.params
        # `mlflow run` logs each parameter as it put it on the command line (shell-quoted).
        if any(logged.get(k, "") not in (str(v), shlex.quote(str(v))) for k, v in params.items()):
            continue
        run_commit = run.data.tags.get("mlflow.source.git.commit")
        if commit and run_commit and run_commit != commit:
            continue
        return run
    return None


def run_step(project: Path, experiment: str, entry_point: str, params: dict[str, str], reuse: bool = True) -> str:
    import mlflow.projects

    commit = _git_commit(project)
    if reuse:
        found = already_ran(experiment, entry_point, params, commit)
        if found is not None:
            print(f"prunelab: reusing finished {entry_point} run {found.info.run_id}", flush=True)
            return found.info.run_id
    try:
        submitted = mlflow.projects.run(str(project), entry_point=entry_point, parameters=params,
                                        env_manager="local", experiment_name=experiment, synchronous=True)
    except Exception as exc:
        raise PrunelabError(f"step {entry_point} ({params}) failed: {str(exc).splitlines()[0]}; "
                            "its own error is printed above") from None
    return submitted.run_id


def run_study(study: str, overrides: str = "", data_dir: str = "", out_dir: str = "") -> str:
    """Every trial's chain, then the report; returns the report run id."""
    cfg = config.load(study, overrides)
    project = project_dir()
    if cfg.kind not in STAGES:
        raise ConfigError(f"study kind {cfg.kind!r} has no pipeline: choose one of {', '.join(STAGES)}")
    steps = STAGES[cfg.kind](cfg)
    import mlflow

    # Each step runs `python -m prunelab ...`: make that `python` this interpreter
    # even when the virtual environment was not activated.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(cfg.study)
    with mlflow.start_run(run_name="main") as main_run:
        client = tracking.Run(main_run.info.run_id)
        client.set_tags({paths.TAG_STUDY: cfg.study, paths.TAG_STAGE: "main"})
        base = {"study": study, "overrides": overrides, "data_dir": data_dir}
        for trial in range(cfg.trials):
            run_ids: list[str] = []
            for entry, source in steps:
                params = {**base, "trial": str(trial)}
                if source is not None:
                    params["model_uri"] = run_ids[source]
                run_ids.append(run_step(project, cfg.study, entry, params))
        report_params = {"study": study, "overrides": overrides, "out_dir": out_dir or f"reports/{cfg.study}"}
        return run_step(project, cfg.study, "report", report_params, reuse=False)
