"""Lottery tickets (kind `lottery_ticket`, Frankle & Carbin 2019): iterative magnitude
pruning with masks and rewinding. Every pruning round of every trial is one run.
(Over 400 lines: a kind is one module by design, its settings, stages and report
together, and this kind has three stages and the paper's four figures.)

| entry point | does | reads | logs |
|---|---|---|---|
| `train` | round 0: initialise, train the dense network | the data | the all-ones `mask.pt`, `rewind_weights.pt` (iteration `lottery.rewind_iteration`), `checkpoint.pt` (trained) |
| `prune` | round k+1: prune round k's trained weights through its mask (`lottery.*_rate`), rewind the survivors, train | round k's run | the same three files for round k+1 |
| `finetune` | the random re-initialisation control: a round's mask trained from fresh random weights | a train or prune round's run | its mask and starting weights |

Every round logs, per evaluation (step = iteration), validation and test
loss/accuracy, and per round (step = round) the early-stopping point (lowest
validation loss), `fraction_remaining` and per-layer counts. `main` chains
train, then each round's prune (reading the previous round) and its re-init
control (reading that round). The report draws the paper's figures 3-4: test
accuracy and loss against iteration per Pm (mean of the trials, min/max bars),
each ticket's re-init control dashed in its colour, from the first iteration and
zoomed past the first 10 %; and the early-stop iteration and accuracy against Pm
for tickets and re-init.

The last round's ticket (trained, pruned weights zero) is also logged as a model
for users at step = `lottery.iterations` (pixels in, pt2 and ONNX): it is what a
trial delivers, and `main` registers it (`StudyKind.deliverable` = `prune`, the
last pruning round; with `lottery.rounds=0`, nothing is registered). Earlier
rounds keep only their files: a model per round would cost an export each.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import matplotlib.pyplot as plt
import pandas as pd

from prunelab import checkpoints, paths, reporting
from prunelab.tracking import query
from prunelab.tracking.run import Run
from prunelab.config import StudyConfig, check_range, setting
from prunelab.data.base import ImageData
from prunelab.errors import ConfigError, ModelError, shown
from prunelab.models import base
from prunelab.pruning import masks
from prunelab.studies import common, stages
from prunelab.studies.common import check_fits
from prunelab.train import early_stop, fit_iterations

STAGE_TICKET_ROUND_0, STAGE_TICKET, STAGE_REINIT = "train", "prune", "reinit"


@dataclass(frozen=True)
class LotteryConfig:
    rounds: int = setting("pruning rounds after the dense round 0 (round k keeps about (1 - rate)^k of each layer)", 20)
    iterations: int = setting("training iterations per round (optimiser steps of train.batch_size images)", 20000)
    eval_every: int = setting("evaluate validation and test loss / accuracy every N iterations", 100)
    conv_rate: float = setting("fraction of a conv layer's remaining weights pruned per round, in [0, 1)", 0.1)
    fc_rate: float = setting("fraction of a hidden fully connected layer's remaining weights pruned per round", 0.2)
    output_rate: float = setting("fraction of the output layer's remaining weights pruned per round", 0.1)
    strategy: str = setting("which weights go: magnitude (smallest |w| of the trained round) or random (control)", "magnitude")
    rewind_iteration: int = setting("rewind survivors to their values at this iteration (0: the initialisation)", 0)
    reinit_control: bool = setting("also train each round's mask from a fresh random initialisation (control)", True)

    def validate(self, where: str = "lottery") -> None:
        for name in ("conv_rate", "fc_rate", "output_rate"):
            check_range(f"{where}.{name}", getattr(self, name), 0.0, 1.0, high_open=True,
                        hint="it is the fraction pruned per round")
        check_range(f"{where}.rounds", self.rounds, 0)
        check_range(f"{where}.iterations", self.iterations, 1)
        check_range(f"{where}.eval_every", self.eval_every, 1)
        if not 0 <= self.rewind_iteration < self.iterations:
            raise ConfigError(f"{where}.rewind_iteration={self.rewind_iteration} is outside the training length "
                              f"(0 .. {self.iterations - 1}): rewind to an iteration before {where}.iterations")




def steps(cfg: StudyConfig) -> list[common.Step]:
    """Per-trial chain for `main`: (entry point, index of the step whose run it reads)."""
    out: list[tuple[str, int | None]] = [("train", None)]
    ticket = 0
    for _ in range(cfg.lottery.rounds):
        out.append(("prune", ticket))
        ticket = len(out) - 1
        if cfg.lottery.reinit_control:
            out.append(("finetune", ticket))
    return out


def _load_data(cfg: StudyConfig) -> ImageData:
    data = common.load_data(cfg)
    if data.val_x is None:
        raise ConfigError("lottery tickets early-stop on the validation loss: set data.val_size > 0 "
                          "(5000 of CIFAR-10's 50000, or 10 % of a subset)")
    return data


def method(cfg: StudyConfig) -> str:
    return cfg.lottery.strategy


def _round_run(cfg: StudyConfig, trial: int, stage: str, run_name: str, k: int, control: str,
               mask: masks.Mask, source: str, data: ImageData, model_ref: str | None = None):
    """The run of one round: its round number, control and Pm as tags and params."""
    return common.stage_run(cfg, trial, stage, run_name, method(cfg), tags={"round": k, "control": control},
                            params={"round": k, "fraction_remaining": round(mask.fraction_remaining(), 6),
                                    "input_run": source}, data=data, model_ref=model_ref)


def _train_round(run: Run, cfg: StudyConfig, data: ImageData, model: nn.Module, mask: masks.Mask,
                 seed: int, k: int, start: int = 0, snapshot_at: int | None = None) -> dict | None:
    """Train under `mask` (pruned weights re-zeroed after every step) and log the
    evaluation series (step = iteration), the early-stopping point and per-layer counts.
    Returns the weights at iteration `snapshot_at` when asked."""
    lc = cfg.lottery
    snapshot: dict = {}
    done = [start]

    zero_pruned = mask.applier(model)

    def after_step() -> None:
        zero_pruned()
        done[0] += 1
        if done[0] == snapshot_at:
            snapshot.update({n: t.detach().clone() for n, t in model.state_dict().items()})

    if snapshot_at == start:
        snapshot.update({n: t.detach().clone() for n, t in model.state_dict().items()})
    augment = stages.augmentation(data)
    history = fit_iterations(model, data, cfg.train, lc.iterations, lc.eval_every, seed, start=start,
                             on_eval=lambda r: run.log_metrics(r.metrics(), step=r.iteration, flush=False),
                             desc=f"round {k}", after_step=after_step, augment=augment)
    best, last = early_stop(history), history[-1]
    params = dict(model.named_parameters())
    pruned = sum(keep.numel() - int(keep.sum()) for keep in mask.values())
    summary = {"early_stop_iteration": best.iteration, "early_stop_test_accuracy": best.test_accuracy,
               "early_stop_test_loss": best.test_loss, "early_stop_val_loss": best.val_loss,
               "final_test_accuracy": last.test_accuracy, "fraction_remaining": mask.fraction_remaining(),
               # parameters left: the network keeps its shape, its pruned weights are zeros
               "params": sum(p.numel() for p in model.parameters()) - pruned}
    for name, keep in mask.items():
        summary[f"params.{name}"] = keep.numel()
        summary[f"remaining.{name}"] = int(keep.sum())
        summary[f"nonzero.{name}"] = int(torch.count_nonzero(params[name]))
    run.log_metrics(summary, step=k)  # flushes the buffered series too
    run.log_text(mask.report(), "mask_report.txt")
    return snapshot or None


def _log_trained(run: Run, cfg: StudyConfig, data: ImageData, model: nn.Module, k: int, tmp: Path) -> None:
    """The trained round's weights-only checkpoint (the next round reads it); in the last
    round also a model for users, holding the ticket a trial delivers."""
    if k == cfg.lottery.rounds:
        stages.log_model(run, model, data, paths.MODEL, step=cfg.lottery.iterations, final=True,
                         carry=("params", "fraction_remaining"))
    else:
        run.log_file(checkpoints.save(model, tmp / paths.CHECKPOINT))


def _log_ticket(run: Run, mask: masks.Mask, start_model: nn.Module, tmp: Path) -> None:
    """The mask and the weights training starts from: enough to re-train this round."""
    torch.save(mask.state(), tmp / paths.MASK)
    run.log_file(tmp / paths.MASK)
    run.log_file(checkpoints.save(start_model, tmp / paths.REWIND_WEIGHTS))


def round_zero(cfg: StudyConfig, trial: int = 0) -> str:
    """Round 0: the dense network from its seeded initialisation; returns the run id."""
    lc, seed = cfg.lottery, common.seed_of(cfg, trial)
    data = _load_data(cfg)
    model = common.new_model(cfg, data, seed)
    check_fits(model, data)
    masks.check_rounds(lc, model, lc.rounds)  # refuse an impossible study before anything trains
    mask = masks.Mask.ones_like(model)
    with _round_run(cfg, trial, STAGE_TICKET_ROUND_0, f"lottery-t{trial}-r0", 0, "none", mask,
                    "initialised in this run", data) as run, tempfile.TemporaryDirectory() as tmp:
        rewind_to = _train_round(run, cfg, data, model, mask, seed, 0, snapshot_at=lc.rewind_iteration)
        start_model = copy.deepcopy(model)  # the same network, registered or from a factory
        start_model.load_state_dict(rewind_to)
        _log_ticket(run, mask, start_model, Path(tmp))
        _log_trained(run, cfg, data, model, 0, Path(tmp))
        return run.run_id


def _read_round(cfg: StudyConfig, run_ref: str, tmp: Path, device: torch.device
                ) -> tuple[int, nn.Module, masks.Mask, nn.Module]:
    """(round, trained model, mask, model holding the weights to rewind to) of a ticket run, on `device`."""
    source = query.get_run(run_ref)
    tags = source.data.tags
    k = _round_of(source)
    if tags.get(paths.TAG_STAGE) not in (STAGE_TICKET_ROUND_0, STAGE_TICKET) or k is None:
        raise ModelError(f"run {run_ref} is not a lottery-ticket round (stage {tags.get(paths.TAG_STAGE, '?')}, "
                         f"round {shown(source.data.params.get('round', '?'))}): pass the run id of a train "
                         "(round 0) or prune round of this study")
    trained = checkpoints.load(query.download(run_ref, paths.CHECKPOINT, tmp), cfg.model).to(device)
    start = checkpoints.load(query.download(run_ref, paths.REWIND_WEIGHTS, tmp), cfg.model).to(device)
    # Read as any weights file is (nothing unpickled, one line for a file that is not one),
    # then checked to be a mask of this network.
    try:
        saved = checkpoints.read(query.download(run_ref, paths.MASK, tmp))
    except ModelError:
        raise ModelError(f"run {run_ref}'s {paths.MASK} is not a weights file (nothing of it was unpickled): pass "
                         "a lottery round run of this study") from None
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise ModelError(f"run {run_ref}'s {paths.MASK} is not a mask ({{weight name: bool tensor}}, got "
                         f"{type(saved).__name__}): pass a lottery round run of this study")
    mask = masks.Mask({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()})
    mask.check_fits(trained)
    return k, trained, mask, start


def _count(text: str) -> int | None:
    """A round or trial number as a run records it (a param or tag: text), or None for anything else."""
    return int(text) if text.isdecimal() and text.isascii() and len(text) < 10 else None


def _round_of(run) -> int | None:
    return _count(run.data.params.get("round", ""))


def next_round(cfg: StudyConfig, trial: int, model_ref: str | None) -> str:
    """Round k+1 from round k's run: prune, rewind, retrain; returns the run id."""
    if not model_ref:
        raise ConfigError("a lottery pruning round needs --model-uri: the run id of the previous round")
    lc, seed = cfg.lottery, common.seed_of(cfg, trial)
    data = _load_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        k, trained, mask, start = _read_round(cfg, model_ref, Path(tmp), data.device)
        check_fits(trained, data)
        masks.check_rounds(lc, trained, k + 1)
        new_mask = masks.prune(lc, trained, mask, seed=seed * 1000 + k + 1)
        model = trained  # reuse the module: its weights are replaced by the rewind weights below
        masks.rewind(model, start.state_dict(), new_mask)
        with _round_run(cfg, trial, STAGE_TICKET, f"lottery-t{trial}-r{k + 1}", k + 1, "none", new_mask, model_ref,
                        data, model_ref) as run:
            _log_ticket(run, new_mask, model, Path(tmp))
            _train_round(run, cfg, data, model, new_mask, seed, k + 1, start=lc.rewind_iteration)
            _log_trained(run, cfg, data, model, k + 1, Path(tmp))
            return run.run_id


