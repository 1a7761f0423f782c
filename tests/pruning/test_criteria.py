"""Each criterion against a case computed by hand; Taylor also against an independent computation."""

import math

import pytest
import torch
from torch import nn

from prunelab import models
from prunelab.data.base import batches
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.pruning import criteria
from prunelab.pruning.criteria import L1Criterion, TaylorCriterion


class OneConv(nn.Module):
    """x -> 1x1 conv (weights 1, 2, no bias) -> flatten -> linear [[1, 1], [0, 0]]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_hand_computed_case():
    """a = (1, 2); logits (3, 0), label 0: dL/da_k = -(1 - sigmoid(3)) for both maps,
    so the raw scores are (1, 2) * (1 - sigmoid(3)), normalised to (1, 2) / sqrt(5)."""
    model = OneConv()
    x, y = torch.ones(1, 1, 1, 1), torch.tensor([0])
    scores = TaylorCriterion()(model, {"conv": model.conv}, [(x, y)])["conv"]
    assert torch.allclose(scores, torch.tensor([1 / math.sqrt(5), 2 / math.sqrt(5)]), atol=1e-6)


def test_mean_is_taken_before_the_absolute_value():
    """Two samples whose products have opposite signs partly cancel (|mean|, not mean |.|)."""
    model = OneConv()
    x = torch.ones(2, 1, 1, 1)
    y = torch.tensor([0, 1])  # grads -(1 - s) and s with s = sigmoid(3)
    s = torch.sigmoid(torch.tensor(3.0)).item()
    raw = torch.tensor([1.0, 2.0]) * abs((-(1 - s) + s) / 2)
    scores = TaylorCriterion()(model, {"conv": model.conv}, [(x, y)])["conv"]
    assert torch.allclose(scores, raw / raw.norm(), atol=1e-6)


def test_matches_an_independent_computation_over_several_batches():
    """Hooks and accumulation over unequal batches equal a direct autograd computation."""
    torch.manual_seed(0)
    model = SimpleCNN()
    x = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (70,))
    norm = lambda t: t.float() / 255  # noqa: E731
    layers = model.prunable_convs()
    got = TaylorCriterion()(model, layers, batches(x, y, 32, norm))  # batches of 32, 32, 6

    # Direct: keep both conv outputs, one backward over the summed per-batch losses.
    expected = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in layers.items()}
    count = 0
    for xb, yb in batches(x, y, 32, norm):
        a1 = model.features[0](xb)
        a2 = model.features[2](model.features[1](a1))
        a1.retain_grad()
        a2.retain_grad()
        nn.functional.cross_entropy(model.classifier(model.features[3](a2)), yb).backward()
        expected["features.0"] += (a1 * a1.grad).sum(dim=(0, 2, 3)).double()
        expected["features.2"] += (a2 * a2.grad).sum(dim=(0, 2, 3)).double()
        count += len(yb) * 28 * 28
    for name in layers:
        raw = (expected[name] / count).abs().float()
        assert torch.allclose(got[name], raw / raw.norm(), atol=1e-5)


def test_ranking_keeps_no_feature_map_alive():
    """Every feature map a ranking pass saw is freed when it returns: a study that runs its
    steps in one process ranks dozens of times, and kept maps grew it by GBs a step."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = SimpleCNN()
    seen = []
    spy = model.features[0].register_forward_hook(lambda _m, _i, out: seen.append(weakref.ref(out)))
    x, y = torch.rand(24, 1, 28, 28), torch.randint(0, 10, (24,))
    TaylorCriterion()(model, model.prunable_convs(), batches(x, y, 8, lambda t: t))
    spy.remove()
    gc.collect()
    assert len(seen) == 3 and all(ref() is None for ref in seen)


def test_l1_scores_follow_filter_norms():
    model = SimpleCNN()
    with torch.no_grad():
        model.features[0].weight.zero_()
        model.features[0].weight[3] = 1.0
    scores = L1Criterion()(model, model.prunable_convs())["features.0"]
    assert scores.argmax().item() == 3 and scores.sum().item() == 1.0


