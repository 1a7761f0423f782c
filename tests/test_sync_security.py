"""`prunelab sync` of a folder someone else may have made, against the real server.

A spool folder is built the way a stage builds one (`SpoolWriter.create` and its
writers), then altered the ways an attacker or a damaged disk would: a child
file or model name that climbs out of the folder, links to files outside it,
a record or metrics file of the wrong shapes, a record naming another server.
The real CLI must refuse each in one line, exit 2, before any run is created
or touched, and nothing from outside the folder may reach the server. A folder
that is fine lands its models in the run's own experiment, as that run's. And
a spool on a disk that fills up (a real, small tmpfs) keeps the model first,
ends in one line, and leaves no run RUNNING once `sync` has run.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from prunelab import checkpoints, cli, paths
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.tracking.spool import RESERVE_BYTES, Spool
from prunelab.tracking.spool_writer import SpoolWriter

SECRET = "secret-from-outside-the-spool-folder"


@pytest.fixture
def spool_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PRUNELAB_SPOOL", str(tmp_path / "spool"))
    return tmp_path / "spool"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file of the user's that is no part of any spool folder."""
    path = tmp_path / "private" / "notes.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def experiment_name(request) -> str:
    return f"test-sync-{request.node.name}".replace("[", "-").replace("]", "")[:80] + f"-{uuid.uuid4().hex[:6]}"


def make_spool(tracking_uri: str, experiment: str, run_id: str | None = None) -> Spool:
    """A spooled train run as a stage leaves it: params, metrics, a text artifact, a round
    model and the final one, a child run with a file; closed FINISHED."""
    spooled = SpoolWriter.create(tracking_uri=tracking_uri, experiment=experiment, run_id=run_id or uuid.uuid4().hex,
                           run_name="train-t0", stage="train", params={"train.epochs": "2"},
                           tags={paths.TAG_STUDY: experiment}, reason="nothing answers there (ConnectionRefusedError)")
    spooled.add_metrics([("test_accuracy", 0.5 + 0.1 * step, 1_700_000_000_000 + step, step) for step in (1, 2)])
    spooled.add_text("a summary", paths.SUMMARY_BEFORE)
    torch.manual_seed(0)
    example = torch.rand(2, 1, 28, 28)
    spooled.add_model(SimpleCNN(channels=[3, 5]), paths.round_model(1), example, final=False, step=1)
    spooled.add_model(SimpleCNN(channels=[3, 5]), paths.MODEL, example, final=True, step=2)
    child_file = spooled.folder.parent / "weights.txt"
    child_file.write_text("child weights")
    spooled.add_child("merge-keep0.5-t0", {paths.TAG_STAGE: "prune"}, {"keep": 0.5}, {"test_accuracy": 0.25}, 0,
                      [child_file])
    child_file.unlink()
    spooled.close("FINISHED")
    return spooled


def edit_record(spooled: Spool, change) -> None:
    record = json.loads((spooled.folder / "run.json").read_text())
    change(record)
    (spooled.folder / "run.json").write_text(json.dumps(record))


