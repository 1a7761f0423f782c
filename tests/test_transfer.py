"""VGG16 transfer learning: the head trained on cached features, and the weights it starts from."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision

from prunelab import config, data, models, transfer
from prunelab.config import TrainConfig
from prunelab.errors import ModelError
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.models.vgg import VGG16Transfer


@pytest.fixture(scope="module")
def small_data(dogs_cats_dir, tmp_path_factory):
    import os

    os.environ.setdefault("PRUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = config.DataConfig(dataset="imagefolder", data_dir=str(dogs_cats_dir), image_size=32, n_train=48, n_test=16)
    return data.get(cfg)


def test_default_head_is_the_studys():
    """Dropout-Linear(25088,4096)-ReLU-Dropout-Linear(4096,4096)-ReLU-Linear(4096,2) on VGG16's 13 convs."""
    model = VGG16Transfer()
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 2)]
    assert [type(m).__name__ for m in model.classifier] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert len(model.prunable_convs()) == 13
    assert sum(p.numel() for p in model.parameters()) == 134_268_738
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)  # 7x7 pooling keeps 25088 at 32 px


def test_cached_features_train_the_same_head_as_uncached_training(small_data):
    """Same seed: the head trained on features computed once equals the head trained through the
    frozen convolutions every step; the cached path runs the convolutions once per image, not per epoch.
    In fp32: the cache computes features in fp32 whatever the precision (`transfer.train_head`), so
    in bf16 the uncached path's convolutions round differently by design."""
    torch.manual_seed(0)
    cached_model = VGG16Transfer(hidden=32, image_size=32)
    uncached_model = copy.deepcopy(cached_model)
    features_before = copy.deepcopy(cached_model.features.state_dict())
    head_before = transfer.head_parameters(cached_model)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="adam", lr=1e-3, precision="fp32")

    calls = []
    hook = cached_model.features.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    cached = transfer.train_head(cached_model, small_data, cfg, seed=7, feature_batch_size=16)
    hook.remove()
    uncached = transfer.train_head_uncached(uncached_model, small_data, cfg, seed=7)

    assert sum(calls) == len(small_data.train_y) + len(small_data.test_y), "features ran more than once per image"
    a, b = transfer.head_parameters(cached_model), transfer.head_parameters(uncached_model)
    assert any(not torch.equal(a[k], head_before[k]) for k in a), "the head did not train"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert [round(r.test_accuracy, 6) for r in cached] == [round(r.test_accuracy, 6) for r in uncached]
    for key, value in cached_model.features.state_dict().items():
        assert torch.equal(value, features_before[key]), "frozen features changed"


def test_local_weights_file_loads_into_the_features(tmp_path, small_data):
    """A torchvision VGG16 state dict given as transfer.weights fills the 13 convs exactly."""
    torch.manual_seed(3)
    reference = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    model, source = transfer.build("vgg16", small_data, weights=str(path), pretrained=True, head_width=16)
    assert source == str(path)
    assert torch.equal(model.features[28].weight, reference.features[28].weight)
    assert torch.equal(model.features[0].bias, reference.features[0].bias)


def test_weights_of_another_architecture_are_refused(tmp_path, small_data):
    """A state dict of a different network is a one-line ModelError naming the file."""
    path = tmp_path / "simple.pt"
    torch.save(SimpleCNN().state_dict(), path)
    with pytest.raises(ModelError) as err:
        transfer.build("vgg16", small_data, weights=str(path), pretrained=True, head_width=16)
    assert "is not a VGG16 state dict" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_pretrained_weights_point_to_both_options(small_data):
    """With no download possible and no local file, one line names --weights and --no-pretrained."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if hub.exists():
        pytest.skip("torchvision's VGG16 weights are cached on this machine")
    with pytest.raises(ModelError) as err:
        transfer.build("vgg16", small_data, weights="", pretrained=True, head_width=16)
    message = str(err.value)
    assert "--weights PATH" in message and "--no-pretrained" in message and "\n" not in message


def test_random_features_need_no_file(small_data):
    """transfer.pretrained=false builds without weights."""
    model, source = transfer.build("vgg16", small_data, weights="", pretrained=False, head_width=16)
    assert source == "random" and model.spec()["hidden"] == 16


def test_the_cifar_resnet20_checkpoint_gives_the_features_and_a_new_head(small_data, resnet20_file):
    """Every weight and BN statistic but the CIFAR-10 classifier comes from the checkpoint; the
    head is a new Linear(64, 2) on the pooled features, the only part left trainable when frozen."""
    from prunelab import checkpoints

    model, source = transfer.build("resnet20", small_data, weights=str(resnet20_file), pretrained=True, head_width=0)
    reference = checkpoints.state_dict_of(checkpoints.read(resnet20_file), resnet20_file)
    assert source == str(resnet20_file)
    for key, value in model.state_dict().items():
        if key.startswith("linear."):
            assert value.shape[0] == 2 and reference[key].shape[0] == 10
        elif key in reference:
            assert torch.equal(value, reference[key]), key
    assert model.head() is model.linear and model.head_input(torch.zeros(3, 3, 32, 32)).shape == (3, 64)
    model.set_features_trainable(False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"linear.weight", "linear.bias"}


@pytest.mark.parametrize("make, words", [
    (lambda: models.get("resnet20", mid_widths=[8] * 9).state_dict(), "does not fit an unpruned resnet20 (layer1.0.conv1.weight"),
    (lambda: models.get("resnet32").state_dict(), "the checkpoint is for resnet32"),
    (lambda: SimpleCNN().state_dict(), "holds no CIFAR ResNet"),
])
def test_a_resnet_state_dict_that_does_not_fit_is_refused(tmp_path, small_data, make, words):
    """A pruned ResNet20, another depth or another network: one line naming the file."""
    path = tmp_path / "other.pt"
    torch.save(make(), path)
    with pytest.raises(ModelError) as err:
        transfer.build("resnet20", small_data, weights=str(path), pretrained=True, head_width=0)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_resnet_without_a_weights_file_says_which_to_pass(small_data):
    with pytest.raises(ModelError) as err:
        transfer.build("resnet20", small_data, weights="", pretrained=True, head_width=0)
    assert "--weights PATH" in str(err.value) and "resnet20-12fca82f.th" in str(err.value) and "\n" not in str(err.value)
