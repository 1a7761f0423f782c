"""The stages several study kinds reuse, and what they log with: train from scratch,
fine-tune a (pruned) network (optionally distilling from the unpruned one), log a model
for users, log a network's size. Each stage opens its run through `common.stage_run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from prunelab import measure, paths
from prunelab.config import StudyConfig, TrainConfig
from prunelab.data.base import ImageData, random_crop_flip
from prunelab.errors import ConfigError
from prunelab.studies.common import for_users, load_data, load_model, new_model, seed_of, stage_run
from prunelab.tracking import query, run as runs
from prunelab.train import evaluate, fit


def log_model(run: runs.Run, model: nn.Module, data: ImageData, name: str, step: int, final: bool = False,
              carry: tuple[str, ...] = (), weights_only: bool = False) -> str:
    """Log the network for users (pixels in, see `for_users`), with an example of two test
    images, at `step`; a final one also as ONNX and as the weights-only checkpoint of the
    bare network, which the next stage reads. Returns the model URI."""
    metadata = {"input": "float32 pixels in [0, 1], N x C x H x W; the data set's normalisation is inside the model",
                "image_shape": list(data.input_shape), "mean": list(data.mean), "std": list(data.std),
                "pixel_range": [0.0, 1.0], "classes": list(data.classes), "dataset": data.name}
    return run.log_model(for_users(model, data), name, data.pixels(data.test_x[:2]), step, final=final,
                         checkpoint=model if final or weights_only else None, metadata=metadata, carry=carry,
                         weights_only=weights_only)


# Metrics logged once when a stage starts that still describe its final model: training
# does not change a network's size or speed.
UNCHANGED_BY_TRAINING = ("params", "macs", "fraction_remaining", "latency_ms")


def log_size(run: runs.Run, model: nn.Module, input_shape, step: int, summary_file: str | None = None) -> measure.Size:
    size = measure.size(model, input_shape)
    run.log_metrics({"params": size.params, "macs": size.macs}, step=step)
    if summary_file:
        run.log_text(size.summary, summary_file)
    return size


def augmentation(data: ImageData):
    return random_crop_flip if data.augment else None


def train_model(run: runs.Run, model: nn.Module, data: ImageData, cfg: TrainConfig, seed: int,
                prefix: str = "", teacher: nn.Module | None = None) -> list:
    """Fit and log per-epoch metrics (step = epoch), one batch of metrics per epoch."""
    def on_epoch(result):
        run.log_metrics({f"{prefix}{k}": v for k, v in result.metrics().items()}, step=result.epoch)
    return fit(model, data, cfg, seed, on_epoch=on_epoch, desc=prefix.rstrip("_") or "train", augment=augmentation(data),
               teacher=teacher)


def distilling(cfg: TrainConfig) -> bool:
    return bool(cfg.distill_temperature and cfg.distill_weight)


def unpruned_ref(model_ref: str) -> str:
    """The network a prune run started from (its `input_model`): the teacher of distillation."""
    params = query.get_run(model_ref).data.params if query.is_run_id(model_ref) else {}
    ref = params.get("input_model", "")
    if not (query.is_run_id(ref) or Path(ref).is_file()):
        raise ConfigError(f"finetune.distill_temperature needs the unpruned network, but {model_ref} names none it "
                          "started from (prune from a train run), or set finetune.distill_temperature=0")
    return ref


def with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    return dataclasses.replace(cfg, epochs=epochs)


# --------------------------------------------------------------------------- shared stages

def train(cfg: StudyConfig, trial: int, method: str) -> str:
    """Train `cfg.model` from scratch; returns the run id."""
    seed = seed_of(cfg, trial)
    data = load_data(cfg)
    model = new_model(cfg, data, seed)
    with stage_run(cfg, trial, "train", f"train-t{trial}", method, data=data) as run:
        log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_BEFORE)
        run.log_metrics({"fraction_remaining": 1.0}, step=0)  # the original: nothing pruned yet
        train_model(run, model, data, cfg.train, seed)
        log_model(run, model, data, paths.MODEL, step=cfg.train.epochs, final=True, carry=UNCHANGED_BY_TRAINING)
        return run.run_id


def finetune(cfg: StudyConfig, trial: int, model_ref: str, method: str) -> str:
    """Train a (pruned) model further with the `finetune` settings; returns the run id."""
    seed = seed_of(cfg, trial)
    data = load_data(cfg)
    model = load_model(model_ref, cfg, data)
    # Distillation's teacher, the network before pruning, found (or refused) before the run starts.
    teacher_ref = unpruned_ref(model_ref) if distilling(cfg.finetune) else None
    teacher = load_model(teacher_ref, cfg, data) if teacher_ref else None
    with stage_run(cfg, trial, "finetune", f"finetune-t{trial}", method,
                   params={"input_model": model_ref, "teacher_model": teacher_ref or "none"},
                   data=data, model_ref=model_ref) as run:
        before = evaluate(model, data.test_x, data.test_y, data.normalise)
        val = evaluate(model, data.val_x, data.val_y, data.normalise) if data.val_x is not None else {}
        run.log_metrics({"test_loss": before["loss"], "test_accuracy": before["accuracy"],
                         **({"val_loss": val["loss"], "val_accuracy": val["accuracy"]} if val else {}),
                         **query.newest_metrics(model_ref, ("fraction_remaining", "latency_ms"))}, step=0)
        log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_AFTER)
        train_model(run, model, data, cfg.finetune, seed + 10_000, teacher=teacher)
        log_model(run, model, data, paths.MODEL, step=cfg.finetune.epochs, final=True, carry=UNCHANGED_BY_TRAINING)
        return run.run_id
