"""Transfer pruning (kind `transfer_pruning`): pretrained features, a new head, iterative Taylor pruning.

| entry point | does | reads | logs |
|---|---|---|---|
| `train` | transfer: pretrained (or random) features, frozen, computed once per image; a new head trained on them | the data, `transfer.weights` | as filter pruning's `train`, plus `skipped_images`, `latency_ms`, `transfer_seconds`, `weights_source` |
| `prune` | filter pruning's `prune`: rank, remove `prune.filters_per_step` filters, retrain `prune.finetune_epochs_between` epochs, until `prune.target` remains | a train run | as filter pruning's `prune` plus `retrained_test_*` per step |
| `finetune` | the whole pruned network, `finetune.epochs` more | a prune run | as filter pruning's `finetune` |

The model is any `models/base.TransferBackbone`: VGG16 (ImageNet features, all 13
convs prunable; `taylor-vgg16-dogscats`) or a CIFAR ResNet (a CIFAR-10 checkpoint's
features, the first conv of each basic block prunable; `taylor-resnet20-dogscats`).

Every run's final model is logged for users (pixels in, pt2 and ONNX); `main`
registers each trial's `finetune` model, the fully retrained pruned network
(`StudyKind.deliverable`), as a version of the registered model named after the study.

The report draws accuracy against the share of parameters removed (right
after each removal and after retraining; filter pruning's figure, saying so
when the features were random), the filters left per conv, and a
before/after table of parameters, MACs, CPU latency and accuracy.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch

from prunelab import measure, models, paths, reporting, transfer
from prunelab.config import StudyConfig, TrainConfig, check_range, setting
from prunelab.errors import ConfigError
from prunelab.models import base, factory
from prunelab.pruning import criteria
from prunelab.studies import common, filter_pruning, stages
from prunelab.studies.filter_pruning import PruneConfig


@dataclass(frozen=True)
class TransferConfig:
    pretrained: bool = setting("start from torchvision's ImageNet weights (or transfer.weights); false: random features", True)
    weights: str = setting("local state-dict file of the pretrained network (e.g. torchvision's vgg16-397923af.pth, "
                           "a CIFAR ResNet's resnet20-12fca82f.th)", "")
    head_width: int = setting("width of the head's two hidden Linear layers (vgg16); 0 for a model whose head is one "
                              "Linear (the CIFAR ResNets)", 4096)
    feature_batch_size: int = setting("images per forward pass when the frozen features are computed once", 64)

    def validate(self, where: str = "transfer") -> None:
        check_range(f"{where}.head_width", self.head_width, 0)
        check_range(f"{where}.feature_batch_size", self.feature_batch_size, 1)


def check_head(cfg: StudyConfig) -> None:
    """transfer.head_width fits the model's head: hidden layers need a width, a single Linear has none."""
    width = cfg.transfer.head_width
    if factory.is_factory(cfg.model):
        if width:
            raise ConfigError(f"transfer.head_width must be 0 for {cfg.model}: a network from a factory keeps its own "
                              f"classifier's shape, with a new last Linear for the data's classes; got {width}")
        return
    if models.takes(cfg.model, "hidden"):
        if width < 1:
            raise ConfigError(f"transfer.head_width must be >= 1 for {cfg.model}, whose head has hidden layers that wide; "
                              f"got {width}")
    elif width:
        raise ConfigError(f"transfer.head_width must be 0 for {cfg.model}, whose head is one Linear on the pooled features; "
                          f"got {width}: set transfer.head_width=0")


# A weights path says where the same weights were read from: not a setting that changes a result.
REPORT_IGNORES = frozenset({"transfer.weights"})


