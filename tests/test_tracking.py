"""What MLflow shows for a study, read back from the real server after `prunelab run`
(the `tiny_study` fixture): every logged model carries the metrics of the state it
holds, works without prunelab, and every run says what it read."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from prunelab import paths
from prunelab.tracking import run as tracking_run
from without_prunelab import load_and_score



def model_of(client, run):
    """The run's final LoggedModel."""
    return client.get_logged_model(run.data.tags[paths.TAG_MODEL_URI].removeprefix("models:/"))


def model_metrics(logged_model) -> dict[str, float]:
    return {m.key: m.value for m in logged_model.metrics}


def last(client, run_id, key) -> float:
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


@pytest.mark.slow
def test_final_models_carry_the_numbers_of_the_state_they_hold(tiny_study, client):
    """Each prune run's final model has the run's last params, fraction and accuracy; each
    fine-tuned model its run's last test accuracy and the pruned size (not the unpruned one)."""
    for trial in (0, 1):
        prune, finetune = tiny_study["by_stage"][("prune", trial)], tiny_study["by_stage"][("finetune", trial)]
        pruned = model_metrics(model_of(client, prune))
        for key in ("params", "fraction_remaining", "test_accuracy", "macs"):
            assert pruned[key] == last(client, prune.info.run_id, key), key
        assert pruned["params"] < 126_698 and pruned["fraction_remaining"] <= 0.6
        tuned = model_metrics(model_of(client, finetune))
        assert tuned["test_accuracy"] == last(client, finetune.info.run_id, "test_accuracy")
        assert tuned["params"] == pruned["params"] and tuned["fraction_remaining"] == pruned["fraction_remaining"]
        trained = model_metrics(model_of(client, tiny_study["by_stage"][("train", trial)]))
        assert (trained["params"], trained["fraction_remaining"]) == (126_698, 1.0)


@pytest.mark.slow
def test_round_models_carry_their_round(tiny_study, client):
    """model_round_k holds the network right after round k: its metrics are step k's."""
    prune = tiny_study["by_stage"][("prune", 0)]
    rounds = client.search_logged_models([tiny_study["experiment_id"]],
                                         filter_string=f"source_run_id = '{prune.info.run_id}' AND name LIKE 'model_round_%'")
    assert len(rounds) >= 2
    params = dict((m.step, m.value) for m in client.get_metric_history(prune.info.run_id, "params"))
    for lm in rounds:
        k = int(lm.name.rsplit("_", 1)[1])
        metrics = {m.key: (m.step, m.value) for m in lm.metrics}
        assert metrics["params"] == (k, params[k])
        assert client.get_run(prune.info.run_id).outputs is not None
    assert len({model_metrics(lm)["params"] for lm in rounds}) == len(rounds)  # each its own size


@pytest.mark.slow
def test_round_models_are_weights_only_and_reload(tiny_study, client, tmp_path):
    """A round model holds only the bare network's weights-only checkpoint (no pt2 export: it is
    logged every round), and loads back, with nothing unpickled, as a network of the size its
    metrics say; the final models stay pt2 models."""
    from mlflow.artifacts import list_artifacts

    from prunelab import models
    from prunelab.tracking import loading, models as logged_models

    prune = tiny_study["by_stage"][("prune", 0)]
    rounds = client.search_logged_models([tiny_study["experiment_id"]],
                                         filter_string=f"source_run_id = '{prune.info.run_id}' AND name LIKE 'model_round_%'")
    for lm in rounds:
        assert lm.tags.get(logged_models.TAG_WEIGHTS_ONLY) == "true"
        assert [f.path.rsplit("/", 1)[-1] for f in list_artifacts(artifact_uri=lm.artifact_location)] == [paths.CHECKPOINT]
        network = loading.load_model(f"models:/{lm.model_id}")
        assert models.is_registered(network)
        assert sum(p.numel() for p in network.parameters()) == model_metrics(lm)["params"]
    final = model_of(client, prune)
    assert logged_models.TAG_WEIGHTS_ONLY not in final.tags
    assert logged_models.PT2_FILE in {f.path.rsplit("/", 1)[-1] for f in
                                      list_artifacts(artifact_uri=f"{final.artifact_location}/data")}


