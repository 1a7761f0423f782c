"""Criteria compared (kind `criteria_comparison`): every criterion pruned to every operating
point from the same trained network, fine-tuned with the same budget, one trade-off report.

| entry point | does | reads | logs |
|---|---|---|---|
| `train` | trains the model from scratch, or evaluates the pretrained weights of `compare.weights` | the data (and the weights file) | as filter_pruning's `train` (pretrained: step 0 only); the model |
| `prune` | filter_pruning's `prune` with the step's own `prune.method` and `prune.target` (= 1 / `compare.ratio`) | the trial's train run | as filter_pruning's `prune`; params `prune.method`, `prune.target`, `compare.ratio` |
| `finetune` | trains the pruned model `finetune.epochs` more (the same budget for every criterion and point); for a method of `compare.distill`, a second finetune run distils from the unpruned network | its prune run | as filter_pruning's `finetune`; the same three params (the distilled one: `finetune.distill_temperature`, `teacher_model`) |

A trial's chain is train, then for every method of `compare.methods` and every
compression ratio of `compare.ratios` a prune step and its finetune step, each
with its own settings (`common.Step.overrides`): so each is its own run with its
own step key and LoggedModel, reused on a second run of the study, and MLflow's
chart view plots accuracy against `compare.ratio` by `prune.method`. The ratio
counts what `prune.target_kind` counts (params or macs). No model is registered:
a trial delivers one network per method and point, not one; the table names the
best method at each point, whose finetune runs hold the models.

The report draws, from the finetune runs, test accuracy (mean, min-max over
trials) against the compression ratio by parameters and by MACs (log2 axes) and
against the measured latency, one curve per method, the unpruned network as a
reference line, `random` as the baseline and the Pareto front marked; the table
has a row per point and method (mean, min, max, std, the best method marked).
Recovery is compared too: a method named in `compare.distill` is also
fine-tuned with distillation from the unpruned network (Hinton et al. 2015) at
every ratio, from the same prune run and with the same budget, and drawn as its
own curve, `<method> + distillation`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np
import pandas as pd
from torch import nn

from prunelab import paths, reporting
from prunelab.config import StudyConfig, TrainConfig, setting
from prunelab.data.base import ImageData
from prunelab.errors import ConfigError, PrunelabError
from prunelab.models import base
from prunelab.pruning import criteria
from prunelab.studies import common, filter_pruning, stages
from prunelab.tracking import query
from prunelab.tracking.run import Run
from prunelab.train import evaluate

BASELINE = "random"  # the control every criterion should beat (ShrinkBench draws it in every figure)
UNPRUNED = "unpruned"
DISTILLED = "+ distillation"  # what a distilled variant's curve and rows add to its method's name


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple = setting("the criteria compared (prune.method values), each pruned to every ratio",
                             ("taylor", "l1", "l2", "fpgm", "random"))
    ratios: tuple = setting("the operating points: compression ratios (original / pruned) of what "
                            "prune.target_kind counts (params or macs), each > 1", (2.0, 4.0, 8.0, 16.0))
    ratio: float = setting("this run's operating point (set by main per step; 1: the unpruned network)", 1.0)
    weights: str = setting("a pretrained weights file every trial starts from instead of training ('': train)", "")
    distill: tuple = setting("criteria also fine-tuned with distillation from the unpruned network (Hinton et al. "
                             "2015) at every ratio, each drawn as its own curve '<method> + distillation' ([]: none)", ())
    distill_temperature: float = setting("the distilled variant's finetune.distill_temperature", 4.0)
    distill_weight: float = setting("the distilled variant's finetune.distill_weight (its share of the loss)", 0.5)

    def __post_init__(self):
        for name in ("methods", "ratios", "distill"):  # a list from a preset or override, kept as a tuple
            value = getattr(self, name)
            if isinstance(value, (list, str, int, float)):
                object.__setattr__(self, name, tuple(value) if isinstance(value, list) else (value,))

    def validate(self, where: str = "compare") -> None:
        if not self.methods:
            raise ConfigError(f"{where}.methods is empty: name the criteria to compare, e.g. "
                              f"{where}.methods=[{','.join(sorted(criteria.CRITERIA))}]")
        if len(set(self.methods)) < len(self.methods):
            raise ConfigError(f"{where}.methods names {_first_twice(self.methods)!r} twice: name each criterion once")
        if not self.ratios:
            raise ConfigError(f"{where}.ratios is empty: give the compression ratios to compare at, e.g. "
                              f"{where}.ratios=[2,4,8,16]")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in self.ratios):
            raise ConfigError(f"{where}.ratios must be numbers (compression ratios such as 2, 4, 8), got {list(self.ratios)}")
        if any(r <= 1 for r in self.ratios):
            raise ConfigError(f"{where}.ratios must each be > 1 (original / pruned), got {min(self.ratios):g}")
        if len({float(r) for r in self.ratios}) < len(self.ratios):
            raise ConfigError(f"{where}.ratios names {_first_twice([float(r) for r in self.ratios]):g} twice: "
                              "give each operating point once")
        stray = [m for m in self.distill if m not in self.methods]
        if stray:
            raise ConfigError(f"{where}.distill names {stray[0]!r}, which {where}.methods does not compare: name "
                              f"criteria of {where}.methods ({', '.join(self.methods)})")
        if len(set(self.distill)) < len(self.distill):
            raise ConfigError(f"{where}.distill names {_first_twice(self.distill)!r} twice: name each criterion once")
        if self.distill and not (self.distill_temperature > 0 and 0 < self.distill_weight <= 1):
            raise ConfigError(f"{where}.distill needs {where}.distill_temperature > 0 and {where}.distill_weight in "
                              f"(0, 1], got {self.distill_temperature:g} and {self.distill_weight:g}")
        if self.ratio < 1:
            raise ConfigError(f"{where}.ratio must be >= 1 (1: the unpruned network), got {self.ratio}")


def _first_twice(values) -> object:
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


# --------------------------------------------------------------------------- the chain

def target_of(ratio: float) -> float:
    return 1.0 / float(ratio)


def point_settings(method: str, ratio: float) -> tuple[str, ...]:
    """The settings of one method at one operating point: what its prune and finetune steps change."""
    return (f"prune.method={method}", f"prune.target={target_of(ratio)!r}", f"compare.ratio={float(ratio)!r}")


def distilled_settings(cfg: StudyConfig) -> tuple[str, ...]:
    """What the distilled variant's finetune step changes besides its point's settings."""
    return (f"finetune.distill_temperature={cfg.compare.distill_temperature!r}",
            f"finetune.distill_weight={cfg.compare.distill_weight!r}")


def steps(cfg: StudyConfig) -> list[common.Step]:
    """train, then a prune and a finetune step per method and operating point, all reading that
    train run; a method of `compare.distill` has a second finetune step of the same prune run."""
    out = [common.Step("train")]
    for method in cfg.compare.methods:
        for ratio in cfg.compare.ratios:
            own = point_settings(method, ratio)
            out.append(common.Step("prune", 0, own, f"prune {method} x{ratio:g}"))
            pruned = len(out) - 1
            out.append(common.Step("finetune", pruned, own, f"finetune {method} x{ratio:g}"))
            if method in cfg.compare.distill:
                out.append(common.Step("finetune", pruned, own + distilled_settings(cfg),
                                       f"finetune {method} x{ratio:g} {DISTILLED}"))
    return out


# --------------------------------------------------------------------------- checks

def check_methods(cfg: StudyConfig) -> None:
    unknown = [m for m in cfg.compare.methods if m not in criteria.CRITERIA]
    if unknown:
        raise ConfigError(f"unknown criterion {unknown[0]!r} in compare.methods: choose from "
                          f"{', '.join(sorted(criteria.CRITERIA))}")
    if cfg.compare.distill and stages.distilling(cfg.finetune):
        raise ConfigError("finetune.distill_temperature distils every fine-tuning already, so compare.distill has no "
                          "plain variant to compare with: set finetune.distill_temperature=0 or compare.distill=[]")


def check_points(cfg: StudyConfig, model: nn.Module, data: ImageData) -> None:
    """Each criterion finds what it needs in the network (bn_scale: a BatchNorm after each conv)
    and every operating point is reachable: refused in one line before anything trains."""
    example = data.normalise(data.test_x[:2])
    smallest = 1.0
    for method in cfg.compare.methods:
        try:
            _, smallest = filter_pruning.thinnest(model, example, replace(cfg.prune, method=method))
        except PrunelabError as exc:
            raise type(exc)(f"compare.methods: {exc}") from None
    largest = 1.0 / smallest
    beyond = [r for r in cfg.compare.ratios if r > largest]
    if beyond:
        raise ConfigError(f"compare.ratios: {max(beyond):g} cannot be reached by {cfg.model} "
                          f"(one filter per layer leaves 1/{largest:.2f} of its {cfg.prune.target_kind}): "
                          f"the largest ratio it can reach is {largest:.2f}")


# --------------------------------------------------------------------------- stages

def _rename(run_id: str, name: str) -> str:
    """filter_pruning's stages name their runs by trial only; here a trial has one per point."""
    Run(run_id).set_tags({"mlflow.runName": name})
    return run_id


