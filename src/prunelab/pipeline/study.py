"""`main`: a whole study as a chain of the MLproject entry points, then the report.

The study kind says which steps make a trial (`kind.steps`). Each step is its
own MLflow run, made as `mlflow run -e <entry point>` makes it (parameters,
project tags, nested under the `main` run); by default it runs in this process,
with `steps="processes"` as a `mlflow run` process of its own. A step whose
resolved settings, input runs and code version match a finished run is reused,
like MLflow's multistep example. Trials run side by side in worker processes
when `parallel_trials` allows. The study's settings are built and checked once,
by the caller, and passed down as the frozen config (to worker processes too). After the trials, each trial's deliverable model
(`kind.deliverable`) becomes a version of the registered model named after the
study, the best one aliased `champion`.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from prunelab import paths, studies
from prunelab.config import StudyConfig
from prunelab.errors import ConfigError, ModelError
from prunelab.hardware import default_parallel_trials
from prunelab.pipeline import kubernetes
from prunelab.pipeline.abandoned import fail_abandoned
from prunelab.pipeline.steps import run_step, step_key
from prunelab.studies.common import Step, StudyKind
from prunelab.tracking import connection, lineage, lock, models, query
from prunelab.tracking.run import NOTE, Run, main_run

STEP_RUNNERS = ("in-process", "processes")
# Settings that change how a study is executed, not what a step computes.
EXECUTION_SETTINGS = ("trials", "parallel_trials")


@dataclass(frozen=True)
class StudyArgs:
    """What `main` was asked to run: the MLproject parameters of its steps."""

    study: str
    overrides: str = ""
    data_dir: str = ""
    out_dir: str = ""
    steps: str = "in-process"

    def __post_init__(self):
        if self.steps not in STEP_RUNNERS:
            raise ConfigError(f"unknown step runner {self.steps!r}: choose one of {', '.join(STEP_RUNNERS)}")

    def command(self, tracking_uri: str | None = None) -> str:
        """`prunelab run` with these parameters (and server): the command that makes this study's runs."""
        words = ["prunelab", "run", "--study", self.study]
        words += ["--overrides", self.overrides] if self.overrides.strip() else []
        words += ["--data-dir", self.data_dir] if self.data_dir else []
        words += ["--tracking-uri", tracking_uri] if tracking_uri else []
        return shlex.join(words)

    def config(self) -> StudyConfig:
        """The settings a step resolves: what `prunelab <entry point>` builds from these parameters."""
        extra = [f"data.data_dir={self.data_dir}"] if self.data_dir else []
        return studies.load_config(self.study, self.overrides.split() + extra)


def run_study(args: StudyArgs, cfg: StudyConfig, cluster: dict | None = None) -> str:
    """Every trial's chain, then the report; returns the report run id. `cfg` is what
    `args.config()` builds, built once by the caller. With `cluster` (a checked Kubernetes
    backend config, `kubernetes.kubernetes_backend`) the steps run as Kubernetes Jobs
    through MLflow Projects; the registry and the report run here. One `main` of a study
    at a time per server: another one running refuses this one, in one line, before any run."""
    if cluster is None and not paths.is_uri(cfg.data.data_dir):
        # The data and the model checked here, before any run (a cluster's data lies in its
        # containers, and a URI would be downloaded twice): not in a step's run that then fails.
        studies.get(cfg.kind).check_inputs(cfg)
    abandoned = fail_abandoned(cfg.study)  # before anything is reused
    if abandoned:
        print(f"prunelab: marked {len(abandoned)} abandoned RUNNING run(s) FAILED", flush=True)
    with lock.held(cfg.study):
        return _run_held(args, cfg, cluster)


