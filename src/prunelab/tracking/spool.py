"""A run kept on local disk while the tracking server is gone, until `prunelab sync` uploads it.

The folder's format, the checks of everything sync reads from it (a spool folder is
untrusted input), and `Spool`, the folder read back; `spool_writer.SpoolWriter` writes
one, and the run handle's sink over it is `tracking.spool_sink`.

When the server stops answering in the middle of a stage, the stage goes on
and everything it would have sent lands here instead: the params and tags it
was given, the metrics not yet sent, its text and file artifacts, its models
(as weights-only checkpoints with an example input, from which sync logs the
MLflow model) and its child runs. Knows nothing of MLflow: `spool_sink.SpoolSink` is the
run handle's second sink (`tracking.run.Run`), beside MLflow's, and
`tracking.sync` reads a spool back.

    <spool dir>/<experiment>/<stage>-<run id>/
        run.json          what the run is: ids, name, status, params, tags, models, children, what sync has done
        metrics.jsonl     metrics not yet sent, one JSON object a line
        artifacts/        files and texts, under their artifact paths
        models/<name>/    checkpoint.pt (weights only) and example.pt of each model
        children/<i>/     files of the i-th child run
        .reserve          space held back for run.json's last word should the disk fill up

A disk that fills up stops the spool at the write that did not fit (a
`SpoolFull`): the reserve is given back, run.json records the status and what
could not be kept, and nothing more is written, so the run still ends on the
server once `sync` uploads what there is.

Reading a spool back trusts nothing in it: a folder may come from anyone.
`Spool.open` checks the whole folder before a byte of it is used: only
folders and regular files (no links), a record whose every field has its type,
model and file names that are plain names, a metrics file of numbers, and every
file the record names present. Sync then reads files only through
`files.open_inside`, by those names.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable


from prunelab import paths
from prunelab.data.base import cache_dir
from prunelab.errors import ConfigError, TrackingError
from prunelab.files import atomic_path, is_plain_name, open_inside, plain_tree
from prunelab.tracking.query import is_run_id

FORMAT = "prunelab-spool-v1"
RECORD = "run.json"
METRICS = "metrics.jsonl"
ARTIFACTS = "artifacts"
MODELS = "models"
CHILDREN = "children"
EXAMPLE = "example.pt"
RESERVE = ".reserve"
# Room for run.json to be written once more on a full disk (a record of a hundred
# child runs with all their params is about 200 KB).
RESERVE_BYTES = 1 << 20
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The statuses a spooled run can end with; one still RUNNING was never closed (its process died).
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
REFUSED = "a spool folder holds only what prunelab wrote there, so this one is damaged or was altered: sync refuses it (nothing was uploaded)"


def spool_dir() -> Path:
    """Where spooled runs go: $PRUNELAB_SPOOL, else `spool` in prunelab's cache folder."""
    env = os.environ.get("PRUNELAB_SPOOL")
    return Path(env) if env else cache_dir() / "spool"


def now_ms() -> int:
    return int(time.time() * 1000)


class SpoolFull(TrackingError):
    """The disk holding a spool filled up: what was kept stays, nothing more is written."""


# ----------------------------------------------------------------------------- what a record holds

def _text(v) -> bool:
    return isinstance(v, str)


def _line(v) -> bool:
    return isinstance(v, str) and v.isprintable()