def _point(cfg: StudyConfig) -> str:
    return f"{cfg.prune.method}-x{cfg.compare.ratio:g}"


def variant(method: str, distilled: bool) -> str:
    """A curve's name: the method, and whether its fine-tuning distilled."""
    return f"{method} {DISTILLED}" if distilled else method


def train(cfg: StudyConfig, trial: int) -> str:
    """Train the network, or evaluate the pretrained one (`compare.weights`): the unpruned reference."""
    if not cfg.compare.weights:
        return stages.train(cfg, trial, UNPRUNED)
    data = common.load_data(cfg)
    model = common.load_model(cfg.compare.weights, cfg, data)
    with common.stage_run(cfg, trial, "train", f"pretrained-t{trial}", UNPRUNED,
                          params={"input_model": cfg.compare.weights}, data=data) as run:
        stages.log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_BEFORE)
        test = evaluate(model, data.test_x, data.test_y, data.normalise)
        run.log_metrics({"fraction_remaining": 1.0, "test_loss": test["loss"], "test_accuracy": test["accuracy"]}, step=0)
        stages.log_model(run, model, data, paths.MODEL, step=0, final=True, carry=stages.UNCHANGED_BY_TRAINING)
        return run.run_id


def prune(cfg: StudyConfig, trial: int, model_ref: str) -> str:
    return _rename(filter_pruning.prune(cfg, trial, model_ref), f"prune-{_point(cfg)}-t{trial}")


