"""The real loaders on the real files: FashionMNIST (Debian's copy) and the CIFAR-10 subset."""

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pickle
import pytest
import torch

from prunelab import config, data
from prunelab.data.base import ImageData, batches, random_crop_flip
from prunelab.data.fashionmnist import FASHION_MNIST_FILES
from prunelab.errors import DataError


def test_fashionmnist_from_debian_package(fashion_dir):
    d = data.get(config.DataConfig(dataset="fashionmnist"))
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.num_classes == 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10  # the real test set is balanced


def test_data_dir_with_gz_files_and_subset(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    for f in fashion_dir.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    d = data.get(config.DataConfig(dataset="fashionmnist", data_dir=str(tmp_path), n_train=1000, n_test=100, val_size=100))
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (1000, 100, 100)  # n_train counts what trains
    x, _ = next(batches(d.train_x, d.train_y, 900, d.normalise))
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # batched normalisation


def test_missing_folder_names_every_option(tmp_path):
    with pytest.raises(DataError) as err:
        data.get(config.DataConfig(dataset="fashionmnist", data_dir=str(tmp_path / "nothing")))
    msg = str(err.value)
    assert "--data-dir" in msg and "dataset-fashion-mnist" in msg and "download" in msg and "\n" not in msg


def test_corrupt_fashionmnist_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    for name in FASHION_MNIST_FILES:
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(b"not an idx file")
    with pytest.raises(DataError, match="corrupt"):
        data.get(config.DataConfig(dataset="fashionmnist", data_dir=str(tmp_path)))


def test_a_repaired_fashionmnist_folder_is_read_fresh(fashion_dir, tmp_path, monkeypatch):
    """The decompressed cache is keyed by the files' content: once the broken file is
    replaced by the real one, the next load reads it instead of the cached broken copy."""
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "fashion"
    folder.mkdir()
    for f in fashion_dir.glob("*.gz"):
        shutil.copy(f, folder / f.name)
    labels = folder / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as f:  # decompresses fine, but is no IDX file
        f.write(b"broken labels")
    cfg = config.DataConfig(dataset="fashionmnist", data_dir=str(folder), n_train=100, n_test=100)
    with pytest.raises(DataError, match="corrupt"):
        data.get(cfg)
    shutil.copy(fashion_dir / labels.name, labels)  # repaired
    d = data.get(cfg)
    assert d.train_y.tolist() == data.get(config.DataConfig(dataset="fashionmnist", n_train=100, n_test=100)).train_y.tolist()
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_two_processes_fill_an_empty_cache_at_once(fashion_dir, tmp_path):
    """Both read the same real data: each writes its own temporary files and renames them."""
    env = {**os.environ, "PRUNELAB_CACHE": str(tmp_path / "cache")}
    read = ("from prunelab import config, data; d = data.get(config.DataConfig(dataset='fashionmnist')); "
            "print(len(d.train_y), len(d.test_y), int(d.train_x.sum()), int(d.test_y.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", read], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    first, second = (out.strip() for out, _ in results)
    assert first == second and first.startswith("60000 10000 ")
    assert len(list((tmp_path / "cache").rglob("*-ubyte"))) == 4  # one copy of each file, complete
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_cifar10_subset_reads_despite_other_md5(cifar_dir):
    d = data.get(config.DataConfig(dataset="cifar10", data_dir=str(cifar_dir)))
    assert d.train_x.shape == (4660, 3, 32, 32) and d.test_x.shape == (846, 3, 32, 32)
    assert d.classes[0] == "airplane" and int(d.train_y.max()) == 9


def _copy_cifar(cifar_dir, tmp_path):
    target = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_dir / "cifar-10-batches-py", target)
    return target