def test_a_resnet_block_is_scored_after_its_batchnorm_and_relu():
    """Where BatchNorm sits between conv and ReLU (a ResNet block), the scores are those of the
    post-ReLU map a filter's removal deletes, |mean(z * dL/dz)|, computed here independently
    by making bn1 emit the ReLU's output itself; the conv's own output ranks differently."""
    torch.manual_seed(0)
    model = models.get("resnet20", num_classes=2).eval()
    with torch.no_grad():  # BN statistics away from the identity, as in a trained network
        for _, block in model.blocks():
            block.bn1.running_mean.normal_(0, 0.5)
            block.bn1.bias.normal_(0, 0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    layers = model.prunable_convs()
    got = TaylorCriterion()(model, layers, [(x, y)], outputs=model.feature_maps())

    kept = {}

    def emit_relu(name):
        def hook(_module, _inputs, output):
            z = nn.functional.relu(output)  # the block's own F.relu then changes nothing
            z.retain_grad()
            kept[name] = z
            return z
        return hook

    handles = [block.bn1.register_forward_hook(emit_relu(f"{name}.conv1")) for name, block in model.blocks()]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    for name, z in kept.items():
        raw = (z * z.grad).mean(dim=(0, 2, 3)).abs()
        assert torch.allclose(got[name], raw / raw.norm(), atol=1e-5), name
    conv_scores = TaylorCriterion()(model, layers, [(x, y)])
    assert any(not torch.allclose(got[n], conv_scores[n], atol=1e-3) for n in layers)


# --------------------------------------------------------------------------- data-free criteria by hand

def three_filters() -> nn.Conv2d:
    """Filters [1, -2], [3, 4] and [0, 0] (one input channel, a 1x2 kernel)."""
    conv = nn.Conv2d(1, 3, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]]).view(3, 1, 1, 2))
    return conv


def unit(*values) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.norm()


def test_l1_and_l2_are_the_filter_norms():
    """|1| + |-2| = 3, |3| + |4| = 7, 0; sqrt(1 + 4), sqrt(9 + 16) = 5, 0."""
    conv = three_filters()
    l1 = criteria.get("l1")(conv, {"c": conv})["c"]
    l2 = criteria.get("l2")(conv, {"c": conv})["c"]
    assert torch.allclose(l1, unit(3, 7, 0)) and torch.allclose(l2, unit(math.sqrt(5), 5, 0))


def test_coupled_l1_and_l2_count_every_filter_one_index_removes():
    """A second conv with filters [1, 1], [0, 0], [2, 0] loses filter k with the first:
    l1 = (3 + 2, 7 + 0, 0 + 2), l2 = sqrt(5 + 2, 25 + 0, 0 + 4)."""
    a, b = three_filters(), three_filters()
    with torch.no_grad():
        b.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]).view(3, 1, 1, 2))
    coupled = {"a": (a, b)}
    assert torch.allclose(criteria.get("l1")(a, {"a": a}, coupled=coupled)["a"], unit(5, 7, 2))
    assert torch.allclose(criteria.get("l2")(a, {"a": a}, coupled=coupled)["a"], unit(math.sqrt(7), 5, 2))


def test_fpgm_sums_the_distances_to_the_other_filters():
    """As He et al. define it: distances between the filters themselves, signs and all.
    Filters [1, -2], [3, 4], [0, 0]: Euclidean d01 = sqrt(4 + 36), d02 = sqrt(1 + 4), d12 = 5;
    with p = 1, d01 = 2 + 6, d02 = 1 + 2, d12 = 3 + 4."""
    conv = three_filters()
    d01, d02, d12 = math.sqrt(40), math.sqrt(5), 5.0
    got = criteria.get("fpgm")(conv, {"c": conv})["c"]
    assert torch.allclose(got, unit(d01 + d02, d01 + d12, d02 + d12))
    d01, d02, d12 = 8.0, 3.0, 7.0
    got = criteria.get("fpgm", p=1)(conv, {"c": conv})["c"]
    assert torch.allclose(got, unit(d01 + d02, d01 + d12, d02 + d12))
    assert got.argmin().item() == 2  # the filter nearest the others' median goes first


