"""`main` against the real server: in-process steps make the same runs as one
`mlflow run` process per step; reuse keys on the resolved settings; abandoned
runs are marked FAILED; parallel trials; an absent device is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunelab import cli, hardware, paths
from prunelab.pipeline import study

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ("data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200 "
        "prune.latency_repeats=0 trials=1")
# Tags that name a process, a time or a run id: they differ between any two runs.
VARYING_TAGS = {"mlflow.parentRunId", paths.TAG_PID, paths.TAG_PROCESS_START, paths.TAG_STEP_RUNNER,
                "prunelab.model_uri", "mlflow.log-model.history", "mlflow.runName", paths.TAG_STEP_KEY}


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def shape_of(client, run, experiment):
    """What a person compares between two runs of the same step: everything but values that name runs or processes."""
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    params = {k: v.replace(experiment, "<study>") for k, v in run.data.params.items() if k not in ("model_uri", "input_model", "out_dir")}
    return {"name": run.info.run_name, "status": run.info.status,
            "tags": sorted(k for k in run.data.tags if k not in VARYING_TAGS),
            "params": params, "metrics": sorted(run.data.metrics), "artifacts": artifacts}


def test_in_process_steps_make_the_runs_mlflow_run_makes(tracking_uri, client, fashion_dir, tmp_path):
    shapes = {}
    for steps in ("processes", "in-process"):
        name = f"test-main-{steps}"
        assert cli.main(["run", "--overrides", f"{TINY} study={name}", "--out", str(tmp_path / steps),
                         "--steps", steps]) == 0
        runs = runs_of(client, name)
        assert [r.data.tags.get("stage") for r in runs] == ["main", "train", "prune", "finetune", "report"]
        main_id = runs[0].info.run_id
        assert all(r.data.tags.get("mlflow.parentRunId") == main_id for r in runs[1:])
        runner = {"processes": "process", "in-process": "in-process"}[steps]
        assert all(r.data.tags.get(paths.TAG_STEP_RUNNER) == runner for r in runs[1:])
        for r in runs[1:]:
            assert r.data.tags["mlflow.project.entryPoint"] == r.data.tags["stage"]
            assert r.data.tags["mlflow.source.type"] == "PROJECT"
        shapes[steps] = [shape_of(client, r, name) for r in runs[1:]]
    for per_process, in_process in zip(shapes["processes"], shapes["in-process"]):
        assert per_process == in_process


def test_reuse_keys_on_resolved_settings_not_spelling(tracking_uri, client, fashion_dir, tmp_path):
    """The same settings spelt differently reuse every step; an edited preset file reuses nothing."""
    name = "test-main-reuse"
    overrides = f"{TINY} study={name}"
    assert cli.main(["run", "--overrides", overrides, "--out", str(tmp_path)]) == 0
    respelt = overrides + " prune.target=0.60 train.lr=0.0010"  # the values they already had
    assert cli.main(["run", "--overrides", respelt, "--out", str(tmp_path)]) == 0
    stages = [r.data.tags.get("stage") for r in runs_of(client, name)]
    assert stages == ["main", "train", "prune", "finetune", "report", "main", "report"]

    preset = tmp_path / "my-study.yaml"
    preset.write_text((REPO / "src/prunelab/presets/taylor-cnn-fashionmnist.yaml").read_text())
    assert cli.main(["run", "--study", str(preset), "--overrides", overrides, "--out", str(tmp_path)]) == 0
    assert len(runs_of(client, name)) == 9  # a preset with the same settings: the steps are reused
    preset.write_text(preset.read_text().replace("lr: 0.001", "lr: 0.002"))
    assert cli.main(["run", "--study", str(preset), "--overrides", overrides, "--out", str(tmp_path)]) == 0
    latest = [r.data.tags.get("stage") for r in runs_of(client, name)][9:]
    assert latest == ["main", "train", "prune", "finetune", "report"]
    assert runs_of(client, name)[10].data.params["train.lr"] == "0.002"


def test_killed_main_is_marked_failed_and_rerun_reuses_its_steps(tracking_uri, client, fashion_dir, tmp_path):
    """kill -9 of `main` during trial 1: the rerun marks the dead runs FAILED, reuses trial 0's
    finished steps under the new main, and finishes."""
    name = "test-main-killed"
    args = [sys.executable, "-m", "prunelab", "run", "--overrides", TINY.replace("trials=1", "trials=2") + f" study={name}",
            "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until trial 1's first step runs
        if any(r.data.tags.get("trial") == "1" for r in runs_of(client, name)):
            break
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    running = [r for r in runs_of(client, name) if r.info.status == "RUNNING"]
    assert {r.data.tags.get("stage") for r in running} >= {"main"}

    assert cli.main(["run", "--overrides", TINY.replace("trials=1", "trials=2") + f" study={name}",
                     "--out", str(tmp_path)]) == 0
    runs = runs_of(client, name)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.info.run_id for r in failed} == {r.info.run_id for r in running}
    assert all(r.data.tags[paths.TAG_FAILED_BECAUSE].startswith("abandoned") for r in failed)
    new_main = [r for r in runs if r.data.tags.get("stage") == "main" and r.info.status == "FINISHED"][-1]
    trial0 = [r for r in runs if r.data.tags.get("trial") == "0" and r.info.status == "FINISHED"]
    assert len(trial0) == 3 and all(r.data.tags["mlflow.parentRunId"] == new_main.info.run_id for r in trial0)


def test_parallel_trials_run_in_worker_processes(tracking_uri, client, fashion_dir, tmp_path):
    name = "test-main-parallel"
    overrides = TINY.replace("trials=1", "trials=2") + f" study={name} parallel_trials=2"
    assert cli.main(["run", "--overrides", overrides, "--out", str(tmp_path)]) == 0
    runs = runs_of(client, name)
    steps = [r for r in runs if r.data.tags.get("stage") in ("train", "prune", "finetune")]
    assert sorted((r.data.tags["trial"], r.data.tags["stage"]) for r in steps) == \
        sorted((str(t), s) for t in (0, 1) for s in ("train", "prune", "finetune"))
    main_id = runs[0].info.run_id
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == main_id for r in runs[1:])
    # Each trial ran in a worker of its own, not in `main`'s process.
    assert len({r.data.tags[paths.TAG_PID] for r in steps} - {runs[0].data.tags[paths.TAG_PID]}) == 2


def test_device_is_logged_and_an_absent_one_refused(tracking_uri, client, fashion_dir, capsys):
    name = "test-device"
    assert cli.main(["train", "--overrides", f"{TINY} study={name} device=cpu"]) == 0
    (run,) = runs_of(client, name)
    assert run.data.tags["device"] == "cpu" and run.data.tags["hardware"]
    # The default precision, auto, is logged as what this CPU got: bf16 where it is native.
    chosen = "bf16" if hardware.supports_bf16(torch.device("cpu")) else "fp32"
    assert run.data.params["train.precision"] == chosen
    capsys.readouterr()
    assert cli.main(["train", "--overrides", f"{TINY} study={name} device=cuda:3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunelab: error: device 'cuda:3' is not available on this machine (it has cpu") and "\n" not in err
    assert len(runs_of(client, name)) == 1


def test_unknown_step_runner_is_refused():
    with pytest.raises(Exception, match="unknown step runner"):
        study.StudyArgs("taylor-cnn-fashionmnist", steps="threads")
