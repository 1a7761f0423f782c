"""Size and speed of a network: parameters, MACs, torchinfo summary, CPU latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torchinfo import summary

from prunelab.train import eval_mode


@dataclass
class Size:
    params: int
    macs: int
    summary: str


def size(model: nn.Module, input_shape: tuple[int, ...]) -> Size:
    """Parameters, multiply-accumulates of one forward pass (batch 1), and the summary text."""
    with eval_mode(model):
        stats = summary(model, input_size=(1, *input_shape), verbose=0, device="cpu",
                        col_names=("output_size", "num_params", "mult_adds"))
    return Size(int(stats.total_params), int(stats.total_mult_adds), str(stats))


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one CPU forward pass, in milliseconds."""
    x = torch.randn(batch, *input_shape)
    times = []
    with eval_mode(model):
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000
