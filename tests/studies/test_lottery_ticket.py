"""Lottery-ticket rounds as MLflow runs on a real server, and the five-trial report
drawn from them. Tiny runs: LeNet-300-100 on a slice of the real CIFAR-10 subset
(the report and the round-trip do not depend on the architecture), a few iterations."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from prunelab import checkpoints, cli, paths, studies
from prunelab.tracking import query
from prunelab.pruning import masks
from prunelab.studies import lottery_ticket as lottery

TINY = ["model=lenet_300_100", "data.n_train=300", "data.n_test=100", "data.val_size=60",
        "lottery.iterations=4", "lottery.eval_every=2", "lottery.rounds=1", "trials=5"]


def tiny_cfg(cifar_dir, name: str, extra: list[str] = ()):
    return studies.load_config("lth-conv2-cifar10-quick", TINY + [f"study=test-lth-{name}", f"data.data_dir={cifar_dir}", *extra])


@pytest.fixture(scope="module")
def five_trials(cifar_dir, tracking_uri):
    """Round 0, round 1 and the re-init control of round 1, for five trials."""
    cfg = tiny_cfg(cifar_dir, "five")
    ids = {}
    for trial in range(cfg.trials):
        r0 = lottery.round_zero(cfg, trial)
        r1 = lottery.next_round(cfg, trial, r0)
        ids[trial] = (r0, r1, lottery.reinit_control(cfg, trial, r1))
    return cfg, ids


def _download(run_id: str, name: str, tmp: str) -> Path:
    return query.download(run_id, name, tmp)


@pytest.mark.slow
def test_rounds_log_tags_params_series_and_tickets(five_trials, client):
    """Each round is one run with study/stage/trial/seed tags, `round` and `fraction_remaining`
    params, series with step = iteration and per-layer counts; its mask and rewind weights,
    downloaded from the server, are round 0's initial weights exactly under the mask, and no
    pruned weight survived training."""
    cfg, ids = five_trials
    r0, r1, c1 = (client.get_run(i) for i in ids[2])
    assert (r0.data.tags[paths.TAG_STAGE], r1.data.tags[paths.TAG_STAGE], c1.data.tags[paths.TAG_STAGE]) == ("train", "prune", "reinit")
    assert r1.data.tags[paths.TAG_TRIAL] == "2" and r1.data.tags[paths.TAG_SEED] == "2"
    assert (r0.data.params["round"], r1.data.params["round"], c1.data.params["round"]) == ("0", "1", "1")
    assert float(r0.data.params["fraction_remaining"]) == 1.0
    pm = float(r1.data.params["fraction_remaining"])
    assert pm == pytest.approx(0.8, abs=0.002)  # LeNet is almost all FC layers, pruned at 20 %
    assert [s for s, _ in query.metric_history(r1.info.run_id, "test_accuracy")] == [0, 2, 4]
    assert [s for s, _ in query.metric_history(r1.info.run_id, "train_loss")] == [2, 4]

    with tempfile.TemporaryDirectory() as tmp:
        initial = checkpoints.load(_download(r0.info.run_id, paths.REWIND_WEIGHTS, tmp + "/a")).state_dict()
        mask = masks.Mask(torch.load(_download(r1.info.run_id, paths.MASK, tmp + "/b"), weights_only=True))
        rewound = checkpoints.load(_download(r1.info.run_id, paths.REWIND_WEIGHTS, tmp + "/c")).state_dict()
        trained = checkpoints.load(_download(r1.info.run_id, paths.CHECKPOINT, tmp + "/d"))
    assert mask.fraction_remaining() == pytest.approx(pm, abs=1e-6)
    for name, value in initial.items():
        assert torch.equal(rewound[name], value * mask[name] if name in mask else value), name
    for name, p in trained.named_parameters():
        if name in mask:
            assert torch.count_nonzero(p[~mask[name]]) == 0
            assert r1.data.metrics[f"nonzero.{name}"] == mask[name].sum().item()
            assert r1.data.metrics[f"params.{name}"] == mask[name].numel()
    assert r1.data.metrics["early_stop_iteration"] in (0, 2, 4)


@pytest.mark.slow
def test_report_draws_five_trial_bands(five_trials, tmp_path, client):
    """The report reads the five trials back from the server: per-Pm curves whose plotted
    means are the means of the logged series, and early-stop figures and table whose
    mean/min/max are those of the runs' logged summary metrics, ticket and re-init alike."""
    cfg, ids = five_trials
    figures, table = lottery.report(cfg)
    assert set(figures) == {"test_accuracy.png", "test_loss.png", "early_stop_iteration.png", "early_stop_accuracy.png"}

    round1 = [query.metric_history(ids[t][1], "test_accuracy") for t in range(5)]
    mean_at_4 = sum(dict(h)[4] for h in round1) / 5
    lines = figures["test_accuracy.png"].axes[0].lines
    ys = [list(line.get_ydata()) for line in lines if len(line.get_ydata()) == 3]
    assert any(y[-1] == pytest.approx(mean_at_4) for y in ys)

    assert set(table.trials) == {5}
    assert list(table.variant) == ["winning ticket", "winning ticket", "random reinit"]
    for variant, column in (("winning ticket", 1), ("random reinit", 2)):
        accs = [client.get_run(ids[t][column]).data.metrics["early_stop_test_accuracy"] for t in range(5)]
        row = table[(table.variant == variant) & (table.pm_percent < 99)].iloc[0]
        assert (row.accuracy_mean, row.accuracy_min, row.accuracy_max) == pytest.approx((sum(accs) / 5, min(accs), max(accs)))
        assert len(set(accs)) > 1  # five different trials, not one run counted five times
    dense = [client.get_run(ids[t][0]).data.metrics["early_stop_test_accuracy"] for t in range(5)]
    assert list(table.accuracy_vs_dense) == pytest.approx(list(table.accuracy_mean - sum(dense) / 5))

    run_id = studies.report(cfg, tmp_path / "out")
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, paths.REPORT_DIR)}
    assert logged == set(figures) | {paths.REPORT_TABLE, paths.REPORT_MARKDOWN}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(logged)


