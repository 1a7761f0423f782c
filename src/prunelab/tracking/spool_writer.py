"""Writing a spool folder (`tracking.spool` describes the format): what a stage keeps on
disk while the tracking server is gone. Every write goes through `_keeping`, so the first
one that does not fit on the disk stops the spool with the record saying what was lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from prunelab import checkpoints, paths
from prunelab.errors import ConfigError
from prunelab.files import atomic_path, is_plain_name
from prunelab.tracking.spool import (ARTIFACTS, CHILDREN, EXAMPLE, FORMAT, METRICS, MODELS, NO_SPACE, RESERVE,
                                     RESERVE_BYTES, Spool, SpoolFull, now_ms, spool_dir)


class SpoolWriter(Spool):
    """A spool folder as a stage writes it, one call per thing the server would have got."""

    @classmethod
    def create(cls, *, tracking_uri: str, experiment: str, run_id: str, run_name: str, stage: str,
               params: dict[str, str], tags: dict[str, str], reason: str) -> "SpoolWriter":
        """A new spool folder with its record, and the reserve that lets the record have the
        last word on a full disk; an OSError when the folder cannot be written at all."""
        folder = spool_dir() / (experiment or "default") / f"{stage or 'run'}-{run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id,
                  "run_name": run_name, "stage": stage, "status": "RUNNING", "reason": reason,
                  "spooled_at": now_ms(), "end_time": None, "params": dict(params), "tags": dict(tags),
                  "models": [], "children": [], "synced": [], "synced_to": None, "full": None}
        spool = cls(folder, record)
        try:
            with open(folder / RESERVE, "wb") as f:
                f.write(os.urandom(RESERVE_BYTES))  # not zeros: a compressing file system would store none
            spool._write_record()
        except OSError:
            (folder / RESERVE).unlink(missing_ok=True)
            raise
        return spool

    @contextlib.contextmanager
    def _keeping(self, what: str) -> Iterator[None]:
        """A write of `what`; once one did not fit on the disk, nothing more is written."""
        if self.record["full"]:
            raise SpoolFull(f"the disk holding {self.folder} is full: {self.record['full']} could not be kept")
        try:
            yield
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._no_space(what, exc)

    def set_params(self, params: dict[str, str]) -> None:
        with self._keeping("params"):
            self.record["params"].update(params)
            self.save()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._keeping("tags"):
            self.record["tags"].update(tags)
            self.save()

    def add_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp ms, step) of metrics the server never got."""
        data = "".join(json.dumps({"key": key, "value": value, "timestamp": timestamp, "step": step}) + "\n"
                       for key, value, timestamp, step in metrics).encode()
        with self._keeping(f"{len(metrics)} metrics"):
            fd = os.open(self.folder / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)  # no half line left behind
                    raise
            finally:
                os.close(fd)
        self.metrics_kept += len(metrics)

    def _artifact(self, artifact_file: str) -> Path:
        target = (self.folder / ARTIFACTS / artifact_file).resolve()
        if not target.is_relative_to((self.folder / ARTIFACTS).resolve()):
            raise ConfigError(f"artifact path {artifact_file!r} leaves the run's artifact folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_text(self, text: str, artifact_file: str) -> None:
        with self._keeping(f"the artifact {artifact_file}"), atomic_path(self._artifact(artifact_file)) as tmp:
            tmp.write_text(text)

    def add_figure(self, figure, artifact_file: str) -> None:
        with self._keeping(f"the artifact {artifact_file}"), atomic_path(self._artifact(artifact_file)) as tmp:
            figure.savefig(tmp, format=Path(artifact_file).suffix.lstrip(".") or "png")

    def add_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        name = Path(path).name
        artifact_file = f"{artifact_path}/{name}" if artifact_path else name
        with self._keeping(f"the artifact {artifact_file}"), atomic_path(self._artifact(artifact_file)) as tmp:
            shutil.copyfile(path, tmp)

    def add_model(self, model, name: str, example: torch.Tensor, final: bool, step: int = 0) -> Path:
        """The model as a weights-only checkpoint and its example input; sync logs the MLflow model
        from them. A model whose files do not both fit is not kept (neither file stays)."""
        if not is_plain_name(name):
            raise ConfigError(f"model name {name!r} is not a plain name")
        folder = self.folder / MODELS / name
        with self._keeping(f"the model {name}"):
            try:
                checkpoints.save(model, folder / paths.CHECKPOINT)
                with atomic_path(folder / EXAMPLE) as tmp, open(tmp, "wb") as f:
                    torch.save(example.detach().cpu().clone(), f)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self.record["models"] = [m for m in self.record["models"] if m["name"] != name] + [
                {"name": name, "final": final, "step": step}]
            self.save()
        return folder

    def add_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int, files: list[Path] | None) -> None:
        index = len(self.record["children"])
        folder = self.folder / CHILDREN / str(index)
        names = []
        with self._keeping(f"the child run {run_name}"):
            for f in files or []:
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(folder / Path(f).name) as tmp:
                    shutil.copyfile(f, tmp)
                names.append(Path(f).name)
            self.record["children"].append({"run_name": run_name, "tags": {k: str(v) for k, v in tags.items()},
                                            "params": {k: str(v) for k, v in params.items()},
                                            "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                                            "time": now_ms(), "files": names})
            self.save()

    def close(self, status: str) -> None:
        """Record how the run ended: always written, on a full disk too (into the reserve's room)."""
        self.record["status"] = status
        self.record["end_time"] = now_ms()
        self.save()
        (self.folder / RESERVE).unlink(missing_ok=True)  # nothing more to keep
