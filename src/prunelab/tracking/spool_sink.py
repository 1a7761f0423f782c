"""The run handle's second sink (`tracking.run.Run`): the same calls as `run.MlflowSink`,
kept in a spool folder (`tracking.spool`) while the server is gone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunelab.tracking.spool import Spool


class SpoolSink:
    """What a run handle writes while the server is gone (`tracking.run.Run`): the same
    calls as `tracking.run.MlflowSink`, kept in a spool folder for `prunelab sync`."""

    def __init__(self, spool: Spool):
        self.spool = spool

    def log_params(self, params: dict[str, str]) -> None:
        self.spool.set_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.spool.set_tags(tags)

    def log_metrics(self, metrics: list[tuple]) -> None:
        self.spool.add_metrics([m[:4] for m in metrics])  # (key, value, time, step): no model to link yet

    def log_text(self, text: str, artifact_file: str) -> None:
        self.spool.add_text(text, artifact_file)

    def log_dict(self, value: dict | list, artifact_file: str) -> None:
        self.spool.add_text(json.dumps(value, indent=2), artifact_file)

    def log_figure(self, figure, artifact_file: str, dpi: int) -> None:
        self.spool.add_figure(figure, artifact_file)

    def log_table(self, table, artifact_file: str) -> None:
        self.spool.add_text(table.to_json(orient="split"), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None) -> None:
        self.spool.add_file(path, artifact_path)

    def log_inputs(self, splits, model_refs) -> None:
        """Offline, lineage is not kept: `sync` uploads results, not inputs."""

    def log_model(self, model, name: str, example, step: int, final: bool, checkpoint, metadata, carry,
                  weights_only: bool = False) -> str:
        """The bare network as a checkpoint with its example input; returns the folder holding them."""
        bare = checkpoint if checkpoint is not None else getattr(model, "network", model)
        return str(self.spool.add_model(bare, name, example, final, step))

    def log_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int, files: list[Path] | None, splits) -> str:
        self.spool.add_child(run_name, tags, params, metrics, step, files)
        return ""  # no run id until sync uploads it

    def end(self, status: str) -> None:
        self.spool.close(status)
