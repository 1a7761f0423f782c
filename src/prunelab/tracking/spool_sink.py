"""The run handle's second sink (`tracking.run.Run`): the same calls as `run.MlflowSink`,
kept in a spool folder (`tracking.spool`) while the server is gone; how such a run
starts spooling and how it ends."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, NoReturn

from prunelab import paths
from prunelab.errors import TrackingError
from prunelab.tracking.connection import client, one_try, tracking_uri
from prunelab.tracking.spool import spool_dir
from prunelab.tracking.spool_writer import SpoolWriter


class SpoolSink:
    """What a run handle writes while the server is gone (`tracking.run.Run`): the same
    calls as `tracking.run.MlflowSink`, kept in a spool folder for `prunelab sync`."""

    def __init__(self, spool: SpoolWriter):
        self.spool = spool

    @classmethod
    def start(cls, *, experiment: str, run_id: str, run_name: str, stage: str, params: dict[str, str],
              tags: dict[str, str], reason: str) -> "SpoolSink":
        """A new spool folder for the run, holding every param and tag it was given so far;
        a one-line TrackingError when not even that can be written."""
        try:
            return cls(SpoolWriter.create(tracking_uri=tracking_uri(), experiment=experiment, run_id=run_id,
                                          run_name=run_name, stage=stage, params=params, tags=tags, reason=reason))
        except OSError as disk:
            raise TrackingError(
                f"the tracking server {tracking_uri()} stopped answering during {stage or 'the run'} "
                f"({reason[:120]}), and the run cannot be kept on disk either ({spool_dir()}: "
                f"{disk.strerror or type(disk).__name__}): only what the server got before is kept; free "
                "some space or point PRUNELAB_SPOOL at a writable folder with room, then run it again") from None

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


def left_on_disk(run_id: str, stage: str, status: str, spool: SpoolWriter | None,
                 unkept: TrackingError | None) -> NoReturn:
    """End a run the server lost while it ran: tell the server, if it is back, that the run
    failed and where its rest is (one quick try; `sync` completes it), take it off MLflow's
    stack either way, and raise the one-line error naming the folder (or `unkept`, when
    the run could not be kept on disk)."""
    import mlflow

    folder = spool.folder if spool is not None else None
    with one_try():
        c = client()
        with contextlib.suppress(Exception):
            if folder is not None:
                c.set_tag(run_id, paths.TAG_SPOOLED_TO, str(folder))
        active = mlflow.active_run()
        with contextlib.suppress(Exception):
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run("FAILED")
            else:
                c.set_terminated(run_id, "FAILED")
    if spool is None:
        raise unkept
    record = spool.record
    server = f"the tracking server {record['tracking_uri']} stopped answering during {stage or 'the run'} " \
             f"({record['reason'][:120]})"
    if record["full"]:
        raise TrackingError(
            f"{server}, then the disk filled up: {record['full'][:120]} could not be kept; the run ended {status} "
            f"and only {spool.kept()} are kept in {folder}: free some space, then upload them with "
            f"`prunelab sync {folder}` once the server is back")
    raise TrackingError(
        f"{server}; the run went on ({status}) and {spool.kept()} are kept in {folder}: "
        f"upload them with `prunelab sync {folder}` once the server is back")
