"""Schedules as settings: a uniform scope's steps, and the scores a one-shot schedule plans from."""

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.pruning import schedule


def test_uniform_takes_the_same_share_of_every_layer_by_its_own_ranking():
    """Widths 4 and 8: 6 picks go 1, 2, 1, 2 ... to the layer keeping the largest share, leaving
    2 of 4 and 4 of 8 (half of each), each layer losing its own lowest filters, although every
    score of `b` is above every score of `a` (global would take `a`'s first)."""
    scores = {"a": torch.tensor([0.4, 0.1, 0.3, 0.2]), "b": torch.tensor([9.0, 5, 8, 1, 7, 2, 6, 3])}
    plan = schedule.plan_uniform_step(scores, 6)
    assert plan == {"a": [1, 3], "b": [1, 3, 5, 7]}
    assert schedule.plan_step(scores, 6) == {"a": [1, 2, 3], "b": [3, 5, 7]}


def test_uniform_shares_count_from_the_original_widths():
    """After a step, `a` keeps 2 of 4 and `b` 6 of 8: the next single filter comes from `b`."""
    scores = {"a": torch.tensor([0.3, 0.1]), "b": torch.rand(6)}
    assert list(schedule.plan_uniform_step(scores, 1, widths0={"a": 4, "b": 8})) == ["b"]
    with pytest.raises(ConfigError, match="every filter of a layer"):
        schedule.plan_uniform_step(scores, 7)


def test_uniform_round_to_keeps_widths_multiples():
    plan = schedule.plan_uniform_step({"a": torch.rand(8), "b": torch.rand(16)}, 3, round_to=4)
    assert {name: len(i) for name, i in plan.items()} == {"a": 4, "b": 4}


def test_without_keeps_the_scores_of_the_filters_a_step_kept_in_order():
    scores = {"a": torch.tensor([0.4, 0.1, 0.3, 0.2]), "b": torch.tensor([1.0, 2.0])}
    kept = schedule.without(scores, {"a": [1, 3]})
    assert torch.equal(kept["a"], torch.tensor([0.4, 0.3])) and torch.equal(kept["b"], scores["b"])
