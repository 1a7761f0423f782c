"""The criteria comparison: steps that carry their own settings, a tiny study end to end
through `prunelab run` against the real server (a run per method and point, each with its
params and LoggedModel; the trade-off report; everything reused on a second run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prunelab import cli, paths, studies
from prunelab.pipeline import study
from prunelab.studies import common, criteria_comparison
from prunelab.tracking import models

PRESET = "compare-cnn-fashionmnist"
TINY = ("data.n_train=256 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=128 "
        "prune.latency_repeats=3 trials=1 compare.methods=[l1,random] compare.ratios=[2,4] compare.distill=[l1]")


def test_each_method_and_point_is_a_step_with_its_own_settings():
    cfg = studies.load_config(PRESET, ["compare.methods=[taylor,fpgm]", "compare.ratios=[2,8]"])
    chain = studies.get(cfg.kind).chain_of(cfg)
    assert [s.entry for s in chain] == ["train"] + ["prune", "finetune"] * 4
    assert [s.source for s in chain] == [None, 0, 1, 0, 3, 0, 5, 0, 7]
    fpgm_8 = chain[7]
    assert fpgm_8.overrides == ("prune.method=fpgm", "prune.target=0.125", "compare.ratio=8.0")
    # The step's settings resolve as `prunelab prune --overrides ...` (a step run as a process) resolves them.
    own = studies.step_config(cfg, fpgm_8.overrides)
    assert own == studies.load_config(PRESET, ["compare.methods=[taylor,fpgm]", "compare.ratios=[2,8]", *fpgm_8.overrides])
    assert (own.prune.method, own.prune.target, own.compare.ratio) == ("fpgm", 0.125, 8.0)
    args = study.StudyArgs(PRESET, "compare.methods=[taylor,fpgm] compare.ratios=[2,8]")
    kind = studies.get(cfg.kind)
    params, key = study.step_params(args, fpgm_8, 0, "run-a", study.step_settings(kind, own))
    assert params["overrides"].endswith("prune.method=fpgm prune.target=0.125 compare.ratio=8.0")
    # Another point of the same trained network is another step; a longer method list is not.
    _, other = study.step_params(args, chain[5], 0, "run-a", study.step_settings(kind, studies.step_config(cfg, chain[5].overrides)))
    assert other != key
    more = studies.load_config(PRESET, ["compare.methods=[taylor,fpgm,l1]", "compare.ratios=[2,8,4]"])
    _, same = study.step_params(args, fpgm_8, 0, "run-a", study.step_settings(kind, studies.step_config(more, fpgm_8.overrides)))
    assert same == key


def test_a_distilled_variant_is_a_second_finetune_step_of_the_same_prune_run():
    cfg = studies.load_config(PRESET, ["compare.methods=[taylor,fpgm]", "compare.ratios=[2,8]", "compare.distill=[fpgm]"])
    chain = studies.get(cfg.kind).chain_of(cfg)
    assert [s.entry for s in chain] == ["train"] + ["prune", "finetune"] * 2 + ["prune", "finetune", "finetune"] * 2
    plain, distilled = chain[6], chain[7]
    assert plain.source == distilled.source == 5 and chain[5].overrides == plain.overrides
    assert distilled.overrides == plain.overrides + ("finetune.distill_temperature=4.0", "finetune.distill_weight=0.5")
    own = studies.step_config(cfg, distilled.overrides)
    assert (own.finetune.distill_temperature, own.finetune.distill_weight) == (4.0, 0.5)
    assert studies.step_config(cfg, plain.overrides).finetune.distill_temperature == 0
    assert criteria_comparison.curves(cfg) == ["taylor", "fpgm", "fpgm + distillation"]
    # Asking for the variant reuses the plain steps: the plan's settings are no step's signature.
    args = study.StudyArgs(PRESET, "compare.methods=[taylor,fpgm] compare.ratios=[2,8]")
    kind = studies.get(cfg.kind)
    without = studies.load_config(PRESET, ["compare.methods=[taylor,fpgm]", "compare.ratios=[2,8]"])
    keys = [study.step_params(args, plain, 0, "run-a", study.step_settings(kind, studies.step_config(c, plain.overrides)))[1]
            for c in (cfg, without)]
    assert keys[0] == keys[1]


def test_a_kind_of_pairs_keeps_its_steps_and_keys():
    """Steps given as (entry point, source) change no setting: the default study's step keys stay."""
    cfg = studies.load_config()
    kind = studies.get(cfg.kind)
    assert kind.chain_of(cfg) == [common.Step("train"), common.Step("prune", 0), common.Step("finetune", 1)]
    assert studies.step_config(cfg, ()) is cfg
    settings = {k: v for k, v in cfg.flat().items() if k not in study.EXECUTION_SETTINGS}
    args = study.StudyArgs(cfg.study, "train.epochs=2")
    params, key = study.step_params(args, common.Step("prune", 0), 1, "run-a", study.step_settings(kind, cfg))
    assert params["overrides"] == "train.epochs=2"
    assert key == study.step_key("prune", settings, {"trial": 1, "model_uri": "run-a"})


