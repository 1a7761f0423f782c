"""What every study kind shares: the `StudyKind` plug-in, the stage prologue
(tags, params, the run), and the data and models a stage reads. The train and
finetune stages several kinds reuse live in `studies.stages`.

A study kind is one module in this package holding its config sections, its
stages and its report, plus one line in `studies/__init__.py`. A stage is a
function `(cfg, trial) -> run id`, or `(cfg, trial, model_ref) -> run id` when
its entry point reads an earlier step's run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from prunelab import checkpoints, data as datasets, hardware, models, paths, progress, reporting
from prunelab.data import remote
from prunelab.config import DataConfig, StudyConfig, TrainConfig
from prunelab.data.base import ImageData
from prunelab.errors import ConfigError, ModelError, NothingToDraw, PrunelabError, first_line
from prunelab.models import base, factory
from prunelab.models.pixels import PixelInput
from prunelab.tracking import loading, query, run as runs
from prunelab.train import OPTIMIZERS, PRECISION_SETTINGS, check_precision, eval_mode, resolve_precision

Stage = Callable[..., str]
Report = tuple[dict[str, plt.Figure], pd.DataFrame]
ENTRY_POINTS = ("train", "prune", "finetune")  # the per-trial entry points of MLproject (besides main, report)


@dataclass(frozen=True)
class Step:
    """One step of a trial's chain: an entry point, the earlier step whose run it reads, and
    the settings it changes for itself. As in OpenLTH's branches, a step's settings are its
    signature: two prune steps of one trained network differ by their overrides, so each has
    its own step key, its own run and its own params."""

    entry: str
    source: int | None = None            # index of the earlier step whose run it reads, or None
    overrides: tuple[str, ...] = ()      # KEY=VALUE settings of this step only (e.g. prune.method=fpgm)
    name: str = ""                       # what the chain calls it (its entry point when empty)

    @property
    def label(self) -> str:
        return self.name or self.entry


def as_step(step: "Step | tuple[str, int | None]") -> Step:
    """A kind may give its steps as (entry point, source) pairs: those change no setting."""
    return step if isinstance(step, Step) else Step(*step)


@dataclass(frozen=True)
class EntryPoint:
    stage: Stage
    does: str                  # what this entry point does for this kind, in one line
    reads_model: bool = False  # takes --model-uri: the run (or model) of an earlier step


@dataclass(frozen=True)
class Flag:
    """A command-line flag of one kind's: a shorthand for one of its settings (other kinds
    refuse that setting in one line, so the flag needs no check of its own)."""

    option: str                            # e.g. "--weights"
    help: str
    override: Callable[[Any], str | None]  # the flag's value -> KEY=VALUE, or None when not given
    action: str = "store"                  # argparse's: "store" takes a value, "store_true" none

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class StudyKind:
    """A study kind: what its entry points do, the steps `main` chains, its report,
    its config sections, and what its model must offer."""

    name: str
    entry_points: dict[str, EntryPoint]
    steps: Callable[[StudyConfig], list]  # Steps, or (entry point, source) pairs; read through `chain_of`
    report: Callable[[StudyConfig], Report]
    sections: dict[str, type] = field(default_factory=dict)
    # The entry point whose run, the last of its kind in a trial's chain, holds the model a
    # trial delivers: `main` registers its final model. None: no single model (nothing registered).
    deliverable: str | None = None
    model_protocol: type = base.Model
    # Whether a network from a factory (torchvision:NAME, PACKAGE.MODULE:FUNCTION) may be used:
    # the kind finds what it needs from the network's structure, not from `model_protocol`.
    any_network: bool = False
    # (what, setting key, value getter, registry) of the names this kind's settings hold
    names: tuple[tuple[str, str, Callable[[StudyConfig], str], Any], ...] = ()
    # The kind's own checks of its settings against each other and the model, run last (one line each)
    checks: tuple[Callable[[StudyConfig], None], ...] = ()
    flags: tuple[Flag, ...] = ()  # its own command-line flags
    # The kind's checks of a fresh model on the study's data (cfg, model, data), run by
    # `check_inputs` before `main` starts any run (one line each)
    model_checks: tuple[Callable[[StudyConfig, nn.Module, ImageData], None], ...] = ()
    # Settings that choose which steps the chain has, not what a step computes (a comparison's
    # list of methods): left out of step keys, so adding a method reuses every other step.
    plan_settings: tuple[str, ...] = ()

    def chain_of(self, cfg: StudyConfig) -> list[Step]:
        """The trial's steps, each a `Step`."""
        return [as_step(step) for step in self.steps(cfg)]

    def check(self, cfg: StudyConfig) -> None:
        """Refuse, in one line, an unknown model, dataset or name setting, or a model this
        kind cannot use, before anything loads or a run starts."""
        self._check_model_name(cfg)
        shared = (("dataset", "data.dataset", lambda c: c.data.dataset, datasets.DATASETS),
                  ("optimizer", "train.optimizer", lambda c: c.train.optimizer, OPTIMIZERS),
                  ("precision", "train.precision", lambda c: c.train.precision, PRECISION_SETTINGS))
        for what, key, value_of, registry in shared + self.names:
            value = value_of(cfg)
            if value not in registry:
                raise ConfigError(f"unknown {what} {value!r} ({key} must be one of {', '.join(sorted(registry))})")
        device = hardware.resolve(cfg.device)  # an absent device: one line naming what there is
        for section in self._training_sections(cfg):
            check_precision(getattr(cfg, section).precision, device, f"{section}.precision")
        lacks = [] if factory.is_factory(cfg.model) else base.missing(models.MODELS[cfg.model], self.model_protocol)
        if lacks:
            fits = self._fitting_models()
            raise ConfigError(f"model {cfg.model!r} cannot be used in a {self.name} study: it offers no {', '.join(lacks)} "
                              f"({self.model_protocol.__doc__.splitlines()[0].rstrip('.')}); choose one of {', '.join(fits)}")
        for check in self.checks:
            check(cfg)

    def _check_model_name(self, cfg: StudyConfig) -> None:
        """A registered model, or a factory this kind takes whose module imports (the user's
        code runs here: the user named it) and holds a callable."""
        if factory.is_factory(cfg.model):
            if not self.any_network:
                needs = ", ".join(base.missing(factory.FactoryNetwork, self.model_protocol))
                raise ConfigError(f"model {cfg.model!r} cannot be used in a {self.name} study: it needs {needs}, which a "
                                  f"network from a factory does not offer; choose one of {', '.join(self._fitting_models())}")
            factory.resolve(cfg.model)
        elif cfg.model not in models.MODELS:
            more = ", torchvision:NAME or PACKAGE.MODULE:FUNCTION" if self.any_network else ""
            raise ConfigError(f"unknown model {cfg.model!r} (model must be one of {', '.join(sorted(models.MODELS))}{more})")

    def _fitting_models(self) -> list[str]:
        return sorted(n for n, cls in models.MODELS.items() if not base.missing(cls, self.model_protocol))

    def check_inputs(self, cfg: StudyConfig) -> None:
        """What `main` checks before any run: the data set reads (labels whole and in range:
        `ImageData`'s own check), the model takes its images and predicts its classes, and
        the kind's own checks of the model pass (`model_checks`)."""
        data = read_data(cfg.data)
        check_image_size(cfg.model, data)
        if self.model_checks or factory.is_factory(cfg.model) or cfg.model_weights:
            with torch.random.fork_rng(devices=[]):  # a check leaves the random state as it found it
                model = new_model(cfg, data, seed_of(cfg, 0))
                for check_model in self.model_checks:
                    check_model(cfg, model, data)

    def _training_sections(self, cfg: StudyConfig) -> list[str]:
        """The sections that configure a training loop (train, and finetune where the kind has one)."""
        return [s for s in ("train", *self.sections) if isinstance(getattr(cfg, s), TrainConfig)]

    def resolved(self, cfg: StudyConfig) -> StudyConfig:
        """`cfg` with every `auto` precision replaced by the one this machine's device gets, so
        that runs log, and reuse compares, the arithmetic that was actually used."""
        device = hardware.resolve(cfg.device)
        chosen = {s: dataclasses.replace(getattr(cfg, s), precision=resolve_precision(getattr(cfg, s).precision, device))
                  for s in self._training_sections(cfg)}
        return dataclasses.replace(cfg, **chosen)

    def run(self, entry_point: str, cfg: StudyConfig, trial: int, model_ref: str | None = None) -> str:
        """Run one entry point of this kind; returns the run id."""
        entry = self.entry_points.get(entry_point)
        if entry is None:
            raise ConfigError(f"a {self.name} study has no {entry_point} step: its entry points are "
                              f"{', '.join(self.entry_points)}")
        return entry.stage(cfg, trial, model_ref) if entry.reads_model else entry.stage(cfg, trial)

    def publish_report(self, cfg: StudyConfig, out_dir=None, command: str = "") -> str:
        """Draw the study's figures from its runs into a report run (and `out_dir`); returns its id.
        No runs to draw is one line naming `command`, the `prunelab run` that makes them."""
        try:
            with reporting.drawing_from() as sources:
                figures, table = self.report(cfg)
        except NothingToDraw as exc:
            if not command:
                raise
            raise exc.run_with(command) from None
        return reporting.publish(cfg, figures, table, out_dir, sources)


