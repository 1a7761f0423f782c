"""Studies at full scale: mixed precision, the device's memory layout, `main`
without a process per step, hardware-aligned widths, surgery that traces once,
and (with a GPU) one lottery-ticket round.

- bf16 / fp32 training step, Conv-2 (batch 60, CIFAR-10) and the FashionMNIST CNN (batch 128),
  both in the layout training uses (`layout.native`);
- default layout (NCHW) / the device's layout (channels-last on the CPU), bf16 training step of
  the CNN (unpruned and at the widths the default study ends at) and Conv-2;
- default study (2 trials, 1 epoch): wall time with one `mlflow run` process per
  step / in process, and the in-process overhead per step;
- pruned latency speed-up / MACs ratio with and without prune.round_to (onnxruntime's
  are in bench_onnx), and the best of a sweep over widths the study could end at;
- VGG16 at 224 px, a step touching all 13 convs: surgery seconds with a graph
  per layer (before) / one graph (after);
- on CUDA only: a Conv-2 lottery round of 20,000 iterations, and 5 trials in parallel / serial.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import MMAP_THRESHOLD, TRIM_THRESHOLD, Row, fix_mmap_threshold
from prunelab import config, data, hardware, layout, measure, models
from prunelab.tracking import connection, query
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.pruning import surgery
from prunelab.server import launch, probe
from prunelab.train import Precision, make_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("PRUNELAB_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-subset"))
# The widths the default study ends at: without rounding (docs/taylor-cnn-fashionmnist.md, five trials: 5-7 and 9
# filters), and with prune.round_to=8 (both convs at a multiple of 8).
WIDTHS_FREE, WIDTHS_ROUNDED, ROUND_TO = [7, 9], [8, 8], 8


def _step_seconds(model, batch, precision: str, steps: int = 20, native_layout: bool = True) -> float:
    """Fastest of `steps` optimiser steps (after warm-up) of `model` on one real batch, in the
    device's layout as training runs them (or, with native_layout=False, in NCHW)."""
    xb, yb = batch
    with layout.native(model) if native_layout else contextlib.nullcontext():
        optimizer = make_optimizer(model, config.TrainConfig(optimizer="adam"))
        amp = Precision(precision, xb.device)
        for _ in range(3):
            train_step(model, optimizer, xb, yb, precision=amp)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step(model, optimizer, xb, yb, precision=amp)
            times.append(time.perf_counter() - start)
    return min(times)


def _cases() -> list[tuple[str, config.DataConfig, int]]:
    cases = [("simple_cnn", config.DataConfig(dataset="fashionmnist", n_train=512, n_test=8), 128)]
    if CIFAR.is_dir():
        cases.append(("conv2", config.DataConfig(dataset="cifar10", data_dir=str(CIFAR), n_train=512, n_test=8), 60))
    else:
        print(f"bench_scale: Conv-2 rows skipped, no CIFAR-10 subset at {CIFAR} (set PRUNELAB_CIFAR10)")
    return cases


def _batch(d, batch_size: int):
    return d.normalise(d.train_x[:batch_size]), d.train_y[:batch_size]


def precision_rows() -> list[Row]:
    rows = []
    native = hardware.supports_bf16(torch.device("cpu"))
    for name, cfg, batch_size in _cases():
        d = data.get(cfg)
        batch = _batch(d, batch_size)
        torch.manual_seed(0)
        model = models.build(name, d.input_shape, d.num_classes)
        fp32, bf16 = _step_seconds(copy.deepcopy(model), batch, "fp32"), _step_seconds(copy.deepcopy(model), batch, "bf16")
        rows.append(Row(f"{name} train step: fp32 / bf16 time (batch {batch_size})", fp32 / bf16,
                        ">= 1.5x" if native else ">= 0.0x",
                        f"fp32 {1000 * fp32:.1f} ms, bf16 {1000 * bf16:.1f} ms (fastest of 20; CPU native bf16: {native})"))
    return rows


def layout_rows() -> list[Row]:
    """What training in the CPU's channels-last layout gains over NCHW, in the precision `auto` picks."""
    cpu = torch.device("cpu")
    precision = "bf16" if hardware.supports_bf16(cpu) else "fp32"
    native_name = str(layout.memory_format(cpu)).removeprefix("torch.")
    rows = []
    for name, cfg, batch_size in _cases():
        d = data.get(cfg)
        batch = _batch(d, batch_size)
        torch.manual_seed(0)
        variants = [(name, models.build(name, d.input_shape, d.num_classes))]
        if name == "simple_cnn":  # the widths the default study ends at: NCHW's slowest case
            variants.append((f"{name} pruned {WIDTHS_FREE}", SimpleCNN(channels=WIDTHS_FREE)))
        for label, model in variants:
            nchw = _step_seconds(copy.deepcopy(model), batch, precision, native_layout=False)
            native = _step_seconds(copy.deepcopy(model), batch, precision)
            rows.append(Row(f"{label} train step: NCHW / {native_name} time ({precision}, batch {batch_size})",
                            nchw / native, ">= 1.0x",
                            f"NCHW {1000 * nchw:.1f} ms, native {1000 * native:.1f} ms (fastest of 20)"))
    return rows


