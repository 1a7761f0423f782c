"""`main`: a whole study as a chain of the MLproject entry points, then the report.

The study kind says which steps make a trial (`kind.steps`); tracking runs
each one (as `mlflow run -e <entry point>` would) or reuses a finished run of
it with the same parameters and code commit, like MLflow's multistep example.
After the trials, each trial's deliverable model (`kind.deliverable`) becomes a
version of the registered model named after the study, the best one aliased
`champion`.
"""

from __future__ import annotations

from prunelab import paths, studies, tracking
from prunelab.config import StudyConfig
from prunelab.errors import ModelError
from prunelab.studies.common import Step, StudyKind


def run_study(study: str, overrides: str = "", data_dir: str = "", out_dir: str = "") -> str:
    """Every trial's chain, then the registry and the report; returns the report run id."""
    cfg = studies.load_config(study, overrides)
    kind = studies.get(cfg.kind)
    steps = kind.steps(cfg)
    description = (f"**main** of study `{cfg.study}` ({cfg.kind}): {cfg.trials} trials of "
                   f"{' → '.join(entry for entry, _ in steps)}, then the report.")
    with tracking.main_run(cfg.study, {paths.TAG_STUDY: cfg.study, paths.TAG_STAGE: "main"}, description) as main:
        base = {"study": study, "overrides": overrides, "data_dir": data_dir}
        chains: list[list[str]] = []
        for trial in range(cfg.trials):
            run_ids: list[str] = []
            for entry, source in steps:
                params = {**base, "trial": str(trial)}
                if source is not None:
                    params["model_uri"] = run_ids[source]
                run_ids.append(tracking.run_step(cfg.study, entry, params))
            chains.append(run_ids)
        tracking.copy_dataset_inputs(main, [run_id for chain in chains for run_id in chain])
        register(cfg, kind, steps, chains)
        report_params = {"study": study, "overrides": overrides, "out_dir": out_dir or f"reports/{cfg.study}"}
        report_id = tracking.run_step(cfg.study, "report", report_params, reuse=False)
        print(f"prunelab: the study's runs in the MLflow UI: {tracking.runs_url(tracking.experiment_of(main.run_id))}",
              flush=True)
        return report_id


def deliverable_runs(kind: StudyKind, steps: list[Step], chains: list[list[str]]) -> dict[int, str]:
    """Trial -> the run holding the model that trial delivers: the last step of the
    kind's deliverable entry point in its chain (none for a kind without one)."""
    picks = [i for i, (entry, _) in enumerate(steps) if entry == kind.deliverable]
    return {trial: chain[picks[-1]] for trial, chain in enumerate(chains)} if picks else {}


def register(cfg: StudyConfig, kind: StudyKind, steps: list[Step], chains: list[list[str]]) -> str | None:
    """Each trial's deliverable model as a version of the registered model `cfg.study`,
    tagged with its trial, size and accuracy; the most accurate gets the alias
    `champion`. Returns the champion's version."""
    versions: dict[str, float] = {}
    for trial, run_id in deliverable_runs(kind, steps, chains).items():
        model_id = tracking.logged_model_id(run_id)
        if model_id is None:
            raise ModelError(f"trial {trial}'s {kind.deliverable} run {run_id} logged no final model to register")
        metrics = tracking.logged_model_metrics(model_id)
        tags = {"trial": trial, "run_id": run_id,
                **{k: _number(metrics[k]) for k in ("params", "fraction_remaining", "test_accuracy") if k in metrics}}
        version = tracking.register(cfg.study, run_id, tags)
        versions[version] = metrics.get("test_accuracy", float("-inf"))
    if not versions:
        return None
    champion = max(versions, key=lambda v: (versions[v], -int(v)))  # ties: the earliest trial
    tracking.set_alias(cfg.study, paths.CHAMPION, champion)
    print(f"prunelab: registered {len(versions)} models as {cfg.study!r}; {paths.CHAMPION} is version {champion} "
          f"(models:/{cfg.study}@{paths.CHAMPION})", flush=True)
    return champion


def _number(value: float) -> str:
    """A count as a whole number (71034, not 71034.0), a fraction with its digits."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.6g}"
