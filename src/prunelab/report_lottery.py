"""The lottery-ticket report (Frankle & Carbin 2019, figures 3-4), drawn from runs alone.

(a) test accuracy and (b) test loss against training iteration, one curve per
fraction of weights remaining (Pm), mean of the trials with min/max bars;
(c) early-stopping iteration and (d) test accuracy at early stop against Pm,
winning tickets and their random re-initialisation on the same axes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from prunelab import paths, tracking
from prunelab.config import StudyConfig
from prunelab.errors import TrackingError
from prunelab.lottery import STAGE_REINIT, STAGE_TICKET, STAGE_TICKET_ROUND_0
from prunelab.report import band, finish, histories, plot_band, same_settings

MAX_CURVES = 6  # more Pm curves than this on one axis are unreadable; evenly spaced rounds are drawn


def round_runs(cfg: StudyConfig, stages: tuple[str, ...]) -> dict[int, dict[int, object]]:
    """{round: {trial: newest finished run}} of the given stages, at these settings."""
    out: dict[int, dict[int, object]] = {}
    for stage in stages:
        runs = tracking.find_runs(cfg.study, f"tags.{paths.TAG_STAGE} = '{stage}' and tags.{paths.TAG_STUDY} = '{cfg.study}'")
        for r in runs:  # newest first, so setdefault keeps the newest
            if same_settings(r, cfg) and "round" in r.data.params:
                k, trial = int(r.data.params["round"]), int(r.data.tags.get(paths.TAG_TRIAL, -1))
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
        ax.set_xticks(pm_ticks, [f"{pm:.3g}" for pm in pm_ticks])
        ax.invert_xaxis()
    return finish(fig, ax, xlabel, ylabel, title, 8)


def lottery_report(cfg: StudyConfig) -> tuple[dict[str, plt.Figure], pd.DataFrame]:
    tickets = round_runs(cfg, (STAGE_TICKET_ROUND_0, STAGE_TICKET))
    controls = round_runs(cfg, (STAGE_REINIT,))
    if not tickets:
        raise TrackingError(f"experiment {cfg.study!r} on {tracking.tracking_uri()} has no finished lottery rounds at these "
                            f"settings: run the study first (`prunelab run --study {cfg.study}`)")
    figures = {}
    shown = _shown_rounds(list(tickets))
    curves = {k: histories(tickets[k], ["test_accuracy", "test_loss"]) for k in shown}
    for metric, label in (("test_accuracy", "test accuracy"), ("test_loss", "test loss")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for k in shown:
            table = band(curves[k], metric)
            plot_band(ax, table, f"Pm={pm_percent(tickets[k]):.1f}%, {int(table['count'].max())} trials", markersize=3)
        figures[f"{metric}.png"] = _finish(fig, ax, f"{cfg.study}: {label} (winning tickets)", "training iteration", label)

    keys = ["early_stop_iteration", "early_stop_test_accuracy"]
    frames = {"winning ticket": summary_frame(tickets, keys), "random reinit": summary_frame(controls, keys)}
    for metric, label, name in (("early_stop_iteration", "early-stop iteration", "early_stop_iteration.png"),
                                ("early_stop_test_accuracy", "test accuracy at early stop", "early_stop_accuracy.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant, df in frames.items():
            table = band(df, metric)
            if len(table):
                plot_band(ax, table, f"{variant}, {int(table['count'].max())} trials")
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
    return table.sort_values(["variant", "pm_percent"], ascending=[False, False]) if len(table) else table
