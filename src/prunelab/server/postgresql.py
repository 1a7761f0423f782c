"""The PostgreSQL cluster a team's MLflow server keeps its store in (`--backend postgresql`).

Made in the server folder on first start, with MLflow's database and role (and the
database of its basic-auth users), and reached over a Unix socket only: no TCP port.
When run as root, PostgreSQL runs as the user `postgres`, since it refuses root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from prunelab.errors import ServerError

PG_DATA = "postgres"  # the cluster's folder inside the server folder
PG_PORT = 5432  # names the socket file only: the cluster listens on no TCP port
PG_DATABASE = PG_ROLE = "mlflow"
PG_AUTH_DATABASE = "mlflow_auth"  # MLflow's basic-auth users and permissions (--auth)
PG_SUPERUSER = "postgres"
PG_RUN_AS = "postgres"  # PostgreSQL refuses to run as root; Debian's package makes this user


def _pg_bin() -> Path:
    """The folder with initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    raise ServerError("PostgreSQL is not installed: `apt-get install postgresql` (Debian), or put the folder "
                      "holding initdb and pg_ctl on PATH")


def _as_owner(cmd: list) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its commands run as the user `postgres`."""
    cmd = [str(c) for c in cmd]
    return ["runuser", "-u", PG_RUN_AS, "--", *cmd] if os.geteuid() == 0 else cmd


def _pg(cmd: list, what: str, log: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(_as_owner(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        tail = f"; see {log}" if log else ""
        raise ServerError(f"PostgreSQL could not {what}: {said[-1] if said else f'exit {proc.returncode}'}{tail}")
    return proc


def _pg_init(folder: Path, bin_dir: Path) -> Path:
    """A cluster in folder/postgres, created on first use: only a Unix socket inside its own
    folder (mode 0700, so only the user that runs it, and root, can connect) and no TCP port,
    which is why local connections may be `trust`ed."""
    data = folder / PG_DATA
    if (data / "PG_VERSION").is_file():
        return data
    if len(str(data / f".s.PGSQL.{PG_PORT}")) > 107:  # sun_path holds 108 bytes
        raise ServerError(f"the server folder {folder} is too deep for PostgreSQL's socket: choose a shorter --dir")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(PG_RUN_AS)
        except KeyError:
            raise ServerError(f"as root, PostgreSQL runs as the user {PG_RUN_AS}, and there is none: install "
                              "Debian's postgresql (it makes the user) or run as another user") from None
        if subprocess.run(_as_owner(["test", "-x", folder]), stdin=subprocess.DEVNULL).returncode != 0:
            raise ServerError(f"PostgreSQL runs as the user {PG_RUN_AS}, which cannot reach {folder}: choose a "
                              f"--dir every folder above which {PG_RUN_AS} may enter, or run as another user")
    data.mkdir(mode=0o700)
    try:
        if os.geteuid() == 0:
            os.chown(data, owner.pw_uid, owner.pw_gid)
        _pg([bin_dir / "initdb", "-D", data, "-U", PG_SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale"],
            "create its cluster")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\n# prunelab: a Unix socket in this folder only, no TCP port\nlisten_addresses = ''\n"
                       f"unix_socket_directories = '{data}'\nunix_socket_permissions = 0700\nport = {PG_PORT}\n")
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)  # a half-made cluster would stop every later start
        raise
    return data


def _pg_running(bin_dir: Path, data: Path) -> bool:
    # pg_ctl status: 0 running, 3 not running, 4 no readable cluster
    return subprocess.run(_as_owner([bin_dir / "pg_ctl", "-D", data, "status"]), capture_output=True,
                          stdin=subprocess.DEVNULL).returncode == 0


def _psycopg2():
    try:
        import psycopg2
    except ImportError:
        raise ServerError("the postgresql backend needs psycopg2: pip install 'prunelab[server]'") from None
    return psycopg2


def _pg_ensure_databases(data: Path) -> None:
    """The role MLflow connects as and its databases, created on first start."""
    psycopg2 = _psycopg2()
    conn = psycopg2.connect(host=str(data), port=PG_PORT, user=PG_SUPERUSER, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE ROLE "{PG_ROLE}" LOGIN')
            for name in (PG_DATABASE, PG_AUTH_DATABASE):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}" OWNER "{PG_ROLE}"')
    finally:
        conn.close()


def postgres_uri(folder: str | Path, database: str = PG_DATABASE) -> str:
    """The SQLAlchemy URI of a database of the server folder's cluster (through its socket)."""
    data = Path(folder).resolve() / PG_DATA
    # psycopg2 named: SQLAlchemy 2.1 would otherwise look for psycopg (3).
    return f"postgresql+psycopg2://{PG_ROLE}@/{database}?host={data}&port={PG_PORT}"


def start_postgres(folder: str | Path) -> str:
    """The server folder's PostgreSQL cluster, created, started and given its database and
    role as needed; returns the URI MLflow's store connects to."""
    folder = Path(folder).resolve()
    bin_dir = _pg_bin()
    data = _pg_init(folder, bin_dir)
    if not _pg_running(bin_dir, data):
        log = data / "postgres.log"
        _pg([bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start"], "start", log)
    _pg_ensure_databases(data)
    return postgres_uri(folder)


def stop_postgres(folder: str | Path) -> bool:
    """Stop the server folder's cluster; False when none runs there."""
    data = Path(folder).resolve() / PG_DATA
    if not (data / "PG_VERSION").is_file():
        return False
    bin_dir = _pg_bin()
    if not _pg_running(bin_dir, data):
        return False
    _pg([bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop"], "stop")
    return True
