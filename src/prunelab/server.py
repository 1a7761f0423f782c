"""Start a local MLflow tracking server (SQLite backend, artifacts served).

Used by `make server` and by the test suite's fixture, so both start the
server the same way. A no-op when a server already answers on the port.

    python -m prunelab.server --port 5000 --dir .mlflow-server
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# A REST call only an MLflow tracking server answers in its own JSON: the
# experiment every server creates ({"experiment": ...}), or, where it was
# deleted, MLflow's error document ({"error_code": "RESOURCE_DOES_NOT_EXIST"}).
# Any web server answers /health with 200; this tells them apart.
_PROBE_PATH = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"


def _credentials() -> dict[str, str]:
    """The Authorization header MLflow's client would send (its own environment variables)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _probe_once(uri: str, timeout: float) -> str | None:
    try:
        request = urllib.request.Request(uri.rstrip("/") + _PROBE_PATH, headers=_credentials())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 16)
    except (OSError, ValueError) as exc:  # refused, timed out, or not a URL
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return f"nothing answers there ({type(reason).__name__})"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("experiment" in doc or doc.get("error_code") == "RESOURCE_DOES_NOT_EXIST"):
        return None
    return f"a web server answers there (HTTP {status}), but not as an MLflow tracking server"


def probe(uri: str, timeout: float = 5.0) -> str | None:
    """None when an MLflow tracking server answers at `uri`; otherwise what answers
    instead. Returns within `timeout` seconds whatever the other end does (a
    server that accepts and never answers, or answers a byte at a time)."""
    outcome: list[str | None] = []
    # The socket's own timeout applies to each step (connect, every read); the join bounds the whole.
    worker = threading.Thread(target=lambda: outcome.append(_probe_once(uri, timeout)), daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def healthy(uri: str, timeout: float = 2.0) -> bool:
    """Whether an MLflow tracking server answers at `uri` within `timeout` seconds."""
    return probe(uri, timeout) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, folder: str | Path, wait: float = 120.0, workers: int = 1) -> tuple[str, subprocess.Popen | None]:
    """(uri, process) of a server on 127.0.0.1:port; process is None when one already answered."""
    uri = f"http://127.0.0.1:{port}"
    if healthy(uri):
        return uri, None
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "ab")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
           "--workers", str(workers)]
    # MLflow's job runner (a dozen worker processes, ~2 GB between them) serves GenAI jobs that
    # prunelab never submits: off unless the user asks for it.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    # A session of its own: the server outlives `make server` and ignores the terminal's Ctrl-C.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if healthy(uri):
            (folder / "server.pid").write_text(str(process.pid))
            return uri, process
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop(process)
    tail = (folder / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(f"the MLflow server on port {port} did not come up: {' | '.join(tail)}")


def stop(process: subprocess.Popen | None) -> None:
    """Stop a server that `start` launched, with its worker processes (its own process group)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    p.add_argument("--dir", default=".mlflow-server", help="backend database, artifacts and log go here")
    args = p.parse_args()
    try:
        uri, process = start(args.port, args.dir)
    except RuntimeError as exc:
        print(f"prunelab: error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow server {'started' if process else 'already running'} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
