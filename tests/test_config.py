"""Presets, overrides and their validation (no server, no data)."""

import pytest

from prunelab import studies
from prunelab.errors import ConfigError


def test_default_preset_is_the_study_shape():
    """The default preset trains 5 epochs, prunes by Taylor to <= 60 % params, fine-tunes 5 epochs, 5 trials."""
    cfg = studies.load_config()
    assert (cfg.study, cfg.model, cfg.data.dataset) == ("taylor-cnn-fashionmnist", "simple_cnn", "fashionmnist")
    assert (cfg.train.epochs, cfg.finetune.epochs, cfg.trials) == (5, 5, 5)
    assert (cfg.prune.method, cfg.prune.target_kind, cfg.prune.target) == ("taylor", "params", 0.6)


def test_overrides_are_typed_and_flattened():
    cfg = studies.load_config(overrides="train.epochs=2 prune.target=0.5 data.augment=true")
    assert cfg.train.epochs == 2 and cfg.prune.target == 0.5 and cfg.data.augment is True
    flat = cfg.flat()
    assert flat["train.epochs"] == 2 and flat["prune.method"] == "taylor" and "finetune.lr" in flat


@pytest.mark.parametrize("override, message", [
    ("prune.target=1.5", "prune.target must be inside (0, 1)"),
    ("prune.target=0", "prune.target must be inside (0, 1)"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("finetune.epochs=-1", "finetune.epochs must be >= 1"),
    ("train.epochs=two", "train.epochs must be a int"),
    ("train.epoch=2", "unknown setting train.epoch"),
    ("nonsense", "is not KEY=VALUE"),
    ("prune.target_kind=flops", "prune.target_kind must be 'params' or 'filters'"),
])
def test_bad_settings_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        studies.load_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_study_lists_the_presets():
    with pytest.raises(ConfigError, match="taylor-cnn-fashionmnist"):
        studies.load_config("no-such-study")


def test_every_setting_has_help():
    helps = studies.field_help()
    assert "prune.filters_per_step" in helps and all(helps.values())


def test_auto_precision_resolves_to_what_the_hardware_computes_natively():
    """`auto` (the default) never reaches a run: loading resolves it, in every training section,
    to bf16 where the device computes bfloat16 natively and fp32 elsewhere; a precision named
    outright stays as it is, and an unknown one is refused in one line."""
    import torch

    from prunelab import hardware

    chosen = "bf16" if hardware.supports_bf16(torch.device("cpu")) else "fp32"
    cfg = studies.load_config(overrides="device=cpu")
    assert (cfg.train.precision, cfg.finetune.precision) == (chosen, chosen)
    assert cfg.flat()["train.precision"] == chosen
    cfg = studies.load_config(overrides="device=cpu train.precision=fp32 finetune.precision=bf16")
    assert (cfg.train.precision, cfg.finetune.precision) == ("fp32", "bf16")
    with pytest.raises(ConfigError, match=r"unknown precision 'fp8' \(train.precision must be one of auto, bf16, fp16, fp32\)"):
        studies.load_config(overrides="train.precision=fp8")
