"""The k-means study against a real MLflow server: one child run per sweep
point, merge runs with a reloadable smaller model, the report, and `mlflow run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from prunelab import checkpoints, studies
from prunelab.tracking import query
from prunelab.studies import kmeans_clustering
from prunelab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def tiny(study: str, weights: Path, extra: list[str] = ()) -> list[str]:
    """The study at test scale: 100 test images, a few points of each sweep."""
    return [f"study={study}", f"kmeans.weights={weights}", "data.n_test=100", "kmeans.stages=[layer1]",
            "kmeans.stage_pruned=[0,8,16]", "kmeans.layers=[conv1,layer3.0.conv1]", "kmeans.layer_pruned=[0,15]",
            "kmeans.merge_keep=[1.0,0.5]", "kmeans.latency_repeats=3", "kmeans.latency_batch=4", "kmeans.n_init=2",
            *extra]


@pytest.mark.slow
def test_sweep_logs_one_child_run_per_point(tracking_uri, client, cifar_dir, resnet20_file, tmp_path):
    """Each sweep point is a finished child run with the shared tags and params; K = C scores
    as the original; merge runs log smaller params/MACs and a checkpoint that reloads; the report draws both figures."""
    cfg = studies.load_config("kmeans-resnet20-cifar10", tiny("test-kmeans-sweep", resnet20_file, [f"data.data_dir={cifar_dir}"]))
    parent_id = kmeans_clustering.sweep(cfg, trial=1)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "prune"
    children = query.find_runs(cfg.study, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    points = sorted((r.data.params["sweep"], r.data.params["target"], r.data.params.get("clusters_pruned", r.data.params.get("keep")))
                    for r in children)
    # stage_pruned 16 is skipped for layer1 (16 filters: K would be 0)
    assert points == sorted([("stage", "layer1", "0"), ("stage", "layer1", "8"), ("layer", "conv1", "0"),
                             ("layer", "conv1", "15"), ("layer", "layer3.0.conv1", "0"), ("layer", "layer3.0.conv1", "15"),
                             ("merge", "blocks", "1.0"), ("merge", "blocks", "0.5")])
    base = parent.data.metrics["test_accuracy"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert {r.data.tags[k] for k in ("study", "trial", "seed", "stage")} == {cfg.study, "1", "1", "prune"}
        assert r.data.params["model"] == "resnet20" and r.data.params["method"] == "kmeans"
        if r.data.params.get("clusters_pruned") == "0":
            assert r.data.metrics["test_accuracy"] == base
    # the parent carries each target's series with step = clusters pruned
    series = query.metric_history(parent_id, "test_accuracy.layer.layer3.0.conv1")
    assert [s for s, _ in series] == [0, 15]

    merges = {r.data.params["keep"]: r for r in children if r.data.params["sweep"] == "merge"}
    full, half = merges["1.0"].data.metrics, merges["0.5"].data.metrics
    assert full["params"] == full["params_before"] and full["max_abs_diff_original"] < 1e-3
    assert half["params"] < 0.55 * half["params_before"] and half["macs"] < 0.55 * half["macs_before"]
    assert half["max_abs_diff_centroid"] < 1e-3 and half["latency_ms"] > 0
    local = client.download_artifacts(merges["0.5"].info.run_id, "checkpoint.pt", str(tmp_path))
    assert checkpoints.load(local).spec()["mid_widths"] == [8, 8, 8, 16, 16, 16, 32, 32, 32]

    report_id = studies.report(cfg, tmp_path / "figures")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "accuracy_vs_clusters_pruned_per_layer.png", "accuracy_vs_clusters_pruned_per_stage.png", "report_table.csv", "report_table.md"]
    logged = {a.path for a in client.list_artifacts(report_id, "figures")}
    assert "figures/accuracy_vs_clusters_pruned_per_stage.png" in logged
    # The stage figure's second panel: the same points against the fraction of layer1's 16 filters.
    figures, _ = kmeans_clustering.report(cfg)
    by_count, by_fraction = figures["accuracy_vs_clusters_pruned_per_stage.png"].axes
    assert [list(bars.lines[0].get_xdata()) for bars in by_count.containers] == [[0, 8]]
    assert [list(bars.lines[0].get_xdata()) for bars in by_fraction.containers] == [[0.0, 0.5]]


def test_bad_names_fail_before_any_run(tracking_uri, client, cifar_dir, resnet20_file):
    """An unknown layer or stage, or missing weights, fails in one line and leaves no run behind."""
    study = "test-kmeans-bad-names"
    for extra, text in ((["kmeans.layers=[layer1.0.conv3]"], "valid ones are conv1, layer1.0.conv1"),
                        (["kmeans.stages=[layer4]"], "valid ones are layer1, layer2, layer3")):
        cfg = studies.load_config("kmeans-resnet20-cifar10", tiny(study, resnet20_file, [f"data.data_dir={cifar_dir}", *extra]))
        with pytest.raises(ConfigError, match=text):
            kmeans_clustering.sweep(cfg)
    cfg = studies.load_config("kmeans-resnet20-cifar10", tiny(study, "", [f"data.data_dir={cifar_dir}"]))
    with pytest.raises(ConfigError, match="kmeans.weights"):
        kmeans_clustering.sweep(cfg)
    assert query.find_runs(study, finished_only=False) == []


@pytest.mark.slow
def test_any_network_sweeps_and_merges_from_its_weights_file(tracking_uri, client, cifar_dir, tmp_path):
    """torchvision's MobileNetV2 from a weights file of its own (`model_weights`, a state dict as
    torchvision ships one): sweeps over a stage and a conv named as the network names them, and
    merges of the convs its graph lets merge, exact and smaller; the merged checkpoint reloads."""
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), weights)
    cfg = studies.load_config("kmeans-resnet20-cifar10", [
        "study=test-kmeans-any-network", "model=torchvision:mobilenet_v2", f"model_weights={weights}",
        f"data.data_dir={cifar_dir}", "data.n_test=100", "kmeans.stages=[features.1]", "kmeans.stage_pruned=[0,8]",
        "kmeans.layers=[features.1.conv.1]", "kmeans.layer_pruned=[8]", "kmeans.merge_keep=[0.5]",
        "kmeans.latency_repeats=3", "kmeans.latency_batch=4", "kmeans.n_init=1"])
    studies.get(cfg.kind).check_inputs(cfg)  # what `main` checks before any run
    parent_id = kmeans_clustering.sweep(cfg, trial=0)
    parent = client.get_run(parent_id)
    assert parent.data.params["input_model"] == str(weights) and parent.data.params["model"] == "torchvision:mobilenet_v2"
    children = {(r.data.params["sweep"], r.data.params["target"], r.data.params.get("clusters_pruned", r.data.params.get("keep"))): r
                for r in query.find_runs(cfg.study, f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert sorted(children) == [("layer", "features.1.conv.1", "8"), ("merge", "convs", "0.5"),
                                ("stage", "features.1", "0"), ("stage", "features.1", "8")]
    assert children["stage", "features.1", "0"].data.metrics["test_accuracy"] == parent.data.metrics["test_accuracy"]
    merge = children["merge", "convs", "0.5"]
    m = merge.data.metrics
    assert merge.data.params["mid_widths"] == "8,160"  # features.1.conv.1 (16) and features.17.conv.2 (320), halved
    assert (m["params_before"], m["params"]) == (2_236_682, 1_876_922) and m["macs"] < m["macs_before"]  # docs/models.md
    assert m["max_abs_diff_centroid"] < 1e-4
    local = client.download_artifacts(merge.info.run_id, "checkpoint.pt", str(tmp_path))
    reloaded = checkpoints.load(local, "torchvision:mobilenet_v2")
    assert reloaded.network.features[17].conv[2].out_channels == 160
    assert sum(p.numel() for p in reloaded.parameters()) == m["params"]


@pytest.mark.slow
def test_mlflow_run_main_chains_sweeps_and_report(tracking_uri, client, cifar_dir, resnet20_file, tmp_path):
    """`mlflow run . -e main` on the k-means preset runs one sweep per seed, then the report."""
    study = "test-kmeans-main"
    overrides = " ".join(tiny(study, resnet20_file, ["trials=2", "kmeans.merge_keep=[0.5]", "kmeans.layer_pruned=[15]"]))
    # MLflow exports the active experiment/run of this process; `mlflow run` must choose its own.
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env = {**inherited, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "main", "--env-manager", "local",
           "--experiment-name", study, "-P", "study=kmeans-resnet20-cifar10", "-P", f"overrides={overrides}",
           "-P", f"data_dir={cifar_dir}", "-P", f"out_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    parents = query.find_runs(study, "tags.`mlflow.project.entryPoint` = 'prune'")
    assert sorted(r.data.tags["trial"] for r in parents) == ["0", "1"]
    children = query.find_runs(study, "tags.sweep = 'layer'")
    assert len(children) == 2 * 2  # two convs at 15 clusters pruned, two seeds
    assert (tmp_path / "out" / "accuracy_vs_clusters_pruned_per_stage.png").is_file()