# The name check of kinds that own a `finetune` section.
FINETUNE_OPTIMIZER = ("optimizer", "finetune.optimizer", lambda c: c.finetune.optimizer, OPTIMIZERS)
FINETUNE_PRECISION = ("precision", "finetune.precision", lambda c: c.finetune.precision, PRECISION_SETTINGS)


def chain(*entries: str) -> Callable[[StudyConfig], list[Step]]:
    """Steps of a linear chain: each step reads the previous step's run."""
    steps = [Step(entry, i - 1 if i else None) for i, entry in enumerate(entries)]
    return lambda cfg: list(steps)


# --------------------------------------------------------------------------- the stage prologue

def seed_of(cfg: StudyConfig, trial: int) -> int:
    return cfg.seed + trial


def common_tags(cfg: StudyConfig, trial: int) -> dict:
    return {paths.TAG_STUDY: cfg.study, paths.TAG_TRIAL: trial, paths.TAG_SEED: seed_of(cfg, trial)}


def common_params(cfg: StudyConfig, trial: int, method: str) -> dict:
    # The same names in every study, so any two runs compare side by side.
    # `seed` is the trial's own seed (the preset's `seed` is that of trial 0).
    return {**cfg.flat(), "study": cfg.study, "model": cfg.model, "dataset": cfg.data.dataset,
            "method": method, "trial": trial, "seed": seed_of(cfg, trial)}


