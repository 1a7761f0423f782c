"""k-means filter clustering (kind `kmeans_clustering`) of a pretrained CIFAR ResNet, or any network.

| entry point | does | reads | logs |
|---|---|---|---|
| `train` | trains the ResNet from scratch (the reference recipe; the sweeps do not need it) | the data | as filter pruning's `train` |
| `prune` | one process per trial (= k-means seed) from pretrained weights: both sensitivity sweeps, then the merges, each point a finished child run | `kmeans.weights`, a run / model / weights file, or `model_weights` | parent: `test_accuracy.<sweep>.<target>` (step = clusters pruned); children: `test_accuracy`, `accuracy_drop`; merges: params, MACs, CPU latency before/after, the merged `checkpoint.pt` |
| `finetune` | trains a (merged) model further | a run or weights file | as filter pruning's `finetune` |

The sweeps replace every filter of a conv by its k-means centroid (K of C;
"clusters pruned" = C - K) and evaluate without fine-tuning: per stage (all
convs of layer1, layer2, layer3 at once) and per layer, in network order. The
merges cluster every block-internal conv with BN folded in and merge for real.
Each point is computed first and logged as a finished child run in three
calls, so a sweep of a hundred points costs seconds of tracking, not a
process start per point. `main` runs `prune` once per trial; the report draws
accuracy against clusters pruned per stage and per layer, and a merge table.

A network from a factory (`torchvision:NAME`, `PACKAGE.MODULE:FUNCTION`)
takes part too: its convs are every Conv2d it has, a stage is any of its
modules that holds convs (`kmeans.stages=[layer1]` for torchvision's ResNets,
`[features.3]` for a MobileNet), and the merges take the convs its graph lets
merge exactly (`pruning.merging.mergeable`); stage or layer names it lacks, or
merges asked of a network with nothing to merge, are one line before any run.

Nothing is registered (`StudyKind.deliverable` is None): a trial yields a family
of merged networks, one per `kmeans.merge_keep`, not one pruned model; each is
the `checkpoint.pt` of its merge run. `train` and `finetune` log their models
for users as filter pruning's do.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from prunelab import checkpoints, measure, paths, progress, reporting
from prunelab.tracking.run import Run
from prunelab.config import StudyConfig, TrainConfig, check_range, setting
from prunelab.data.base import ImageData
from prunelab.errors import ConfigError
from prunelab.models import base
from prunelab.pruning import clustering, merging
from prunelab.studies import common, stages
from prunelab.train import evaluate

TAG_SWEEP = "sweep"    # stage | layer | merge (absent on the parent run)
TAG_TARGET = "target"  # the stage, the conv or "blocks" the point clusters
METHOD = "kmeans"      # the `method` param of every run of this kind
# A weights path says where the same weights were read from: not a setting that changes a result.
REPORT_IGNORES = frozenset({"kmeans.weights"})


@dataclass(frozen=True)
class KMeansConfig:
    """k-means filter clustering (kind kmeans_clustering): sweeps and real merging."""

    weights: str = setting("pretrained weights file the sweeps start from (e.g. a reference resnet20 .th checkpoint)", "")
    distance: str = setting("k-means distance between flattened filters: euclidean or cosine", "euclidean")
    importance: str = setting("how a cluster's members make its centroid: none (plain mean) or l1 (mean weighted by L1 norm)", "none")
    n_init: int = setting("k-means restarts (scikit-learn n_init); the best inertia wins", 10)
    stages: tuple = setting("stages of the per-stage sweep (all convs of each at once)", ("layer1", "layer2", "layer3"))
    stage_pruned: tuple = setting("clusters pruned away (C - K) in the per-stage sweep; values >= a stage's width are skipped there",
                                (0, 2, 4, 8, 12, 15, 24, 32, 48, 63))
    layers: tuple = setting("convs of the per-layer sweep, in network order (empty: every conv)", ())
    layer_pruned: tuple = setting("clusters pruned away (C - K) in the per-layer sweep; values >= a layer's width are skipped there",
                                (0, 4, 8, 12, 15, 24, 32, 48, 63))
    merge_keep: tuple = setting("merging: fractions of each block-internal conv's channels kept (one merge run each)", (1.0, 0.75, 0.5, 0.25))
    latency_batch: int = setting("batch size of the CPU latency measurement", 16)
    latency_repeats: int = setting("timed forward passes of the latency measurement (the median counts)", 30)

    def validate(self, where: str = "kmeans") -> None:
        check_range(f"{where}.n_init", self.n_init, 1)
        for name in ("stage_pruned", "layer_pruned"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ConfigError(f"kmeans.{name} must be a list of counts >= 0 (e.g. [0, 4, 8]), got {values!r}")
        for name in ("stages", "layers"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"kmeans.{name} must be a list of names, got {getattr(self, name)!r}")
        keep = self.merge_keep
        if not isinstance(keep, (list, tuple)) or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in keep):
            raise ConfigError(f"kmeans.merge_keep must be a list of fractions in (0, 1], got {keep!r}")
        check_range(f"{where}.latency_batch", self.latency_batch, 1)
        check_range(f"{where}.latency_repeats", self.latency_repeats, 1)


def train(cfg: StudyConfig, trial: int = 0) -> str:
    return stages.train(cfg, trial, METHOD)


def finetune(cfg: StudyConfig, trial: int, model_ref: str) -> str:
    return stages.finetune(cfg, trial, model_ref, METHOD)


def sweep_points(model: nn.Module, cfg: StudyConfig) -> list[tuple[str, str, int, list[str]]]:
    """(sweep, target, clusters pruned, convs) of every point; names are checked
    here, before any run starts, and counts that would leave K < 1 are skipped."""
    km = cfg.kmeans
    widths = {name: conv.out_channels for name, conv in clustering.conv_layers(model).items()}
    points = []
    for stage in km.stages:
        names = clustering.resolve_stage(model, stage)
        points += [("stage", stage, p, names) for p in km.stage_pruned if p < min(widths[n] for n in names)]
    layers = list(km.layers) or list(widths)
    clustering.resolve_layers(model, layers)
    points += [("layer", name, p, [name]) for name in layers for p in km.layer_pruned if p < widths[name]]
    return points


def check_network(cfg: StudyConfig, model: nn.Module, data: ImageData) -> None:
    """Before any run: the sweeps' stage and layer names are the network's, and a network
    asked for merges has convs to merge (one line each)."""
    sweep_points(model, cfg)
    if cfg.kmeans.merge_keep and not merging.can_merge(model, _example(model, data)):
        raise ConfigError(f"model {cfg.model!r} has no conv whose channels k-means can merge exactly (each is summed "
                          "into a residual, read by a depthwise conv or a second normalisation, or is the output): "
                          "set kmeans.merge_keep=[] to run the sweeps alone")


def _example(model: nn.Module, data: ImageData) -> torch.Tensor:
    """Two test images, as the network reads them: what its graph is traced on."""
    return data.normalise(data.test_x[:2]).to(next(model.parameters()).device)


def _start(cfg: StudyConfig, data: ImageData, seed: int, model_ref: str | None) -> tuple[nn.Module, str]:
    """The pretrained network the sweeps start from, and where it came from: a run, model or
    weights file (`kmeans.weights`), else a fresh network from `model_weights`."""
    ref = model_ref or cfg.kmeans.weights
    if ref:
        return common.load_model(ref, cfg, data), ref
    return common.new_model(cfg, data, seed), cfg.model_weights


def _check_weights_named(cfg: StudyConfig, model_ref: str | None) -> None:
    if not (model_ref or cfg.kmeans.weights or cfg.model_weights):
        raise ConfigError("the k-means study starts from pretrained weights: set kmeans.weights=PATH "
                          "(e.g. --set kmeans.weights=resnet20-12fca82f.th), model_weights=PATH (a network's own "
                          "weights file, e.g. torchvision's) or pass --model-uri")


def sweep(cfg: StudyConfig, trial: int = 0, model_ref: str | None = None) -> str:
    """Both sensitivity sweeps and the merges for one k-means seed; returns the parent run id."""
    km = cfg.kmeans
    seed = common.seed_of(cfg, trial)
    _check_weights_named(cfg, model_ref)  # before the data is read
    data = common.load_data(cfg)
    model, ref = _start(cfg, data, seed, model_ref)
    model.eval()
    points = sweep_points(model, cfg)  # bad names fail here, before any run exists
    check_network(cfg, model, data)
    options = dict(distance=km.distance, importance=km.importance, n_init=km.n_init)
    tags = {**common.common_tags(cfg, trial), **common.device_tags(cfg)}
    params = {**common.common_params(cfg, trial, METHOD), "input_model": ref}

    def score(m: nn.Module) -> dict[str, float]:
        return evaluate(m, data.test_x, data.test_y, data.normalise)

    splits = data.splits()
    with common.stage_run(cfg, trial, "prune", f"kmeans-t{trial}", METHOD, params={"input_model": ref},
                          data=data, model_ref=ref) as run:
        base = score(model)
        run.log_metrics({"test_accuracy": base["accuracy"], "test_loss": base["loss"]}, step=0)
        for kind, target, pruned, names in progress.steps(points, "k-means sweep point"):
            clustered = copy.deepcopy(model)
            ks = clustering.cluster_layers(clustered, names, pruned, seed, **options)
            result = score(clustered)
            run.log_child(
                f"{kind}-{target}-p{pruned}-t{trial}",
                tags={**tags, paths.TAG_STAGE: "prune", TAG_SWEEP: kind, TAG_TARGET: target},
                params={**params, "sweep": kind, "target": target, "clusters_pruned": pruned,
                        "clusters": ",".join(str(k) for k in dict.fromkeys(ks.values())), "layers": ",".join(names)},
                metrics={"test_accuracy": result["accuracy"], "test_loss": result["loss"], "clusters_pruned": pruned,
                         "accuracy_drop": base["accuracy"] - result["accuracy"]},
                step=pruned, splits=splits,
                description=f"k-means {kind} sweep point: {target}, {pruned} clusters pruned away per conv, trial {trial}")
            # The same series on the parent, one metric per target with step = clusters pruned.
            run.log_metrics({f"test_accuracy.{kind}.{target}": result["accuracy"]}, step=pruned, flush=False)
        run.flush()
        if km.merge_keep:
            merge(run, model, data, cfg, seed, base, tags, params)
        return run.run_id


def merge(run: Run, model: nn.Module, data: ImageData, cfg: StudyConfig, seed: int,
          base: dict, tags: dict, params: dict) -> None:
    """One child run per kept fraction: the merged network's size, speed and accuracy,
    and how far its outputs are from the unmerged centroid network's and the original's."""
    km = cfg.kmeans
    shape = data.input_shape
    probe = data.normalise(data.test_x[:256])
    example = _example(model, data)
    target = "blocks" if callable(getattr(model, "blocks", None)) else "convs"  # what merges: a ResNet's blocks, or convs
    before = measure.size(model, shape)
    with torch.no_grad():
        original_out = model(probe)
    for keep in progress.steps(km.merge_keep, "merge"):
        plan = merging.plan_merge(model, float(keep), seed, km.distance, km.importance, km.n_init, example)
        centroid_net, merged = copy.deepcopy(model), copy.deepcopy(model)
        merging.apply_merge(centroid_net, plan, centroids_only=True, example=example)
        widths = merging.apply_merge(merged, plan, example=example)
        with torch.no_grad():
            merged_out, centroid_out = merged(probe), centroid_net(probe)
        after = measure.size(merged, shape)
        latency_before, latency_after = measure.paired_latency_ms(model, merged, shape, km.latency_batch, km.latency_repeats)
        result = evaluate(merged, data.test_x, data.test_y, data.normalise)
        metrics = {
            "test_accuracy": result["accuracy"], "test_loss": result["loss"], "test_accuracy_before": base["accuracy"],
            "params_before": before.params, "params": after.params, "params_fraction": after.params / before.params,
            "macs_before": before.macs, "macs": after.macs, "macs_fraction": after.macs / before.macs,
            "latency_ms_before": latency_before, "latency_ms": latency_after,
            "latency_fraction": latency_after / latency_before,
            "max_abs_diff_centroid": (merged_out - centroid_out).abs().max().item(),
            "max_abs_diff_original": (merged_out - original_out).abs().max().item(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            weights = checkpoints.save(merged, Path(tmp) / paths.CHECKPOINT)
            summary = Path(tmp) / paths.SUMMARY_AFTER
            summary.write_text(after.summary)
            run.log_child(
                f"merge-keep{keep}-t{params['trial']}",
                tags={**tags, paths.TAG_STAGE: "prune", TAG_SWEEP: "merge", TAG_TARGET: target},
                params={**params, "sweep": "merge", "target": target, "keep": keep,
                        "mid_widths": ",".join(str(w) for w in widths.values())},
                metrics=metrics, files=[weights, summary], splits=data.splits(),
                description=f"merge keeping {keep} of each mergeable conv's channels, trial {params['trial']}")


# --------------------------------------------------------------------------- report

def sweep_table(cfg: StudyConfig, sweep: str) -> pd.DataFrame:
    """One row per (target, clusters pruned, trial): the newest finished child run, at these settings."""
    rows, seen = [], set()
    for r in reporting.find_study_runs(cfg, f"tags.{TAG_SWEEP} = '{sweep}'", REPORT_IGNORES):  # newest first
        p = r.data.params
        key = (p.get("target"), p.get("clusters_pruned", p.get("keep")), r.data.tags.get(paths.TAG_TRIAL))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"target": p.get("target"), "trial": int(r.data.tags.get(paths.TAG_TRIAL, -1)),
                     "run_id": r.info.run_id, **{k: v for k, v in p.items() if k in ("clusters_pruned", "clusters", "keep", "mid_widths")},
                     **r.data.metrics})
    reporting.drew(row["run_id"] for row in rows)
    table = pd.DataFrame(rows)
    if len(table) and "clusters_pruned" in table:
        table["clusters_pruned"] = table["clusters_pruned"].astype(int)
    return table


def _band(rows: pd.DataFrame, x: str = "clusters_pruned") -> pd.DataFrame:
    """reporting.band's shape (step, mean, min, max, count) from a sweep table, against column `x`."""
    long = pd.DataFrame({"metric": "acc", "step": rows[x], "value": rows["test_accuracy"]})
    return reporting.band(long, "acc")


