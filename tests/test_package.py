"""prunelab as `pip install .` makes it: a wheel built from the sources, installed into a
folder of its own, run from an empty folder (no repository anywhere on its path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env

# What a wheel is built from (the files pyproject.toml and the project links read).
SOURCES = ("pyproject.toml", "README.md", "MLproject", "mlproject.sh", "conda.yaml", "src", "deploy")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of a copy of the sources (so no build folder lands in the repository),
    installed without dependencies into a folder: what stands on sys.path after `pip install .`."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("prunelab-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return root / "site"


def in_empty_folder(installed: Path, tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 120):
    """`python -m prunelab ...` from an empty folder, importing the installed copy only."""
    folder = tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    env = dict(env or os.environ)
    env["PYTHONPATH"] = str(installed)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=folder, timeout=timeout)


def test_the_wheel_ships_the_presets_and_the_project(installed, tmp_path):
    """From an empty folder, the installed package lists and reads every preset of the
    repository, and finds its MLproject (the one `--steps processes` runs) and the
    cluster variant (`--backend kubernetes`)."""
    script = ("import prunelab, json; from prunelab import config; from prunelab.pipeline import steps; "
              "print(json.dumps({'file': prunelab.__file__, 'studies': config.available_studies(), "
              "'preset': config.read_preset('taylor-cnn-fashionmnist'), 'project': str(steps.project_dir()), "
              "'mlproject': (steps.project_dir() / 'MLproject').read_text(), "
              "'cluster': (steps.shipped_project('kubernetes') / 'MLproject').read_text()}))")
    proc = in_empty_folder(installed, tmp_path, "-c", script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    import yaml

    got = json.loads(proc.stdout)
    assert Path(got["file"]).is_relative_to(installed)
    presets = REPO / "src" / "prunelab" / "presets"
    assert got["studies"] == sorted(p.stem for p in presets.glob("*.yaml"))
    assert got["preset"] == yaml.safe_load((presets / "taylor-cnn-fashionmnist.yaml").read_text())
    assert Path(got["project"]).is_relative_to(installed)
    assert got["mlproject"] == (REPO / "MLproject").read_text()
    assert got["cluster"] == (REPO / "deploy" / "kubernetes" / "MLproject").read_text()


def test_settings_from_any_folder(installed, tmp_path):
    proc = in_empty_folder(installed, tmp_path, "-m", "prunelab", "settings")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prune.target" in proc.stdout and "kmeans." in proc.stdout


def test_a_preset_file_is_read_relative_to_the_caller(installed, tmp_path):
    """`--study my.yaml` names a file in the folder the command runs in; a bad one is refused in one line."""
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "my.yaml").write_text("study: mine\ntrain: {epochs: 0}\n")
    proc = in_empty_folder(installed, tmp_path, "-m", "prunelab", "train", "--study", "my.yaml",
                           "--tracking-uri", "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "prunelab: error: train.epochs must be >= 1, got 0: pass a positive number of epochs"


@pytest.mark.slow
def test_installed_prunelab_runs_a_study_from_an_empty_folder(installed, tmp_path, tracking_uri, client, fashion_dir):
    """`prunelab run` of a one-trial, one-epoch study from an empty folder: every step and
    the report run finish, and the report's figures land in reports/<study> there."""
    study = "test-installed-run"
    overrides = (f"study={study} trials=1 data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 "
                 "prune.rank_images=200 prune.latency_repeats=0")
    proc = in_empty_folder(installed, tmp_path, "-m", "prunelab", "run", "--overrides", overrides,
                           env=clean_env(tracking_uri), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["finetune", "main", "prune", "report", "train"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "empty" / "reports" / study / "test_accuracy.png").is_file()
