"""Writing files so that only a complete file ever carries its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from prunelab.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary path beside `path` to write to; renamed onto `path` only
    when the block succeeds, removed when it fails. Unique per call, so two
    processes filling the same file never write into each other's half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_writable(folder: str | Path, what: str) -> Path:
    """Refuse, in one line, a folder that cannot be created or written, before
    any work that would end by writing there. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file, not a folder: pass a folder to write into")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder} cannot be created: {existing} is a file")
    try:  # a real write: permission bits say nothing for root or on a read-only file system
        with tempfile.TemporaryFile(dir=existing, prefix=".prunelab-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {folder} is not writable ({existing}: {exc.strerror or type(exc).__name__}): "
                          "pass a folder you can write to") from None
    return folder


@contextlib.contextmanager
def written_together(folder: str | Path, what: str = "--out") -> Iterator[Path]:
    """A temporary folder beside `folder` to write a set of files into; they are moved into
    `folder` (renames on one file system) only when the block has written them all, so a
    failure leaves none of them there, never some. A write that fails (a full disk, no
    permission) is one line naming `what`."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".part"))
    except OSError as exc:
        raise _write_failed(what, folder, exc) from None
    try:
        try:
            yield stage
            if not folder.exists():
                os.rename(stage, folder)  # the whole folder at once
            else:
                for f in sorted(stage.iterdir()):
                    os.replace(f, folder / f.name)
        except OSError as exc:
            raise _write_failed(what, folder, exc) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_failed(what: str, folder: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write {what} {folder} ({exc.strerror or type(exc).__name__}): nothing was written "
                       f"there; free space or pass a folder you can write to")
