"""Which process owns a run: the tags every run prunelab opens carries, and whether
that process still runs (`main` marks the RUNNING runs of a gone process FAILED; the
study lock is taken over from a gone holder)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prunelab import paths


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, Linux), so a reused pid is not taken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Which process owns a run: `main` marks a RUNNING run whose process is gone as abandoned."""
    return {paths.TAG_PID: str(os.getpid()), paths.TAG_HOST: socket.gethostname(),
            paths.TAG_PROCESS_START: _process_start(os.getpid())}


def is_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run (its `process_tags`) still runs: None when that
    cannot be told here (another host, or no such tags)."""
    pid, host = tags.get(paths.TAG_PID), tags.get(paths.TAG_HOST)
    if not pid or host != socket.gethostname():
        return None
    started = _process_start(int(pid))
    return bool(started) and started == tags.get(paths.TAG_PROCESS_START, started)