def device_tags(cfg: StudyConfig) -> dict:
    device = hardware.resolve(cfg.device)
    return {"device": str(device), "hardware": hardware.name(device)}


def describe(cfg: StudyConfig, trial: int, stage: str, method: str, model_ref: str | None = None) -> str:
    """A run's description (markdown, shown at the top of its page in the UI)."""
    source = f", from `{model_ref}`" if model_ref else ""
    return (f"**{stage}** of study `{cfg.study}` ({cfg.kind}), trial {trial} (seed {seed_of(cfg, trial)}): "
            f"{cfg.model} on {cfg.data.dataset}, method {method}{source}.")


@contextlib.contextmanager
def stage_run(cfg: StudyConfig, trial: int, stage: str, run_name: str, method: str,
              tags: dict | None = None, params: dict | None = None, data: ImageData | None = None,
              model_ref: str | None = None) -> Iterator[runs.Run]:
    """The run of one stage: the study's tags (the device and hardware among them), params and
    description, then the stage's own; its lineage: the image sets it reads and the logged
    model it starts from."""
    all_tags = {**common_tags(cfg, trial), **device_tags(cfg), **(tags or {})}
    with runs.start_run(cfg.study, stage, all_tags, run_name, describe(cfg, trial, stage, method, model_ref)) as run, \
            progress.labelled(run_name):
        run.log_params({**common_params(cfg, trial, method), **(params or {})})
        run.log_inputs(data.splits() if data is not None else (), [model_ref] if model_ref else ())
        yield run


