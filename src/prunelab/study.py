"""`main`: a whole study as a chain of the MLproject entry points, then the report.

The study kind says which steps make a trial (`kind.steps`); tracking runs
each one (as `mlflow run -e <entry point>` would) or reuses a finished run of
it with the same parameters and code commit, like MLflow's multistep example.
"""

from __future__ import annotations

from prunelab import paths, studies, tracking


def run_study(study: str, overrides: str = "", data_dir: str = "", out_dir: str = "") -> str:
    """Every trial's chain, then the report; returns the report run id."""
    cfg = studies.load_config(study, overrides)
    steps = studies.get(cfg.kind).steps(cfg)
    with tracking.main_run(cfg.study, {paths.TAG_STUDY: cfg.study, paths.TAG_STAGE: "main"}):
        base = {"study": study, "overrides": overrides, "data_dir": data_dir}
        for trial in range(cfg.trials):
            run_ids: list[str] = []
            for entry, source in steps:
                params = {**base, "trial": str(trial)}
                if source is not None:
                    params["model_uri"] = run_ids[source]
                run_ids.append(tracking.run_step(cfg.study, entry, params))
        report_params = {"study": study, "overrides": overrides, "out_dir": out_dir or f"reports/{cfg.study}"}
        return tracking.run_step(cfg.study, "report", report_params, reuse=False)
