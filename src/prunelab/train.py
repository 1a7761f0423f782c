"""The training loop and evaluation. Never imports mlflow: the caller passes
`on_epoch` to hear about progress and decides what to log."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, asdict
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab.config import TrainConfig
from prunelab.data import ImageData, batches


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = asdict(self)
        out.pop("epoch")
        return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode for the block, then the mode it had. Modules traced by
    torch.export (MLflow's pt2 models) are fixed in eval mode and refuse
    .eval() and .train(): they are left as they are."""
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        yield model
        return
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalise, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y)."""
    loss_sum, correct = 0.0, 0
    with eval_mode(model):
        for xb, yb in batches(x, y, batch_size, normalise):
            out = model(xb)
            loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    n = len(y)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": n}


def train_epoch(model, data: ImageData, cfg: TrainConfig, optimizer, generator, desc: str = "train",
                after_step: Callable[[], None] | None = None, augment=None) -> tuple[float, float]:
    """One pass over the training data; returns (mean loss, accuracy)."""
    model.train()
    loss_sum, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
    steps = (len(data.train_y) + cfg.batch_size - 1) // cfg.batch_size
    it = batches(data.train_x, data.train_y, cfg.batch_size, data.normalise, shuffle=True,
                 generator=generator, augment=augment)
    for xb, yb in tqdm(it, total=steps, desc=desc, leave=False, disable=None):
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = nn.functional.cross_entropy(out, yb)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        # Accumulate on tensors: .item() every step would force a sync per batch.
        with torch.no_grad():
            loss_sum += loss.detach() * len(yb)
            correct += (out.argmax(1) == yb).sum()
        seen += len(yb)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def fit(model: nn.Module, data: ImageData, cfg: TrainConfig, seed: int,
        on_epoch: Callable[[EpochResult], None] | None = None, desc: str = "train",
        after_step: Callable[[], None] | None = None, augment=None) -> list[EpochResult]:
    """Train for `cfg.epochs` epochs, evaluating on the test set after each."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, cfg)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, data, cfg, optimizer, generator, f"{desc} {epoch}/{cfg.epochs}",
                                            after_step, augment)
        test = evaluate(model, data.test_x, data.test_y, data.normalise)
        result = EpochResult(epoch, train_loss, train_acc, test["loss"], test["accuracy"], time.perf_counter() - start)
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return history
