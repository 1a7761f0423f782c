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


def test_the_last_step_takes_the_fewest_filters_that_reach_the_target():
    """Ten filters of one layer, each worth 0.1 of the network: from 1.0 a step of 8 towards 0.75
    takes 3 (0.7 left; 2 would leave 0.8), the lowest-scored three, in log2(8) tries; a step that
    cannot reach the target takes all its filters, untried beyond the one look."""
    scores = {"a": torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.5, 0.4, 1.0])}
    tried = []

    def left_after(plan):
        tried.append(len(plan["a"]))
        return 1.0 - 0.1 * len(plan["a"])

    plan_of = lambda n: schedule.plan_step(scores, n)  # noqa: E731
    assert schedule.fewest_to_reach(plan_of, 8, left_after, 0.75) == {"a": [1, 3, 5]}
    assert tried[0] == 8 and len(tried) <= 1 + 3
    tried.clear()
    assert schedule.fewest_to_reach(plan_of, 2, left_after, 0.5) == {"a": [1, 5]} and tried == [2]
    # A target met exactly counts as reached: 5 filters leave 0.5.
    assert len(schedule.fewest_to_reach(plan_of, 8, left_after, 0.5)["a"]) == 5


def test_the_last_step_keeps_round_to_multiples():
    """With round_to=4 every count of filters cuts whole fours from 8-wide layers: the fewest
    that reach 0.5 cut exactly 8 of the 16 (never 12), each layer a multiple of 4."""
    scores = {"a": torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]), "b": torch.tensor([0.2] + [1.0] * 7)}
    plan_of = lambda n: schedule.plan_step(scores, n, round_to=4)  # noqa: E731
    left_after = lambda plan: 1.0 - sum(map(len, plan.values())) / 16  # noqa: E731
    plan = schedule.fewest_to_reach(plan_of, 8, left_after, 0.5)
    assert {name: len(i) for name, i in plan.items()} == {"a": 4, "b": 4}
