"""VGG16 transfer benchmarks: cached-feature head training, and the latency of a slimmer VGG16.

Every ratio compares two timings taken back to back in this one process, on
the real dogs-vs-cats images at 32 px (CPU scale).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from bench import Row, best_of
from prunelab import config, data, transfer
from prunelab.data.base import ImageData
from prunelab.config import TrainConfig
from prunelab.models.vgg import VGG16Transfer
from prunelab.pruning import surgery

DOGS_VS_CATS = Path(os.environ.get("PRUNELAB_DOGS_VS_CATS", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dogs-vs-cats"))
REPEATS = 20
EPOCHS = 5  # the ratio grows with the epochs: the cache pays for the convolutions once


def _data() -> ImageData:
    return data.get(config.DataConfig(dataset="imagefolder", data_dir=str(DOGS_VS_CATS), image_size=32,
                                      n_train=128, n_test=64))


def _head_training(d) -> Row:
    cfg = TrainConfig(epochs=EPOCHS, batch_size=32, optimizer="sgd", lr=1e-3)
    torch.manual_seed(0)
    base = VGG16Transfer(hidden=256, image_size=32)
    cached = best_of(lambda: transfer.train_head(copy.deepcopy(base), d, cfg, 0, feature_batch_size=64), repeats=2)
    uncached = best_of(lambda: transfer.train_head_uncached(copy.deepcopy(base), d, cfg, 0), repeats=2)
    return Row(f"vgg16 head, {EPOCHS} epochs: uncached / cached features", uncached / cached, ">= 2.0x",
               f"uncached {uncached:.2f} s, cached {cached:.2f} s ({len(d.train_y)} + {len(d.test_y)} images, 32 px)")


def _latency() -> Row:
    """The full-width VGG16 (4096-wide head) against one with half the filters of every conv removed."""
    torch.manual_seed(0)
    full = VGG16Transfer(image_size=32).eval()
    half = copy.deepcopy(full)
    example = torch.zeros(2, 3, 32, 32)
    surgery.remove_filters(half, {n: list(range(c.out_channels // 2)) for n, c in half.prunable_convs().items()}, example)
    x = torch.randn(1, 3, 32, 32)
    times = {"full": [], "half": []}
    with torch.no_grad():
        for model in (full, half):  # warm-up
            model(x)
        # Interleaved, and the fastest of each kept: on a shared machine a median of
        # back-to-back runs of one model still catches whatever else ran meanwhile.
        for _ in range(REPEATS):
            for name, model in (("full", full), ("half", half)):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    t_full, t_half = min(times["full"]) * 1000, min(times["half"]) * 1000
    return Row("vgg16 latency: full / half the filters (32 px, batch 1)", t_full / t_half, ">= 1.5x",
               f"full {t_full:.1f} ms, half {t_half:.1f} ms (fastest of {REPEATS}, interleaved)")


def rows() -> list[Row]:
    if not DOGS_VS_CATS.is_dir():
        print(f"bench_vgg: skipped, no dogs-vs-cats images at {DOGS_VS_CATS} (set PRUNELAB_DOGS_VS_CATS)")
        return []
    return [_head_training(_data()), _latency()]
