"""Schedules and distillation as settings, through the real stages on a FashionMNIST slice:
a one-shot, uniform prune with the second-order criterion, then fine-tuning that distils from
the unpruned network the prune run started from. Every assertion reads the server."""

import pytest

from prunelab import studies
from prunelab.errors import ConfigError
from prunelab.studies import filter_pruning

pytestmark = pytest.mark.slow

SLICE = ["data.n_train=256", "data.n_test=128", "train.epochs=1", "finetune.epochs=1", "prune.rank_images=64",
         "prune.latency_repeats=0", "trials=1"]


def test_one_shot_uniform_hessian_then_distilled_fine_tuning(fashion_dir, tracking_uri, client):
    cfg = studies.load_config(overrides=SLICE + [
        "study=test-schedules-distillation", "prune.method=hessian", "prune.schedule=one_shot", "prune.scope=uniform",
        "prune.target_kind=filters", "prune.target=0.5", "prune.filters_per_step=3",
        "finetune.distill_temperature=4", "finetune.distill_weight=0.7"])
    train_id = filter_pruning.train(cfg, 0)
    prune_id = filter_pruning.prune(cfg, 0, train_id)
    prune = client.get_run(prune_id)
    assert prune.data.params["prune.schedule"] == "one_shot" and prune.data.params["prune.scope"] == "uniform"
    # Uniform: the default CNN's 8 and 16 filters keep the same share, half of each.
    assert (prune.data.metrics["filters_left.features.0"], prune.data.metrics["filters_left.features.2"]) == (4, 8)
    assert prune.data.metrics["rounds"] == 4
    finetune_id = filter_pruning.finetune(cfg, 0, prune_id)
    finetune = client.get_run(finetune_id)
    assert finetune.data.params["teacher_model"] == train_id
    assert finetune.data.params["finetune.distill_temperature"] == "4.0"
    assert finetune.data.params["finetune.distill_weight"] == "0.7"
    assert finetune.info.status == "FINISHED" and "train_loss" in finetune.data.metrics

    # A prune run that trained its own network names no unpruned one to learn from: refused in one line.
    no_teacher = studies.load_config(overrides=SLICE + ["study=test-schedules-distillation", "prune.target=0.9",
                                                         "prune.filters_per_step=4", "finetune.distill_temperature=4"])
    own = filter_pruning.prune(no_teacher, 0)
    with pytest.raises(ConfigError, match="needs the unpruned network") as refused:
        filter_pruning.finetune(no_teacher, 0, own)
    assert "\n" not in str(refused.value)
