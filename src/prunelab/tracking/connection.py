"""Which MLflow server prunelab talks to, how long it waits for it, and how a
server that went away is told apart from one that refused a request.

A server that stops answering costs at most `PRUNELAB_TRACKING_PATIENCE`
seconds (30 by default) of MLflow's own retries; `server_gone` then probes it
once, quickly, and `outage` turns the failure into one line.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from typing import Any, Iterator

from prunelab import files
from prunelab.config import check_range
from prunelab.errors import ConfigError, TrackingError, first_line, shown
from prunelab.server import probe

DEFAULT_URI = "http://127.0.0.1:5000"
PATIENCE_ENV = "PRUNELAB_TRACKING_PATIENCE"
DEFAULT_PATIENCE = 30.0
# How long a probe may take to tell a server that stopped answering from one that refused a request.
PROBE_SECONDS = 3.0
# The server `connect` checked: only a failure talking to it can be blamed on it going away.
_connected: list[str] = []


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def patience() -> float:
    """Seconds a tracking call may keep retrying a server that does not answer ($PRUNELAB_TRACKING_PATIENCE)."""
    raw = os.environ.get(PATIENCE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_PATIENCE
    except ValueError:
        raise ConfigError(f"{PATIENCE_ENV}={raw!r} is not a number of seconds (e.g. 30)") from None
    check_range(PATIENCE_ENV, value, 8, 3600, hint="seconds a tracking call may retry a server that does not answer")
    return value


def retry_settings(seconds: float) -> dict[str, str]:
    """MLflow's HTTP settings that give up on a silent server within `seconds`:
    three attempts, the third 4-5 s after the second (urllib3's backoff
    2 * 2**(n-1) plus up to 1 s of jitter, none before the first retry), each
    waiting at most T s for an answer, so 3T + 5 <= seconds (tests/test_tracking.py
    times it against a closed port and against one that never answers)."""
    timeout = max(1, int((seconds - 5) // 3))
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}


# MLflow's own HTTP settings, read at every request: (type, lowest, highest or the variable
# holding MLflow's limit and its default, what it is). MLflow fails with a traceback on a value
# it cannot convert, and refuses a negative count only inside the first call.
MLFLOW_HTTP_SETTINGS: dict[str, tuple[type, float, float | tuple[str, int] | None, str]] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": (int, 0, ("_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT", 10), "retries of a failed request"),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": (int, 0, ("_MLFLOW_HTTP_REQUEST_MAX_BACKOFF_FACTOR_LIMIT", 120),
                                           "seconds of backoff between retries"),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": (float, 0, None, "seconds of random jitter added to a backoff"),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": (int, 1, None, "seconds a request waits for an answer"),
}


def check_mlflow_settings() -> None:
    """One line for an MLflow HTTP setting in the environment that MLflow could not use."""
    for name, (kind, low, high, what) in MLFLOW_HTTP_SETTINGS.items():
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            value = kind(raw)
        except ValueError:
            number = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{name}={shown(raw)} is not {number} ({what}): set it to one, or unset it") from None
        if isinstance(high, tuple):
            limit = os.environ.get(high[0], "")
            high = int(limit) if limit.strip().isdigit() else high[1]
        check_range(name, value, low, high, hint=f"MLflow's {what}: set it in range, or unset it")


def checked_uri(uri: str) -> str:
    """`uri`, or a one-line error for a tracking URI MLflow would fail on with a traceback,
    or a local store MLflow would quietly create in a folder that is not there."""
    if uri != uri.strip() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in uri):
        raise TrackingError(f"the tracking URI {shown(uri)} holds a space or control character: check "
                            "--tracking-uri or MLFLOW_TRACKING_URI")
    try:
        parsed = urllib.parse.urlparse(uri)
        parsed.port  # noqa: B018  (raises on a port that is not one)
    except ValueError as exc:
        raise TrackingError(f"the tracking URI {shown(uri)} is not a URI ({exc}): use http://host:port") from None
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise TrackingError(f"the tracking URI {shown(uri)} names no host: use http://host:port")
        return uri
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db; sqlite:// is in memory
        database = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else ""
        folder = files.checked_path(database, "the tracking store's database").parent if database else None
    elif parsed.scheme in ("", "file"):  # a folder MLflow keeps runs in (it creates the last one)
        folder = files.checked_path(parsed.path if parsed.scheme else uri, "the tracking store's folder").parent
    else:
        return uri
    if folder is not None and not folder.is_dir():
        raise TrackingError(f"the folder {shown(str(folder))} of the tracking store {shown(uri)} does not exist "
                            f"(MLflow would create it, and ./mlruns beside it): create it first, or point "
                            f"--tracking-uri at a running server")
    return uri


def forbid_pickle() -> None:
    """MLflow's own guard: no model it loads may be unpickled (pt2 archives are checked to be pickle-free)."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def connect(uri: str | None = None, timeout: float = 5.0) -> str:
    """Point MLflow at `uri` and make sure an MLflow tracking server answers there
    (fails within `timeout` s); bound MLflow's retries unless the user set them."""
    uri = checked_uri(uri or tracking_uri())
    for key, value in retry_settings(patience()).items():
        os.environ.setdefault(key, value)  # the user's own MLflow settings win
    check_mlflow_settings()
    forbid_pickle()
    if uri.startswith(("http://", "https://")):
        problem = probe.probe(uri, timeout)  # before importing mlflow: the answer comes within `timeout`
        if problem:
            raise TrackingError(f"no MLflow tracking server at {uri}: {problem}; start one with `make server` "
                                "or point MLFLOW_TRACKING_URI (or --tracking-uri) at a running one")
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        try:  # a local store (file:, sqlite:, ...): MLflow says whether it can use it
            client().search_experiments(max_results=1)
        except Exception as exc:
            mlflow.set_tracking_uri(previous)  # as it was: a refused URI leaves nothing behind
            raise TrackingError(f"cannot use the tracking URI {shown(uri)}: {first_line(exc)[:160]}; pass an "
                                "http://host:port of an MLflow server (or a file:/sqlite: store)") from None
    resumed = os.environ.get("MLFLOW_RUN_ID")
    if resumed:  # `mlflow run` hands its step the run to resume; any other value fails the first run start
        try:
            client().get_run(resumed)
        except Exception as exc:
            if not is_mlflow_error(exc):
                raise
            mlflow.set_tracking_uri(previous)
            raise TrackingError(f"MLFLOW_RUN_ID={shown(resumed)} names no run on {uri}: unset it (`mlflow run` "
                                "sets it for the step it starts)") from None
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow.run) inherit it
    _connected[:] = [uri]
    return uri


