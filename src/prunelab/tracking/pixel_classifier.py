"""The pyfunc flavour of a logged image classifier: what `mlflow.pyfunc.load_model` and
`mlflow models serve` run. It travels inside each pt2 model as `code/pixel_classifier.py`
(the pyfunc flavour's `loader_module`, `code: code`), so it imports nothing of prunelab:
mlflow, numpy, pandas and torch only.

Before the network runs, MLflow's signature enforcement has refused an input of the
wrong shape or dtype (float32, N x C x H x W). This wrapper then refuses pixels outside
the model's range (its flavour config's `pixel_range`, [0, 1]: an image of 0-255 values
divided by 255) or not finite, with an MlflowException of INVALID_PARAMETER_VALUE, which
the scoring server answers with HTTP 400. The network's logits come back as a DataFrame
with one float32 column per class name (config `classes`), in the network's order; a
model without class names returns the bare (N, classes) array.

The pt2 archive is checked to hold no pickle before it is loaded, whatever
MLFLOW_ALLOW_PICKLE_DESERIALIZATION says.

`prunelab serve` serves a model only when its copy of this file is this file, byte for
byte (`tracking.serving`): any change here leaves the models logged before it to
`mlflow models serve` (docs/tracking.md, Serving).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

PIXEL_RANGE = "pixel_range"  # flavour config: [low, high] of the pixels the model takes
CLASSES = "classes"  # flavour config: the class names, in the order of the network's outputs


@contextlib.contextmanager
def _no_pickle():
    """MLflow's own guard on for the load: a pt2 archive must hold raw tensors, no pickle."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _load_pyfunc(path, model_config=None):
    """MLflow's loader-module entry point: `path` is the model's `data` folder (model.pt2)."""
    import mlflow.pytorch

    config = dict(model_config or {})
    with _no_pickle():
        network = mlflow.pytorch._load_pyfunc(path, model_config={"device": config.get("device")})
    return PixelClassifier(network, config.get(CLASSES), config.get(PIXEL_RANGE))


class PixelClassifier:
    """MLflow's PyTorch pyfunc wrapper behind the input check and the class names."""

    def __init__(self, network, classes=None, pixel_range=None):
        self._network = network
        self.classes = [str(c) for c in classes] if classes else None
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1])) if pixel_range else None

    def get_raw_model(self):
        """The traced torch module (fixed in eval mode: torch refuses .eval() and .train() on it)."""
        return self._network.get_raw_model()

    def predict(self, data, params=None):
        x = data.to_numpy() if hasattr(data, "to_numpy") else np.asarray(data)
        self.check(x)
        # The signature already made it float32, unless it was bypassed: the graph takes float32 only.
        out = self._network.predict(x if x.dtype == np.float32 else x.astype(np.float32), params)
        if self.classes is None:
            return out
        import pandas as pd

        if out.ndim != 2 or out.shape[1] != len(self.classes):
            return out
        return pd.DataFrame(out, columns=self.classes)

    def check(self, x: np.ndarray) -> None:
        """Refuse pixels outside the model's range, in one message that says what to send."""
        if self.pixel_range is None or x.size == 0:
            return
        low, high = self.pixel_range
        finite = bool(np.isfinite(x).all())
        if finite:
            least, most = float(x.min()), float(x.max())
            if low <= least and most <= high:
                return
        from mlflow.exceptions import MlflowException

        found = "values that are NaN or infinite" if not finite else f"values from {least:g} to {most:g}"
        raise MlflowException.invalid_parameter_value(
            f"pixels must be float32 in [{low:g}, {high:g}] (an image's 0-255 values divided by 255), shape "
            f"N x C x H x W; this input holds {found}")
