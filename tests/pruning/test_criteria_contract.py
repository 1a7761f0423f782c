"""Every registered criterion on every model family the suite has: one finite score per output
filter of each prunable layer, the same scores for the same seed, and a network that lacks what
a criterion needs refused in one line. A criterion added to `criteria.CRITERIA` is checked here
with no change to this file."""

import pytest
import torch

from prunelab import models
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import criteria, structure

# name -> (registry or factory name, input shape, classes, options): small sizes, the real layouts.
FAMILIES = {
    "simple_cnn": ("simple_cnn", (1, 28, 28), 10, {}),
    "conv2": ("conv2", (3, 32, 32), 10, {}),
    "resnet20": ("resnet20", (3, 32, 32), 10, {}),
    "vgg16": ("vgg16", (3, 32, 32), 2, {"widths": [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8], "hidden": 16}),
    "resnet18": ("torchvision:resnet18", (1, 32, 32), 10, {}),
    "mobilenet_v2": ("torchvision:mobilenet_v2", (1, 32, 32), 10, {}),
}
# The families whose every prunable layer has a BatchNorm after it (bn_scale's requirement).
WITH_BATCHNORM = {"resnet20", "resnet18", "mobilenet_v2"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name, shape, classes, options = FAMILIES[request.param]
    torch.manual_seed(0)
    model = models.build(name, shape, classes, **options)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *shape, generator=g), torch.randint(0, classes, (4,), generator=g)
    return request.param, model, structure.find(model, x), [(x[:3], y[:3]), (x[3:], y[3:])]


def run(criterion, model, layers, data):
    return criterion(model, layers.convs, data, total=None, outputs=layers.feature_maps, coupled=layers.filters)


@pytest.mark.parametrize("method", sorted(criteria.CRITERIA))
def test_every_criterion_scores_every_family_or_refuses_it_in_one_line(method, family):
    name, model, layers, data = family
    cls = criteria.CRITERIA[method]
    if method == "bn_scale" and name not in WITH_BATCHNORM:
        with pytest.raises(ModelError) as refused:
            run(cls(0), model, layers, data)
        assert "\n" not in str(refused.value) and "BatchNorm" in str(refused.value)
        with pytest.raises(ModelError):  # the study's own check, before any run, says the same
            cls(0).check(model, layers.convs, layers.feature_maps, layers.filters)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = run(cls(0), model, layers, data)
    assert list(scores) == list(layers.convs), "one entry per prunable layer, in network order"
    for layer, conv in layers.convs.items():
        s = scores[layer]
        assert s.shape == (conv.out_channels,) and s.dtype == torch.float32, layer
        assert torch.isfinite(s).all(), layer
    again = run(cls(0), model, layers, data)
    if cls.needs_data:
        # The same passes over the same images; oneDNN may sum a convolution's backward in another
        # order from one call to the next (seen on the torchvision networks: 3e-7), so not bit for bit.
        assert all(torch.allclose(scores[k], again[k], rtol=1e-5, atol=1e-6) for k in scores), "the same scores"
    else:
        assert all(torch.equal(scores[k], again[k]) for k in scores), "the same seed gives the same scores"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "scoring changes no weight or statistic"


@pytest.mark.parametrize("method", sorted(n for n, c in criteria.CRITERIA.items() if not c.needs_data))
def test_a_data_free_criterion_runs_no_ranking_pass(method):
    """A criterion that does not need data never iterates the ranking batches nor runs the model."""
    cls = criteria.CRITERIA[method]
    torch.manual_seed(0)
    model = models.build("resnet20", (3, 32, 32), 10)
    layers = structure.find(model, torch.zeros(1, 3, 32, 32))

    def untouchable():
        raise AssertionError("a data-free criterion read a ranking batch")
        yield

    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    run(cls(0), model, layers, untouchable())
    hook.remove()
    assert not calls


def test_the_registry_names_each_class_its_paper_and_its_settings():
    for name, cls in criteria.CRITERIA.items():
        assert cls.name == name and issubclass(cls, criteria.Criterion)
        assert cls.paper and isinstance(cls.needs_data, bool)
        assert all(len(v) == 2 and isinstance(v[1], str) for v in cls.settings.values())
    with pytest.raises(ConfigError, match=r"unknown pruning method 'nope': choose one of bn_scale, fpgm, hessian, l1, l2, random, taylor"):
        criteria.get("nope")
    with pytest.raises(ConfigError, match=r"criterion fpgm has no setting 'q' \(its settings: p\)"):
        criteria.get("fpgm", q=1)


def test_random_depends_on_the_seed():
    torch.manual_seed(0)
    model = models.build("simple_cnn", (1, 28, 28), 10)
    layers = structure.find(model, torch.zeros(1, 1, 28, 28))
    a, b = (run(criteria.get("random", seed), model, layers, None) for seed in (0, 1))
    assert not torch.equal(a["features.0"], b["features.0"])


def test_the_study_refuses_a_criterion_the_network_cannot_feed_before_any_run():
    """filter_pruning.prunable, which runs before `main` starts a run and before `prune` opens
    one, asks the criterion: bn_scale on the BatchNorm-free default CNN is one line."""
    from prunelab.studies.filter_pruning import PruneConfig, prunable

    torch.manual_seed(0)
    model = models.build("simple_cnn", (1, 28, 28), 10)
    with pytest.raises(ModelError, match="bn_scale") as refused:
        prunable(model, torch.zeros(2, 1, 28, 28), PruneConfig(method="bn_scale"))
    assert "\n" not in str(refused.value)
    assert prunable(model, torch.zeros(2, 1, 28, 28), PruneConfig(method="fpgm")).convs
