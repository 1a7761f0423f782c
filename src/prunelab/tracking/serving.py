"""`prunelab serve`: MLflow's scoring server for a logged model, started as
`mlflow models serve -m URI --env-manager local` is, but so that it runs from a fresh
clone: the environment's script folder (a venv's `bin`, where MLflow's `uvicorn` is)
comes first on PATH, whether or not the venv is activated. The model is checked first,
in one line each: the server answers, the URI names a pt2 model, and the only code
it carries is prunelab's own pyfunc loader (`pixel_classifier.py`), which serving
imports. Nothing is unpickled (MLflow's guard is on in the server too).
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path

from prunelab.errors import ModelError, PrunelabError
from prunelab.tracking import connection, loading, models, pixel_classifier
from prunelab.tracking.query import is_run_id

DEFAULT_PORT = 5001  # `make server`'s tracking server has 5000, MLflow's default for both


def command(model_uri: str, port: int, host: str) -> list[str]:
    """The documented command, run by this interpreter (the one that has mlflow)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port)]


def environment(tracking_uri: str) -> dict[str, str]:
    """This environment's scripts first on PATH (uvicorn), this server, pickle refused."""
    env = dict(os.environ)
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join([scripts, env["PATH"]] if env.get("PATH") else [scripts])
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    return env


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PrunelabError(f"cannot serve on {host}:{port} ({exc.strerror or exc}): pass another --port") from None


def model_to_serve(ref: str) -> str:
    """The model URI to serve for `ref` (a run id: its final model), checked as above."""
    if is_run_id(ref):
        model_id = models.logged_model_id(ref)
        if model_id is None:
            raise ModelError(f"run {ref} logged no final model to serve")
        ref = f"models:/{model_id}"
    meta = loading.check_pt2(ref)
    pyfunc = meta.flavors.get("python_function")
    if not isinstance(pyfunc, dict):
        raise ModelError(f"{ref} has no python_function flavour: MLflow cannot serve it")
    code = pyfunc.get("code")
    if code:
        _check_code(ref, str(code), str(pyfunc.get("loader_module", "")))
    return ref


def _check_code(ref: str, code: str, loader: str) -> None:
    """The model's pyfunc code folder must hold prunelab's loader, byte for byte, and nothing else."""
    import mlflow.artifacts

    ours = Path(pixel_classifier.__file__)
    trust = (f"serve it with `mlflow models serve -m {ref} --env-manager local` only if you trust the code "
             "it carries")
    if loader != ours.stem or "/" in code or ".." in code:
        raise ModelError(f"{ref} carries code ({code}/, loader {loader}) that is not prunelab's: {trust}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{loading.artifact_base(ref)}/{code}", dst_path=tmp))
        except Exception as exc:
            if connection.is_mlflow_error(exc) or isinstance(exc, OSError):
                raise connection.outage(exc) or ModelError(f"cannot read {ref}'s {code}/: {str(exc).splitlines()[0][:160]}") from None
            raise
        found = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
        if found != [ours.name] or (got / ours.name).read_bytes() != ours.read_bytes():
            raise ModelError(f"{ref} carries code ({code}/: {', '.join(found) or 'nothing'}) that is not this "
                             f"prunelab's {ours.name}: {trust}")


def serve(ref: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1", tracking_uri: str | None = None) -> None:
    """Check, then become `mlflow models serve` (this process is replaced: Ctrl-C and kill reach
    MLflow's server directly). Returns only by raising a one-line PrunelabError."""
    check_port(host, port)
    on_server = is_run_id(ref) or ref.startswith(("models:/", "runs:/"))
    uri = connection.connect(tracking_uri) if on_server else (tracking_uri or connection.tracking_uri())
    model_uri = model_to_serve(ref)
    argv = command(model_uri, port, host)
    print(f"prunelab: serving {model_uri} at http://{host}:{port}/invocations (POST JSON {{\"inputs\": "
          "float32 pixels in [0, 1], N x C x H x W}); Ctrl-C stops it", flush=True)
    sys.stderr.flush()
    os.execve(argv[0], argv, environment(uri))