@pytest.mark.slow
def test_search_by_metric_finds_the_fine_tuned_models(tiny_study, client):
    tuned = {model_of(client, tiny_study["by_stage"][("finetune", t)]).model_id: t for t in (0, 1)}
    lowest = min(model_metrics(client.get_logged_model(m))["test_accuracy"] for m in tuned)
    found = client.search_logged_models([tiny_study["experiment_id"]], filter_string=f"metrics.test_accuracy >= {lowest}")
    assert set(tuned) <= {m.model_id for m in found}
    best = client.search_logged_models([tiny_study["experiment_id"]], filter_string="name = 'model'",
                                       order_by=[{"field_name": "metrics.test_accuracy", "ascending": False}])
    assert [model_metrics(m)["test_accuracy"] for m in best] == sorted((model_metrics(m)["test_accuracy"] for m in best), reverse=True)


def _raw_fashion_test(n: int, folder) -> tuple[np.ndarray, np.ndarray]:
    """The first n FashionMNIST test images as a person reads them from the IDX files: float pixels in [0, 1]."""
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    return images.astype(np.float32) / 255.0, labels


@pytest.mark.slow
def test_a_fine_tuned_model_works_without_prunelab(tiny_study, client, tracking_uri, fashion_dir, tmp_path):
    """By its URI, in a process where prunelab cannot be imported, on raw pixels in [0, 1]:
    pyfunc and pytorch flavours both score the accuracy the run logged; pyfunc names its
    logits by the class names."""
    from mlflow.models import get_model_info
    from conftest import clean_env

    finetune = tiny_study["by_stage"][("finetune", 1)]
    uri = finetune.data.tags[paths.TAG_MODEL_URI]
    pixels, labels = _raw_fashion_test(200, fashion_dir)  # the study's data.n_test
    result = load_and_score(uri, pixels, labels, clean_env(tracking_uri), tmp_path)
    logged = last(client, finetune.info.run_id, "test_accuracy")
    assert result["prunelab_modules"] == [] and result["shape"] == [200, 10]
    assert result["columns"] == get_model_info(uri).metadata["classes"] and "Ankle boot" in result["columns"]
    assert result["pyfunc_accuracy"] == pytest.approx(logged, abs=0.002)
    assert result["torch_accuracy"] == pytest.approx(logged, abs=0.002)
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_the_signature_and_metadata_say_what_goes_in(tiny_study, client):
    from mlflow.models import get_model_info

    info = get_model_info(tiny_study["by_stage"][("finetune", 0)].data.tags[paths.TAG_MODEL_URI])
    (spec,) = info.signature.inputs.inputs
    assert spec.shape == (-1, 1, 28, 28) and str(spec.type) == "float32"
    # pyfunc's output: a float32 column of logits per class, in the network's order
    assert info.signature.outputs.input_names() == info.metadata["classes"] and len(info.metadata["classes"]) == 10
    assert {c.type.name for c in info.signature.outputs.inputs} == {"float"}
    assert "pixels in [0, 1]" in info.metadata["input"] and info.metadata["mean"] == [0.286]
    assert info.metadata["pixel_range"] == [0.0, 1.0]


@pytest.mark.slow
def test_every_run_records_its_datasets_and_the_model_it_read(tiny_study, client):
    runs = tiny_study["runs"]
    assert {r.data.tags["stage"] for r in runs} == {"main", "train", "prune", "finetune", "report"}
    for r in runs:
        inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
                  for d in r.inputs.dataset_inputs}
        # the default study holds out the training set's last 5,000 images as its validation split
        assert set(inputs) == {("fashionmnist-train", "train"), ("fashionmnist-validation", "validation"),
                               ("fashionmnist-test", "test")}, r.info.run_name
        assert json.loads(inputs[("fashionmnist-validation", "validation")].profile) == {"num_rows": 5000}
        assert json.loads(inputs[("fashionmnist-test", "test")].profile) == {"num_rows": 200}
        assert json.loads(inputs[("fashionmnist-train", "train")].profile) == {"num_rows": 600}
        assert "fashion-mnist" in json.loads(inputs[("fashionmnist-train", "train")].source)["uri"]
    for trial in (0, 1):
        for stage, source in (("prune", "train"), ("finetune", "prune")):
            read = [m.model_id for m in tiny_study["by_stage"][(stage, trial)].inputs.model_inputs]
            assert read == [model_of(client, tiny_study["by_stage"][(source, trial)]).model_id]
    digests = {d.dataset.digest for r in runs for d in r.inputs.dataset_inputs}
    assert len(digests) == 3  # every run read the same three image sets


