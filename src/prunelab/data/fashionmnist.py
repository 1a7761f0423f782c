"""FashionMNIST: from --data-dir, else Debian's package dataset-fashion-mnist, else a download."""

from __future__ import annotations

import errno
import gzip
import hashlib
import math
import shutil
import warnings
import zlib
from pathlib import Path

import torch

from prunelab.config import DataConfig
from prunelab.data.base import ImageData, cache_dir, cache_folder, cache_unwritable
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
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, FashionMNIST's images and labels
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


def idx_problem(path: Path) -> str | None:
    """What is wrong with a plain IDX file (its size against what its header promises), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != IDX_UBYTE or not 1 <= head[3] <= 3:
                return f"not an IDX file of bytes (it starts {head.hex() or 'empty'})"
            dims = f.read(4 * head[3])
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if len(dims) < 4 * head[3]:
        return f"truncated: {size} bytes, not even its header"
    expected = 4 + len(dims) + math.prod(int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4))
    return None if size == expected else f"{'truncated' if size < expected else 'too long'}: {size} bytes, its header says {expected}"


def _copy_idx(source: Path, target: Path) -> None:
    """`source` (plain, or gzipped as source.gz) decompressed to `target`, whole or not at all."""
    try:
        with atomic_path(target) as tmp:
            try:
                if source.is_file():
                    shutil.copyfile(source, tmp)
                else:
                    with gzip.open(source.with_name(f"{source.name}.gz"), "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise DataError(f"cannot read {source}(.gz): {exc}; the FashionMNIST folder {source.parent} is "
                                "corrupt: replace it or pass another --data-dir") from None
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                    raise cache_unwritable(target.parent, exc) from None
                raise DataError(f"cannot read {source}(.gz): {exc.strerror or exc}; the FashionMNIST folder "
                                f"{source.parent} is unreadable") from None
    except OSError as exc:  # the temporary file itself could not be made
        raise cache_unwritable(target.parent, exc) from None


def _torchvision_root(idx_folder: Path) -> Path:
    """A root in torchvision's layout (ROOT/FashionMNIST/raw/<plain IDX files>).

    torchvision reads only uncompressed IDX files; Debian ships them gzipped, so
    they are decompressed once into the cache, keyed by the files' content.
    Each file is written under a unique temporary name and renamed when
    complete, so processes filling the cache at once never read a half file.
    A cached copy that is damaged all the same (cut short by a full disk, edited)
    is named in a warning and rebuilt from the source, once; a source file that is
    itself damaged is named as such.
    """
    if idx_folder.name == "raw" and idx_folder.parent.name == "FashionMNIST" and all(
        (idx_folder / f).is_file() for f in FASHION_MNIST_FILES
    ):
        for name in FASHION_MNIST_FILES:  # read where it is: a damaged file is the folder's own
            problem = idx_problem(idx_folder / name)
            if problem:
                raise DataError(f"the FashionMNIST file {idx_folder / name} is damaged ({problem}): replace it "
                                "or pass another --data-dir")
        return idx_folder.parent.parent
    try:
        key = _content_key(idx_folder)
    except OSError as exc:
        raise DataError(f"cannot read the FashionMNIST files in {idx_folder}: {exc}") from None
    root = cache_folder(f"fashionmnist-{key}")
    raw = cache_folder(f"fashionmnist-{key}/FashionMNIST/raw")
    for name in FASHION_MNIST_FILES:
        target, source = raw / name, idx_folder / name
        if target.is_file():
            problem = idx_problem(target)
            if problem is None:
                continue
            warnings.warn(f"the cached copy {target} of {source}(.gz) is damaged ({problem}): rebuilding it "
                          "from the source", stacklevel=2)
        _copy_idx(source, target)
        problem = idx_problem(target)
        if problem:  # a fresh copy of the source is just as damaged: the source is
            target.unlink(missing_ok=True)
            raise DataError(f"the FashionMNIST file {source}(.gz) is damaged ({problem}); the folder {idx_folder} is "
                            "corrupt: replace it or pass another --data-dir")
    return root


def _drop_damaged_download(root: Path) -> None:
    """A damaged file of an earlier download is removed (named in a warning), so that
    torchvision downloads it again rather than reading it."""
    raw = root / "FashionMNIST" / "raw"
    for name in FASHION_MNIST_FILES:
        problem = idx_problem(raw / name) if (raw / name).is_file() else None
        if problem:
            warnings.warn(f"the cached download {raw / name} is damaged ({problem}): downloading it again",
                          stacklevel=2)
            (raw / name).unlink()


def _read_fashionmnist(root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=download)
    test = FashionMNIST(str(root), train=False, download=download)
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def fashionmnist_here() -> bool:
    """Whether FashionMNIST is on this machine without --data-dir: Debian's package, or an earlier download."""
    return _idx_folder(DEBIAN_FASHION_MNIST) is not None or _idx_folder(cache_dir() / "download") is not None


def _labels_file(folder: Path, name: str) -> str:
    return str(folder / name if (folder / name).is_file() else folder / f"{name}.gz")


def load_fashionmnist(cfg: DataConfig) -> ImageData:
    """FashionMNIST from --data-dir, else Debian's package, else a download."""
    tried = []
    folders = [Path(cfg.data_dir)] if cfg.data_dir else [DEBIAN_FASHION_MNIST]
    label_files: dict[str, str] = {}
    for folder in folders:
        idx = _idx_folder(folder)
        if idx is None:
            tried.append(f"no IDX files in {folder}")
            continue
        root = _torchvision_root(idx)
        try:
            tensors = _read_fashionmnist(root, download=False)
        except Exception as exc:  # torchvision raises bare errors on malformed files
            raise DataError(f"FashionMNIST files in {idx} are corrupt ({type(exc).__name__}: {exc}); replace them or "
                            "pass another --data-dir") from None
        source = str(idx.resolve())
        label_files = {"train": _labels_file(idx, "train-labels-idx1-ubyte"),
                       "test": _labels_file(idx, "t10k-labels-idx1-ubyte")}
        break
    else:
        if cfg.data_dir:
            raise DataError(
                f"no FashionMNIST files in {cfg.data_dir}: expected {', '.join(FASHION_MNIST_FILES)} (plain or .gz); "
                "fix --data-dir, or omit it to use Debian's dataset-fashion-mnist or a download"
            )
        root = cache_folder("download")
        _drop_damaged_download(root)
        try:
            tensors = _read_fashionmnist(root, download=True)
            source = "torchvision:FashionMNIST"
        except Exception:
            raise DataError(
                "FashionMNIST not found: pass --data-dir DIR with its IDX files, "
                "install Debian's package dataset-fashion-mnist, or go online so torchvision can download it"
            ) from None
    train_x, train_y, test_x, test_y = tensors
    return ImageData("fashionmnist", train_x, train_y, test_x, test_y, (0.2860,), (0.3530,), list(FASHION_CLASSES),
                     source=source, label_files=label_files)
