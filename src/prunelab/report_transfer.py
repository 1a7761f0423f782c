"""Report of a `transfer_pruning` study, drawn only from what the server returns.

- accuracy against the share of parameters removed, step by step (right
  after each removal and after the retraining that follows it), trials as
  min/max bands, with the final fine-tuned accuracy;
- filters left in each conv at the end, against the original widths;
- a before/after table of parameters, MACs, CPU latency and accuracy.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from prunelab import tracking
from prunelab.config import StudyConfig
from prunelab.errors import TrackingError
from prunelab.report import band, finish, histories, plot_band, stage_runs

STEP_METRICS = ["params", "macs", "latency_ms", "fraction_remaining", "filters", "test_accuracy", "test_loss",
                "retrained_test_accuracy", "retrained_test_loss"]


def _layer_keys(runs: dict) -> list[str]:
    keys = {k for r in runs.values() for k in r.data.metrics if k.startswith("filters_left.")}
    return sorted(keys, key=lambda k: int(k.rsplit(".", 1)[1]))  # features.N: in network order


def _last(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per trial, the value at the highest step."""
    sub = df[df.metric == metric]
    return sub.sort_values("step").groupby("trial")["value"].last()


def _first(df: pd.DataFrame, metric: str) -> pd.Series:
    sub = df[df.metric == metric]
    return sub.sort_values("step").groupby("trial")["value"].first()


def transfer_pruning_report(cfg: StudyConfig) -> tuple[dict[str, plt.Figure], pd.DataFrame]:
    prune_runs, ft_runs = stage_runs(cfg, "prune"), stage_runs(cfg, "finetune")
    if not prune_runs:
        raise TrackingError(f"experiment {cfg.study!r} on {tracking.tracking_uri()} has no finished prune runs at these "
                            f"settings: run the study first (`prunelab run --study {cfg.study} --data-dir DIR`)")
    layers = _layer_keys(prune_runs)
    steps = histories(prune_runs, STEP_METRICS + layers)
    final = histories(ft_runs, ["test_accuracy", "params"])
    figures = {"accuracy_vs_params_removed.png": _accuracy_figure(cfg, steps, final, len(prune_runs)),
               "filters_left.png": _filters_figure(cfg, steps, layers, len(prune_runs))}
    return figures, before_after_table(steps, final)


def _accuracy_figure(cfg: StudyConfig, steps: pd.DataFrame, final: pd.DataFrame, trials: int) -> plt.Figure:
    removed = band(steps, "fraction_remaining")
    x_of_step = dict(zip(removed["step"], 100 * (1 - removed["mean"])))  # mean over trials at each step
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for metric, label in (("test_accuracy", "right after removal"), ("retrained_test_accuracy", "after retraining")):
        table = band(steps, metric)
        if len(table):
            table = table.assign(step=table["step"].map(x_of_step))
            plot_band(ax, table, f"{label}, {trials} trials")
    accs = _last(final, "test_accuracy")
    if len(accs):
        # Trials may stop at different steps: place the final models at their own mean size.
        x = 100 * (1 - _last(steps, "fraction_remaining").mean())
        ax.errorbar([x], [accs.mean()], yerr=[[accs.mean() - accs.min()], [accs.max() - accs.mean()]], fmt="*",
                    markersize=12, capsize=4, color="black", label=f"after the final fine-tuning, {len(accs)} trials")
    return finish(fig, ax, "parameters removed (% of the whole model)", "test accuracy", f"{cfg.study}: accuracy while pruning", 8)


def _filters_figure(cfg: StudyConfig, steps: pd.DataFrame, layers: list[str], trials: int) -> plt.Figure:
    names = [k.removeprefix("filters_left.") for k in layers]
    start = [_first(steps, k).mean() for k in layers]
    end = [_last(steps, k) for k in layers]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    pos = range(len(layers))
    ax.bar(pos, start, color="none", edgecolor="gray", label="before pruning")
    means = [e.mean() for e in end]
    err = [[m - e.min() for m, e in zip(means, end)], [e.max() - m for m, e in zip(means, end)]]
    ax.bar(pos, means, yerr=err, capsize=3, color="tab:blue", alpha=0.8, label=f"left at the end: mean, min-max of {trials} trials")
    ax.set_xticks(list(pos))
    ax.set_xticklabels([f"conv{i + 1} ({n})" for i, n in enumerate(names)], fontsize=7, rotation=40, ha="right")
    ax.set_ylabel("filters")
    ax.set_title(f"{cfg.study}: filters per conv layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_table(steps: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Mean over trials (accuracy also min and max) of the model before pruning, right after the
    last pruning step, and after the final fine-tuning."""
    rows = []

    def row(name, pick, acc):
        rows.append({"model": name, "trials": len(acc), "params": pick(steps, "params").mean(),
                     "macs": pick(steps, "macs").mean(), "latency_ms": pick(steps, "latency_ms").mean(),
                     "test_accuracy_mean": acc.mean(), "test_accuracy_min": acc.min(), "test_accuracy_max": acc.max()})

    row("before pruning (transfer only)", _first, _first(steps, "test_accuracy"))
    row("pruned, before fine-tuning", _last, _last(steps, "test_accuracy"))
    accs = _last(final, "test_accuracy")
    if len(accs):
        row("pruned + fine-tuned", _last, accs)  # same network as the last step: same size and latency
    table = pd.DataFrame(rows)
    for col in ("params", "macs", "latency_ms"):
        table[f"{col}_fraction"] = table[col] / table[col].iloc[0]
    return table
