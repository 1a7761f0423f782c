"""torchvision networks pruned by prunelab: does latency fall with the MACs, and what does surgery cost?

- ResNet-18 and MobileNetV2 at 224 px, batch 16, from scratch (timing needs no trained
  weights), each pruned to about half its MACs along prunelab's own path: the prunable
  layers Torch-Pruning's graph finds (`structure.find`), scored by the `l1` criterion,
  the lowest filters across layers removed a step at a time (`schedule.plan_step`,
  `surgery.FilterRemover`), with `prune.round_to` 1, 8 and 16. Ratio = latency speed-up /
  MACs reduction: 1.0 means the latency falls exactly as the MACs do; the target asks for
  0.9 (Torch-Pruning's own VGG16 figure: x4.18 latency for x3.97 fewer MACs).
- ResNet-50 at 224 px: seconds to trace the network (Torch-Pruning's DependencyGraph; a
  prune run traces a few times before its first step, never per step) and seconds of one
  step's surgery on the kept graph, a step cutting every prunable layer.

Latency is `torch.utils.benchmark.Timer.blocked_autorange` on one thread (the steadiest
reading on a shared CPU, and the same for every network), the dense network and its three
pruned copies interleaved and the fastest median of each kept.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torchvision

from bench import Row, fix_mmap_threshold
from prunelab import measure
from prunelab.pruning import criteria, schedule, structure, surgery

SHAPE = (3, 224, 224)
BATCH = 16
THREADS = 1
ROUND_TOS = (1, 8, 16)
MACS_KEPT = 0.5          # prune until at most this share of the MACs is left
STEP_SHARE = 0.03        # filters removed per step, as a share of the prunable filters
MIN_RUN_S = 1.5          # blocked_autorange's minimum time per reading
READINGS = 3             # interleaved rounds of readings


def _timer():
    # Importing torch.utils.benchmark warns about CUDA_HOME where a CUDA toolkit has no GPU; unrelated to timing.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    return benchmark.Timer


def prune_to_macs(model: torch.nn.Module, round_to: int, kept: float = MACS_KEPT) -> tuple[int, int, int]:
    """Prune `model` in place as filter_pruning's prune does, with the data-free l1 criterion,
    until at most `kept` of its MACs remain; returns (MACs before, MACs after, steps)."""
    example = torch.zeros(1, *SHAPE)
    layers = structure.find(model, example)
    criterion = criteria.get("l1")
    remover = surgery.FilterRemover(model, example)
    macs0 = macs = measure.size(model, SHAPE).macs
    per_step = max(round_to, int(STEP_SHARE * sum(layers.widths().values())))
    steps = 0
    while macs > kept * macs0:
        scores = criterion(model, layers.convs, outputs=layers.feature_maps, coupled=layers.filters)
        remover.remove(schedule.plan_step(scores, per_step, round_to))
        macs, steps = measure.size(model, SHAPE).macs, steps + 1
    return macs0, macs, steps


@torch.no_grad()
def _latencies_ms(networks: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Median forward time of each network at batch BATCH, readings interleaved; fastest kept."""
    x = torch.randn(BATCH, *SHAPE)
    Timer = _timer()
    best: dict[str, float] = {}
    for _ in range(READINGS):
        for name, model in networks.items():
            reading = Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=THREADS)
            median = reading.blocked_autorange(min_run_time=MIN_RUN_S).median * 1000
            best[name] = min(best.get(name, median), median)
    return best


def latency_rows(name: str) -> list[Row]:
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    pruned, found = {}, {}
    for round_to in ROUND_TOS:
        pruned[round_to] = copy.deepcopy(dense)
        found[round_to] = prune_to_macs(pruned[round_to], round_to)
    times = _latencies_ms({"dense": dense, **{rt: m for rt, m in pruned.items()}})
    rows = []
    for round_to, (macs0, macs, steps) in found.items():
        speedup, shrink = times["dense"] / times[round_to], macs0 / macs
        rows.append(Row(f"{name} 224 px, round_to {round_to}: latency speed-up / MACs reduction", speedup / shrink,
                        ">= 0.9x", f"{times['dense']:.0f} -> {times[round_to]:.0f} ms (batch {BATCH}, {THREADS} thread) "
                                   f"= x{speedup:.2f}; MACs {macs0 / 1e9:.2f}G -> {macs / 1e9:.2f}G (x{shrink:.2f}, "
                                   f"{steps} l1 steps)"))
    return rows


def surgery_rows() -> list[Row]:
    """ResNet-50: the trace a prune run pays (structure.find, then FilterRemover once), and the
    surgery of a step that cuts every prunable layer, on the kept graph."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    example = torch.zeros(1, *SHAPE)
    trace_s = []
    for _ in range(2):  # the first in a process also pays one-time costs (allocations, oneDNN kernels)
        start = time.perf_counter()
        layers = structure.find(model, example)
        trace_s.append(time.perf_counter() - start)
    remover = surgery.FilterRemover(model, example)
    # The heaviest step a schedule can give: an eighth of the filters of every prunable layer.
    plan = {name: list(range(0, width, 8)) for name, width in layers.widths().items()}
    remover.remove({})  # traces, so the step below times the surgery alone
    start = time.perf_counter()
    remover.remove(plan)
    cut = time.perf_counter() - start
    return [
        Row("resnet50 224 px: tracing, Torch-Pruning's graph (s)", trace_s[1], "<= 5s",
            f"structure.find, {len(layers.convs)} prunable layers; {trace_s[0]:.2f} s the first time in a process"),
        Row("resnet50 224 px: one prune step's surgery, graph kept (s)", cut, "<= 2s",
            f"{sum(map(len, plan.values()))} filters from all {len(plan)} prunable layers"),
    ]


def rows() -> list[Row]:
    fixed = fix_mmap_threshold()  # batch 16 at 224 px: 51 MB feature maps, above glibc's default mmap threshold
    if not fixed:
        print("bench_any_network: glibc's mmap threshold not fixed; large-batch readings may time page faults")
    return latency_rows("resnet18") + latency_rows("mobilenet_v2") + surgery_rows()