def check_fits(model: nn.Module, data: ImageData, inputs: Callable | None = None) -> None:
    """Refuse a model that cannot take the data's images (as `inputs` makes them from
    uint8; normalised by default) or does not return one score per class."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = model((inputs or data.normalise)(data.test_x[:2]))
    except Exception as exc:  # whatever a foreign (e.g. traced) model raises on input it was not made for
        raise ModelError(f"the model does not accept {data.name} images {tuple(data.input_shape)}: "
                         f"{first_line(exc)[:120]}") from None
    made_by = getattr(model, "factory", None)
    hint = f" (does {made_by} take num_classes?)" if made_by else ""
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns a {type(out).__name__}, not a tensor of class scores{hint}")
    if out.dim() != 2:
        raise ModelError(f"the model returns a tensor of shape {tuple(out.shape)} for 2 images, not one score per "
                         f"class (2, {data.num_classes}){hint}")
    if out.shape[-1] != data.num_classes:
        raise ModelError(f"the model predicts {out.shape[-1]} classes, {data.name} has {data.num_classes}{hint}")


def load_data(cfg: StudyConfig) -> ImageData:
    """The study's data, on its device, checked against the study's model (before any run)."""
    data = read_data(cfg.data)
    check_image_size(cfg.model, data)
    return data.to(hardware.resolve(cfg.device))


LARGEST_SIDE = 4096  # px: the largest square image the search for a model's smallest one tries


def _refusal(name: str, shape: tuple[int, ...], num_classes: int, side: int) -> Exception | None:
    """Why a fresh `name` refuses square images of `side` px with `shape`'s channels (None: it takes
    them). Built and run on the meta device: nothing is allocated, nothing computed."""
    try:
        with torch.device("meta"), torch.no_grad():
            model = models.build(name, (shape[0], side, side), num_classes).eval()
            model(torch.empty(1, shape[0], side, side))
    except NotImplementedError:
        return None  # an operation the meta device lacks: cannot be told here, so not refused
    except PrunelabError:
        raise  # a factory that does not build: its own one line, not a size it cannot take
    except Exception as exc:
        return exc
    return None


def smallest_side(name: str, shape: tuple[int, ...], num_classes: int) -> int | None:
    """The smallest square image side (px) a fresh `name` takes, above `shape`'s, or None when
    none up to LARGEST_SIDE does."""
    refused, side = max(shape[1:]), max(shape[1:])
    while _refusal(name, shape, num_classes, side) is not None:
        refused, side = side, side * 2
        if side > LARGEST_SIDE:
            return None
    while side - refused > 1:  # taken at `side`, refused at `refused`: halve the gap
        middle = (side + refused) // 2
        if _refusal(name, shape, num_classes, middle) is None:
            side = middle
        else:
            refused = middle
    return side


def check_image_size(name: str, data: ImageData) -> None:
    """Refuse, in one line before any run, a model that cannot take the data's images (VGG16
    halves the side five times: 28 x 28 px leaves nothing), naming the smallest size it takes."""
    shape = tuple(data.input_shape)
    refusal = _refusal(name, shape, data.num_classes, shape[-1]) if shape[-2] == shape[-1] else None
    if refusal is None:
        return
    smallest = smallest_side(name, shape, data.num_classes)
    size = " x ".join(map(str, shape[1:]))
    if smallest is None:
        raise ConfigError(f"model {name!r} cannot take {data.name}'s images of {size} px "
                          f"({first_line(refusal)[:120]}); choose another model")
    raise ConfigError(f"model {name!r} cannot take {data.name}'s images of {size} px: it needs at least "
                      f"{smallest} x {smallest}; choose another model (or data.image_size={smallest} or more)")


def read_data(cfg: DataConfig) -> ImageData:
    """The data set; one whose folder is a URI (an object store, the tracking server's
    artifacts) is downloaded first, where the step runs, and read from there."""
    if paths.is_uri(cfg.data_dir):
        with remote.fetched(cfg.data_dir, query.download_uri) as local:
            return datasets.get(dataclasses.replace(cfg, data_dir=str(local)))
    return datasets.get(cfg)


def new_model(cfg: StudyConfig, data: ImageData, seed: int) -> nn.Module:
    """A freshly initialised `cfg.model` for the data (from `cfg.model_weights` where set), on the
    data's device. Initialised on the CPU, so a seed gives the same weights on every device. A
    network from a factory is checked against the data (its output may not be one score per class)."""
    torch.manual_seed(seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes)
    if cfg.model_weights:
        checkpoints.load_pretrained(model, checkpoints.pretrained_state(cfg.model_weights, cfg.model), cfg.model_weights)
    model.to(data.device)
    if factory.is_factory(cfg.model):
        check_fits(model, data)
    return model


def load_model(ref: str, cfg: StudyConfig, data: ImageData) -> nn.Module:
    """The network an earlier step made (run id or weights file), on the data's device,
    checked against the data."""
    model = loading.load_model(ref, cfg.model)
    if not models.is_rebuildable(model):
        raise ModelError(f"{ref} is a logged model (a traced graph taking pixels), which a stage cannot prune or "
                         "train: pass the run id of the step that logged it, whose weights-only checkpoint is read")
    model.to(data.device)
    check_fits(model, data)
    return model


def for_users(model: nn.Module, data: ImageData) -> nn.Module:
    """`model` as a person uses it: float pixels in [0, 1] in, the data set's normalisation inside.
    The wrapper takes the network's mode, so the network is left in the mode it had."""
    return PixelInput(model, data.mean, data.std).train(model.training)
