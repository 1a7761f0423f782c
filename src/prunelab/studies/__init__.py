"""The study kinds: the one list of them, and what needs that list.

A study kind is one module in this package (its config sections, stages and
report, see `common.StudyKind`) plus one line in `KINDS` below; its preset
names it with `kind:`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from prunelab import config
from prunelab.config import StudyConfig
from prunelab.errors import ConfigError
from prunelab.studies import criteria_comparison, filter_pruning, kmeans_clustering, lottery_ticket, transfer_pruning
from prunelab.studies.common import StudyKind

KINDS: dict[str, StudyKind] = {kind.name: kind for kind in (
    filter_pruning.KIND,
    transfer_pruning.KIND,
    lottery_ticket.KIND,
    kmeans_clustering.KIND,
    criteria_comparison.KIND,
)}


def get(name: str) -> StudyKind:
    kind = KINDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown study kind {name!r}: choose one of {', '.join(KINDS)}")
    return kind


def load_config(study: str = config.DEFAULT_STUDY, overrides: list[str] | str | Mapping[str, Any] | None = None
                ) -> StudyConfig:
    """Preset plus overrides (KEY=VALUE texts, or a mapping of keys to values), with the sections
    of the study's kind, validated and checked against the registries (names, and what the model offers)."""
    raw = config.raw_settings(study, overrides)
    kind = get(config.kind_of(raw))
    cfg = config.build(raw, kind.sections)
    kind.check(cfg)
    return kind.resolved(cfg)


def step_config(cfg: StudyConfig, overrides: tuple[str, ...] | list[str]) -> StudyConfig:
    """`cfg` with one step's own settings (KEY=VALUE) applied: what `prunelab <entry point>`
    builds when those settings follow the study's on its command line. No overrides: `cfg`."""
    if not overrides:
        return cfg
    kind = get(cfg.kind)
    raw = config.apply_overrides(dataclasses.asdict(cfg), list(overrides))
    return kind.resolved(config.build(raw, kind.sections))


def field_help() -> dict[str, str]:
    """Every setting a preset or override may set, with its help: the shared ones,
    then each kind's own, marked with the kinds that have them."""
    shared = config.field_help()
    helps: dict[str, str] = {}
    owners: dict[str, list[str]] = {}
    for kind in KINDS.values():
        for key, text in config.field_help(config.for_kind(kind.name, tuple(kind.sections.items()))).items():
            if key not in shared:
                helps[key] = text
                owners.setdefault(key, []).append(kind.name)
    return {**shared, **{key: f"{text} [{', '.join(owners[key])}]" for key, text in helps.items()}}


def report(cfg: StudyConfig, out_dir=None, command: str = "") -> str:
    """Draw the study's report from its runs; returns the report run's id. `command`: the
    `prunelab run` that makes the runs, as the study was asked for (named when there are none)."""
    return get(cfg.kind).publish_report(cfg, out_dir, command)
