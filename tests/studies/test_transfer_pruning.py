"""The transfer_pruning study through the real tracking server: transfer, iterative
Taylor pruning of VGG16's convs, fine-tuning, the report, and a bad target."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from prunelab import data, paths, studies
from prunelab.tracking import loading, query
from prunelab.studies import transfer_pruning as transfer_stages
from prunelab.errors import ConfigError

STEP = 100  # filters removed per step
QUICK = ["data.image_size=32", "data.n_train=64", "data.n_test=32", "data.augment=false", "trials=1",
         "transfer.pretrained=false", "transfer.head_width=32", "transfer.feature_batch_size=32",
         "train.epochs=2", "train.optimizer=adam", "train.lr=0.001", "finetune.epochs=1", "finetune.batch_size=32",
         f"prune.filters_per_step={STEP}", "prune.target_kind=filters", "prune.target=0.96",
         "prune.finetune_epochs_between=1", "prune.rank_images=32", "prune.rank_batch_size=32",
         "prune.latency_repeats=3"]

pytestmark = pytest.mark.slow  # three stages of a VGG16 and five model uploads: about a minute on 2 cores


@pytest.fixture(scope="module")
def study(dogs_cats_dir, tracking_uri, tmp_path_factory):
    """One trial of the study at test scale: train -> prune (two steps) -> finetune."""
    import os

    os.environ.setdefault("PRUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = studies.load_config("taylor-vgg16-dogscats", QUICK + ["study=test-vgg-pipeline", f"data.data_dir={dogs_cats_dir}"])
    train_id = transfer_stages.train(cfg, 0)
    prune_id = transfer_stages.prune(cfg, 0, train_id)
    finetune_id = transfer_stages.finetune(cfg, 0, prune_id)
    return cfg, train_id, prune_id, finetune_id


def history(run_id, key):
    return query.metric_history(run_id, key)


def test_transfer_run_logs_size_latency_and_the_head_curve(study, client):
    """The train run carries the weights' source, the whole model's size, latency and per-epoch accuracy."""
    cfg, train_id, _, _ = study
    run = client.get_run(train_id)
    assert run.data.params["weights_source"] == "random"
    assert run.data.tags[paths.TAG_STAGE] == "train"
    assert history(train_id, "params")[0][1] == 14_714_688 + (25088 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert [s for s, _ in history(train_id, "test_accuracy")] == [1, 2]
    assert history(train_id, "latency_ms")[0][1] > 0 and history(train_id, "skipped_images")[0][1] == 0


def test_each_step_removes_exactly_the_asked_number_of_filters(study, client):
    """filters drops by prune.filters_per_step per step but the last, which takes only as many as
    reach the target, the per-layer counts add up, the head's input shrinks with the last conv,
    and accuracy is logged before and after retraining."""
    cfg, _, prune_id, _ = study
    filters = [v for _, v in history(prune_id, "filters")]
    # 4224 -> 4124, then 69 filters, the fewest that leave <= 0.96 * 4224 = 4055.04 (a full step: 4024).
    assert filters == [4224, 4224 - STEP, 4055]
    layers = [k for k in client.get_run(prune_id).data.metrics if k.startswith("filters_left.")]
    assert len(layers) == 13
    for step, total in enumerate(filters):
        assert sum(dict(history(prune_id, k))[step] for k in layers) == total
    params = [v for _, v in history(prune_id, "params")]
    assert params[0] > params[1] > params[2]
    assert [s for s, _ in history(prune_id, "test_accuracy")] == [0, 1, 2]
    assert [s for s, _ in history(prune_id, "retrained_test_accuracy")] == [1]  # the last step is fine-tuned later
    assert [s for s, _ in history(prune_id, "latency_ms")] == [0, 1, 2]


def test_pruned_model_reloads_from_mlflow_by_uri_and_classifies(study, client, dogs_cats_dir):
    """The final pruned model loads by its URI (no prunelab code needed) and scores the test
    images, as float pixels in [0, 1], exactly as the prune run logged."""
    cfg, _, prune_id, _ = study
    uri = client.get_run(prune_id).data.tags[paths.TAG_MODEL_URI]
    assert uri.startswith(("runs:/", "models:/"))
    model = loading.load_model(uri)
    images = data.get(cfg.data)
    out = model(images.pixels(images.test_x[:4]))
    assert out.shape == (4, 2)
    with torch.no_grad():
        predicted = torch.cat([model(images.pixels(images.test_x[i : i + 16])) for i in range(0, len(images.test_y), 16)])
    accuracy = (predicted.argmax(1) == images.test_y).float().mean().item()
    assert accuracy == pytest.approx(history(prune_id, "test_accuracy")[-1][1], abs=1e-6)
    checkpoint_model = loading.load_model(prune_id)  # the weights-only checkpoint, rebuilt from its spec
    widths = checkpoint_model.spec()["widths"]
    assert sum(widths) == 4055
    assert checkpoint_model.classifier[1].in_features == widths[-1] * 49
    with torch.no_grad():
        torch.testing.assert_close(checkpoint_model(images.normalise(images.test_x[:4])), out, rtol=1e-4, atol=1e-5)


def test_report_draws_from_the_server(study, client, tmp_path):
    """The report finds the runs, draws both figures and a before/after table whose numbers are the logged ones."""
    cfg, _, prune_id, finetune_id = study
    report_id = studies.report(cfg, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"accuracy_vs_params_removed.png", "filters_left.png", paths.REPORT_TABLE,
                                                    paths.REPORT_MARKDOWN}
    table = pd.read_csv(tmp_path / paths.REPORT_TABLE)
    assert list(table["model"]) == ["before pruning (transfer only)", "pruned, before fine-tuning", "pruned + fine-tuned"]
    assert table["params"].tolist()[:2] == [history(prune_id, "params")[0][1], history(prune_id, "params")[-1][1]]
    assert table["test_accuracy_mean"].iloc[2] == pytest.approx(history(finetune_id, "test_accuracy")[-1][1])
    artifacts = {a.path for a in client.list_artifacts(report_id, paths.REPORT_DIR)}
    assert f"{paths.REPORT_DIR}/filters_left.png" in artifacts


def test_the_accuracy_figure_says_the_features_were_random_and_ends_at_the_tables_size(study, client):
    """The runs say their features were not pretrained, so the figure says its accuracy is that
    of random features; its last pruning point and its fine-tuned star sit at the parameters
    removed the table reports."""
    cfg, _, prune_id, _ = study
    assert client.get_run(prune_id).data.params["transfer.pretrained"] == "False"
    figures, table = transfer_stages.report(cfg)
    ax = figures["accuracy_vs_params_removed.png"].axes[0]
    assert "random features" in ax.get_title() and "not pretrained" in ax.get_title()
    removed = {row.model: 100 * (1 - row.params_fraction) for row in table.itertuples()}
    (curve,) = [c for c in ax.containers if c.get_label().startswith("right after removal")]
    (star,) = [c for c in ax.containers if c.get_label().startswith("after the final fine-tuning")]
    assert curve.lines[0].get_xdata()[-1] == pytest.approx(removed["pruned, before fine-tuning"])
    assert star.lines[0].get_xdata()[0] == pytest.approx(removed["pruned + fine-tuned"])


def test_target_that_empties_a_layer_fails_before_any_step(study, client):
    """A filter target below one filter per layer is a one-line ConfigError raised before any run starts."""
    cfg, train_id, _, _ = study
    bad = studies.load_config("taylor-vgg16-dogscats", QUICK + ["study=test-vgg-pipeline-bad", f"data.data_dir={cfg.data.data_dir}",
                                                        "prune.target=0.002"])
    with pytest.raises(ConfigError) as err:
        transfer_stages.prune(bad, 0, train_id)
    assert "removing every filter of a layer" in str(err.value) and "\n" not in str(err.value)
    assert query.find_runs("test-vgg-pipeline-bad", finished_only=False) == []


def test_fine_tuned_vgg_works_without_prunelab(study, client, tracking_uri, tmp_path):
    """The fine-tuned VGG16 by its URI, where prunelab cannot be imported: ImageNet
    normalisation inside, pixels in [0, 1] in, the accuracy the run logged out."""
    from conftest import clean_env
    from without_prunelab import load_and_score

    cfg, _, _, finetune_id = study
    run = client.get_run(finetune_id)
    images = data.get(cfg.data)
    result = load_and_score(run.data.tags[paths.TAG_MODEL_URI], images.pixels(images.test_x).numpy(),
                            images.test_y.numpy(), clean_env(tracking_uri), tmp_path)
    assert result["shape"] == [len(images.test_y), 2]
    assert result["pyfunc_accuracy"] == pytest.approx(history(finetune_id, "test_accuracy")[-1][1], abs=0.002)
    assert result["torch_accuracy"] == pytest.approx(history(finetune_id, "test_accuracy")[-1][1], abs=0.002)
    assert [m.model_id for m in run.inputs.model_inputs] == [
        client.get_run(study[2]).data.tags[paths.TAG_MODEL_URI].removeprefix("models:/")]


def test_a_torchvision_network_transfers_from_its_weights_file(dogs_cats_dir, tracking_uri, client, tmp_path):
    """`model=torchvision:mobilenet_v2` with a weights file of it (1,000 classes, as torchvision ships
    one): the train run's features are the file's exactly (frozen, computed once), its classifier is
    new (2 classes) and trained; then pruning and fine-tuning run on the same network. No hand-written
    head: the last Linear is found from the network."""
    import torchvision

    from prunelab import models

    torch.manual_seed(3)
    source = torchvision.models.mobilenet_v2()
    torch.save(source.state_dict(), tmp_path / "mobilenet_v2.pth")
    cfg = studies.load_config("taylor-resnet20-dogscats", [
        "model=torchvision:mobilenet_v2", f"transfer.weights={tmp_path / 'mobilenet_v2.pth'}", "study=test-transfer-tv",
        f"data.data_dir={dogs_cats_dir}", "data.image_size=32", "data.n_train=64", "data.n_test=32", "trials=1",
        "train.epochs=1", "finetune.epochs=1", "prune.filters_per_step=200", "prune.target=0.9", "prune.rank_images=32",
        "prune.finetune_epochs_between=0", "prune.latency_repeats=0"])
    train_id = transfer_stages.train(cfg, 0)
    assert client.get_run(train_id).data.params["weights_source"] == str(tmp_path / "mobilenet_v2.pth")
    trained = loading.load_model(train_id, cfg.model).network.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("classifier.1."):
            assert torch.equal(trained[name], value), name
    assert trained["classifier.1.weight"].shape == (2, 1280)
    prune_id = transfer_stages.prune(cfg, 0, train_id)
    final = loading.load_model(transfer_stages.finetune(cfg, 0, prune_id), cfg.model)
    params = client.get_run(prune_id).data.metrics["params"]
    assert params <= 0.9 * history(prune_id, "params")[0][1] and models.count_params(final) == params
