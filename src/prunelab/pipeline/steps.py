"""One step of `main`: an MLproject entry point as its own MLflow run, reused when a
finished run of the same step exists (as MLflow's multistep example does).

A step key says what makes two runs of a step the same: its entry point, the
resolved settings, the runs it reads and the code version. A step runs in this
process (a run is created as `mlflow run -e <entry point>` would create it, and
the stage resumes it: no ~10 s process start) or as a `mlflow run` process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import Any, Callable

from prunelab import paths
from prunelab.errors import ConfigError
from prunelab.tracking import projects, query
from prunelab.tracking.run import PARENT_RUN_ID, Run, fail, resuming, set_parent

PACKAGE = Path(__file__).resolve().parents[1]  # src/prunelab (or the installed package)


def project_dir() -> Path:
    """The folder holding MLproject: the working directory under `mlflow run`, else the
    repository of a source checkout, else the copy shipped in the package (an installed
    prunelab runs its steps from any folder)."""
    for candidate in (Path.cwd(), PACKAGE.parents[1]):
        if (candidate / "MLproject").is_file():
            return candidate
    return shipped_project()


def shipped_project(variant: str = "") -> Path:
    """The MLproject folder shipped as package data: the local one, or a variant
    (`kubernetes`: the project MLflow's Kubernetes backend builds an image from)."""
    folder = Path(str(importlib.resources.files("prunelab") / "project")) / variant
    if not (folder / "MLproject").is_file():
        raise ConfigError(f"no MLproject in {folder}: reinstall prunelab (`pip install .` ships it)")
    return folder


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of prunelab's own source files: a step is reused only by the code that made it,
    committed or not."""
    digest = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):
        digest.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def step_key(entry_point: str, settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """What makes two runs of a step the same: its entry point, the resolved settings (never
    their spelling on a command line), the runs it reads, and the code version."""
    text = json.dumps({"entry_point": entry_point, "settings": settings, "inputs": inputs, "code": code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def already_ran(experiment: str, key: str):
    """The newest finished run with this step key, if any."""
    found = query.find_runs(experiment, f"tags.`{paths.TAG_STEP_KEY}` = '{key}'")
    return found[0] if found else None


def reuse(experiment: str, entry_point: str, key: str | None, parent_id: str | None) -> str | None:
    """The finished run of this step, moved under `parent_id`, when there is one."""
    found = already_ran(experiment, key) if key is not None else None
    if found is None:
        return None
    print(f"prunelab: reusing finished {entry_point} run {found.info.run_id}", flush=True)
    if parent_id:
        set_parent(found.info.run_id, parent_id)
    return found.info.run_id


def mark_reusable(run_id: str, key: str) -> None:
    """Only a step that finished can be reused: its key goes on once it has."""
    Run(run_id).set_tags({paths.TAG_STEP_KEY: key, paths.TAG_CODE_VERSION: code_version()})


def run_step(experiment: str, entry_point: str, params: dict[str, str], key: str | None = None,
             call: Callable[[], Any] | None = None, parent_id: str | None = None) -> str:
    """Run one MLproject entry point as its own MLflow run; returns its run id.

    A finished run with the same step `key` is reused instead (and moved under
    `parent_id`). With `call`, the step runs in this process: a run is created as
    `mlflow run -e <entry point>` would create it and `call()` resumes it, which
    spares the ~10 s start of a process per step; without, `mlflow run` starts one.
    """
    reused = reuse(experiment, entry_point, key, parent_id)
    if reused is not None:
        return reused
    project = project_dir()
    if call is not None:
        run_id = projects.create_step_run(project, experiment, entry_point, params, parent_id,
                                          {paths.TAG_STEP_RUNNER: "in-process"})
        try:
            with resuming(run_id):
                call()
        except BaseException as exc:
            if query.status(run_id) == "RUNNING":  # failed before the stage opened its run
                fail(run_id, f"{type(exc).__name__}: {str(exc)[:200]}")
            raise
    else:
        run_id = projects.run_entry_point(project, experiment, entry_point, params)
        Run(run_id).set_tags({paths.TAG_STEP_RUNNER: "process", **({PARENT_RUN_ID: parent_id} if parent_id else {})})
    if key is not None:
        mark_reusable(run_id, key)
    return run_id
