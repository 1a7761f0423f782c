"""The MLproject entry points as users run them: `mlflow run . -e ...` against the real server."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = "data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200 trials=1"


def shell_env(tracking_uri):
    """As from a fresh shell: an experiment or run chosen earlier in this test process
    (MLflow exports MLFLOW_EXPERIMENT_ID on set_experiment) must not leak into `mlflow run`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


def mlflow_run(tracking_uri, entry, experiment, **params):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=shell_env(tracking_uri), timeout=600, cwd=REPO)


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def test_prune_entry_point_hands_over_its_run(tracking_uri, client, fashion_dir):
    """`mlflow run -e prune` with no model trains one, prunes, and logs into the run MLflow made."""
    proc = mlflow_run(tracking_uri, "prune", "test-ep-prune", study="taylor-cnn-fashionmnist",
                      overrides=TINY + " study=test-ep-prune")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = runs_of(client, "test-ep-prune")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "prune" and run.data.tags["stage"] == "prune"
    assert run.data.metrics["fraction_remaining"] <= 0.6
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain_test_accuracy")] == [1]


def test_failing_entry_point_leaves_no_running_run(tracking_uri, client, fashion_dir):
    proc = mlflow_run(tracking_uri, "prune", "test-ep-fail", overrides=TINY + " study=test-ep-fail prune.target=0.01")
    assert proc.returncode != 0
    assert "prunelab: error: prune.target=0.01 params cannot be reached" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r.info.status for r in runs_of(client, "test-ep-fail")] == ["FAILED"]


def test_main_chains_the_stages_and_reuses_finished_steps(tracking_uri, client, fashion_dir, tmp_path):
    study = "test-ep-main"
    params = dict(study="taylor-cnn-fashionmnist", overrides=TINY + f" study={study}", out_dir=str(tmp_path))
    first = mlflow_run(tracking_uri, "main", study, **params)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = runs_of(client, study)
    stages = [r.data.tags.get("stage") for r in runs]
    assert stages == ["main", "train", "prune", "finetune", "report"]
    main_id = runs[0].info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == main_id for r in runs[1:])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "test_accuracy.png").is_file()
    # The prune step took the train step's model, the finetune step the prune step's.
    train, prune, finetune = runs[1:4]
    assert prune.data.params["model_uri"] == train.info.run_id
    assert finetune.data.params["model_uri"] == prune.info.run_id

    second = mlflow_run(tracking_uri, "main", study, **params)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("prunelab: reusing finished") == 3
    assert [r.data.tags.get("stage") for r in runs_of(client, study)] == stages + ["main", "report"]


