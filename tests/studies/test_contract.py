"""The contract every study kind keeps, checked over the registry itself: a new
kind that breaks it fails here before any study runs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from prunelab import config, models, studies
from prunelab.errors import ConfigError
from prunelab.models import base
from prunelab.studies import common

KINDS = sorted(studies.KINDS)
PRESETS = config.available_studies()


def kind_of(preset: str) -> str:
    return config.read_preset(preset).get("kind", config.DEFAULT_KIND)


def preset_of(kind: str) -> str:
    """A shipped preset of this kind (every kind ships at least one)."""
    for name in PRESETS:
        if kind_of(name) == kind:
            return name
    pytest.fail(f"no preset in src/prunelab/presets names kind {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_ships_a_preset(kind):
    assert preset_of(kind)


@pytest.fixture(params=PRESETS)
def kind_and_cfg(request):
    """Every shipped preset (a kind with several, such as a model of its own, is checked with each)."""
    return studies.get(kind_of(request.param)), studies.load_config(request.param)


def test_every_kind_names_its_entry_points(kind_and_cfg):
    kind, _ = kind_and_cfg
    assert set(kind.entry_points) == set(common.ENTRY_POINTS)
    for name, entry in kind.entry_points.items():
        assert entry.does and "\n" not in entry.does
        wanted = ["cfg", "trial", "model_ref"] if entry.reads_model else ["cfg", "trial"]
        assert list(inspect.signature(entry.stage).parameters) == wanted, (kind.name, name)
    # The module's opening table says what each entry point does for this kind.
    doc = inspect.getmodule(kind.report).__doc__
    assert all(f"| `{name}` |" in doc for name in kind.entry_points)


def test_every_step_reads_only_an_earlier_step(kind_and_cfg):
    kind, cfg = kind_and_cfg
    steps = kind.chain_of(cfg)
    assert steps, kind.name
    for i, (entry, source) in enumerate((step.entry, step.source) for step in steps):
        assert entry in kind.entry_points
        if source is None:
            continue
        assert 0 <= source < i, (kind.name, i, source)
        assert kind.entry_points[entry].reads_model, (kind.name, entry)


def test_a_run_logs_the_shared_settings_and_its_own_kind_only(kind_and_cfg):
    kind, cfg = kind_and_cfg
    shared = set(config.field_help())
    own = {f"{section}.{f.name}" for section, cls in kind.sections.items() for f in dataclasses.fields(cls)}
    assert set(cfg.flat()) == shared | own
    foreign = {section for other in studies.KINDS.values() for section in other.sections} - set(kind.sections)
    assert not any(key.split(".")[0] in foreign for key in cfg.flat())


def test_a_setting_of_another_kind_is_refused(kind_and_cfg):
    kind, _ = kind_and_cfg
    foreign = sorted({s for other in studies.KINDS.values() for s in other.sections} - set(kind.sections))
    if not foreign:
        pytest.skip(f"every section belongs to {kind.name}")
    with pytest.raises(ConfigError, match=f"unknown setting {foreign[0]} for a {kind.name} study"):
        studies.load_config(preset_of(kind.name), [f"{foreign[0]}.x=1"])


@pytest.mark.parametrize("change, words", [
    ({"model": "resnet999"}, "unknown model 'resnet999'"),
    ({"data": ("dataset", "mnist3d")}, "unknown dataset 'mnist3d'"),
    ({"train": ("optimizer", "rmsprop")}, "unknown optimizer 'rmsprop'"),
])
def test_check_refuses_unknown_names(kind_and_cfg, change, words):
    kind, cfg = kind_and_cfg
    (key, value), = change.items()
    bad = dataclasses.replace(cfg, **{key: dataclasses.replace(getattr(cfg, key), **{value[0]: value[1]})
                                      if isinstance(value, tuple) else value})
    with pytest.raises(ConfigError) as err:
        kind.check(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_check_refuses_every_unknown_method_name(kind_and_cfg):
    """Each name setting the kind declares is checked against its registry."""
    kind, cfg = kind_and_cfg
    for what, key, _, registry in kind.names:
        section, name = key.split(".")
        bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: "no-such-name"})})
        with pytest.raises(ConfigError) as err:
            kind.check(bad)
        assert f"unknown {what} 'no-such-name'" in str(err.value) and "\n" not in str(err.value)
        assert all(str(choice) in str(err.value) for choice in registry)


def test_check_refuses_an_incompatible_model(kind_and_cfg):
    kind, cfg = kind_and_cfg
    unfit = sorted(n for n, cls in models.MODELS.items() if base.missing(cls, kind.model_protocol))
    if not unfit:
        pytest.skip(f"every registered model can be used in a {kind.name} study")
    with pytest.raises(ConfigError) as err:
        kind.check(dataclasses.replace(cfg, model=unfit[0]))
    message = str(err.value)
    assert f"model {unfit[0]!r} cannot be used in a {kind.name} study" in message and "\n" not in message


def test_filter_pruning_refuses_conv2_before_any_run(capsys):
    """conv2 has no prunable filters: one line, exit 2, before any connection."""
    from prunelab import cli

    assert cli.main(["prune", "--set", "model=conv2", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunelab: error: model 'conv2' cannot be used in a filter_pruning study") and "\n" not in err


def test_an_unknown_kind_lists_the_kinds():
    with pytest.raises(ConfigError) as err:
        studies.load_config(overrides=["kind=pruning_by_vibes"])
    assert all(name in str(err.value) for name in studies.KINDS)


def test_the_deliverable_is_a_step_of_the_chain(kind_and_cfg):
    """What `main` registers: the model of an entry point the chain runs (or nothing), said in the module's docstring."""
    kind, cfg = kind_and_cfg
    assert kind.deliverable is None or kind.deliverable in {step.entry for step in kind.chain_of(cfg)}
    assert "registered" in inspect.getmodule(kind.report).__doc__