def train(cfg: StudyConfig, trial: int = 0) -> str:
    """Transfer: pretrained (or random) features, frozen; a new head trained on cached features."""
    tc = cfg.transfer
    seed = common.seed_of(cfg, trial)
    data = common.load_data(cfg)
    torch.manual_seed(seed)
    # A missing or foreign weights file fails before any run.
    model, source = transfer.build(cfg.model, data, tc.weights, tc.pretrained, tc.head_width)
    model.to(data.device)
    with common.stage_run(cfg, trial, "train", f"train-t{trial}", filter_pruning.method(cfg),
                          params={"weights_source": source}, data=data) as run:
        stages.log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_BEFORE)
        run.log_metrics({"skipped_images": data.skipped, "fraction_remaining": 1.0}, step=0)
        if cfg.prune.latency_repeats:
            latency = measure.latency_ms(model, data.input_shape, repeats=cfg.prune.latency_repeats,
                                         warmup=min(5, cfg.prune.latency_repeats))
            run.log_metrics({"latency_ms": latency}, step=0)

        def on_epoch(result):
            run.log_metrics(result.metrics(), step=result.epoch)

        start = time.perf_counter()
        transfer.train_head(model, data, cfg.train, seed, tc.feature_batch_size, on_epoch=on_epoch)
        run.log_metrics({"transfer_seconds": time.perf_counter() - start}, step=cfg.train.epochs)
        transfer.backbone(model).set_features_trainable(True)  # the next stages prune and retrain the features
        stages.log_model(run, model, data, paths.MODEL, step=cfg.train.epochs, final=True,
                         carry=stages.UNCHANGED_BY_TRAINING)
        return run.run_id


# Pruning (Taylor ranking, removal, retraining between steps) and the final
# fine-tuning are filter pruning's stages, unchanged.
prune = filter_pruning.prune
finetune = filter_pruning.finetune


# --------------------------------------------------------------------------- report

STEP_METRICS = ["params", "macs", "latency_ms", "filters", "test_accuracy", "test_loss",
                "retrained_test_accuracy", "retrained_test_loss"]


def _network_order(key: str) -> list:
    """features.2 before features.10, layer1.2.conv1 before layer2.0.conv1: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _layer_keys(runs: dict) -> list[str]:
    keys = {k for r in runs.values() for k in r.data.metrics if k.startswith("filters_left.")}
    return sorted(keys, key=_network_order)


def _last(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per trial, the value at the highest step."""
    sub = df[df.metric == metric]
    return sub.sort_values("step").groupby("trial")["value"].last()


def _first(df: pd.DataFrame, metric: str) -> pd.Series:
    sub = df[df.metric == metric]
    return sub.sort_values("step").groupby("trial")["value"].first()


def weights_needed(cfg: StudyConfig) -> tuple[str, ...]:
    """What a command that runs the study must add for its pretrained features: a weights file,
    unless it has one or starts from random features (a published download works only online)."""
    return ("--weights PATH",) if cfg.transfer.pretrained and not cfg.transfer.weights else ()


def report(cfg: StudyConfig) -> common.Report:
    prune_runs, ft_runs = (reporting.stage_runs(cfg, stage, REPORT_IGNORES) for stage in ("prune", "finetune"))
    if not prune_runs:
        raise reporting.no_runs(cfg, "prune runs", weights_needed(cfg))
    layers = _layer_keys(prune_runs)
    steps = reporting.histories(prune_runs, STEP_METRICS + layers)
    final = reporting.histories(ft_runs, ["test_accuracy", "params"])
    figures = {"accuracy_vs_params_removed.png": filter_pruning.accuracy_figure(cfg, steps, final, features_note(prune_runs)),
               "filters_left.png": _filters_figure(cfg, steps, layers, len(prune_runs))}
    return figures, before_after_table(steps, final, layers)


def features_note(runs: dict) -> str:
    """What the figure must say when the runs' features were not pretrained: their accuracy is
    then a head's on random features, near chance, and would otherwise read as a failure of pruning."""
    random = sum(r.data.params.get("transfer.pretrained") == str(False) for r in runs.values())
    if not random:
        return ""
    which = "" if random == len(runs) else f" in {random} of {len(runs)} trials"
    return f"random features{which}: not pretrained (transfer.pretrained=false)"


