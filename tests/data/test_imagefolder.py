"""The image-folder reader on the real dogs-vs-cats images, and its bad inputs."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from prunelab import config, data
from prunelab.errors import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    # What an earlier test of this process read is held in memory: these tests read the folder.
    data._read.cache_clear()


def folder_cfg(path, size=32) -> config.DataConfig:
    return config.DataConfig(dataset="imagefolder", data_dir=str(path), image_size=size)


def small_copy(src, dst, per_class=3):
    """A few real images per class and split, copied outside the repository."""
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (dst / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:per_class]:
                shutil.copy(f, dst / split / cls / f.name)
    return dst


def test_reads_every_image_once_at_the_working_size_and_caches_them(dogs_cats_dir, tmp_path):
    """1,000 / 400 images decoded to uint8 at the asked size, classes mixed in the first rows, and a
    second load reads the on-disk cache (same tensors) instead of decoding again."""
    first = data.get(folder_cfg(dogs_cats_dir, 32))
    assert first.train_x.shape == (1000, 3, 32, 32) and first.train_x.dtype == torch.uint8
    assert first.test_x.shape == (400, 3, 32, 32)
    assert first.classes == ["cat", "dog"] and first.skipped == 0
    assert first.train_y.bincount().tolist() == [500, 500] and first.test_y.bincount().tolist() == [200, 200]
    assert set(first.train_y[:20].tolist()) == {0, 1}, "n_train=N must take both classes"
    cached = list((tmp_path / "cache").glob("imagefolder-*.pt"))
    assert len(cached) == 1
    again = data.get(folder_cfg(dogs_cats_dir, 32))
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    assert list((tmp_path / "cache").glob("imagefolder-*.pt")) == cached


def test_unreadable_image_is_skipped_with_a_warning_and_counted(dogs_cats_dir, tmp_path):
    """A corrupt file is left out, warned about and counted; the readable images all load."""
    root = small_copy(dogs_cats_dir, tmp_path / "imgs")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = data.get(folder_cfg(root, 40))
    assert loaded.skipped == 1
    assert len(loaded.train_y) == 6 and len(loaded.test_y) == 6
    assert loaded.train_x.shape[1:] == (3, 40, 40)
    assert any("broken.jpg" in str(w.message) for w in caught)


@pytest.mark.parametrize("case, message", [
    ("no_images", "no images in"),
    ("one_class", "only one class"),
    ("no_test", "no test/ sub-folder"),
    ("no_dir", "needs --data-dir"),
])
def test_bad_folders_fail_with_one_line(dogs_cats_dir, tmp_path, case, message):
    """Empty folders, a single class, a missing split or no --data-dir: one-line DataError."""
    root = tmp_path / "imgs"
    if case == "no_images":
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                (root / split / cls).mkdir(parents=True)
    else:
        small_copy(dogs_cats_dir, root, per_class=2)
    if case == "one_class":
        shutil.rmtree(root / "train" / "dog")
    if case == "no_test":
        shutil.rmtree(root / "test")
    cfg = folder_cfg("" if case == "no_dir" else root)
    with pytest.raises(DataError) as err:
        data.get(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
