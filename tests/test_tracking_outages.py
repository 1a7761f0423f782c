"""tracking against the real server: telling an MLflow server from other servers,
bounded retries, model URIs resolved without unpickling, and uploading a spooled run."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from conftest import start_foreign_server
import torch

from prunelab import cli, paths
from prunelab.errors import TrackingError
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import probe
from prunelab.tracking import connection, loading, run as tracking_run, sync as tracking_sync
from prunelab.tracking.spool_writer import SpoolWriter


@pytest.fixture
def foreign_server():
    """Python's own web server, answering 200 to every GET (/health included)."""
    uri, httpd = start_foreign_server()
    yield uri
    httpd.shutdown()


def test_probe_tells_an_mlflow_server_from_any_other(tracking_uri, foreign_server):
    assert probe.probe(tracking_uri) is None
    assert "not as an MLflow tracking server" in probe.probe(foreign_server)
    with pytest.raises(TrackingError, match="not as an MLflow tracking server"):
        connection.connect(foreign_server)
    assert "nothing answers there" in probe.probe(f"http://127.0.0.1:{probe.free_port()}")


def test_probe_keeps_its_time_limit_against_a_server_that_never_answers():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        start = time.monotonic()
        problem = probe.probe(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert problem == "no answer within 1 s"
        assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("patience", [8, 10, 30, 120])
def test_retry_settings_fit_the_patience(patience):
    """Three attempts of at most T s each and at most 5 s of backoff between them."""
    settings = connection.retry_settings(patience)
    assert settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert 3 * int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + 5 <= patience


def test_the_users_own_retry_settings_win(tracking_uri, monkeypatch):
    """`connect` fills in only the MLflow retry settings the user left unset: one the user set
    keeps its value, the others get the patience's, and MLflow's client reads them from there."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    ours = connection.retry_settings(connection.patience())
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    assert ours["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] != "4"
    connection.connect(tracking_uri)
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 4  # the user's
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == int(ours["MLFLOW_HTTP_REQUEST_TIMEOUT"])  # ours, where none was set


@pytest.mark.parametrize("other_end", ["closed port", pytest.param("silent port", marks=pytest.mark.slow)])
def test_a_call_to_a_gone_server_gives_up_within_the_patience(other_end, monkeypatch):
    """MLflow's own client, with the settings `connect` gives it, against a port nobody
    listens on and one that accepts and never answers: both fail within 30 s."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    for key, value in connection.retry_settings(connection.DEFAULT_PATIENCE).items():
        monkeypatch.setenv(key, value)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel accepts connections; nothing ever answers them
        port = silent.getsockname()[1] if other_end == "silent port" else probe.free_port()
        start = time.monotonic()
        with pytest.raises(MlflowException):
            MlflowClient(f"http://127.0.0.1:{port}").log_batch("0" * 32, metrics=[Metric("m", 1.0, 0, 0)])
        assert time.monotonic() - start <= connection.DEFAULT_PATIENCE


def test_a_model_uri_never_unpickles(tracking_uri, client):
    """The final model's URIs give the run's weights-only checkpoint (a real SimpleCNN);
    a round model is read as a pt2 archive that MLflow checked to be pickle-free. (That nothing
    is unpickled is shown where it could be: tests/test_bad_inputs.py's `evil-*` and `pt2-*`
    rows load models whose unpickling, or whose pickle_module_info.txt import, would create a
    marker file, and assert that it does not exist.)"""
    connection.connect(tracking_uri)
    torch.manual_seed(0)
    model, example = SimpleCNN(channels=[3, 5]), torch.randn(2, 1, 28, 28)
    with tracking_run.start_run("test-model-uris", "prune", {paths.TAG_STUDY: "test-model-uris"}) as run:
        round_uri = run.log_model(model, paths.round_model(1), example, step=1)
        final_uri = run.log_model(model, paths.MODEL, example, step=1, final=True, checkpoint=model)
    assert client.get_run(run.run_id).data.tags[paths.TAG_MODEL_URI] == final_uri
    for ref in (run.run_id, f"runs:/{run.run_id}/model", final_uri):
        loaded = loading.load_model(ref)
        assert type(loaded) is SimpleCNN and loaded.spec()["channels"] == [3, 5]
        assert torch.equal(loaded(example), model.eval()(example))
    traced = loading.load_model(round_uri)
    assert type(traced) is not SimpleCNN
    assert torch.allclose(traced(example), model(example), atol=1e-6)


def test_sync_uploads_a_spooled_run_the_server_never_saw(tracking_uri, client, tmp_path, monkeypatch, capsys):
    """A spool whose run the server does not know goes into a new run that says where it came from;
    its params, tags, metrics, text, model and child run all arrive; a second sync uploads nothing."""
    monkeypatch.setenv("PRUNELAB_SPOOL", str(tmp_path / "spool"))
    connection.connect(tracking_uri)
    lost = uuid.uuid4().hex
    spooled = SpoolWriter.create(tracking_uri=tracking_uri, experiment="test-sync-new-run", run_id=lost, run_name="train-t0",
                           stage="train", params={"train.epochs": "3"}, tags={paths.TAG_STUDY: "test-sync-new-run"},
                           reason="nothing answers there (ConnectionRefusedError)")
    spooled.add_metrics([("test_accuracy", 0.5 + 0.1 * step, 1_700_000_000_000 + step, step) for step in (1, 2, 3)])
    spooled.add_text("summary", paths.SUMMARY_BEFORE)
    torch.manual_seed(1)
    model = SimpleCNN(channels=[4, 6])
    spooled.add_model(model, paths.MODEL, torch.randn(2, 1, 28, 28), final=True)
    spooled.add_child("merge-keep0.5-t0", {paths.TAG_STAGE: "prune"}, {"keep": 0.5}, {"test_accuracy": 0.25}, 0, None)
    spooled.close("FINISHED")

    run_id, uploaded = tracking_sync.sync(spooled.folder)
    assert uploaded and run_id != lost
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[paths.TAG_SYNCED_RUN] == lost
    assert run.data.tags[paths.TAG_SYNCED_FROM] == str(spooled.folder.resolve())
    assert "ConnectionRefusedError" in run.data.tags[paths.TAG_OUTAGE]
    assert run.data.params["train.epochs"] == "3"
    assert [(m.step, round(m.value, 6)) for m in sorted(client.get_metric_history(run_id, "test_accuracy"), key=lambda m: m.step)] \
        == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert {a.path for a in client.list_artifacts(run_id)} >= {paths.CHECKPOINT, paths.SUMMARY_BEFORE}
    reloaded = loading.load_model(run_id)
    assert torch.equal(reloaded.state_dict()["features.0.weight"], model.state_dict()["features.0.weight"])
    (child,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.info.status == "FINISHED" and child.data.metrics["test_accuracy"] == 0.25
    assert tracking_sync.sync(spooled.folder) == (run_id, False)
    capsys.readouterr()
    assert cli.main(["sync", str(spooled.folder)]) == 0
    assert capsys.readouterr().out.strip() == f"prunelab: {spooled.folder} was already synced to run {run_id}"
