"""`python -m prunelab.server` as a team runs it: on PostgreSQL, with basic authentication,
and refusing to listen beyond this machine unless told which host names clients use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import clean_env
from prunelab.errors import ServerError
from prunelab.server import launch, postgresql, probe


# A new store's first start migrates its database(s): minutes on 2 cores busy with other work.
START_WAIT = 600


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.server", *args], capture_output=True, text=True,
                          env=env, timeout=START_WAIT + 60)


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 listens beyond this machine: also name the host names clients will use "
                            "with --allowed-hosts (e.g. --allowed-hosts mlflow.example.org:{port}), and consider --auth"),
    (["--host", "10.1.2.3", "--allowed-hosts", "*"], "--allowed-hosts '*' lets any Host header through: name the "
                                                    "host names clients will use"),
])
def test_listening_beyond_loopback_needs_the_allowed_hosts(tmp_path, args, message):
    """Refused in one line before anything starts: no server folder, nothing on the port."""
    port = probe.free_port()
    proc = serve("--port", str(port), "--dir", str(tmp_path / "server"), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "prunelab: error: " + message.format(port=port)
    assert not (tmp_path / "server").exists()
    assert not probe.healthy(f"http://127.0.0.1:{port}")


def test_auth_needs_an_admin_password_on_first_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (launch.AUTH_ADMIN_PASSWORD, "MLFLOW_TRACKING_USERNAME",
                                                            "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
    proc = serve("--port", str(probe.free_port()), "--dir", str(tmp_path / "server"), "--auth", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"prunelab: error: --auth creates an admin user on its first start: export "
                                   f"{launch.AUTH_ADMIN_PASSWORD}=<a strong password> (and "
                                   f"{launch.AUTH_ADMIN_USERNAME}, default admin)")


@pytest.mark.slow
def test_basic_auth_lets_in_only_known_users(tmp_path):
    """With --auth, the server answers only requests that sign in; prunelab's probe and
    MLflow's client sign in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    env = {**clean_env(""), launch.AUTH_ADMIN_PASSWORD: "a-Strong-passw0rd-for-tests"}
    folder, port = tmp_path / "server", probe.free_port()
    started = serve("--port", str(port), "--dir", str(folder), "--auth", "--wait", str(START_WAIT), env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        uri = f"http://127.0.0.1:{port}"
        assert "HTTP 401" in probe.probe(uri, credentials={})
        assert "HTTP 401" in probe.probe(uri, credentials=probe.basic_credentials("admin", "wrong"))
        assert probe.probe(uri, credentials=probe.basic_credentials("admin", env[launch.AUTH_ADMIN_PASSWORD])) is None
        client = ("import mlflow; c = mlflow.MlflowClient(); print(c.create_experiment('signed-in'))")
        signed = {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin",
                  "MLFLOW_TRACKING_PASSWORD": env[launch.AUTH_ADMIN_PASSWORD]}
        ok = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, env=signed, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        anonymous = {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        refused = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, env=anonymous,
                                 timeout=120)
        assert refused.returncode != 0 and "401" in refused.stderr
    finally:
        launch.shutdown(folder)


@pytest.fixture
def postgres_folder():
    """A server folder the PostgreSQL cluster can live in. As root, PostgreSQL runs as the
    user postgres, which must be able to enter every folder above it (pytest's own
    temporary folders are private to root), so this one is made under /tmp and opened."""
    try:
        postgresql._pg_bin()
    except ServerError as exc:
        pytest.skip(f"PostgreSQL cannot be used here: {exc}")
    base = Path(tempfile.mkdtemp(prefix="prunelab-pg-"))
    base.chmod(0o755)
    yield base / "server"
    launch.shutdown(base / "server")
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_postgresql_server_keeps_a_study(postgres_folder, fashion_dir, tmp_path):
    """`--backend postgresql`: a cluster made in the server folder holds a tiny study's runs;
    its models are served from the artifacts destination and load back through the server;
    `--stop` stops both the MLflow server and PostgreSQL."""
    from mlflow import MlflowClient

    study, store = "test-postgresql-study", tmp_path / "artifact-store"
    uri, process = launch.start(probe.free_port(), postgres_folder, backend="postgresql",
                                artifacts_destination=str(store), wait=START_WAIT)
    assert process is not None
    overrides = (f"study={study} trials=1 data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 "
                 "prune.rank_images=200 prune.latency_repeats=0")
    env = clean_env(uri)
    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", "--overrides", overrides, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["finetune", "main", "prune", "report", "train"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # The runs are rows of the cluster's database, read here through its socket.
    psycopg2 = postgresql._psycopg2()
    conn = psycopg2.connect(host=str(postgres_folder / postgresql.PG_DATA), port=postgresql.PG_PORT,
                            user=postgresql.PG_SUPERUSER, dbname=postgresql.PG_DATABASE)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == 5
    conn.close()
    # Models: logged and registered on this server, stored in the artifacts destination.
    finetune = next(r for r in runs if r.data.tags["stage"] == "finetune")
    (version,) = client.search_model_versions(f"name = '{study}'")
    assert version.run_id == finetune.info.run_id
    assert list(store.rglob("MLmodel")), "no model under the artifacts destination"
    evaluate = subprocess.run([sys.executable, "-m", "prunelab", "evaluate", f"models:/{study}@champion",
                               "--dataset", "fashionmnist", "--n-test", "200"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(evaluate.stdout)["accuracy"] == pytest.approx(finetune.data.metrics["test_accuracy"], abs=1 / 200)

    stopped = launch.shutdown(postgres_folder)
    assert len(stopped) == 2 and process.wait(timeout=30) is not None
    assert not postgresql.stop_postgres(postgres_folder)  # nothing left running there
