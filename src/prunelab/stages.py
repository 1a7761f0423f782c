"""The pipeline's stages: train, prune, finetune. Each reads its inputs, runs
the library code (loop, criteria, surgery) and hands results to tracking."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunelab import checkpoints, data as datasets, measure, models, paths, tracking
from prunelab.config import StudyConfig, TrainConfig
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import criteria, schedule, surgery
from prunelab.train import eval_mode, evaluate, fit


def common_tags(cfg: StudyConfig, trial: int) -> dict:
    return {paths.TAG_STUDY: cfg.study, paths.TAG_TRIAL: trial, paths.TAG_SEED: cfg.seed + trial}


def common_params(cfg: StudyConfig, trial: int) -> dict:
    # The same names in every study, so any two runs compare side by side.
    # `seed` is the trial's own seed (the preset's `seed` is that of trial 0).
    return {**cfg.flat(), "study": cfg.study, "model": cfg.model, "dataset": cfg.data.dataset,
            "method": cfg.prune.method, "trial": trial, "seed": cfg.seed + trial}


def log_size(run: tracking.Run, model: nn.Module, input_shape, step: int, summary_file: str | None = None) -> measure.Size:
    size = measure.size(model, input_shape)
    run.log_metrics({"params": size.params, "macs": size.macs}, step=step)
    if summary_file:
        run.log_text(size.summary, summary_file)
    return size


def train_model(run: tracking.Run, model: nn.Module, data: datasets.ImageData, cfg: TrainConfig, seed: int,
                prefix: str = "") -> list:
    """Fit and log per-epoch metrics (step = epoch), one batch of metrics per epoch."""
    def on_epoch(result):
        run.log_metrics({f"{prefix}{k}": v for k, v in result.metrics().items()}, step=result.epoch)
    augment = datasets.random_crop_flip if data.augment else None
    return fit(model, data, cfg, seed, on_epoch=on_epoch, desc=prefix.rstrip("_") or "train", augment=augment)


def load_input_model(ref: str, model_name: str | None = None) -> nn.Module:
    """A model from a weights file, a run id or a model URI."""
    from pathlib import Path

    if Path(ref).suffix in (".pt", ".pth", ".th", ".tar") or Path(ref).is_file():
        return checkpoints.load(ref, model_name)
    return tracking.load_model(ref)


def check_fits(model: nn.Module, data: datasets.ImageData) -> None:
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(data.normalise(data.test_x[:2]))
    except RuntimeError as exc:
        raise ModelError(f"the model does not accept {data.name} images {tuple(data.input_shape)}: "
                         f"{str(exc).splitlines()[0][:120]}") from None
    if out.shape[-1] != data.num_classes:
        raise ModelError(f"the model predicts {out.shape[-1]} classes, {data.name} has {data.num_classes}")


def check_names(cfg: StudyConfig) -> None:
    """Fail on an unknown model, dataset or method (or study kind) before loading anything."""
    checks = [("model", cfg.model, models.MODELS), ("dataset", cfg.data.dataset, datasets.DATASETS)]
    if by_kind(cfg.kind).get("prune") is prune:  # kinds with their own pruning read other settings
        checks.append(("pruning method", cfg.prune.method, criteria.CRITERIA))
    for what, name, registry in checks:
        if name not in registry:
            raise ConfigError(f"unknown {what} {name!r}: choose one of {', '.join(sorted(registry))}")


# --------------------------------------------------------------------------- train

def train(cfg: StudyConfig, trial: int = 0) -> str:
    """Train `cfg.model` from scratch; returns the run id."""
    seed = cfg.seed + trial
    data = datasets.get(cfg.data)
    torch.manual_seed(seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes)
    example = data.normalise(data.test_x[:2])
    with tracking.run(cfg.study, "train", common_tags(cfg, trial), f"train-t{trial}") as run:
        run.log_params(common_params(cfg, trial))
        log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_BEFORE)
        train_model(run, model, data, cfg.train, seed)
        run.log_model(model, paths.MODEL, example, final=True)
        return run.run_id


# --------------------------------------------------------------------------- prune

def _filters(model: nn.Module) -> dict[str, int]:
    return {name: conv.out_channels for name, conv in model.prunable_convs().items()}


def _smallest_fraction(model: nn.Module, kind: str, example: torch.Tensor) -> tuple[float, str]:
    """What remains (as a fraction) when every prunable layer keeps one filter."""
    widths = _filters(model)
    if kind == "filters":
        return len(widths) / sum(widths.values()), next(iter(widths))
    slim = copy.deepcopy(model)
    surgery.remove_filters(slim, {n: list(range(1, w)) for n, w in widths.items()}, example)
    return models.count_params(slim) / models.count_params(model), next(iter(widths))


def prune(cfg: StudyConfig, trial: int = 0, model_ref: str | None = None) -> str:
    """Rank, remove and (optionally) fine-tune filters step by step until the target; returns the run id."""
    pc = cfg.prune
    seed = cfg.seed + trial
    data = datasets.get(cfg.data)
    criterion = criteria.get(pc.method, seed)
    if model_ref:
        model = load_input_model(model_ref, cfg.model)
    else:
        torch.manual_seed(seed)
        model = models.build(cfg.model, data.input_shape, data.num_classes)
    check_fits(model, data)
    example = data.normalise(data.test_x[:2])
    # Refuse an unreachable target before a run starts or a model trains.
    smallest, layer = _smallest_fraction(model, pc.target_kind, example)
    schedule.check_reachable(pc.target, pc.target_kind, smallest, layer)
    with tracking.run(cfg.study, "prune", common_tags(cfg, trial), f"prune-t{trial}") as run:
        run.log_params({**common_params(cfg, trial), "input_model": model_ref or "trained in this run"})
        if not model_ref:
            train_model(run, model, data, cfg.train, seed, prefix="pretrain_")
        params0, filters0 = models.count_params(model), sum(_filters(model).values())
        size0 = measure.size(model, data.input_shape)
        run.log_text(size0.summary, paths.SUMMARY_BEFORE)
        rank_x = data.train_x[: pc.rank_images or None]
        rank_y = data.train_y[: pc.rank_images or None]

        def remaining() -> float:
            if pc.target_kind == "filters":
                return sum(_filters(model).values()) / filters0
            return models.count_params(model) / params0

        def log_round(k: int) -> None:
            size = measure.size(model, data.input_shape)
            test = evaluate(model, data.test_x, data.test_y, data.normalise)
            widths = _filters(model)
            metrics = {"params": size.params, "macs": size.macs, "fraction_remaining": size.params / params0,
                       "filters": sum(widths.values()), "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
            if pc.latency_repeats:
                metrics["latency_ms"] = measure.latency_ms(model, data.input_shape, repeats=pc.latency_repeats,
                                                           warmup=min(5, pc.latency_repeats))
            metrics.update({f"filters_left.{n}": w for n, w in widths.items()})
            run.log_metrics(metrics, step=k)

        log_round(0)
        k = 0
        while remaining() > pc.target:
            k += 1
            rb = pc.rank_batch_size
            batches = datasets.batches(rank_x, rank_y, rb, data.normalise)
            scores = criterion(model, model.prunable_convs(), batches, total=(len(rank_y) + rb - 1) // rb)
            plan = schedule.plan_step(scores, pc.filters_per_step)
            surgery.remove_filters(model, plan, example)
            log_round(k)
            done = remaining() <= pc.target
            if not done and pc.finetune_epochs_between:
                between = TrainConfig(**{**cfg.finetune.__dict__, "epochs": pc.finetune_epochs_between})
                augment = datasets.random_crop_flip if data.augment else None
                last = fit(model, data, between, seed + 1000 * k, desc=f"finetune round {k}", augment=augment)[-1]
                # Step k's accuracy after retraining, beside its accuracy right after the removal.
                run.log_metrics({"retrained_test_loss": last.test_loss, "retrained_test_accuracy": last.test_accuracy}, step=k)
            if not done and k % pc.log_models_every == 0:
                run.log_model(model, paths.round_model(k), example)
        size = measure.size(model, data.input_shape)
        run.log_text(size.summary, paths.SUMMARY_AFTER)
        run.log_metrics({"rounds": k, "macs_fraction": size.macs / size0.macs}, step=k)
        run.log_model(model, paths.MODEL, example, final=True)
        return run.run_id


# --------------------------------------------------------------------------- finetune

def finetune(cfg: StudyConfig, trial: int, model_ref: str) -> str:
    """Train a (pruned) model further; returns the run id."""
    seed = cfg.seed + trial
    data = datasets.get(cfg.data)
    model = load_input_model(model_ref, cfg.model)
    check_fits(model, data)
    example = data.normalise(data.test_x[:2])
    with tracking.run(cfg.study, "finetune", common_tags(cfg, trial), f"finetune-t{trial}") as run:
        run.log_params({**common_params(cfg, trial), "input_model": model_ref})
        before = evaluate(model, data.test_x, data.test_y, data.normalise)
        run.log_metrics({"test_loss": before["loss"], "test_accuracy": before["accuracy"]}, step=0)
        log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_AFTER)
        train_model(run, model, data, cfg.finetune, seed + 10_000)
        run.log_model(model, paths.MODEL, example, final=True)
        return run.run_id


# --------------------------------------------------------------------------- by study kind

def by_kind(kind: str) -> dict:
    """Entry point name -> stage function, for a study kind."""
    # Imported late: both build on this module's helpers.
    from prunelab import kmeans_stages, lottery, transfer_stages

    kinds = {"filter_pruning": {"train": train, "prune": prune, "finetune": finetune},
             "lottery_ticket": lottery.STAGES,
             "transfer_pruning": {"train": transfer_stages.train, "prune": prune, "finetune": finetune},
             "kmeans_clustering": {"train": train, "finetune": finetune, **kmeans_stages.STAGES}}
    if kind not in kinds:
        raise ConfigError(f"study kind {kind!r} has no stages: choose one of {', '.join(kinds)}")
    return kinds[kind]
