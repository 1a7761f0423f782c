"""Foundation benchmarks: the training loop, tracking overhead, pruned-model latency.

Every ratio compares two timings taken back to back in this one process.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench import Row, best_of
from prunelab import config, data, measure, models, server, tracking
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.train import fit, train_epoch

N_TRAIN = 12_000  # a fifth of FashionMNIST: long enough to time, short enough for 2 cores


def _data() -> data.ImageData:
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

    root = data._torchvision_root(data._idx_folder(data.DEBIAN_FASHION_MNIST))
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


def loop_rows(d) -> list[Row]:
    cfg = config.TrainConfig(batch_size=128)
    ours = best_of(_prunelab_epoch(d, cfg))
    bare = best_of(_bare_epoch(d, cfg))
    loader = best_of(_dataloader_epoch(cfg), repeats=2)
    return [
        Row("training loop: prunelab vs bare PyTorch loop", bare / ours, ">= 1.0x",
            f"bare {bare:.2f}s / prunelab {ours:.2f}s per epoch of {N_TRAIN} images"),
        Row("training loop: prunelab vs DataLoader+ToTensor", loader / ours, ">= 1.8x",
            f"DataLoader {loader:.2f}s / prunelab {ours:.2f}s"),
    ]


def tracking_rows(d) -> list[Row]:
    """Training with per-epoch metrics sent to a real server vs the same training untracked."""
    import tempfile

    cfg = config.TrainConfig(epochs=3, batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        uri, process = server.start(server.free_port(), tmp)
        try:
            tracking.connect(uri)

            def untracked():
                torch.manual_seed(0)
                fit(SimpleCNN(), d, cfg, seed=0)

            def tracked():
                torch.manual_seed(0)
                model = SimpleCNN()
                with tracking.run("bench", "train", {"study": "bench"}) as run:
                    run.log_params(config.StudyConfig().flat())
                    fit(model, d, cfg, seed=0, on_epoch=lambda r: run.log_metrics(r.metrics(), step=r.epoch))

            def model_logging():
                model = SimpleCNN()
                with tracking.run("bench", "train", {"study": "bench"}) as run:
                    run.log_model(model, "model", d.normalise(d.test_x[:2]), final=True)

            # Interleaved, best of 3 each: background load hits both sides alike.
            plain, with_tracking = [], []
            for _ in range(3):
                plain.append(best_of(untracked, 1))
                with_tracking.append(best_of(tracked, 1))
            plain_t, tracked_t = min(plain), min(with_tracking)
            logging_t = best_of(model_logging, 2)
        finally:
            server.stop(process)
    return [
        Row("MLflow tracking overhead on training (%)", 100 * (tracked_t - plain_t) / plain_t, "<= 2%",
            f"tracked {tracked_t:.2f}s vs untracked {plain_t:.2f}s, {cfg.epochs} epochs of {N_TRAIN} images"),
        Row("final-model logging, once per run (s)", logging_t, "<= 5.0s",
            "pt2 MLflow model + weights-only checkpoint + tag, to the same server"),
    ]


def latency_rows() -> list[Row]:
    """A Taylor-pruned-size network (the widths the default study ends at) vs the original."""
    shape = (1, 28, 28)
    original, pruned = SimpleCNN(), SimpleCNN(channels=[7, 9])
    macs_ratio = measure.size(original, shape).macs / measure.size(pruned, shape).macs
    rows = []
    for batch in (1, 64):
        t_orig = measure.latency_ms(original, shape, batch=batch, repeats=50)
        t_pruned = measure.latency_ms(pruned, shape, batch=batch, repeats=50)
        speedup = t_orig / t_pruned
        rows.append(Row(f"pruned latency speedup / MACs ratio, batch {batch}", speedup / macs_ratio, ">= 0.9x",
                        f"{t_orig:.3f} -> {t_pruned:.3f} ms = {speedup:.2f}x faster; MACs {macs_ratio:.2f}x fewer"))
    return rows


def rows() -> list[Row]:
    d = _data()
    return loop_rows(d) + tracking_rows(d) + latency_rows()
