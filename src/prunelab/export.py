"""ONNX: a network exported to one .onnx file with a dynamic batch, and run with
onnxruntime. Never imports mlflow (tracking logs the file with the model).

The TorchScript-based exporter (`dynamo=False`) is tried first: it exports
these networks in a fraction of a second, where the dynamo exporter takes
seconds per model. Where it cannot express an operator (VGG16's adaptive
pooling of a small image up to 7 x 7), the dynamo exporter (onnxscript) takes
over. Both give PyTorch's outputs within 1e-6 here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunelab.files import atomic_path
from prunelab.train import eval_mode

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
OPSET = 17


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` (in eval mode) for inputs shaped like `example`, any batch size."""
    path = Path(path)
    with eval_mode(model), warnings.catch_warnings(), _quiet_stdout(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")  # the exporters' deprecation notices and tracer warnings
        try:
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        except torch.onnx.OnnxExporterError:
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                              verbose=False)
    return path


@contextlib.contextmanager
def _quiet_stdout():
    """Standard output silenced at the file descriptor: the exporters print their progress,
    and the TorchScript one dumps its whole graph (from C++) when it gives up."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session on the file (single-threaded by default, as latency is measured)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(onnx_session, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The outputs of an onnxruntime session for a float32 batch."""
    array = x.numpy() if isinstance(x, torch.Tensor) else x
    return onnx_session.run(None, {INPUT_NAME: np.ascontiguousarray(array, dtype=np.float32)})[0]