def reinit_control(cfg: StudyConfig, trial: int, model_ref: str | None) -> str:
    """Control: a round's mask trained from a fresh random initialisation; returns the run id."""
    if not model_ref:
        raise ConfigError("the random re-initialisation control needs --model-uri: the run id of a pruning round")
    seed = common.seed_of(cfg, trial)
    data = _load_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        k, model, mask, _ = _read_round(cfg, model_ref, Path(tmp), data.device)
        check_fits(model, data)
        masks.reinitialise(model, mask, seed=100_000 + 1000 * seed + k)
        with _round_run(cfg, trial, STAGE_REINIT, f"reinit-t{trial}-r{k}", k, "reinit", mask, model_ref,
                        data, model_ref) as run:
            _log_ticket(run, mask, model, Path(tmp))
            _train_round(run, cfg, data, model, mask, seed, k)
            return run.run_id


# --------------------------------------------------------------------------- report

MAX_CURVES = 6  # more Pm curves than this on one axis are unreadable; evenly spaced rounds are drawn


def round_runs(cfg: StudyConfig, stages: tuple[str, ...]) -> dict[int, dict[int, object]]:
    """{round: {trial: newest finished run}} of the given stages, at these settings."""
    out: dict[int, dict[int, object]] = {}
    for stage in stages:
        for r in reporting.find_study_runs(cfg, f"tags.{paths.TAG_STAGE} = '{stage}'"):
            # newest first, so setdefault keeps the newest
            trial_tag = r.data.tags.get(paths.TAG_TRIAL)
            k, trial = _round_of(r), -1 if trial_tag is None else _count(trial_tag)
            if k is not None and trial is not None:  # a run whose round or trial is not a number is no point
                out.setdefault(k, {}).setdefault(trial, r)
    return dict(sorted(out.items()))


