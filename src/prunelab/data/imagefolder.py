"""Image folders (`train/` and `test/`, one sub-folder per class) as in-memory uint8 tensors.

Every image is decoded once, resized (shorter side to `image_size`, then a
centre crop) and stored as uint8; the decoded tensors are cached on disk,
keyed by the folder, the listing and the size, so the stages of a study
decode the images once between them. Images are kept in a fixed shuffled
order so that `data.n_train=N` takes a mix of classes, not the first class.
An unreadable image is skipped and counted (one warning names them once the
folder has loaded), but every class
must keep at least one readable image in each split: a class with none would
train a classifier that can never predict it.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from prunelab import progress
from prunelab.config import DataConfig
from prunelab.data.base import ImageData, cache_dir, cache_folder, cache_unwritable
from prunelab.errors import DataError
from prunelab.files import atomic_path
from prunelab.hardware import check_memory

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DEFAULT_SIZE = 224
# ImageNet statistics: the pretrained VGG16 features expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ORDER_SEED = 0  # the fixed shuffle of each split
CACHE_FORMAT = "imagefolder-v1"


def _listing(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) of one split."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        files += [(p, label) for p in sorted((split_dir / name).iterdir())
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def _check_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"image folder {root} has no {split}/ sub-folder: expected {split}/<class>/<image> for every class")
    classes, files = _listing(split_dir)
    if not files:
        raise DataError(f"no images in {split_dir}: expected {split}/<class>/<image>.jpg (suffixes {', '.join(IMAGE_SUFFIXES)})")
    with_images = sorted({classes[label] for _, label in files})
    if len(with_images) < 2:
        raise DataError(f"{split_dir} holds images of only one class ({', '.join(with_images)}): "
                        "a classifier needs at least two class folders with images")
    empty = [c for c in classes if c not in with_images]
    if empty:
        raise DataError(f"class folder {split_dir / empty[0]} holds no image (suffixes {', '.join(IMAGE_SUFFIXES)}): "
                        "add images or remove the folder")
    return classes, files


def _decode(path: Path, size: int, unreadable: list[str]) -> torch.Tensor | None:
    """uint8 (3, size, size), or None when the file is not a readable image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img = ImageOps.fit(img, (size, size), method=Image.BILINEAR)  # shorter side, then centre crop
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        unreadable.append(f"{path} ({type(exc).__name__})")
        return None
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).clone()


def _read_split(files: list[tuple[Path, int]], size: int, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    images, labels, unreadable = [], [], []
    for i in progress.bar(order, "decode"):
        path, label = files[i]
        x = _decode(path, size, unreadable)
        if x is None:
            continue
        images.append(x)
        labels.append(label)
    if not images:
        raise DataError(f"none of the {len(files)} images under {files[0][0].parent.parent} could be read: check the files")
    unread = sorted(set(range(len(classes))) - set(labels))
    if unread:
        folder = next(path.parent for path, label in files if label == unread[0])
        raise DataError(f"no image in {folder} could be read ({sum(1 for _, l in files if l == unread[0])} unreadable): "
                        f"class {classes[unread[0]]!r} would never be seen in training; fix or remove its images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), unreadable


def _cache_file(root: Path, size: int, listings: list) -> Path:
    """Keyed by the folder, every file's name, size and mtime, and the resolution."""
    h = hashlib.sha1(f"{CACHE_FORMAT}|{root.resolve()}|{size}".encode())
    for files in listings:
        for path, label in files:
            st = path.stat()
            h.update(f"{path.name}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_dir() / f"imagefolder-{h.hexdigest()[:16]}.pt"


def _load_cached(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # a damaged cache is rebuilt, not trusted
    return payload if isinstance(payload, dict) and payload.get("format") == CACHE_FORMAT else None


def _save_cache(path: Path, payload: dict) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save says RuntimeError when the disk fills
        raise cache_unwritable(path, exc) from None


def load_imagefolder(cfg: DataConfig) -> ImageData:
    """train/ and test/ of `cfg.data_dir`, decoded at `cfg.image_size` (224 when 0)."""
    if not cfg.data_dir:
        raise DataError("the imagefolder data set needs --data-dir DIR (a folder with train/<class>/ and test/<class>/)")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(f"no folder {root}: pass --data-dir DIR holding train/<class>/ and test/<class>/")
    size = cfg.image_size or DEFAULT_SIZE
    if size < 8:
        raise DataError(f"data.image_size={size} is too small: use at least 32 (VGG16 halves the side five times)")
    train_classes, train_files = _check_split(root, "train")
    test_classes, test_files = _check_split(root, "test")
    if train_classes != test_classes:
        raise DataError(f"train/ and test/ of {root} have different class folders "
                        f"({', '.join(train_classes)} vs {', '.join(test_classes)}): give both the same classes")
    cache = _cache_file(root, size, [train_files, test_files])
    payload = _load_cached(cache)
    if payload is None:
        cache_folder()  # one that cannot be written says so before the images are decoded, not after
        # Decoded images are held twice while they are stacked.
        check_memory(2 * 3 * size * size * (len(train_files) + len(test_files)),
                     f"{len(train_files) + len(test_files):,} images of {size} x {size} px",
                     "lower data.image_size")
        train_x, train_y, unread_train = _read_split(train_files, size, train_classes)
        test_x, test_y, unread_test = _read_split(test_files, size, test_classes)
        payload = {"format": CACHE_FORMAT, "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
                   "classes": list(train_classes), "skipped": len(unread_train) + len(unread_test),
                   "unreadable": unread_train + unread_test}
        _save_cache(cache, payload)
    if payload["skipped"]:
        named = payload.get("unreadable", [])
        warnings.warn(f"{payload['skipped']} unreadable image(s) under {root} were skipped: "
                      f"{', '.join(named[:3])}{', ...' if len(named) > 3 else ''}", stacklevel=2)
    return ImageData(f"imagefolder:{root.name}", payload["train_x"], payload["train_y"], payload["test_x"],
                      payload["test_y"], IMAGENET_MEAN, IMAGENET_STD, list(payload["classes"]),
                      skipped=int(payload["skipped"]), source=str(root.resolve()))
