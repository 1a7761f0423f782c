"""The report's files reach `--out` all together or not at all: written to a folder beside it,
moved in once every one is written; a full disk is one line (on a 64 KiB tmpfs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from conftest import clean_env
from prunelab import paths, reporting, studies
from prunelab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "trials=1", "--set", "data.n_train=600", "--set", "data.n_test=200", "--set", "train.epochs=1",
        "--set", "finetune.epochs=1", "--set", "prune.rank_images=200", "--set", "prune.latency_repeats=0"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system: the first figure fits, the rest do not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here ({mounted.stderr.strip() or mounted.returncode}): "
                    "the full-disk tests need the right to mount (root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def message(out: Path) -> str:
    return (f"cannot write --out {out} (No space left on device): nothing was written there; free space or pass a "
            "folder you can write to")


def test_publish_writes_all_files_or_none_and_no_run(tracking_uri, client, full_disk):
    cfg = studies.load_config(overrides=["study=test-report-full-disk"])
    small, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    noise, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.random.default_rng(0).random((300, 300, 3)))  # noise: no PNG compresses it below the disk
    table = pd.DataFrame({"setting": ["a", "b"], "test_accuracy": [0.5, 0.25]})
    out = full_disk / "report"
    with pytest.raises(ConfigError) as err:
        reporting.publish(cfg, {"small.png": small, "noise.png": noise}, table, out)
    assert str(err.value) == message(out)
    assert list(full_disk.iterdir()) == []  # neither the first figure nor the staging folder
    exp = client.get_experiment_by_name(cfg.study)
    assert exp is None or client.search_runs([exp.experiment_id]) == []  # the files come before the run


@pytest.mark.slow
def test_a_study_whose_out_fills_up_ends_in_one_line(tracking_uri, client, fashion_dir, full_disk):
    study, out = "test-report-out-fills", full_disk / "report"
    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", *TINY, "--set", f"study={study}", "--out", str(out)],
                          capture_output=True, text=True, env=clean_env(tracking_uri), cwd=REPO, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == f"prunelab: error: {message(out)}"
    assert list(full_disk.iterdir()) == []
    exp = client.get_experiment_by_name(study)
    # The report step's run is made as `mlflow run -e report` makes it, then fails before its stage tags it.
    runs = {r.data.tags.get(paths.TAG_STAGE) or r.data.tags["mlflow.project.entryPoint"]: r
            for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["finetune", "main", "prune", "report", "train"]
    assert [runs[s].info.status for s in ("train", "prune", "finetune")] == ["FINISHED"] * 3
    assert runs["report"].info.status == "FAILED" and client.list_artifacts(runs["report"].info.run_id) == []