def pm_percent(runs: dict[int, object]) -> float:
    """Percent of weights remaining in a round (the same in every trial: counts are deterministic)."""
    return 100 * sum(float(r.data.params["fraction_remaining"]) for r in runs.values()) / len(runs)


def summary_frame(rounds: dict[int, dict[int, object]], metrics: list[str]) -> pd.DataFrame:
    """Long table with step = Pm (percent), one row per trial, round and summary metric."""
    rows = []
    for runs in rounds.values():
        pm = pm_percent(runs)
        reporting.drew(r.info.run_id for r in runs.values())
        for trial, r in runs.items():
            rows += [(trial, r.info.run_id, key, pm, r.data.metrics[key]) for key in metrics if key in r.data.metrics]
    return pd.DataFrame(rows, columns=["trial", "run_id", "metric", "step", "value"])


def _shown_rounds(rounds: list[int]) -> list[int]:
    if len(rounds) <= MAX_CURVES:
        return rounds
    step = (len(rounds) - 1) / (MAX_CURVES - 1)
    return sorted({rounds[round(i * step)] for i in range(MAX_CURVES)})


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, pm_ticks: list[float] | None = None):
    if pm_ticks:  # the paper's axis: percent remaining, log scale, sparsest on the right, ticks at the Pm levels
        ax.set_xscale("log")
        ax.minorticks_off()
        # 16 levels of a long study overlap when written flat: slanted and smaller past 8
        many = len(pm_ticks) > 8
        ax.set_xticks(pm_ticks, [f"{pm:.3g}" for pm in pm_ticks], rotation=45 if many else 0, fontsize=8 if many else None)
        ax.invert_xaxis()
    return reporting.finish(fig, ax, xlabel, ylabel, title, 8)