@pytest.mark.slow
def test_iteration_curves_start_at_the_first_iteration_and_draw_the_reinit_controls_dashed(five_trials):
    """As the paper draws them: each Pm level's re-init control is a dashed curve in its
    ticket's colour, the mean of the control runs' logged series; the first panel spans the
    iterations from the first logged one, every point of every curve in view."""
    from matplotlib.colors import to_rgba

    cfg, ids = five_trials
    figures, _ = lottery.report(cfg)
    for name, metric in (("test_accuracy.png", "test_accuracy"), ("test_loss.png", "test_loss")):
        whole = figures[name].axes[0]
        curves = {c.get_label(): c.lines[0] for c in whole.containers}
        (control_label,) = [label for label in curves if "re-init" in label]
        level = control_label.split(" re-init")[0]
        (ticket_label,) = [label for label in curves if label.startswith(f"{level},")]
        control, ticket = curves[control_label], curves[ticket_label]
        assert (control.get_linestyle(), ticket.get_linestyle()) == ("--", "-")
        assert to_rgba(control.get_color()) == to_rgba(ticket.get_color())

        series = [query.metric_history(ids[t][2], metric) for t in range(5)]
        steps = [s for s, _ in series[0]]
        assert list(control.get_xdata()) == steps
        assert list(control.get_ydata()) == pytest.approx([sum(dict(h)[s] for h in series) / 5 for s in steps])

        first = min(s for t in range(5) for run in ids[t] for s, _ in query.metric_history(run, metric))
        left, right = whole.get_xlim()
        low, high = whole.get_ylim()
        assert left == first == 0
        for line in curves.values():
            assert all(left <= x <= right for x in line.get_xdata())
            assert all(low <= y <= high for y in line.get_ydata()), (name, line.get_label())


