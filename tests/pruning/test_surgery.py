"""Physical filter removal and the pruning schedule."""

import copy

import pytest
import torch

from prunelab import models
from prunelab.errors import ConfigError
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.pruning import schedule, surgery


def masked_forward(model, x, plan):
    """The original network with the planned feature maps zeroed."""
    modules = dict(model.named_modules())
    handles = []
    for name, idxs in plan.items():
        def zero(_m, _i, out, idxs=idxs):
            out = out.clone()
            out[:, idxs] = 0
            return out
        handles.append(modules[name].register_forward_hook(zero))
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def test_removal_keeps_the_outputs_of_kept_channels():
    """Before any fine-tuning, the slim network computes what the original computes
    with the removed feature maps zeroed: kept channels are untouched."""
    torch.manual_seed(0)
    model = SimpleCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    plan = {"features.0": [1, 5], "features.2": [0, 3, 7]}
    slim = copy.deepcopy(model)
    surgery.remove_filters(slim, plan, x[:1])
    kept = [i for i in range(16) if i not in plan["features.2"]]
    with torch.no_grad():
        assert torch.allclose(slim(x), masked_forward(model, x, plan), atol=1e-5)
        conv2_masked = masked_forward(model.features[:3], x, {"0": plan["features.0"]})
        assert torch.allclose(slim.features[:3](x), conv2_masked[:, kept], atol=1e-5)


def test_parameter_count_matches_the_plan():
    model = SimpleCNN()
    surgery.remove_filters(model, {"features.0": [0], "features.2": list(range(6))}, torch.zeros(1, 1, 28, 28))
    assert model.spec()["channels"] == [7, 10]
    assert models.count_params(model) == 79_120  # 126,698 -> 79,120: the published run's widths
    assert models.count_params(SimpleCNN()) == 126_698


def test_plan_takes_the_lowest_scores_and_never_empties_a_layer():
    scores = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.9, 0.05, 0.3])}
    assert schedule.plan_step(scores, 2) == {"a": [0], "b": [1]}
    # 3 = every candidate; the best filter of each layer is never one.
    assert schedule.plan_step(scores, 3) == {"a": [0], "b": [1, 2]}
    with pytest.raises(ConfigError, match="every filter of a layer"):
        schedule.plan_step(scores, 4)


def test_surgery_refuses_to_empty_a_layer():
    with pytest.raises(ConfigError, match="every filter"):
        surgery.remove_filters(SimpleCNN(), {"features.0": list(range(8))}, torch.zeros(1, 1, 28, 28))


def test_unreachable_target_is_refused():
    with pytest.raises(ConfigError, match="removing every filter of a layer"):
        schedule.check_reachable(0.01, "params", 0.062, "features.0")


@pytest.mark.parametrize("n, round_to", [(1, 4), (3, 4), (5, 8), (1, 8)])
def test_round_to_keeps_widths_multiples(n, round_to):
    """Every layer a step touches ends at a multiple of round_to, at least round_to, by its lowest scores."""
    torch.manual_seed(n * round_to)
    scores = {"a": torch.rand(8), "b": torch.rand(16), "c": torch.rand(10)}
    plan = schedule.plan_step(scores, n, round_to)
    assert plan and sum(len(v) for v in plan.values()) >= n
    for name, idxs in plan.items():
        left = len(scores[name]) - len(idxs)
        assert left % round_to == 0 and left >= round_to
        assert idxs == sorted(torch.argsort(scores[name])[: len(idxs)].tolist())
    # Without rounding, the same step takes exactly the n lowest filters.
    assert sum(len(v) for v in schedule.plan_step(scores, n).values()) == n


def test_round_to_refuses_a_step_no_layer_can_take():
    with pytest.raises(ConfigError, match="prune.round_to=8"):
        schedule.plan_step({"a": torch.rand(8), "b": torch.rand(6)}, 1, 8)


def _rebuilt_per_layer(model, plan, example):
    """The former surgery: a fresh dependency graph for every layer of every step."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    for name, idxs in plan.items():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=idxs).prune()


@pytest.mark.parametrize("build", [lambda: SimpleCNN(), lambda: models.get("vgg16", hidden=32, image_size=32)])
def test_one_graph_for_many_steps_makes_the_same_network(build):
    """A FilterRemover traces once and prunes step after step; the result equals rebuilding the
    graph for every layer of every step, parameter for parameter."""
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(2, *((1, 28, 28) if isinstance(model, SimpleCNN) else (3, 32, 32)))
    reference = copy.deepcopy(model)
    remover = surgery.FilterRemover(model, example)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        scores = {n: torch.rand(c.out_channels, generator=generator) for n, c in model.prunable_convs().items()}
        plan = schedule.plan_step(scores, 5)
        remover.remove(plan)
        _rebuilt_per_layer(reference, plan, example)
    assert model.spec() == reference.spec()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(example), reference(example))
