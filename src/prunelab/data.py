"""Data sets as in-memory tensors.

Each loader reads the real files once into uint8 tensors (N, C, H, W); batches
are cut from those tensors and normalised a whole batch at a time, so no
per-sample PIL transform sits on the training path.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from prunelab.config import DataConfig
from prunelab.errors import ConfigError, DataError

# Debian's package dataset-fashion-mnist installs the original IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def cache_dir() -> Path:
    """Downloads and decompressed copies go here (never into the repository)."""
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab"))


@dataclass
class ImageData:
    """A labelled image data set held in memory, with its normalisation."""

    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    augment: bool = False  # training batches get random_crop_flip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float batch, scaled to [0, 1] and standardised per channel."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return x.float().div_(255.0).sub_(mean).div_(std)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (inputs, labels) batches cut from in-memory tensors."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, generator)
        yield normalise(xb), yb


# --------------------------------------------------------------------------- FashionMNIST

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _idx_folder(folder: Path) -> Path | None:
    """The folder that holds the four IDX files (plain or .gz), if any does."""
    for candidate in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        if all((candidate / f).is_file() or (candidate / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES):
            return candidate
    return None


def _torchvision_root(idx_folder: Path) -> Path:
    """A root in torchvision's layout (ROOT/FashionMNIST/raw/<plain IDX files>).

    torchvision reads only uncompressed IDX files; Debian ships them gzipped, so
    they are decompressed once into the cache, keyed by the source folder.
    """
    if idx_folder.name == "raw" and idx_folder.parent.name == "FashionMNIST" and all(
        (idx_folder / f).is_file() for f in FASHION_MNIST_FILES
    ):
        return idx_folder.parent.parent
    key = hashlib.sha1(str(idx_folder.resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / f"fashionmnist-{key}"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        source = idx_folder / name
        tmp = target.with_suffix(".part")
        try:
            if source.is_file():
                shutil.copyfile(source, tmp)
            else:
                with gzip.open(idx_folder / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot read {source}(.gz): {exc}; the FashionMNIST folder {idx_folder} is corrupt") from None
        tmp.replace(target)  # only a complete file ever carries the final name
    return root


def _read_fashionmnist(root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=download)
    test = FashionMNIST(str(root), train=False, download=download)
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def load_fashionmnist(cfg: DataConfig) -> ImageData:
    """FashionMNIST from --data-dir, else Debian's package, else a download."""
    tried = []
    folders = [Path(cfg.data_dir)] if cfg.data_dir else [DEBIAN_FASHION_MNIST]
    for folder in folders:
        idx = _idx_folder(folder)
        if idx is None:
            tried.append(f"no IDX files in {folder}")
            continue
        try:
            tensors = _read_fashionmnist(_torchvision_root(idx), download=False)
            break
        except DataError:
            raise
        except Exception as exc:  # torchvision raises bare errors on malformed files
            raise DataError(f"FashionMNIST files in {idx} are corrupt ({type(exc).__name__}: {exc}); replace them or pass another --data-dir") from None
    else:
        if cfg.data_dir:
            raise DataError(
                f"no FashionMNIST files in {cfg.data_dir}: expected {', '.join(FASHION_MNIST_FILES)} (plain or .gz); "
                "fix --data-dir, or omit it to use Debian's dataset-fashion-mnist or a download"
            )
        try:
            tensors = _read_fashionmnist(cache_dir() / "download", download=True)
        except Exception:
            raise DataError(
                "FashionMNIST not found: pass --data-dir DIR with its IDX files, "
                "install Debian's package dataset-fashion-mnist, or go online so torchvision can download it"
            ) from None
    train_x, train_y, test_x, test_y = tensors
    return ImageData("fashionmnist", train_x, train_y, test_x, test_y, (0.2860,), (0.3530,), list(FASHION_CLASSES))


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings, and refuses anything else:
    a CIFAR batch file is data, so it must never get to run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data, labels = batch["data"], batch.get("labels", batch.get("fine_labels"))
        x = torch.as_tensor(data)
        y = torch.as_tensor(labels, dtype=torch.long)
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch ({type(exc).__name__}: {str(exc)[:80]}); "
                        "replace the folder with the original cifar-10-batches-py") from None
    if x.dtype != torch.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(f"{path} has arrays of the wrong shape (data {tuple(x.shape)} {x.dtype}, {len(y)} labels; "
                        "expected uint8 N x 3072 and N labels): replace the folder with the original cifar-10-batches-py")
    return x.view(-1, 3, 32, 32), y


def _cifar_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    return None


def read_cifar10_folder(folder: Path) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) from a folder in the `cifar-10-batches-py` layout.

    No MD5 check: a well-formed folder with fewer rows (a subset) is accepted;
    a missing batch or a malformed array is refused with a clear error.
    """
    missing = [b for b in CIFAR10_BATCHES if not (folder / b).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}: "
                        "restore the full cifar-10-batches-py folder or pass another --data-dir")
    parts = [_read_cifar_batch(folder / b) for b in CIFAR10_BATCHES]
    train_x = torch.cat([x for x, _ in parts[:5]])
    train_y = torch.cat([y for _, y in parts[:5]])
    return train_x, train_y, parts[5][0], parts[5][1]


def load_cifar10(cfg: DataConfig) -> ImageData:
    """CIFAR-10 from --data-dir (any cifar-10-batches-py folder), else torchvision's download."""
    if cfg.data_dir:
        folder = _cifar_folder(Path(cfg.data_dir))
        if folder is None:
            raise DataError(f"no CIFAR-10 batches in {cfg.data_dir}: expected a cifar-10-batches-py folder "
                            "(data_batch_1..5, test_batch); fix --data-dir or omit it to download")
    else:
        root = cache_dir() / "download"
        folder = root / "cifar-10-batches-py"
        if not (folder / "test_batch").is_file():
            try:
                from torchvision.datasets import CIFAR10

                CIFAR10(str(root), train=False, download=True)
            except Exception:
                raise DataError("CIFAR-10 not found: pass --data-dir DIR with a cifar-10-batches-py folder, "
                                "or go online so torchvision can download it") from None
    train_x, train_y, test_x, test_y = read_cifar10_folder(folder)
    # The reference normalisation of the pretrained CIFAR ResNets (ImageNet statistics).
    return ImageData("cifar10", train_x, train_y, test_x, test_y, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     list(CIFAR10_CLASSES))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, padding: int = 4) -> torch.Tensor:
    """Batched augmentation on uint8 tensors: random crop after zero padding, and horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


AUGMENTATIONS = {"crop_flip": random_crop_flip}


# --------------------------------------------------------------------------- registry

from prunelab.imagefolder import load_imagefolder  # noqa: E402  (it builds on ImageData above)

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
    data = loader(cfg)
    return _subset(data, cfg)


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