def test_the_pareto_front_keeps_only_undominated_points():
    x, y = np.array([2.0, 4.0, 4.0, 8.0, 16.0]), np.array([0.9, 0.85, 0.8, 0.86, 0.5])
    assert list(criteria_comparison.pareto(x, y)) == [0, 3, 4]
    latency = np.array([1.0, 0.5, 0.7, 0.4])
    assert list(criteria_comparison.pareto(latency, np.array([0.9, 0.8, 0.85, 0.6]), larger_x_better=False)) == [3, 1, 2, 0]


@pytest.mark.slow
def test_a_tiny_comparison_end_to_end_and_reused(tracking_uri, client, fashion_dir, tmp_path):
    name = "test-compare-tiny"
    argv = ["run", "--study", PRESET, "--overrides", f"{TINY} study={name}", "--out", str(tmp_path / "report")]
    assert cli.main(argv) == 0
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    by_stage = {s: [r for r in runs if r.data.tags.get(paths.TAG_STAGE) == s] for s in ("train", "prune", "finetune", "report")}
    # l1 is also fine-tuned with distillation: a third finetune run per l1 point.
    assert [len(by_stage[s]) for s in ("train", "prune", "finetune", "report")] == [1, 4, 6, 1]
    distilled = [r for r in by_stage["finetune"] if float(r.data.params["finetune.distill_temperature"])]
    assert sorted(r.info.run_name for r in distilled) == ["finetune-l1-x2-kd-t0", "finetune-l1-x4-kd-t0"]
    for r in distilled:  # the teacher is the unpruned network, the train run's model
        assert r.data.params["teacher_model"] == by_stage["train"][0].info.run_id
    for stage in ("prune", "finetune"):
        points = {(r.data.params["prune.method"], r.data.params["prune.target"], r.data.params["compare.ratio"])
                  for r in by_stage[stage]}
        assert points == {(m, t, r) for m in ("l1", "random") for t, r in (("0.5", "2.0"), ("0.25", "4.0"))}
        for r in by_stage[stage]:
            if r in distilled:
                continue
            method, ratio = r.data.params["prune.method"], float(r.data.params["compare.ratio"])
            assert r.info.run_name == f"{stage}-{method}-x{ratio:g}-t0"
            assert models.logged_model_id(r.info.run_id) is not None  # its own LoggedModel
    # The pruned networks reach their points: params at most 1/ratio of the trained network's.
    trained = by_stage["train"][0].data.metrics["params"]
    for r in by_stage["finetune"]:
        assert r.data.metrics["params"] <= trained / float(r.data.params["compare.ratio"])
    report = by_stage["report"][0]
    figures = {a.path for a in client.list_artifacts(report.info.run_id, paths.REPORT_DIR)}
    assert {f"{paths.REPORT_DIR}/{f}" for f in ("accuracy_vs_compression.png", "accuracy_vs_speedup.png",
                                                 "accuracy_vs_latency.png", paths.REPORT_TABLE)} <= figures
    metrics = report.data.metrics
    tuned = {(r.data.params["prune.method"], r.data.params["compare.ratio"], r in distilled): r.data.metrics["test_accuracy"]
             for r in by_stage["finetune"]}
    assert metrics["ratio_4.l1.test_accuracy_mean"] == pytest.approx(tuned[("l1", "4.0", False)])
    assert metrics["ratio_4.l1_distillation.test_accuracy_mean"] == pytest.approx(tuned[("l1", "4.0", True)])
    assert metrics["ratio_1.unpruned.test_accuracy_mean"] == pytest.approx(by_stage["train"][0].data.metrics["test_accuracy"])
    table = pd.read_csv(tmp_path / "report" / paths.REPORT_TABLE)
    best = table[table.best == "best"]
    assert sorted(best.ratio) == [2.0, 4.0]  # one best method per point, the most accurate there
    for _, row in best.iterrows():
        assert row.test_accuracy_mean == table[table.ratio == row.ratio].test_accuracy_mean.max()

    # A second run reuses every step: only a new main and report run.
    assert cli.main(argv) == 0
    again = client.search_runs([exp.experiment_id])
    new = {r.info.run_id for r in again} - {r.info.run_id for r in runs}
    assert sorted(r.data.tags.get(paths.TAG_STAGE) for r in again if r.info.run_id in new) == ["main", "report"]
