"""What every data set shares: the in-memory `ImageData`, batches cut from it,
batched augmentation, and the cache folder.

Each loader (one module per data set in this package) reads the real files
once into uint8 tensors (N, C, H, W); batches are cut from those tensors and
normalised a whole batch at a time, so no per-sample PIL transform sits on the
training path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from prunelab.errors import DataError, first_line
from prunelab.hardware import check_memory

CACHE_ENV = "PRUNELAB_CACHE"


def cache_dir() -> Path:
    """Downloads and decompressed copies go here (never into the repository)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "prunelab"))


def cache_folder(name: str = "") -> Path:
    """A folder of the cache to write into, created: the one check every loader that writes
    to the cache makes, so a cache that cannot be written is one line, not a traceback."""
    folder = cache_dir() / name if name else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_unwritable(folder, exc) from None
    return folder


def cache_unwritable(path: Path, exc: Exception) -> DataError:
    """The one-line error of a write into the cache that failed (no folder, no space, read-only)."""
    said = getattr(exc, "strerror", None) or first_line(exc)
    return DataError(f"cannot write the data cache {path} ({said}): point {CACHE_ENV} at a writable folder with space")


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
    skipped: int = 0  # unreadable images the loader left out
    source: str = ""  # where the images were read from (a folder, or a download)
    # split -> the file its labels were read from, when there is one (named by errors)
    label_files: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Labels a classifier can train on, or one line before any run: one integer label per
        image, each in [0, num_classes) (an out-of-range label would fail training midway;
        fewer labels than images would silently train on fewer images)."""
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y),
                            ("validation", self.val_x, self.val_y)):
            if x is None and y is None:
                continue
            problem = label_problem(x, y, self.num_classes)
            if problem:
                where = self.label_files.get(split) or self.source or "its files"
                raise DataError(f"data set {self.name} ({where}): the {split} labels {problem}; "
                                "replace the files with intact ones")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> "ImageData":
        """The same data with every tensor on `device` (moved once, not per batch)."""
        move = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **move)

    @staticmethod
    def pixels(x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float pixels in [0, 1]: the images as a person has them, and
        what every logged model takes (its normalisation is inside it)."""
        return x.float().div_(255.0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float batch, scaled to [0, 1] and standardised per channel."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return self.pixels(x).sub_(mean).div_(std)
    def splits(self) -> list["Split"]:
        """The image sets a run reads, each with a digest that changes when its images or labels do."""
        named = [("train", self.train_x, self.train_y), ("validation", self.val_x, self.val_y),
                 ("test", self.test_x, self.test_y)]
        return [Split(f"{self.name}-{context}", context, digest(x, y), self.source or "unknown", len(y), tuple(x.shape[1:]))
                for context, x, y in named if x is not None]


RESIZE_CHUNK = 2048  # images resized at once: bounds the float copy a resize makes


def resized(data: ImageData, side: int) -> ImageData:
    """`data` with every image resized to `side` x `side` px (bilinear, antialiased when shrinking),
    still uint8, so a network that needs larger images (or a faster, smaller input) can have them."""
    if data.input_shape[-2:] == (side, side):
        return data
    images = sum(len(x) for x in (data.train_x, data.test_x, data.val_x) if x is not None)
    check_memory(images * data.input_shape[0] * side * side, f"{images:,} images of {side} x {side} px",
                 "lower data.image_size")

    def resize(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        parts = [torch.nn.functional.interpolate(x[i : i + RESIZE_CHUNK].float(), size=(side, side), mode="bilinear",
                                                 align_corners=False, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
                 for i in range(0, len(x), RESIZE_CHUNK)]
        return torch.cat(parts) if parts else x.new_empty((0, x.shape[1], side, side))

    return dataclasses.replace(data, train_x=resize(data.train_x), test_x=resize(data.test_x), val_x=resize(data.val_x),
                               source=f"{data.source} (resized to {side} x {side} px)" if data.source else data.source)


def label_problem(x: torch.Tensor | None, y: torch.Tensor | None, num_classes: int) -> str | None:
    """What is wrong with the labels `y` of the images `x`, or None."""
    if x is None or y is None:
        return "are missing" if y is None else "have no images"
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        return f"are {str(y.dtype).replace('torch.', '')}, not integers"
    if y.ndim != 1:
        return f"are not one per image (shape {tuple(y.shape)})"
    if len(y) != len(x):
        return f"number {len(y)} for {len(x)} images"
    if len(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            return (f"include {bad}, outside 0..{num_classes - 1} ({num_classes} classes; "
                    f"{int(((y < 0) | (y >= num_classes)).sum())} labels out of range)")
    return None


@dataclass(frozen=True)
class Split:
    """One image set of a run, as lineage records it: what it is, where it came from, how many images."""

    name: str      # e.g. fashionmnist-train
    context: str   # train, validation or test
    digest: str
    source: str
    images: int
    image_shape: tuple[int, ...]  # C, H, W of its uint8 images


DIGEST_SAMPLES = 64  # images hashed whole; the rest are covered by the shape and the labels


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """A cheap fingerprint of an image set: its shape, every label, and the bytes of
    up to DIGEST_SAMPLES images spread evenly over it (milliseconds for 60,000 images)."""
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}".encode())
    h.update(y.cpu().contiguous().numpy().tobytes())
    n = len(x)
    for i in sorted({(k * n) // DIGEST_SAMPLES for k in range(min(n, DIGEST_SAMPLES))}):
        h.update(x[i].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
            idx = order[start : start + batch_size].to(x.device)
            xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, generator)
        yield normalise(xb), yb


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, padding: int = 4) -> torch.Tensor:
    """Batched augmentation on uint8 tensors: random crop after zero padding, and horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    # Drawn on the CPU generator (the same draws on any device), then moved to the data.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
