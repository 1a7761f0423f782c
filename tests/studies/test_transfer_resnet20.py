"""The transfer_pruning study with the pretrained CIFAR-10 ResNet20 through the real
tracking server: the head on frozen features learns dogs vs cats, and Taylor pruning
removes block-internal channels only, leaving every residual width as it was."""

from __future__ import annotations

import pytest

from prunelab import data, models, paths, studies
from prunelab.tracking import loading, query
from prunelab.models.resnet_cifar import STAGE_WIDTHS
from prunelab.studies import transfer_pruning as transfer_stages
from prunelab.train import evaluate

STEP = 16  # filters removed per step
QUICK = ["data.n_train=200", "data.n_test=100", "trials=1", "train.epochs=10", f"prune.filters_per_step={STEP}",
         "prune.target=0.85", "prune.finetune_epochs_between=1", "prune.rank_images=100", "prune.latency_repeats=3"]

pytestmark = pytest.mark.slow  # two stages of a ResNet20 on 300 images and three model uploads


@pytest.fixture(scope="module")
def study(dogs_cats_dir, resnet20_file, tracking_uri, tmp_path_factory):
    """One trial at test scale: transfer from the reference checkpoint, then pruning to 85 % of the parameters."""
    import os

    os.environ.setdefault("PRUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = studies.load_config("taylor-resnet20-dogscats", QUICK + [
        "study=test-resnet20-transfer", f"data.data_dir={dogs_cats_dir}", f"transfer.weights={resnet20_file}"])
    train_id = transfer_stages.train(cfg, 0)
    return cfg, train_id, transfer_stages.prune(cfg, 0, train_id)


def history(run_id, key):
    return [v for _, v in query.metric_history(run_id, key)]


def test_the_head_on_frozen_pretrained_features_learns(study, client, resnet20_file):
    """The features come from the checkpoint, the head is one Linear(64, 2), and it classifies
    the held-out images well above chance (100 images: chance is 0.50 +- 0.05)."""
    cfg, train_id, _ = study
    run = client.get_run(train_id)
    assert run.data.params["weights_source"] == str(resnet20_file)
    assert history(train_id, "params") == [models.count_params(models.get("resnet20", num_classes=2))]
    assert history(train_id, "params")[0] == 269_722 - 65 * 10 + 65 * 2  # the CIFAR-10 head swapped for a 2-class one
    accuracy = history(train_id, "test_accuracy")
    assert len(accuracy) == cfg.train.epochs and accuracy[-1] >= 0.7


def test_pruning_removes_block_internal_channels_only(study, client):
    """Only the blocks' first convs lose filters: the stem, every block's second conv, the
    shortcuts' sums and the head keep their widths; the counts add up step by step, and the
    logged size and accuracy are those of the network the run saved."""
    cfg, _, prune_id = study
    logged = {k for k in client.get_run(prune_id).data.metrics if k.startswith("filters_left.")}
    assert logged == {f"filters_left.layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)}
    filters = history(prune_id, "filters")
    assert filters[0] == 3 * sum(STAGE_WIDTHS) and len(filters) >= 2
    drops = [a - b for a, b in zip(filters, filters[1:])]
    assert all(d == STEP for d in drops[:-1]) and 1 <= drops[-1] <= STEP

    pruned = loading.load_model(prune_id)  # the weights-only checkpoint, rebuilt from its spec
    assert sum(pruned.spec()["mid_widths"]) == filters[-1] < filters[0]
    assert pruned.conv1.out_channels == 16 and pruned.linear.in_features == 64
    for (name, block), width in zip(pruned.blocks(), [w for w in STAGE_WIDTHS for _ in range(3)]):
        mid = block.conv1.out_channels
        assert history(prune_id, f"filters_left.{name}.conv1")[-1] == mid
        assert block.bn1.num_features == block.conv2.in_channels == mid
        assert block.conv2.out_channels == block.bn2.num_features == width, name  # the residual width

    assert history(prune_id, "params")[-1] == models.count_params(pruned)
    # The last step stops within one filter of the target: a layer3 filter is its conv1 row, its
    # two BatchNorm numbers and its conv2 column, 2 * 64 * 3 * 3 + 2 = 1,154 parameters, the most any filter holds.
    params = history(prune_id, "params")
    assert cfg.prune.target * params[0] - 1_154 < params[-1] <= cfg.prune.target * params[0]
    images = data.get(cfg.data)
    accuracy = evaluate(pruned, images.test_x, images.test_y, images.normalise)["accuracy"]
    assert accuracy == pytest.approx(history(prune_id, "test_accuracy")[-1], abs=1e-6)
    assert client.get_run(prune_id).data.tags[paths.TAG_MODEL_URI]


def test_the_report_names_the_block_convs_and_holds_the_logged_numbers(study, client, tmp_path):
    """The report draws from the prune run alone (no finetune run yet): its table's sizes and
    filter counts, in total and per block conv, are the logged ones; its accuracy figure does
    not call the pretrained features random."""
    import pandas as pd

    cfg, _, prune_id = study
    studies.report(cfg, tmp_path)
    figures, _ = transfer_stages.report(cfg)
    assert "random features" not in figures["accuracy_vs_params_removed.png"].axes[0].get_title()  # pretrained
    assert {"accuracy_vs_params_removed.png", "filters_left.png"} <= {p.name for p in tmp_path.iterdir()}
    table = pd.read_csv(tmp_path / paths.REPORT_TABLE)
    assert list(table["model"]) == ["before pruning (transfer only)", "pruned, before fine-tuning"]
    assert table["params"].tolist() == [history(prune_id, "params")[0], history(prune_id, "params")[-1]]
    assert table["filters"].tolist() == [history(prune_id, "filters")[0], history(prune_id, "filters")[-1]]
    for s, i in ((1, 0), (3, 2)):  # the layers' own columns: what each kept, as logged
        name = f"layer{s}.{i}.conv1"
        assert table[name].tolist() == [STAGE_WIDTHS[s - 1], history(prune_id, f"filters_left.{name}")[-1]]
    assert transfer_stages._layer_keys({0: client.get_run(prune_id)})[:4] == [
        "filters_left.layer1.0.conv1", "filters_left.layer1.1.conv1", "filters_left.layer1.2.conv1", "filters_left.layer2.0.conv1"]


def test_evaluate_of_the_pruned_run_resizes_as_the_run_did(study, client, capsys):
    """The run read its images at data.image_size=32; `prunelab evaluate <run id>` on the same
    folder resizes them the same way unasked and prints what the run logged (read at their
    own size, they would score near chance). Another size that the model cannot take is one line."""
    import json

    from prunelab import cli

    cfg, _, prune_id = study
    assert cfg.data.image_size == 32
    logged = history(prune_id, "test_accuracy")[-1]
    assert cli.main(["evaluate", prune_id]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 100 and printed["accuracy"] == pytest.approx(logged, abs=1e-6)