def _trials(rows: pd.DataFrame) -> int:
    return int(rows["trial"].nunique())


def fraction_pruned(table: pd.DataFrame) -> pd.Series:
    """Clusters pruned away as a fraction of the conv's filters: C - K over C, with C = (C - K) + K
    (`clusters` lists the K of each conv; the convs of one stage have the same width)."""
    k = table["clusters"].astype(str).str.split(",").str[0].astype(int)
    return table["clusters_pruned"] / (table["clusters_pruned"] + k)


def figure_stages(cfg: StudyConfig, table: pd.DataFrame) -> plt.Figure:
    """Per-stage sensitivity against the count and against the fraction of each conv's filters
    clustered away: stage 1 (16 filters) looks most sensitive by count and least by fraction."""
    table = table.assign(fraction_pruned=fraction_pruned(table))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for x, ax, xlabel in (("clusters_pruned", axes[0], "clusters pruned away per conv (C - K)"),
                          ("fraction_pruned", axes[1], "fraction of each conv's filters pruned away ((C - K) / C)")):
        for stage in sorted(table["target"].unique()):
            rows = table[table.target == stage]
            reporting.plot_band(ax, _band(rows, x), f"{stage} (all convs), {_trials(rows)} seeds")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(f"{cfg.study}: k-means per stage")
    fig.tight_layout()
    return fig


