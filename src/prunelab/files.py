"""Writing files so that only a complete file ever carries its final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from prunelab.errors import ConfigError, shown

NAME_MAX = 255   # bytes in one name of a path (Linux, macOS, Windows file systems)
PATH_MAX = 4096  # bytes in a whole path (Linux)


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


def checked_path(text: str | Path, what: str) -> Path:
    """`text` as a path, or a one-line error for one that no file system takes: empty,
    a NUL character, a name over NAME_MAX bytes or a path over PATH_MAX bytes (the
    operating system would refuse them with an OSError at the first look). The one
    check every path the user gives passes before anything looks at it."""
    text = str(text)
    if not text:
        raise ConfigError(f"{what} is empty: pass a path")
    if "\0" in text:
        raise ConfigError(f"{what} {shown(text)} holds a NUL character, which no path can: check the value")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {shown(text)} holds characters no file name can: check the value") from None
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ConfigError(f"{what} {shown(text)} holds a name of {len(longest)} bytes; file systems allow at most "
                          f"{NAME_MAX}: check the path")
    if len(encoded) >= PATH_MAX:
        raise ConfigError(f"{what} {shown(text)} is {len(encoded)} bytes long; paths are shorter than {PATH_MAX}: "
                          "check the path")
    return Path(text)


def check_writable(folder: str | Path, what: str) -> Path:
    """Refuse, in one line, a folder that cannot be created or written, before
    any work that would end by writing there. Creates nothing."""
    folder = checked_path(folder, what)
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
