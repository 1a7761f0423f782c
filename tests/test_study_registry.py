"""`main` registers each trial's deliverable model: a version per trial of the registered
model named after the study, tagged with its numbers, the best aliased `champion`."""

from __future__ import annotations

import json

import pytest

from prunelab import cli, paths

pytestmark = pytest.mark.slow


def test_each_trial_is_a_version_and_the_best_is_champion(tiny_study, client):
    study = tiny_study["study"]
    versions = {int(v.tags["trial"]): v for v in client.search_model_versions(f"name = '{study}'")}
    assert set(versions) == {0, 1}
    for trial, version in versions.items():
        finetune = tiny_study["by_stage"][("finetune", trial)]
        model_uri = finetune.data.tags[paths.TAG_MODEL_URI]
        assert version.source == model_uri and version.run_id == finetune.info.run_id
        logged = {m.key: m.value for m in client.get_logged_model(model_uri.removeprefix("models:/")).metrics}
        assert float(version.tags["test_accuracy"]) == pytest.approx(logged["test_accuracy"], abs=1e-6)
        assert int(version.tags["params"]) == logged["params"] and float(version.tags["fraction_remaining"]) <= 0.6
        assert float(version.tags["val_accuracy"]) == pytest.approx(logged["val_accuracy"], abs=1e-6)
    # The default study holds out a validation split: the champion is chosen on it, not on the test set.
    champion = client.get_model_version_by_alias(study, paths.CHAMPION)
    on_validation = {t: float(v.tags["val_accuracy"]) for t, v in versions.items()}
    assert float(champion.tags["val_accuracy"]) == max(on_validation.values())
    assert client.get_registered_model(study).tags[f"{paths.CHAMPION}_chosen_on"] == "val_accuracy"
    assert f"models:/{study}@{paths.CHAMPION}" in tiny_study["stdout"] and "validation" in tiny_study["stdout"]


def test_evaluate_takes_the_champion_by_alias(tiny_study, client, capsys):
    study = tiny_study["study"]
    assert cli.main(["evaluate", f"models:/{study}@{paths.CHAMPION}", "--dataset", "fashionmnist", "--n-test", "200"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    champion = client.get_model_version_by_alias(study, paths.CHAMPION)
    assert printed["n"] == 200 and printed["accuracy"] == pytest.approx(float(champion.tags["test_accuracy"]), abs=1e-6)


def test_evaluate_scores_a_run_checkpoint_like_its_logged_model(tiny_study, client, capsys):
    """A run id (its weights-only checkpoint, a bare network) and its logged model (pixels in) agree."""
    finetune = tiny_study["by_stage"][("finetune", 0)]
    scores = []
    for ref in (finetune.info.run_id, finetune.data.tags[paths.TAG_MODEL_URI]):
        assert cli.main(["evaluate", ref, "--dataset", "fashionmnist", "--n-test", "200"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], abs=1e-5)