def test_study_steps_chain_rounds_and_controls():
    """`main` runs train, then each round's prune (reading the previous round) and its
    re-init control (reading that round); filter pruning keeps its linear chain."""
    cfg = studies.load_config("lth-conv2-cifar10-quick", ["lottery.rounds=2"])
    assert studies.get("lottery_ticket").steps(cfg) == [("train", None), ("prune", 0), ("finetune", 1), ("prune", 1), ("finetune", 3)]
    no_control = studies.load_config("lth-conv2-cifar10-quick", ["lottery.rounds=2", "lottery.reinit_control=false"])
    assert studies.get("lottery_ticket").steps(no_control) == [("train", None), ("prune", 0), ("prune", 1)]
    chain = studies.get("filter_pruning").chain_of(studies.load_config())
    assert [(step.entry, step.source, step.overrides) for step in chain] == [("train", None, ()), ("prune", 0, ()), ("finetune", 1, ())]


def test_cli_refuses_bad_lottery_input_in_one_line(cifar_dir, tracking_uri, client, capsys):
    """A rate outside [0, 1) fails before any connection; rounds that would empty a layer
    fail before a run starts; a round without its input run is refused. One line, exit 2."""
    assert cli.main(["train", "--study", "lth-conv2-cifar10-quick", "--set", "lottery.conv_rate=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunelab: error: lottery.conv_rate must be in [0, 1)") and "\n" not in err

    name = "test-lth-too-many-rounds"
    args = ["--study", "lth-conv2-cifar10-quick", "--data-dir", str(cifar_dir), "--tracking-uri", tracking_uri,
            "--set", f"study={name}", "--set", "lottery.output_rate=0.9", "--set", "lottery.rounds=4"]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "would prune every weight of classifier.5.weight" in err and "\n" not in err
    exp = client.get_experiment_by_name(name)
    assert exp is None or not client.search_runs([exp.experiment_id])

    assert cli.main(["prune", *args[:-4]]) == 2
    assert "needs --model-uri" in capsys.readouterr().err


@pytest.mark.slow
def test_late_rewinding_rewinds_to_iteration_k(cifar_dir, tracking_uri):
    """With lottery.rewind_iteration=k, round 0 saves its weights after k steps (not the
    initialisation) and the next round starts from them at iteration k."""
    from prunelab import models

    cfg = tiny_cfg(cifar_dir, "late", ["lottery.rewind_iteration=2", "trials=1"])
    r0 = lottery.round_zero(cfg, 0)
    r1 = lottery.next_round(cfg, 0, r0)
    torch.manual_seed(cfg.seed)
    initial = models.build(cfg.model, (3, 32, 32), 10).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        saved = checkpoints.load(_download(r0, paths.REWIND_WEIGHTS, tmp)).state_dict()
    assert not torch.equal(saved["classifier.1.weight"], initial["classifier.1.weight"])
    assert [s for s, _ in query.metric_history(r1, "test_accuracy")] == [2, 4]


@pytest.mark.slow
def test_the_last_round_is_a_model_for_users(five_trials, client, tracking_uri, tmp_path):
    """The last round's ticket is a logged model holding that round's numbers at its last
    iteration; it loads without prunelab and scores the logged accuracy on pixels in [0, 1];
    the re-init control records it as the model it read. Earlier rounds keep only files."""
    from conftest import clean_env
    from without_prunelab import load_and_score

    from prunelab import data

    cfg, ids = five_trials
    r0, r1, c1 = (client.get_run(i) for i in ids[0])
    assert paths.TAG_MODEL_URI not in r0.data.tags
    uri = r1.data.tags[paths.TAG_MODEL_URI]
    model = client.get_logged_model(uri.removeprefix("models:/"))
    metrics = {m.key: m.value for m in model.metrics}
    last = max(client.get_metric_history(r1.info.run_id, "test_accuracy"), key=lambda m: m.step)
    assert last.step == cfg.lottery.iterations and metrics["test_accuracy"] == last.value
    assert metrics["fraction_remaining"] == r1.data.metrics["fraction_remaining"] == pytest.approx(0.8, abs=0.002)
    pruned = sum(r1.data.metrics[f"params.{n}"] - r1.data.metrics[f"remaining.{n}"]
                 for n in ("classifier.1.weight", "classifier.3.weight", "classifier.5.weight"))
    assert metrics["params"] == r1.data.metrics["params"] == 3072 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 - pruned
    assert [m.model_id for m in c1.inputs.model_inputs] == [model.model_id]
    d = data.get(cfg.data)
    result = load_and_score(uri, d.pixels(d.test_x).numpy(), d.test_y.numpy(), clean_env(tracking_uri), tmp_path)
    assert result["pyfunc_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.002)
    assert result["torch_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.002)


@pytest.mark.slow
def test_evaluate_of_a_round_prints_what_it_logged(five_trials, client, capsys):
    """`prunelab evaluate <round run id>`, no data flags: the round's ticket on the round's data
    (the CIFAR subset, its test slice) scores the accuracy the round logged last."""
    import json

    from prunelab import cli

    _, ids = five_trials
    r1 = ids[0][1]
    logged = max(client.get_metric_history(r1, "test_accuracy"), key=lambda m: m.step).value
    assert cli.main(["evaluate", r1]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_a_torchvision_network_gets_masks_over_every_conv_and_linear_weight(cifar_dir, tracking_uri, client):
    """`model=torchvision:mobilenet_v2`: round 0, round 1 and its re-init control on the real CIFAR
    subset. Round 1's mask covers every conv and linear weight of the network (none is
    hand-listed), the rewound weights are round 0's initial ones under it, its trained weights keep
    the pruned ones at zero, and the control starts from weights its factory initialised afresh."""
    cfg = tiny_cfg(cifar_dir, "torchvision", ["model=torchvision:mobilenet_v2", "trials=1", "data.n_train=120"])
    r0 = lottery.round_zero(cfg, 0)
    r1 = lottery.next_round(cfg, 0, r0)
    c1 = lottery.reinit_control(cfg, 0, r1)
    assert client.get_run(r1).data.params["model"] == "torchvision:mobilenet_v2"
    with tempfile.TemporaryDirectory() as tmp:
        initial = checkpoints.load(_download(r0, paths.REWIND_WEIGHTS, tmp + "/a"), cfg.model).state_dict()
        mask = masks.Mask(torch.load(_download(r1, paths.MASK, tmp + "/b"), weights_only=True))
        rewound = checkpoints.load(_download(r1, paths.REWIND_WEIGHTS, tmp + "/c"), cfg.model).state_dict()
        trained = checkpoints.load(_download(r1, paths.CHECKPOINT, tmp + "/d"), cfg.model)
        control = checkpoints.load(_download(c1, paths.REWIND_WEIGHTS, tmp + "/e"), cfg.model).state_dict()
    layers = {f"{n}.weight" for n, m in trained.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(mask) == layers and len(layers) == 53  # MobileNetV2: 52 convs and the classifier
    assert 0.85 < mask.fraction_remaining() < 0.95  # convs at 10 % a round, the output layer at 10 %
    for name, value in initial.items():
        assert torch.equal(rewound[name], value * mask[name] if name in mask else value), name
    for name, p in trained.named_parameters():
        if name in mask:
            assert torch.count_nonzero(p[~mask[name]]) == 0, name
    first_conv = "network.features.0.0.weight"
    assert torch.count_nonzero(control[first_conv][~mask[first_conv]]) == 0
    assert not torch.equal(control[first_conv], rewound[first_conv])  # fresh weights, not the rewound ones