def _stage_of(layer: str) -> str:
    """A layer's panel: its top-level module (`layer1`, `features`); a conv at the top is the stem."""
    return layer.split(".")[0] if "." in layer else "stem"


def figure_layers(cfg: StudyConfig, table: pd.DataFrame) -> plt.Figure:
    """One panel per stage (2 x 2 so that legends stay readable at the figure's size)."""
    order = sorted(table["target"].unique(), key=_network_order)
    panels = list(dict.fromkeys(_stage_of(name) for name in order))
    columns = min(2, len(panels))
    rows_of_panels = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.5 * columns, 4.2 * rows_of_panels),
                             sharey=True, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        names = [n for n in order if _stage_of(n) == panel]
        colours = plt.cm.viridis([i / max(len(names) - 1, 1) for i in range(len(names))])
        for name, colour in zip(names, colours):
            rows = table[table.target == name]
            reporting.plot_band(ax, _band(rows), name.removeprefix(f"{panel}."), say_band=False, color=colour, markersize=4)
        ax.set_title(f"{panel}: each conv alone")
        ax.set_xlabel("clusters pruned away (C - K)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{cfg.study}: k-means per conv layer, in network order (mean, min-max of {_trials(table)} seeds)")
    fig.tight_layout()
    return fig


def _network_order(name: str) -> tuple:
    """conv1 < layer1.0.conv1 < layer1.0.conv2 < ... < layer3.2.conv2 (numbers as numbers:
    features.2 < features.10); top-level convs (the stem) first."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
    return ("." in name, parts)


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


def report(cfg: StudyConfig) -> common.Report:
    stages, layers, merges = (sweep_table(cfg, s) for s in ("stage", "layer", "merge"))
    if stages.empty and layers.empty:
        raise reporting.no_runs(cfg, "k-means sweep runs", () if cfg.kmeans.weights else ("--set kmeans.weights=PATH",))
    figures = {}
    if not stages.empty:
        figures["accuracy_vs_clusters_pruned_per_stage.png"] = figure_stages(cfg, stages)
    if not layers.empty:
        figures["accuracy_vs_clusters_pruned_per_layer.png"] = figure_layers(cfg, layers)
    return figures, merge_summary(merges)


KIND = common.StudyKind(
    name="kmeans_clustering",
    entry_points={
        "train": common.EntryPoint(train, "train the network from scratch (the sweeps start from pretrained weights)"),
        "prune": common.EntryPoint(sweep, "k-means sweeps per stage and per layer, then real merges, as child runs",
                                   reads_model=True),
        "finetune": common.EntryPoint(finetune, "train a (merged) model further", reads_model=True),
    },
    steps=lambda cfg: [("prune", None)],  # pretrained weights in: one sweep process per k-means seed
    report=report,
    sections={"kmeans": KMeansConfig, "finetune": TrainConfig},
    deliverable=None,  # a family of merges, not one model: see the module's docstring
    model_protocol=base.Clusterable,
    any_network=True,  # a factory's network: every conv clusters, its graph says which merge (pruning.merging)
    model_checks=(check_network,),
    names=(("k-means distance", "kmeans.distance", lambda c: c.kmeans.distance, clustering.DISTANCES),
           ("k-means importance", "kmeans.importance", lambda c: c.kmeans.importance, clustering.IMPORTANCES),
           common.FINETUNE_OPTIMIZER, common.FINETUNE_PRECISION),
)
