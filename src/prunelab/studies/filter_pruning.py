"""Filter pruning (kind `filter_pruning`): rank filters, remove them physically, fine-tune.

| entry point | does | reads | logs |
|---|---|---|---|
| `train` | trains the model from scratch | the data | per epoch (step = epoch) train/test loss and accuracy; `params`, `macs`; `summary_before.txt`; the model |
| `prune` | ranks filters with `prune.method`, removes the lowest `prune.filters_per_step` across layers (`prune.scope=uniform`: the same share of each layer), repeats until `prune.target` remains, the last step taking only as many as reach it (fine-tuning `prune.finetune_epochs_between` epochs between steps; `prune.schedule=one_shot`: ranks once, before the first step) | a train run (or trains one itself when none is given) | per round (step = round) `params`, `macs`, `fraction_remaining`, `filters`, `filters_left.<layer>`, test loss/accuracy, `latency_ms`; `model_round_<k>` (right after round k's removal) and the final model |
| `finetune` | trains the pruned model `finetune.epochs` more | a prune run | step 0 = the pruned model, then per epoch as `train`; the final model |

`main` chains train -> prune -> finetune per trial and registers each trial's
`finetune` model, the pruned network after fine-tuning (`StudyKind.deliverable`),
as a version of the registered model named after the study. Every logged model
takes float pixels in [0, 1] (the normalisation is inside it); a run's final
model is also exported to ONNX. The report draws test accuracy and loss per
epoch, original against pruned + fine-tuned (the pruned networks before
fine-tuning marked and their worst trial written out), test accuracy against
the share of parameters removed per pruning round (`accuracy_vs_params_removed.png`),
and a size table.

The model is a registered one, which names its prunable convs itself, or any
network from a factory (`model=torchvision:NAME`, `model=PACKAGE.MODULE:FUNCTION`,
docs/models.md), whose prunable layers Torch-Pruning's dependency graph finds
(`pruning/structure.py`); `prune.ignored_layers` keeps layers whole in either.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from prunelab import measure, models, paths, progress, reporting
from prunelab.config import StudyConfig, TrainConfig, check_range, setting
from prunelab.data.base import ImageData, batches
from prunelab.errors import ConfigError, ModelError, first_line
from prunelab.models import base
from prunelab.pruning import criteria, schedule, structure, surgery
from prunelab.studies import common, stages
from prunelab.train import evaluate, fit

# What `prune.target` counts in a network: (network, the names of the layers pruning thins,
# the shape of one input) -> amount. The one place a target kind is read: the smallest
# reachable fraction, what remains after a step and what a planned step would leave.
AMOUNTS = {
    "params": lambda network, layers, shape: models.count_params(network),
    "filters": lambda network, layers, shape: sum(m.out_channels for n, m in network.named_modules() if n in layers),
    "macs": lambda network, layers, shape: measure.size(network, shape).macs,
}
TARGET_KINDS = tuple(AMOUNTS)
# prune.schedule: whether the criterion ranks again before every step.
SCHEDULES = {"iterative": True, "one_shot": False}


@dataclass(frozen=True)
class PruneConfig:
    method: str = setting("filter importance criterion: taylor (Molchanov et al. 2017, on the ranking images), l1 or "
                          "l2 (Li et al. 2017), fpgm (He et al. 2019), bn_scale (Liu et al. 2017: |gamma| of the "
                          "BatchNorm after each conv), hessian (LeCun et al. 1990, Optimal Brain Damage: w^2 times the "
                          "per-image Fisher, on the ranking images) or random (the control)", "taylor")
    filters_per_step: int = setting("filters removed per pruning step (the last takes only as many as reach "
                                    "prune.target)", 1)
    target: float = setting("stop when this fraction of the target quantity remains, in (0, 1)", 0.6)
    target_kind: str = setting("what the target counts: params, filters or macs (the multiply-accumulates of "
                               "one image)", "params")
    rank_images: int = setting("training images seen by each ranking pass of a criterion that ranks on images "
                                 "(taylor, hessian; 0: all)", 10000)
    finetune_epochs_between: int = setting("fine-tuning epochs after each pruning step but the last", 0)
    log_models_every: int = setting("log the pruned model every N steps (the last step is always logged)", 1)
    rank_batch_size: int = setting("images per forward/backward pass of a ranking pass (taylor)", 256)
    latency_repeats: int = setting("timed forward passes behind each step's latency_ms (median, batch 1, one CPU "
                                   "thread; 0: not measured)", 30)
    round_to: int = setting("keep every pruned layer's width a multiple of this (1: any width); widths that fill "
                            "the hardware's vector lanes run faster", 1)
    schedule: str = setting("iterative (rank again before every step) or one_shot (rank once, then take every step "
                            "to the target from that one ranking)", "iterative")
    scope: str = setting("global (the lowest-ranked filters across all layers) or uniform (the same share of every "
                         "layer's filters)", "global")
    ignored_layers: tuple = setting("layers that keep all their filters (names as model.named_modules() gives them; "
                                    "a block's name covers every layer in it), e.g. [layer4, features.0]", ())

    def __post_init__(self):
        # Settings read a list as a list (`--set prune.ignored_layers=fc,layer4` too): kept as a tuple.
        if isinstance(self.ignored_layers, list):
            object.__setattr__(self, "ignored_layers", tuple(self.ignored_layers))

    def validate(self, where: str = "prune") -> None:
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"{where}.target must be inside (0, 1), got {self.target}: it is the fraction that remains")
        if self.target_kind not in TARGET_KINDS:
            raise ConfigError(f"{where}.target_kind must be one of {', '.join(TARGET_KINDS)}, got {self.target_kind!r}")
        check_range(f"{where}.filters_per_step", self.filters_per_step, 1)
        check_range(f"{where}.finetune_epochs_between", self.finetune_epochs_between, 0)
        check_range(f"{where}.rank_images", self.rank_images, 0)
        check_range(f"{where}.latency_repeats", self.latency_repeats, 0)
        check_range(f"{where}.rank_batch_size", self.rank_batch_size, 1)
        check_range(f"{where}.log_models_every", self.log_models_every, 1,
                    hint="the pruned model is logged every N steps; the last step's always is")
        check_range(f"{where}.round_to", self.round_to, 1)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.scope not in schedule.SCOPES:
            raise ConfigError(f"{where}.scope must be one of {', '.join(schedule.SCOPES)}, got {self.scope!r}")
        if not SCHEDULES[self.schedule] and self.finetune_epochs_between:
            raise ConfigError(f"{where}.schedule=one_shot ranks once, so fine-tuning between its steps changes nothing "
                              f"it removes: set {where}.finetune_epochs_between=0 or {where}.schedule=iterative")
        if not isinstance(self.ignored_layers, tuple) or not all(isinstance(n, str) for n in self.ignored_layers):
            raise ConfigError(f"{where}.ignored_layers must be a list of layer names, got {self.ignored_layers!r}")


def method(cfg: StudyConfig) -> str:
    return cfg.prune.method


def train(cfg: StudyConfig, trial: int = 0) -> str:
    return stages.train(cfg, trial, method(cfg))


def finetune(cfg: StudyConfig, trial: int, model_ref: str) -> str:
    return stages.finetune(cfg, trial, model_ref, method(cfg))


# --------------------------------------------------------------------------- prune

def prunable(model: nn.Module, example: torch.Tensor, pc: PruneConfig) -> structure.Prunable:
    """The layers this study may thin, checked before any run: a step it can take, a target it
    can reach, and a network that still runs with every layer at its fewest filters."""
    layers, smallest = thinnest(model, example, pc)
    schedule.check_reachable(pc.target, pc.target_kind, smallest, next(iter(layers.widths())))
    schedule.check_step(pc.filters_per_step, layers.widths(), pc.round_to)
    return layers


def thinnest(model: nn.Module, example: torch.Tensor, pc: PruneConfig) -> tuple[structure.Prunable, float]:
    """The layers this study may thin and the smallest fraction of `pc.target_kind` pruning can
    leave (every layer at its fewest filters), checked: the criterion finds what it needs and
    the network still runs that thin."""
    layers = structure.find(model, example, pc.ignored_layers)
    # A criterion that needs what the network lacks (bn_scale: a BatchNorm after each conv) says so now.
    criteria.get(pc.method).check(model, layers.convs, layers.feature_maps, layers.filters)
    widths = layers.widths()
    least = {n: min(w, pc.round_to) for n, w in widths.items()}
    slim = copy.deepcopy(model)
    surgery.remove_filters(slim, {n: list(range(least[n], w)) for n, w in widths.items()}, example)
    try:
        with torch.no_grad():
            slim.eval()(example)
    except Exception as exc:  # whatever the thinned network raises
        raise ModelError(f"the model no longer runs once its layers are thinned ({first_line(exc)[:120]}): name the "
                         "layer that must keep its filters in prune.ignored_layers") from None
    amount, shape = AMOUNTS[pc.target_kind], tuple(example.shape[1:])
    return layers, amount(slim, widths, shape) / amount(model, widths, shape)


def check_prunable(cfg: StudyConfig, model: nn.Module, data: ImageData) -> None:
    """`prunable` on a fresh model, before `main` starts any run."""
    prunable(model, data.normalise(data.test_x[:2]), cfg.prune)


def prune(cfg: StudyConfig, trial: int = 0, model_ref: str | None = None) -> str:
    """Rank, remove and (optionally) fine-tune filters step by step until the target; returns the run id."""
    pc = cfg.prune
    seed = common.seed_of(cfg, trial)
    data = common.load_data(cfg)
    criterion = criteria.get(pc.method, seed)
    if model_ref:
        model = common.load_model(model_ref, cfg, data)
    else:
        model = common.new_model(cfg, data, seed)
        common.check_fits(model, data)
    example = data.normalise(data.test_x[:2])
    # Refuse an unreachable target, or a network with nothing to prune, before a run starts or a model trains.
    layers = prunable(model, example, pc)
    with common.stage_run(cfg, trial, "prune", f"prune-t{trial}", method(cfg),
                          params={"input_model": model_ref or "trained in this run"}, data=data,
                          model_ref=model_ref) as run:
        if not model_ref:
            stages.train_model(run, model, data, cfg.train, seed, prefix="pretrain_")
        params0 = models.count_params(model)
        size0 = measure.size(model, data.input_shape)
        run.log_text(size0.summary, paths.SUMMARY_BEFORE)
        rank_x = data.train_x[: pc.rank_images or None]
        rank_y = data.train_y[: pc.rank_images or None]

        def amount(network: nn.Module) -> int:
            return AMOUNTS[pc.target_kind](network, layers.convs, data.input_shape)

        amount0 = amount(model)

        def remaining() -> float:
            return amount(model) / amount0

        def left_after(plan: schedule.Plan) -> float:
            """What would remain after `plan`, tried on a copy (the model itself is not touched)."""
            trial = copy.deepcopy(model)
            surgery.remove_filters(trial, plan, example)
            return amount(trial) / amount0

        def log_round(k: int) -> None:
            size = measure.size(model, data.input_shape)
            test = evaluate(model, data.test_x, data.test_y, data.normalise)
            widths = layers.widths()
            metrics = {"params": size.params, "macs": size.macs, "fraction_remaining": size.params / params0,
                       "filters": sum(widths.values()), "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
            if pc.latency_repeats:
                metrics["latency_ms"] = measure.latency_ms(model, data.input_shape, repeats=pc.latency_repeats,
                                                           warmup=min(5, pc.latency_repeats))
            metrics.update({f"filters_left.{n}": w for n, w in widths.items()})
            run.log_metrics(metrics, step=k)
            progress.line(f"round {k}: {remaining():.1%} of the {pc.target_kind} left (target {100 * pc.target:g}%), "
                          f"test accuracy {test['accuracy']:.4f}", began)

        began = time.monotonic()
        log_round(0)
        # Distillation's teacher between steps: the network before its first step.
        teacher = copy.deepcopy(model) if pc.finetune_epochs_between and stages.distilling(cfg.finetune) else None
        remover = surgery.FilterRemover(model, example)  # traces the network once for every step
        plan_step, widths0, scores = schedule.SCOPES[pc.scope], layers.widths(), None
        k = 0
        while remaining() > pc.target:
            k += 1
            rb = pc.rank_batch_size
            if SCHEDULES[pc.schedule] or scores is None:
                # A data-free criterion (l1, l2, fpgm, bn_scale, random) is handed no ranking batches: no pass runs.
                ranked = batches(rank_x, rank_y, rb, data.normalise) if criterion.needs_data else None
                scores = criterion(model, layers.convs, ranked, total=(len(rank_y) + rb - 1) // rb,
                                   outputs=layers.feature_maps, coupled=layers.filters)
            # The last step takes only as many filters as bring the network to the target.
            plan = schedule.fewest_to_reach(functools.partial(plan_step, scores, round_to=pc.round_to, widths0=widths0),
                                            pc.filters_per_step, left_after, pc.target)
            remover.remove(plan)
            scores = schedule.without(scores, plan)  # what a one-shot schedule's next step plans from
            log_round(k)
            done = remaining() <= pc.target
            if not done and k % pc.log_models_every == 0:
                # The network right after this round's removal: the state step k's metrics describe.
                stages.log_model(run, model, data, paths.round_model(k), step=k, weights_only=True)
            if not done and pc.finetune_epochs_between:
                between = stages.with_epochs(cfg.finetune, pc.finetune_epochs_between)
                last = fit(model, data, between, seed + 1000 * k, desc=f"finetune round {k}",
                           augment=stages.augmentation(data), teacher=teacher)[-1]
                # Step k's accuracy after retraining, beside its accuracy right after the removal;
                # it describes the retrained network, not model_round_k.
                run.log_metrics({"retrained_test_loss": last.test_loss, "retrained_test_accuracy": last.test_accuracy},
                                step=k, model_linked=False)
        size = measure.size(model, data.input_shape)
        run.log_text(size.summary, paths.SUMMARY_AFTER)
        run.log_metrics({"rounds": k, "macs_fraction": size.macs / size0.macs}, step=k)
        stages.log_model(run, model, data, paths.MODEL, step=k, final=True)
        return run.run_id


# --------------------------------------------------------------------------- report

CURVE_METRICS = ["test_accuracy", "test_loss", "params", "macs"]
# What a prune run logs per round that the accuracy-against-parameters-removed figure draws.
ROUND_METRICS = ["params", "test_accuracy", "retrained_test_accuracy"]
PRUNED_BEFORE_FINETUNING = "pruned, before fine-tuning"


def report(cfg: StudyConfig) -> common.Report:
    """Test accuracy / loss per epoch, original vs fine-tuned pruned; test accuracy against the
    parameters removed, round by round; the size table."""
    train_runs, prune_runs, ft_runs = (reporting.stage_runs(cfg, s) for s in ("train", "prune", "finetune"))
    if not train_runs and not ft_runs:
        raise reporting.no_runs(cfg, "train or finetune runs")
    curves = {"train": reporting.histories(train_runs, CURVE_METRICS),
              "finetune": reporting.histories(ft_runs, CURVE_METRICS)}
    # One epoch axis, as in the seed's figure: fine-tuning continues where training stopped
    # (a finetune run's epoch 0, the pruned model before fine-tuning, sits at the last
    # training epoch; its epochs 1-5 become 6-10).
    trained_epochs = int(curves["train"].step.max()) if len(curves["train"]) else cfg.train.epochs
    shown = {"train": curves["train"], "finetune": curves["finetune"].assign(step=curves["finetune"].step + trained_epochs)}
    figures = {}
    for metric, label, worst in (("test_accuracy", "test accuracy", min), ("test_loss", "test loss", max)):
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        for stage, name in (("train", "original"), ("finetune", "pruned + fine-tuned")):
            table = reporting.band(shown[stage], metric)
            if len(table):
                reporting.plot_band(ax, table, f"{name}, {int(table['count'].max())} trials")
        if len(curves["finetune"]):
            ax.axvline(trained_epochs, color="grey", linewidth=0.8, linestyle=":")
            _mark_pruned(ax, curves["finetune"], metric, trained_epochs, worst)
        # Below the axes: inside, the legend sat on the drop right after pruning, the point
        # this figure is about (the curves fill the axes from corner to corner).
        figures[f"{metric}.png"] = reporting.finish(
            fig, ax, f"epoch (pruned after epoch {trained_epochs}, then fine-tuned)", label, f"{cfg.study}: {label}",
            legend=reporting.LEGEND_BELOW)
    if prune_runs:
        figures["accuracy_vs_params_removed.png"] = accuracy_figure(
            cfg, reporting.histories(prune_runs, ROUND_METRICS), curves["finetune"])
    return figures, size_table(curves)


def _mark_pruned(ax, finetune: pd.DataFrame, metric: str, epoch: int, worst) -> None:
    """The pruned networks before fine-tuning (each finetune run's step 0, drawn at `epoch`):
    their mean as a marker of its own in the legend, and the worst trial (`worst`: min for
    accuracy, max for loss) written beside its end of the bar, so the drop pruning causes is
    read off the figure itself."""
    before = finetune[(finetune.metric == metric) & (finetune.step == 0)].value
    if before.empty:
        return
    # An errorbar without bars, not a plain marker: the legend lists it after the curves.
    ax.errorbar([epoch], [before.mean()], fmt="D", markersize=7, color="tab:red", zorder=3,
                label=f"{PRUNED_BEFORE_FINETUNING}: mean {before.mean():.4f}")
    # Beside the worst end of the drop, on the side with more room (the original curve's,
    # once training had more than an epoch): there the text covers neither curve.
    low, high = ax.dataLim.x0, ax.dataLim.x1
    left = high > low and (epoch - low) / (high - low) > 0.35
    ax.annotate(f"{PRUNED_BEFORE_FINETUNING},\nworst of {len(before)} trials: {worst(before):.4f}", (epoch, worst(before)),
                xytext=(-14 if left else 14, 0), textcoords="offset points", ha="right" if left else "left",
                va="center", fontsize=8, color="tab:red", arrowprops={"arrowstyle": "->", "color": "tab:red"})


def _last_per_trial(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per trial, the value at the highest step."""
    sub = df[df.metric == metric]
    return sub.sort_values("step").groupby("trial")["value"].last()


def removal_curve(rounds: pd.DataFrame, metric: str, params_before: float) -> pd.DataFrame:
    """`metric`'s band (mean, min, max over trials) per round, with `step` the percent of the
    parameters removed: 1 - the mean parameters of the same trials / `params_before`, as the
    size tables compute their params_fraction (mean over trials / mean over trials), so the
    last round's point sits where the table puts the pruned networks."""
    sub = rounds[rounds.metric.isin([metric, "params"])]
    both = sub.pivot_table(index=["trial", "step"], columns="metric", values="value").reset_index()
    if metric not in both or "params" not in both:
        return pd.DataFrame(columns=["step", "mean", "min", "max", "count"])
    both = both.dropna(subset=[metric, "params"])
    per_round = both.groupby("step")
    table = per_round[metric].agg(["mean", "min", "max", "count"]).reset_index()
    table["step"] = 100 * (1 - per_round["params"].mean().to_numpy() / params_before)
    return table


def accuracy_figure(cfg: StudyConfig, rounds: pd.DataFrame, final: pd.DataFrame, note: str = "") -> plt.Figure:
    """Test accuracy against the share of parameters removed (Molchanov et al. 2017's figures):
    right after each round's removal and, where rounds retrain, after retraining, mean and
    min-max over trials; the fine-tuned networks as a star at their own size. `rounds`: the
    prune runs' `ROUND_METRICS` histories; `final`: the finetune runs' `test_accuracy` and
    `params`; `note`: a line under the title."""
    before = rounds[(rounds.metric == "params")]
    params_before = before[before.step == before.step.min()].value.mean()
    # A trial that reached the target a round sooner stays at its final network in the later
    # rounds: every point averages every trial, and the last is the pruned networks the table
    # reports (a point of the trials that went one round further alone lay beyond the table).
    held = reporting.held_to_the_end(rounds, ["params", "test_accuracy"])
    fig, ax = plt.subplots(figsize=(8.6, 4.4))
    for source, metric, label in ((held, "test_accuracy", "right after removal"),
                                  (rounds, "retrained_test_accuracy", "after retraining")):
        table = removal_curve(source, metric, params_before)
        if len(table):
            reporting.plot_band(ax, table, f"{label}, {int(table['count'].max())} trials")
    accs, params = _last_per_trial(final, "test_accuracy"), _last_per_trial(final, "params")
    if len(accs) and len(params):
        ax.errorbar([100 * (1 - params.mean() / params_before)], [accs.mean()],
                    yerr=[[accs.mean() - accs.min()], [accs.max() - accs.mean()]], fmt="*", markersize=12, capsize=4,
                    color="black", label=f"after the final fine-tuning, {len(accs)} trials")
    title = f"{cfg.study}: accuracy while pruning" + (f"\n{note}" if note else "")
    return reporting.finish(fig, ax, "parameters removed (% of the whole model)", "test accuracy", title, 8,
                            legend=reporting.LEGEND_BELOW)


def size_table(curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    def last(df: pd.DataFrame, metric: str) -> pd.Series:
        sub = df[df.metric == metric]
        return sub.sort_values("step").groupby("trial")["value"].last()

    rows = []
    for stage, name in (("train", "original"), ("finetune", "pruned + fine-tuned")):
        df = curves[stage]
        if df.empty:
            continue
        acc = last(df, "test_accuracy")
        rows.append({"model": name, "trials": len(acc), "params": last(df, "params").mean(),
                     "macs": last(df, "macs").mean(), "test_accuracy_mean": acc.mean(),
                     "test_accuracy_min": acc.min(), "test_accuracy_max": acc.max()})
    table = pd.DataFrame(rows)
    if len(table) == 2:
        table["params_fraction"] = table["params"] / table["params"].iloc[0]
        table["macs_fraction"] = table["macs"] / table["macs"].iloc[0]
    return table


KIND = common.StudyKind(
    name="filter_pruning",
    entry_points={
        "train": common.EntryPoint(train, "train the model from scratch"),
        "prune": common.EntryPoint(prune, "rank and remove filters until prune.target remains", reads_model=True),
        "finetune": common.EntryPoint(finetune, "train the pruned model further", reads_model=True),
    },
    steps=common.chain("train", "prune", "finetune"),
    report=report,
    sections={"prune": PruneConfig, "finetune": TrainConfig},
    deliverable="finetune",
    model_protocol=base.FilterPrunable,
    any_network=True,
    names=(("pruning method", "prune.method", method, criteria.CRITERIA), common.FINETUNE_OPTIMIZER, common.FINETUNE_PRECISION),
    model_checks=(check_prunable,),
)
