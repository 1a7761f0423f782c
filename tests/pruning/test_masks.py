"""Lottery-ticket building blocks without a server: the models, masks, pruning
strategies, rewinding and the masked iteration loop (real CIFAR-10 subset)."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab import config, data, models, studies
from prunelab.studies.lottery_ticket import LotteryConfig
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import masks
from prunelab.train import early_stop, fit_iterations


def test_conv2_has_the_papers_parameter_count():
    """Conv-2 on CIFAR-10 is exactly the paper's 4,301,642 parameters, layer by layer."""
    model = models.build("conv2", (3, 32, 32), 10)
    per_layer = [m.weight.numel() + m.bias.numel() for m in model.modules() if hasattr(m, "weight")]
    assert per_layer == [1792, 36928, 4194560, 65792, 2570]
    assert models.count_params(model) == 4_301_642
    assert models.count_params(models.build("lenet_300_100", (1, 28, 28), 10)) == 266_610


def test_glorot_normal_initialisation():
    """Weights are Glorot-normal (std sqrt(2 / (fan_in + fan_out))) and biases zero, seeded."""
    torch.manual_seed(0)
    model = models.build("conv2", (3, 32, 32), 10)
    fc = model.classifier[1]
    expected = math.sqrt(2 / (fc.in_features + fc.out_features))
    assert fc.weight.std().item() == pytest.approx(expected, rel=0.01)
    assert torch.count_nonzero(fc.bias) == 0
    torch.manual_seed(0)
    assert torch.equal(models.build("conv2", (3, 32, 32), 10).classifier[1].weight, fc.weight)


def test_remaining_fraction_per_layer_is_one_minus_rate_to_the_n():
    """After n magnitude rounds each layer keeps (1 - rate)^n of its weights, within rounding;
    masks only shrink; the output layer has its own rate."""
    hp = LotteryConfig(conv_rate=0.1, fc_rate=0.2, output_rate=0.15)
    model = models.build("conv2", (3, 32, 32), 10)
    kinds = masks.prunable_layers(model)
    assert list(kinds.values()) == ["conv", "conv", "fc", "fc", "output"]
    rates = masks.layer_rates(hp, model)
    mask = masks.Mask.ones_like(model)
    for n in range(1, 4):
        new = masks.prune(hp, model, mask)
        for name, keep in new.items():
            assert not (keep & ~mask[name]).any(), "a pruned weight came back"
            expected = (1 - rates[name]) ** n
            # ceil() per round drops at most one extra weight per round
            assert abs(keep.sum().item() - expected * keep.numel()) <= n, (name, n)
        mask = new
    assert mask.fraction_remaining() == pytest.approx(sum(mask.remaining().values()) / 4_300_992)
    assert "total" in mask.report()


def test_magnitude_prunes_the_smallest_and_random_matches_its_counts():
    """Magnitude pruning removes exactly the smallest |w| of each layer; the random control
    removes as many weights, chosen differently."""
    hp = LotteryConfig()
    torch.manual_seed(1)
    model = models.build("conv2", (3, 32, 32), 10)
    mask = masks.Mask.ones_like(model)
    by_magnitude = masks.prune(hp, model, mask)
    at_random = masks.prune(LotteryConfig(strategy="random"), model, mask, seed=3)
    params = dict(model.named_parameters())
    for name, keep in by_magnitude.items():
        w = params[name].detach().abs()
        assert w[~keep].max() <= w[keep].min()
        assert at_random[name].sum() == keep.sum()
        assert not torch.equal(at_random[name], keep)


@pytest.mark.parametrize("override, words", [
    ("lottery.conv_rate=1.0", "lottery.conv_rate must be in [0, 1)"),
    ("lottery.fc_rate=-0.1", "lottery.fc_rate must be in [0, 1)"),
    ("lottery.rewind_iteration=40", "outside the training length"),
    ("lottery.strategy=largest", "lottery.strategy must be"),
])
def test_bad_settings_give_one_line_errors(override, words):
    """A rate outside [0, 1), a rewind iteration beyond training, an unknown strategy: one-line ConfigErrors."""
    with pytest.raises(ConfigError) as err:
        studies.load_config("lth-conv2-cifar10-quick", [override])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_too_many_rounds_are_refused():
    """Rounds that would empty a layer are refused, naming the layer and the most rounds possible."""
    hp = LotteryConfig(output_rate=0.9)
    model = models.build("conv2", (3, 32, 32), 10)
    masks.check_rounds(hp, model, 3)
    with pytest.raises(ConfigError, match=r"classifier.5.weight .*use at most 3 rounds") as err:
        masks.check_rounds(hp, model, 4)
    assert "\n" not in str(err.value)


def test_mask_validation():
    """A mask of non-bool tensors, or one that does not fit the model, is refused."""
    model = models.build("lenet_300_100", (1, 28, 28), 10)
    with pytest.raises(ModelError, match="not a bool tensor"):
        masks.Mask({"classifier.1.weight": torch.ones(300, 784)})
    with pytest.raises(ModelError, match="covers"):
        masks.Mask({"classifier.1.weight": torch.ones(300, 784, dtype=torch.bool)}).check_fits(model)


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    cfg = config.DataConfig(dataset="cifar10", data_dir=str(cifar_dir), n_train=360, n_test=120, val_size=60)
    return data.get(cfg)


@pytest.mark.slow
def test_masks_stay_zero_through_training_and_rewinding_is_exact(cifar):
    """Trained under its mask, every pruned weight stays exactly zero while survivors move;
    without the mask Adam would revive them (so the check can fail). Rewinding restores
    the saved weights exactly under the mask."""
    torch.manual_seed(0)
    model = models.build("conv2", cifar.input_shape, cifar.num_classes)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    hp = LotteryConfig(conv_rate=0.5, fc_rate=0.5, output_rate=0.5)
    mask = masks.prune(hp, model, masks.Mask.ones_like(model))
    masks.rewind(model, initial, mask)
    train_cfg = config.TrainConfig(batch_size=60, lr=2e-4)
    history = fit_iterations(model, cifar, train_cfg, iterations=3, eval_every=2, seed=0, after_step=lambda: mask.apply(model))
    assert [r.iteration for r in history] == [0, 2, 3]
    assert early_stop(history).val_loss == min(r.val_loss for r in history)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name
        assert not torch.equal(params[name][keep], initial[name][keep]), f"{name} did not train"

    masks.rewind(model, initial, mask)
    state = model.state_dict()
    for name, value in initial.items():
        expected = value * mask[name] if name in mask else value
        assert torch.equal(state[name], expected), name

    fit_iterations(model, cifar, train_cfg, iterations=2, eval_every=2, seed=0)  # no after_step
    assert torch.count_nonzero(dict(model.named_parameters())["classifier.1.weight"][~mask["classifier.1.weight"]]) > 0


def test_reinitialise_draws_new_weights_under_the_same_mask():
    """The random re-init control keeps the mask and replaces every surviving weight."""
    torch.manual_seed(0)
    model = models.build("conv2", (3, 32, 32), 10)
    mask = masks.prune(LotteryConfig(), model, masks.Mask.ones_like(model))
    before = {k: v.clone() for k, v in model.named_parameters()}
    masks.reinitialise(model, mask, seed=7)
    for name, p in model.named_parameters():
        if name in mask:
            assert torch.count_nonzero(p[~mask[name]]) == 0
            assert not torch.equal(p[mask[name]], before[name][mask[name]])
