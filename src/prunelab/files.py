"""Writing files so that only a complete file ever carries its final name, and
reading a folder someone else may have made without leaving it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

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
# ----------------------------------------------------------------------------- reading inside a folder

def is_plain_name(name: object) -> bool:
    """A file or folder name that stays where it is put: no separator, not `.` or `..`."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _kind(mode: int) -> str | None:
    """What a file that must not be read is (None for a folder or regular file)."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return "a device, pipe or socket"


def plain_tree(folder: str | Path, hint: str) -> list[str]:
    """The files under `folder` (paths relative to it, '/'-separated, sorted), when it holds
    only folders and regular files of one name each: no symbolic link (which could lead
    anywhere), no second name of a file kept elsewhere (a hard link), no device, pipe or
    socket. Else a one-line error naming the first that is not, followed by `hint`."""
    folder = Path(folder)
    found = []

    def walk(where: Path, prefix: str) -> None:
        with os.scandir(where) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                info = entry.stat(follow_symlinks=False)
                kind = _kind(info.st_mode)
                if kind is None and stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                    kind = f"a file with {info.st_nlink} names (a hard link)"
                if kind is not None:
                    raise ConfigError(f"{Path(entry.path)} is {kind}: {hint}")
                if stat.S_ISDIR(info.st_mode):
                    walk(Path(entry.path), f"{prefix}{entry.name}/")
                else:
                    found.append(f"{prefix}{entry.name}")

    walk(folder, "")
    return found


def open_inside(folder: str | Path, relative: str, hint: str) -> BinaryIO:
    """The regular file `relative` ('/'-separated plain names) of `folder`, opened for reading
    without following a symbolic link anywhere below `folder` (each step is opened relative
    to the one before, so nothing swapped in after a check can lead elsewhere); else a
    one-line error followed by `hint`."""
    parts = relative.split("/")
    if not all(is_plain_name(p) for p in parts):
        raise ConfigError(f"{relative!r} is not a path inside {folder}: {hint}")
    path = Path(folder, *parts)
    try:
        here = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"{folder} cannot be read as a folder ({exc.strerror}): {hint}") from None
    try:
        for part in parts[:-1]:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=here)
            os.close(here)
            here = below
        # O_NONBLOCK: opening a pipe must not wait for a writer; it is refused just below.
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=here)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: {hint}") from None
    except OSError as exc:  # ELOOP or ENOTDIR: a symbolic link on the way
        raise ConfigError(f"{path} cannot be read as a plain file ({exc.strerror}): {hint}") from None
    finally:
        os.close(here)
    info = os.fstat(fd)
    kind = _kind(info.st_mode) or ("a folder" if stat.S_ISDIR(info.st_mode) else None)
    if kind is None and info.st_nlink > 1:
        kind = f"a file with {info.st_nlink} names (a hard link)"
    if kind is not None:
        os.close(fd)
        raise ConfigError(f"{path} is {kind}: {hint}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
