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
    ("train.epochs=two", "train.epochs must be an int"),
    ("train.epoch=2", "unknown setting train.epoch"),
    ("nonsense", "is not KEY=VALUE"),
    ("prune.target_kind=flops", "prune.target_kind must be one of params, filters, macs"),
])
def test_bad_settings_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        studies.load_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numbers_are_read_as_a_user_types_them():
    """YAML 1.1 reads 1e-3 (no dot) as text: a float setting takes it as the number it is,
    in a list too; a bool is never a number, and a list holds numbers of its own type."""
    cfg = studies.load_config(overrides="train.lr=1e-3 finetune.lr=5E-4 train.momentum=0")
    assert (cfg.train.lr, cfg.finetune.lr, cfg.train.momentum) == (0.001, 0.0005, 0.0)
    assert isinstance(cfg.train.momentum, float)
    cfg = studies.load_config("kmeans-resnet20-cifar10", ["kmeans.merge_keep=[1, 5e-1]", "kmeans.stage_pruned=[0, 4]"])
    assert cfg.kmeans.merge_keep == [1.0, 0.5] and all(type(v) is float for v in cfg.kmeans.merge_keep)
    for bad in ("kmeans.merge_keep=[true]", "kmeans.stage_pruned=[1.5]", "kmeans.stage_pruned=[yes]"):
        with pytest.raises(ConfigError, match=r"kmeans\.\w+\[\d\] must be"):
            studies.load_config("kmeans-resnet20-cifar10", [bad])


def test_a_preset_file_is_parsed_with_limits(tmp_path):
    """A preset file is UTF-8 YAML without anchors or aliases, under 64 KiB, and says something."""
    good = tmp_path / "mine.yaml"
    good.write_text("study: mine\ntrain:\n  epochs: 2\n  lr: 1e-2\n")
    cfg = studies.load_config(str(good))
    assert (cfg.study, cfg.train.epochs, cfg.train.lr) == ("mine", 2, 0.01)
    for name, content, message in [
        ("empty.yaml", b"", "sets nothing"),
        ("data.yaml", b"data:\n", "sets nothing"),
        ("latin.yaml", "study: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        ("alias.yaml", b"study: &s x\nmodel: *s\n", "anchors and aliases"),
        ("big.yaml", b"study: x\n" + b"#" * 70_000 + b"\n", "is larger than 65536 bytes"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=message) as err:
            studies.load_config(str(tmp_path / name))
        assert "\n" not in str(err.value)


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
