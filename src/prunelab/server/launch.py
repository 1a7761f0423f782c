"""Start and stop the MLflow tracking server prunelab talks to.

Used by `make server` / `make stop-server` and by the test suite's fixture, so
they all start a server the same way. A no-op when the server folder's own
server, with the same store and authentication, already answers on the port; any
other server answering there is refused in one line (exit 2), so `--auth` is never
silently dropped and the store named is the one that serves.

    python -m prunelab.server --port 5000 --dir .mlflow-server
    python -m prunelab.server --backend postgresql --dir .mlflow-server   # a team server
    python -m prunelab.server --stop --dir .mlflow-server

The store is SQLite in the server folder, or (`--backend postgresql`) a
PostgreSQL cluster in the server folder (`postgresql`). Artifacts are always
served by the MLflow server (`--serve-artifacts`), so clients never need storage
credentials; `--artifacts-destination` may name an object store
(`s3://bucket/prefix`, with the server's own credentials). The server listens
on 127.0.0.1 unless `--host` names another interface and `--allowed-hosts` the
host names clients use; `--auth` turns on MLflow's basic authentication.

The server folder holds the store (with `--auth`, the users' password hashes): it is
made private to its owner (0700, and 0600 for the files in it; 0711 when PostgreSQL
runs as another user and must pass through it), and the server runs with umask 077.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from prunelab.errors import PrunelabError, ServerError
from prunelab.server.postgresql import PG_AUTH_DATABASE, PG_DATA, postgres_uri, start_postgres, stop_postgres
from prunelab.server import probe
from prunelab.server.probe import basic_credentials, client_credentials, healthy

BACKENDS = ("sqlite", "postgresql")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def check_exposure(host: str, port: int, allowed_hosts: str) -> None:
    """The server listens beyond this machine only when the user names both the
    interface (--host) and the host names clients use (--allowed-hosts: MLflow then
    refuses any other Host header, which stops DNS-rebinding attacks)."""
    if _loopback(host):
        return
    names = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if not names:
        raise ServerError(f"--host {host} listens beyond this machine: also name the host names clients will use "
                          f"with --allowed-hosts (e.g. --allowed-hosts mlflow.example.org:{port}), and consider --auth")
    if "*" in names:
        raise ServerError("--allowed-hosts '*' lets any Host header through: name the host names clients will use")


# --------------------------------------------------------------------------- the server folder, private

PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600
# As root, PostgreSQL runs as the user `postgres`, which must pass through the server folder to
# its cluster (a folder of its own, 0700): others may enter, never list.
PASS_THROUGH_FOLDER = 0o711
SERVER_UMASK = 0o077  # what the MLflow server creates (mlflow.db, basic_auth.db, artifacts) is its owner's alone


def _folder_mode(backend: str) -> int:
    return PASS_THROUGH_FOLDER if backend == "postgresql" and os.geteuid() == 0 else PRIVATE_FOLDER


def make_private(folder: Path, backend: str = "sqlite") -> None:
    """The server folder readable by its owner alone, and the files in it (the SQLite stores,
    the log, the auth settings) too: a folder made by an older version, or files made under
    a looser umask, are fixed here, at every start."""
    try:
        folder.chmod(_folder_mode(backend))
        for entry in folder.iterdir():
            if entry.is_symlink() or entry.name == PG_DATA:  # the cluster keeps its own modes (and owner)
                continue
            if entry.is_file():
                entry.chmod(PRIVATE_FILE)
            elif entry.is_dir() and entry.stat().st_uid == os.geteuid():
                entry.chmod(PRIVATE_FOLDER)
    except OSError as exc:
        raise ServerError(f"cannot make the server folder {folder} private ({exc.strerror or type(exc).__name__}: "
                          f"{exc.filename}): use a --dir of your own") from None


def _write_private(path: Path, text: str) -> None:
    """A file of the server folder, created 0600 (an existing one is made so)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, PRIVATE_FILE)
        f.write(text)


# --------------------------------------------------------------------------- MLflow's basic authentication

AUTH_ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_ADMIN_USERNAME = "MLFLOW_AUTH_ADMIN_USERNAME"