@pytest.mark.slow
def test_the_experiment_opens_on_runs_and_runs_describe_themselves(tiny_study, client):
    exp = client.get_experiment(tiny_study["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for r in tiny_study["runs"]:
        note = r.data.tags[tracking_run.NOTE]
        assert f"**{r.data.tags['stage']}**" in note and tiny_study["study"] in note
        # `mlflow run` logs its own MLproject params (an empty one as ''); prunelab logs none empty.
        own = {k: v for k, v in r.data.params.items() if k not in ("study", "overrides", "data_dir", "trial", "model_uri", "out_dir")}
        assert "" not in own.values() and "data.data_dir" not in own, r.info.run_name


@pytest.mark.slow
def test_report_names_its_sources_and_logs_its_numbers(tiny_study, client):
    report = tiny_study["by_stage"][("report", -1)]
    sources = set(report.data.tags[paths.TAG_SOURCE_RUNS].split(","))
    expected = {tiny_study["by_stage"][(s, t)].info.run_id for s in ("train", "prune", "finetune") for t in (0, 1)}
    assert sources == expected
    metrics = report.data.metrics
    tuned = [last(client, tiny_study["by_stage"][("finetune", t)].info.run_id, "test_accuracy") for t in (0, 1)]
    assert metrics["pruned_fine-tuned.test_accuracy_mean"] == pytest.approx(np.mean(tuned))
    assert metrics["original.params"] == 126_698
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id, paths.REPORT_DIR)}
    assert {f"{paths.REPORT_DIR}/{paths.REPORT_TABLE}", f"{paths.REPORT_DIR}/{paths.REPORT_MARKDOWN}",
            f"{paths.REPORT_DIR}/test_accuracy.png", f"{paths.REPORT_DIR}/test_loss.png"} <= artifacts
    table = client.load_table(tiny_study["experiment_id"], paths.REPORT_JSON_TABLE, run_ids=[report.info.run_id])
    assert table["model"].tolist() == ["original", "pruned + fine-tuned"]
    assert {"path": paths.REPORT_JSON_TABLE, "type": "table"} in json.loads(report.data.tags["mlflow.loggedArtifacts"])
    assert json.loads(open(client.download_artifacts(report.info.run_id, paths.SOURCE_RUNS)).read())["source_runs"] == sorted(expected)


def test_metrics_logged_after_a_model_at_its_step_name_it(tracking_uri, client):
    """Run.log_model flushes first (the model gets its step's metrics); metrics logged later at
    that step link to it unless they describe another state; other steps never do."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 26 * 26, 3))
    example = torch.rand(2, 1, 28, 28)
    with tracking_run.start_run("test-model-links", "train", {"study": "test-model-links"}, "links") as run:
        run.log_metrics({"params": 123, "test_accuracy": 0.5}, step=3, flush=False)  # still buffered
        run.log_metrics({"test_accuracy": 0.25}, step=2, flush=False)
        uri = run.log_model(module, "model", example, step=3)
        run.log_metrics({"latency_ms": 1.5}, step=3)
        run.log_metrics({"retrained_test_accuracy": 0.75}, step=3, model_linked=False)
        run.log_metrics({"test_accuracy": 0.9}, step=4)
    model = client.get_logged_model(uri.removeprefix("models:/"))
    assert {(m.key, m.step, m.value) for m in model.metrics} == {("params", 3, 123), ("test_accuracy", 3, 0.5),
                                                                 ("latency_ms", 3, 1.5)}
    assert [m.step for m in client.get_metric_history(run.run_id, "latency_ms")] == [3]  # a run metric all the same


def test_runs_that_record_one_new_data_set_at_once_all_record_it(client):
    """Parallel trials start their runs together, and each records the same data set. MLflow's
    server inserts a new data set with a lookup then an insert, not atomically, so all but one
    of several simultaneous first uses fail on its unique key unless the call is made again.
    Every run must end up with the data set."""
    import threading
    import uuid

    from prunelab.data.base import Split

    tag = uuid.uuid4().hex
    split = Split(name=f"race-{tag[:8]}", context="train", digest=tag[:16], source="test://race",
                  images=10, image_shape=(1, 28, 28))
    experiment = client.create_experiment(f"test-input-race-{tag[:8]}")
    runs = [tracking_run.Run(client.create_run(experiment).info.run_id) for _ in range(8)]
    start, errors = threading.Barrier(len(runs)), []

    def record(run):
        start.wait()
        try:
            run.log_inputs([split])
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for run in runs:
        inputs = client.get_run(run.run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [(split.name, split.digest)]
