"""Damaged data, found before any run: labels out of range or fewer than the images (the
data base class checks every loader's), a model that cannot take the images, a damaged
copy in prunelab's cache (rebuilt from the source, once), and a cache that cannot be written."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import clean_env
from prunelab import config, data
from prunelab.data.cifar10 import load_cifar10
from prunelab.data.fashionmnist import FASHION_MNIST_FILES, load_fashionmnist
from prunelab.data.imagefolder import load_imagefolder
from prunelab.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "trials=1", "--set", "data.n_train=600", "--set", "data.n_test=200", "--set", "train.epochs=1",
        "--set", "finetune.epochs=1", "--set", "prune.rank_images=200", "--set", "prune.latency_repeats=0"]


def write_idx(path: Path, values: torch.Tensor) -> None:
    """An IDX file of unsigned bytes, as FashionMNIST ships them."""
    dims = b"".join(int(n).to_bytes(4, "big") for n in values.shape)
    path.write_bytes(bytes([0, 0, 0x08, values.ndim]) + dims + values.to(torch.uint8).contiguous().numpy().tobytes())


@pytest.fixture
def small_fashion(fashion_dir, tmp_path, monkeypatch):
    """A FashionMNIST folder of 600 + 200 real images and labels, as plain IDX files, that a
    test then damages; the cache is the test's own."""
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    real = data.get(config.DataConfig(dataset="fashionmnist", n_train=600, n_test=200))
    folder = tmp_path / "fashion"
    folder.mkdir()
    parts = dict(zip(FASHION_MNIST_FILES, (real.train_x[:, 0], real.train_y, real.test_x[:, 0], real.test_y)))
    for name, values in parts.items():
        write_idx(folder / name, values)
    return folder, parts


def run_prunelab(tracking_uri: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = clean_env(tracking_uri)
    if cache is not None:
        env["PRUNELAB_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "prunelab", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_a_label_out_of_range_is_refused(small_fashion):
    folder, parts = small_fashion
    labels = parts["train-labels-idx1-ubyte"].clone()
    labels[[3, 7]] = 10
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError) as err:
        load_fashionmnist(config.DataConfig(dataset="fashionmnist", data_dir=str(folder)))
    assert str(err.value) == (f"data set fashionmnist ({folder}/train-labels-idx1-ubyte): the train labels include 10, "
                              "outside 0..9 (10 classes; 2 labels out of range); replace the files with intact ones")


def test_fewer_labels_than_images_are_refused(small_fashion):
    folder, parts = small_fashion
    write_idx(folder / "t10k-labels-idx1-ubyte", parts["t10k-labels-idx1-ubyte"][:150])
    with pytest.raises(DataError) as err:
        load_fashionmnist(config.DataConfig(dataset="fashionmnist", data_dir=str(folder)))
    assert str(err.value) == (f"data set fashionmnist ({folder}/t10k-labels-idx1-ubyte): the test labels number 150 "
                              "for 200 images; replace the files with intact ones")


def test_a_negative_cifar_label_is_refused(cifar_dir, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_dir / "cifar-10-batches-py", folder)
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # the real subset's own file, read here to damage it
    labels = list(batch["labels"])
    labels[0] = -1
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.asarray(batch["data"], dtype=np.uint8), "labels": labels}, f)
    with pytest.raises(DataError) as err:
        load_cifar10(config.DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert str(err.value) == (f"data set cifar10 ({folder}/test_batch): the test labels include -1, outside 0..9 "
                              "(10 classes; 1 labels out of range); replace the files with intact ones")


@pytest.mark.slow
def test_bad_data_or_a_model_too_deep_for_it_start_no_run(tracking_uri, client, small_fashion, tmp_path):
    """`prunelab run`: one line, exit 2, and the study's experiment holds no run."""
    folder, parts = small_fashion
    labels = parts["train-labels-idx1-ubyte"].clone()
    labels[0] = 12
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    cache = tmp_path / "cache"
    bad_labels = run_prunelab(tracking_uri, "run", *TINY, "--set", "study=test-data-bad-labels", "--data-dir",
                              str(folder), "--out", str(tmp_path / "out"), cache=cache)
    assert bad_labels.returncode == 2
    assert bad_labels.stderr.strip() == (
        f"prunelab: error: data set fashionmnist ({folder}/train-labels-idx1-ubyte): the train labels include 12, "
        "outside 0..9 (10 classes; 1 labels out of range); replace the files with intact ones")

    too_deep = run_prunelab(tracking_uri, "run", *TINY, "--set", "study=test-data-vgg16-28px", "--set", "model=vgg16",
                            "--out", str(tmp_path / "out"), cache=cache)
    assert too_deep.returncode == 2
    assert too_deep.stderr.strip() == (
        "prunelab: error: model 'vgg16' cannot take fashionmnist's images of 28 x 28 px: it needs at least 32 x 32; "
        "choose another model (or data.image_size=32 or more)")
    for study in ("test-data-bad-labels", "test-data-vgg16-28px"):
        exp = client.get_experiment_by_name(study)
        assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_a_damaged_cached_copy_is_rebuilt_from_the_source(fashion_dir, tmp_path, monkeypatch):
    """Debian's gzipped files are decompressed into the cache; a cached copy cut short later
    is named as the cache's (not the system data set's) and rebuilt from the source, once."""
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    cfg = config.DataConfig(dataset="fashionmnist")
    first = load_fashionmnist(cfg)
    (cached,) = (tmp_path / "cache").glob("fashionmnist-*/FashionMNIST/raw/train-images-idx3-ubyte")
    with open(cached, "r+b") as f:
        f.truncate(cached.stat().st_size // 2)
    with pytest.warns(UserWarning) as said:
        again = load_fashionmnist(cfg)
    (warning,) = [str(w.message) for w in said if "cache" in str(w.message)]
    assert warning.startswith(f"the cached copy {cached} of {fashion_dir}/train-images-idx3-ubyte(.gz) is damaged "
                              "(truncated: ")
    assert warning.endswith("): rebuilding it from the source")
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.train_y, first.train_y)


def test_a_cache_that_cannot_be_written_is_one_line(dogs_cats_dir, tmp_path, monkeypatch):
    """PRUNELAB_CACHE below a file: the image-folder loader, which writes its decoded images
    there, says so in one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PRUNELAB_CACHE", str(blocker / "cache"))
    with pytest.raises(DataError) as err:
        load_imagefolder(config.DataConfig(dataset="imagefolder", data_dir=str(dogs_cats_dir), image_size=8))
    assert str(err.value) == (f"cannot write the data cache {blocker}/cache (Not a directory): point PRUNELAB_CACHE "
                              "at a writable folder with space")


def test_a_cache_that_cannot_be_written_stops_a_study_before_any_run(tracking_uri, client, fashion_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    study = "test-data-cache-unwritable"
    proc = run_prunelab(tracking_uri, "run", *TINY, "--set", f"study={study}", "--out", str(tmp_path / "out"),
                        cache=blocker / "cache")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"prunelab: error: cannot write the data cache {blocker}/cache/fashionmnist-")
    assert line.endswith("(Not a directory): point PRUNELAB_CACHE at a writable folder with space")
    exp = client.get_experiment_by_name(study)
    assert exp is None or client.search_runs([exp.experiment_id]) == []
