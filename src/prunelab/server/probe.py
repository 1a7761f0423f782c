"""Whether an MLflow tracking server answers at a URI: the check a tracking client
makes before it talks to one, and the one `launch` makes while a server starts.

Client side only, and light (the standard library): it never starts anything,
and imports neither MLflow nor the modules that launch a server.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import urllib.error
import urllib.request

# A REST call only an MLflow tracking server answers in its own JSON: the
# experiment every server creates ({"experiment": ...}), or, where it was
# deleted, MLflow's error document ({"error_code": "RESOURCE_DOES_NOT_EXIST"}).
# Any web server answers /health with 200; this tells them apart.
_PROBE_PATH = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"


def client_credentials() -> dict[str, str]:
    """The Authorization header MLflow's client would send (its own environment variables)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return basic_credentials(user, password)
    return {}


def basic_credentials(user: str, password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic authentication as `user`."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _probe_once(uri: str, timeout: float, credentials: dict[str, str] | None) -> str | None:
    try:
        headers = client_credentials() if credentials is None else credentials  # {}: none at all
        request = urllib.request.Request(uri.rstrip("/") + _PROBE_PATH, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 16)
    except (OSError, ValueError) as exc:  # refused, timed out, or not a URL
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return f"nothing answers there ({type(reason).__name__})"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("experiment" in doc or doc.get("error_code") == "RESOURCE_DOES_NOT_EXIST"):
        return None
    return f"a web server answers there (HTTP {status}), but not as an MLflow tracking server"


def probe(uri: str, timeout: float = 5.0, credentials: dict[str, str] | None = None) -> str | None:
    """None when an MLflow tracking server answers at `uri`; otherwise what answers
    instead. Returns within `timeout` seconds whatever the other end does (a
    server that accepts and never answers, or answers a byte at a time).
    `credentials`: the Authorization header (default: what MLflow's client would send; {}: none)."""
    outcome: list[str | None] = []
    # The socket's own timeout applies to each step (connect, every read); the join bounds the whole.
    worker = threading.Thread(target=lambda: outcome.append(_probe_once(uri, timeout, credentials)), daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def healthy(uri: str, timeout: float = 2.0, credentials: dict[str, str] | None = None) -> bool:
    """Whether an MLflow tracking server answers at `uri` within `timeout` seconds."""
    return probe(uri, timeout, credentials) is None


OPEN, SIGNED_IN = "open", "signed-in"


def access(uri: str, timeout: float = 2.0) -> str | None:
    """How an MLflow server at `uri` treats a request that carries no credentials: OPEN (it
    answers it), SIGNED_IN (it refuses it with HTTP 401, as MLflow's basic authentication
    does), or None when no MLflow server answers there."""
    said = probe(uri, timeout, credentials={})
    if said is None:
        return OPEN
    return SIGNED_IN if "(HTTP 401)" in said else None


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a server, or
    a URI where certainly none answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
