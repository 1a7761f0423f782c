"""Stages of the k-means filter-clustering study (kind `kmeans_clustering`).

`prune` for this kind is one process per trial (trial = k-means seed) that
starts from pretrained weights and writes one child run per sweep point:
  - per stage: every conv of layer1 (layer2, layer3) clustered at once, for
    each number of clusters pruned away (C - K);
  - per layer: each conv alone, in network order;
  - merge: every block-internal conv clustered with BN folded in and merged
    for real, for each kept fraction, with parameters, MACs and CPU latency
    before and after.
Each point is computed first and logged as a finished child run in three
calls, so a sweep of a hundred points costs seconds of tracking, not a
process start per point.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab import checkpoints, data as datasets, measure, paths, tracking
from prunelab.config import StudyConfig
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import clustering, merging
from prunelab.stages import check_fits, common_params, common_tags, load_input_model
from prunelab.train import evaluate

TAG_SWEEP = "sweep"    # stage | layer | merge (absent on the parent run)
TAG_TARGET = "target"  # the stage, the conv or "blocks" the point clusters


def sweep_points(model: nn.Module, cfg: StudyConfig) -> list[tuple[str, str, int, list[str]]]:
    """(sweep, target, clusters pruned, convs) of every point; names are checked
    here, before any run starts, and counts that would leave K < 1 are skipped."""
    km = cfg.kmeans
    if not hasattr(model, "stage_convs"):
        raise ModelError(f"{cfg.model} has no stages to sweep: k-means clustering needs a CIFAR ResNet (resnet20, ...)")
    widths = {name: conv.out_channels for name, conv in model.conv_layers().items()}
    points = []
    for stage in km.stages:
        names = clustering.resolve_stage(model, stage)
        points += [("stage", stage, p, names) for p in km.stage_pruned if p < min(widths[n] for n in names)]
    layers = list(km.layers) or list(widths)
    clustering.resolve_layers(model, layers)
    points += [("layer", name, p, [name]) for name in layers for p in km.layer_pruned if p < widths[name]]
    return points


def _weights_ref(cfg: StudyConfig, model_ref: str | None) -> str:
    ref = model_ref or cfg.kmeans.weights
    if not ref:
        raise ConfigError("the k-means study starts from pretrained weights: set kmeans.weights=PATH "
                          "(e.g. --set kmeans.weights=resnet20-12fca82f.th) or pass --model-uri")
    return ref


def sweep(cfg: StudyConfig, trial: int = 0, model_ref: str | None = None) -> str:
    """Both sensitivity sweeps and the merges for one k-means seed; returns the parent run id."""
    km = cfg.kmeans
    seed = cfg.seed + trial
    ref = _weights_ref(cfg, model_ref)
    model = load_input_model(ref, cfg.model).eval()
    data = datasets.get(cfg.data)
    check_fits(model, data)
    points = sweep_points(model, cfg)  # bad names fail here, before any run exists
    options = dict(distance=km.distance, importance=km.importance, n_init=km.n_init)
    tags = common_tags(cfg, trial)
    params = {**common_params(cfg, trial), "method": "kmeans", "input_model": ref}

    def score(m: nn.Module) -> dict[str, float]:
        return evaluate(m, data.test_x, data.test_y, data.normalise)

    with tracking.run(cfg.study, "prune", tags, f"kmeans-t{trial}") as run:
        run.log_params(params)
        base = score(model)
        run.log_metrics({"test_accuracy": base["accuracy"], "test_loss": base["loss"]}, step=0)
        for kind, target, pruned, names in tqdm(points, desc=f"k-means sweep t{trial}", disable=None):
            clustered = copy.deepcopy(model)
            ks = clustering.cluster_layers(clustered, names, pruned, seed, **options)
            result = score(clustered)
            tracking.log_child_run(
                run, f"{kind}-{target}-p{pruned}-t{trial}",
                tags={**tags, paths.TAG_STAGE: "prune", TAG_SWEEP: kind, TAG_TARGET: target},
                params={**params, "sweep": kind, "target": target, "clusters_pruned": pruned,
                        "clusters": ",".join(str(k) for k in dict.fromkeys(ks.values())), "layers": ",".join(names)},
                metrics={"test_accuracy": result["accuracy"], "test_loss": result["loss"], "clusters_pruned": pruned,
                         "accuracy_drop": base["accuracy"] - result["accuracy"]},
                step=pruned)
            # The same series on the parent, one metric per target with step = clusters pruned.
            run.log_metrics({f"test_accuracy.{kind}.{target}": result["accuracy"]}, step=pruned, flush=False)
        run.flush()
        if km.merge_keep:
            merge(run, model, data, cfg, seed, base, tags, params)
        return run.run_id


def merge(run: tracking.Run, model: nn.Module, data: datasets.ImageData, cfg: StudyConfig, seed: int,
          base: dict, tags: dict, params: dict) -> None:
    """One child run per kept fraction: the merged network's size, speed and accuracy,
    and how far its outputs are from the unmerged centroid network's and the original's."""
    km = cfg.kmeans
    if not hasattr(model, "blocks"):
        raise ModelError(f"{cfg.model} has no basic blocks to merge: merging needs a CIFAR ResNet")
    shape = data.input_shape
    probe = data.normalise(data.test_x[:256])
    before = measure.size(model, shape)
    with torch.no_grad():
        original_out = model(probe)
    for keep in tqdm(km.merge_keep, desc="merge", disable=None):
        plan = merging.plan_merge(model, float(keep), seed, km.distance, km.importance, km.n_init)
        centroid_net, merged = copy.deepcopy(model), copy.deepcopy(model)
        merging.apply_merge(centroid_net, plan, centroids_only=True)
        widths = merging.apply_merge(merged, plan)
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
            tracking.log_child_run(
                run, f"merge-keep{keep}-t{params['trial']}",
                tags={**tags, paths.TAG_STAGE: "prune", TAG_SWEEP: "merge", TAG_TARGET: "blocks"},
                params={**params, "sweep": "merge", "target": "blocks", "keep": keep,
                        "mid_widths": ",".join(str(w) for w in widths.values())},
                metrics=metrics, files=[weights, summary])


STAGES = {"prune": sweep}
