"""Any network through the default study, as a user runs it: `prunelab run --study
taylor-cnn-fashionmnist --set model=...` with real torchvision classifiers and with a
factory of the user's own, on a real FashionMNIST slice and a real MLflow server. What
the server holds is read back: the pruned model reloads as MLflow logged it (pt2 and ONNX,
pixels in [0, 1], no prunelab needed) and as its weights-only checkpoint, and both score
what the runs logged."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import pytest
import torch
from conftest import REPO, clean_env

from prunelab import cli, config, data, export, models, paths
from prunelab.models.factory import FactoryNetwork
from prunelab.tracking import loading
from prunelab.train import evaluate

pytestmark = pytest.mark.slow

QUICK = ["data.n_train=256", "data.n_test=100", "train.epochs=1", "finetune.epochs=1", "prune.rank_images=64",
         "prune.latency_repeats=0", "prune.log_models_every=100", "trials=1"]
USER_FACTORY = "tests.models.tiny_factory:build"


def run_study(tracking_uri, client, tmp_path, study: str, *settings: str) -> dict:
    """`prunelab run` of the default study with `settings`, from the repository's folder (where the
    user's factory lives); its runs by stage."""
    sets = [a for s in [*QUICK, f"study={study}", *settings] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", "--study", "taylor-cnn-fashionmnist", *sets,
                           "--out", str(tmp_path / "report")], capture_output=True, text=True,
                          env=clean_env(tracking_uri), timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = client.get_experiment_by_name(study)
    return {r.data.tags[paths.TAG_STAGE]: client.get_run(r.info.run_id) for r in client.search_runs([experiment.experiment_id])}


def last(client, run, key: str) -> float:
    return max(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step).value


def scored_images(image_size: int = 0):
    return data.get(config.DataConfig(dataset="fashionmnist", n_test=100, image_size=image_size))


