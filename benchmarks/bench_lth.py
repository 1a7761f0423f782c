"""Lottery tickets: the cost of keeping pruned weights at zero.

One Conv-2 training step (Adam, batch 60 of 32x32 images) dense, and the same
step followed by `Mask.applier`'s re-zeroing with a round-5 mask (what `lottery_ticket._train_round`
passes as `after_step`). Timed alternately, best of several, so both see the
same machine load. The inputs are random tensors: only the timing matters here.
"""

from __future__ import annotations

import torch

from bench import Row, best_of
from prunelab import models
from prunelab.config import TrainConfig
from prunelab.studies.lottery_ticket import LotteryConfig
from prunelab.pruning import masks
from prunelab.train import make_optimizer, train_step

STEPS = 3
REPEATS = 5


def rows() -> list[Row]:
    torch.manual_seed(0)
    model = models.build("conv2", (3, 32, 32), 10)
    mask = masks.Mask.ones_like(model)
    for _ in range(5):
        mask = masks.prune(LotteryConfig(), model, mask)
    optimizer = make_optimizer(model, TrainConfig(batch_size=60, lr=2e-4))
    x, y = torch.randn(60, 3, 32, 32), torch.randint(0, 10, (60,))

    def steps(after_step):
        def run():
            for _ in range(STEPS):
                train_step(model, optimizer, x, y, after_step)
        return run

    dense, masked = steps(None), steps(mask.applier(model))
    dense()  # warm-up: allocator and Adam state
    times = {"dense": [], "masked": []}
    for _ in range(REPEATS):  # alternate, so a burst of load hits both
        times["dense"].append(best_of(dense, 1))
        times["masked"].append(best_of(masked, 1))
    t_dense, t_masked = min(times["dense"]) / STEPS, min(times["masked"]) / STEPS
    return [Row("lth: masked / dense Conv-2 train step", t_masked / t_dense, "<= 1.05x",
                f"dense {t_dense * 1e3:.0f} ms, masked {t_masked * 1e3:.0f} ms per step "
                f"(batch 60, Pm {mask.fraction_remaining():.1%})")]