def _auth_env(folder: Path, database_uri: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment of the server, credentials of the start-up probe) for `--app-name basic-auth`.
    MLflow creates the admin user on the first start from MLFLOW_AUTH_ADMIN_PASSWORD; the
    probe then signs in as the user MLflow's client would (MLFLOW_TRACKING_USERNAME/PASSWORD),
    else as that admin."""
    try:
        import flask_wtf  # noqa: F401  (MLflow's auth app refuses to start without it)
    except ImportError:
        raise ServerError("--auth needs Flask-WTF: pip install 'prunelab[server]'") from None
    first = not (folder / "auth.started").exists()
    admin = os.environ.get(AUTH_ADMIN_USERNAME, "admin")
    password = os.environ.get(AUTH_ADMIN_PASSWORD)
    if first and not password:
        raise ServerError(f"--auth creates an admin user on its first start: export {AUTH_ADMIN_PASSWORD}=<a strong "
                          f"password> (and {AUTH_ADMIN_USERNAME}, default admin)")
    credentials = client_credentials() or (basic_credentials(admin, password) if password else {})
    if not credentials:
        raise ServerError("--auth: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a user of this "
                          f"server) or {AUTH_ADMIN_PASSWORD}, so that the server's start can be checked")
    ini = folder / "basic_auth.ini"
    _write_private(ini, f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {database_uri}\nadmin_username = {admin}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # MLflow signs its forms with this key; one per server folder, kept across restarts.
    key_file = folder / "flask_secret_key"
    if not key_file.exists():
        _write_private(key_file, secrets.token_hex(32))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or key_file.read_text()}
    return env, credentials


# --------------------------------------------------------------------------- the MLflow server

def _option(args: list[str], name: str) -> str | None:
    """The value of `name` on a command line (`--port 5000`), or None."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def _recorded_server(folder: Path) -> list[str] | None:
    """The command line of the MLflow server the folder's server.pid names, while it runs."""
    text = (folder / "server.pid").read_text().strip() if (folder / "server.pid").is_file() else ""
    if not text.isdigit() or not _is_mlflow_server(int(text)):
        return None
    try:
        return Path(f"/proc/{text}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None


def _already_serving(uri: str, port: int, folder: Path, store: str, auth: bool) -> bool:
    """True when the folder's own server, with this store (and authentication, if asked),
    answers at `uri`; False when no MLflow server answers there (one is to be started). Any
    other MLflow server answering there is refused in one line: it would go on serving
    while the user believes the store and the authentication they asked for are in force."""
    access = probe.access(uri)
    if access is None:
        return False
    recorded = _recorded_server(folder)
    ours = recorded is not None and _option(recorded, "--port") == str(port)
    stop_it = (f"stop it (`python -m prunelab.server --stop --dir {folder}`)" if ours
               else "stop it (`python -m prunelab.server --stop --dir <the folder it was started from>`)")
    if auth and access == probe.OPEN:
        raise ServerError(f"an MLflow server without authentication already answers at {uri}: --auth cannot "
                          f"turn it on; {stop_it} and start it again with --auth, or pass another --port")
    if not ours:
        raise ServerError(f"an MLflow server not started from {folder} already answers at {uri}, so its store is not "
                          f"{_store_name(store)}: {stop_it}, or pass another --port")
    serving = _option(recorded, "--backend-store-uri")
    if serving != store:
        raise ServerError(f"the MLflow server at {uri} keeps its store in {_store_name(serving or '?')}, not "
                          f"{_store_name(store)}: {stop_it} and start it again with this --backend")
    return True


def _store_name(store: str) -> str:
    """A store URI as a person reads it (no socket query strings)."""
    if store.startswith("sqlite:///"):
        return f"SQLite {store[len('sqlite:///'):]}"
    if store.startswith("postgresql"):
        return "PostgreSQL in " + store.split("host=", 1)[-1].split("&", 1)[0]
    return store


def start(port: int, folder: str | Path, wait: float = 120.0, workers: int = 1, backend: str = "sqlite",
          host: str = "127.0.0.1", allowed_hosts: str = "", artifacts_destination: str = "",
          auth: bool = False) -> tuple[str, subprocess.Popen | None]:
    """(uri, process) of a server on host:port; process is None when one already answered.
    The uri is the one this machine reaches it at."""
    if backend not in BACKENDS:
        raise ServerError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    check_exposure(host, port, allowed_hosts)
    # A server on every interface is reached here through the loopback one.
    uri = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    folder = Path(folder).resolve()
    store = postgres_uri(folder) if backend == "postgresql" else f"sqlite:///{folder / 'mlflow.db'}"
    if _already_serving(uri, port, folder, store, auth):  # before anything is written
        make_private(folder, backend)
        return uri, None
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER)
    make_private(folder, backend)
    if backend == "postgresql":
        start_postgres(folder)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    credentials = None
    if auth:
        auth_store = postgres_uri(folder, PG_AUTH_DATABASE) if backend == "postgresql" else f"sqlite:///{folder / 'basic_auth.db'}"
        extra, credentials = _auth_env(folder, auth_store)
        env.update(extra)
    destination = artifacts_destination or str(folder / "artifacts")
    if "://" not in destination and not destination.startswith("mlflow-artifacts:"):
        destination = str(Path(destination).resolve())  # the server runs in the server folder
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", store, "--artifacts-destination", destination, "--serve-artifacts",
           "--workers", str(workers)]
    if not _loopback(host):
        # This machine's own probes and clients come in through the loopback interface.
        cmd += ["--allowed-hosts", f"{allowed_hosts},127.0.0.1:{port},localhost:{port}"]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    log = os.fdopen(os.open(folder / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE), "ab")
    # MLflow's job runner (a dozen worker processes, ~2 GB between them) serves GenAI jobs that
    # prunelab never submits: off unless the user asks for it (above).
    # A session of its own: the server outlives `make server` and ignores the terminal's Ctrl-C.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env,
                               umask=SERVER_UMASK)
    log.close()  # the server holds its own copy
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if healthy(uri, credentials=credentials):
            _write_private(folder / "server.pid", str(process.pid))
            if auth:
                _write_private(folder / "auth.started", "")
            return uri, process
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop(process)
    if backend == "postgresql":
        stop_postgres(folder)  # nothing else uses it: do not leave it running behind an error
    tail = (folder / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
    said = " | ".join(tail) if tail else f"it said nothing within {wait:g} s (a busy machine may need a longer --wait)"
    raise ServerError(f"the MLflow server on port {port} did not come up: {said}")


def stop(process: subprocess.Popen | None) -> None:
    """Stop a server that `start` launched, with its worker processes (its own process group)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def _is_mlflow_server(pid: int) -> bool:
    """Whether pid is still an `mlflow server` (a pid file may outlive its process, and the
    number may since have gone to another)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"mlflow" in args and b"server" in args


def shutdown(folder: str | Path) -> list[str]:
    """Stop what `start` left running for the server folder: the MLflow server (its process
    group) and the PostgreSQL cluster. Returns what was stopped."""
    folder = Path(folder).resolve()
    stopped = []
    pid_file = folder / "server.pid"
    if pid_file.is_file():
        text = pid_file.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        if pid and _is_mlflow_server(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _is_mlflow_server(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is_mlflow_server(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"MLflow server {pid}")
        pid_file.unlink()
    if stop_postgres(folder):
        stopped.append(f"PostgreSQL in {folder / PG_DATA}")
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prunelab.server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    p.add_argument("--dir", default=".mlflow-server", help="the store, the artifacts (by default) and the log go here")
    p.add_argument("--backend", default="sqlite", choices=BACKENDS,
                   help="the store: SQLite, or a PostgreSQL cluster made in the server folder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="the interface to listen on (default: %(default)s); any other "
                   "needs --allowed-hosts")
    p.add_argument("--allowed-hosts", default="", help="comma-separated host names (host:port) clients reach the "
                   "server by; MLflow refuses requests for any other")
    p.add_argument("--artifacts-destination", default="", help="where served artifacts are stored: a folder or an "
                   "object-store URI such as s3://bucket/prefix (default: <dir>/artifacts)")
    p.add_argument("--auth", action="store_true", help="MLflow's basic authentication (first start: export "
                   f"{AUTH_ADMIN_PASSWORD})")
    p.add_argument("--workers", type=int, default=1, help="request-handling processes (default: %(default)s)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds the server may take to answer (default: "
                   "%(default)s; more on a loaded machine)")
    p.add_argument("--stop", action="store_true", help="stop the MLflow server and PostgreSQL of --dir")
    args = p.parse_args(argv)
    try:
        if args.stop:
            stopped = shutdown(args.dir)
            print(f"stopped {' and '.join(stopped)}" if stopped else f"nothing of {args.dir} was running")
            return 0
        uri, process = start(args.port, args.dir, wait=args.wait, workers=args.workers, backend=args.backend, host=args.host,
                             allowed_hosts=args.allowed_hosts, artifacts_destination=args.artifacts_destination,
                             auth=args.auth)
    except PrunelabError as exc:
        print(f"prunelab: error: {exc}", file=sys.stderr)
        return 2
    store = "PostgreSQL" if args.backend == "postgresql" else "SQLite"
    print(f"MLflow server {'started' if process else 'already running'} at {uri} ({store} store in {args.dir})")
    return 0

