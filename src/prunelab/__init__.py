"""prunelab: pruning studies for convolutional networks, tracked in MLflow.

The Python API (docs/api.md), imported on first use so that `import prunelab`
stays cheap (no torch, no mlflow until a name below is asked for):

- `prunelab.prune(model, data, method, target, ...)`: train, prune, fine-tune, each step an
  MLflow run as the command line makes it; returns a `Pruned`;
- `prunelab.load(uri)`: a logged or registered model as an `nn.Module`, nothing unpickled.
"""

__version__ = "0.1.0"
__all__ = ["Pruned", "load", "prune"]


def __getattr__(name: str):
    if name in __all__:
        from prunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'prunelab' has no attribute {name!r}")
