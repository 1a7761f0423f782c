"""Stages of a `transfer_pruning` study (VGG16 on an image folder).

Only training differs from `filter_pruning`: the head trains on features
computed once while the pretrained features stay frozen. Pruning (Taylor
ranking, removal, retraining between steps) and the final fine-tuning are
the shared stages.
"""

from __future__ import annotations

import time

import torch

from prunelab import data as datasets, measure, paths, tracking, transfer
from prunelab.config import StudyConfig
from prunelab.stages import common_params, common_tags, finetune, log_size, prune  # noqa: F401 (this kind's stages)


def train(cfg: StudyConfig, trial: int = 0) -> str:
    """Transfer: pretrained (or random) VGG16 features, frozen; a new head trained on cached features."""
    seed = cfg.seed + trial
    data = datasets.get(cfg.data)
    torch.manual_seed(seed)
    model, source = transfer.build(cfg.transfer, data)  # a missing or foreign weights file fails before any run
    example = data.normalise(data.test_x[:2])
    with tracking.run(cfg.study, "train", common_tags(cfg, trial), f"train-t{trial}") as run:
        run.log_params({**common_params(cfg, trial), "weights_source": source})
        skipped = getattr(data, "skipped", 0)
        log_size(run, model, data.input_shape, step=0, summary_file=paths.SUMMARY_BEFORE)
        run.log_metrics({"skipped_images": skipped}, step=0)
        if cfg.prune.latency_repeats:
            latency = measure.latency_ms(model, data.input_shape, repeats=cfg.prune.latency_repeats,
                                         warmup=min(5, cfg.prune.latency_repeats))
            run.log_metrics({"latency_ms": latency}, step=0)

        def on_epoch(result):
            run.log_metrics(result.metrics(), step=result.epoch)

        start = time.perf_counter()
        transfer.train_head(model, data, cfg.train, seed, cfg.transfer.feature_batch_size, on_epoch=on_epoch)
        run.log_metrics({"transfer_seconds": time.perf_counter() - start}, step=cfg.train.epochs)
        model.set_features_trainable(True)  # the next stages prune and retrain the features
        run.log_model(model, paths.MODEL, example, final=True)
        return run.run_id
