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