def sync(capsys, *args: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = cli.main(["sync", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_refused(code: int, err: list[str], expected: str, client, experiment: str) -> None:
    assert leaked(client, experiment) == []
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunelab: error: "), err
    assert expected in err[0], err[0]
    # Refused before any run: sync creates a new run's experiment only once the folder passed.
    assert client.get_experiment_by_name(experiment) is None


def leaked(client, experiment: str) -> list[str]:
    """The runs of `experiment` (child runs too) holding an artifact with the outside file's text."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r.info.run_id for r in runs if any(SECRET in text for text in uploaded_texts(client, r.info.run_id))]


def uploaded_texts(client, run_id: str, folder: str = "") -> list[str]:
    """The text of every artifact of a run, read back from the server."""
    out = []
    for item in client.list_artifacts(run_id, folder or None):
        if item.is_dir:
            out += uploaded_texts(client, run_id, item.path)
        else:
            out.append(Path(client.download_artifacts(run_id, item.path)).read_bytes().decode("latin-1"))
    return out


# --------------------------------------------------------------------------- files from outside the folder

def _child_file_climbs_out(spooled: Spool, outside: Path) -> None:
    climb = os.path.relpath(outside, spooled.folder / "children" / "0")
    edit_record(spooled, lambda r: r["children"][0].update(files=[climb]))


def _child_file_absolute(spooled: Spool, outside: Path) -> None:
    edit_record(spooled, lambda r: r["children"][0].update(files=[str(outside)]))


def _artifact_link(spooled: Spool, outside: Path) -> None:
    os.symlink(outside, spooled.folder / "artifacts" / "notes.txt")


def _artifact_folder_link(spooled: Spool, outside: Path) -> None:
    os.symlink(outside.parent, spooled.folder / "artifacts" / "more")


def _artifact_hard_link(spooled: Spool, outside: Path) -> None:
    os.link(outside, spooled.folder / "artifacts" / "notes.txt")


def _checkpoint_link(spooled: Spool, outside: Path) -> None:
    # A checkpoint of the attacker's choosing, kept outside, in the model's place.
    theirs = outside.parent / "theirs.pt"
    checkpoints.save(SimpleCNN(channels=[3, 5]), theirs)
    target = spooled.folder / "models" / paths.MODEL / paths.CHECKPOINT
    target.unlink()
    os.symlink(theirs, target)


def _model_name_climbs_out(spooled: Spool, outside: Path) -> None:
    theirs = outside.parent / "model"
    theirs.mkdir()
    checkpoints.save(SimpleCNN(channels=[3, 5]), theirs / paths.CHECKPOINT)
    torch.save(torch.rand(2, 1, 28, 28), theirs / "example.pt")
    climb = os.path.relpath(theirs, spooled.folder / "models")
    edit_record(spooled, lambda r: r["models"][1].update(name=climb))


def _record_link(spooled: Spool, outside: Path) -> None:
    theirs = outside.parent / "run.json"
    theirs.write_text((spooled.folder / "run.json").read_text())
    (spooled.folder / "run.json").unlink()
    os.symlink(theirs, spooled.folder / "run.json")


TAMPERED = {
    "child-file-climbs-out": (_child_file_climbs_out, "children[0].files is"),
    "child-file-absolute": (_child_file_absolute, "children[0].files is"),
    "artifact-link": (_artifact_link, "is a symbolic link"),
    "artifact-folder-link": (_artifact_folder_link, "is a symbolic link"),
    "artifact-hard-link": (_artifact_hard_link, "(a hard link)"),
    "checkpoint-link": (_checkpoint_link, "is a symbolic link"),
    "model-name-climbs-out": (_model_name_climbs_out, "models[1].name is"),
    "record-link": (_record_link, "is a symbolic link"),
}


@pytest.mark.parametrize("how", TAMPERED, ids=list(TAMPERED))
def test_sync_reads_nothing_outside_its_folder(how, tracking_uri, client, spool_dir, outside, capsys, request):
    experiment = experiment_name(request)
    spooled = make_spool(tracking_uri, experiment)
    tamper, expected = TAMPERED[how]
    tamper(spooled, outside)
    code, _, err = sync(capsys, str(spooled.folder))
    assert_refused(code, err, expected, client, experiment)
    assert SECRET not in err[0]


def test_a_refused_folder_leaves_its_run_untouched(tracking_uri, client, spool_dir, outside, capsys, request):
    """The run the folder was spooled from (FAILED, as the stage left it) keeps its state."""
    experiment = experiment_name(request)
    experiment_id = client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name="train-t0").info.run_id
    client.set_terminated(run_id, "FAILED")
    spooled = make_spool(tracking_uri, experiment, run_id)
    _artifact_link(spooled, outside)
    code, _, err = sync(capsys, str(spooled.folder))
    assert leaked(client, experiment) == []
    assert code == 2 and len(err) == 1 and "is a symbolic link" in err[0]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert paths.TAG_SYNCED_FROM not in run.data.tags and not run.data.params and not run.data.metrics
    assert client.list_artifacts(run_id) == []
    assert len(client.search_runs([experiment_id])) == 1


def test_a_folder_cannot_rewrite_a_finished_run(tracking_uri, client, spool_dir, capsys, request):
    """A folder naming a run that finished on the server (someone else's, say) is refused;
    that run keeps its status, params and artifacts."""
    experiment = experiment_name(request)
    experiment_id = client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name="finetune-t0").info.run_id
    client.log_param(run_id, "train.epochs", "30")
    client.set_terminated(run_id, "FINISHED")
    spooled = make_spool(tracking_uri, experiment, run_id)
    edit_record(spooled, lambda r: r.update(status="FAILED"))
    code, _, err = sync(capsys, str(spooled.folder))
    assert code == 2 and len(err) == 1 and f"run {run_id}" in err[0] and "finished on the server without it" in err[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.epochs": "30"}
    assert client.list_artifacts(run_id) == [] and paths.TAG_SYNCED_FROM not in run.data.tags


# --------------------------------------------------------------------------- the server is the user's

class Listener:
    """A web server that only counts what reaches it."""

    def __init__(self):
        self.requests = []
        seen = self.requests

        class Count(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                self.send_response(200)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Count)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def test_sync_talks_only_to_the_users_server(tracking_uri, client, spool_dir, capsys, request):
    """A folder whose record names another server is uploaded to the user's own (the
    environment's here), and that other server hears nothing; it is only mentioned."""
    listener = Listener()
    try:
        experiment = experiment_name(request)
        spooled = make_spool(listener.uri, experiment)
        code, out, err = sync(capsys, str(spooled.folder))
        assert code == 0, err
        assert listener.requests == []
        (line,) = out.strip().splitlines()[-1:]
        run_id = json.loads((spooled.folder / "run.json").read_text())["synced_to"]
        assert line.startswith(f"prunelab: synced {spooled.folder} to run {run_id} on {tracking_uri}")
        assert f"the folder names {listener.uri}" in line
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        listener.httpd.shutdown()


# --------------------------------------------------------------------------- records of the wrong shape

def _record(change):
    return lambda spooled: edit_record(spooled, change)


def _metrics(lines: list[str]):
    def write(spooled: Spool) -> None:
        (spooled.folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return write


def _replace(relative: str, content: bytes):
    def write(spooled: Spool) -> None:
        (spooled.folder / relative).write_bytes(content)
    return write


GOOD_METRIC = json.dumps({"key": "test_accuracy", "value": 0.5, "timestamp": 1, "step": 1})
MALFORMED = {
    "key-missing": (_record(lambda r: r.pop("status")), "status is missing"),
    "status-unknown": (_record(lambda r: r.update(status="DONE-ISH")), "status is \"DONE-ISH\""),
    "run-id-a-path": (_record(lambda r: r.update(run_id="../../etc")), "run_id is"),
    "models-not-a-list": (_record(lambda r: r.update(models={"name": "model"})), "models is"),
    "children-not-a-list": (_record(lambda r: r.update(children="none")), "children is"),
    "model-without-name": (_record(lambda r: r["models"][0].pop("name")), "models[0].name is missing"),
    "model-step-text": (_record(lambda r: r["models"][0].update(step="1")), "models[0].step is"),
    "params-not-texts": (_record(lambda r: r.update(params={"lr": 0.1})), "params is"),
    "child-metric-text": (_record(lambda r: r["children"][0].update(metrics={"acc": "high"})), "children[0].metrics is"),
    "child-files-text": (_record(lambda r: r["children"][0].update(files="weights.txt")), "children[0].files is"),
    "end-time-text": (_record(lambda r: r.update(end_time="yesterday")), "end_time is"),
    "synced-not-a-list": (_record(lambda r: r.update(synced="all")), "synced is"),
    "server-two-lines": (_record(lambda r: r.update(tracking_uri="http://a\nhttp://b")), "tracking_uri is"),
    "record-a-list": (lambda s: (s.folder / "run.json").write_text("[1, 2]"), "is not a prunelab spool record"),
    "metric-value-text": (_metrics([GOOD_METRIC, GOOD_METRIC.replace("0.5", '"high"')]), "line 2 is not a spooled metric: value is"),
    "metric-step-text": (_metrics([GOOD_METRIC.replace('"step": 1', '"step": "1"')]), "line 1 is not a spooled metric: step is"),
    "metric-key-missing": (_metrics([json.dumps({"value": 1.0, "timestamp": 1, "step": 1})]), "key is missing"),
    "metric-line-junk": (_metrics(["junk", GOOD_METRIC]), "line 1 is not a spooled metric"),
    "checkpoint-junk": (_replace(f"models/{paths.MODEL}/{paths.CHECKPOINT}", b"not a checkpoint"), "is not a plain weights file"),
    "example-misfit": (lambda s: torch.save(torch.rand(2, 3, 8, 8), s.folder / "models" / paths.MODEL / "example.pt"),
                       "does not take its own example input"),
    "named-file-missing": (lambda s: (s.folder / "children" / "0" / "weights.txt").unlink(), "is missing"),
}


@pytest.mark.parametrize("damage", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_folder_is_refused_before_any_run(damage, tracking_uri, client, spool_dir, capsys, request):
    experiment = experiment_name(request)
    spooled = make_spool(tracking_uri, experiment)
    change, expected = MALFORMED[damage]
    change(spooled)
    code, _, err = sync(capsys, str(spooled.folder))
    assert_refused(code, err, expected, client, experiment)


def test_a_refusal_mid_upload_ends_the_run_failed(tracking_uri, client, spool_dir, capsys, request):
    """A record the server refuses part of (a param name longer than MLflow allows) passes the
    folder's checks; the upload stops in one line and the run it opened is FAILED, not RUNNING."""
    experiment = experiment_name(request)
    spooled = make_spool(tracking_uri, experiment)
    edit_record(spooled, lambda r: r["params"].update({"p" * 300: "1"}))
    code, _, err = sync(capsys, str(spooled.folder))
    assert code == 2 and len(err) == 1 and "the server refused part of" in err[0], err
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


# --------------------------------------------------------------------------- models of the synced run

@pytest.mark.parametrize("server_has_run", [True, False], ids=["run-on-server", "run-new"])
def test_synced_models_are_the_runs_own(server_has_run, tracking_uri, client, spool_dir, capsys, request):
    """Every model sync logs is a model of the synced run, in its experiment (not of no run in
    Default); a round model the outage left PENDING in the run's experiment is replaced."""
    experiment = experiment_name(request)
    run_id = pending = None
    if server_has_run:
        experiment_id = client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name="train-t0").info.run_id
        # What an outage in the middle of logging a round model leaves on the server.
        pending = client.create_logged_model(experiment_id, name=paths.round_model(1), source_run_id=run_id).model_id
        client.set_terminated(run_id, "FAILED")
    started = int(time.time() * 1000)
    spooled = make_spool(tracking_uri, experiment, run_id)
    code, _, err = sync(capsys, str(spooled.folder))
    assert code == 0, err
    synced = json.loads((spooled.folder / "run.json").read_text())["synced_to"]
    assert synced == run_id if server_has_run else synced != spooled.record["run_id"]
    run = client.get_run(synced)
    assert run.info.status == "FINISHED"
    experiment_id = run.info.experiment_id
    logged = client.search_logged_models([experiment_id])
    assert sorted((m.name, str(m.status)) for m in logged) == [(paths.MODEL, "READY"), (paths.round_model(1), "READY")]
    for m in logged:
        model = client.get_logged_model(m.model_id)
        assert model.source_run_id == synced and model.experiment_id == experiment_id
    assert run.data.tags[paths.TAG_MODEL_URI] == f"models:/{[m for m in logged if m.name == paths.MODEL][0].model_id}"
    if pending:
        assert pending not in {m.model_id for m in logged}
    # Nothing of this sync went anywhere else (MLflow's Default experiment, a model of no run).
    elsewhere = client.search_logged_models([e.experiment_id for e in client.search_experiments()
                                             if e.experiment_id != experiment_id],
                                            filter_string=f"creation_time >= {started}")
    assert [m for m in elsewhere if m.name in (paths.MODEL, paths.round_model(1)) and not m.source_run_id] == []
    (child,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{synced}'")
    assert uploaded_texts(client, child.info.run_id) == ["child weights"]


# --------------------------------------------------------------------------- a disk that fills up

class Cable:
    """A TCP relay in front of the session's MLflow server: a stage talking through it sees
    the server go away when it is unplugged (its port then refuses connections)."""

    def __init__(self, server_uri: str):
        self.upstream = ("127.0.0.1", int(server_uri.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(self.upstream)
            self.sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def unplug(self) -> None:
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 8 MiB (mounting needs root; elsewhere the test skips)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def leave_free(folder: Path, free: int) -> None:
    """Fill the disk holding `folder` until only `free` bytes are left."""
    stats = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        left = stats.f_bavail * stats.f_frsize - free
        while left > 0:
            left -= f.write(bytes(min(left, 1 << 20)))


# A stage in a process of its own: it logs through the cable, waits while the test unplugs
# it and fills the disk, then buffers 990 metrics and logs its final model.
STAGE = """
import sys, torch
from prunelab.errors import PrunelabError
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.tracking import connection, run as tracking_run
connection.connect(sys.argv[1])
torch.manual_seed(0)
model = SimpleCNN(channels=[4, 6])
try:
    with tracking_run.start_run(sys.argv[2], "train", {}) as run:
        run.log_params({"train.epochs": 99})
        run.log_metrics({"test_accuracy": 0.1}, step=0)
        print(run.run_id, flush=True)
        sys.stdin.readline()
        for step in range(1, 100):
            run.log_metrics({f"m{j}": step + j / 10 for j in range(10)}, step=step, flush=False)
        run.log_model(model, "model", torch.rand(2, 1, 28, 28), step=99, final=True, checkpoint=model)
except PrunelabError as exc:
    print(f"prunelab: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def stage_on_a_full_disk(tracking_uri: str, small_disk: Path, experiment: str, free: int) -> tuple[int, str, str]:
    """Run STAGE with its spool on `small_disk`, unplug its server and leave `free` bytes;
    returns (exit code, its stderr, its run id)."""
    cable = Cable(tracking_uri)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")},
           "PRUNELAB_SPOOL": str(small_disk), "PRUNELAB_TRACKING_PATIENCE": "8",
           "MLFLOW_LOGGING_LEVEL": "WARNING"}  # as the CLI sets it: only our line on stderr
    stage = subprocess.Popen([sys.executable, "-c", STAGE, cable.uri, experiment], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_id = stage.stdout.readline().strip()
        assert run_id, stage.communicate(timeout=60)[1][-2000:]
        cable.unplug()
        leave_free(small_disk, free)
        _, err = stage.communicate("go\n", timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    return stage.returncode, err, run_id


@pytest.mark.parametrize("room", ["model", "nothing"])
def test_a_full_disk_keeps_the_model_first_and_leaves_nothing_running(room, tracking_uri, client, small_disk, tmp_path,
                                                                       capsys, request):
    """The server goes away, then the spool's disk fills up. With room for the model but not
    the metrics buffered before it, the model is kept; with room for neither, the run's
    params are. Either way the stage ends in one line naming what was kept, run.json says
    how it ended, and `sync` leaves the run FAILED with what there was, not RUNNING."""
    model_bytes = checkpoints.save(SimpleCNN(channels=[4, 6]), tmp_path / "size.pt").stat().st_size
    # Room for the spool's reserve and record, plus the model or not; never for the 990 metrics (~85 KB).
    free = RESERVE_BYTES + 48 * 1024 + (model_bytes if room == "model" else 0)
    code, err, run_id = stage_on_a_full_disk(tracking_uri, small_disk, experiment_name(request), free)
    assert code == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err
    (line,) = err.strip().splitlines()
    assert "then the disk filled up" in line and "could not be kept; the run ended FAILED" in line, line
    kept = "only its params and the model model are kept in" if room == "model" else "only its params are kept in"
    assert kept in line, line
    folder = Path(re.search(r" are kept in (\S+): free some space", line).group(1))
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "FAILED" and record["full"]
    assert client.get_run(run_id).info.status == "RUNNING"  # the server was away when the stage ended

    code, _, sync_err = sync(capsys, str(folder))
    assert code == 0, sync_err
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["train.epochs"] == "99"
    assert "the disk filled up" in run.data.tags[paths.TAG_OUTAGE]
    if room == "model":
        model_id = run.data.tags[paths.TAG_MODEL_URI].removeprefix("models:/")
        assert client.get_logged_model(model_id).source_run_id == run_id
        assert paths.CHECKPOINT in {a.path for a in client.list_artifacts(run_id)}
    else:
        assert paths.TAG_MODEL_URI not in run.data.tags


def test_no_room_even_for_the_spool_is_one_line(tracking_uri, small_disk, request):
    """A disk without room for a spool at all: the stage still ends in one line, saying that
    only what the server got is kept."""
    code, err, _ = stage_on_a_full_disk(tracking_uri, small_disk, experiment_name(request), 0)
    assert code == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err
    assert "and the run cannot be kept on disk either" in err and "only what the server got before is kept" in err