def evaluated(capsys, *argv: str) -> dict:
    assert cli.main(["evaluate", *argv, "--dataset", "fashionmnist", "--n-test", "100"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def check_pruned_and_delivered(client, runs: dict, target: float) -> str:
    """The prune run thinned the network to its target; main registered the finetune run's model.
    Returns the numbers docs/models.md quotes (each test prints them last: pytest -rP shows them)."""
    prune = runs["prune"]
    assert prune.info.status == "FINISHED" and runs["finetune"].info.status == "FINISHED"
    assert last(client, prune, "fraction_remaining") <= target < 1.0
    assert int(prune.data.metrics["rounds"]) >= 1
    study = prune.data.tags[paths.TAG_STUDY]
    versions = client.search_model_versions(f"name = '{study}'")
    assert [v.run_id for v in versions] == [runs["finetune"].info.run_id]
    return (f"{prune.data.params['model']}: {int(last(client, runs['train'], 'params')):,} -> "
          f"{int(last(client, runs['finetune'], 'params')):,} params in {int(prune.data.metrics['rounds'])} round(s), "
          f"{sum(k.startswith('filters_left.') for k in prune.data.metrics)} prunable layers; "
          f"test accuracy {last(client, runs['train'], 'test_accuracy'):.4f} trained, "
          f"{last(client, prune, 'test_accuracy'):.4f} pruned, {last(client, runs['finetune'], 'test_accuracy'):.4f} fine-tuned")


def check_logged_model(client, run, d, tmp_path) -> None:
    """The run's final logged model loads without prunelab (pt2), its ONNX export agrees, and it
    scores, on pixels in [0, 1], the test accuracy the run logged last."""
    uri = run.data.tags[paths.TAG_MODEL_URI]
    module = mlflow.pytorch.load_model(uri, map_location="cpu")
    pixels = d.pixels(d.test_x)
    with torch.no_grad():
        scores = module(pixels)
    accuracy = (scores.argmax(1) == d.test_y).float().mean().item()
    assert accuracy == pytest.approx(last(client, run, "test_accuracy"), abs=1e-6)
    assert sum(p.numel() for p in module.parameters()) == last(client, run, "params")
    location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
    onnx_file = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{paths.ONNX_DIR}/{export.ONNX_FILE}",
                                                    dst_path=str(tmp_path))
    np.testing.assert_allclose(export.run(export.session(onnx_file), pixels[:7]), scores[:7].numpy(), atol=1e-4, rtol=0)


def check_checkpoint(client, run, d, name: str) -> FactoryNetwork:
    """The run's weights-only checkpoint rebuilds the pruned network of `name` at the widths the
    prune run logged, and scores what the run logged."""
    network = loading.load_model(run.info.run_id, name)
    assert isinstance(network, FactoryNetwork) and network.factory == name
    assert models.count_params(network) == last(client, run, "params")
    result = evaluate(network, d.test_x, d.test_y, d.normalise)
    assert result["accuracy"] == pytest.approx(last(client, run, "test_accuracy"), abs=1e-6)
    return network


def test_torchvision_resnet18(tracking_uri, client, fashion_dir, tmp_path, capsys):
    """ResNet-18 from scratch at 32 x 32 px (data.image_size), its grey images repeated into
    its three input channels; residual streams pruned as coupled groups."""
    runs = run_study(tracking_uri, client, tmp_path, "test-any-resnet18", "model=torchvision:resnet18",
                     "data.image_size=32", "prune.filters_per_step=400", "prune.target=0.85")
    summary = check_pruned_and_delivered(client, runs, 0.85)
    d = scored_images(32)
    check_logged_model(client, runs["prune"], d, tmp_path)
    check_logged_model(client, runs["finetune"], d, tmp_path)
    network = check_checkpoint(client, runs["finetune"], d, "torchvision:resnet18")
    widths = {k.removeprefix("filters_left."): v for k, v in runs["prune"].data.metrics.items() if k.startswith("filters_left.")}
    assert {n: getattr(network.get_submodule(n), "out_channels") for n in widths} == widths
    assert network.network.fc.out_features == 10 and network.channels == 3
    # `prunelab evaluate RUN_ID` scores the checkpoint the same (a torchvision name imports no user code),
    # on images resized to 32 px as the run read them, unasked.
    result = evaluated(capsys, runs["finetune"].info.run_id)
    assert result["accuracy"] == pytest.approx(last(client, runs["finetune"], "test_accuracy"), abs=1e-6)
    print(summary)


def test_torchvision_mobilenet_v2(tracking_uri, client, fashion_dir, tmp_path):
    """MobileNetV2: depthwise convs pruned together with the conv before them, inverted residuals
    as coupled groups, at FashionMNIST's own 28 x 28 px."""
    runs = run_study(tracking_uri, client, tmp_path, "test-any-mobilenet-v2", "model=torchvision:mobilenet_v2",
                     "prune.filters_per_step=600", "prune.target=0.85", "prune.method=l1")
    summary = check_pruned_and_delivered(client, runs, 0.85)
    d = scored_images()
    check_logged_model(client, runs["finetune"], d, tmp_path)
    check_checkpoint(client, runs["finetune"], d, "torchvision:mobilenet_v2")
    print(summary)


def test_torchvision_regnet(tracking_uri, client, fashion_dir, tmp_path):
    """RegNetX-400MF at 28 x 28 px: its grouped convs keep their channels (only whole conv groups
    could go), so the stem and the residual streams are pruned, at multiples of prune.round_to."""
    runs = run_study(tracking_uri, client, tmp_path, "test-any-regnet", "model=torchvision:regnet_x_400mf",
                     "prune.filters_per_step=64", "prune.target=0.85", "prune.round_to=8")
    summary = check_pruned_and_delivered(client, runs, 0.85)
    widths = {k: v for k, v in runs["prune"].data.metrics.items() if k.startswith("filters_left.")}
    assert widths and all(v % 8 == 0 for v in widths.values()), widths
    d = scored_images()
    check_logged_model(client, runs["finetune"], d, tmp_path)
    check_checkpoint(client, runs["finetune"], d, "torchvision:regnet_x_400mf")
    print(summary)


def test_a_factory_of_the_users_own(tracking_uri, client, fashion_dir, tmp_path, capsys):
    """`model=tests.models.tiny_factory:build` through train -> prune -> finetune -> register; its
    checkpoint loads only when the user names the factory again."""
    runs = run_study(tracking_uri, client, tmp_path, "test-any-user-factory", f"model={USER_FACTORY}",
                     "prune.filters_per_step=2", "prune.target=0.8")
    summary = check_pruned_and_delivered(client, runs, 0.8)
    assert runs["train"].data.params["model"] == USER_FACTORY
    d = scored_images()
    check_logged_model(client, runs["finetune"], d, tmp_path)
    check_checkpoint(client, runs["finetune"], d, USER_FACTORY)
    run_id = runs["finetune"].info.run_id
    # The run's files name the factory, but never make prunelab import it: the user does, with --model.
    assert cli.main(["evaluate", run_id, "--dataset", "fashionmnist"]) == 2
    refused = capsys.readouterr().err.strip()
    assert refused.startswith("prunelab: error: ") and f"name that factory (--model {USER_FACTORY};" in refused
    result = evaluated(capsys, run_id, "--model", USER_FACTORY)
    assert result["accuracy"] == pytest.approx(last(client, runs["finetune"], "test_accuracy"), abs=1e-6)
    print(summary)
