"""FashionMNIST: from --data-dir, else Debian's package dataset-fashion-mnist, else a download."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import torch

from prunelab.config import DataConfig
from prunelab.data.base import ImageData, cache_dir
from prunelab.errors import DataError
from prunelab.files import atomic_path

# Debian's package dataset-fashion-mnist installs the original IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _idx_folder(folder: Path) -> Path | None:
    """The folder that holds the four IDX files (plain or .gz), if any does."""
    for candidate in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        if all((candidate / f).is_file() or (candidate / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES):
            return candidate
    return None


CACHE_FORMAT = "fashionmnist-v2"
HEADER_BYTES = 1 << 16  # enough of each file to tell a replaced or repaired one apart


def _content_key(idx_folder: Path) -> str:
    """The source files' names, sizes, modification times and first bytes: a folder
    whose files were fixed or replaced gets a fresh cache, never the old copy."""
    h = hashlib.sha1(f"{CACHE_FORMAT}|{idx_folder.resolve()}".encode())
    for name in FASHION_MNIST_FILES:
        source = idx_folder / name if (idx_folder / name).is_file() else idx_folder / f"{name}.gz"
        st = source.stat()
        h.update(f"|{source.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(source, "rb") as f:
            h.update(f.read(HEADER_BYTES))
    return h.hexdigest()[:16]


def _torchvision_root(idx_folder: Path) -> Path:
    """A root in torchvision's layout (ROOT/FashionMNIST/raw/<plain IDX files>).

    torchvision reads only uncompressed IDX files; Debian ships them gzipped, so
    they are decompressed once into the cache, keyed by the files' content.
    Each file is written under a unique temporary name and renamed when
    complete, so processes filling the cache at once never read a half file.
    """
    if idx_folder.name == "raw" and idx_folder.parent.name == "FashionMNIST" and all(
        (idx_folder / f).is_file() for f in FASHION_MNIST_FILES
    ):
        return idx_folder.parent.parent
    try:
        key = _content_key(idx_folder)
    except OSError as exc:
        raise DataError(f"cannot read the FashionMNIST files in {idx_folder}: {exc}") from None
    root = cache_dir() / f"fashionmnist-{key}"
    raw = root / "FashionMNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write the data cache {raw} ({exc.strerror}): point PRUNELAB_CACHE at a writable folder") from None
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.is_file():
            continue
        source = idx_folder / name
        try:
            with atomic_path(target) as tmp:
                if source.is_file():
                    shutil.copyfile(source, tmp)
                else:
                    with gzip.open(idx_folder / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot read {source}(.gz): {exc}; the FashionMNIST folder {idx_folder} is corrupt") from None
    return root


def _read_fashionmnist(root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=download)
    test = FashionMNIST(str(root), train=False, download=download)
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def fashionmnist_here() -> bool:
    """Whether FashionMNIST is on this machine without --data-dir: Debian's package, or an earlier download."""
    return _idx_folder(DEBIAN_FASHION_MNIST) is not None or _idx_folder(cache_dir() / "download") is not None


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
            source = str(idx.resolve())
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
            source = "torchvision:FashionMNIST"
        except Exception:
            raise DataError(
                "FashionMNIST not found: pass --data-dir DIR with its IDX files, "
                "install Debian's package dataset-fashion-mnist, or go online so torchvision can download it"
            ) from None
    train_x, train_y, test_x, test_y = tensors
    return ImageData("fashionmnist", train_x, train_y, test_x, test_y, (0.2860,), (0.3530,), list(FASHION_CLASSES),
                     source=source)