def _run_held(args: StudyArgs, cfg: StudyConfig, cluster: dict | None) -> str:
    """`run_study`'s work, while this process holds the study's lock."""
    workers = cfg.parallel_trials or default_parallel_trials(cfg.device)
    kind = studies.get(cfg.kind)
    chain = kind.chain_of(cfg)
    shown = [step.label for step in chain]
    shown = shown if len(shown) <= 6 else [*shown[:3], f"… ({len(shown) - 4} steps) …", shown[-1]]
    description = (f"**main** of study `{cfg.study}` ({cfg.kind}): {cfg.trials} trials of "
                   f"{' → '.join(shown)}, then the report.")
    with main_run(cfg.study, {paths.TAG_STUDY: cfg.study, paths.TAG_STAGE: "main"}, description) as main:
        trials = range(cfg.trials)
        if cluster is not None:
            chains = run_trials_on_cluster(args, cfg, main.run_id, cluster)
        elif workers > 1 and cfg.trials > 1:
            # Fresh interpreters (spawn): a forked copy of this process would share its MLflow state.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, cfg.trials), mp_context=context) as pool:
                threads = max(1, (os.cpu_count() or 1) // workers)  # the cores shared out, not each worker on all
                done = [pool.submit(run_trial, args, cfg, trial, main.run_id, connection.tracking_uri(), threads)
                        for trial in trials]
                chains = [future.result() for future in done]
        else:
            chains = [run_trial(args, cfg, trial, main.run_id) for trial in trials]
        lineage.copy_dataset_inputs(main.run_id, [run_id for run_ids in chains for run_id in run_ids])
        register(cfg, kind, chain, chains)
        report_params = {"study": args.study, "overrides": args.overrides, "out_dir": args.out_dir or f"reports/{cfg.study}"}
        report = (lambda: studies.report(cfg, report_params["out_dir"], args.command())) if args.steps == "in-process" else None
        report_id = run_step(cfg.study, "report", report_params, call=report, parent_id=main.run_id)
        show_result(main, report_id, description)
        experiment = query.experiment_of(main.run_id)
        print(f"prunelab: the study's result in the MLflow UI: {query.run_url(experiment, main.run_id)}\n"
              f"prunelab: its runs: {query.runs_url(experiment)}", flush=True)
        return report_id


def show_result(main: Run, report_id: str, description: str) -> None:
    """The report's numbers, figures and table on `main` too: the run a user finds first (the
    one row of the collapsed run list, the run the printed link opens) shows the study's
    result, in its metrics, its charts, its artifacts and its description, with nothing to
    expand or follow."""
    report = query.get_run(report_id)
    main.log_metrics(dict(report.data.metrics), step=0, model_linked=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = query.download(report_id, paths.REPORT_DIR, tmp)
        for path in sorted(folder.iterdir()):
            main.log_file(path, paths.REPORT_DIR)
        table = folder / paths.REPORT_MARKDOWN
        result = table.read_text() if table.is_file() else ""
    main.set_tags({NOTE: f"{description}\n\n{result}" if result else description})


def run_trial(args: StudyArgs, cfg: StudyConfig, trial: int, parent_id: str, tracking_uri: str | None = None,
              threads: int | None = None) -> list[str]:
    """One trial's chain of steps; returns their run ids. Also the body of a worker process."""
    if tracking_uri is not None:  # in a worker process
        connection.connect(tracking_uri)
        torch.set_num_threads(threads or torch.get_num_threads())
    kind = studies.get(cfg.kind)
    run_ids: list[str] = []
    chain = kind.chain_of(cfg)
    for number, step in enumerate(chain, 1):
        # Which step is running, also in a log: a comparison's steps all open runs named alike.
        print(f"prunelab: trial {trial}, step {number}/{len(chain)}: {step.label}", flush=True)
        model_ref = run_ids[step.source] if step.source is not None else None
        step_cfg = studies.step_config(cfg, step.overrides)
        params, key = step_params(args, step, trial, model_ref, step_settings(kind, step_cfg))
        call = None
        if args.steps == "in-process":
            def call(entry=step.entry, step_cfg=step_cfg, model_ref=model_ref):
                return kind.run(entry, step_cfg, trial, model_ref)
        run_ids.append(run_step(cfg.study, step.entry, params, key=key, call=call, parent_id=parent_id))
    return run_ids


def step_settings(kind: StudyKind, cfg: StudyConfig) -> dict:
    """The settings that say what a step computes (`cfg`: with the step's own applied): not how
    the study is executed, nor which steps its chain has."""
    left_out = {*EXECUTION_SETTINGS, *kind.plan_settings}
    return {k: v for k, v in cfg.flat().items() if k not in left_out}


def step_params(args: StudyArgs, step: Step, trial: int, model_ref: str | None,
                settings: dict) -> tuple[dict[str, str], str]:
    """A step's MLproject parameters and its step key (what makes two runs of it the same).
    The step's own settings follow the study's in `overrides`, so a step run as a process of
    its own resolves the settings an in-process one gets."""
    overrides = " ".join([args.overrides.strip(), *step.overrides]).strip() if step.overrides else args.overrides
    params = {"study": args.study, "overrides": overrides, "data_dir": args.data_dir, "trial": str(trial)}
    if model_ref is not None:
        params["model_uri"] = model_ref
    return params, step_key(step.entry, settings, {"trial": trial, "model_uri": model_ref})


def run_trials_on_cluster(args: StudyArgs, cfg: StudyConfig, parent_id: str, config: dict) -> list[list[str]]:
    """Every trial's chain as Kubernetes Jobs: each step of all the trials is submitted at
    once (MLflow, not waiting), then waited for, since a trial's next step reads the run
    its previous one made. Finished steps are reused as in `run_trial`."""
    kind = studies.get(cfg.kind)
    project = kubernetes.kubernetes_project(config)
    chains: list[list[str]] = [[] for _ in range(cfg.trials)]
    for step in kind.chain_of(cfg):
        settings = step_settings(kind, studies.step_config(cfg, step.overrides))
        steps = [(step.entry, *step_params(args, step, trial, run_ids[step.source] if step.source is not None else None,
                                           settings))
                 for trial, run_ids in enumerate(chains)]
        for run_ids, run_id in zip(chains, kubernetes.run_on_cluster(cfg.study, steps, parent_id, project, config)):
            run_ids.append(run_id)
    return chains


def deliverable_runs(kind: StudyKind, steps: list[Step], chains: list[list[str]]) -> dict[int, str]:
    """Trial -> the run holding the model that trial delivers: the last step of the
    kind's deliverable entry point in its chain (none for a kind without one)."""
    picks = [i for i, step in enumerate(steps) if step.entry == kind.deliverable]
    return {trial: chain[picks[-1]] for trial, chain in enumerate(chains)} if picks else {}


def register(cfg: StudyConfig, kind: StudyKind, steps: list[Step], chains: list[list[str]]) -> str | None:
    """Each trial's deliverable model as a version of the registered model `cfg.study`,
    tagged with its trial, size and accuracy; the most accurate gets the alias
    `champion`. Accuracy on the validation split chooses when every model has one:
    choosing on the test set would make the champion's test number optimistic.
    Returns the champion's version."""
    versions: dict[str, dict[str, float]] = {}
    for trial, run_id in deliverable_runs(kind, steps, chains).items():
        model_id = models.logged_model_id(run_id)
        if model_id is None:
            raise ModelError(f"trial {trial}'s {kind.deliverable} run {run_id} logged no final model to register")
        metrics = models.logged_model_metrics(model_id)
        tags = {"trial": trial, "run_id": run_id,
                **{k: _number(metrics[k]) for k in ("params", "fraction_remaining", "val_accuracy", "test_accuracy")
                   if k in metrics}}
        version = models.register(cfg.study, run_id, tags)
        versions[version] = metrics
    if not versions:
        return None
    chosen_on = "val_accuracy" if all("val_accuracy" in m for m in versions.values()) else "test_accuracy"
    champion = max(versions, key=lambda v: (versions[v].get(chosen_on, float("-inf")), -int(v)))  # ties: the earliest
    models.set_alias(cfg.study, paths.CHAMPION, champion, chosen_on=chosen_on)
    shown = "validation" if chosen_on == "val_accuracy" else "test (the study holds out no validation split)"
    print(f"prunelab: registered {len(versions)} models as {cfg.study!r}; {paths.CHAMPION} is version {champion}, "
          f"the most accurate on the {shown} data (models:/{cfg.study}@{paths.CHAMPION})", flush=True)
    return champion


def _number(value: float) -> str:
    """A count as a whole number (71034, not 71034.0), a fraction with its digits."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.6g}"
