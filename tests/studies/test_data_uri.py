"""A data folder given as a URI: the step downloads it where it runs (on a cluster, in the
Job's pod) through MLflow's artifact repositories, reads it, and removes the download."""

from __future__ import annotations

from prunelab import cli


def test_a_data_set_on_the_tracking_server_trains_a_step(tracking_uri, client, fashion_dir, tmp_path, monkeypatch):
    """FashionMNIST's files stored as a run's artifacts on the server, named by `runs:/…`."""
    holder = client.create_run(client.create_experiment("test-data-uri-store")).info.run_id
    client.log_artifacts(holder, str(fashion_dir), "fashion-mnist")
    client.set_terminated(holder)
    uri = f"runs:/{holder}/fashion-mnist"
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(cache))
    study = "test-data-uri"
    assert cli.main(["train", "--data-dir", uri, "--overrides",
                     f"study={study} trials=1 data.n_train=600 data.n_test=200 train.epochs=1"]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.data_dir"] == uri
    assert 0.1 < run.data.metrics["test_accuracy"] <= 1
    assert not list(cache.glob("fetched-*")), "the download was left behind"
