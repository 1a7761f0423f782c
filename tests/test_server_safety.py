"""`python -m prunelab.server` never says a server runs as asked when another one answers
(open where `--auth` was asked, or with another store), and keeps its folder private."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from conftest import clean_env
from prunelab.server import launch, probe

START_WAIT = 600  # a new store migrates its tables on its first start: minutes on 2 busy cores


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.server", *args], capture_output=True, text=True,
                          env=env, timeout=START_WAIT + 60)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_auth_against_an_open_server_is_refused(tracking_uri, tmp_path):
    """The session's server answers without authentication: `--auth` on its port is refused in
    one line, nothing is written, and the server is left as it was (still open)."""
    port = urlparse(tracking_uri).port
    env = {**clean_env(tracking_uri), launch.AUTH_ADMIN_PASSWORD: "a-Strong-passw0rd-for-tests"}
    proc = serve("--port", str(port), "--dir", str(tmp_path / "server"), "--auth", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"prunelab: error: an MLflow server without authentication already answers at {tracking_uri}: --auth cannot "
        "turn it on; stop it (`python -m prunelab.server --stop --dir <the folder it was started from>`) and start "
        "it again with --auth, or pass another --port")
    assert proc.stdout == ""
    assert not (tmp_path / "server").exists()
    assert probe.access(tracking_uri) == probe.OPEN


def test_a_server_of_another_folder_is_refused(tracking_uri, tmp_path):
    """Without --auth too: the store named (this --dir) is not the one serving on the port."""
    port = urlparse(tracking_uri).port
    folder = tmp_path / "server"
    proc = serve("--port", str(port), "--dir", str(folder), env=clean_env(tracking_uri))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"prunelab: error: an MLflow server not started from {folder} already answers at {tracking_uri}, so its "
        f"store is not SQLite {folder}/mlflow.db: stop it (`python -m prunelab.server --stop --dir <the folder it "
        "was started from>`), or pass another --port")
    assert not folder.exists()


@pytest.mark.slow
def test_server_folder_is_private_and_its_own_server_is_recognised(tmp_path):
    """A folder an older version left readable (0755, a 0644 auth store and log) is made the
    owner's alone at start, and what the server creates is too. Started again as it runs: a
    no-op; with --auth or another backend: refused, naming its folder."""
    folder, port = tmp_path / "server", probe.free_port()
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    for name in ("basic_auth.db", "server.log"):
        (folder / name).write_bytes(b"")
        (folder / name).chmod(0o644)
    env = clean_env("")
    started = serve("--port", str(port), "--dir", str(folder), "--wait", str(START_WAIT), env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert mode(folder) == 0o700
        for name in ("mlflow.db", "basic_auth.db", "server.log", "server.pid"):
            assert mode(folder / name) == 0o600, name
        uri = f"http://127.0.0.1:{port}"

        (folder / "mlflow.db").chmod(0o644)  # loosened while it runs: fixed by the next start
        again = serve("--port", str(port), "--dir", str(folder), env=env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"MLflow server already running at {uri} (SQLite store in {folder})"
        assert mode(folder / "mlflow.db") == 0o600

        auth = serve("--port", str(port), "--dir", str(folder), "--auth",
                     env={**env, launch.AUTH_ADMIN_PASSWORD: "a-Strong-passw0rd-for-tests"})
        assert auth.returncode == 2
        assert auth.stderr.strip() == (
            f"prunelab: error: an MLflow server without authentication already answers at {uri}: --auth cannot turn "
            f"it on; stop it (`python -m prunelab.server --stop --dir {folder}`) and start it again with --auth, or "
            "pass another --port")
        assert not (folder / "basic_auth.ini").exists()

        postgres = serve("--port", str(port), "--dir", str(folder), "--backend", "postgresql", env=env)
        assert postgres.returncode == 2
        assert postgres.stderr.strip() == (
            f"prunelab: error: the MLflow server at {uri} keeps its store in SQLite {folder}/mlflow.db, not PostgreSQL "
            f"in {folder}/postgres: stop it (`python -m prunelab.server --stop --dir {folder}`) and start it again "
            "with this --backend")
        assert not (folder / "postgres").exists()
    finally:
        launch.shutdown(folder)
