"""Shared fixtures: a real MLflow server on a free loopback port, and the real data.

The server is started once per test session (SQLite backend, artifacts
served) exactly as `make server` starts one, and every test that logs talks
to it over HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunelab import server, studies
from prunelab.data.fashionmnist import DEBIAN_FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"
DOGS_VS_CATS = SHARED / "data" / "dogs-vs-cats"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    uri, process = server.start(server.free_port(), folder)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    server.stop(process)


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
