"""`main`'s chain: a whole study as MLflow Projects entry points, each its own run.

- `study`: the trials' chains of steps (here, in worker processes, or on a
  cluster), the registry of each trial's deliverable model, then the report;
- `steps`: one step as a run, reused when a finished run has its step key;
- `abandoned`: RUNNING runs whose process is gone, marked FAILED before reuse;
- `kubernetes`: the steps as Kubernetes Jobs through MLflow Projects.

It decides what runs and when; every MLflow call goes through `prunelab.tracking`.
"""
