"""Shared fixtures: a real MLflow server on a free loopback port, and the real data.

The server is started once per test session (SQLite backend, artifacts
served) exactly as `make server` starts one, and every test that logs talks
to it over HTTP.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from prunelab import studies
from prunelab.data.fashionmnist import DEBIAN_FASHION_MNIST
from prunelab.server import launch, probe

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"
DOGS_VS_CATS = SHARED / "data" / "dogs-vs-cats"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"

# The user's own factories the tests name (`tests.models.tiny_factory:build`) import as a user's
# module does from the folder the user works in: here, the repository's.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_collection_modifyitems(config, items):
    """The browser check (marker `ui`) runs only when asked for, with `make ui-check` (-m ui):
    when the -m expression names the marker `ui` itself (`ui`, `ui or slow`, `not ui`; then
    -m decides), not when a word merely contains the letters (`-m build`)."""
    # The words of a -m expression, as pytest's own expression grammar splits them.
    if "ui" in re.findall(r"(?:\w|:|\+|-|\.|\[|\])+", config.getoption("markexpr") or ""):
        return
    browser = [item for item in items if item.get_closest_marker("ui")]
    if browser:
        config.hook.pytest_deselected(items=browser)
        items[:] = [item for item in items if not item.get_closest_marker("ui")]


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    # A new store migrates its tables on the first start: minutes on 2 cores busy with other work.
    uri, process = launch.start(probe.free_port(), folder, wait=600)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    launch.stop(process)


@pytest.fixture(scope="session")
def client(tracking_uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}")
    return path


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return _require(DEBIAN_FASHION_MNIST, "FashionMNIST (Debian's dataset-fashion-mnist; `make install` installs it)")


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    return _require(CIFAR_SUBSET, "the CIFAR-10 subset (../shared/data/cifar10-subset)")


@pytest.fixture(scope="session")
def dogs_cats_dir() -> Path:
    return _require(DOGS_VS_CATS, "the dogs-vs-cats images (../shared/data/dogs-vs-cats)")


@pytest.fixture(scope="session")
def resnet20_file() -> Path:
    return _require(RESNET20, "the pretrained ResNet20 (../shared/models)")


# A tiny but real slice of FashionMNIST: every test that trains uses it.
TINY_FASHION = ["data.n_train=1500", "data.n_test=500", "train.epochs=1", "finetune.epochs=1",
                "prune.rank_images=500", "trials=2"]


@pytest.fixture
def tiny_cfg(fashion_dir, request):
    """The default study at test scale, in an experiment of its own (named after the test)."""
    name = f"test-{request.node.name}".replace("[", "-").replace("]", "")[:60]
    return studies.load_config(overrides=TINY_FASHION + [f"study={name}"])


# The default study at test scale, run end to end as a user runs it: the study
# every test of what MLflow shows (models, registry, lineage, ONNX) reads back.
TINY_STUDY = "test-tiny-study"
TINY_STUDY_OVERRIDES = ("data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200 "
                        f"prune.latency_repeats=0 trials=2 study={TINY_STUDY}")


def clean_env(tracking_uri: str) -> dict:
    """The environment of a fresh shell pointed at the test server: an experiment or run chosen
    earlier in this test process (MLflow exports MLFLOW_EXPERIMENT_ID) must not leak in."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


@pytest.fixture(scope="session")
def tiny_study(tracking_uri, client, fashion_dir, tmp_path_factory):
    """`prunelab run` of the default study, two trials on a FashionMNIST slice (about two
    minutes on 2 cores). Returns the study name, its runs by (stage, trial) and by name, and
    the report's folder."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-study-report")
    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", "--overrides", TINY_STUDY_OVERRIDES, "--out", str(out)],
                          capture_output=True, text=True, env=clean_env(tracking_uri), timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = client.get_experiment_by_name(TINY_STUDY)
    runs = [client.get_run(r.info.run_id) for r in client.search_runs([exp.experiment_id])]  # get_run: with inputs
    by_stage = {(r.data.tags["stage"], int(r.data.tags.get("trial", -1))): r for r in runs}
    return {"study": TINY_STUDY, "experiment_id": exp.experiment_id, "runs": runs, "by_stage": by_stage,
            "out": out, "stdout": proc.stdout}


def start_foreign_server():
    """Python's own web server answering 200 with a page to every GET (/health included):
    not an MLflow server. Returns (its URI, the server, for `shutdown()`)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>OK</html>")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd
