"""Size and speed of a network: parameters, MACs, torchinfo summary, latency.

Latency has one timer for every device: `torch.utils.benchmark`, which fixes
the thread count and synchronises CUDA around each timed call.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
from torch import nn
from torchinfo import summary

from prunelab.train import device_of, eval_mode


@dataclass
class Size:
    params: int
    macs: int
    summary: str


def size(model: nn.Module, input_shape: tuple[int, ...]) -> Size:
    """Parameters, multiply-accumulates of one forward pass (batch 1), and the summary text."""
    with eval_mode(model):
        stats = summary(model, input_size=(1, *input_shape), verbose=0, device=device_of(model),
                        col_names=("output_size", "num_params", "mult_adds"))
    return Size(int(stats.total_params), int(stats.total_mult_adds), str(stats))


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 30, warmup: int = 5,
               threads: int = 1) -> float:
    """Median wall time of one forward pass on the model's device, in milliseconds
    (`threads` CPU threads: one by default, the steadiest reading on a shared CPU)."""
    x = torch.randn(batch, *input_shape, device=device_of(model))
    with eval_mode(model):
        benchmark = _benchmark()
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
        if warmup:
            timer.timeit(warmup)
        times = [timer.timeit(1).mean for _ in range(repeats)]
    return statistics.median(times) * 1000


def _benchmark():
    # Importing torch.utils.benchmark logs a warning about CUDA_HOME on machines with a CUDA
    # toolkit but no GPU; it says nothing about timing, so it is kept off the user's screen.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    return benchmark


def paired_latency_ms(a: nn.Module, b: nn.Module, shape, batch: int, repeats: int, chunk: int = 5) -> tuple[float, float]:
    """Median single-thread latency of two networks timed in alternating chunks, so
    both see the same machine load: on a shared CPU the load drifts by tens of %."""
    times_a, times_b = [], []
    for _ in range(max(1, (repeats + chunk - 1) // chunk)):
        times_a.append(latency_ms(a, shape, batch, repeats=chunk, warmup=1))
        times_b.append(latency_ms(b, shape, batch, repeats=chunk, warmup=1))
    return statistics.median(times_a), statistics.median(times_b)