def _timed_study(uri: str, steps: str, study: str, out: Path) -> tuple[float, list]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["MLFLOW_TRACKING_URI"] = uri
    overrides = f"trials=2 train.epochs=1 finetune.epochs=1 study={study}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prunelab", "run", "--overrides", overrides, "--out", str(out), "--steps", steps],
                   env=env, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    runs = query.find_runs(study)
    return wall, runs


def _seconds(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def main_rows() -> list[Row]:
    """The default study, 2 trials of 1 epoch (7 steps with the report), once per step runner."""
    with tempfile.TemporaryDirectory() as tmp:
        uri, process = launch.start(probe.free_port(), tmp)
        try:
            connection.connect(uri)
            walls = {}
            for steps in ("processes", "in-process"):
                walls[steps], runs = _timed_study(uri, steps, f"bench-main-{steps}", Path(tmp) / steps)
        finally:
            launch.stop(process)
    (main,) = [r for r in runs if r.data.tags.get("stage") == "main"]
    steps = [r for r in runs if r.data.tags.get("stage") != "main"]
    in_steps = sum(_seconds(r) for r in steps)
    # Between the `main` run's start and end, whatever is not inside a step run is what running
    # steps in process costs per step (creating runs, resolving settings, reuse lookups, registering
    # models); before the `main` run starts, the process pays its imports once per study.
    per_step = (_seconds(main) - in_steps) / len(steps)
    once = walls["in-process"] - _seconds(main)
    return [
        Row("default study (2 trials, 1 epoch): per-process / in-process steps", walls["processes"] / walls["in-process"],
            ">= 1.0x", f"{walls['processes']:.0f} s with a `mlflow run` process per step, {walls['in-process']:.0f} s in process "
                       f"({len(steps)} steps)"),
        Row("in-process `main`: overhead per step (s)", per_step, "<= 1s",
            f"main run {_seconds(main):.1f} s minus {in_steps:.1f} s inside its {len(steps)} step runs (report included); "
            f"start-up once per study: {once:.1f} s of the {walls['in-process']:.1f} s wall"),
        Row("in-process `main`: everything outside the step runs, per step (s)", (walls["in-process"] - in_steps) / len(steps),
            "<= 2s", f"wall {walls['in-process']:.1f} s minus {in_steps:.1f} s inside the {len(steps)} step runs, start-up included"),
    ]


def latency_rows() -> list[Row]:
    shape = (1, 28, 28)
    fixed = fix_mmap_threshold()
    original = SimpleCNN()
    rows = []
    for widths, label in ((WIDTHS_FREE, "no rounding"), (WIDTHS_ROUNDED, f"round_to={ROUND_TO}")):
        pruned = SimpleCNN(channels=widths)
        macs_ratio = measure.size(original, shape).macs / measure.size(pruned, shape).macs
        for batch in (1, 256):
            t_orig, t_pruned = measure.paired_latency_ms(original, pruned, shape, batch, repeats=100)
            speedup = t_orig / t_pruned
            rows.append(Row(f"pruned latency speed-up / MACs ratio, {label} {widths}, batch {batch}", speedup / macs_ratio,
                            ">= 0.9x", f"{t_orig:.3f} -> {t_pruned:.3f} ms (1 thread) = {speedup:.2f}x; MACs {macs_ratio:.2f}x fewer"
                                       + ("" if fixed else "; glibc's mmap threshold not fixed")))
    # Why a network rests, and is timed, in NCHW: one image at a time, channels-last is the slower layout.
    channels_last = copy.deepcopy(original).to(memory_format=torch.channels_last)
    t_cl, t_nchw = measure.paired_latency_ms(channels_last, original, shape, 1, repeats=100)
    rows.append(Row("unpruned CNN latency at batch 1: channels-last / NCHW time", t_cl / t_nchw, ">= 1.0x",
                    f"channels-last {t_cl:.3f} ms, NCHW {t_nchw:.3f} ms (1 thread)"))
    return rows + width_rows(original, shape) + allocator_rows()


# Widths a pruning of the default study could end at (<= 62 % of the parameters), multiples of
# 8 and 4 among them: whether any width choice, any round_to, brings latency to the MACs ratio.
SWEEP_WIDTHS = ([7, 9], [8, 8], [6, 10], [4, 8], [8, 4], [2, 10])


def width_rows(original, shape, batch: int = 256) -> list[Row]:
    macs0 = measure.size(original, shape).macs
    found = []
    for widths in SWEEP_WIDTHS:
        pruned = SimpleCNN(channels=widths)
        macs_ratio = macs0 / measure.size(pruned, shape).macs
        t_orig, t_pruned = measure.paired_latency_ms(original, pruned, shape, batch, repeats=40)
        found.append(((t_orig / t_pruned) / macs_ratio, widths, t_orig / t_pruned, macs_ratio))
    best = max(found)
    return [Row(f"best latency speed-up / MACs ratio over {len(found)} pruned widths, batch {batch}", best[0], ">= 0.9x",
                "; ".join(f"{w}: {s:.2f}x / {m:.2f}x" for _, w, s, m in found))]


# Timing one batch-256 forward pass in a fresh process, printed in ms. Its 12.8 MB feature maps
# are above glibc's threshold for giving memory back to the system, so each pass may map them
# anew and page-fault through them; with the threshold fixed high, the pass reuses its heap.
_ALLOCATOR_PROBE = (
    "import torch; from prunelab import measure; from prunelab.models.simple_cnn import SimpleCNN; "
    "print(measure.latency_ms(SimpleCNN().eval(), (1, 28, 28), batch=256, repeats=30))")
_HIGH_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def allocator_rows(processes: int = 3) -> list[Row]:
    """What glibc's allocator does to a batch-256 latency reading (median of fresh processes)."""
    def probe(extra: dict) -> float:
        env = {**os.environ, **extra}
        out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env, cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        return float(out.strip().splitlines()[-1])
    default = sorted(probe({}) for _ in range(processes))[processes // 2]
    high = sorted(probe(_HIGH_MMAP_THRESHOLD) for _ in range(processes))[processes // 2]
    return [Row("unpruned CNN batch-256 latency: glibc default / mmap threshold 128 MiB", default / high, ">= 0.0x",
                f"{default:.1f} ms / {high:.1f} ms (median of {processes} fresh processes, 1 thread)")]


def _surgery_per_layer(model, plan, example) -> None:
    """The former surgery: Torch-Pruning's dependency graph rebuilt for every layer."""
    for name, idxs in plan.items():
        surgery.remove_filters(model, {name: idxs}, example)


def surgery_rows() -> list[Row]:
    torch.manual_seed(0)
    vgg = models.get("vgg16", image_size=224).eval()
    example = torch.zeros(1, 3, 224, 224)
    plan = {n: list(range(0, c.out_channels, 8)) for n, c in vgg.prunable_convs().items()}  # all 13 convs
    before_model, after_model = copy.deepcopy(vgg), copy.deepcopy(vgg)
    start = time.perf_counter()
    _surgery_per_layer(before_model, plan, example)
    before = time.perf_counter() - start
    start = time.perf_counter()
    surgery.FilterRemover(after_model, example).remove(plan)
    after = time.perf_counter() - start
    same = all(torch.equal(a, b) for a, b in zip(before_model.state_dict().values(), after_model.state_dict().values()))
    return [Row("vgg16 224 px surgery, step touching 13 convs: graph per layer / one graph", before / after, ">= 5.0x",
                f"{before:.1f} s before, {after:.1f} s after; same network: {same}")]


def cuda_rows() -> list[Row]:
    if not torch.cuda.is_available():
        print("bench_scale: CUDA rows skipped, no GPU on this machine")
        return []
    if not CIFAR.is_dir():
        print(f"bench_scale: CUDA rows skipped, no CIFAR-10 subset at {CIFAR}")
        return []
    from prunelab.train import fit_iterations

    device = torch.device("cuda")
    d = data.get(config.DataConfig(dataset="cifar10", data_dir=str(CIFAR), val_size=466)).to(device)
    cfg = config.TrainConfig(batch_size=60, lr=2e-4, precision="bf16" if torch.cuda.is_bf16_supported() else "fp32")
    torch.manual_seed(0)
    model = models.build("conv2", d.input_shape, d.num_classes).to(device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fit_iterations(model, d, cfg, 20_000, 1000, seed=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [Row("cuda: Conv-2 lottery round, 20,000 iterations at batch 60 (s)", seconds, "<= 60s",
                f"{hardware.name(device)}, {cfg.precision}, evaluated every 1,000 iterations")]


def rows() -> list[Row]:
    return precision_rows() + layout_rows() + main_rows() + latency_rows() + surgery_rows() + cuda_rows()
