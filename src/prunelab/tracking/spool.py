"""A run kept on local disk while the tracking server is gone, until `prunelab sync` uploads it.

When the server stops answering in the middle of a stage, the stage goes on
and everything it would have sent lands here instead: the params and tags it
was given, the metrics not yet sent, its text and file artifacts, its models
(as weights-only checkpoints with an example input, from which sync logs the
MLflow model) and its child runs. Knows nothing of MLflow: `SpoolSink` is the
run handle's second sink (`tracking.run.Run`), beside MLflow's, and
`tracking.sync` reads a spool back.

    <spool dir>/<experiment>/<stage>-<run id>/
        run.json          what the run is: ids, name, status, params, tags, models, children, what sync has done
        metrics.jsonl     metrics not yet sent, one JSON object a line
        artifacts/        files and texts, under their artifact paths
        models/<name>/    checkpoint.pt (weights only) and example.pt of each model
        children/<i>/     files of the i-th child run
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from prunelab import checkpoints, paths
from prunelab.data.base import cache_dir
from prunelab.errors import ConfigError
from prunelab.files import atomic_path

FORMAT = "prunelab-spool-v1"
RECORD = "run.json"
# The record's keys (as `Spool.create` writes them) and their types, checked when a spool is opened.
RECORD_SHAPE: dict[str, type | tuple[type, ...]] = {
    "tracking_uri": str, "experiment": str, "run_id": str, "run_name": str, "stage": str, "status": str,
    "reason": str, "spooled_at": int, "end_time": (int, type(None)), "params": dict, "tags": dict,
    "models": list, "children": list, "synced": list, "synced_to": (str, type(None))}
METRICS = "metrics.jsonl"
ARTIFACTS = "artifacts"
MODELS = "models"
CHILDREN = "children"
EXAMPLE = "example.pt"


def spool_dir() -> Path:
    """Where spooled runs go: $PRUNELAB_SPOOL, else `spool` in prunelab's cache folder."""
    env = os.environ.get("PRUNELAB_SPOOL")
    return Path(env) if env else cache_dir() / "spool"


def now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    """One spooled run: its folder and its record (run.json)."""

    def __init__(self, folder: Path, record: dict):
        self.folder = folder
        self.record = record

    @classmethod
    def create(cls, *, tracking_uri: str, experiment: str, run_id: str, run_name: str, stage: str,
               params: dict[str, str], tags: dict[str, str], reason: str) -> "Spool":
        folder = spool_dir() / (experiment or "default") / f"{stage or 'run'}-{run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id,
                  "run_name": run_name, "stage": stage, "status": "RUNNING", "reason": reason,
                  "spooled_at": now_ms(), "end_time": None, "params": dict(params), "tags": dict(tags),
                  "models": [], "children": [], "synced": [], "synced_to": None}
        spool = cls(folder, record)
        spool.save()
        return spool

    @classmethod
    def open(cls, folder: str | Path) -> "Spool":
        """A spool folder written by prunelab, or a one-line error saying why not."""
        folder = Path(folder)
        try:
            record = json.loads((folder / RECORD).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{folder} is not a spooled run (no {RECORD}): pass the folder named in the error "
                              "that said the tracking server stopped answering") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder / RECORD} cannot be read ({type(exc).__name__}): the spool folder is damaged") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ConfigError(f"{folder / RECORD} is not a prunelab spool record ({FORMAT})")
        wrong = [key for key, kinds in RECORD_SHAPE.items() if not isinstance(record.get(key, ...), kinds)]
        if wrong:  # what `sync` reads must be there: a hand-edited record is one line, not a KeyError
            raise ConfigError(f"{folder / RECORD} is damaged: {', '.join(wrong[:3])} missing or of the wrong type")
        return cls(folder, record)

    def save(self) -> None:
        with atomic_path(self.folder / RECORD) as tmp:
            tmp.write_text(json.dumps(self.record, indent=1))

    # ------------------------------------------------------------------ writing

    def set_params(self, params: dict[str, str]) -> None:
        self.record["params"].update(params)
        self.save()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record["tags"].update(tags)
        self.save()

    def add_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp ms, step) of metrics the server never got."""
        with open(self.folder / METRICS, "a") as f:
            for key, value, timestamp, step in metrics:
                f.write(json.dumps({"key": key, "value": value, "timestamp": timestamp, "step": step}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _artifact(self, artifact_file: str) -> Path:
        target = (self.folder / ARTIFACTS / artifact_file).resolve()
        if not target.is_relative_to((self.folder / ARTIFACTS).resolve()):
            raise ConfigError(f"artifact path {artifact_file!r} leaves the run's artifact folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_text(self, text: str, artifact_file: str) -> None:
        with atomic_path(self._artifact(artifact_file)) as tmp:
            tmp.write_text(text)

    def add_figure(self, figure, artifact_file: str) -> None:
        with atomic_path(self._artifact(artifact_file)) as tmp:
            figure.savefig(tmp, format=Path(artifact_file).suffix.lstrip(".") or "png")

    def add_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        name = Path(path).name
        with atomic_path(self._artifact(f"{artifact_path}/{name}" if artifact_path else name)) as tmp:
            shutil.copyfile(path, tmp)

    def add_model(self, model, name: str, example: torch.Tensor, final: bool, step: int = 0) -> Path:
        """The model as a weights-only checkpoint and its example input; sync logs the MLflow model from them."""
        folder = self.folder / MODELS / name
        checkpoints.save(model, folder / paths.CHECKPOINT)
        with atomic_path(folder / EXAMPLE) as tmp:
            torch.save(example.detach().cpu().clone(), tmp)
        self.record["models"] = [m for m in self.record["models"] if m["name"] != name] + [{"name": name, "final": final,
                                                                                             "step": step}]
        self.save()
        return folder

    def add_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int, files: list[Path] | None) -> None:
        index = len(self.record["children"])
        folder = self.folder / CHILDREN / str(index)
        names = []
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
        self.record["status"] = status
        self.record["end_time"] = now_ms()
        self.save()

    # ------------------------------------------------------------------ reading (sync)

    def metrics(self) -> list[dict]:
        """The spooled metrics; a line cut short by a crash is left out."""
        path = self.folder / METRICS
        out = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def artifacts(self) -> Path | None:
        path = self.folder / ARTIFACTS
        return path if path.is_dir() and any(path.iterdir()) else None

    def model_files(self, name: str) -> tuple[Path, Path]:
        folder = self.folder / MODELS / name
        return folder / paths.CHECKPOINT, folder / EXAMPLE

    def child_files(self, index: int) -> list[Path]:
        child = self.record["children"][index]
        return [self.folder / CHILDREN / str(index) / n for n in child["files"]]

    def done(self, step: str) -> bool:
        return step in self.record["synced"]

    def mark(self, step: str) -> None:
        """What sync has uploaded, so a sync cut short goes on where it stopped."""
        self.record["synced"].append(step)
        self.save()



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

    def log_model(self, model, name: str, example, step: int, final: bool, checkpoint, metadata, carry) -> str:
        """The bare network as a checkpoint with its example input; returns the folder holding them."""
        bare = checkpoint if checkpoint is not None else getattr(model, "network", model)
        return str(self.spool.add_model(bare, name, example, final, step))

    def log_child(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                  step: int, files: list[Path] | None, splits) -> str:
        self.spool.add_child(run_name, tags, params, metrics, step, files)
        return ""  # no run id until sync uploads it

    def end(self, status: str) -> None:
        self.spool.close(status)
