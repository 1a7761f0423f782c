"""train -> prune -> finetune -> report on a real server with a real FashionMNIST slice;
every assertion reads what the server returns."""

import mlflow.pytorch
import pytest
import torch

from prunelab import data, models, paths, studies
from prunelab.tracking import loading
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
    model = loading.load_model(ids["finetune"])  # the weights-only checkpoint of the run
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


# --------------------------------------------------------------------------- the report's figures, three trials

@pytest.fixture(scope="module")
def three_trials(fashion_dir, tracking_uri, tmp_path_factory):
    """Three trials of the default study at test scale, with random filter ranking: random
    scores depend on the seed alone, so on any machine the trials stop after different numbers
    of rounds (as Taylor-ranked trials often do at full scale). Returns the config, the runs per
    trial, the report's figures and table, and the folder it was written to."""
    cfg = studies.load_config(overrides=["data.n_train=1500", "data.n_test=500", "train.epochs=2", "finetune.epochs=1",
                                         "prune.method=random", "prune.rank_images=500", "prune.latency_repeats=0",
                                         "trials=3", "study=test-figures"])
    ids = {}
    for trial in range(cfg.trials):
        train_id = filter_pruning.train(cfg, trial)
        prune_id = filter_pruning.prune(cfg, trial, train_id)
        ids[trial] = {"train": train_id, "prune": prune_id, "finetune": filter_pruning.finetune(cfg, trial, prune_id)}
    out = tmp_path_factory.mktemp("figures-three")
    report_id = studies.report(cfg, out)
    figures, table = filter_pruning.report(cfg)
    return cfg, ids, figures, table, out, report_id


def _labelled(ax, start: str):
    """The errorbar container (a curve or a marker) whose legend label starts with `start`."""
    (found,) = [c for c in ax.containers if c.get_label().startswith(start)]
    return found


def test_the_pruned_networks_before_fine_tuning_are_marked_and_the_legend_covers_no_data(three_trials, client):
    """On both epoch figures the pruned networks before fine-tuning (each finetune run's step 0)
    have a marker of their own at their mean and a note at their worst trial, and the legend
    lies outside the axes, inside the figure."""
    cfg, ids, figures, _, _, _ = three_trials
    for name, metric, worst in (("test_accuracy.png", "test_accuracy", min), ("test_loss.png", "test_loss", max)):
        fig = figures[name]
        ax = fig.axes[0]
        firsts = [history(client, ids[t]["finetune"], metric)[0] for t in range(cfg.trials)]
        assert {step for step, _ in firsts} == {0}
        before = [value for _, value in firsts]
        marker = _labelled(ax, "pruned, before fine-tuning")
        assert list(marker.lines[0].get_xdata()) == [cfg.train.epochs]
        assert list(marker.lines[0].get_ydata()) == pytest.approx([sum(before) / len(before)])
        (note,) = [t for t in ax.texts if t.get_text().startswith("pruned, before fine-tuning")]
        assert note.xy == pytest.approx((cfg.train.epochs, worst(before)))
        assert f"{worst(before):.4f}" in note.get_text()

        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert ax.get_legend() is None
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert not box.overlaps(ax.get_window_extent(renderer)), name
        for shown in (box, note.get_window_extent(renderer)):  # neither cut off at the figure's edge
            assert fig.bbox.x0 <= shown.x0 and shown.x1 <= fig.bbox.x1 and fig.bbox.y0 <= shown.y0 and shown.y1 <= fig.bbox.y1
        assert any(t.get_text().startswith("pruned, before fine-tuning") for t in legend.get_texts())


def test_accuracy_against_parameters_removed_ends_where_the_table_puts_the_pruned_networks(three_trials, client):
    """Test accuracy right after each round's removal against the percent of parameters removed,
    mean and min-max of the trials: it starts at the trained networks, and its last point, with
    a trial that stopped a round sooner held at its final network, is the size table's pruned
    networks; the fine-tuned ones are a star at the same size. The report logs it and writes it out."""
    cfg, ids, figures, table, out, report_id = three_trials
    assert (out / "accuracy_vs_params_removed.png").stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(report_id, paths.REPORT_DIR)}
    assert f"{paths.REPORT_DIR}/accuracy_vs_params_removed.png" in logged

    ax = figures["accuracy_vs_params_removed.png"].axes[0]
    assert ax.get_xlabel().startswith("parameters removed")
    curve = _labelled(ax, "right after removal")
    x, y = list(curve.lines[0].get_xdata()), list(curve.lines[0].get_ydata())
    accs = [history(client, ids[t]["prune"], "test_accuracy") for t in range(cfg.trials)]
    rounds = [len(a) - 1 for a in accs]
    assert len(set(rounds)) > 1  # the trials stop after different rounds: the case the last point must get right
    assert len(x) == max(rounds) + 1
    assert x[0] == 0 and y[0] == pytest.approx(sum(a[0][1] for a in accs) / cfg.trials)
    lasts = [a[-1][1] for a in accs]
    tuned = table[table.model == "pruned + fine-tuned"].iloc[0]
    assert x[-1] == pytest.approx(100 * (1 - tuned.params_fraction))
    assert y[-1] == pytest.approx(sum(lasts) / cfg.trials)
    (bars,) = curve.lines[2]  # the min-max bar of each point
    assert sorted(bars.get_segments()[-1][:, 1]) == pytest.approx([min(lasts), max(lasts)])

    star = _labelled(ax, "after the final fine-tuning")
    assert star.lines[0].get_xdata()[0] == pytest.approx(x[-1])
    tuned_accs = [history(client, ids[t]["finetune"], "test_accuracy")[-1][1] for t in range(cfg.trials)]
    assert star.lines[0].get_ydata()[0] == pytest.approx(sum(tuned_accs) / cfg.trials) == pytest.approx(tuned.test_accuracy_mean)
