"""k-means merging of any network: which convs its dependency graph lets merge, and that
merging them is exact (real torchvision and factory networks, real FashionMNIST images)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab import checkpoints, config, data, models
from prunelab.errors import ConfigError
from prunelab.models import factory
from prunelab.pruning import clustering, merging


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    return data.get(config.DataConfig(dataset="fashionmnist", data_dir=str(fashion_dir), n_train=64, n_test=64))


def _with_statistics(net: nn.Module) -> nn.Module:
    """A fresh network whose BatchNorms are not the identity (as a trained one's are not), so
    folding them is tested; seeded."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_graph_finds_what_may_merge():
    """ResNet-18: each block's first conv (the others feed residual sums); MobileNetV2: the two
    projections no residual reads; a chain: every other conv; a network whose every conv
    feeds a sum, a depthwise conv or the output: none."""
    def found(name, shape):
        net = factory.build(name, shape, 10).eval()
        return list(merging.mergeable(net, torch.zeros(1, *shape)))

    assert found("torchvision:resnet18", (3, 32, 32)) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert found("torchvision:mobilenet_v2", (3, 32, 32)) == ["features.1.conv.1", "features.17.conv.2"]
    assert found("tests.models.tiny_factory:chain", (1, 28, 28)) == ["0", "7"]
    assert found("tests.models.tiny_factory:build", (1, 28, 28)) == []


def test_merging_any_network_is_exact(fashion, tmp_path):
    """The merged network computes what the unmerged centroid network computes (through a
    BatchNorm folded in, a bias, a max-pool and a flatten into a Linear layer), is smaller,
    and reloads from its weights-only checkpoint with the same outputs. (MobileNetV2's merges:
    tests/studies/test_kmeans_clustering.py.)"""
    name = "tests.models.tiny_factory:chain"
    net = _with_statistics(factory.build(name, fashion.input_shape, fashion.num_classes))
    x = fashion.normalise(fashion.test_x[:32])
    plan = merging.plan_merge(net, 0.5, seed=0, n_init=1, example=x[:2])
    centroid_net, merged = copy.deepcopy(net), copy.deepcopy(net)
    merging.apply_merge(centroid_net, plan, centroids_only=True, example=x[:2])
    widths = merging.apply_merge(merged, plan, example=x[:2])
    convs = clustering.conv_layers(merged)
    assert widths == {n: round(0.5 * clustering.conv_layers(net)[n].out_channels) for n in plan}
    assert all(convs[n].out_channels == k for n, k in widths.items())
    with torch.no_grad():
        out_merged, out_centroid, original = merged(x), centroid_net(x), net(x)
    assert (out_merged - out_centroid).abs().max().item() <= 1e-5 * max(out_centroid.abs().max().item(), 1.0)
    assert not torch.allclose(out_centroid, original)  # the centroids did change the network
    assert models.count_params(merged) < models.count_params(net)
    reloaded = checkpoints.load(checkpoints.save(merged, tmp_path / "merged.pt"), name)
    with torch.no_grad():
        assert torch.equal(reloaded(x), out_merged)


def test_a_plan_for_another_network_is_refused():
    net = factory.build("tests.models.tiny_factory:chain", (1, 28, 28), 10).eval()
    plan = merging.plan_merge(net, 0.5, seed=0, n_init=1)
    other = factory.build("tests.models.tiny_factory:build", (1, 28, 28), 10).eval()
    with pytest.raises(ConfigError, match="no mergeable conv '0' in this model"):
        merging.apply_merge(other, plan)


def test_stages_and_layers_of_a_factory_network():
    """A stage is any module holding convs; names as the network names them; unknown ones list valid ones."""
    net = factory.build("torchvision:resnet18", (3, 32, 32), 10)
    assert clustering.resolve_stage(net, "layer1") == [f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    assert clustering.resolve_layers(net, ["layer4.1.conv2"])["layer4.1.conv2"] is net.network.layer4[1].conv2
    with pytest.raises(ConfigError, match="no stage 'layer5' in this model: valid ones are conv1, layer1, layer2, layer3, layer4"):
        clustering.resolve_stage(net, "layer5")
    with pytest.raises(ConfigError, match="no conv layer 'network.conv1'"):
        clustering.resolve_layers(net, ["network.conv1"])
