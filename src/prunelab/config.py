"""Study configuration: frozen dataclasses whose fields carry their own help.

A study preset (YAML shipped in the package, prunelab/presets) is the single source of defaults;
command-line overrides are `section.field=value` strings. The settings every
kind shares live here (`StudyConfig`: the study, its model and trials, `data`
and `train`); each study kind adds its own sections (its module under
`prunelab.studies` declares them), so a run logs the shared settings and its
own kind's, nothing else. Every leaf field is logged as an MLflow param under
its dotted name, so two runs compare field by field in the UI.

Ranges are checked here; names (models, optimisers, criteria, ...) are checked
by the study kind against the registries themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from prunelab import files, hardware, paths
from prunelab.errors import ConfigError, one_line, shown
from prunelab.settings_text import parse_settings

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_STUDY = "taylor-cnn-fashionmnist"
DEFAULT_KIND = "filter_pruning"
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds must fit 32 bits
MAX_IMAGE_SIZE = 4096  # a side beyond this is a typo: one 3 x 4096 x 4096 image is 50 MB as uint8
# A study name is an MLflow experiment, a tag value and a folder under reports/:
# letters, digits, '.', '_' and '-', starting with a letter or digit, so it can never
# name a path outside reports/ (no '/', no '..' alone, nothing hidden).
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PRESET_SUFFIXES = (".yaml", ".yml")  # a --study ending so is a file; anything else names a preset
# Settings are text a person types: a preset is a few dozen lines (the shipped ones are 1-3 KB),
# a value at most a path (PATH_MAX). Anything larger is a mistake, or an attack on memory.
MAX_PRESET_BYTES = 64 * 1024
MAX_VALUE_BYTES = 4096


def setting(text: str, default: Any) -> Any:
    """A field with its help text (shown by `prunelab settings`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"help": text})


def section(cls: type) -> Any:
    """A nested settings section (a dataclass with defaults for every field)."""
    return field(default_factory=cls)


