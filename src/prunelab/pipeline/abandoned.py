"""Runs left RUNNING by a process that is gone (killed, its machine restarted): `main`
marks them FAILED before it reuses anything, so a study never waits on a dead run."""

from __future__ import annotations

from prunelab import paths
from prunelab.tracking.query import find_runs
from prunelab.tracking.owner import is_alive
from prunelab.tracking.run import PARENT_RUN_ID, fail


def fail_abandoned(experiment: str) -> list[str]:
    """Mark FAILED (with a tag saying why) every RUNNING run of the experiment whose process
    on this host is gone, and every RUNNING run under such a run; returns their ids. Runs of
    live processes and of other hosts are left alone."""
    running = find_runs(experiment, "attributes.status = 'RUNNING'", finished_only=False)
    dead = {r.info.run_id: f"abandoned: its process {r.data.tags[paths.TAG_PID]} on {r.data.tags[paths.TAG_HOST]} is gone"
            for r in running if is_alive(r.data.tags) is False}
    changed = True
    while changed:  # children of abandoned runs, however deep
        changed = False
        for r in running:
            parent = r.data.tags.get(PARENT_RUN_ID)
            if r.info.run_id not in dead and parent in dead and is_alive(r.data.tags) is not True:
                dead[r.info.run_id] = f"abandoned: its parent run {parent} was abandoned"
                changed = True
    for run_id, why in dead.items():
        fail(run_id, why)
    return list(dead)