ZOOM_PAST = 0.1  # the zoomed panel leaves out the first 10 % of training


def _zoom_past_start(ax, tables, iterations: int, last: float) -> None:
    """Show only the curves after the first 10 % of training, as the paper's figures do: the
    untrained network's first points would otherwise squash the differences between Pm
    levels into a sliver (the panel beside this one draws them, from the first iteration)."""
    later = [t[t.step >= ZOOM_PAST * iterations] for t in tables]
    later = [t for t in later if len(t)]
    if not later:
        return
    low, high = min(float(t["min"].min()) for t in later), max(float(t["max"].max()) for t in later)
    pad = 0.1 * (high - low) or 0.01
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(min(float(t.step.min()) for t in later), last)


def _iteration_figure(cfg: StudyConfig, metric: str, label: str, pms: dict[int, float],
                      tickets: dict[int, pd.DataFrame], controls: dict[int, pd.DataFrame]) -> plt.Figure:
    """`metric` against iteration per Pm level (`pms`: round -> Pm percent; `tickets` and
    `controls`: round -> the rounds' `histories`): the ticket solid, the same level's random
    re-initialisation dashed in the ticket's colour (the paper's figures 3-4), mean and
    min-max over trials. Two panels: every iteration from the first logged one, and the
    curves past the first 10 % with the y axis fitted to them."""
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.4))
    tables = []
    for k, pm in pms.items():
        ticket = reporting.band(tickets[k], metric)
        control = reporting.band(controls[k], metric) if k in controls else ticket.iloc[:0]
        for ax in (whole, zoom):
            reporting.plot_band(ax, ticket, f"Pm={pm:.1f}%, {int(ticket['count'].max())} trials", say_band=False,
                                markersize=3)
            if len(control):
                reporting.plot_band(ax, control, f"Pm={pm:.1f}% re-init, {int(control['count'].max())} trials",
                                    say_band=False, markersize=3, linestyle="--",
                                    color=ax.containers[-1].lines[0].get_color())
        tables += [ticket, control]
    tables = [t for t in tables if len(t)]
    # From the first logged iteration (0, or the rewind iteration of late rewinding) to the last,
    # with no margin: the curves start at the left edge, as the paper's do.
    first, last = min(float(t.step.min()) for t in tables), max(float(t.step.max()) for t in tables)
    whole.set_xlim(first, last)
    _zoom_past_start(zoom, tables, cfg.lottery.iterations, last)
    reporting.finish(fig, whole, "training iteration", label, "every iteration", legend=None)
    variants = "winning tickets (solid) and random re-init (dashed)" if controls else "winning tickets"
    fig.suptitle(f"{cfg.study}: {label}, {variants}: mean, min-max over trials")
    return reporting.finish(fig, zoom, "training iteration", label, f"past the first {ZOOM_PAST:.0%} of training", 8,
                            legend=reporting.LEGEND_BELOW)