def test_main_prunes_a_torchvision_network(tracking_uri, client, fashion_dir, tmp_path):
    """`mlflow run . -e main -P overrides="model=torchvision:resnet18 ..."`: a torchvision network
    through the whole chain, its fine-tuned pruned network registered."""
    study = "test-ep-torchvision"
    overrides = (f"model=torchvision:resnet18 study={study} data.image_size=32 data.n_train=256 data.n_test=100 "
                 "train.epochs=1 finetune.epochs=1 prune.rank_images=64 prune.filters_per_step=400 prune.target=0.85 "
                 "prune.latency_repeats=0 trials=1")
    proc = mlflow_run(tracking_uri, "main", study, study="taylor-cnn-fashionmnist", overrides=overrides,
                      out_dir=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(client, study)
    assert [r.data.tags.get("stage") for r in runs] == ["main", "train", "prune", "finetune", "report"]
    assert all(r.info.status == "FINISHED" for r in runs)
    train, prune, finetune = runs[1:4]
    assert {r.data.params["model"] for r in (train, prune, finetune)} == {"torchvision:resnet18"}
    assert prune.data.metrics["fraction_remaining"] <= 0.85 and prune.data.metrics["rounds"] >= 1
    assert [v.run_id for v in client.search_model_versions(f"name = '{study}'")] == [finetune.info.run_id]


def test_readme_mlflow_run_works_without_activating_the_venv(tracking_uri, client, fashion_dir):
    """`.venv/bin/mlflow run . -e train` from a shell whose PATH has no Python with
    prunelab: the entry point finds the repository's .venv by itself."""
    venv = REPO / ".venv" / "bin"
    if not (venv / "mlflow").exists():
        pytest.skip("no .venv in the repository (`make install` makes it)")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH="/usr/bin:/bin")
    proc = subprocess.run([str(venv / "mlflow"), "run", ".", "-e", "train", "--env-manager", "local",
                           "--experiment-name", "test-ep-novenv", "-P", f"overrides={TINY} study=test-ep-novenv"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r.info.status for r in runs_of(client, "test-ep-novenv")] == ["FINISHED"]


# The scale of the README's command in these tests: one trial on a FashionMNIST slice.
README_TINY = "trials=1 data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1"


def readme_main_command(study: str, experiment_name: bool) -> list[str]:
    """The README's `mlflow run -e main` command with overrides, as written, at test scale:
    its overrides tiny and the study renamed `study` (so it has an experiment of its own),
    with `--experiment-name` naming that study, or left out."""
    line = next(line for line in README.read_text().splitlines()
                if line.startswith(".venv/bin/mlflow run ") and " -e main " in line and "overrides=" in line)
    args = shlex.split(line.split(" #")[0])[1:]  # after `.venv/bin/mlflow`
    assert "--experiment-name" in args, f"the README's command lacks --experiment-name: {line}"
    out = []
    words = iter(args)
    for word in words:
        if word == "--experiment-name":
            next(words)
            out += [word, study] if experiment_name else []
            continue
        out.append(f"overrides={README_TINY} study={study}" if word.startswith("overrides=") else word)
    return [sys.executable, "-m", "mlflow", *out]


def runs_naming(client, study):
    """Every run on the server, in any experiment, whose `overrides` parameter names `study`."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"params.overrides LIKE '%study={study}%'")


def test_readme_mlflow_run_keeps_the_study_in_one_experiment(tracking_uri, client, fashion_dir):
    """The README's `mlflow run -e main ... --experiment-name <study>`: main and every step in
    the study's experiment, so the link prunelab prints opens on all of them."""
    study = "test-readme-with-experiment"
    proc = subprocess.run(readme_main_command(study, experiment_name=True), capture_output=True,
                          text=True, env=shell_env(tracking_uri), timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(client, study)
    assert [r.data.tags.get("stage") for r in runs] == ["main", "train", "prune", "finetune", "report"]
    assert all(r.info.status == "FINISHED" for r in runs)
    exp_id = client.get_experiment_by_name(study).experiment_id
    assert {r.info.experiment_id for r in runs_naming(client, study)} == {exp_id}  # none elsewhere (Default)
    assert f"/#/experiments/{exp_id}/runs" in proc.stdout


def test_readme_mlflow_run_without_experiment_name_is_refused(tracking_uri, client, fashion_dir):
    """The same command without `--experiment-name`: MLflow makes `main` in Default before
    prunelab starts; prunelab refuses it in one line naming the fix, and ends it FAILED."""
    study = "test-readme-without-experiment"
    proc = subprocess.run(readme_main_command(study, experiment_name=False), capture_output=True,
                          text=True, env=shell_env(tracking_uri), timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "prunelab:" in line or "--experiment-name" in line]
    assert line.startswith("prunelab: error: ") and f"--experiment-name {study}" in line, line
    (run,) = runs_naming(client, study)  # the run MLflow made; prunelab made none
    assert client.get_experiment(run.info.experiment_id).name == "Default"
    assert run.info.status == "FAILED"
    assert f"--experiment-name {study}" in run.data.tags["prunelab.failed_because"]
    assert client.get_experiment_by_name(study) is None