def test_cifar10_missing_batch(cifar_dir, tmp_path):
    folder = _copy_cifar(cifar_dir, tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        data.get(config.DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_cifar10_wrong_shapes_and_code_are_refused(cifar_dir, tmp_path):
    folder = _copy_cifar(cifar_dir, tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((5, 100), dtype=np.uint8), "labels": [0] * 5}, f)
    with pytest.raises(DataError, match="wrong shape"):
        data.get(config.DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": ImageData, "labels": []}, f)  # a class reference: code, not data
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        data.get(config.DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_crop_flip_is_batched_and_keeps_content(cifar_dir):
    d = data.get(config.DataConfig(dataset="cifar10", data_dir=str(cifar_dir), n_train=64))
    out = random_crop_flip(d.train_x, torch.Generator().manual_seed(0), padding=0)
    same = [torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o, x in zip(out, d.train_x)]
    assert all(same) and 0 < sum(torch.equal(o, x) for o, x in zip(out, d.train_x)) < 64


def test_splits_say_what_a_run_reads(fashion_dir):
    """Name, context, count, source and a digest that follows the images and labels."""
    cfg = config.DataConfig(dataset="fashionmnist", n_train=600, n_test=200, val_size=100)
    d = data.get(cfg)
    train, val, test = d.splits()
    assert [(s.name, s.context, s.images) for s in (train, val, test)] == [
        ("fashionmnist-train", "train", 600), ("fashionmnist-validation", "validation", 100), ("fashionmnist-test", "test", 200)]
    assert train.image_shape == (1, 28, 28) and train.source == str(fashion_dir.resolve())
    assert [s.digest for s in data.get(cfg).splits()] == [train.digest, val.digest, test.digest]  # stable across loads
    assert len({train.digest, val.digest, test.digest}) == 3
    from prunelab.data.base import digest

    y = d.test_y.clone()
    y[-1] = (y[-1] + 1) % 10
    assert digest(d.test_x, y) != test.digest  # any label
    x = d.test_x.clone()
    x[0, 0, 14, 14] ^= 1
    assert digest(x, d.test_y) != test.digest  # a sampled image
    assert digest(d.test_x[:199], d.test_y[:199]) != test.digest


def test_the_validation_split_does_not_move_with_n_train(fashion_dir):
    """The validation images are the whole training set's last ones, whatever n_train:
    a small training subset and the full study choose their champion on the same images."""
    small = data.get(config.DataConfig(dataset="fashionmnist", n_train=600, n_test=10, val_size=500))
    whole = data.get(config.DataConfig(dataset="fashionmnist", n_test=10, val_size=500))
    assert torch.equal(small.val_x, whole.val_x) and torch.equal(small.val_y, whole.val_y)
    assert torch.equal(small.train_x, whole.train_x[:600]) and len(whole.train_y) == 60_000 - 500


@pytest.mark.parametrize("dataset, folder, side", [("fashionmnist", "fashion_dir", 32), ("cifar10", "cifar_dir", 48)])
def test_image_size_resizes_every_split(dataset, folder, side, request):
    """data.image_size resizes FashionMNIST and CIFAR-10 too (bilinear, still uint8): the same
    images, labels and normalisation, at the side asked for."""
    found = request.getfixturevalue(folder)  # skips where the data set is absent
    data_dir = str(found) if dataset == "cifar10" else ""  # FashionMNIST: Debian's copy, found by itself
    native = data.get(config.DataConfig(dataset=dataset, data_dir=data_dir, n_test=50, val_size=20))
    sized = data.get(config.DataConfig(dataset=dataset, data_dir=data_dir, n_test=50, val_size=20, image_size=side))
    channels = native.input_shape[0]
    assert sized.input_shape == (channels, side, side) and sized.train_x.dtype == torch.uint8
    assert (len(sized.train_x), len(sized.val_x), len(sized.test_x)) == (len(native.train_x), 20, 50)
    assert torch.equal(sized.test_y, native.test_y) and (sized.mean, sized.std) == (native.mean, native.std)
    # Resizing changes the grid, not the picture: each image's mean brightness stays within a grey level or two.
    brightness = lambda x: x.float().mean(dim=(1, 2, 3))  # noqa: E731
    assert (brightness(sized.test_x) - brightness(native.test_x)).abs().max() < 2.0
