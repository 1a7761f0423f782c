"""Taylor scores stay bit-identical to those of the implementation the studies' numbers came
from: `taylor_reference.pt` holds its scores on fixed networks and batches, computed before
the criteria became plug-ins over one ranking loop (run this file as a script to rewrite it,
only for a deliberate change of the criterion)."""

from pathlib import Path

import torch

from prunelab import models
from prunelab.data.base import batches
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.pruning import criteria, structure

REFERENCE = Path(__file__).parent / "data" / "taylor_reference.pt"


def cases():
    """name -> (model, layers, feature maps, batches): the default study's network over unequal
    batches, a CIFAR ResNet scored after its BatchNorms, and a torchvision ResNet's coupled layers."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    cnn = SimpleCNN()
    x = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (70,), generator=g)
    yield "simple_cnn", cnn, cnn.prunable_convs(), None, list(batches(x, y, 32, lambda t: t.float() / 255))
    torch.manual_seed(0)
    resnet = models.get("resnet20", num_classes=2)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 2, (8,), generator=g)
    yield "resnet20", resnet, resnet.prunable_convs(), resnet.feature_maps(), [(x, y)]
    torch.manual_seed(0)
    r18 = models.build("torchvision:resnet18", (1, 32, 32), 10)
    x, y = torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    layers = structure.find(r18, x)
    yield "resnet18", r18, layers.convs, layers.feature_maps, [(x, y)]


def scores():
    taylor = criteria.get("taylor")
    return {name: taylor(model, layers, data, outputs=maps) for name, model, layers, maps, data in cases()}


def test_taylor_scores_are_bit_identical_to_the_reference():
    expected = torch.load(REFERENCE)
    got = scores()
    assert set(got) == set(expected)
    for case, layers in expected.items():
        assert list(got[case]) == list(layers), case
        for name, reference in layers.items():
            assert got[case][name].dtype == reference.dtype and torch.equal(got[case][name], reference), (case, name)


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save(scores(), REFERENCE)
