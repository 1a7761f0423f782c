"""Study configuration: frozen dataclasses whose fields carry their own help.

A study preset (YAML under resources/configs) is the single source of defaults;
command-line overrides are `section.field=value` strings. Every leaf field is
logged as an MLflow param under its dotted name, so two runs compare field by
field in the UI.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab.errors import ConfigError

DEFAULT_STUDY = "taylor-cnn-fashionmnist"


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _help("dataset registry name", "fashionmnist")
    data_dir: str = _help("folder holding the data set; empty: search the usual places, then download", "")
    n_train: int = _help("use only the first N training images (0: all)", 0)
    n_test: int = _help("use only the first N test images (0: all)", 0)
    val_size: int = _help("hold out N training images for validation / early stopping (0: none)", 0)
    augment: bool = _help("random crop and flip on training batches", False)
    image_size: int = _help("resize images to this side length when the data set allows (0: native)", 0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _help("passes over the training data", 5)
    batch_size: int = _help("images per optimiser step", 128)
    optimizer: str = _help("adam or sgd", "adam")
    lr: float = _help("learning rate", 1e-3)
    momentum: float = _help("SGD momentum", 0.9)
    weight_decay: float = _help("L2 penalty", 0.0)

    def validate(self, where: str, allow_zero: bool = False) -> None:
        low = 0 if allow_zero else 1
        if self.epochs < low:
            raise ConfigError(f"{where}.epochs must be >= {low}, got {self.epochs}: pass a positive number of epochs")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"{where}.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


@dataclass(frozen=True)
class PruneConfig:
    method: str = _help("filter importance criterion: taylor, l1 or random", "taylor")
    filters_per_step: int = _help("filters removed per pruning step", 1)
    target: float = _help("stop when this fraction of the target quantity remains, in (0, 1)", 0.6)
    target_kind: str = _help("what the target counts: params or filters", "params")
    rank_images: int = _help("training images seen by each ranking pass (0: all)", 10000)
    finetune_epochs_between: int = _help("fine-tuning epochs after each pruning step but the last", 0)
    log_models_every: int = _help("log the pruned model every N steps (the last step is always logged)", 1)
    rank_batch_size: int = _help("images per forward/backward pass of a ranking pass", 256)
    latency_repeats: int = _help("timed CPU forward passes behind each step's latency_ms (median; 0: not measured)", 30)

    def validate(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"prune.target must be inside (0, 1), got {self.target}: it is the fraction that remains")
        if self.target_kind not in ("params", "filters"):
            raise ConfigError(f"prune.target_kind must be 'params' or 'filters', got {self.target_kind!r}")
        if self.filters_per_step < 1:
            raise ConfigError(f"prune.filters_per_step must be >= 1, got {self.filters_per_step}")
        if self.finetune_epochs_between < 0:
            raise ConfigError(f"prune.finetune_epochs_between must be >= 0, got {self.finetune_epochs_between}")
        if self.rank_images < 0:
            raise ConfigError(f"prune.rank_images must be >= 0, got {self.rank_images}")
        if self.latency_repeats < 0:
            raise ConfigError(f"prune.latency_repeats must be >= 0, got {self.latency_repeats}")
        if self.rank_batch_size < 1:
            raise ConfigError(f"prune.rank_batch_size must be >= 1, got {self.rank_batch_size}")


@dataclass(frozen=True)
class TransferConfig:
    pretrained: bool = _help("start from torchvision's ImageNet weights (or transfer.weights); false: random features", True)
    weights: str = _help("local state-dict file of the pretrained network (e.g. torchvision's vgg16-397923af.pth)", "")
    head_width: int = _help("width of the head's two hidden Linear layers", 4096)
    feature_batch_size: int = _help("images per forward pass when the frozen features are computed once", 64)

    def validate(self) -> None:
        if self.head_width < 1:
            raise ConfigError(f"transfer.head_width must be >= 1, got {self.head_width}")
        if self.feature_batch_size < 1:
            raise ConfigError(f"transfer.feature_batch_size must be >= 1, got {self.feature_batch_size}")


@dataclass(frozen=True)
class LotteryConfig:
    rounds: int = _help("pruning rounds after the dense round 0 (round k keeps about (1 - rate)^k of each layer)", 20)
    iterations: int = _help("training iterations per round (optimiser steps of train.batch_size images)", 20000)
    eval_every: int = _help("evaluate validation and test loss / accuracy every N iterations", 100)
    conv_rate: float = _help("fraction of a conv layer's remaining weights pruned per round, in [0, 1)", 0.1)
    fc_rate: float = _help("fraction of a hidden fully connected layer's remaining weights pruned per round", 0.2)
    output_rate: float = _help("fraction of the output layer's remaining weights pruned per round", 0.1)
    strategy: str = _help("which weights go: magnitude (smallest |w| of the trained round) or random (control)", "magnitude")
    rewind_iteration: int = _help("rewind survivors to their values at this iteration (0: the initialisation)", 0)
    reinit_control: bool = _help("also train each round's mask from a fresh random initialisation (control)", True)

    def validate(self) -> None:
        for name in ("conv_rate", "fc_rate", "output_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"lottery.{name} must be in [0, 1), got {rate}: it is the fraction pruned per round")
        if self.rounds < 0:
            raise ConfigError(f"lottery.rounds must be >= 0, got {self.rounds}")
        if self.iterations < 1 or self.eval_every < 1:
            raise ConfigError(f"lottery.iterations and lottery.eval_every must be >= 1, got {self.iterations} and {self.eval_every}")
        if not 0 <= self.rewind_iteration < self.iterations:
            raise ConfigError(f"lottery.rewind_iteration={self.rewind_iteration} is outside the training length "
                              f"(0 .. {self.iterations - 1}): rewind to an iteration before lottery.iterations")
        if self.strategy not in ("magnitude", "random"):
            raise ConfigError(f"lottery.strategy must be 'magnitude' or 'random', got {self.strategy!r}")


@dataclass(frozen=True)
class KMeansConfig:
    """k-means filter clustering (kind kmeans_clustering): sweeps and real merging."""

    weights: str = _help("pretrained weights file the sweeps start from (e.g. a reference resnet20 .th checkpoint)", "")
    distance: str = _help("k-means distance between flattened filters: euclidean or cosine", "euclidean")
    importance: str = _help("how a cluster's members make its centroid: none (plain mean) or l1 (mean weighted by L1 norm)", "none")
    n_init: int = _help("k-means restarts (scikit-learn n_init); the best inertia wins", 10)
    stages: tuple = _help("stages of the per-stage sweep (all convs of each at once)", ("layer1", "layer2", "layer3"))
    stage_pruned: tuple = _help("clusters pruned away (C - K) in the per-stage sweep; values >= a stage's width are skipped there",
                                (0, 2, 4, 8, 12, 15, 24, 32, 48, 63))
    layers: tuple = _help("convs of the per-layer sweep, in network order (empty: every conv)", ())
    layer_pruned: tuple = _help("clusters pruned away (C - K) in the per-layer sweep; values >= a layer's width are skipped there",
                                (0, 4, 8, 12, 15, 24, 32, 48, 63))
    merge_keep: tuple = _help("merging: fractions of each block-internal conv's channels kept (one merge run each)", (1.0, 0.75, 0.5, 0.25))
    latency_batch: int = _help("batch size of the CPU latency measurement", 16)
    latency_repeats: int = _help("timed forward passes of the latency measurement (the median counts)", 30)

    def validate(self) -> None:
        if self.distance not in ("euclidean", "cosine"):
            raise ConfigError(f"kmeans.distance must be 'euclidean' or 'cosine', got {self.distance!r}")
        if self.importance not in ("none", "l1"):
            raise ConfigError(f"kmeans.importance must be 'none' or 'l1', got {self.importance!r}")
        if self.n_init < 1:
            raise ConfigError(f"kmeans.n_init must be >= 1, got {self.n_init}")
        for name in ("stage_pruned", "layer_pruned"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ConfigError(f"kmeans.{name} must be a list of counts >= 0 (e.g. [0, 4, 8]), got {values!r}")
        for name in ("stages", "layers"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"kmeans.{name} must be a list of names, got {getattr(self, name)!r}")
        keep = self.merge_keep
        if not isinstance(keep, (list, tuple)) or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in keep):
            raise ConfigError(f"kmeans.merge_keep must be a list of fractions in (0, 1], got {keep!r}")
        if self.latency_batch < 1 or self.latency_repeats < 1:
            raise ConfigError("kmeans.latency_batch and kmeans.latency_repeats must be >= 1")


@dataclass(frozen=True)
class StudyConfig:
    study: str = _help("study name; also the MLflow experiment", DEFAULT_STUDY)
    kind: str = _help("pipeline shape: which stages `main` chains and which report it draws", "filter_pruning")
    model: str = _help("model registry name", "simple_cnn")
    trials: int = _help("independent trials (seeds seed .. seed+trials-1)", 5)
    seed: int = _help("seed of trial 0", 0)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    lottery: LotteryConfig = field(default_factory=LotteryConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def validate(self) -> "StudyConfig":
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        for name in ("n_train", "n_test", "val_size"):
            if getattr(self.data, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self.data, name)}")
        self.train.validate("train")
        self.finetune.validate("finetune")
        self.prune.validate()
        self.lottery.validate()
        self.transfer.validate()
        self.kmeans.validate()
        return self

    def flat(self) -> dict[str, Any]:
        """Every leaf field under its dotted name (the MLflow params)."""
        return dict(_flatten(self))


def _flatten(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def field_help() -> dict[str, str]:
    """Dotted field name -> help text (the list behind `prunelab settings`)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(StudyConfig):
        section = _SECTIONS.get(f.name)
        if section is None:
            out[f.name] = f.metadata.get("help", "")
        else:
            out.update({f"{f.name}.{g.name}": g.metadata.get("help", "") for g in dataclasses.fields(section)})
    return out


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "prune": PruneConfig, "finetune": TrainConfig,
             "lottery": LotteryConfig,
             "transfer": TransferConfig,
             "kmeans": KMeansConfig}


def configs_dir() -> Path:
    """Where the study presets live (the repository's resources/configs)."""
    env = os.environ.get("PRUNELAB_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "resources" / "configs"


def available_studies() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def load(study: str = DEFAULT_STUDY, overrides: list[str] | str | None = None) -> StudyConfig:
    """Preset `study` (a name under resources/configs or a YAML path) plus overrides."""
    path = Path(study)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = configs_dir() / f"{study}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown study {study!r}: choose one of {', '.join(available_studies())} or pass a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if isinstance(overrides, str):
        overrides = overrides.split()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.epochs=3)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return from_dict(raw).validate()


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict, cls: type = StudyConfig, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{unknown[0]}: valid ones are {', '.join(prefix + n for n in fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        section = _SECTIONS.get(name) if cls is StudyConfig else None
        if section is not None:
            kwargs[name] = from_dict(value or {}, section, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, fields[name], f"{prefix}{name}", cls)
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, key: str, cls: type) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
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
    elif kind is str:
        return "" if value is None else str(value)
    else:
        return value
    raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}")
