"""Serving, over real HTTP: `prunelab serve models:/<study>@champion` started as a user
starts it from a fresh shell (the venv not activated: its `bin` is not on PATH), then
real FashionMNIST test images, read through prunelab's loader, POSTed as JSON. The
served model answers as the logged one does, names its logits by class, and refuses
0-255 pixels and a wrong shape with a 400 that says what to send."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from prunelab import config, data, paths
from prunelab.server import probe

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/bin:/bin"  # a fresh shell's: no venv on it, so no uvicorn


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the server did not answer within {seconds} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def served(tiny_study, tracking_uri, tmp_path_factory):
    """`prunelab serve models:/<study>@champion --port P` from a shell without the venv on PATH."""
    from conftest import clean_env

    port = probe.free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**clean_env(tracking_uri), "PATH": SYSTEM_PATH}
    uri = f"models:/{tiny_study['study']}@{paths.CHAMPION}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prunelab", "serve", uri, "--port", str(port)], env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc, log)
        yield {"url": url, "uri": uri, "log": log, "proc": proc}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def images():
    """The study's 200 test images through prunelab's data loader: float32 pixels in [0, 1], and labels."""
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=200))
    return d.pixels(d.test_x).numpy(), d.test_y.numpy(), list(d.classes)


@pytest.mark.slow
def test_the_served_model_answers_as_the_logged_one(served, images, client, tiny_study):
    """Its logits, one field per class name, are the logged model's (mlflow.pytorch), and it
    scores the accuracy registered with the champion."""
    import mlflow.pytorch
    import torch

    pixels, labels, classes = images
    status, answer = post(f"{served['url']}/invocations", {"inputs": pixels.tolist()})
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == len(labels) and all(list(row) == classes for row in rows)
    served_logits = np.array([[row[c] for c in classes] for row in rows], dtype=np.float32)
    module = mlflow.pytorch.load_model(served["uri"], map_location="cpu")
    with torch.no_grad():
        expected = module(torch.from_numpy(pixels)).numpy()
    assert np.abs(served_logits - expected).max() < 1e-5
    champion = client.get_model_version_by_alias(tiny_study["study"], paths.CHAMPION)
    accuracy = float((served_logits.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(float(champion.tags["test_accuracy"]), abs=0.002)
    names = [max(row, key=row.get) for row in rows]  # the label, as the docs say to read it
    assert names == [classes[i] for i in expected.argmax(1)]
    assert "serving models:/" in served["log"].read_text()


@pytest.mark.slow
def test_pixels_outside_0_1_are_a_400_that_says_so(served, images):
    pixels, _, _ = images
    for wrong in ((pixels[:4] * 255).round(), pixels[:2] - 0.5):  # the raw 0-255 values; shifted ones
        status, answer = post(f"{served['url']}/invocations", {"inputs": wrong.tolist()})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "pixels must be float32 in [0, 1] (an image's 0-255 values divided by 255)" in answer["message"]
        assert f"this input holds values from {wrong.min():g} to {wrong.max():g}" in answer["message"]


@pytest.mark.slow
def test_a_wrong_shape_is_a_400_that_names_the_shape(served, images):
    pixels, _, _ = images
    for wrong in (pixels[:3, 0], pixels[:3, :, :27]):  # no channel axis; 27 columns
        status, answer = post(f"{served['url']}/invocations", {"inputs": wrong.tolist()})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert f"Shape of input {wrong.shape} does not match expected shape (-1, 1, 28, 28)" in answer["message"]


@pytest.mark.slow
def test_float64_pixels(served, images):
    """Over HTTP, JSON numbers are read as the signature's float32: x / 255. computed in float64
    is served. In Python, pyfunc's signature check refuses a float64 array, naming float32."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=8))
    float64 = d.test_x.numpy() / 255.0  # as a person computes it from the raw uint8 images
    assert float64.dtype == np.float64
    status, answer = post(f"{served['url']}/invocations", {"inputs": float64.tolist()})
    assert status == 200 and len(answer["predictions"]) == 8
    model = mlflow.pyfunc.load_model(served["uri"])
    with pytest.raises(MlflowException, match="dtype of input float64 does not match expected dtype float32"):
        model.predict(float64)
    assert model.predict(float64.astype(np.float32)).shape == (8, 10)


@pytest.mark.slow
def test_serve_refuses_a_model_whose_code_is_not_prunelabs(tiny_study, tracking_uri, tmp_path):
    """The pyfunc code a model carries is what serving imports: only prunelab's own loader,
    byte for byte, is served; the check comes before any server starts."""
    import mlflow.artifacts

    from conftest import clean_env

    uri = tiny_study["by_stage"][("finetune", 0)].data.tags[paths.TAG_MODEL_URI]
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model")))
    loader = folder / "code" / "pixel_classifier.py"
    assert loader.is_file() and "import prunelab" not in loader.read_text()
    loader.write_text(loader.read_text() + "\nopen('ran', 'w')\n")
    proc = subprocess.run([sys.executable, "-m", "prunelab", "serve", str(folder), "--port", str(probe.free_port())],
                          env={**clean_env(tracking_uri), "PATH": SYSTEM_PATH}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("prunelab: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "carries code (code/: pixel_classifier.py) that is not this prunelab's pixel_classifier.py" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_a_logged_model_pins_only_what_it_imports_and_checks_its_pixels(tracking_uri, tmp_path):
    """A model logged with class names and a pixel range: its requirements are mlflow and torch
    (no torchvision: the traced network imports none of it); pyfunc names the logits by class
    and refuses pixels outside the range; the pytorch flavour gives the same numbers, carries
    no code, and its module is traced in eval mode (torch refuses .eval() on it)."""
    import mlflow.artifacts
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    from prunelab.tracking import run as tracking_run

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    example = torch.rand(2, 1, 28, 28)
    metadata = {"classes": ["T-shirt/top", "Trouser", "Bag"], "pixel_range": [0.0, 1.0]}
    with tracking_run.start_run("test-serving-pins", "train", {"study": "test-serving-pins"}, "pins") as run:
        uri = run.log_model(module, "model", example, step=0, metadata=metadata)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    requirements = [line.split("==")[0] for line in (folder / "requirements.txt").read_text().split()]
    assert requirements == ["mlflow", "torch"]
    assert sorted(p.name for p in (folder / "code").iterdir()) == ["pixel_classifier.py"]
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = module(x).numpy()
    predicted = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    assert list(predicted.columns) == metadata["classes"]
    assert np.abs(predicted.to_numpy() - expected).max() < 1e-6
    for wrong, found in ((x.numpy() * 255, "values from"), (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN")):
        with pytest.raises(MlflowException, match=r"pixels must be float32 in \[0, 1\]") as refused:
            mlflow.pyfunc.load_model(uri).predict(wrong)
        assert found in str(refused.value) and refused.value.get_http_status_code() == 400
    traced = mlflow.pytorch.load_model(uri, map_location="cpu")
    with torch.no_grad():
        assert np.abs(traced(x).numpy() - expected).max() < 1e-6
    with pytest.raises(NotImplementedError):
        traced.eval()  # as docs/tracking.md says: it is already in eval mode, use it as it is
