"""Report of the k-means filter-clustering study, from its child runs only.

Figure 1: test accuracy against clusters pruned away, one curve per stage.
Figure 2: the same for each conv alone, small multiples per stage, convs in
network order. Min/max bands span the trials (k-means seeds). The table
summarises the merges: size, MACs and CPU latency before and after.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from prunelab import paths, tracking
from prunelab.config import StudyConfig
from prunelab.errors import TrackingError

SWEEP, TARGET = "sweep", "target"  # the child runs' tags (kmeans_stages.TAG_SWEEP / TAG_TARGET)


def sweep_table(cfg: StudyConfig, sweep: str) -> pd.DataFrame:
    """One row per (target, clusters pruned, trial): the newest finished child run, at these settings."""
    from prunelab.report import same_settings

    runs = tracking.find_runs(cfg.study, f"tags.{paths.TAG_STUDY} = '{cfg.study}' and tags.{SWEEP} = '{sweep}'")
    rows, seen = [], set()
    for r in runs:  # newest first
        if not same_settings(r, cfg):
            continue
        p = r.data.params
        key = (p.get("target"), p.get("clusters_pruned", p.get("keep")), r.data.tags.get(paths.TAG_TRIAL))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"target": p.get("target"), "trial": int(r.data.tags.get(paths.TAG_TRIAL, -1)),
                     "run_id": r.info.run_id, **{k: v for k, v in p.items() if k in ("clusters_pruned", "keep", "mid_widths")},
                     **r.data.metrics})
    table = pd.DataFrame(rows)
    if len(table) and "clusters_pruned" in table:
        table["clusters_pruned"] = table["clusters_pruned"].astype(int)
    return table


def _band(rows: pd.DataFrame) -> pd.DataFrame:
    """report.band's shape (step, mean, min, max, count) from a sweep table."""
    from prunelab.report import band

    long = pd.DataFrame({"metric": "acc", "step": rows["clusters_pruned"], "value": rows["test_accuracy"]})
    return band(long, "acc")


def _trials(rows: pd.DataFrame) -> int:
    return int(rows["trial"].nunique())


def figure_stages(cfg: StudyConfig, table: pd.DataFrame) -> plt.Figure:
    from prunelab.report import finish, plot_band

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage in sorted(table["target"].unique()):
        rows = table[table.target == stage]
        plot_band(ax, _band(rows), f"{stage} (all convs), {_trials(rows)} seeds")
    return finish(fig, ax, "clusters pruned away per conv (C - K)", "test accuracy", f"{cfg.study}: k-means per stage", 8)


def _stage_of(layer: str) -> str:
    return layer.split(".")[0] if layer.startswith("layer") else "stem"


def figure_layers(cfg: StudyConfig, table: pd.DataFrame) -> plt.Figure:
    from prunelab.report import plot_band

    order = sorted(table["target"].unique(), key=_network_order)
    panels = list(dict.fromkeys(_stage_of(name) for name in order))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        names = [n for n in order if _stage_of(n) == panel]
        colours = plt.cm.viridis([i / max(len(names) - 1, 1) for i in range(len(names))])
        for name, colour in zip(names, colours):
            rows = table[table.target == name]
            plot_band(ax, _band(rows), name.removeprefix(f"{panel}."), color=colour, markersize=3)
        ax.set_title(f"{panel}: each conv alone ({_trials(table)} seeds)")
        ax.set_xlabel("clusters pruned away (C - K)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(f"{cfg.study}: k-means per conv layer, in network order")
    fig.tight_layout()
    return fig


def _network_order(name: str) -> tuple:
    """conv1 < layer1.0.conv1 < layer1.0.conv2 < ... < layer3.2.conv2."""
    if not name.startswith("layer"):
        return (0, 0, name)
    stage, block, conv = name.split(".", 2)
    return (int(stage.removeprefix("layer")), int(block), conv)


def merge_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and min/max accuracy) over trials per kept fraction."""
    if table.empty:
        return table
    cols = ["params_before", "params", "params_fraction", "macs_before", "macs", "macs_fraction",
            "latency_ms_before", "latency_ms", "latency_fraction", "max_abs_diff_centroid", "max_abs_diff_original"]
    grouped = table.assign(keep=table["keep"].astype(float)).groupby("keep")
    out = grouped[cols].mean()
    out["test_accuracy_before"] = grouped["test_accuracy_before"].mean()
    out["test_accuracy_mean"] = grouped["test_accuracy"].mean()
    out["test_accuracy_min"] = grouped["test_accuracy"].min()
    out["test_accuracy_max"] = grouped["test_accuracy"].max()
    out["trials"] = grouped["trial"].nunique()
    out["mid_widths"] = grouped["mid_widths"].first()
    return out.reset_index().sort_values("keep", ascending=False)


def kmeans_report(cfg: StudyConfig) -> tuple[dict[str, plt.Figure], pd.DataFrame]:
    stages, layers, merges = (sweep_table(cfg, s) for s in ("stage", "layer", "merge"))
    if stages.empty and layers.empty:
        raise TrackingError(f"experiment {cfg.study!r} on {tracking.tracking_uri()} has no finished k-means sweep runs at "
                            f"these settings: run the study first (`prunelab run --study {cfg.study}`)")
    figures = {}
    if not stages.empty:
        figures["accuracy_vs_clusters_pruned_per_stage.png"] = figure_stages(cfg, stages)
    if not layers.empty:
        figures["accuracy_vs_clusters_pruned_per_layer.png"] = figure_layers(cfg, layers)
    return figures, merge_summary(merges)
