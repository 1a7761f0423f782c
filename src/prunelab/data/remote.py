"""A data folder named by a URI (s3://, gs://, mlflow-artifacts:/, runs:/, ...),
downloaded where the step runs into a folder of the cache, removed once read."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from prunelab.data.base import cache_folder, cache_unwritable
from prunelab.errors import DataError, first_line

Download = Callable[[str, Path], Path]  # (uri, into folder) -> where it landed


@contextlib.contextmanager
def fetched(uri: str, download: Download) -> Iterator[Path]:
    """The data set at `uri`, fetched with `download` (the tracking package's, which
    knows MLflow's artifact repositories) into a temporary folder of the cache."""
    folder = cache_folder()
    try:
        tmp_dir = tempfile.TemporaryDirectory(prefix="fetched-", dir=folder)
    except OSError as exc:
        raise cache_unwritable(folder, exc) from None
    with tmp_dir as tmp:
        try:
            local = download(uri, Path(tmp))
        except Exception as exc:
            raise DataError(f"data.data_dir {uri} could not be downloaded: {first_line(exc)}") from None
        yield Path(local)
