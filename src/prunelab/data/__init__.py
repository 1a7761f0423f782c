"""The data set registry: name -> loader. One module per data set beside this
file; `base.py` holds what they share."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

from prunelab.config import DataConfig
from prunelab.data.base import ImageData, resized
from prunelab.data.cifar10 import cifar10_here, load_cifar10
from prunelab.data.fashionmnist import fashionmnist_here, load_fashionmnist
from prunelab.data.imagefolder import load_imagefolder
from prunelab.errors import ConfigError


class Dataset(NamedTuple):
    load: Callable[[DataConfig], ImageData]
    # Whether the loader finds the data on this machine without --data-dir and without the network.
    here: Callable[[], bool]
    # Whether the loader applies data.image_size itself (decoding at that size); otherwise `get` resizes.
    sizes_itself: bool = False


DATASETS: dict[str, Dataset] = {
    "fashionmnist": Dataset(load_fashionmnist, fashionmnist_here),
    "cifar10": Dataset(load_cifar10, cifar10_here),
    "imagefolder": Dataset(load_imagefolder, lambda: False, sizes_itself=True),  # only ever the folder given
}


def get(cfg: DataConfig) -> ImageData:
    """Load the data set `cfg.dataset` and apply the subset / validation settings."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
    # The subset settings only slice what the loader read, so one read serves them all.
    whole = dataclasses.replace(cfg, n_train=0, n_test=0, val_size=0, augment=False)
    return _subset(_read(whole), cfg)


@functools.lru_cache(maxsize=2)
def _read(cfg: DataConfig) -> ImageData:
    """A data set as its loader reads it, at `data.image_size` when set, kept for the next stage
    of a study that runs in this process (callers get slices and copies, never this object)."""
    dataset = DATASETS[cfg.dataset]
    data = dataset.load(cfg)
    return resized(data, cfg.image_size) if cfg.image_size and not dataset.sizes_itself else data


def needs_folder(cfg: DataConfig) -> bool:
    """Whether a study on this data must be given --data-dir here: none is set and the data set
    is not on this machine (a download may still work, but only online)."""
    return not cfg.data_dir and not (cfg.dataset in DATASETS and DATASETS[cfg.dataset].here())


def _subset(data: ImageData, cfg: DataConfig) -> ImageData:
    train_x, train_y, test_x, test_y = data.train_x, data.train_y, data.test_x, data.test_y
    val_x = val_y = None
    if cfg.val_size:
        if cfg.val_size >= len(train_y):
            raise ConfigError(f"data.val_size={cfg.val_size} leaves no training images (only {len(train_y)}): set "
                              f"data.val_size below {len(train_y)} (0: no validation split)")
        # The validation images come off the end of the whole training set, before
        # n_train slices it: a small training subset keeps the same validation set.
        val_x, val_y = train_x[-cfg.val_size :], train_y[-cfg.val_size :]
        train_x, train_y = train_x[: -cfg.val_size], train_y[: -cfg.val_size]
    if cfg.n_train:
        train_x, train_y = train_x[: cfg.n_train], train_y[: cfg.n_train]
    if cfg.n_test:
        test_x, test_y = test_x[: cfg.n_test], test_y[: cfg.n_test]
    return dataclasses.replace(data, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                               val_x=val_x, val_y=val_y, augment=cfg.augment)
