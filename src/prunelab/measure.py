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


def paired_latency_ms(a: nn.Module, b: nn.Module, shape, batch: int, repeats: int, chunk: int = 5) -> tuple[float, float]:
    """Median single-thread CPU latency of two networks timed in alternating
    chunks, so both see the same machine load: on a shared CPU the load drifts
    by tens of %, and multi-threaded kernels then stall on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times_a, times_b = [], []
        for _ in range(max(1, (repeats + chunk - 1) // chunk)):
            times_a.append(latency_ms(a, shape, batch, repeats=chunk, warmup=1))
            times_b.append(latency_ms(b, shape, batch, repeats=chunk, warmup=1))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times_a), statistics.median(times_b)
