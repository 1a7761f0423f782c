"""The cluster variant of the project, without a cluster: the Job MLflow's Kubernetes backend
would submit for a step, built by MLflow's own helpers from deploy/kubernetes, and its
command run here as the Job's container would run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO, clean_env
from prunelab import errors, paths
from prunelab.pipeline import kubernetes, steps
from prunelab.tracking import run as tracking_run

pytest.importorskip("kubernetes", reason="the kubernetes package (pip install 'prunelab[kubernetes]')")

DEPLOY = REPO / "deploy" / "kubernetes"
TEAM_SERVER = "http://mlflow.team.example:5000"  # the tracking server as the cluster's pods reach it


def example_config() -> dict:
    """deploy/kubernetes/backend-config.json, its template path taken from the repository root."""
    config = json.loads((DEPLOY / "backend-config.json").read_text())
    config["kube-job-template-path"] = str(REPO / config["kube-job-template-path"])
    return config


def render_job(entry_point: str, params: dict, run_id: str, experiment_id: str, digest: str = "sha256:" + "0" * 64):
    """What mlflow.projects._run does for backend="kubernetes", up to the Kubernetes API call,
    from the project prunelab submits: the project and its command, the config, the Job."""
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects import kubernetes as kb
    from mlflow.projects.utils import fetch_and_validate_project, get_entry_point_command, get_run_env_vars, load_project

    config = example_config()
    project = kubernetes.kubernetes_project(config)
    kube = _parse_kubernetes_config({k: v for k, v in config.items() if k != "image"})
    work_dir = fetch_and_validate_project(str(project), None, entry_point, params)
    spec = load_project(work_dir)
    command = get_entry_point_command(spec, entry_point, params, None)
    job = kb._get_kubernetes_job_definition(spec.name, spec.docker_env["image"], digest, kb._get_run_command(command),
                                            get_run_env_vars(run_id, experiment_id), kube["kube-job-template"])
    return config, job


def test_the_job_mlflow_would_submit(monkeypatch):
    """Image (the backend config's, pinned by digest), command, tracking URI and resources."""
    monkeypatch.setenv(kubernetes.KUBE_TRACKING_ENV, TEAM_SERVER)
    params = {"study": "taylor-cnn-fashionmnist", "overrides": "trials=2 train.epochs=1", "data_dir": "/data/fashion",
              "trial": "1", "model_uri": "0123abcd"}
    config, job = render_job("prune", params, run_id="0123abcd" * 4, experiment_id="7")
    template = yaml.safe_load((DEPLOY / "job-template.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert job["kind"] == "Job" and job["metadata"]["name"].startswith("prunelab-")
    assert job["metadata"]["namespace"] == template["metadata"]["namespace"]
    assert container["image"] == config["image"] + "@sha256:" + "0" * 64
    assert container["command"][:4] == ["python", "-m", "prunelab.job", "prune"]
    from prunelab.job import unquote

    assert unquote(container["command"][4:]) == ["--study", "taylor-cnn-fashionmnist", "--overrides",
                                                 "trials=2 train.epochs=1", "--data-dir", "/data/fashion",
                                                 "--trial", "1", "--model-uri", "0123abcd"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == TEAM_SERVER
    assert env["MLFLOW_RUN_ID"] == "0123abcd" * 4 and env["MLFLOW_EXPERIMENT_ID"] == "7"
    assert env["PRUNELAB_CACHE"] == "/data/cache"
    assert container["resources"] == template["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_cluster_project_matches_the_local_one():
    """The same entry points and parameters as MLproject; its image is this version of prunelab."""
    local = yaml.safe_load((REPO / "MLproject").read_text())
    cluster = yaml.safe_load((DEPLOY / "MLproject").read_text())
    assert {name: ep["parameters"] for name, ep in cluster["entry_points"].items()} == \
        {name: ep["parameters"] for name, ep in local["entry_points"].items()}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cluster["docker_env"]["image"] == f"prunelab:{version}"
    assert steps.shipped_project("kubernetes").joinpath("MLproject").read_text() == (DEPLOY / "MLproject").read_text()


def test_the_jobs_command_runs_a_step(tracking_uri, client, fashion_dir, tmp_path, monkeypatch):
    """The rendered container command, run here with the Job's environment (the image's
    `python` is this one), trains into the run MLflow made for the step."""
    study = "test-kubernetes-job-command"
    exp_id = client.create_experiment(study)
    run_id = client.create_run(exp_id).info.run_id
    monkeypatch.setenv(kubernetes.KUBE_TRACKING_ENV, tracking_uri)
    overrides = f"study={study} trials=1 data.n_train=600 data.n_test=200 train.epochs=1"
    _, job = render_job("train", {"study": "taylor-cnn-fashionmnist", "overrides": overrides, "trial": "0"},
                        run_id=run_id, experiment_id=exp_id)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {**clean_env(tracking_uri), **{e["name"]: e["value"] for e in container["env"]},
           "PRUNELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, *container["command"][1:]], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "train"
    assert run.data.params["train.epochs"] == "1" and "test_accuracy" in run.data.metrics


def test_without_docker_nothing_is_submitted(tracking_uri, client, tmp_path, monkeypatch, capsys):
    """MLflow pulls and pushes the step image with Docker: where none answers, `run --backend
    kubernetes` stops in one line before any run starts."""
    from prunelab import cli

    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker daemon answers here: this would submit for real")
    monkeypatch.setenv(kubernetes.KUBE_TRACKING_ENV, TEAM_SERVER)
    monkeypatch.chdir(REPO)  # the example's template path is relative to the repository root
    study = "test-kubernetes-no-docker"
    code = cli.main(["run", "--set", f"study={study}", "--backend", "kubernetes", "--out", str(tmp_path),
                     "--backend-config", str(DEPLOY / "backend-config.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("prunelab: error: --backend kubernetes") and ("Docker daemon does not answer" in err or
                                                                      "no docker on PATH" in err), err
    assert client.get_experiment_by_name(study) is None


def test_a_finished_step_is_reused_not_submitted(tracking_uri, client):
    """A step whose key a finished run carries is reused (moved under the new main run), as
    with the local backend: nothing is submitted, so no Docker or cluster is needed."""
    study = "test-kubernetes-reuse"
    exp_id = client.create_experiment(study)
    done = client.create_run(exp_id, tags={paths.TAG_STEP_KEY: "k" * 32}).info.run_id
    client.set_terminated(done, "FINISHED")
    parent = client.create_run(exp_id).info.run_id
    got = kubernetes.run_on_cluster(study, [("train", {"trial": "0"}, "k" * 32)], parent,
                                  kubernetes.kubernetes_project(example_config()), example_config())
    assert got == [done]
    assert client.get_run(done).data.tags["mlflow.parentRunId"] == parent


def test_a_step_that_cannot_be_submitted_ends_failed(tracking_uri, client, monkeypatch):
    """MLflow makes a step's run before it reaches Docker: when the submission fails there,
    the run ends FAILED (with why) and the failure is one line."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker daemon answers here: this would submit for real")
    monkeypatch.setenv(kubernetes.KUBE_TRACKING_ENV, TEAM_SERVER)
    study = "test-kubernetes-not-submitted"
    config = example_config()
    with pytest.raises(errors.PrunelabError, match="^step train could not be submitted to Kubernetes: "):
        with tracking_run.main_run(study, {"stage": "main"}) as main:
            kubernetes.run_on_cluster(study, [("train", {"overrides": "trials=1", "trial": "0"}, "x" * 32)],
                                    main.run_id, kubernetes.kubernetes_project(config), config)
    exp = client.get_experiment_by_name(study)
    runs = {r.data.tags.get("mlflow.project.entryPoint", "main"): r for r in client.search_runs([exp.experiment_id])}
    assert {name: r.info.status for name, r in runs.items()} == {"main": "FAILED", "train": "FAILED"}
    assert runs["train"].data.tags[paths.TAG_FAILED_BECAUSE].startswith("not submitted: ")


@pytest.mark.slow
def test_a_study_run_here_is_reused_on_the_cluster(tiny_study, client):
    """`--backend kubernetes` after the same study ran here: every step of every trial is
    reused (the step key does not depend on where a step ran), so nothing is submitted."""
    from conftest import TINY_STUDY_OVERRIDES
    from prunelab.pipeline import study

    by_stage = tiny_study["by_stage"]
    steps = [[by_stage[(stage, trial)] for stage in ("train", "prune", "finetune")] for trial in range(2)]
    parent = client.create_run(tiny_study["experiment_id"], tags={"stage": "main"}).info.run_id
    try:
        args = study.StudyArgs("taylor-cnn-fashionmnist", TINY_STUDY_OVERRIDES)
        chains = study.run_trials_on_cluster(args, args.config(), parent, example_config())
        assert chains == [[run.info.run_id for run in chain] for chain in steps]
        assert all(client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent for c in chains for run_id in c)
    finally:  # the session's study as the other tests read it: its steps under their own main run
        for run in (run for chain in steps for run in chain):
            client.set_tag(run.info.run_id, "mlflow.parentRunId", run.data.tags["mlflow.parentRunId"])
        client.delete_run(parent)
