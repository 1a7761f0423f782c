"""CIFAR-10 from a `cifar-10-batches-py` folder (the full release or a subset), else torchvision's download."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import torch

from prunelab.config import DataConfig
from prunelab.data.base import ImageData, cache_dir, cache_folder
from prunelab.errors import DataError

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


def _downloaded() -> Path:
    """Where torchvision's download of CIFAR-10 goes (and is found again)."""
    return cache_dir() / "download" / "cifar-10-batches-py"


def cifar10_here() -> bool:
    """Whether CIFAR-10 is on this machine without --data-dir: an earlier download."""
    return (_downloaded() / "test_batch").is_file()


def _download(root: Path, folder: Path) -> None:
    """torchvision's CIFAR-10 download into the cache, unless it is there."""
    if (folder / "test_batch").is_file():
        return
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=False, download=True)
    except Exception:
        raise DataError("CIFAR-10 not found: pass --data-dir DIR with a cifar-10-batches-py folder, "
                        "or go online so torchvision can download it") from None


def load_cifar10(cfg: DataConfig) -> ImageData:
    """CIFAR-10 from --data-dir (any cifar-10-batches-py folder), else torchvision's download."""
    if cfg.data_dir:
        folder = _cifar_folder(Path(cfg.data_dir))
        if folder is None:
            raise DataError(f"no CIFAR-10 batches in {cfg.data_dir}: expected a cifar-10-batches-py folder "
                            "(data_batch_1..5, test_batch); fix --data-dir or omit it to download")
        train_x, train_y, test_x, test_y = read_cifar10_folder(folder)
    else:
        root = cache_folder("download")
        folder = root / "cifar-10-batches-py"
        _download(root, folder)
        try:
            train_x, train_y, test_x, test_y = read_cifar10_folder(folder)
        except DataError as exc:  # the cache's copy is damaged, not CIFAR-10: fetched again, once
            warnings.warn(f"the cached download {folder} is damaged ({exc}): downloading it again", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
            _download(root, folder)
            train_x, train_y, test_x, test_y = read_cifar10_folder(folder)
    source = str(folder.resolve()) if cfg.data_dir else "torchvision:CIFAR10"
    # The reference normalisation of the pretrained CIFAR ResNets (ImageNet statistics).
    return ImageData("cifar10", train_x, train_y, test_x, test_y, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     list(CIFAR10_CLASSES), source=source,
                     label_files={"train": f"{folder}/data_batch_1..5", "test": str(folder / "test_batch")})
