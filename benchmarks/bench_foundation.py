"""Foundation benchmarks: the training loop, tracking overhead, pruned-model latency.

Every ratio compares two timings taken back to back in this one process.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench import Row
from prunelab import config, data, studies
from prunelab.tracking import connection, run as tracking_run
from prunelab.studies import stages
from prunelab.data import fashionmnist
from prunelab.data.base import ImageData
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import launch, probe
from prunelab.train import fit, train_epoch

N_TRAIN = 12_000  # a fifth of FashionMNIST: long enough to time, short enough for 2 cores


def _data() -> ImageData:
    return data.get(config.DataConfig(dataset="fashionmnist", n_train=N_TRAIN, n_test=2000))


def _prunelab_epoch(d, cfg):
    torch.manual_seed(0)
    model = SimpleCNN()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return lambda: train_epoch(model, d, cfg, opt, torch.Generator().manual_seed(0))


def _bare_epoch(d, cfg):
    """The loop a reader would write by hand over the same in-memory tensors."""
    torch.manual_seed(0)
    model = SimpleCNN()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mean, std = d.mean[0], d.std[0]

    def epoch():
        perm = torch.randperm(len(d.train_y))
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = (d.train_x[idx].float() / 255 - mean) / std
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), d.train_y[idx])
            loss.backward()
            opt.step()
    return epoch


def _dataloader_epoch(cfg):
    """torchvision's FashionMNIST through DataLoader with per-sample ToTensor + Normalize."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    root = fashionmnist._torchvision_root(fashionmnist._idx_folder(fashionmnist.DEBIAN_FASHION_MNIST))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    ds = Subset(FashionMNIST(str(root), train=True, transform=tf), range(N_TRAIN))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = SimpleCNN()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def epoch():
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return epoch


def interleaved_min(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` timings of each fn, taken in turns so that a burst of
    background load hits every contender alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def loop_rows(d) -> list[Row]:
    cfg = config.TrainConfig(batch_size=128)
    t = interleaved_min({"ours": _prunelab_epoch(d, cfg), "bare": _bare_epoch(d, cfg),
                         "loader": _dataloader_epoch(cfg)}, repeats=5)
    return [
        Row("training loop: prunelab vs bare PyTorch loop", t["bare"] / t["ours"], ">= 1.0x",
            f"bare {t['bare']:.2f}s / prunelab {t['ours']:.2f}s per epoch of {N_TRAIN} images"),
        Row("training loop: prunelab vs DataLoader+ToTensor", t["loader"] / t["ours"], ">= 1.8x",
            f"DataLoader {t['loader']:.2f}s / prunelab {t['ours']:.2f}s"),
    ]


def tracking_rows() -> list[Row]:
    """The default study's train stage (5 epochs of the 60,000 images) tracked on a real
    server: the wall time spent in MLflow calls (run start, params, tags, one metric
    batch per epoch, run end) against the training itself. Timing the calls directly
    measures what tracked-minus-untracked wall time would, without the run-to-run
    noise of two 40-second trainings; the final model's upload is its own row."""
    import tempfile

    cfg = studies.load_config()
    d = data.get(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        uri, process = launch.start(probe.free_port(), tmp)
        try:
            connection.connect(uri)
            spent = 0.0
            start = time.perf_counter()
            context = tracking_run.start_run("bench", "train", {"study": "bench"})
            run = context.__enter__()
            run.log_params(cfg.flat())
            spent += time.perf_counter() - start

            def on_epoch(result):
                nonlocal spent
                t = time.perf_counter()
                run.log_metrics(result.metrics(), step=result.epoch)
                spent += time.perf_counter() - t

            torch.manual_seed(0)
            model = SimpleCNN()
            train_start = time.perf_counter()
            fit(model, d, cfg.train, seed=0, on_epoch=on_epoch)
            training = time.perf_counter() - train_start - spent
            t = time.perf_counter()
            stages.log_model(run, model, d, "model", step=cfg.train.epochs, final=True)
            model_logging = time.perf_counter() - t
            t = time.perf_counter()
            context.__exit__(None, None, None)
            spent += time.perf_counter() - t
        finally:
            launch.stop(process)
    return [
        Row("MLflow tracking overhead on the train stage (%)", 100 * spent / training, "<= 2%",
            f"{spent:.2f}s in MLflow calls vs {training:.1f}s training ({cfg.train.epochs} epochs of {len(d.train_y)} images)"),
        Row("final-model upload, once per run (% of training)", 100 * model_logging / training, "<= 2%",
            f"{model_logging:.2f}s: pt2 MLflow model + ONNX + weights-only checkpoint + tag"),
    ]


def model_logging_rows() -> list[Row]:
    """One trial of the default study as `make run` runs it (in process, full data and epochs)
    on a fresh server: the wall time inside `tracking.models.log_model` (every per-round and
    final model: pt2, ONNX, checkpoint, metric links), summed, against the study's wall time."""
    import tempfile
    from pathlib import Path

    from prunelab.pipeline.study import StudyArgs, run_study
    from prunelab.tracking import models as logged_models

    spent: list[float] = []
    log_model = logged_models.log_model

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return log_model(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    args = StudyArgs(config.DEFAULT_STUDY, "trials=1 study=bench-model-logging")
    with tempfile.TemporaryDirectory() as tmp:
        args = StudyArgs(args.study, args.overrides, out_dir=str(Path(tmp) / "report"))
        uri, process = launch.start(probe.free_port(), tmp)
        logged_models.log_model = timed  # measured where every stage's models go through
        try:
            connection.connect(uri)
            start = time.perf_counter()
            run_study(args, args.config())
            wall = time.perf_counter() - start
        finally:
            logged_models.log_model = log_model
            launch.stop(process)
    return [Row("model logging, share of the default study's wall (%)", 100 * sum(spent) / wall, "<= 5%",
                f"{sum(spent):.1f}s in {len(spent)} log_model calls of a {wall:.0f}s one-trial study "
                f"(max {max(spent):.2f}s, median {sorted(spent)[len(spent) // 2]:.2f}s)")]


def rows() -> list[Row]:
    return loop_rows(_data()) + tracking_rows() + model_logging_rows()  # pruned latency: bench_scale
