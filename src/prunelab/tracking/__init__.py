"""MLflow at the edge: the only package that imports mlflow, one job a module.

- `connection`: which server, how long to wait for it, telling an outage from a refusal;
- `run`: the run handle (`Run`), writing to MLflow or, once the server is gone, to
  the on-disk spool (`spool`), and the runs a stage and a study open;
- `models`: logging a model (pt2, ONNX, checkpoint), loading one with nothing
  unpickled, the registry;
- `pixel_classifier`: the pyfunc flavour a logged model carries (copied into it; imports
  no prunelab): pixels outside [0, 1] refused, logits named by class;
- `serving`: `prunelab serve`, MLflow's scoring server for a checked model;
- `query`: reading runs, metrics and artifacts back;
- `lineage`: the data sets and models a run starts from;
- `sync`: uploading a spooled run;
- `projects`: MLflow Projects (an entry point's run, a `mlflow run` process, Kubernetes).

Nothing is imported here, so `prunelab.tracking.connection` costs no mlflow import.
"""
