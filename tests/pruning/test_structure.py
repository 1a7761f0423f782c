"""What may be pruned, found from real torchvision networks' dependency graphs."""

import pytest
import torch
from torch import nn

from prunelab import models
from prunelab.errors import ConfigError, ModelError
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.pruning import criteria, schedule, structure, surgery

GREY_32 = (1, 32, 32)


def network(name: str, shape=GREY_32, classes: int = 10):
    torch.manual_seed(0)
    return models.build(name, shape, classes), torch.randn(2, *shape)


def test_resnet18_groups_the_convs_of_each_residual_sum():
    model, x = network("torchvision:resnet18")
    layers = structure.find(model, x)
    # One layer per residual stream (named after its first conv) and one inside each block.
    assert list(layers.convs) == [
        "network.conv1", "network.layer1.0.conv1", "network.layer1.1.conv1",
        "network.layer2.0.conv1", "network.layer2.0.conv2", "network.layer2.1.conv1",
        "network.layer3.0.conv1", "network.layer3.0.conv2", "network.layer3.1.conv1",
        "network.layer4.0.conv1", "network.layer4.0.conv2", "network.layer4.1.conv1"]
    stream = model.network.layer2
    assert set(layers.filters["network.layer2.0.conv2"]) == {stream[0].conv2, stream[0].downsample[0], stream[1].conv2}
    # Taylor scores the BatchNorm after each of them: the maps removing a filter deletes.
    assert set(layers.feature_maps["network.layer2.0.conv2"]) == {stream[0].bn2, stream[0].downsample[1], stream[1].bn2}
    assert layers.feature_maps["network.layer1.0.conv1"] == (model.network.layer1[0].bn1,)
    assert all(model.network.fc not in convs for convs in layers.filters.values())


def test_mobilenet_v2_couples_each_depthwise_conv_with_the_conv_before_it():
    model, x = network("torchvision:mobilenet_v2")
    layers = structure.find(model, x)
    block = model.network.features[4].conv
    expand, depthwise = block[0][0], block[1][0]
    assert depthwise.groups == depthwise.out_channels
    name = "network.features.4.conv.0.0"
    assert set(layers.filters[name]) == {expand, depthwise}
    assert set(layers.feature_maps[name]) == {block[0][1], block[1][1]}


def test_a_conv_classifier_keeps_its_classes():
    """SqueezeNet's classifier is a conv with one filter per class: never a prunable layer."""
    model, x = network("torchvision:squeezenet1_1", (1, 64, 64))
    layers = structure.find(model, x)
    assert "network.classifier.1" not in layers.convs and len(layers.convs) > 10
    remover = surgery.FilterRemover(model, x)
    remover.remove(schedule.plan_step(criteria.get("l1")(model, layers.convs, coupled=layers.filters), 200))
    assert model(x).shape == (2, 10)


def test_grouped_convs_keep_their_channels_and_the_residual_streams_are_pruned():
    """RegNet's grouped convs could lose channels only a conv group at a time: every layer that
    reaches one stays whole, and what is left (the stem, the residual streams) prunes cleanly."""
    model, x = network("torchvision:regnet_x_400mf")
    layers = structure.find(model, x)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and len(layers.convs) == 5  # the stem and one stream per stage
    assert not {c for convs in layers.filters.values() for c in convs} & set(grouped)
    surgery.remove_filters(model, schedule.plan_step(criteria.get("l1")(model, layers.convs, coupled=layers.filters), 100), x)
    assert model(x).shape == (2, 10)


def test_ignored_layers_keep_their_filters():
    model, x = network("torchvision:resnet18")
    every = structure.find(model, x)
    kept = structure.find(model, x, ["layer4", "network.conv1"])  # the factory's names, or the wrapper's
    assert set(every.convs) - set(kept.convs) == {"network.conv1", "network.layer4.0.conv1", "network.layer4.0.conv2",
                                                   "network.layer4.1.conv1"}


def test_an_unknown_ignored_layer_is_one_line_with_close_names():
    model, x = network("torchvision:resnet18")
    with pytest.raises(ConfigError, match=r"names 'layer4.1.conv3', which is no layer of the model: did you mean "):
        structure.find(model, x, ["layer4.1.conv3"])


def test_a_registered_model_keeps_its_own_choice():
    model = SimpleCNN()
    layers = structure.find(model, torch.zeros(1, 1, 28, 28))
    assert layers.convs == model.prunable_convs()
    assert layers.feature_maps == {n: (m,) for n, m in model.feature_maps().items()}
    assert list(structure.find(model, torch.zeros(1, 1, 28, 28), ["features.0"]).convs) == ["features.2"]


def test_nothing_to_prune_is_one_line():
    model = models.build("tests.models.tiny_factory:no_convs", (1, 28, 28), 10)
    with pytest.raises(ModelError, match="has no conv whose filters can be removed"):
        structure.find(model, torch.zeros(2, 1, 28, 28))


def test_coupled_l1_adds_the_filters_one_index_removes():
    model, x = network("torchvision:resnet18")
    layers = structure.find(model, x)
    name = "network.layer2.0.conv2"
    expected = sum(c.weight.detach().abs().sum(dim=(1, 2, 3)) for c in layers.filters[name])
    got = criteria.L1Criterion()(model, layers.convs, coupled=layers.filters)[name]
    assert torch.allclose(got, expected / expected.norm())


def test_coupled_taylor_sums_the_maps_one_index_deletes():
    """The score of a coupled layer is |sum over its maps of mean a * dL/da|: computed here
    directly, with the maps kept by forward hooks and their gradients by autograd."""
    model, x = network("torchvision:resnet18")
    layers = structure.find(model, x)
    name = "network.layer2.0.conv2"
    y = torch.tensor([3, 7])
    got = criteria.TaylorCriterion()(model, layers.convs, [(x, y)], outputs=layers.feature_maps)[name]

    maps = []

    def keep(_module, _inputs, out):
        maps.append(out)
        return out.clone()  # what follows (`out += identity`, ReLU in place) changes the copy, not the map kept

    handles = [m.register_forward_hook(keep) for m in layers.feature_maps[name]]
    model.eval()
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), maps)
    for h in handles:
        h.remove()
    raw = sum((a * g).mean(dim=(0, 2, 3)) for a, g in zip(maps, grads))
    assert torch.allclose(got, raw.abs() / raw.abs().norm(), atol=1e-5)
