"""Faults against real servers and real processes: a stage stopped by a signal,
the tracking server stopped in the middle of a stage and started again, and two
studies running at once. Every run ends FINISHED or FAILED and nothing trained
is lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from prunelab import checkpoints, paths
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import launch, probe

pytestmark = pytest.mark.slow

TINY = "data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200 trials=1"


def env_for(uri: str, tmp_path: Path) -> dict[str, str]:
    # As from a fresh shell: nothing chosen earlier in this test process leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=uri, PRUNELAB_SPOOL=str(tmp_path / "spool"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


def prunelab(*args: str, env: dict[str, str]) -> subprocess.Popen:
    # SIGINT as from a terminal: a shell starts background jobs (a test run among them) with
    # SIGINT ignored, which a child inherits, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "prunelab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def wait_for_epoch(client: MlflowClient, experiment: str, proc: subprocess.Popen, epoch: int = 1, timeout: float = 300):
    """The stage's run once the server holds its metrics of `epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the stage ended early: {proc.communicate()[1][-2000:]}"
        runs = runs_of(client, experiment)
        if runs and any(m.step >= epoch for m in client.get_metric_history(runs[0].info.run_id, "test_accuracy")):
            return runs[0]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no epoch {epoch} of {experiment} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_ends_the_stage_failed(sig, tracking_uri, client, fashion_dir, tmp_path):
    """kill, a closed terminal and Ctrl-C mid-training: exit 128 + the signal (143, 129, 130),
    one line, and the run FAILED on the server."""
    study = f"test-fault-{sig.name.lower()}"
    proc = prunelab("train", "--overrides", f"data.n_train=2000 data.n_test=200 train.epochs=500 study={study}",
                    env=env_for(tracking_uri, tmp_path))
    run = wait_for_epoch(client, study, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    said = ("prunelab: interrupted" if sig == signal.SIGINT else f"prunelab: error: stopped by {sig.name}")
    assert err.strip().splitlines() == [f"{said}; any run in progress was marked FAILED"]
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_server_stopped_mid_train_then_sync(fashion_dir, tmp_path):
    """The server goes away after epoch 1: the stage trains on, ends within 60 s of
    the stop with one line naming the spool folder, which holds the trained model;
    a server started again on the same folder and port gets everything from `sync`."""
    port, folder = probe.free_port(), tmp_path / "server"
    uri, process = launch.start(port, folder)  # a server of its own: the session's stays up
    try:
        client = MlflowClient(uri)
        env = env_for(uri, tmp_path)
        study, epochs = "test-fault-outage", 5
        proc = prunelab("train", "--overrides", f"data.n_train=2000 data.n_test=300 train.epochs={epochs} study={study}",
                        env=env)
        run_id = wait_for_epoch(client, study, proc).info.run_id
        launch.stop(process)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=300)
        print(f"train ended {time.monotonic() - stopped:.1f} s after its server stopped")
        assert time.monotonic() - stopped < 60
        assert proc.returncode == 2
        (line,) = err.strip().splitlines()
        assert line.startswith(f"prunelab: error: the tracking server {uri} stopped answering during train")
        spooled = Path(re.search(r" are kept in (\S+): upload them", line).group(1))
        assert spooled.parent.parent == tmp_path / "spool" and run_id in spooled.name
        weights = spooled / "models" / paths.MODEL / paths.CHECKPOINT
        trained = checkpoints.load(weights)  # the model trained through the outage, on disk
        assert type(trained) is SimpleCNN

        uri, process = launch.start(port, folder)
        sync = subprocess.run([sys.executable, "-m", "prunelab", "sync", str(spooled)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert sync.returncode == 0, sync.stderr[-2000:]
        assert f"synced {spooled} to run {run_id}" in sync.stdout
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in sorted(client.get_metric_history(run_id, "test_accuracy"), key=lambda m: m.step)] \
            == list(range(1, epochs + 1))
        assert run.data.tags[paths.TAG_SYNCED_FROM] == str(spooled.resolve())
        assert paths.TAG_MODEL_URI in run.data.tags
        uploaded = Path(client.download_artifacts(run_id, paths.CHECKPOINT, str(tmp_path)))
        assert all(torch.equal(a, b) for a, b in zip(checkpoints.load(uploaded).state_dict().values(),
                                                     trained.state_dict().values()))
        assert [r.info.status for r in runs_of(client, study)] == ["FINISHED"]
    finally:
        launch.stop(process)


def test_two_studies_at_once(tracking_uri, client, fashion_dir, tmp_path):
    """Two whole studies in different experiments, at the same time: each finishes with
    its own runs, FINISHED, its steps under its own main, nothing of the other's."""
    env = env_for(tracking_uri, tmp_path)
    studies = ("test-fault-together-a", "test-fault-together-b")
    procs = [prunelab("run", "--overrides", f"{TINY} study={s}", "--out", str(tmp_path / s), env=env) for s in studies]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    for study in studies:
        runs = runs_of(client, study)
        assert [r.data.tags.get(paths.TAG_STAGE) for r in runs] == ["main", "train", "prune", "finetune", "report"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert all(r.data.tags.get(paths.TAG_STUDY) == study for r in runs)
        main_id = runs[0].info.run_id
        assert all(r.data.tags.get("mlflow.parentRunId") == main_id for r in runs[1:])
        train, prune, finetune = runs[1:4]
        assert prune.data.params["model_uri"] == train.info.run_id
        assert finetune.data.params["model_uri"] == prune.info.run_id
        assert (tmp_path / study / "test_accuracy.png").is_file()
