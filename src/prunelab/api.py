"""The Python API: `prunelab.prune(...)` and `prunelab.load(...)` (docs/api.md).

`prune` runs the stages the command line runs, in this process: `train` (unless
it starts from a trained model), `prune`, `finetune`, each its own MLflow run
with the tags, params, metrics and logged models `prunelab train|prune|finetune`
give it, and, when asked, registers the final model as `main` does. Nothing
here trains, prunes or logs by itself: the settings become the same frozen
`StudyConfig` the command line builds (`studies.load_config`), checked before
any run starts (bad input is one line, a `PrunelabError`), and the study kind's
stages do the rest.

`load` returns a logged or registered model as an `nn.Module` that takes float
pixels in [0, 1], as every logged model does, without unpickling anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from torch import nn

from prunelab import config, models, paths, studies
from prunelab.config import StudyConfig
from prunelab.errors import ConfigError, ModelError, shown
from prunelab.models import factory
from prunelab.models.pixels import PixelInput
from prunelab.pipeline.study import register as register_models
from prunelab.studies.common import Step
from prunelab.tracking import connection, loading, query
from prunelab.tracking import models as logged_models

# The entry points `prune` chains, as `main` chains them for a filter-pruning study.
CHAIN = ("train", "prune", "finetune")
# The keyword arguments of `prune` and the settings they stand for.
KEYWORDS = {"model": "model", "data": "data.dataset", "method": "prune.method", "target": "prune.target"}


@dataclasses.dataclass(frozen=True)
class Pruned:
    """What `prune` made, as the tracking server holds it."""

    study: str                  # the study, and the MLflow experiment its runs are in
    runs: dict[str, str]        # entry point -> run id: train (unless started from a model), prune, finetune
    model_uri: str              # the last run's final logged model, `models:/m-...`
    metrics: dict[str, float]   # that model's metrics: test_accuracy, params, macs, fraction_remaining, ...
    model: nn.Module            # that model, loaded back (`load(model_uri)`): pixels in [0, 1] in
    version: str | None = None  # its version of the registered model named after the study (register=True)


def prune(model: str | Callable[..., nn.Module] | None = None, data: str | None = None, method: str | None = None,
          target: float | None = None, *, start_from: str | None = None, finetune: bool = True,
          register: bool = False, study: str | None = None, preset: str = config.DEFAULT_STUDY,
          settings: Mapping[str, Any] | None = None, tracking_uri: str | None = None) -> Pruned:
    """Train (or start from a trained model), prune to `target` with `method`, fine-tune; every
    step an MLflow run as `prunelab train|prune|finetune` makes it. Returns a `Pruned`.

    - `model`: a registered name (`simple_cnn`), `torchvision:NAME`, `PACKAGE.MODULE:FUNCTION`, or
      that function itself. Not a network object: a pruned network is saved as its factory plus
      its widths and rebuilt from the factory when loaded, so nothing is ever unpickled; an object
      says nothing about how to build it again. A function must be importable by its module
      and name (not a lambda, a nested function or one of `__main__`).
    - `data`, `method`, `target`: the settings `data.dataset`, `prune.method` (taylor, l1, l2,
      fpgm, bn_scale, random) and `prune.target` (the fraction of the parameters that remains).
    - `start_from`: a trained model (run id, `runs:/...`, `models:/...` or weights file): no
      train run; it is pruned as it is.
    - `finetune`: False stops after the prune run. `register`: the final model becomes a version
      of the registered model named after the study, aliased `champion` (needs `finetune`).
    - `study`: the study's name, which is also its MLflow experiment. Default: the experiment
      the user made active (`mlflow.set_experiment`, an active run, MLFLOW_EXPERIMENT_NAME),
      else `<method>-<model>-<dataset>`. Runs started inside an active run become its children.
    - `preset`: the study preset whose settings are the defaults (a filter-pruning one).
    - `settings`: any other setting by its dotted name, e.g. {"train.epochs": 1, "data.n_train": 512}
      (`prunelab settings` lists them). `tracking_uri`: default MLflow's (MLFLOW_TRACKING_URI).
    """
    name = factory_name(model) if model is not None else None
    given = {key: value for key, value in zip(KEYWORDS.values(), (name, data, method, target)) if value is not None}
    settings = dict(settings or {})
    twice = sorted(set(given) & set(settings))
    if twice:
        raise ConfigError(f"{twice[0]} is set twice, by a keyword and in settings: set it once")
    if "trials" in settings:
        raise ConfigError("prunelab.prune runs one trial: call it once per seed (settings={'seed': N}), or run the "
                          "whole study with `prunelab run`")
    if register and not finetune:
        raise ConfigError("register=True registers the fine-tuned model: leave finetune=True")
    overrides = {**given, **settings, "trials": 1}
    cfg = studies.load_config(preset, {**overrides, "study": study or "unnamed"})  # checked before any connection
    kind = studies.get(cfg.kind)
    if [step.entry for step in kind.chain_of(cfg)] != list(CHAIN) or "prune" not in kind.sections:
        raise ConfigError(f"preset {preset!r} is a {cfg.kind} study, which prunelab.prune does not run (it chains "
                          f"{' -> '.join(CHAIN)} of a filter-pruning study): run it with `prunelab run --study {preset}`")
    connection.connect(tracking_uri)
    cfg = _named(cfg, study, preset, overrides)
    if start_from is None and not paths.is_uri(cfg.data.data_dir):
        kind.check_inputs(cfg)  # the data and a fresh model, as `main` checks them before any run
    runs: dict[str, str] = {}
    source = start_from
    if source is None:
        source = runs["train"] = kind.run("train", cfg, 0)
    source = runs["prune"] = kind.run("prune", cfg, 0, source)
    if finetune:
        source = runs["finetune"] = kind.run("finetune", cfg, 0, source)
    version = None
    if register:
        steps = [Step(entry, i - 1 if i else None) for i, entry in enumerate(runs)]
        version = register_models(cfg, kind, steps, [list(runs.values())])
    model_id = logged_models.logged_model_id(source)
    model_uri = f"models:/{model_id}"
    return Pruned(cfg.study, runs, model_uri, logged_models.logged_model_metrics(model_id),
                  load(model_uri, name or cfg.model), version)


def _named(cfg: StudyConfig, study: str | None, preset: str, overrides: dict) -> StudyConfig:
    """`cfg` with its study's name: the one given, else the active experiment's, else one made of
    the method, the model and the data set (checked as any study name is)."""
    inside = query.active_run_experiment()
    if study is not None and inside is not None and study != inside:
        raise ConfigError(f"study={study!r}, but the active MLflow run is in experiment {inside!r}: the runs become "
                          "its children, in its experiment, so leave study out (or end that run first)")
    if study is None:
        active = query.chosen_experiment()
        model = cfg.model.replace(factory.SEPARATOR, "-")
        study = active or f"{cfg.prune.method}-{model}-{cfg.data.dataset}"[:100]
        if active and not config.STUDY_NAME.fullmatch(active):
            raise ConfigError(f"the active MLflow experiment {active!r} cannot name a study (1-100 letters, digits, "
                              "'.', '_' or '-'): pass study=NAME, whose experiment the runs then go to")
    return studies.load_config(preset, {**overrides, "study": study})


def factory_name(model: str | Callable[..., nn.Module]) -> str:
    """The model setting `model` stands for: a name as it is, a function as `module:name`."""
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        raise ConfigError(f"model={type(model).__name__}(...) is a network object, which cannot be rebuilt when it is "
                          "loaded without unpickling it: pass the function that builds it (model=my_models.build, "
                          "or 'my_models:build'); a pruned network is saved as that function plus its widths")
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    if not callable(model) or not isinstance(module, str) or not isinstance(qualname, str):
        raise ConfigError(f"model={shown(model)} is neither a model name nor a function that builds the network")
    if module == "__main__" or not qualname.isidentifier():
        raise ConfigError(f"model={qualname}: a function must be importable by its module and name to rebuild the "
                          "network later (not a lambda, a nested function or one defined in the script you run): "
                          "define it in a module, e.g. my_models.py, and pass my_models.build")
    name = f"{module}{factory.SEPARATOR}{qualname}"
    if factory.resolve(name).call is not model:
        raise ConfigError(f"model={name}: importing {module} gives another {qualname}: pass 'PACKAGE.MODULE:FUNCTION'")
    return name


def load(uri: str, model: str | Callable[..., nn.Module] | None = None, *, tracking_uri: str | None = None) -> nn.Module:
    """The model `uri` names, as an `nn.Module` in eval mode on the CPU, taking float pixels in
    [0, 1] (N x C x H x W), as every logged model does; nothing is unpickled.

    `uri`: a run id (its final model), `runs:/<run>/model`, a logged model `models:/m-...`, or a
    registered one, `models:/<name>@<alias>` or `models:/<name>/<version>`. A model a prunelab
    stage logged comes back as the network it trained and pruned (rebuilt from its factory and
    widths, its weights read with `weights_only=True`) behind its data set's normalisation
    (`.network` is the bare network, `.mean` and `.std` the normalisation); any other must be a
    PyTorch model in MLflow's pt2 format and comes back as its traced graph.
    `model`: the factory of a network built by your own code (as given to `prune`), which
    loading then imports; a model's files never make prunelab import anything.
    """
    if not isinstance(uri, str):
        raise ModelError(f"uri={shown(uri)} is not a run id or a model URI (runs:/..., models:/...)")
    ref = uri.strip()
    if loading.weights_file(ref) is not None:
        raise ModelError(f"{shown(ref)} is a file, not a model on the tracking server: pass a run id or a model URI "
                         "(a weights file holds no normalisation; `prunelab evaluate FILE --dataset NAME` scores one)")
    connection.connect(tracking_uri)
    if ref.startswith("models:/") and not ref.removeprefix("models:/").startswith("m-"):
        model_id = logged_models.logged_model_id(ref)  # a registered version: the logged model it stands for
        ref = f"models:/{model_id}" if model_id else ref
    network = loading.load_model(ref, factory_name(model) if model is not None else None)
    if not models.is_rebuildable(network):
        return network  # a traced pt2 graph: it takes pixels already
    mean_std = loading.normalisation(ref)
    if mean_std is None:
        raise ModelError(f"{uri} names no run that records its data set's normalisation: pass a run id or model URI "
                         "a prunelab stage logged")
    return PixelInput(network, *mean_std).eval()
