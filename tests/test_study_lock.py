"""One `main` of a study at a time per server: the lock is a tag on the study's experiment
naming the process that holds it, taken by set-then-read-back, released at the end, and
taken over from a process of this host that is gone."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env
from prunelab import paths
from prunelab.tracking import lock

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "trials=1", "--set", "data.n_train=600", "--set", "data.n_test=200", "--set", "train.epochs=1",
        "--set", "finetune.epochs=1", "--set", "prune.rank_images=200", "--set", "prune.latency_repeats=0"]


def lock_tag(client, study: str) -> str | None:
    exp = client.get_experiment_by_name(study)
    return exp.tags.get(paths.TAG_STUDY_LOCK) if exp else None


def gone_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_two_runs_of_one_study_at_once(tracking_uri, client, fashion_dir, tmp_path):
    """Started together: exactly one runs the study, the other refuses in one line naming it
    (exit 2) before creating any run; every step ran once, trial 0 was registered once."""
    study = "test-lock-two-at-once"
    env = clean_env(tracking_uri)
    procs = [subprocess.Popen([sys.executable, "-m", "prunelab", "run", *TINY, "--set", f"study={study}",
                               "--out", str(tmp_path / name)], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    outcomes = [(proc.pid, proc.returncode, err) for proc in procs for _, err in [proc.communicate(timeout=900)]]
    assert sorted(rc for _, rc, _ in outcomes) == [0, 2], [err[-2000:] for _, _, err in outcomes]
    (winner,) = [pid for pid, rc, _ in outcomes if rc == 0]
    (refusal,) = [err for _, rc, err in outcomes if rc == 2]
    (line,) = refusal.strip().splitlines()
    assert re.fullmatch(
        rf"prunelab: error: study '{study}' is already running: process {winner} on {re.escape(socket.gethostname())} "
        rf"\(since [^)]+\) holds it on this tracking server; wait for it to end, or, if that process is gone on another "
        rf"machine, delete the tag {paths.TAG_STUDY_LOCK} of experiment '{study}' in the MLflow UI and run again", line)

    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.tags.get(paths.TAG_STAGE) for r in runs] == ["main", "train", "prune", "finetune", "report"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(client.search_model_versions(f"name = '{study}'")) == 1
    assert lock_tag(client, study) is None  # released at the end


def test_the_lock_refuses_a_live_holder_and_takes_over_a_gone_one(tracking_uri, client, capsys):
    study = "test-lock-holders"
    experiment_id, mine = lock.take(study)
    assert lock.Holder.parse(lock_tag(client, study)) == mine
    with pytest.raises(lock.StudyBusy, match=rf"^study '{study}' is already running: process {mine.pid} on "):
        lock.take(study)  # held by a live process (this one)
    lock.release(experiment_id, mine)
    assert lock_tag(client, study) is None

    gone = lock.Holder(socket.gethostname(), str(gone_pid()), "1", "earlier", "0" * 16)
    client.set_experiment_tag(experiment_id, paths.TAG_STUDY_LOCK, gone.text())
    with lock.held(study):
        assert lock.Holder.parse(lock_tag(client, study)).pid == mine.pid
    assert f"took over the lock of study '{study}' from process {gone.pid} on {gone.host}" in capsys.readouterr().out
    assert lock_tag(client, study) is None

    elsewhere = lock.Holder("another-machine", "4242", "1", "earlier", "1" * 16)
    client.set_experiment_tag(experiment_id, paths.TAG_STUDY_LOCK, elsewhere.text())
    with pytest.raises(lock.StudyBusy, match="process 4242 on another-machine"):
        lock.take(study)  # whether that process runs cannot be told here
    assert lock.Holder.parse(lock_tag(client, study)) == elsewhere  # left as it was


def test_the_lock_is_released_when_main_fails(tracking_uri, client):
    study = "test-lock-released"
    with pytest.raises(RuntimeError, match="a step failed"):
        with lock.held(study):
            assert lock_tag(client, study) is not None
            raise RuntimeError("a step failed")
    assert lock_tag(client, study) is None
