"""prunelab: pruning studies for convolutional networks, tracked in MLflow."""

__version__ = "0.1.0"
