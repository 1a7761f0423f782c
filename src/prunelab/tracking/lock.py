"""One `main` of a study at a time on a server: a lock the server holds, as a tag on the
study's experiment naming the process that runs it (host, pid, process start).

Two `prunelab run` of one study at once would run every step twice and register each
trial twice. MLflow has no compare-and-set, so the lock is taken by set-then-read-back:
a process that finds the tag free (or naming a process of this host that is gone)
writes its own holder, waits SETTLE_SECONDS, and reads the tag back; only the process
whose holder is still there holds the lock. A rival that read the tag before this
write writes its own within one call's time, so after the wait exactly one holder is
left. The holder removes the tag when `main` ends, however it ends; a process killed
outright leaves it, and the next run on the same host takes it over.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from prunelab import paths
from prunelab.errors import PrunelabError
from prunelab.tracking.connection import client, is_mlflow_error, one_try
from prunelab.tracking.owner import is_alive, process_tags

# Longer than a rival's read of the tag followed by its write (two calls to the server).
SETTLE_SECONDS = 2.0


class StudyBusy(PrunelabError):
    """The study's `main` already runs (another process holds its lock)."""


@dataclass(frozen=True)
class Holder:
    """The process that holds a study's lock; `token` tells two takes by one process apart."""

    host: str
    pid: str
    process_start: str
    since: str
    token: str

    @classmethod
    def this_process(cls) -> "Holder":
        tags = process_tags()
        return cls(tags[paths.TAG_HOST], tags[paths.TAG_PID], tags[paths.TAG_PROCESS_START],
                   time.strftime("%Y-%m-%d %H:%M:%S %Z"), secrets.token_hex(8))

    @classmethod
    def parse(cls, text: str | None) -> "Holder | None":
        if not text:
            return None
        try:
            return cls(**{k: str(v) for k, v in json.loads(text).items()})
        except (ValueError, TypeError, AttributeError):
            return cls("?", "?", "", "?", text[:32])  # not ours to read: someone else's value, held

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def alive(self) -> bool | None:
        """Whether its process still runs: None when that cannot be told here (another host)."""
        return is_alive({paths.TAG_HOST: self.host, paths.TAG_PID: self.pid,
                         paths.TAG_PROCESS_START: self.process_start})

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host} (since {self.since})"


def _experiment_id(name: str) -> str:
    """The study's experiment, created when it is new (a rival creating it at once is fine)."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name)
        except Exception as exc:
            if not is_mlflow_error(exc):
                raise
            exp = c.get_experiment_by_name(name)  # created meanwhile by a rival
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise PrunelabError(f"experiment {name!r} is deleted (in the MLflow UI's trash): restore it, or run the study "
                            "under another name (--set study=...)")
    return exp.experiment_id


def _holder(experiment_id: str) -> Holder | None:
    return Holder.parse(client().get_experiment(experiment_id).tags.get(paths.TAG_STUDY_LOCK))


def _busy(study: str, holder: Holder | None) -> StudyBusy:
    who = str(holder) if holder else "another process"
    return StudyBusy(f"study {study!r} is already running: {who} holds it on this tracking server; wait for it to "
                     f"end, or, if that process is gone on another machine, delete the tag {paths.TAG_STUDY_LOCK} of "
                     f"experiment {study!r} in the MLflow UI and run again")


def take(study: str) -> tuple[str, Holder]:
    """The lock of `study` (its experiment's id and this process as holder), or StudyBusy
    naming the process that holds it. Takes over a lock whose process on this host is gone."""
    experiment_id = _experiment_id(study)
    current = _holder(experiment_id)
    if current is not None and current.alive() is not False:
        raise _busy(study, current)
    mine = Holder.this_process()
    client().set_experiment_tag(experiment_id, paths.TAG_STUDY_LOCK, mine.text())
    time.sleep(SETTLE_SECONDS)  # a rival that read the tag before this write has written its own by now
    now = _holder(experiment_id)
    if now != mine:
        raise _busy(study, now)
    if current is not None:
        print(f"prunelab: took over the lock of study {study!r} from {current}, which is gone", flush=True)
    return experiment_id, mine


def release(experiment_id: str, mine: Holder) -> None:
    """Remove the lock if this process still holds it. One quick try: a server gone by now
    keeps the tag, and the next run on this host takes it over."""
    with one_try(), contextlib.suppress(Exception):
        if _holder(experiment_id) == mine:
            client().delete_experiment_tag(experiment_id, paths.TAG_STUDY_LOCK)


@contextlib.contextmanager
def held(study: str) -> Iterator[None]:
    """The block runs holding the study's lock (StudyBusy before it, when another process holds it)."""
    experiment_id, mine = take(study)
    try:
        yield
    finally:
        release(experiment_id, mine)