def test_fpgm_tells_filters_of_opposite_sign_apart():
    """[1, 2] and [-1, -2] are as far apart as two filters can be here; |w|^p would call them equal."""
    conv = nn.Conv2d(1, 3, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, 2.0]]).view(3, 1, 1, 2))
    got = criteria.get("fpgm")(conv, {"c": conv})["c"]
    far = 2 * math.sqrt(5)
    assert torch.allclose(got, unit(far, 2 * far, far))


def test_bn_scale_is_the_batchnorms_absolute_gamma():
    """gamma (0.5, -2, 1) -> |gamma| (0.5, 2, 1); a coupled layer adds its BatchNorms' (plus (1, 1, 3))."""
    conv, bn, other = three_filters(), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        other.weight.copy_(torch.tensor([1.0, 1.0, 3.0]))
    bn_scale = criteria.get("bn_scale")
    assert torch.allclose(bn_scale(conv, {"c": conv}, outputs={"c": (bn,)})["c"], unit(0.5, 2, 1))
    assert torch.allclose(bn_scale(conv, {"c": conv}, outputs={"c": (bn, other)})["c"], unit(1.5, 3, 4))


def test_bn_scale_refuses_a_network_without_batchnorm_in_one_line():
    from prunelab.errors import ModelError

    model = SimpleCNN()
    with pytest.raises(ModelError, match=r"bn_scale .* layer features\.0 has no BatchNorm") as refused:
        criteria.get("bn_scale")(model, model.prunable_convs(), outputs=model.feature_maps())
    assert "\n" not in str(refused.value)


def test_random_is_unnormalised_and_seeded():
    conv = three_filters()
    a, b = (criteria.get("random", 7)(conv, {"c": conv})["c"] for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_hessian_hand_computed_case():
    """OneConv, x = 1: logits (a1 + a2, 0) = (3, 0) and dL/dw_k = dL/da_k = -(1 - s) for label 0,
    s for label 1 (s = sigmoid(3)). Two images, one of each label: Fisher F = ((1 - s)^2 + s^2) / 2
    for both weights, saliencies w^2 F / 2 = (1, 4) F / 2, normalised to (1, 4) / sqrt(17). The mean
    gradient squared, ((s - (1 - s)) / 2)^2, would scale the same way: the raw scores tell them apart."""
    model = OneConv()
    x, y = torch.ones(2, 1, 1, 1), torch.tensor([0, 1])
    s = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)).item()
    fisher = ((1 - s) ** 2 + s**2) / 2
    criterion = criteria.get("hessian")
    scores = criterion(model, {"conv": model.conv}, [(x, y)])["conv"]
    assert torch.allclose(scores, torch.tensor([1 / math.sqrt(17), 4 / math.sqrt(17)]), atol=1e-6)
    raw = criteria.get("hessian")
    raw.normalise = False
    unnormalised = raw(model, {"conv": model.conv}, [(x[:1], y[:1]), (x[1:], y[1:])])["conv"]
    assert torch.allclose(unnormalised, torch.tensor([1.0, 4.0]) * fisher / 2, atol=1e-6)
    assert model.conv.weight.grad is None, "the Fisher handed to Torch-Pruning is taken back"


def test_hessian_matches_per_image_gradients_computed_directly():
    """Per-image backward passes in batches of 32, 32 and 6 equal sum_i w^2 * mean_n (dL_n/dw)^2 / 2
    computed image by image with torch.autograd.grad."""
    torch.manual_seed(0)
    model = SimpleCNN().eval()
    x = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (70,))
    norm = lambda t: t.float() / 255  # noqa: E731
    layers = model.prunable_convs()
    criterion = criteria.get("hessian")
    criterion.normalise = False
    got = criterion(model, layers, batches(x, y, 32, norm))
    convs = list(layers.values())
    fisher = [torch.zeros_like(c.weight, dtype=torch.float64) for c in convs]
    for n in range(70):
        loss = nn.functional.cross_entropy(model(norm(x[n:n + 1])), y[n:n + 1])
        for f, g in zip(fisher, torch.autograd.grad(loss, [c.weight for c in convs])):
            f += g.double().square()
    for (name, conv), f in zip(layers.items(), fisher):
        want = (conv.weight.double().square() * f / 70).flatten(1).sum(1) / 2
        assert torch.allclose(got[name].double(), want, rtol=1e-4, atol=1e-12), name
