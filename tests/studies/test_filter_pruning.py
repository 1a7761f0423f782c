"""train -> prune -> finetune -> report on a real server with a real FashionMNIST slice;
every assertion reads what the server returns."""

import mlflow.pytorch
import pytest
import torch

from prunelab import data, models, paths, studies
from prunelab.tracking import models as logged_models
from prunelab.studies import filter_pruning
from prunelab.train import evaluate

pytestmark = pytest.mark.slow


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def study(fashion_dir, tracking_uri, client, tmp_path_factory):
    """One trial of the default study at test scale, run stage by stage."""
    cfg = studies.load_config(overrides=["data.n_train=1500", "data.n_test=500", "train.epochs=2", "finetune.epochs=2",
                                 "prune.rank_images=500", "trials=1", "study=test-pipeline"])
    train_id = filter_pruning.train(cfg, 0)
    prune_id = filter_pruning.prune(cfg, 0, train_id)
    finetune_id = filter_pruning.finetune(cfg, 0, prune_id)
    out = tmp_path_factory.mktemp("figures")
    report_id = studies.report(cfg, out)
    return cfg, {"train": train_id, "prune": prune_id, "finetune": finetune_id, "report": report_id}, out


def test_train_run(study, client):
    cfg, ids, _ = study
    run = client.get_run(ids["train"])
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("study", "stage", "trial", "seed")} == \
        {"study": "test-pipeline", "stage": "train", "trial": "0", "seed": "0"}
    assert {k: run.data.params[k] for k in ("model", "dataset", "method", "train.epochs")} == \
        {"model": "simple_cnn", "dataset": "fashionmnist", "method": "taylor", "train.epochs": "2"}
    assert [s for s, _ in history(client, ids["train"], "test_accuracy")] == [1, 2]
    assert history(client, ids["train"], "params") == [(0, 126_698.0)]
    artifacts = {a.path for a in client.list_artifacts(ids["train"])}
    assert {paths.SUMMARY_BEFORE, paths.CHECKPOINT} <= artifacts
    summary = client.download_artifacts(ids["train"], paths.SUMMARY_BEFORE)
    assert "126,698" in open(summary).read()


def test_prune_run_follows_the_plan(study, client, capsys):
    cfg, ids, _ = study
    run = client.get_run(ids["prune"])
    assert run.info.status == "FINISHED"
    params = history(client, ids["prune"], "params")
    fractions = history(client, ids["prune"], "fraction_remaining")
    rounds = int(run.data.metrics["rounds"])
    assert [s for s, _ in params] == list(range(rounds + 1))
    assert params[0][1] == 126_698 and all(a[1] > b[1] for a, b in zip(params, params[1:]))  # only shrinks
    assert fractions[-1][1] <= cfg.prune.target < fractions[-2][1]  # stops at the first round past the target
    filters = history(client, ids["prune"], "filters")
    assert [f for _, f in filters] == [24 - k * cfg.prune.filters_per_step for k in range(rounds + 1)]
    # The final pruned model reloads by URI (traced pt2: no prunelab code needed) with the planned size.
    uri = run.data.tags[paths.TAG_MODEL_URI]
    loaded = mlflow.pytorch.load_model(uri, map_location="cpu")
    widths = [int(run.data.metrics[f"filters_left.{n}"]) for n in ("features.0", "features.2")]
    expected = models.count_params(models.get("simple_cnn", channels=widths))
    assert sum(p.numel() for p in loaded.parameters()) == expected == params[-1][1]
    # ... and scores what the run logged for its last round, on pixels in [0, 1] (its normalisation is inside).
    d = data.get(cfg.data)
    with torch.no_grad():
        acc = (loaded(d.pixels(d.test_x)).argmax(1) == d.test_y).float().mean().item()
    assert acc == pytest.approx(history(client, ids["prune"], "test_accuracy")[-1][1], abs=1e-6)
    # `prunelab evaluate` scores the same model by URI.
    from prunelab import cli
    import json

    assert cli.main(["evaluate", uri, "--dataset", "fashionmnist", "--n-test", "500"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 500 and printed["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert "summary_after.txt" in {a.path for a in client.list_artifacts(ids["prune"])}
    # One logged model per round: intermediate rounds plus the final one.
    logged = {m.name for m in client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{ids['prune']}'")}
    assert logged == {paths.round_model(k) for k in range(1, rounds)} | {paths.MODEL}


def test_finetune_run_starts_from_the_pruned_model(study, client):
    cfg, ids, _ = study
    prune_run = client.get_run(ids["prune"])
    acc = history(client, ids["finetune"], "test_accuracy")
    assert [s for s, _ in acc] == [0, 1, 2]
    assert acc[0][1] == pytest.approx(prune_run.data.metrics["test_accuracy"], abs=1e-6)
    assert history(client, ids["finetune"], "params")[0][1] == prune_run.data.metrics["params"]
    model = logged_models.load_model(ids["finetune"])  # the weights-only checkpoint of the run
    d = data.get(cfg.data)
    assert evaluate(model, d.test_x, d.test_y, d.normalise)["accuracy"] == pytest.approx(acc[-1][1], abs=1e-6)


def test_report_run_and_figures(study, client):
    cfg, ids, out = study
    run = client.get_run(ids["report"])
    assert run.data.tags["stage"] == "report" and run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(ids["report"], paths.REPORT_DIR)}
    assert {f"{paths.REPORT_DIR}/test_accuracy.png", f"{paths.REPORT_DIR}/test_loss.png",
            f"{paths.REPORT_DIR}/{paths.REPORT_TABLE}"} <= logged
    assert (out / "test_accuracy.png").stat().st_size > 10_000
    import pandas as pd

    table = pd.read_csv(out / paths.REPORT_TABLE)
    prune_run = client.get_run(ids["prune"])
    assert table["params"].tolist() == [126_698, prune_run.data.metrics["params"]]


def test_fine_tuning_continues_the_training_epoch_axis(study):
    """As in the seed's figure: the pruned curve starts at the last training epoch (the pruned
    model before fine-tuning) and its fine-tuning epochs follow on (3-4 after 2 training epochs)."""
    cfg, _, _ = study
    figures, _ = filter_pruning.report(cfg)
    curves = figures["test_accuracy.png"].axes[0].containers  # one errorbar container per curve
    lines = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in curves}
    original = next(x for label, x in lines.items() if label.startswith("original"))
    tuned = next(x for label, x in lines.items() if label.startswith("pruned + fine-tuned"))
    assert original == [1, 2] and tuned == [2, 3, 4]


def test_evaluate_of_a_run_uses_the_data_it_was_made_with(study, client, capsys):
    """`prunelab evaluate <run id>` with no data flags scores the run's model on the data
    settings the run logged (here 500 test images) and prints exactly what the run logged;
    a flag or --set changes one setting, and a setting of another section is refused."""
    import json

    from prunelab import cli

    _, ids, _ = study
    logged = history(client, ids["finetune"], "test_accuracy")[-1][1]
    for ref in (ids["finetune"], client.get_run(ids["finetune"]).data.tags[paths.TAG_MODEL_URI]):
        assert cli.main(["evaluate", ref]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["n"] == 500 and printed["accuracy"] == pytest.approx(logged, abs=1e-6)
    assert cli.main(["evaluate", ids["finetune"], "--set", "data.n_test=200"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 200
    assert cli.main(["evaluate", ids["finetune"], "--set", "train.epochs=3"]) == 2
    assert "only data.* settings apply here, not train" in capsys.readouterr().err