def finetune(cfg: StudyConfig, trial: int, model_ref: str) -> str:
    kd = "-kd" if stages.distilling(cfg.finetune) else ""
    return _rename(stages.finetune(cfg, trial, model_ref, cfg.prune.method), f"finetune-{_point(cfg)}{kd}-t{trial}")


# --------------------------------------------------------------------------- report

# Settings a point's runs change for themselves, and those choosing the points: a run is
# drawn when the rest match.
PER_POINT = frozenset({"prune.method", "prune.target", "compare.ratio", "compare.methods", "compare.ratios",
                       "finetune.distill_temperature", "finetune.distill_weight", "compare.distill",
                       "compare.distill_temperature", "compare.distill_weight"})
# (column, axis label, figure file, what the title says the accuracy is drawn against)
AXES = (("params_ratio", "compression ratio by parameters (original / pruned, log2 axis)", "accuracy_vs_compression.png",
         "compression"),
        ("macs_ratio", "theoretical speed-up: MACs ratio (original / pruned, log2 axis)", "accuracy_vs_speedup.png",
         "theoretical speed-up"),
        ("latency_ms", "measured latency, ms per image (batch 1, one CPU thread)", "accuracy_vs_latency.png",
         "measured latency"))


def points(cfg: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, method and ratio of the fine-tuned networks; one row per trial of the
    unpruned ones), with test accuracy, params, MACs and latency, and the ratios to the unpruned."""
    trained = reporting.stage_runs(cfg, "train", PER_POINT)
    if not trained:
        raise reporting.no_runs(cfg, "train runs")
    found = reporting.find_study_runs(cfg, f"tags.{paths.TAG_STAGE} = 'finetune'", PER_POINT)
    wanted = {(variant(m, kd), float(r)) for m in cfg.compare.methods for r in cfg.compare.ratios
              for kd in ((False, True) if m in cfg.compare.distill else (False,))}
    latest = reporting.latest_per(found, ("prune.method", "compare.ratio", "finetune.distill_temperature",
                                          "finetune.distill_weight"))
    tuned = {(trial, variant(m, _distilled(t, w)), float(r)): run for (trial, m, r, t, w), run in latest.items()}
    tuned = {k: run for k, run in tuned.items() if k[1:] in wanted}
    if not tuned:
        raise reporting.no_runs(cfg, "finetune runs")
    reporting.drew([r.info.run_id for r in (*trained.values(), *tuned.values())])
    metrics = ("test_accuracy", "params", "macs", "latency_ms")
    reference = pd.DataFrame([{"trial": t, **{m: r.data.metrics.get(m, np.nan) for m in metrics}}
                              for t, r in trained.items()])
    # A train run times nothing; every prune run times its input, the unpruned network, at round 0.
    pruned = reporting.find_study_runs(cfg, f"tags.{paths.TAG_STAGE} = 'prune'", PER_POINT)
    first_prune = reporting.latest_per_trial(pruned)
    reference["latency_ms"] = [_first_value(first_prune.get(t), "latency_ms") for t in reference.trial]
    rows = pd.DataFrame([{"trial": t, "method": m, "ratio": float(r), **{k: run.data.metrics.get(k, np.nan) for k in metrics}}
                         for (t, m, r), run in tuned.items()])
    ref = reference.set_index("trial")
    rows["params_ratio"] = rows.trial.map(ref.params) / rows.params
    rows["macs_ratio"] = rows.trial.map(ref.macs) / rows.macs
    return rows, reference


def _distilled(temperature: str | None, weight: str | None) -> bool:
    return bool(float(temperature or 0) and float(weight or 0))


def curves(cfg: StudyConfig) -> list[str]:
    """The curves in the order drawn: each method, then its distilled variant where there is one."""
    return [variant(m, kd) for m in cfg.compare.methods for kd in ((False, True) if m in cfg.compare.distill else (False,))]


def _first_value(run, metric: str) -> float:
    if run is None:
        return np.nan
    history = query.metric_history(run.info.run_id, metric)
    return min(history)[1] if history else np.nan


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per operating point and method: the trials' mean, min, max and std of test accuracy and
    the means of the sizes."""
    acc = rows.groupby(["ratio", "method"]).test_accuracy.agg(["count", "mean", "min", "max", "std"])
    acc.columns = ["trials", "test_accuracy_mean", "test_accuracy_min", "test_accuracy_max", "test_accuracy_std"]
    sizes = rows.groupby(["ratio", "method"])[["params_ratio", "macs_ratio", "latency_ms"]].mean()
    return sizes.join(acc).reset_index()


