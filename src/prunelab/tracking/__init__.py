"""MLflow at the edge: the only package that imports mlflow, one job a module.

- `connection`: which server, how long to wait for it, telling an outage from a refusal;
- `run`: the run handle (`Run`), writing to MLflow or, once the server is gone, to
  the on-disk spool (`spool`), and the runs a stage and a study open;
- `models`: logging a model (pt2, ONNX, checkpoint), loading one with nothing
  unpickled, the registry;
- `query`: reading runs, metrics and artifacts back;
- `lineage`: the data sets and models a run starts from;
- `sync`: uploading a spooled run;
- `projects`: MLflow Projects (an entry point's run, a `mlflow run` process, Kubernetes).

Nothing is imported here, so `prunelab.tracking.connection` costs no mlflow import.
"""
