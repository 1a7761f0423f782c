"""ONNX: every final model is exported with a dynamic batch, and onnxruntime's outputs
match PyTorch's within 1e-4, on the model logged by a real study and on a fresh export."""

from __future__ import annotations

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import pytest
import torch

from prunelab import config, data, export, paths
from prunelab.models.pixels import PixelInput
from prunelab.models.simple_cnn import SimpleCNN


@pytest.mark.slow
def test_logged_onnx_matches_the_logged_pytorch_model(tiny_study, client, tmp_path):
    run = tiny_study["by_stage"][("finetune", 0)]
    uri = run.data.tags[paths.TAG_MODEL_URI]
    location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
    onnx_file = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{paths.ONNX_DIR}/{export.ONNX_FILE}",
                                                    dst_path=str(tmp_path))
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=200))
    pixels = d.pixels(d.test_x)
    module = mlflow.pytorch.load_model(uri, map_location="cpu")
    with torch.no_grad():
        expected = module(pixels).numpy()
    session = export.session(onnx_file)
    for batch in (1, 7, 200):  # any batch size
        np.testing.assert_allclose(export.run(session, pixels[:batch]), expected[:batch], atol=1e-4, rtol=0)


def test_export_of_a_pruned_network_with_its_normalisation(fashion_dir, tmp_path):
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=64))
    torch.manual_seed(0)
    network = SimpleCNN(channels=[5, 9]).eval()
    model = PixelInput(network, d.mean, d.std)
    path = export.to_onnx(model, d.pixels(d.test_x[:2]), tmp_path / export.ONNX_FILE)
    assert [p.name for p in tmp_path.iterdir()] == [export.ONNX_FILE]  # one file, nothing half-written beside it
    with torch.no_grad():
        expected = network(d.normalise(d.test_x)).numpy()  # the bare network on normalised images
    np.testing.assert_allclose(export.run(export.session(path), d.pixels(d.test_x)), expected, atol=1e-4, rtol=0)


def test_an_operator_the_fast_exporter_lacks_still_exports(tmp_path):
    """Adaptive pooling up to a size that is no factor of the input (VGG16's head on small
    images) goes through the dynamo exporter; the batch stays dynamic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d((7, 7)),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 49, 2)).eval()
    path = export.to_onnx(model, torch.rand(2, 3, 2, 2), tmp_path / export.ONNX_FILE)
    session = export.session(path)
    for batch in (1, 5):
        x = torch.rand(batch, 3, 2, 2)
        with torch.no_grad():
            np.testing.assert_allclose(export.run(session, x), model(x).numpy(), atol=1e-4, rtol=0)
