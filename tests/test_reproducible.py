"""The README's table is what the committed code gives on the machine it was made on:
two runs of one study, from scratch in two experiments, log the same numbers digit for
digit (on one machine: bf16 kernels, and the thread count, differ between CPUs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, TINY_STUDY, TINY_STUDY_OVERRIDES, clean_env

pytestmark = pytest.mark.slow


def test_a_study_run_twice_logs_the_same_numbers(tiny_study, tracking_uri, client, tmp_path):
    again = "test-reproducible-again"
    overrides = TINY_STUDY_OVERRIDES.replace(f"study={TINY_STUDY}", f"study={again}")
    assert overrides != TINY_STUDY_OVERRIDES
    proc = subprocess.run([sys.executable, "-m", "prunelab", "run", "--overrides", overrides, "--out", str(tmp_path)],
                          capture_output=True, text=True, env=clean_env(tracking_uri), timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" not in proc.stdout  # nothing of the first study stood in for a step
    exp = client.get_experiment_by_name(again)
    second = {(r.data.tags["stage"], r.data.tags.get("trial")): r for r in client.search_runs([exp.experiment_id])}
    first = {(r.data.tags["stage"], r.data.tags.get("trial")): r for r in tiny_study["runs"]}
    steps = {k for k in first if k[0] in ("train", "prune", "finetune")}
    assert len(steps) == 6 and steps <= set(second)
    timings = ("seconds", "latency_ms")  # wall-clock figures, the only numbers allowed to differ
    for key in sorted(steps):
        a, b = first[key].data.metrics, second[key].data.metrics
        numbers = {m for m in a if not m.endswith(timings) and not m.startswith("system/")}
        assert numbers and numbers <= set(b), key
        assert {m: a[m] for m in numbers} == {m: b[m] for m in numbers}, key  # exact: digit for digit
    table = (tiny_study["out"] / "report_table.md").read_text()
    assert (tmp_path / "report_table.md").read_text() == table