def _filters_figure(cfg: StudyConfig, steps: pd.DataFrame, layers: list[str], trials: int) -> plt.Figure:
    """Per prunable conv, in network order: its filters before pruning and at the end (mean,
    min-max over trials), each bar labelled with what is left of it."""
    names = [k.removeprefix("filters_left.") for k in layers]
    start = [_first(steps, k).mean() for k in layers]
    end = [_last(steps, k) for k in layers]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(layers) + 2), 4.8))
    pos = range(len(layers))
    ax.bar(pos, start, color="none", edgecolor="gray", label="before pruning")
    means = [e.mean() for e in end]
    err = [[m - e.min() for m, e in zip(means, end)], [e.max() - m for m, e in zip(means, end)]]
    ax.bar(pos, means, yerr=err, capsize=3, color="tab:blue", alpha=0.8, label=f"left at the end: mean, min-max of {trials} trials")
    for x, (m, s) in enumerate(zip(means, start)):
        ax.annotate(f"{m:.0f}/{s:.0f}", (x, s), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(list(pos))
    ax.set_xticklabels(names, fontsize=7, rotation=40, ha="right")
    ax.set_ylabel("filters")
    ax.set_title(f"{cfg.study}: filters per pruned conv (left / before)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_table(steps: pd.DataFrame, final: pd.DataFrame, layers: list[str] = ()) -> pd.DataFrame:
    """Mean over trials (accuracy also min and max) of the model before pruning, right after the
    last pruning step, and after the final fine-tuning; then the mean filters of each pruned
    layer (`layers`: its `filters_left.<layer>` metrics), one column per layer."""
    rows = []

    def row(name, pick, acc):
        rows.append({"model": name, "trials": len(acc), "params": pick(steps, "params").mean(),
                     "filters": pick(steps, "filters").mean(), "macs": pick(steps, "macs").mean(),
                     "latency_ms": pick(steps, "latency_ms").mean(),
                     "test_accuracy_mean": acc.mean(), "test_accuracy_min": acc.min(), "test_accuracy_max": acc.max(),
                     **{key.removeprefix("filters_left."): pick(steps, key).mean() for key in layers}})

    row("before pruning (transfer only)", _first, _first(steps, "test_accuracy"))
    row("pruned, before fine-tuning", _last, _last(steps, "test_accuracy"))
    accs = _last(final, "test_accuracy")
    if len(accs):
        row("pruned + fine-tuned", _last, accs)  # same network as the last step: same size and latency
    table = pd.DataFrame(rows)
    for col in ("params", "macs", "latency_ms"):
        table[f"{col}_fraction"] = table[col] / table[col].iloc[0]
    names = [key.removeprefix("filters_left.") for key in layers]
    return table[[c for c in table.columns if c not in names] + names]  # the layers last


KIND = common.StudyKind(
    name="transfer_pruning",
    entry_points={
        "train": common.EntryPoint(train, "transfer: a new head on frozen pretrained features, computed once"),
        "prune": common.EntryPoint(prune, "rank, remove and retrain filters until prune.target remains",
                                   reads_model=True),
        "finetune": common.EntryPoint(finetune, "train the whole pruned network further", reads_model=True),
    },
    steps=common.chain("train", "prune", "finetune"),
    report=report,
    sections={"prune": PruneConfig, "finetune": TrainConfig, "transfer": TransferConfig},
    deliverable="finetune",
    model_protocol=base.TransferBackbone,
    any_network=True,  # a factory's network through transfer.ClassifierHead: its last Linear is the head
    names=(("pruning method", "prune.method", filter_pruning.method, criteria.CRITERIA), common.FINETUNE_OPTIMIZER, common.FINETUNE_PRECISION),
    checks=(check_head,),
    flags=(
        # Absolute: the stages of a study may run in another folder than the one typed in.
        common.Flag("--weights", "local pretrained state-dict file (same as transfer.weights=PATH)",
                    lambda path: f"transfer.weights={os.path.abspath(path)}" if path else None),
        common.Flag("--no-pretrained", "random initial features (same as transfer.pretrained=false)",
                    lambda given: "transfer.pretrained=false" if given else None, action="store_true"),
    ),
)
