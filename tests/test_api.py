"""The Python API (`prunelab.prune`, `prunelab.load`) on a real MLflow server and a real
FashionMNIST slice: the README's example run as written, a user's own factory through
train -> prune -> finetune -> register, and bad input refused in one line before any run."""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import REPO

import prunelab
from prunelab import config, data, paths
from prunelab.errors import ConfigError, ModelError, PrunelabError
from prunelab.train import evaluate
from tests.models import tiny_factory

STAGES = ("train", "prune", "finetune")
QUICK = {"data.n_train": 256, "data.n_test": 200, "train.epochs": 1, "finetune.epochs": 1,
         "prune.rank_images": 64, "prune.latency_repeats": 0}


def readme_example() -> str:
    """The README's one Python block, as a reader copies it."""
    (block,) = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    return block


def last(client, run_id: str, key: str) -> float:
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


def check_runs(client, result: prunelab.Pruned, stages=STAGES) -> None:
    """The runs `prune` returned, as the server holds them: one finished run per stage in the
    study's experiment, with the tags every stage run carries, and the final logged model."""
    assert tuple(result.runs) == stages
    experiment = client.get_experiment_by_name(result.study)
    for stage, run_id in result.runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == experiment.experiment_id
        tags = run.data.tags
        assert (tags[paths.TAG_STAGE], tags[paths.TAG_STUDY], tags[paths.TAG_TRIAL]) == (stage, result.study, "0")
        assert tags[paths.TAG_MODEL_URI].startswith("models:/m-")
    logged = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert logged.source_run_id == result.runs[stages[-1]] and logged.status.to_proto() == 2  # READY
    assert result.metrics["test_accuracy"] == pytest.approx(last(client, logged.source_run_id, "test_accuracy"))


def scores(module: torch.nn.Module, n_test: int) -> float:
    """Test accuracy of `module` on pixels in [0, 1], as a user feeds a logged model."""
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=n_test))
    return evaluate(module, d.test_x, d.test_y, d.pixels)["accuracy"]


def test_importing_prunelab_stays_cheap():
    """`import prunelab` and its version load neither torch nor mlflow: the API comes on first use."""
    code = "import sys, prunelab; prunelab.__version__; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("call, says", [
    (lambda: prunelab.prune(settings={"train.epochz": 1}), "unknown setting train.epochz"),
    (lambda: prunelab.prune(method="l3"), "unknown pruning method 'l3'"),
    (lambda: prunelab.prune(target=1.5), "prune.target must be inside (0, 1)"),
    (lambda: prunelab.prune(target=0.5, settings={"prune.target": 0.4}), "prune.target is set twice"),
    (lambda: prunelab.prune(tiny_factory.build(10)), "is a network object"),
    (lambda: prunelab.prune(lambda num_classes: None), "must be importable by its module and name"),
    (lambda: prunelab.prune(register=True, finetune=False), "registers the fine-tuned model"),
    (lambda: prunelab.prune(preset="lth-lenet300-fashionmnist"), "a lottery_ticket study"),
    (lambda: prunelab.load("weights.pt"), "is a file, not a model on the tracking server"),
], ids=["setting", "criterion", "target", "twice", "object", "lambda", "register", "kind", "file"])
def test_bad_input_is_one_line_before_any_connection(call, says, monkeypatch):
    """Refused from the settings alone: no server is even asked (the URI points nowhere)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(PrunelabError) as refused:
        call()
    assert isinstance(refused.value, (ConfigError, ModelError))
    assert says in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tracking_uri, client, fashion_dir, monkeypatch, tmp_path):
    """The README's example, executed as a reader pastes it: its runs are in the experiment it
    made active, and the model it loads back scores what the finetune run logged."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # as in a fresh interpreter
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    result, model = namespace["result"], namespace["model"]
    (chosen,) = re.findall(r"mlflow\.set_experiment\(\"([^\"]+)\"\)", readme_example())
    assert result.study == chosen  # the experiment the example made active names the study
    check_runs(client, result)
    assert result.metrics["fraction_remaining"] <= 0.5
    n_test = int(client.get_run(result.runs["finetune"]).data.params["data.n_test"])
    assert scores(model, n_test) == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    assert sum(p.numel() for p in model.parameters()) == result.metrics["params"]


@pytest.mark.slow
def test_a_users_factory_through_train_prune_finetune_register(tracking_uri, client, fashion_dir):
    """The user's own function (not its name) as the model, registered; the champion loads back
    as the pruned network only when the user names the factory again."""
    study = "test-api-user-factory"
    result = prunelab.prune(tiny_factory.build, method="l1", target=0.8, register=True, study=study,
                            settings={**QUICK, "prune.filters_per_step": 2})
    check_runs(client, result)
    assert client.get_run(result.runs["train"]).data.params["model"] == "tests.models.tiny_factory:build"
    versions = client.search_model_versions(f"name = '{study}'")
    assert [(v.version, v.run_id) for v in versions] == [(result.version, result.runs["finetune"])]
    assert client.get_model_version_by_alias(study, "champion").version == result.version
    with pytest.raises(ModelError, match="name that factory"):
        prunelab.load(f"models:/{study}@champion")
    champion = prunelab.load(f"models:/{study}@champion", tiny_factory.build)
    assert champion.network.factory == "tests.models.tiny_factory:build"
    assert scores(champion, QUICK["data.n_test"]) == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    assert scores(result.model, QUICK["data.n_test"]) == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_inside_an_active_run_from_a_trained_model(tracking_uri, client, fashion_dir, monkeypatch):
    """Inside the user's active run the runs are its children, in its experiment, which names the
    study; `start_from` prunes a trained model without a train run. A study named otherwise there
    is refused in one line."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # what set_experiment exports goes with the test
    mlflow.set_experiment("test-api-active-run")
    with mlflow.start_run(run_name="my-sweep") as parent:
        with pytest.raises(ConfigError, match="leave study out"):
            prunelab.prune(study="elsewhere")
        trained = prunelab.prune(method="random", target=0.9, finetune=False, settings=QUICK)
        again = prunelab.prune(method="l2", target=0.8, start_from=trained.runs["prune"], finetune=False,
                               settings=QUICK)
    for result in (trained, again):
        check_runs(client, result, ("train", "prune") if result is trained else ("prune",))
        assert result.study == "test-api-active-run"
        assert all(client.get_run(r).data.tags["mlflow.parentRunId"] == parent.info.run_id for r in result.runs.values())
    prune_run = client.get_run(again.runs["prune"])
    assert prune_run.data.params["input_model"] == trained.runs["prune"]
    assert [m.model_id for m in prune_run.inputs.model_inputs] == [trained.model_uri.removeprefix("models:/")]
    assert again.metrics["params"] < trained.metrics["params"]
