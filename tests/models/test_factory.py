"""Networks from factories: real torchvision classifiers and a user's function, built,
pruned with Torch-Pruning, saved and reloaded weights-only."""

import sys

import pytest
import torch

from prunelab import checkpoints, models
from prunelab.errors import ConfigError, ModelError
from prunelab.models import factory
from prunelab.pruning import criteria, schedule, structure, surgery

USER_FACTORY = "tests.models.tiny_factory:build"


def pruned(name: str, shape=(1, 32, 32), filters: int = 40):
    torch.manual_seed(0)
    model = models.build(name, shape, 10)
    x = torch.randn(2, *shape)
    layers = structure.find(model, x)
    surgery.remove_filters(model, schedule.plan_step(criteria.get("l1")(model, layers.convs, coupled=layers.filters),
                                                     filters), x)
    return model.eval(), x


def test_a_grey_image_meets_a_colour_network_by_repeating_its_channel():
    model = models.build("torchvision:resnet18", (1, 28, 28), 10)
    assert isinstance(model, factory.FactoryNetwork) and model.channels == 3
    assert model.network.conv1.in_channels == 3  # the factory's network, untouched
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert models.build("torchvision:resnet18", (3, 32, 32), 7).channels == 3  # colour passes as it is


def test_a_user_factory_gets_the_arguments_it_names():
    model = models.build(USER_FACTORY, (3, 32, 32), 4)
    assert model.arguments == {"num_classes": 4, "in_channels": 3}
    assert model.network.stem[0].in_channels == 3 and model.channels == 3
    assert models.build("tests.models.tiny_factory:thousand_classes", (1, 28, 28), 10).arguments == {}


@pytest.mark.parametrize("name, filters", [("torchvision:resnet18", 40), ("torchvision:mobilenet_v2", 40),
                                           ("torchvision:mnasnet0_5", 40),  # reads its state's saved versions
                                           (USER_FACTORY, 10)])
def test_a_pruned_network_reloads_weights_only(name, filters, tmp_path):
    model, x = pruned(name, filters=filters)
    path = checkpoints.save(model, tmp_path / "pruned.pt")
    payload = torch.load(path, weights_only=True)  # plain data: nothing to unpickle
    assert payload["model"] == name and all(type(w) is int for w in payload["spec"]["widths"].values())
    again = checkpoints.load(path, trusted=name)
    assert models.count_params(again) == models.count_params(model)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_file_never_imports_a_user_factory(tmp_path):
    """A checkpoint naming a user's factory loads only when the caller names that factory."""
    model, _ = pruned(USER_FACTORY, (1, 28, 28), filters=2)
    path = checkpoints.save(model, tmp_path / "user.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"] = "tests.models.never_imported:build"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="code of yours that loading it would import and run: name that factory "
                                         r"\(--model tests.models.never_imported:build; in a study, model="):
        checkpoints.load(tmp_path / "other.pt")
    assert "tests.models.never_imported" not in sys.modules
    with pytest.raises(ModelError, match="code of yours"):
        checkpoints.load(path, trusted="tests.models.tiny_factory:other")
    assert checkpoints.load(path, USER_FACTORY) is not None  # --model names it: trusted


def test_widths_no_pruning_reaches_are_one_line(tmp_path):
    model, _ = pruned("torchvision:resnet18", filters=10)
    payload = torch.load(checkpoints.save(model, tmp_path / "r.pt"), weights_only=True)
    payload["spec"]["widths"]["network.conv1"] = 1000
    torch.save(payload, tmp_path / "wide.pt")
    with pytest.raises(ModelError, match="does not fit torchvision:resnet18: its widths do not come from pruning"):
        checkpoints.load(tmp_path / "wide.pt")


def test_an_unknown_torchvision_name_lists_close_ones():
    with pytest.raises(ConfigError, match=r"torchvision has no classification model 'resnet19': did you mean "
                                          r"torchvision:resnet18"):
        factory.resolve("torchvision:resnet19")
    with pytest.raises(ConfigError, match="no classification model 'fasterrcnn_resnet50_fpn'"):
        factory.resolve("torchvision:fasterrcnn_resnet50_fpn")  # a detector, not a classifier


def _grey_fashion(cfg_settings):
    from prunelab import studies
    from prunelab.studies import common

    cfg = studies.load_config("taylor-cnn-fashionmnist", ["data.n_train=64", "data.n_test=16", "data.val_size=0",
                                                          *cfg_settings])
    return cfg, common.load_data(cfg)


def test_model_weights_start_a_torchvision_network_from_a_weights_file(fashion_dir, tmp_path):
    """`model_weights=PATH`: a torchvision resnet18 weights file (a state dict as torchvision ships
    one, 1,000 classes) loads into the network for FashionMNIST's 10 classes: every tensor but the
    output layer's, which keeps its fresh weights (a new head). Read weights-only."""
    import torchvision
    from prunelab.studies import common

    torch.manual_seed(7)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    cfg, data = _grey_fashion(["model=torchvision:resnet18", f"model_weights={tmp_path / 'resnet18.pth'}"])
    model = common.new_model(cfg, data, seed=0)
    loaded = model.network.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(loaded[name], value), name
    assert loaded["fc.weight"].shape == (10, 512)
    fresh = common.new_model(_grey_fashion(["model=torchvision:resnet18"])[0], data, seed=0).network.state_dict()
    assert torch.equal(loaded["fc.weight"], fresh["fc.weight"])  # the head as the seed initialises it
    assert not torch.equal(loaded["conv1.weight"], fresh["conv1.weight"])


def test_model_weights_of_another_network_or_offline_default_are_one_line(fashion_dir, tmp_path, capsys, client,
                                                                         monkeypatch):
    """A MobileNetV2 file for a ResNet-18 and torchvision's DEFAULT weights with no network: each
    one line naming what to pass, exit 2, before any run (`prunelab run` checks before `main`).
    Offline for certain: the download goes through a proxy nobody answers on, into an empty cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    import torchvision
    from prunelab import cli

    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mobilenet_v2.pth")
    for weights, expected in ((tmp_path / "mobilenet_v2.pth", "holds the weights of another network (lacks 'conv1.weight'"),
                              ("DEFAULT", "then pass model_weights=PATH")):
        code = cli.main(["run", "--study", "taylor-cnn-fashionmnist", "--set", "model=torchvision:resnet18",
                         "--set", f"model_weights={weights}", "--set", "data.n_train=64", "--set", "data.val_size=0",
                         "--set", "study=test-weights-refused", "--out", str(tmp_path / "out")])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and expected in line and "Traceback" not in line, line
    experiment = client.get_experiment_by_name("test-weights-refused")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_a_factory_the_meta_device_cannot_build_is_not_refused_for_it():
    """RegNet computes its widths with tensors, which hold no data on the meta device where the
    image-size check builds networks: that check cannot tell, so it does not refuse, and a
    network it can build there is still refused when too small for the images."""
    from prunelab.studies import common

    assert common.smallest_side("torchvision:regnet_x_400mf", (1, 28, 28), 10) == 28
    assert common.smallest_side("torchvision:vgg11_bn", (1, 28, 28), 10) == 32
    assert models.build("torchvision:regnet_x_400mf", (1, 28, 28), 10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
