"""Start a local MLflow tracking server (SQLite backend, artifacts served).

Used by `make server` and by the test suite's fixture, so both start the
server the same way. A no-op when a server already answers on the port.

    python -m prunelab.server --port 5000 --dir .mlflow-server
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def healthy(uri: str, timeout: float = 2.0) -> bool:
    """Whether a server answers `/health` at `uri` within `timeout` seconds."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):  # refused, timed out, or not a URL
        return False


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