def client():
    from mlflow import MlflowClient

    return MlflowClient()


@contextlib.contextmanager
def one_try(timeout: int = 3) -> Iterator[None]:
    """MLflow calls in the block make one attempt of at most `timeout` s (MLflow
    reads these settings at every request): for calls to a server already known gone."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_mlflow_error(exc: BaseException) -> bool:
    """Whether MLflow raised `exc` about a request (not a bug in prunelab's own code)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def server_gone(exc: BaseException) -> str | None:
    """When `exc` is a failed call to a tracking server that no longer answers
    (checked with one quick probe): what answers there instead; else None."""
    uri = tracking_uri()
    if not (is_mlflow_error(exc) or isinstance(exc, OSError)) or uri not in _connected \
            or not uri.startswith(("http://", "https://")):
        return None
    return probe.probe(uri, PROBE_SECONDS)


def outage(exc: BaseException) -> TrackingError | None:
    """A one-line error for a failure caused by the tracking server going away, else None."""
    gone = server_gone(exc)
    if gone is None:
        return None
    return TrackingError(f"the tracking server {tracking_uri()} stopped answering ({gone}); start it again "
                         f"(`make server`) and rerun: {first_line(exc)}")


def param_text(value: Any) -> str | None:
    """A param's value as logged; None for an empty one, which is not logged (the UI
    would show a blank '' column): an unset setting is simply absent."""
    text = str(value)
    return text if text else None


def system_metrics() -> None:
    """Log CPU, memory (and GPU, when present) as `system/...` metrics in every run
    this process and the steps it starts open; refused when psutil is missing."""
    import mlflow

    try:
        import psutil  # noqa: F401  (MLflow's monitors need it; without it a run would start and fail)
    except ImportError:
        raise ConfigError("--system-metrics needs the psutil package: install it (`pip install psutil`, "
                          "pinned in pyproject.toml) or leave the flag out") from None
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true"  # steps run by `mlflow run` inherit it
    mlflow.enable_system_metrics_logging()