def check_range(where: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """One-line error unless low <= value <= high (or strict where open); NaN and infinities never pass."""
    ok = not (isinstance(value, float) and not math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + _number(low)
        hi = "" if high is None else _number(high) + (")" if high_open else "]")
        bound = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {_number(low)}" if low is not None else f"{'<' if high_open else '<='} {_number(high)}")
        raise ConfigError(f"{where} must be {bound}, got {value}" + (f": {hint}" if hint else ""))


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = setting("dataset registry name", "fashionmnist")
    data_dir: str = setting("folder holding the data set; empty: search the usual places, then download", "")
    n_train: int = setting("train on only the first N training images, after the validation split is held out (0: all)", 0)
    n_test: int = setting("use only the first N test images (0: all)", 0)
    val_size: int = setting("hold out the last N training images for validation: early stopping, and the choice of "
                            "the registered champion (0: none; the champion is then chosen on the test set)", 0)
    augment: bool = setting("random crop and flip on training batches", False)
    image_size: int = setting("resize images to this side length, square (0: the data set's own size; "
                                      "an image folder's default is 224)", 0)

    def validate(self, where: str = "data") -> None:
        if self.data_dir and not paths.is_uri(self.data_dir):
            files.checked_path(self.data_dir, f"{where}.data_dir")  # a name no file system takes is one line
        for name in ("n_train", "n_test", "val_size"):
            check_range(f"{where}.{name}", getattr(self, name), 0)
        check_range(f"{where}.image_size", self.image_size, 0, MAX_IMAGE_SIZE,
                    hint="the side in pixels images are resized to (0: their own size)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting("passes over the training data", 5)
    batch_size: int = setting("images per optimiser step", 128)
    optimizer: str = setting("adam or sgd", "adam")
    lr: float = setting("learning rate", 1e-3)
    momentum: float = setting("SGD momentum", 0.9)
    weight_decay: float = setting("L2 penalty", 0.0)
    precision: str = setting("arithmetic of forward and backward passes: auto (bf16 where the hardware has it natively, "
                             "else fp32; logged as the one chosen), fp32, bf16 (autocast) or fp16 (autocast with "
                             "gradient scaling, GPUs only); evaluation is always fp32", "auto")
    distill_temperature: float = setting("fine-tuning only: learn from the unpruned network's logits softened at this "
                                         "temperature as well as from the labels (Hinton et al. 2015, knowledge "
                                         "distillation); 0: off", 0.0)
    distill_weight: float = setting("share alpha of distillation in the loss: alpha T^2 KL(teacher || student) + "
                                    "(1 - alpha) cross-entropy; 0: the labels alone", 0.5)

    def validate(self, where: str = "train") -> None:
        check_range(f"{where}.epochs", self.epochs, 1, hint="pass a positive number of epochs")
        check_range(f"{where}.batch_size", self.batch_size, 1)
        check_range(f"{where}.lr", self.lr, 0, low_open=True)
        check_range(f"{where}.momentum", self.momentum, 0, 1, high_open=True, hint="SGD momentum is a fraction")
        check_range(f"{where}.weight_decay", self.weight_decay, 0)
        check_range(f"{where}.distill_temperature", self.distill_temperature, 0, hint="0 turns distillation off")
        check_range(f"{where}.distill_weight", self.distill_weight, 0, 1, hint="it is a share of the loss")
        if where == "train" and self.distill_temperature:
            raise ConfigError("train.distill_temperature: training from scratch has no unpruned network to learn from; "
                              "set finetune.distill_temperature instead")


@dataclass(frozen=True)
class StudyConfig:
    """The settings every study kind shares; a kind's own sections are added by `for_kind`."""

    study: str = setting("study name; also the MLflow experiment", DEFAULT_STUDY)
    kind: str = setting("study kind (prunelab.studies): which stages `main` chains and which report it draws", DEFAULT_KIND)
    model: str = setting("model registry name", "simple_cnn")
    model_weights: str = setting("start from these weights: a weights file (a state dict, read weights-only) or "
                                 "DEFAULT (torchvision's own, for torchvision:NAME; downloaded); the output layer "
                                 "keeps fresh weights where the data has other classes", "")
    trials: int = setting("independent trials (seeds seed .. seed+trials-1)", 5)
    seed: int = setting("seed of trial 0", 0)
    device: str = setting("where models and data live: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", "auto")
    parallel_trials: int = setting("trials run side by side by `main`, each in its own process (0: 2 on a GPU, "
                                   "one per 4 CPU cores otherwise)", 0)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)

    def validate(self) -> "StudyConfig":
        if not STUDY_NAME.fullmatch(self.study):
            raise ConfigError(f"study name {self.study!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (it names the MLflow experiment and the report folder)")
        check_range("trials", self.trials, 1, 10_000)
        check_range("seed", self.seed, 0, MAX_SEED - self.trials + 1, hint="trial t uses seed + t, which must fit 32 bits")
        check_range("parallel_trials", self.parallel_trials, 0)
        hardware.check_setting(self.device)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        return self

    def flat(self) -> dict[str, Any]:
        """Every leaf field under its dotted name (the MLflow params)."""
        return dict(_flatten(self))

    def __reduce__(self):
        # A kind's config class is made at run time (`for_kind`), which pickle cannot find by
        # name: a config sent to a worker process is rebuilt from its class's recipe and values.
        shared = {f.name for f in dataclasses.fields(StudyConfig)}
        sections = tuple((f.name, _section_class(f)) for f in dataclasses.fields(self) if f.name not in shared)
        return _rebuilt, (self.kind, sections, dataclasses.asdict(self))


def _rebuilt(kind: str, sections: tuple[tuple[str, type], ...], values: dict) -> StudyConfig:
    return from_dict(values, for_kind(kind, sections) if sections else StudyConfig, kind=kind)


def _flatten(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@functools.lru_cache(maxsize=None)
def for_kind(kind: str, sections: tuple[tuple[str, type], ...]) -> type[StudyConfig]:
    """StudyConfig plus the kind's own sections (name -> section dataclass)."""
    clash = [name for name, _ in sections if name in {f.name for f in dataclasses.fields(StudyConfig)}]
    if clash:
        raise TypeError(f"study kind {kind}: section {clash[0]!r} is a shared setting")
    return dataclasses.make_dataclass(
        f"StudyConfig[{kind}]", [(name, cls, section(cls)) for name, cls in sections],
        bases=(StudyConfig,), frozen=True)


def field_help(cls: type = StudyConfig, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> help text (the list behind `prunelab settings`)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if _section_class(f) is not None:
            out.update(field_help(_section_class(f), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("help", "")
    return out


def _section_class(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else None


def presets_dir() -> Traversable:
    """Where the study presets live: package data (prunelab/presets, read through
    importlib.resources, so an installed prunelab finds them from any folder), or
    $PRUNELAB_CONFIGS when set (checked to be a folder)."""
    env = os.environ.get("PRUNELAB_CONFIGS")
    if not env:
        return importlib.resources.files("prunelab") / "presets"
    folder = files.checked_path(env, "PRUNELAB_CONFIGS")
    if not folder.is_dir():
        raise ConfigError(f"PRUNELAB_CONFIGS={shown(env)} is not a folder: point it at a folder of preset .yaml "
                          "files, or unset it for the presets shipped with prunelab")
    return folder


def available_studies() -> list[str]:
    return sorted(p.name[:-len(".yaml")] for p in presets_dir().iterdir() if p.name.endswith(".yaml"))


def raw_settings(study: str, overrides: list[str] | str | Mapping[str, Any] | None) -> dict:
    """Preset `study` (a preset's name or a YAML path) with the overrides applied, not yet
    checked: the study kind it names says which sections it may have (`build`)."""
    return apply_overrides(read_preset(study), overrides)


def apply_overrides(raw: dict, overrides: list[str] | str | Mapping[str, Any] | None) -> dict:
    """`raw` with each KEY=VALUE of `overrides` set, its value parsed as a setting (not yet checked).
    A mapping ({"train.epochs": 1}, the Python API's settings) holds values already, set as they are."""
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(f"setting {shown(key)} is not a name like train.epochs (`prunelab settings` lists them)")
            _set_dotted(raw, key.strip(), value)
        return raw
    if isinstance(overrides, str):
        overrides = overrides.split()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {shown(item)} is not KEY=VALUE (e.g. train.epochs=3)")
        key = key.strip()
        _set_dotted(raw, key, parse_settings(value, f"override {shown(key, 60)}", MAX_VALUE_BYTES)
                    if value.strip() else "")
    return raw


def data_settings(raw: dict) -> DataConfig:
    """The checked `data` section of `raw` (settings as `raw_settings` returns them); any
    other section is refused: a command that reads only data takes only data settings."""
    others = sorted(set(raw) - {"data"})
    if others:
        raise ConfigError(f"only data.* settings apply here, not {others[0]}: valid ones are "
                          f"{', '.join('data.' + f.name for f in dataclasses.fields(DataConfig))}")
    cfg = from_dict(raw.get("data") or {}, DataConfig, "data.")
    cfg.validate("data")
    return cfg


def kind_of(raw: dict) -> str:
    return str(raw.get("kind", DEFAULT_KIND))


def build(raw: dict, sections: dict[str, type]) -> StudyConfig:
    """The checked settings of `raw_settings`, with the sections of its study kind."""
    kind = kind_of(raw)
    return from_dict(raw, for_kind(kind, tuple(sections.items())), kind=kind).validate()


def preset_file(study: str) -> Path | None:
    """The preset file a --study names (an existing .yaml/.yml file, relative to the working
    folder), or None when it names a shipped preset. A name is a plain name: one that is a
    path (`../x`, `a/b`) could only reach outside the presets folder, so it is refused."""
    if study.endswith(PRESET_SUFFIXES):
        path = files.checked_path(study, "--study")
        if not path.is_file():
            raise ConfigError(f"no preset file {shown(study)}: check the path (a study named without "
                              f"{' or '.join(PRESET_SUFFIXES)} is one of the shipped presets)")
        return path
    if not STUDY_NAME.fullmatch(study):
        raise ConfigError(f"study {shown(study)} is neither a preset name (letters, digits, '.', '_' or '-') nor a "
                          f"{' or '.join(PRESET_SUFFIXES)} file: pass a preset's name or the path of a preset file")
    return None


def read_preset(study: str) -> dict:
    """The settings of a preset file (a path, relative to the working folder) or of a shipped preset."""
    path = preset_file(study)
    if path is not None:
        source, preset = str(path), path
    else:
        preset = presets_dir() / f"{study}.yaml"
        if not preset.is_file():
            raise ConfigError(f"unknown study {study!r}: choose one of {', '.join(available_studies())} or pass a YAML file")
        source = f"{study}.yaml"
    try:
        with preset.open("rb") as f:
            text = f.read(MAX_PRESET_BYTES + 1)  # never more than the limit into memory
    except OSError as exc:
        raise ConfigError(f"preset {source} cannot be read ({exc.strerror or type(exc).__name__}): check the file") from None
    raw = parse_settings(text, f"preset {source}", MAX_PRESET_BYTES)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"preset {source} is not a mapping of settings (study: ..., data: {{...}}): check the file")
    if raw is None or not any(True for _ in _leaves(raw)):  # all defaults is not what a preset file is for
        raise ConfigError(f"preset {source} sets nothing (it is empty, or its sections are): write the settings "
                          "it stands for (`prunelab settings` lists them), or name a shipped preset")
    return raw


def _leaves(raw: dict):
    for value in raw.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif value is not None:
            yield value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the preset (`data:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {shown(key)}: {shown(part)} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict, cls: type, prefix: str = "", kind: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=str)  # YAML keys need not be text
    if unknown:
        whose = f" for a {kind} study" if kind else ""
        raise ConfigError(
            f"unknown setting {prefix}{one_line(str(unknown[0]), 60)}{whose}: valid ones are {', '.join(prefix + n for n in fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        nested = _section_class(fields[name])
        if nested is not None:
            kwargs[name] = from_dict({} if value is None else value, nested, f"{prefix}{name}.", kind)
        else:
            default = fields[name].default if fields[name].default is not dataclasses.MISSING else None
            kwargs[name] = _typed(value, default, f"{prefix}{name}")
    return cls(**kwargs)


def _typed(value: Any, default: Any, key: str) -> Any:
    """`value` as the type of the setting's default, or a one-line error. A bool is never
    a number (YAML reads yes/no/on/off as booleans), a number written without a dot
    (1e-3, which YAML 1.1 reads as text) is a float, and a list (also written a,b) is
    checked element by element against the default's elements."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be text, got {value!r}: YAML reads yes/no/on/off/true/false as "
                              f"booleans, so put the word in quotes ({key}='...')")
    elif kind is tuple:
        if isinstance(value, str) and value.strip():  # the comma form a shell types: a,b (or one name)
            value = [parse_settings(v.strip(), key, MAX_VALUE_BYTES) for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            element = default[0] if default else ""
            return type(value)(_typed(v, element, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"{key} must be a list (e.g. {key}=[{', '.join(map(str, default[:2])) or 'a, b'}]), got {shown(value)}")
    else:
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"{key} must be {article} {kind.__name__}, got {shown(value)}")
