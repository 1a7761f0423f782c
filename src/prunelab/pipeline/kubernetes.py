"""`prunelab run --backend kubernetes`: every trial's steps as Kubernetes Jobs through
MLflow Projects. The backend config is checked before any run starts; the steps
of all trials are submitted at once and then waited for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import yaml

from prunelab import paths
from prunelab.errors import ConfigError, PrunelabError
from prunelab.pipeline.steps import mark_reusable, reuse, shipped_project
from prunelab.tracking import projects, query
from prunelab.tracking.run import PARENT_RUN_ID, Run, end_with, fail

KUBE_TRACKING_ENV = "KUBE_MLFLOW_TRACKING_URI"  # the server's address as the cluster's pods reach it (MLflow's)
KUBE_CONFIG_KEYS = ("repository-uri", "kube-job-template-path")  # what MLflow requires of a backend config


def kubernetes_backend(config_file: str | None, uri: str) -> dict:
    """The backend config of `--backend kubernetes`, checked before any run starts: the
    optional packages, MLflow's keys, the Job template, Docker, and a tracking server the
    pods can reach (`uri` here, or KUBE_MLFLOW_TRACKING_URI). Every problem is one line."""
    try:
        import docker  # noqa: F401  (MLflow pulls and pushes the step image with it)
        import kubernetes  # noqa: F401  (MLflow submits and watches the Jobs with it)
    except ImportError as exc:
        raise ConfigError(f"--backend kubernetes needs the {exc.name} package: pip install 'prunelab[kubernetes]'") from None
    if not config_file:
        raise ConfigError("--backend kubernetes needs --backend-config FILE (deploy/kubernetes/backend-config.json "
                          "is an example)")
    try:
        config = json.loads(Path(config_file).read_text())
    except OSError as exc:
        raise ConfigError(f"--backend-config {config_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--backend-config {config_file} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--backend-config {config_file} is not a JSON object of MLflow's Kubernetes settings")
    missing = [k for k in KUBE_CONFIG_KEYS if not isinstance(config.get(k), str) or not config[k]]
    if missing:
        raise ConfigError(f"--backend-config {config_file} lacks {missing[0]!r}: MLflow's Kubernetes backend needs "
                          f"{' and '.join(KUBE_CONFIG_KEYS)}")
    template = Path(config["kube-job-template-path"])
    try:
        job = yaml.safe_load(template.read_text())
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert isinstance(container, dict) and isinstance(job["metadata"], dict)
    except OSError as exc:
        raise ConfigError(f"kube-job-template-path {template} (relative to this folder): "
                          f"{exc.strerror or exc}") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError, AssertionError):
        raise ConfigError(f"kube-job-template-path {template} is not a Kubernetes Job with a container "
                          "(spec.template.spec.containers): see deploy/kubernetes/job-template.yaml") from None
    if "image" in config and (not isinstance(config["image"], str) or not config["image"]):
        raise ConfigError(f"--backend-config {config_file}: 'image' must name the step image (registry/name:tag)")
    reached_at = os.environ.get(KUBE_TRACKING_ENV) or uri
    host = urllib.parse.urlparse(reached_at).hostname or ""
    if host in ("localhost", "") or host.startswith("127.") or host == "::1":
        raise ConfigError(f"the cluster's pods cannot reach the tracking server at {reached_at}: export "
                          f"{KUBE_TRACKING_ENV}=<its address as the cluster sees it> (a team server, docs/scaling.md)")
    found = shutil.which("docker")
    if found is None:
        raise ConfigError("--backend kubernetes pulls and pushes the step image with Docker: no docker on PATH")
    info = subprocess.run([found, "info"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if info.returncode != 0:
        said = (info.stderr or info.stdout).strip().splitlines()
        raise ConfigError(f"--backend kubernetes: the Docker daemon does not answer (`docker info`: "
                          f"{said[-1] if said else info.returncode}): start it")
    return config


def kubernetes_project(config: dict) -> Path:
    """The project MLflow's Kubernetes backend runs: the shipped one (docker_env), or, when the
    backend config names an "image", a copy of it naming that image instead."""
    project = shipped_project("kubernetes")
    if "image" not in config:
        return project
    spec = yaml.safe_load((project / "MLproject").read_text())
    spec["docker_env"]["image"] = config["image"]
    folder = Path(tempfile.mkdtemp(prefix="prunelab-kubernetes-project-"))
    (folder / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


class PendingStep:
    """A step submitted to the cluster (or reused: then `submitted` is None)."""

    def __init__(self, entry_point: str, run_id: str, submitted=None, key: str | None = None):
        self.entry_point, self.run_id, self.submitted, self.key = entry_point, run_id, submitted, key


def submit_step(experiment: str, entry_point: str, params: dict[str, str], key: str | None, parent_id: str,
                project: Path, config: dict) -> PendingStep:
    """Submit one MLproject entry point as a Kubernetes Job through MLflow (not waiting for
    it), or reuse a finished run with the same step key, as `steps.run_step` does."""
    reused = reuse(experiment, entry_point, key, parent_id)
    if reused is not None:
        return PendingStep(entry_point, reused)
    backend_config = {k: v for k, v in config.items() if k != "image"}
    submitted = projects.submit_to_kubernetes(project, experiment, entry_point, params, parent_id, backend_config)
    Run(submitted.run_id).set_tags({paths.TAG_STEP_RUNNER: "kubernetes", PARENT_RUN_ID: parent_id})
    print(f"prunelab: submitted {entry_point} run {submitted.run_id} as Kubernetes Job "
          f"{getattr(submitted, '_job_name', '?')}", flush=True)
    return PendingStep(entry_point, submitted.run_id, submitted, key)


def run_on_cluster(experiment: str, steps: list[tuple[str, dict[str, str], str | None]], parent_id: str,
                   project: Path, config: dict) -> list[str]:
    """Submit every (entry point, params, step key) at once as Kubernetes Jobs, then wait for
    all of them; returns their run ids in order. A step whose Job failed (or whose pod died
    before its run ended) ends FAILED, and then this raises one line; when a submission
    fails, or on Ctrl-C or a signal, the Jobs already submitted are cancelled."""
    pending: list[PendingStep] = []
    failed = []
    try:
        for entry_point, params, key in steps:
            pending.append(submit_step(experiment, entry_point, params, key, parent_id, project, config))
        for step in pending:
            if step.submitted is None:
                continue
            ok = step.submitted.wait()
            if query.status(step.run_id) == "RUNNING":  # the pod ended without ending its run
                end_with(step.run_id, "FINISHED" if ok else "FAILED",
                     f"its Kubernetes Job ended {'' if ok else 'un'}successfully without ending the run")
            if ok and step.key is not None:  # only a step that finished can be reused
                mark_reusable(step.run_id, step.key)
            elif not ok:
                failed.append(step)
    except BaseException:
        for step in pending:
            if step.submitted is not None:
                step.submitted.cancel()
                if query.status(step.run_id) == "RUNNING":
                    fail(step.run_id, "cancelled: another step of its study could not go on")
        raise
    if failed:
        first = failed[0]
        raise PrunelabError(f"{len(failed)} step(s) failed on the cluster, first {first.entry_point} run {first.run_id} "
                            f"(`kubectl logs job/{getattr(first.submitted, '_job_name', '<its Job>')}` says why)")
    return [step.run_id for step in pending]

