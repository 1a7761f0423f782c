"""The data set registry: name -> loader. One module per data set beside this
file; `base.py` holds what they share."""

from __future__ import annotations

from typing import Callable

from prunelab.config import DataConfig
from prunelab.data.base import ImageData
from prunelab.data.cifar10 import load_cifar10
from prunelab.data.fashionmnist import load_fashionmnist
from prunelab.data.imagefolder import load_imagefolder
from prunelab.errors import ConfigError

DATASETS: dict[str, Callable[[DataConfig], ImageData]] = {
    "fashionmnist": load_fashionmnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
}


def get(cfg: DataConfig) -> ImageData:
    """Load the data set `cfg.dataset` and apply the subset / validation settings."""
    loader = DATASETS.get(cfg.dataset)
    if loader is None:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
    return _subset(loader(cfg), cfg)


def _subset(data: ImageData, cfg: DataConfig) -> ImageData:
    data.augment = cfg.augment
    if cfg.n_train:
        data.train_x, data.train_y = data.train_x[: cfg.n_train], data.train_y[: cfg.n_train]
    if cfg.n_test:
        data.test_x, data.test_y = data.test_x[: cfg.n_test], data.test_y[: cfg.n_test]
    if cfg.val_size:
        if cfg.val_size >= len(data.train_y):
            raise ConfigError(f"data.val_size={cfg.val_size} leaves no training images (only {len(data.train_y)})")
        # The validation images come off the end so the first n_train stay the same set.
        data.val_x, data.val_y = data.train_x[-cfg.val_size :], data.train_y[-cfg.val_size :]
        data.train_x, data.train_y = data.train_x[: -cfg.val_size], data.train_y[: -cfg.val_size]
    return data