def pareto(x: np.ndarray, y: np.ndarray, larger_x_better: bool = True, tolerance: float = 0.01) -> np.ndarray:
    """Indices of the points no other point beats on both axes (y: larger is better), along x.
    x values within `tolerance` (relative) count as equal: pruning stops a hair past its target,
    and 16.10x against 16.09x is no reason to keep a less accurate network on the front.
    Written here: a few dozen points, and no installed library marks a two-axis front."""
    def at_least(a: float, b: float) -> bool:  # a is as good as b on x
        return a >= b * (1 - tolerance) if larger_x_better else a <= b * (1 + tolerance)

    def better(a: float, b: float) -> bool:  # a is clearly better than b on x
        return not at_least(b, a)

    front = [i for i in range(len(x))
             if not any(j != i and at_least(x[j], x[i]) and y[j] >= y[i] and (y[j] > y[i] or better(x[j], x[i]))
                        for j in range(len(x)))]
    return np.array(sorted(front, key=lambda i: x[i]), dtype=int)


def trade_off_figure(cfg: StudyConfig, rows: pd.DataFrame, reference: pd.DataFrame, axis: str, label: str,
                     against: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8.4, 5.0))
    means = []
    for method in curves(cfg):
        sub = rows[rows.method == method]
        if sub.empty:
            continue
        band = sub.groupby("ratio").agg(step=(axis, "mean"), mean=("test_accuracy", "mean"), min=("test_accuracy", "min"),
                                        max=("test_accuracy", "max"), count=("test_accuracy", "count")).reset_index()
        style = {"linestyle": "--", "color": "grey"} if method == BASELINE else \
            {"linestyle": "-."} if method.endswith(DISTILLED) else {}
        name = f"{method} (baseline)" if method == BASELINE else method
        reporting.plot_band(ax, band.sort_values("step"), f"{name}, {int(band['count'].max())} trials", say_band=False, **style)
        means.append(band.assign(method=method))
    acc = reference.test_accuracy
    ax.axhline(acc.mean(), color="black", linewidth=1, linestyle=":",
               label=f"{UNPRUNED}: {acc.mean():.4f} (min {acc.min():.4f}, max {acc.max():.4f})")
    if axis == "latency_ms" and reference.latency_ms.notna().any():
        ax.plot([reference.latency_ms.mean()], [acc.mean()], "k*", markersize=12, label=f"{UNPRUNED} network")
    if means:
        every = pd.concat(means, ignore_index=True).dropna(subset=["step"])
        front = pareto(every.step.to_numpy(), every["mean"].to_numpy(), larger_x_better=axis != "latency_ms")
        ax.plot(every.step.to_numpy()[front], every["mean"].to_numpy()[front], "o", markersize=13, markerfacecolor="none",
                markeredgecolor="black", linestyle="-", color="black", linewidth=0.6, alpha=0.7, label="Pareto front (means)")
    if axis != "latency_ms":
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 2, 4, 8, not 2^1, 2^2, 2^3
    return reporting.finish(fig, ax, label, "test accuracy after fine-tuning (mean, min-max over trials)",
                            f"{cfg.study}: accuracy against {against}", 8, legend=reporting.LEGEND_BELOW)


