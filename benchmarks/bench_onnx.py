"""ONNX: onnxruntime latency of the pruned default-study network against the original
(as users get them: pixels in, normalisation inside), against their MACs ratio; and what
the ONNX export adds to logging a final model.

Every ratio compares two timings taken back to back in this one process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import Row
from prunelab import config, data, export, measure
from prunelab.tracking import connection, run as tracking_run
from prunelab.models.pixels import PixelInput
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import launch, probe
from prunelab.studies import common

SHAPE = (1, 28, 28)
PRUNED_WIDTHS = [7, 9]  # the widths the default study ends at (docs/taylor-cnn-fashionmnist.md: 5-7 and 9 filters)
MEAN, STD = (0.2860,), (0.3530,)


def _paired_ort_ms(a, b, batch: int, repeats: int, chunk: int = 20) -> tuple[float, float]:
    """Median single-thread onnxruntime latency of two sessions, timed in alternating chunks."""
    x = torch.rand(batch, *SHAPE)
    for s in (a, b):
        for _ in range(10):
            export.run(s, x)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(max(1, repeats // chunk)):
        for i, s in enumerate((a, b)):
            for _ in range(chunk):
                start = time.perf_counter()
                export.run(s, x)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def latency_rows() -> list[Row]:
    torch.manual_seed(0)
    original, pruned = SimpleCNN().eval(), SimpleCNN(channels=PRUNED_WIDTHS).eval()
    macs_ratio = measure.size(original, SHAPE).macs / measure.size(pruned, SHAPE).macs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        example = torch.rand(2, *SHAPE)
        sessions = [export.session(export.to_onnx(PixelInput(m, MEAN, STD), example, Path(tmp) / f"{i}.onnx"))
                    for i, m in enumerate((original, pruned))]
        for batch, repeats in ((1, 400), (256, 60)):
            t_orig, t_pruned = _paired_ort_ms(*sessions, batch=batch, repeats=repeats)
            speedup = t_orig / t_pruned
            rows.append(Row(f"onnxruntime: pruned speedup / MACs ratio, batch {batch}", speedup / macs_ratio, ">= 0.9x",
                            f"{t_orig:.3f} -> {t_pruned:.3f} ms (1 thread) = {speedup:.2f}x faster; MACs {macs_ratio:.2f}x fewer"))
    return rows


def export_rows() -> list[Row]:
    """A final model is logged as pt2 (as every model is) and exported to ONNX: the ONNX part's
    seconds against the pt2 part's, on a real server, fastest of three."""
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=100))
    torch.manual_seed(0)
    model = SimpleCNN(channels=PRUNED_WIDTHS)
    users = common.for_users(model, d)
    example = d.pixels(d.test_x[:2])
    with tempfile.TemporaryDirectory() as tmp:
        uri, process = launch.start(probe.free_port(), Path(tmp) / "server")
        try:
            connection.connect(uri)
            with tracking_run.start_run("bench-onnx", "train", {"study": "bench-onnx"}) as run:
                pt2, onnx = [], []
                for step in range(3):
                    start = time.perf_counter()
                    model_uri = run.log_model(users, f"model_{step}", example, step)
                    pt2.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    path = export.to_onnx(users, example, Path(tmp) / export.ONNX_FILE)
                    run._client.log_model_artifact(model_uri.removeprefix("models:/"), str(path), "onnx")
                    onnx.append(time.perf_counter() - start)
        finally:
            launch.stop(process)
    return [Row("ONNX export + upload / pt2 model logging, per final model", min(onnx) / min(pt2), "<= 0.25x",
                f"ONNX {min(onnx):.2f}s vs pt2 MLflow model {min(pt2):.2f}s (fastest of 3)")]


def rows() -> list[Row]:
    return latency_rows() + export_rows()
