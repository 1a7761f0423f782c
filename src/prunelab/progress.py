"""Progress: bars on a terminal, lines in a log.

On a terminal, loops show tqdm bars on stderr. A bar says nothing in a file or a
pipe (`prunelab run ... > log`, a CI job), so there each finished unit of work (an
epoch, an evaluation, a pruning round, a sweep point) prints one line on stdout,
beside prunelab's other messages, flushed at once, with the seconds since its loop
started:

    prunelab: train-t0: train epoch 3/5: loss 0.312, test accuracy 0.884 (41 s)

The lines are printed whenever stdout or stderr is not a terminal. Fine-grained
loops (batches, images) only ever show a bar.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# The run the lines in progress belong to (e.g. "train-t0"): trials side by side print into one log.
_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("progress_label", default="")


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def logged() -> bool:
    """Whether progress goes to a log as lines: stdout or stderr is not a terminal."""
    return not (_terminal(sys.stdout) and _terminal(sys.stderr))


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Lines printed in the block start with `label` (the run they belong to)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def line(text: str, since: float | None = None) -> None:
    """One progress line when `logged()` (on a terminal the bars say it), with the whole
    seconds since `since` (a `time.monotonic()` value)."""
    if not logged():
        return
    label = _LABEL.get()
    elapsed = f" ({time.monotonic() - since:.0f} s)" if since is not None else ""
    print(f"prunelab: {label + ': ' if label else ''}{text}{elapsed}", flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A fine-grained loop (batches, images): a bar on a terminal, nothing in a log."""
    return tqdm(items, total=total, desc=desc, leave=False, disable=None)


def steps(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A coarse loop (sweep points, merges): a bar on a terminal; in a log, a line as each
    item is done (`desc i/n`)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    start = time.monotonic()
    for i, item in enumerate(tqdm(items, total=total, desc=desc, disable=None), 1):
        yield item
        line(f"{desc} {i}/{total if total is not None else '?'}", start)