def table(rows: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """The unpruned row, then per operating point a row per method, the best one marked `best`."""
    out = summary(rows)
    best = out.loc[out.groupby("ratio").test_accuracy_mean.idxmax()]
    out["best"] = np.where(out.index.isin(best.index), "best", "")
    baseline = out[out.method == BASELINE].set_index("ratio").test_accuracy_mean
    out["vs_random"] = out.test_accuracy_mean - out.ratio.map(baseline)
    acc = reference.test_accuracy
    top = pd.DataFrame([{"ratio": 1.0, "method": UNPRUNED, "params_ratio": 1.0, "macs_ratio": 1.0,
                         "latency_ms": reference.latency_ms.mean(), "trials": len(acc), "test_accuracy_mean": acc.mean(),
                         "test_accuracy_min": acc.min(), "test_accuracy_max": acc.max(), "test_accuracy_std": acc.std(),
                         "best": "", "vs_random": np.nan}])
    return pd.concat([top, out], ignore_index=True)


def report(cfg: StudyConfig) -> common.Report:
    rows, reference = points(cfg)
    figures = {name: trade_off_figure(cfg, rows, reference, axis, label, against) for axis, label, name, against in AXES
               if rows[axis].notna().any()}
    return figures, table(rows, reference)


KIND = common.StudyKind(
    name="criteria_comparison",
    entry_points={
        "train": common.EntryPoint(train, "train the model (or evaluate compare.weights): the unpruned reference"),
        "prune": common.EntryPoint(prune, "prune with the step's prune.method to its compare.ratio", reads_model=True),
        "finetune": common.EntryPoint(finetune, "fine-tune a pruned model with the shared budget", reads_model=True),
    },
    steps=steps,
    report=report,
    sections={"prune": filter_pruning.PruneConfig, "finetune": TrainConfig, "compare": CompareConfig},
    deliverable=None,
    model_protocol=base.FilterPrunable,
    any_network=True,
    names=(common.FINETUNE_OPTIMIZER, common.FINETUNE_PRECISION),
    checks=(check_methods,),
    model_checks=(check_points,),
    plan_settings=("compare.methods", "compare.ratios", "compare.distill", "compare.distill_temperature",
                   "compare.distill_weight"),
)
