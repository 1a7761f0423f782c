"""Load a logged model as a colleague without prunelab would: a fresh interpreter in
which `import prunelab` fails, reading the model by its URI from the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = r'''
import json, sys

class NoPrunelab:
    """Every import of prunelab fails, wherever it is installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "prunelab" or name.startswith("prunelab."):
            raise ImportError(f"{name} is not available here")
        return None

sys.meta_path.insert(0, NoPrunelab())
try:
    import prunelab  # noqa: F401
    sys.exit("prunelab could be imported")
except ImportError:
    pass

import numpy as np
import mlflow.pyfunc
import mlflow.pytorch
import torch

uri, pixels_file, labels_file = sys.argv[1:]
x, y = np.load(pixels_file), np.load(labels_file)
predicted = mlflow.pyfunc.load_model(uri).predict(x)  # logits, a column per class name
pyfunc_out = predicted.to_numpy() if hasattr(predicted, "to_numpy") else predicted
module = mlflow.pytorch.load_model(uri, map_location="cpu")
with torch.no_grad():
    torch_out = module(torch.from_numpy(x)).numpy()
print(json.dumps({
    "pyfunc_accuracy": float((pyfunc_out.argmax(1) == y).mean()),
    "torch_accuracy": float((torch_out.argmax(1) == y).mean()),
    "max_abs_diff": float(np.abs(pyfunc_out - torch_out).max()),
    "shape": list(pyfunc_out.shape),
    "columns": [str(c) for c in getattr(predicted, "columns", [])],
    "prunelab_modules": sorted(m for m in sys.modules if m.split(".")[0] == "prunelab"),
}))
'''


def load_and_score(uri: str, pixels: np.ndarray, labels: np.ndarray, env: dict, tmp: Path) -> dict:
    """Accuracy of the model at `uri` on float32 pixels in [0, 1] (N, C, H, W), through
    `mlflow.pyfunc` and `mlflow.pytorch`, in a process where prunelab cannot be imported;
    `columns`: the class names pyfunc's DataFrame names its logits by."""
    np.save(tmp / "pixels.npy", pixels.astype(np.float32))
    np.save(tmp / "labels.npy", labels)
    (tmp / "score.py").write_text(SCRIPT)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(tmp / "score.py"), uri, str(tmp / "pixels.npy"), str(tmp / "labels.npy")],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