def _uri(v) -> bool:
    return _line(v) and " " not in v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _time(v) -> bool:
    return _int(v) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _texts(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _numbers(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items())


def _names(v) -> bool:
    return isinstance(v, list) and all(is_plain_name(n) for n in v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# field -> (check, what it must be); a list of records is checked item by item (`_ITEMS`)
_MODEL = {"name": (is_plain_name, "a plain file name"), "final": (lambda v: isinstance(v, bool), "true or false"),
          "step": (_int, "a whole number")}
_CHILD = {"run_name": (_line, "a one-line text"), "tags": (_texts, "an object of texts"),
          "params": (_texts, "an object of texts"), "metrics": (_numbers, "an object of numbers"),
          "step": (_int, "a whole number"), "time": (_time, "a time in ms"),
          "files": (_names, "a list of plain file names")}
_RECORD = {"format": (lambda v: v == FORMAT, FORMAT), "tracking_uri": (_uri, "a URI"),
           "experiment": (_line, "a one-line text"), "run_id": (is_run_id, "a run id (32 hex digits)"),
           "run_name": (_line, "a one-line text"), "stage": (_line, "a one-line text"),
           "status": (lambda v: v in STATUSES, " or ".join(STATUSES)), "reason": (_text, "a text"),
           "spooled_at": (_time, "a time in ms"), "end_time": (_optional(_time), "a time in ms or null"),
           "params": (_texts, "an object of texts"), "tags": (_texts, "an object of texts"),
           "models": (lambda v: isinstance(v, list), "a list"), "children": (lambda v: isinstance(v, list), "a list"),
           "synced": (lambda v: isinstance(v, list) and all(map(_text, v)), "a list of texts"),
           "synced_to": (_optional(is_run_id), "a run id or null")}
_OPTIONAL = {"target_run": (_optional(is_run_id), "a run id or null"), "full": (_optional(_text), "a text or null")}
_ITEMS = {"models": _MODEL, "children": _CHILD}
_METRIC = {"key": (lambda v: isinstance(v, str) and v != "", "a metric name"), "value": (_number, "a number"),
           "timestamp": (_time, "a time in ms"), "step": (_int, "a whole number")}


def _shown(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _problem(value, fields: dict, where: str, optional: dict | None = None) -> str | None:
    """What is wrong with `value` as an object of `fields` (and `optional` ones), else None."""
    if not isinstance(value, dict):
        return f"{where or 'it'} is {_shown(value)}, not an object"
    for key, (check, what) in {**fields, **(optional or {})}.items():
        if key not in value:
            if optional and key in optional:
                continue
            return f"{where}{key} is missing"
        if not check(value[key]):
            return f"{where}{key} is {_shown(value[key])}, not {what}"
        for i, item in enumerate(value[key] if key in _ITEMS else []):
            problem = _problem(item, _ITEMS[key], f"{where}{key}[{i}].")
            if problem:
                return problem
    return None


# ----------------------------------------------------------------------------- the spool

class Spool:
    """One spooled run: its folder and its record (run.json), read back for `prunelab sync`.
    `spool_writer.SpoolWriter` is the same folder as a stage writes it."""

    def __init__(self, folder: Path, record: dict, metrics: list[dict] | None = None, files: list[str] | None = None):
        self.folder = folder
        self.record = record
        self._metrics = metrics or []
        self._files = files or []
        self.metrics_kept = len(self._metrics)

    @classmethod
    def open(cls, folder: str | Path) -> "Spool":
        """A spool folder written by prunelab, checked whole (see the module's docstring), or a
        one-line error saying why not. Reads no file of the folder through a link."""
        folder = Path(folder)
        try:
            os.lstat(folder / RECORD)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"{folder} is not a spooled run (no {RECORD}): pass the folder named in the error "
                              "that said the tracking server stopped answering") from None
        files = plain_tree(folder, REFUSED)
        try:
            with open_inside(folder, RECORD, REFUSED) as f:
                record = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder / RECORD} cannot be read ({type(exc).__name__}): the spool folder is damaged") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ConfigError(f"{folder / RECORD} is not a prunelab spool record ({FORMAT})")
        problem = _problem(record, _RECORD, "", _OPTIONAL)
        if problem:
            raise ConfigError(f"{folder / RECORD} is not a valid spool record: {problem}; {REFUSED}")
        record.setdefault("target_run", None)
        record.setdefault("full", None)
        spool = cls(folder, record, cls._read_metrics(folder, files), files)
        for name in spool.needed():
            if name not in files:
                raise ConfigError(f"{folder / name} is missing, and {RECORD} names it; {REFUSED}")
        return spool

    @staticmethod
    def _read_metrics(folder: Path, files: list[str]) -> list[dict]:
        """The spooled metrics, each checked; a last line cut short (a crash mid-write) is left out."""
        if METRICS not in files:
            return []
        with open_inside(folder, METRICS, REFUSED) as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")
        out = []
        for number, line in enumerate(lines, 1):
            last = number == len(lines)
            if last and line == "":
                break
            try:
                metric = json.loads(line)
            except ValueError:
                if last:  # no newline after it: the write was cut short, not altered
                    break
                metric = line
            problem = _problem(metric, _METRIC, "")
            if problem:
                raise ConfigError(f"{folder / METRICS} line {number} is not a spooled metric: {problem}; {REFUSED}")
            out.append({k: metric[k] for k in _METRIC})
        return out

    def _write_record(self) -> None:
        with atomic_path(self.folder / RECORD) as tmp:
            tmp.write_text(json.dumps(self.record, indent=1))

    def save(self) -> None:
        """Write the record; on a full disk it takes the reserve's place, and the spool stops there."""
        try:
            self._write_record()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._no_space("the run's record", exc)

    def _no_space(self, what: str, exc: OSError) -> None:
        first = not self.record["full"]
        if first:
            self.record["full"] = f"{what} ({exc.strerror or os.strerror(exc.errno)})"
        (self.folder / RESERVE).unlink(missing_ok=True)
        try:
            self._write_record()  # the record's last word, in the room the reserve held
        except OSError:
            pass  # not even that: run.json keeps its previous state, and the error below says so
        raise SpoolFull(f"the disk holding {self.folder} is full: {self.record['full']} could not be kept") from None

    def kept(self) -> str:
        """What the folder holds, in words: 'its params, 12 metrics and the model model'."""
        names = [m["name"] for m in self.record["models"]]
        parts = ["its params"]
        if self.metrics_kept:
            parts.append(f"{self.metrics_kept} metrics")
        if self.record["children"]:
            parts.append(f"{len(self.record['children'])} child runs")
        if names:
            parts.append(f"the model{'s' if len(names) > 1 else ''} {', '.join(names)}")
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"

    # ------------------------------------------------------------------ reading (sync), names checked by `open`

    def metrics(self) -> list[dict]:
        """The spooled metrics, as checked by `open`."""
        return self._metrics

    def artifact_files(self) -> list[str]:
        """The files under artifacts/ (paths relative to it), as listed by `open`."""
        prefix = f"{ARTIFACTS}/"
        return [f.removeprefix(prefix) for f in self._files if f.startswith(prefix)]

    def model_files(self, name: str) -> tuple[str, str]:
        return f"{MODELS}/{name}/{paths.CHECKPOINT}", f"{MODELS}/{name}/{EXAMPLE}"

    def child_files(self, index: int) -> list[str]:
        return [f"{CHILDREN}/{index}/{n}" for n in self.record["children"][index]["files"]]

    def needed(self) -> list[str]:
        """Every file the record names."""
        out = [f for m in self.record["models"] for f in self.model_files(m["name"])]
        return out + [f for i in range(len(self.record["children"])) for f in self.child_files(i)]

    def read(self, relative: str) -> BinaryIO:
        """A file of the folder, opened without following any link below the folder."""
        return open_inside(self.folder, relative, REFUSED)

    def copy_out(self, relative: str, into: Path) -> Path:
        """A copy of a file of the folder in `into` (a folder of the caller's own), under its own name."""
        into.mkdir(parents=True, exist_ok=True)
        target = into / relative.rsplit("/", 1)[-1]
        with self.read(relative) as source, open(target, "wb") as f:
            shutil.copyfileobj(source, f)
        return target

    def done(self, step: str) -> bool:
        return step in self.record["synced"]

    def mark(self, step: str) -> None:
        """What sync has uploaded, so a sync cut short goes on where it stopped."""
        self.record["synced"].append(step)
        self.save()
