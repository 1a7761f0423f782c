"""k-means merging: does a physically merged ResNet20 run as much faster as its MACs shrink?

Ratio = (original / merged CPU latency) / (original / merged MACs): 1.0 means
the latency falls exactly with the MACs. Block-internal merging halves only
the channels between each block's two convs, so the small early layers and
fixed per-layer overheads keep the ratio below 1 on a CPU; the target asks
that latency fall at least a third as fast as the MACs do.
"""

from __future__ import annotations

import copy

import torch

from bench import Row, best_of
from prunelab import measure, models
from prunelab.pruning import merging

SHAPE = (3, 32, 32)
BATCH = 16


def _forward_s(model, x, repeats: int = 10) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        return best_of(lambda: [model(x) for _ in range(repeats)], repeats=3) / repeats


def rows() -> list[Row]:
    torch.manual_seed(0)
    original = models.get("resnet20").eval()  # merging needs no trained weights to be timed
    out = []
    for keep in (0.5, 0.25):
        merged = copy.deepcopy(original)
        merging.apply_merge(merged, merging.plan_merge(original, keep, seed=0, n_init=1))
        x = torch.randn(BATCH, *SHAPE)
        t_orig, t_merged = _forward_s(original, x), _forward_s(merged, x)
        m_orig, m_merged = measure.size(original, SHAPE).macs, measure.size(merged, SHAPE).macs
        speedup, shrink = t_orig / t_merged, m_orig / m_merged
        out.append(Row(f"kmeans merge keep {keep}: latency speed-up / MACs reduction", speedup / shrink, ">= 0.33x",
                       f"latency {t_orig * 1e3:.1f} -> {t_merged * 1e3:.1f} ms (batch {BATCH}, x{speedup:.2f}); "
                       f"MACs {m_orig / 1e6:.1f}M -> {m_merged / 1e6:.1f}M (x{shrink:.2f})"))
    return out