def report(cfg: StudyConfig) -> common.Report:
    tickets = round_runs(cfg, (STAGE_TICKET_ROUND_0, STAGE_TICKET))
    controls = round_runs(cfg, (STAGE_REINIT,))
    if not tickets:
        raise reporting.no_runs(cfg, "lottery rounds")
    figures = {}
    shown = _shown_rounds(list(tickets))
    series = ["test_accuracy", "test_loss"]
    ticket_curves = {k: reporting.histories(tickets[k], series) for k in shown}
    control_curves = {k: reporting.histories(controls[k], series) for k in shown if k in controls}
    pms = {k: pm_percent(tickets[k]) for k in shown}
    for metric, label in (("test_accuracy", "test accuracy"), ("test_loss", "test loss")):
        figures[f"{metric}.png"] = _iteration_figure(cfg, metric, label, pms, ticket_curves, control_curves)

    keys = ["early_stop_iteration", "early_stop_test_accuracy"]
    frames = {"winning ticket": summary_frame(tickets, keys), "random reinit": summary_frame(controls, keys)}
    for metric, label, name in (("early_stop_iteration", "early-stop iteration", "early_stop_iteration.png"),
                                ("early_stop_test_accuracy", "test accuracy at early stop", "early_stop_accuracy.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant, df in frames.items():
            table = reporting.band(df, metric)
            if len(table):
                reporting.plot_band(ax, table, f"{variant}, {int(table['count'].max())} trials")
        pms = [pm_percent(runs) for runs in tickets.values()]
        figures[name] = _finish(fig, ax, f"{cfg.study}: {label}", "percent of weights remaining (Pm)", label, pm_ticks=pms)
    return figures, summary_table(frames)


def summary_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per variant and Pm: early-stop iteration and accuracy, mean / min / max over trials."""
    rows = []
    for variant, df in frames.items():
        for pm, group in df.groupby("step"):
            row = {"variant": variant, "pm_percent": round(pm, 2), "trials": group.trial.nunique()}
            for metric, short in (("early_stop_iteration", "iteration"), ("early_stop_test_accuracy", "accuracy")):
                values = group[group.metric == metric].value
                row.update({f"{short}_mean": values.mean(), f"{short}_min": values.min(), f"{short}_max": values.max()})
            rows.append(row)
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    # The paper's reading: a ticket "matches" while its mean early-stop accuracy is at least the
    # dense network's (round 0, Pm = 100 %); the column says by how much each row is above it.
    dense = table[(table.variant == "winning ticket") & (table.pm_percent == table.pm_percent.max())]
    if len(dense):
        table["accuracy_vs_dense"] = table["accuracy_mean"] - float(dense["accuracy_mean"].iloc[0])
    return table.sort_values(["variant", "pm_percent"], ascending=[False, False])


KIND = common.StudyKind(
    name="lottery_ticket",
    entry_points={
        "train": common.EntryPoint(round_zero, "round 0: train the dense network from its initialisation"),
        "prune": common.EntryPoint(next_round, "round k+1: prune round k's weights, rewind the survivors, train",
                                   reads_model=True),
        "finetune": common.EntryPoint(reinit_control, "control: a round's mask trained from a random re-initialisation",
                                      reads_model=True),
    },
    steps=steps,
    report=report,
    sections={"lottery": LotteryConfig},
    deliverable="prune",
    model_protocol=base.Model,  # masks cover the conv and linear weights of any model
    any_network=True,
    names=(("pruning strategy", "lottery.strategy", method, masks.STRATEGIES),),
)
