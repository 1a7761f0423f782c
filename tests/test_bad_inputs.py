"""The table of bad inputs: every one is refused with one line on stderr
(`prunelab: error: ...`, at most errors.MAX_MESSAGE characters), exit code 2,
no traceback, no run created on the server (none left RUNNING either) and
nothing half-written (no report folder, no partial file in the caches, nothing
spooled). Most rows call the real CLI entry function in-process, a few run
`python -m prunelab` as a user would (and see every warning printed before the
error line); all of them stop before any training starts."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import start_foreign_server
import torch

from prunelab import checkpoints, cli, config, files, paths
from prunelab.errors import MAX_MESSAGE
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import probe

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: settings must fail before any connection
TINY = "data.n_train=600 data.n_test=200 train.epochs=1 trials=1"
FORMAT = checkpoints.FORMAT
LONG_NAME = "n" * (files.NAME_MAX + 1)  # one byte more than any file system takes in one name
# A module that records being imported: what a pickle model's pickle_module_info.txt may name.
MARKER_MODULE = "prunelab_bad_input_marker"


class Inputs:
    """The files and servers the rows refer to, made once for the whole table."""

    def __init__(self, root: Path, fashion_dir: Path, dogs_cats_dir: Path, cifar_dir: Path, tracking_uri: str):
        self.root, self.fashion, self.dogs_cats, self.cifar, self.uri = root, fashion_dir, dogs_cats_dir, cifar_dir, tracking_uri
        self.marker = root / "code-ran"  # the evil model's __reduce__, or importing MARKER_MODULE, would create it
        self._made: dict[str, object] = {}
        self.running: set[str] = set()  # the RUNNING runs on the server after the previous row
        self.runs: set[str] = set()  # every run on the server after the previous row

    def once(self, key: str, make: Callable[[], object]):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------ files

    def text(self, name: str, content: str) -> str:
        return str(self.once(name, lambda: _write(self.path(name), content)))

    def binary(self, name: str, content: bytes) -> str:
        def make():
            self.path(name).write_bytes(content)
            return self.path(name)
        return str(self.once(name, make))

    def folder(self, name: str) -> str:
        def make():
            self.path(name).mkdir()
            return self.path(name)
        return str(self.once(name, make))

    def a_file(self) -> str:
        return self.text("a-file.txt", "not a folder\n")

    def weights(self, name: str, payload) -> str:
        def make():
            torch.save(payload, self.path(name))
            return self.path(name)
        return str(self.once(name, make))

    def torchvision_weights(self, name: str) -> str:
        """A torchvision weights file in form: the state dict of a fresh `name` for 10 classes."""
        import torchvision

        return self.weights(f"{name}.pth", torchvision.models.get_model(name, num_classes=10).state_dict())

    def checkpoint(self, name: str, **changes) -> str:
        """A prunelab checkpoint of a SimpleCNN, with some keys replaced (None: removed)."""
        payload = {"format": FORMAT, "model": "simple_cnn", "spec": SimpleCNN().spec(),
                   "state_dict": SimpleCNN().state_dict()}
        for key, value in changes.items():
            if value is None:
                payload.pop(key)
            else:
                payload[key] = value
        return self.weights(name, payload)

    def pickled_module(self) -> str:
        def make():
            torch.save(SimpleCNN(), self.path("module.pt"))  # a whole pickled module
            return self.path("module.pt")
        return str(self.once("module.pt", make))

    def fashion_copy(self, how: str) -> str:
        def make():
            folder = self.path(f"fashion-{how}")
            folder.mkdir()
            names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
            for name in names:
                gz = self.fashion / f"{name}.gz"
                if how == "truncated":
                    (folder / gz.name).write_bytes(gz.read_bytes()[:4000])
                elif how == "garbage":
                    (folder / name).write_bytes(b"\x00\x00\x08\x03 not an idx file" * 10)
                elif how == "half" and "train" in name:
                    shutil.copy(gz, folder / gz.name)
                elif how == "badgzip":
                    (folder / gz.name).write_bytes(b"\x1f\x8b\x08\x00" + b"not deflate data" * 20)
            return folder
        return str(self.once(f"fashion-{how}", make))

    def images(self, how: str) -> str:
        """A small copy of the dogs-vs-cats folder, then broken in one way."""
        def make():
            folder = self.path(f"images-{how}")
            for split in ("train", "test"):
                for cls in ("cat", "dog"):
                    (folder / split / cls).mkdir(parents=True)
                    if how == "no-images":
                        continue
                    for f in sorted((self.dogs_cats / split / cls).iterdir())[:2]:
                        shutil.copy(f, folder / split / cls / f.name)
            if how == "no-test":
                shutil.rmtree(folder / "test")
            elif how == "one-class":
                shutil.rmtree(folder / "train" / "dog")
                shutil.rmtree(folder / "test" / "dog")
            elif how == "dogs-unreadable":
                for f in (folder / "train" / "dog").iterdir():
                    f.write_bytes(b"\xff\xd8 not a jpeg at all")
            elif how == "empty-class":
                (folder / "train" / "bird").mkdir()
                (folder / "test" / "bird").mkdir()
            elif how == "classes-differ":
                (folder / "test" / "dog").rename(folder / "test" / "wolf")
            elif how == "huge-image":  # over PIL's pixel limit: decoding it warns of a decompression bomb
                from PIL import Image

                Image.new("L", (10_000, 9_000)).save(folder / "train" / "cat" / "huge.png")
            return folder
        return str(self.once(f"images-{how}", make))

    def cifar_copy(self, how: str) -> str:
        def make():
            folder = self.path(f"cifar-{how}")
            folder.mkdir()
            names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            for name in names:
                if how == "evil":
                    (folder / name).write_bytes(pickle.dumps(_Evil(self.marker)))
                elif how == "garbage":
                    (folder / name).write_bytes(b"not a pickle")
                elif how == "missing" and name != "test_batch":
                    batches = self.cifar / "cifar-10-batches-py"
                    shutil.copy((batches if batches.is_dir() else self.cifar) / name, folder / name)
            return folder
        return str(self.once(f"cifar-{how}", make))

    def spool(self, how: str) -> str:
        def make():
            folder = self.path(f"spool-{how}")
            folder.mkdir()
            if how == "garbage":
                (folder / "run.json").write_text("{ not json")
            elif how == "foreign":
                (folder / "run.json").write_text(json.dumps({"format": "something-else"}))
            elif how == "incomplete":
                (folder / "run.json").write_text(json.dumps({"format": "prunelab-spool-v1", "tracking_uri": 5}))
            return folder
        return str(self.once(f"spool-{how}", make))

    # ------------------------------------------------------------------ servers and runs

    def foreign_server(self) -> str:
        """A web server whose every path (/health included) answers 200 with a page."""
        def make():
            return start_foreign_server()[0]
        return str(self.once("foreign", make))

    def silent_server(self) -> str:
        """A socket that accepts connections and never answers."""
        def make():
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            self._made["silent-socket"] = sock  # kept open for the table's lifetime
            return f"http://127.0.0.1:{sock.getsockname()[1]}"
        return str(self.once("silent", make))

    def evil_model(self, name: str = "evil") -> tuple[str, str]:
        """(run id, models:/ URI) of a pickle-format MLflow model whose unpickling would create `marker`."""
        def make():
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            experiment = mlflow.set_experiment("test-bad-inputs-evil")
            with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
                # pip_requirements given: MLflow would otherwise load (unpickle) the model to infer them.
                info = mlflow.pytorch.log_model(_EvilModule(self.marker), name=name, serialization_format="pickle",
                                                pip_requirements=["torch"])
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            assert not self.marker.exists(), "logging the model must not run it"
            return run.info.run_id, info.model_uri
        return self.once(name, make)


    def marker_module(self) -> str:
        """A module on sys.path whose import creates `marker`: code a model file could make run."""
        def make():
            _write(self.root / f"{MARKER_MODULE}.py", f"open({str(self.marker)!r}, 'w').close()\n")
            return MARKER_MODULE
        return str(self.once("marker-module", make))

    def crafted_model(self, how: str) -> str:
        """runs:/ URI of a model folder logged as a run's artifacts: MLflow's own pt2 model,
        then changed in one way (each a way past a check that reads only file names)."""
        def make():
            import mlflow
            import mlflow.pytorch
            import yaml

            folder = self.path(f"model-{how}")
            example = torch.zeros(2, 1, 28, 28)
            mlflow.pytorch.save_model(SimpleCNN().eval(), str(folder), input_example=example.numpy(),
                                      serialization_format="pt2", pip_requirements=["torch"])
            data = folder / "data"
            if how == "pth-beside-pt2":  # MLflow's loader sees model.pth, imports the named module, then unpickles
                (data / "pickle_module_info.txt").write_text(self.marker_module())
                torch.save(_EvilModule(self.marker), data / "model.pth")
            elif how == "extra-file":
                (data / "notes.txt").write_text("anything beside model.pt2\n")
            elif how == "data-elsewhere":
                meta = yaml.safe_load((folder / "MLmodel").read_text())
                meta["flavors"]["pytorch"]["model_data"] = "../data"
                (folder / "MLmodel").write_text(yaml.safe_dump(meta))
            mlflow.set_tracking_uri(self.uri)
            experiment = mlflow.set_experiment("test-bad-inputs-crafted")
            with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
                mlflow.log_artifacts(str(folder), how)
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            return f"runs:/{run.info.run_id}/{how}"
        return str(self.once(f"crafted-{how}", make))

    def evil_model_beside_pt2(self) -> str:
        """models:/ URI of the pickle-format evil model with an empty model.pt2 added to its data folder,
        and a pickle_module_info.txt naming a module whose import creates `marker`."""
        def make():
            from mlflow import MlflowClient

            model_id = self.evil_model("evil-beside-pt2")[1].removeprefix("models:/")
            empty = self.path("pt2") / "model.pt2"
            empty.parent.mkdir()
            empty.write_bytes(b"")
            info = self.path("pt2") / "pickle_module_info.txt"
            info.write_text(self.marker_module())
            for f in (empty, info):
                MlflowClient(self.uri).log_model_artifact(model_id, str(f), "data")
            return f"models:/{model_id}"
        return str(self.once("evil-pt2", make))

    def round_run(self, round_param: str) -> str:
        """A run tagged as a lottery-ticket prune round whose `round` param is `round_param`."""
        def make():
            from mlflow import MlflowClient

            c = MlflowClient(self.uri)
            experiment = c.get_experiment_by_name("test-bad-inputs-rounds") or \
                c.get_experiment(c.create_experiment("test-bad-inputs-rounds"))
            run = c.create_run(experiment.experiment_id, tags={"stage": "prune"})
            c.log_param(run.info.run_id, "round", round_param)
            c.set_terminated(run.info.run_id)
            return run.info.run_id
        return str(self.once(f"round-{round_param}", make))

    def mask_round(self, how: str) -> str:
        """A finished lottery round 1 of Conv-2 on CIFAR-10 whose trained and rewind weights are
        real checkpoints and whose mask.pt is not a mask (`how`: a list, junk bytes, ints)."""
        def make():
            from mlflow import MlflowClient

            from prunelab import models

            folder = self.path(f"mask-{how}")
            folder.mkdir()
            net = models.build("conv2", (3, 32, 32), 10)
            checkpoints.save(net, folder / paths.CHECKPOINT)
            checkpoints.save(net, folder / paths.REWIND_WEIGHTS)
            if how == "junk":
                (folder / paths.MASK).write_bytes(b"not a mask at all")
            else:
                bad = [torch.ones(3)] if how == "list" else {k: torch.ones_like(v, dtype=torch.int64)
                                                             for k, v in net.named_parameters() if v.dim() > 1}
                torch.save(bad, folder / paths.MASK)
            c = MlflowClient(self.uri)
            experiment = c.get_experiment_by_name("test-bad-inputs-rounds") or \
                c.get_experiment(c.create_experiment("test-bad-inputs-rounds"))
            run = c.create_run(experiment.experiment_id, tags={"stage": "prune"})
            c.log_param(run.info.run_id, "round", "1")
            for f in folder.iterdir():
                c.log_artifact(run.info.run_id, str(f))
            c.set_terminated(run.info.run_id)
            return run.info.run_id
        return str(self.once(f"mask-{how}", make))


class _EvilModule(torch.nn.Module):
    """A module that, when unpickled, creates a file: code from a model URI."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = str(marker)
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def kube_config(c: Inputs, **changes) -> str:
    """A backend config for `run --backend kubernetes` (with its Job template), with `changes`."""
    template = c.text("job-template.yaml", (REPO / "deploy" / "kubernetes" / "job-template.yaml").read_text())
    config = {"repository-uri": "registry.example.org/prunelab/steps", "kube-job-template-path": template,
              "image": "registry.example.org/prunelab:0.1.0", **changes}
    return c.text(f"kube-{abs(hash(json.dumps(config, sort_keys=True)))}.json", json.dumps(config))


def kube_run(config: Callable[[Inputs], str], *extra: str) -> Callable[[Inputs], list[str]]:
    def argv(c: Inputs) -> list[str]:
        more = [c.text("preset.yaml", "study: test-bad-kube\n") if a == "{preset}" else a for a in extra]
        return ["run", "--tracking-uri", DEAD, "--backend", "kubernetes", "--backend-config", config(c), *more]
    return argv


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Inputs], list[str]]
    needle: str
    process: bool = False  # run as `python -m prunelab` in a real process
    env: tuple[tuple[str, str], ...] = ()  # set while the row runs; {root}: the table's folder
    absent: Callable[[Inputs], Path] | None = None  # a path that must not exist afterwards (nothing created there)


def settings(*sets: str, command: str = "train", study: str = "") -> Callable[[Inputs], list[str]]:
    study_args = ["--study", study] if study else []
    return lambda c: [command, "--tracking-uri", DEAD, *study_args, *[a for s in sets for a in ("--set", s)]]


def evaluate(ref: Callable[[Inputs], str], *extra: str) -> Callable[[Inputs], list[str]]:
    return lambda c: ["evaluate", ref(c), "--dataset", "fashionmnist", "--n-test", "50", *extra]


def staged(command: str, *args: str, study: str = "", data_dir: Callable[[Inputs], str] | None = None):
    """A stage against the session's server that must stop before its run starts."""
    def argv(c: Inputs) -> list[str]:
        out = [command, "--overrides", TINY, *args]  # settings every kind has
        if study:
            out += ["--study", study]
        if data_dir is not None:
            out += ["--data-dir", data_dir(c)]
        return out
    return argv


def imagefolder(how: str):
    return staged("train", "--set", "data.dataset=imagefolder", "--set", "data.image_size=32",
                  "--set", f"study=test-bad-images-{how}", data_dir=lambda c: c.images(how))


LTH = "lth-conv2-cifar10-quick"
KMEANS = "kmeans-resnet20-cifar10"
VGG = "taylor-vgg16-dogscats"
COMPARE = "compare-cnn-fashionmnist"
ZERO_RUN = "0" * 32

CASES = [
    # --------------------------------------------------------------- settings (before any connection)
    Case("model-unknown", settings("model=resnet999"), "unknown model 'resnet999'"),
    Case("model-empty", settings("model="), "unknown model ''"),
    Case("model-not-prunable", settings("model=lenet_300_100"), "cannot be used in a filter_pruning study"),
    Case("torchvision-unknown", settings("model=torchvision:resnet19"),
         "torchvision has no classification model 'resnet19': did you mean torchvision:resnet18"),
    Case("torchvision-detector", settings("model=torchvision:fasterrcnn_resnet50_fpn"), "no classification model"),
    Case("factory-no-module", settings("model=no_such_package.nets:build"), "no module 'no_such_package.nets'"),
    Case("factory-no-function", settings("model=tests.models.tiny_factory:nothing"), "has no 'nothing'"),
    Case("factory-not-callable", settings("model=tests.models.tiny_factory:NOT_CALLABLE"), "is a int, not a function"),
    Case("factory-malformed", settings("model=my nets:build"), "is not a factory: write torchvision:NAME or"),
    Case("ignored-layers-number", settings("prune.ignored_layers=3"), "prune.ignored_layers must be a list (e.g. prune.ignored_layers=[a, b]), got 3"),
    Case("dataset-unknown", settings("data.dataset=mnist3d"), "unknown dataset 'mnist3d'"),
    Case("dataset-empty", settings("data.dataset="), "unknown dataset ''"),
    Case("method-unknown", settings("prune.method=magic"), "unknown pruning method 'magic'"),
    Case("target-above-1", settings("prune.target=1.2"), "prune.target must be inside (0, 1)"),
    Case("target-zero", settings("prune.target=0"), "prune.target must be inside (0, 1)"),
    Case("target-nan", settings("prune.target=.nan"), "prune.target must be inside (0, 1)"),
    Case("target-string", settings("prune.target=half"), "prune.target must be a float"),
    Case("target-kind-unknown", settings("prune.target_kind=weights"), "prune.target_kind must be"),
    Case("filters-per-step-zero", settings("prune.filters_per_step=0"), "prune.filters_per_step must be >= 1"),
    Case("log-models-every-zero", settings("prune.log_models_every=0"), "prune.log_models_every must be >= 1"),
    Case("rank-images-negative", settings("prune.rank_images=-1"), "prune.rank_images must be >= 0"),
    Case("finetune-between-negative", settings("prune.finetune_epochs_between=-1"), "prune.finetune_epochs_between"),
    Case("schedule-unknown", settings("prune.schedule=twice"), "prune.schedule must be one of iterative, one_shot"),
    Case("scope-unknown", settings("prune.scope=local"), "prune.scope must be one of global, uniform"),
    Case("one-shot-with-finetuning-between", settings("prune.schedule=one_shot", "prune.finetune_epochs_between=1"),
         "prune.schedule=one_shot ranks once"),
    Case("distill-temperature-negative", settings("finetune.distill_temperature=-1"),
         "finetune.distill_temperature must be >= 0"),
    Case("distill-weight-above-1", settings("finetune.distill_weight=1.5"), "finetune.distill_weight must be in [0, 1]"),
    Case("distill-in-training", settings("train.distill_temperature=4"), "train.distill_temperature: training from scratch"),
    Case("latency-repeats-negative", settings("prune.latency_repeats=-1"), "prune.latency_repeats must be >= 0"),
    Case("rank-batch-zero", settings("prune.rank_batch_size=0"), "prune.rank_batch_size must be >= 1"),
    Case("epochs-zero", settings("train.epochs=0"), "train.epochs must be >= 1"),
    Case("epochs-negative", settings("train.epochs=-3"), "train.epochs must be >= 1"),
    Case("epochs-word", settings("train.epochs=abc"), "train.epochs must be an int"),
    Case("epochs-fraction", settings("train.epochs=1.5"), "train.epochs must be an int"),
    Case("epochs-bool", settings("train.epochs=true"), "train.epochs must be an int"),
    Case("batch-size-zero", settings("train.batch_size=0"), "train.batch_size must be >= 1"),
    Case("lr-zero", settings("train.lr=0"), "train.lr must be > 0"),
    Case("lr-negative", settings("train.lr=-0.1"), "train.lr must be > 0"),
    Case("lr-nan", settings("train.lr=.nan"), "train.lr must be > 0"),
    Case("lr-infinite", settings("train.lr=.inf"), "train.lr must be > 0"),
    Case("momentum-negative", settings("train.momentum=-0.5"), "train.momentum must be in [0, 1)"),
    Case("momentum-above-1", settings("train.momentum=1.5"), "train.momentum must be in [0, 1)"),
    Case("weight-decay-negative", settings("train.weight_decay=-1"), "train.weight_decay must be >= 0"),
    Case("weight-decay-nan", settings("train.weight_decay=.nan"), "train.weight_decay must be >= 0"),
    Case("optimizer-unknown", settings("train.optimizer=rmsprop"), "unknown optimizer 'rmsprop'"),
    Case("finetune-epochs-zero", settings("finetune.epochs=0"), "finetune.epochs must be >= 1"),
    Case("finetune-lr-nan", settings("finetune.lr=.nan"), "finetune.lr must be > 0"),
    Case("finetune-optimizer-unknown", settings("finetune.optimizer=lion"), "unknown optimizer 'lion'"),
    Case("finetune-momentum-negative", settings("finetune.momentum=-1"), "finetune.momentum must be in [0, 1)"),
    Case("seed-negative", settings("seed=-1"), "seed must be in [0,"),
    Case("seed-huge", settings("seed=99999999999999999999"), "seed must be in [0,"),
    Case("seed-fraction", settings("seed=1.5"), "seed must be an int"),
    Case("trials-zero", settings("trials=0"), "trials must be in [1, 10000]"),
    Case("trials-negative", settings("trials=-2"), "trials must be in [1, 10000]"),
    Case("trials-huge", settings("trials=1000000"), "trials must be in [1, 10000]"),
    Case("study-empty", settings("study="), "study name '' is not allowed"),
    Case("study-escapes", settings("study=../../escaped"), "study name '../../escaped' is not allowed"),
    Case("study-slash", settings("study=a/b"), "study name 'a/b' is not allowed"),
    Case("study-space", settings("study=has space"), "study name 'has space' is not allowed"),
    Case("study-hidden", settings("study=.hidden"), "study name '.hidden' is not allowed"),
    Case("study-too-long", settings("study=" + "x" * 101), "is not allowed"),
    Case("study-number", settings("study=[1, 2]"), "study must be a str, got [1, 2]"),
    Case("n-train-negative", settings("data.n_train=-1"), "data.n_train must be >= 0"),
    Case("n-test-negative", settings("data.n_test=-5"), "data.n_test must be >= 0"),
    Case("val-size-negative", settings("data.val_size=-1"), "data.val_size must be >= 0"),
    Case("image-size-huge", settings("data.image_size=60000"), "data.image_size must be in [0, 4096]"),
    Case("image-size-negative", settings("data.image_size=-1"), "data.image_size must be in [0, 4096]"),
    Case("augment-word", settings("data.augment=maybe"), "data.augment must be a bool"),
    Case("unknown-section", settings("foo.bar=1"), "unknown setting foo"),
    Case("unknown-field", settings("train.nonexistent=1"), "unknown setting train.nonexistent"),
    Case("other-kinds-setting", settings("kmeans.weights=x.th"), "unknown setting kmeans for a filter_pruning study"),
    Case("other-kinds-section", settings("lottery.rounds=3"), "unknown setting lottery"),
    Case("section-as-value", settings("train=5"), "section train must be a mapping"),
    Case("value-as-section", settings("seed.x=1"), "'seed' is not a section"),
    Case("override-without-value", settings("train.epochs"), "is not KEY=VALUE"),
    Case("override-without-key", settings("=3"), "is not KEY=VALUE"),
    Case("kind-unknown", settings("kind=magic"), "unknown study kind 'magic'"),
    Case("kind-empty", settings("kind="), "unknown study kind ''"),
    Case("weights-flag-on-taylor", lambda c: ["train", "--tracking-uri", DEAD, "--weights", "w.pth"],
         "unknown setting transfer for a filter_pruning study"),
    Case("no-pretrained-on-taylor", lambda c: ["train", "--tracking-uri", DEAD, "--no-pretrained"],
         "unknown setting transfer for a filter_pruning study"),
    Case("lottery-rate-one", settings("lottery.conv_rate=1.0", study=LTH), "lottery.conv_rate must be in [0, 1)"),
    Case("lottery-strategy-unknown", settings("lottery.strategy=bogus", study=LTH), "lottery.strategy must be one of"),
    Case("lottery-iterations-zero", settings("lottery.iterations=0", study=LTH), "lottery.iterations must be >= 1"),
    Case("lottery-rounds-negative", settings("lottery.rounds=-1", study=LTH), "lottery.rounds must be >= 0"),
    Case("kmeans-keep-above-1", settings("kmeans.merge_keep=[1.5]", study=KMEANS), "kmeans.merge_keep must be"),
    Case("kmeans-distance-unknown", settings("kmeans.distance=manhattan", study=KMEANS), "unknown k-means distance 'manhattan'"),
    Case("kmeans-n-init-zero", settings("kmeans.n_init=0", study=KMEANS), "kmeans.n_init must be >= 1"),
    Case("kmeans-pruned-negative", settings("kmeans.stage_pruned=[-1]", study=KMEANS), "kmeans.stage_pruned must be"),
    Case("transfer-head-zero", settings("transfer.head_width=0", study=VGG), "transfer.head_width must be >= 1"),
    # types: a bool is never a number, inside lists too; a list is a list
    Case("kmeans-keep-bool", settings("kmeans.merge_keep=[true]", study=KMEANS), "kmeans.merge_keep[0] must be a float, got True"),
    Case("kmeans-keep-bool-later", settings("kmeans.merge_keep=[0.5, no]", study=KMEANS),
         "kmeans.merge_keep[1] must be a float, got False"),
    Case("kmeans-pruned-bool", settings("kmeans.stage_pruned=[1, false]", study=KMEANS),
         "kmeans.stage_pruned[1] must be an int, got False"),
    Case("kmeans-keep-not-list", settings("kmeans.merge_keep=0.5", study=KMEANS), "kmeans.merge_keep must be a list"),
    Case("kmeans-stages-nested", settings("kmeans.stages=[[layer1]]", study=KMEANS), "kmeans.stages[0] must be a str"),
    Case("lr-bool", settings("train.lr=true"), "train.lr must be a float, got True"),
    Case("lr-word", settings("train.lr=1e-3x"), "train.lr must be a float, got '1e-3x'"),
    Case("study-yes", settings("study=yes"), "study must be text, got True"),
    Case("lr-exponent-then-range", settings("train.lr=1e-3", "train.momentum=2"), "train.momentum must be in [0, 1)"),
    # --------------------------------------------------------------- override values: one validating YAML parse
    Case("value-unclosed-list", settings("train.epochs=[1, 2"), "override 'train.epochs' is not valid YAML"),
    Case("value-unclosed-map", settings("train.epochs={a: 1"), "override 'train.epochs' is not valid YAML"),
    Case("value-undefined-alias", settings("train.epochs=*x"), "anchors and aliases (&name, *name) are not allowed"),
    Case("value-anchor", settings("kmeans.stages=[&a layer1, *a]", study=KMEANS), "anchors and aliases"),
    Case("value-alias-bomb", settings("study=[&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
                                      "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], [*c, *c, *c, *c, *c, *c, *c, *c, *c]]"),
         "anchors and aliases"),
    Case("value-yaml-directive", settings("train.epochs=%YAML 1.1"), "override 'train.epochs' is not valid YAML"),
    Case("value-two-documents", settings("train.epochs=1\n---\n2"), "expected a single document"),
    Case("value-control-character", settings("study=a\x01b"), "unacceptable character #x0001"),
    Case("value-escape-character", settings("study=a\x1b[31mred"), "unacceptable character #x001b"),
    Case("value-deeply-nested", settings("study=" + "[" * 500 + "]" * 500), "nested deeper than"),
    Case("value-too-large", settings("study=" + "x" * (config.MAX_VALUE_BYTES + 1)), "is larger than 4096 bytes"),
    Case("value-python-tag", settings("study=!!python/object/apply:os.system [echo hi]"), "is not valid YAML"),
    Case("key-long-unknown", settings("x" * 5000 + "=1"), "unknown setting xxxx"),
    # --------------------------------------------------------------- presets
    Case("preset-unknown", lambda c: ["train", "--tracking-uri", DEAD, "--study", "no-such-study"], "unknown study 'no-such-study'"),
    Case("preset-plain-string", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("string.yaml", "just a string\n")],
         "is not a mapping of settings"),
    Case("preset-number", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("number.yaml", "42\n")],
         "is not a mapping of settings"),
    Case("preset-list", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("list.yaml", "- a\n- b\n")],
         "is not a mapping of settings"),
    Case("preset-invalid-yaml", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("broken.yaml", "a: [1, 2\n")],
         "is not valid YAML"),
    Case("preset-section-string", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("section.yaml", "data: hello\n")],
         "section data must be a mapping"),
    Case("preset-unknown-kind", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("kind.yaml", "kind: nope\n")],
         "unknown study kind 'nope'"),
    Case("preset-study-escapes", lambda c: ["report", "--tracking-uri", DEAD, "--study",
                                            c.text("escape.yaml", "study: ../../escaped\n")], "is not allowed"),
    Case("preset-empty", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("empty.yaml", "")], "sets nothing"),
    Case("preset-comments-only", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("comments.yaml", "# nothing\n")],
         "sets nothing"),
    Case("preset-empty-section", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("data-only.yaml", "data:\n")],
         "sets nothing"),
    Case("preset-section-list", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("data-list.yaml", "data: []\n")],
         "section data must be a mapping"),
    Case("preset-not-utf8", lambda c: ["train", "--tracking-uri", DEAD, "--study",
                                       c.binary("latin1.yaml", "study: caf\xe9\n".encode("latin-1"))], "is not UTF-8 text"),
    Case("preset-alias-bomb", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("bomb.yaml", "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9 if p else ['x'] * 9)}]\n" for n, p in zip("abcdefghi", ["", *"abcdefgh"])))],
         "anchors and aliases"),
    Case("preset-too-large", lambda c: ["train", "--tracking-uri", DEAD, "--study",
                                        c.text("large.yaml", "study: x\n" + "# padding\n" * 7000)], "is larger than 65536 bytes"),
    Case("preset-two-documents", lambda c: ["train", "--tracking-uri", DEAD, "--study",
                                            c.text("two.yaml", "study: a\n---\nstudy: b\n")], "expected a single document"),
    Case("preset-number-keys", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("keys.yaml", "1: 2\nstudy: x\n")],
         "unknown setting 1"),
    Case("preset-control-character", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("bell.yaml", "study: a\x07\n")],
         "unacceptable character #x0007"),
    Case("preset-alias-bomb-process", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.text("bomb.yaml", "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9 if p else ['x'] * 9)}]\n" for n, p in zip("abcdefghi", ["", *"abcdefgh"])))],
         "anchors and aliases", process=True),
    # --------------------------------------------------------------- a study is a preset's plain name, or a .yaml file
    Case("study-name-escapes", lambda c: ["train", "--tracking-uri", DEAD, "--study", "../x"], "is neither a preset name"),
    Case("study-name-escapes-deep", lambda c: ["train", "--tracking-uri", DEAD, "--study", "../../presets/taylor-cnn-fashionmnist"],
         "is neither a preset name"),
    Case("study-name-absolute", lambda c: ["train", "--tracking-uri", DEAD, "--study", str(c.path("escape"))],
         "is neither a preset name"),
    Case("study-name-device", lambda c: ["train", "--tracking-uri", DEAD, "--study", "/dev/zero"], "is neither a preset name"),
    Case("study-file-absent", lambda c: ["train", "--tracking-uri", DEAD, "--study", "../absent.yaml"], "no preset file '../absent.yaml'"),
    Case("study-file-folder", lambda c: ["train", "--tracking-uri", DEAD, "--study", c.folder("folder.yaml")],
         "no preset file"),
    Case("study-escapes-process", lambda c: ["train", "--tracking-uri", DEAD, "--study", "../x"], "is neither a preset name",
         process=True),
    # --------------------------------------------------------------- paths no file system takes
    Case("study-name-too-long", lambda c: ["train", "--tracking-uri", DEAD, "--study", LONG_NAME + ".yaml"],
         "holds a name of 261 bytes"),
    Case("data-dir-name-too-long", lambda c: ["train", "--tracking-uri", DEAD, "--data-dir", LONG_NAME], "holds a name of 256 bytes"),
    Case("data-dir-setting-too-long", settings(f"data.data_dir=/tmp/{LONG_NAME}/x"), "holds a name of 256 bytes"),
    Case("out-name-too-long", lambda c: ["report", "--tracking-uri", DEAD, "--out", LONG_NAME], "holds a name of 256 bytes"),
    Case("model-uri-name-too-long", staged("finetune", "--set", "study=test-bad-long", "--model-uri", LONG_NAME),
         "holds a name of 256 bytes"),
    Case("evaluate-name-too-long", evaluate(lambda c: LONG_NAME + ".pt"), "holds a name of 259 bytes"),
    Case("kmeans-weights-too-long", staged("prune", "--set", "study=test-bad-kmeans", "--set", f"kmeans.weights={LONG_NAME}.th",
                                           study=KMEANS, data_dir=lambda c: str(c.cifar)), "holds a name of 259 bytes"),
    Case("out-name-too-long-process", lambda c: ["report", "--tracking-uri", DEAD, "--out", LONG_NAME], "holds a name of 256 bytes",
         process=True),
    # --------------------------------------------------------------- the command line itself
    Case("trial-negative", lambda c: ["train", "--tracking-uri", DEAD, "--trial", "-1"], "--trial must be in [0,"),
    Case("trial-huge", lambda c: ["train", "--tracking-uri", DEAD, "--trial", "4294967296"], "--trial must be in [0,"),
    Case("trial-word", lambda c: ["train", "--trial", "abc"], "argument --trial: invalid int value: 'abc'"),
    Case("command-unknown", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("command-missing", lambda c: [], "the following arguments are required: command"),
    Case("finetune-without-model", lambda c: ["finetune"], "the following arguments are required: --model-uri"),
    Case("evaluate-without-dataset", lambda c: ["evaluate", "x.pt"], "x.pt names no run that says what data it was made on: pass --dataset"),
    Case("flag-unknown", lambda c: ["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    Case("n-test-negative-flag", evaluate(lambda c: c.checkpoint("ok.pt"), "--n-test", "-5"), "--n-test must be >= 0"),
    Case("evaluate-dataset-unknown", lambda c: ["evaluate", c.checkpoint("ok.pt"), "--dataset", "mnist3d"], "unknown dataset 'mnist3d'"),
    Case("finetune-model-uri-empty", lambda c: ["finetune", "--tracking-uri", DEAD, "--model-uri", ""], "--model-uri is empty"),
    Case("finetune-model-uri-blank", lambda c: ["finetune", "--tracking-uri", DEAD, "--model-uri", "  "], "--model-uri is empty"),
    Case("evaluate-model-empty", evaluate(lambda c: ""), "the model reference is empty"),
    # --------------------------------------------------------------- environment and server
    Case("patience-word", lambda c: ["train"], "PRUNELAB_TRACKING_PATIENCE='soon' is not a number",
         env=(("PRUNELAB_TRACKING_PATIENCE", "soon"),)),
    Case("patience-too-short", lambda c: ["train"], "PRUNELAB_TRACKING_PATIENCE must be in [8, 3600]",
         env=(("PRUNELAB_TRACKING_PATIENCE", "1"),)),
    Case("server-absent", lambda c: ["train", "--tracking-uri", f"http://127.0.0.1:{probe.free_port()}"],
         "no MLflow tracking server at"),
    Case("server-not-mlflow", lambda c: ["train", "--tracking-uri", c.foreign_server()],
         "a web server answers there (HTTP 200), but not as an MLflow tracking server"),
    Case("server-never-answers", lambda c: ["train", "--tracking-uri", c.silent_server()], "no answer within 5 s"),
    Case("tracking-uri-scheme", lambda c: ["train", "--tracking-uri", "htp://nowhere"], "cannot use the tracking URI 'htp://nowhere'"),
    # MLflow's own settings and tracking URIs MLflow would fail on with a traceback, or quietly create
    Case("mlflow-timeout-word", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_TIMEOUT='abc' is not a whole number", env=(("MLFLOW_HTTP_REQUEST_TIMEOUT", "abc"),)),
    Case("mlflow-timeout-zero", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_TIMEOUT must be >= 1", env=(("MLFLOW_HTTP_REQUEST_TIMEOUT", "0"),)),
    Case("mlflow-backoff-word", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR='abc' is not a whole number", env=(("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "abc"),)),
    Case("mlflow-jitter-word", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER='a bit' is not a number", env=(("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "a bit"),)),
    Case("mlflow-retries-negative", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_MAX_RETRIES must be in [0, 10], got -1", env=(("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1"),)),
    Case("mlflow-retries-too-many", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_HTTP_REQUEST_MAX_RETRIES must be in [0, 10], got 99", env=(("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "99"),)),
    Case("mlflow-run-id-junk", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "MLFLOW_RUN_ID='junk' names no run on", env=(("MLFLOW_RUN_ID", "junk"),)),
    Case("mlflow-run-id-unknown-process", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         f"MLFLOW_RUN_ID='{ZERO_RUN}' names no run on", env=(("MLFLOW_RUN_ID", ZERO_RUN),), process=True),
    Case("tracking-uri-trailing-space", lambda c: ["train", "--tracking-uri", c.uri + " "], "holds a space or control character"),
    Case("tracking-uri-env-trailing-space", lambda c: ["train"], "holds a space or control character",
         env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000 "),)),
    Case("tracking-uri-bad-port", lambda c: ["train", "--tracking-uri", "http://127.0.0.1:99999"], "Port out of range"),
    Case("tracking-uri-bad-ipv6", lambda c: ["train", "--tracking-uri", "http://[::1"], "Invalid IPv6 URL"),
    Case("tracking-uri-no-host", lambda c: ["train", "--tracking-uri", "http://:5000"], "names no host"),
    Case("tracking-store-folder-absent", lambda c: ["train", "--overrides", TINY, "--tracking-uri",
                                                    f"sqlite:///{c.path('no-such-folder')}/mlflow.db"],
         "of the tracking store", absent=lambda c: c.path("no-such-folder")),
    Case("tracking-store-folder-absent-process", lambda c: ["train", "--overrides", TINY, "--set", "study=test-bad-env"],
         "of the tracking store", env=(("MLFLOW_TRACKING_URI", "sqlite:///{root}/no-such-folder-env/dir/x.db"),),
         process=True, absent=lambda c: c.path("no-such-folder-env")),
    Case("tracking-file-store-folder-absent", lambda c: ["train", "--tracking-uri", f"file://{c.path('no-such-parent')}/mlruns"],
         "of the tracking store", absent=lambda c: c.path("no-such-parent")),
    Case("presets-folder-is-file", lambda c: ["train", "--tracking-uri", DEAD, "--study", "nope"],
         "PRUNELAB_CONFIGS=", env=(("PRUNELAB_CONFIGS", str(REPO / "pyproject.toml")),)),
    Case("presets-folder-absent", lambda c: ["train", "--tracking-uri", DEAD],
         "is not a folder", env=(("PRUNELAB_CONFIGS", str(REPO / "no-such-presets")),)),
    Case("presets-folder-is-file-process", lambda c: ["train", "--tracking-uri", DEAD],
         "PRUNELAB_CONFIGS=", env=(("PRUNELAB_CONFIGS", str(REPO / "pyproject.toml")),), process=True),
    # --------------------------------------------------------------- data folders
    Case("fashion-folder-absent", staged("train", "--set", "study=test-bad-fashion", data_dir=lambda c: str(c.path("absent"))),
         "no FashionMNIST files in"),
    Case("data-uri-absent", staged("train", "--set", "study=test-bad-data-uri",
                                   data_dir=lambda c: "runs:/0123456789abcdef0123456789abcdef/fashion"),
         "could not be downloaded"),
    Case("fashion-truncated", staged("train", "--set", "study=test-bad-fashion", data_dir=lambda c: c.fashion_copy("truncated")),
         "is corrupt"),
    Case("fashion-not-gzip", staged("train", "--set", "study=test-bad-fashion", data_dir=lambda c: c.fashion_copy("badgzip")),
         "is corrupt"),
    Case("fashion-garbage", staged("train", "--set", "study=test-bad-fashion", data_dir=lambda c: c.fashion_copy("garbage")),
         "is corrupt"),
    Case("fashion-half", staged("train", "--set", "study=test-bad-fashion", data_dir=lambda c: c.fashion_copy("half")),
         "no FashionMNIST files in"),
    Case("val-size-too-large", staged("train", "--set", "study=test-bad-fashion", "--set", "data.val_size=60000"),
         "data.val_size=60000 leaves no training images"),
    Case("images-no-test", imagefolder("no-test"), "has no test/ sub-folder"),
    Case("images-one-class", imagefolder("one-class"), "holds images of only one class"),
    Case("images-dogs-unreadable", imagefolder("dogs-unreadable"), "could be read (2 unreadable): class 'dog'"),
    Case("images-dogs-unreadable-process", imagefolder("dogs-unreadable"), "could be read (2 unreadable): class 'dog'",
         process=True),  # no warning line for each unreadable file before the error
    Case("images-empty-class", imagefolder("empty-class"), "holds no image"),
    Case("images-warned-then-refused-process", staged("train", "--set", "data.dataset=imagefolder", "--set", "data.image_size=32",
                                                      "--set", "study=test-bad-images-huge", "--set", "data.val_size=100",
                                                      data_dir=lambda c: c.images("huge-image")),
         "data.val_size=100 leaves no training images", process=True),  # PIL's warning, held, is not printed
    Case("images-classes-differ", imagefolder("classes-differ"), "have different class folders"),
    Case("images-none", imagefolder("no-images"), "no images in"),
    Case("images-no-dir", staged("train", "--set", "data.dataset=imagefolder", "--set", "study=test-bad-images"),
         "needs --data-dir"),
    Case("images-dir-absent", staged("train", "--set", "data.dataset=imagefolder", "--set", "study=test-bad-images",
                                     data_dir=lambda c: str(c.path("absent"))), "no folder"),
    Case("cifar-batches-missing", staged("train", "--set", "study=test-bad-cifar", study=LTH,
                                         data_dir=lambda c: c.cifar_copy("missing")), "lacks test_batch"),
    Case("cifar-evil-pickle", staged("train", "--set", "study=test-bad-cifar", study=LTH,
                                     data_dir=lambda c: c.cifar_copy("evil")), "refusing to load io.open"),
    Case("cifar-garbage", staged("train", "--set", "study=test-bad-cifar", study=LTH,
                                 data_dir=lambda c: c.cifar_copy("garbage")), "is not a CIFAR-10 batch"),
    Case("cifar-folder-empty", staged("train", "--set", "study=test-bad-cifar", study=LTH,
                                      data_dir=lambda c: c.spool("empty")), "no CIFAR-10 batches"),
    # --------------------------------------------------------------- weights files
    Case("weights-pickled-module", evaluate(lambda c: c.pickled_module(), "--model", "simple_cnn"), "not a plain weights file"),
    Case("weights-junk", evaluate(lambda c: c.text("junk.pt", "this is no checkpoint")), "is not a PyTorch checkpoint"),
    Case("weights-empty-file", evaluate(lambda c: c.text("empty.pt", "")), "is not a PyTorch checkpoint"),
    Case("weights-absent", evaluate(lambda c: str(c.path("absent.pt"))), "no weights file at"),
    Case("checkpoint-spec-keys", evaluate(lambda c: c.checkpoint("spec-keys.pt", spec={"chanels": [8, 16]})),
         "cannot build simple_cnn from {'chanels'"),
    Case("checkpoint-no-model-key", evaluate(lambda c: c.checkpoint("no-model.pt", model=None)), "is a damaged prunelab checkpoint"),
    Case("checkpoint-model-not-name", evaluate(lambda c: c.checkpoint("model-int.pt", model=3)), "is a damaged prunelab checkpoint"),
    Case("checkpoint-spec-not-dict", evaluate(lambda c: c.checkpoint("spec-list.pt", spec=[8, 16])), "is a damaged prunelab checkpoint"),
    Case("checkpoint-no-state", evaluate(lambda c: c.checkpoint("no-state.pt", state_dict=None)), "is a damaged prunelab checkpoint"),
    Case("checkpoint-model-unknown", evaluate(lambda c: c.checkpoint("unknown.pt", model="resnet999")), "unknown model 'resnet999'"),
    Case("checkpoint-360gb", evaluate(lambda c: c.checkpoint("huge.pt", spec={**SimpleCNN().spec(), "channels": [100_000, 100_000]})),
         "GiB of memory, more than the"),
    Case("checkpoint-negative-width", evaluate(lambda c: c.checkpoint("negative.pt", spec={**SimpleCNN().spec(), "channels": [-1, 16]})),
         "cannot build simple_cnn"),
    Case("checkpoint-width-word", evaluate(lambda c: c.checkpoint("word.pt", spec={**SimpleCNN().spec(), "channels": ["a", "b"]})),
         "cannot build simple_cnn"),
    Case("checkpoint-state-mismatch", evaluate(lambda c: c.checkpoint("mismatch.pt", spec={**SimpleCNN().spec(), "channels": [4, 8]})),
         "does not fit simple_cnn"),
    Case("checkpoint-state-not-tensors", evaluate(lambda c: c.checkpoint("not-tensors.pt", state_dict={"a": 1})), "holds no state dict"),
    Case("checkpoint-other-model-flag", evaluate(lambda c: c.checkpoint("ok.pt"), "--model", "conv2"), "holds a simple_cnn checkpoint, not conv2"),
    Case("bare-state-wrong-model", evaluate(lambda c: c.weights("bare.pt", SimpleCNN().state_dict()), "--model", "conv2"),
         "is not a conv2 state dict"),
    Case("bare-state-no-model", evaluate(lambda c: c.weights("bare.pt", SimpleCNN().state_dict())), "does not say which architecture"),
    Case("bare-state-unknown-model", evaluate(lambda c: c.weights("bare.pt", SimpleCNN().state_dict()), "--model", "resnet999"),
         "unknown model 'resnet999'"),
    Case("bare-not-a-state", evaluate(lambda c: c.weights("numbers.pt", {"a": 1, "b": [2]}), "--model", "simple_cnn"), "holds no state dict"),
    Case("bare-list", evaluate(lambda c: c.weights("list.pt", [torch.zeros(2)]), "--model", "simple_cnn"), "holds no state dict"),
    Case("checkpoint-user-factory", evaluate(lambda c: c.checkpoint("user.pt", model="tests.models.never_imported:build",
                                                                  spec={"arguments": {"num_classes": 10}, "input_shape": [1, 28, 28],
                                                                        "widths": {}})),
         "holds a network built by 'tests.models.never_imported:build', code of yours that loading it would import"),
    Case("checkpoint-factory-classes", evaluate(lambda c: c.checkpoint("tv.pt", model="torchvision:resnet18",
                                                                     spec={"arguments": {"num_classes": 10**9}, "input_shape": [1, 28, 28],
                                                                           "widths": {}})),
         "checkpoint's arguments must be num_classes and/or in_channels (whole numbers)"),
    Case("checkpoint-factory-widths", evaluate(lambda c: c.checkpoint("tv-wide.pt", model="torchvision:resnet18",
                                                                    spec={"arguments": {"num_classes": 10}, "input_shape": [1, 28, 28],
                                                                          "widths": {"network.conv1": 1000}})),
         "does not fit torchvision:resnet18: its widths do not come from pruning this network"),
    Case("checkpoint-wrong-input", evaluate(lambda c: c.checkpoint("rgb.pt", spec={**SimpleCNN().spec(), "in_channels": 3},
                                                                 state_dict=SimpleCNN(in_channels=3).state_dict())),
         "does not accept fashionmnist images"),
    Case("checkpoint-wrong-classes", evaluate(lambda c: c.checkpoint("five.pt", spec={**SimpleCNN().spec(), "num_classes": 5},
                                                                   state_dict=SimpleCNN(num_classes=5).state_dict())),
         "predicts 5 classes, fashionmnist has 10"),
    Case("model-ref-nonsense", evaluate(lambda c: "not-a-model"), "is neither a weights file, a run id nor a model URI"),
    Case("model-ref-folder", evaluate(lambda c: str(c.root)), "is neither a weights file, a run id nor a model URI"),
    # --------------------------------------------------------------- runs and model URIs on the server
    Case("run-unknown", evaluate(lambda c: ZERO_RUN), "no run 00000000"),
    Case("runs-uri-unknown-run", evaluate(lambda c: f"runs:/{ZERO_RUN}/model"), "no run 00000000"),
    Case("models-uri-unknown", evaluate(lambda c: "models:/m-doesnotexist"), "cannot load model models:/m-doesnotexist"),
    Case("models-uri-registered-unknown", evaluate(lambda c: "models:/no-such-model/1"), "cannot load model models:/no-such-model/1"),
    Case("runs-uri-unknown-path", evaluate(lambda c: f"runs:/{c.evil_model()[0]}/nothing-here"), "cannot load model runs:/"),
    Case("evil-runs-uri", evaluate(lambda c: f"runs:/{c.evil_model()[0]}/evil"), "is a pickle-format MLflow model"),
    Case("evil-models-uri", evaluate(lambda c: c.evil_model()[1]), "is a pickle-format MLflow model"),
    Case("evil-finetune", staged("finetune", "--set", "study=test-bad-evil", "--model-uri", "{evil}"), "is a pickle-format MLflow model"),
    Case("evil-runs-uri-process", evaluate(lambda c: f"runs:/{c.evil_model()[0]}/evil"), "is a pickle-format MLflow model",
         process=True),
    Case("run-without-model", evaluate(lambda c: c.evil_model()[0]), "logged no final model"),
    # a check of file names alone can be passed: the data folder must hold model.pt2 and nothing else
    Case("evil-beside-empty-pt2", evaluate(lambda c: c.evil_model_beside_pt2()), "is a pickle-format MLflow model"),
    Case("pt2-with-pth-beside", evaluate(lambda c: c.crafted_model("pth-beside-pt2")), "is a pickle-format MLflow model"),
    Case("pt2-with-pth-beside-process", evaluate(lambda c: c.crafted_model("pth-beside-pt2")), "is a pickle-format MLflow model",
         process=True),
    Case("pt2-with-extra-file", evaluate(lambda c: c.crafted_model("extra-file")), "data/ holds model.pt2, notes.txt"),
    Case("pt2-data-elsewhere", evaluate(lambda c: c.crafted_model("data-elsewhere")), "its model data is in '../data'"),
    Case("evil-finetune-beside-pt2", lambda c: ["finetune", "--overrides", TINY, "--set", "study=test-bad-evil",
                                                "--model-uri", c.evil_model_beside_pt2()], "is a pickle-format MLflow model"),
    Case("lottery-round-not-a-number", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{round-abc}", study=LTH,
                                              data_dir=lambda c: str(c.cifar)), "round 'abc'"),
    Case("lottery-round-fraction", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{round-1.5}", study=LTH,
                                          data_dir=lambda c: str(c.cifar)), "round '1.5'"),
    # `prunelab serve` checks the model before it becomes MLflow's server: each row runs in a process
    # of its own, so that a check that let a model through could never replace the test process.
    Case("serve-evil", lambda c: ["serve", f"runs:/{c.evil_model()[0]}/evil"], "is a pickle-format MLflow model", process=True),
    Case("serve-unknown", lambda c: ["serve", "models:/no-such-model@champion"],
         "cannot load model models:/no-such-model@champion", process=True),
    Case("serve-run-without-model", lambda c: ["serve", c.evil_model()[0]], "logged no final model to serve", process=True),
    Case("serve-port-taken", lambda c: ["serve", "models:/m-doesnotexist", "--port", c.silent_server().rsplit(":", 1)[1]],
         "cannot serve on 127.0.0.1:", process=True),
    Case("serve-port-range", lambda c: ["serve", "models:/m-doesnotexist", "--port", "70000"], "--port", process=True),
    Case("prune-unknown-run", staged("prune", "--set", "study=test-bad-prune", "--model-uri", ZERO_RUN), "no run 00000000"),
    Case("lottery-mask-a-list", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{mask-list}", study=LTH,
                                       data_dir=lambda c: str(c.cifar)), "mask.pt is not a mask"),
    Case("lottery-mask-junk", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{mask-junk}", study=LTH,
                                     data_dir=lambda c: str(c.cifar)), "mask.pt is not a weights file (nothing of it was unpickled)"),
    Case("lottery-mask-of-ints", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{mask-ints}", study=LTH,
                                        data_dir=lambda c: str(c.cifar)), "is not a bool tensor"),
    Case("lottery-round-without-run", staged("prune", "--set", "study=test-bad-lth", study=LTH), "needs --model-uri"),
    Case("lottery-round-of-other-run", staged("prune", "--set", "study=test-bad-lth", "--model-uri", "{evil-run}", study=LTH,
                                              data_dir=lambda c: str(c.cifar)), "is not a lottery-ticket round"),
    Case("kmeans-without-weights", staged("prune", "--set", "study=test-bad-kmeans", study=KMEANS), "starts from pretrained weights"),
    Case("kmeans-weights-absent", staged("prune", "--set", "study=test-bad-kmeans", "--set", "kmeans.weights=/nonexistent/r.th",
                                         study=KMEANS, data_dir=lambda c: str(c.cifar)), "no weights file at /nonexistent/r.th"),
    Case("kmeans-weights-junk", staged("prune", "--set", "study=test-bad-kmeans", "--set", "kmeans.weights={junk}",
                                       study=KMEANS, data_dir=lambda c: str(c.cifar)), "is not a PyTorch checkpoint"),
    # --------------------------------------------------------------- pruning that cannot work, refused before pre-training
    Case("filters-per-step-too-many", staged("prune", "--set", "study=test-bad-prune", "--set", "prune.filters_per_step=100"),
         "a step of 100 filters would remove every filter of a layer"),
    Case("target-unreachable", staged("prune", "--set", "study=test-bad-prune", "--set", "prune.target=0.01"),
         "cannot be reached without removing every filter of a layer"),
    Case("ignored-layer-unknown", staged("prune", "--set", "study=test-bad-prune", "--set", "prune.ignored_layers=[features.9]"),
         "prune.ignored_layers names 'features.9', which is no layer of the model"),
    Case("ignored-every-layer", staged("prune", "--set", "study=test-bad-prune", "--set", "prune.ignored_layers=features"),
         "the model has no conv whose filters can be removed outside prune.ignored_layers"),
    # --------------------------------------------------------------- a comparison that cannot be run, before anything trains
    Case("compare-method-unknown", settings("compare.methods=[taylor,magic]", study=COMPARE),
         "unknown criterion 'magic' in compare.methods: choose from bn_scale, fpgm, hessian, l1, l2, random, taylor"),
    Case("compare-methods-empty", settings("compare.methods=[]", study=COMPARE), "compare.methods is empty"),
    Case("compare-ratio-twice", settings("compare.ratios=[2,4,2]", study=COMPARE), "compare.ratios names 2 twice"),
    Case("compare-distill-not-compared", settings("compare.methods=[l1,random]", "compare.distill=[taylor]", study=COMPARE),
         "compare.distill names 'taylor', which compare.methods does not compare"),
    Case("compare-distill-everything", settings("compare.distill=[l1]", "finetune.distill_temperature=4",
                                                "finetune.distill_weight=0.5", study=COMPARE),
         "compare.distill has no plain variant to compare with"),
    Case("compare-ratio-not-above-1", settings("compare.ratios=[0.5,2]", study=COMPARE), "compare.ratios must each be > 1"),
    Case("compare-bn-scale-without-bn", lambda c: ["run", "--study", COMPARE, "--overrides",
                                                   f"{TINY} study=test-bad-compare compare.methods=[l1,bn_scale]"],
         "compare.methods: prune.method bn_scale scores the BatchNorm after each pruned conv"),
    Case("compare-ratio-unreachable", lambda c: ["run", "--study", COMPARE, "--overrides",
                                                 f"{TINY} study=test-bad-compare compare.ratios=[2,32]"],
         "compare.ratios: 32 cannot be reached by simple_cnn (one filter per layer leaves 1/16.10 of its params): "
         "the largest ratio it can reach is 16.10"),
    # --------------------------------------------------------------- networks from factories that do not fit, before any run
    Case("factory-not-a-module", staged("train", "--set", "study=test-bad-factory",
                                        "--set", "model=tests.models.tiny_factory:not_a_module"),
         "the factory returned a dict, not a torch.nn.Module"),
    Case("factory-raises", staged("train", "--set", "study=test-bad-factory", "--set", "model=tests.models.tiny_factory:raises"),
         "calling the factory with {'num_classes': 10} failed: RuntimeError: the factory's own mistake"),
    Case("factory-wrong-classes", staged("train", "--set", "study=test-bad-factory",
                                         "--set", "model=tests.models.tiny_factory:thousand_classes"),
         "the model predicts 1000 classes, fashionmnist has 10 (does tests.models.tiny_factory:thousand_classes take num_classes?)"),
    Case("factory-nothing-prunable", staged("prune", "--set", "study=test-bad-factory",
                                            "--set", "model=tests.models.tiny_factory:no_convs"),
         "the model has no conv whose filters can be removed"),
    Case("factory-nothing-prunable-run", lambda c: ["run", "--overrides", TINY + " study=test-bad-factory-run "
                                                    "model=tests.models.tiny_factory:no_convs"],
         "the model has no conv whose filters can be removed"),
    # --------------------------------------------------------------- pretrained weights (model_weights)
    Case("model-weights-other-network", staged("train", "--set", "study=test-bad-weights", "--set", "model=torchvision:mobilenet_v2",
                                               "--set", "model_weights={resnet18-weights}"),
         "holds the weights of another network (lacks 'features.0.0.weight'"),
    Case("model-weights-absent", staged("train", "--set", "study=test-bad-weights", "--set", "model_weights=/nonexistent/w.pth"),
         "no weights file at /nonexistent/w.pth"),
    Case("model-weights-pickled-module", staged("train", "--set", "study=test-bad-weights", "--set", "model_weights={pickled}"),
         "not a plain weights file"),
    Case("model-weights-default-registered", staged("train", "--set", "study=test-bad-weights", "--set", "model_weights=DEFAULT"),
         "model_weights=DEFAULT names torchvision's weights, which 'simple_cnn' has none of: pass a weights file"),
    Case("model-weights-default-offline", staged("train", "--set", "study=test-bad-weights", "--set", "model=torchvision:resnet18",
                                                 "--set", "model_weights=DEFAULT"),
         "then pass model_weights=PATH (or put it at "),
    # --------------------------------------------------------------- k-means with a network from a factory
    Case("kmeans-factory-stage-unknown", lambda c: ["run", "--study", KMEANS, "--data-dir", str(c.cifar), "--overrides",
                                                    TINY + " study=test-bad-kmeans-any model=torchvision:mobilenet_v2"],
         "no stage 'layer1' in this model: valid ones are features (or any module holding convs"),
    Case("kmeans-factory-nothing-to-merge", lambda c: ["run", "--study", KMEANS, "--data-dir", str(c.cifar), "--overrides",
                                                       TINY + " study=test-bad-kmeans-any kmeans.stages=[block] "
                                                       "model=tests.models.tiny_factory:build"],
         "has no conv whose channels k-means can merge exactly"),
    Case("kmeans-factory-bare-weights", staged("prune", "--set", "study=test-bad-kmeans-any", "--set", "model=torchvision:resnet18",
                                               "--set", "kmeans.weights={resnet18-weights}", study=KMEANS,
                                               data_dir=lambda c: str(c.cifar)),
         "is a bare state dict, which does not say the input shape or widths"),
    Case("torchvision-aux-outputs", staged("train", "--set", "study=test-bad-factory", "--set", "model=torchvision:googlenet"),
         "model 'torchvision:googlenet' returns a GoogLeNetOutputs while training, not a tensor of class scores"),
    Case("torchvision-images-too-small", staged("train", "--set", "study=test-bad-factory", "--set", "model=torchvision:vgg11"),
         "model 'torchvision:vgg11' cannot take fashionmnist's images of 28 x 28 px: it needs at least 32 x 32"),
    Case("lr-nan-process", settings("train.lr=.nan"), "train.lr must be > 0", process=True),
    # --------------------------------------------------------------- reports and output folders
    Case("report-no-runs", lambda c: ["report", "--set", "study=test-bad-never-ran"], "no finished train or finetune runs"),
    Case("report-out-is-file", lambda c: ["report", "--set", "study=test-bad-never-ran", "--out", c.a_file()], "is a file, not a folder"),
    Case("report-out-under-file", lambda c: ["report", "--set", "study=test-bad-never-ran", "--out", c.a_file() + "/sub"],
         "cannot be created"),
    Case("report-out-unwritable", lambda c: ["report", "--set", "study=test-bad-never-ran", "--out", "/proc/prunelab-report"],
         "is not writable"),
    Case("run-out-is-file", lambda c: ["run", "--overrides", TINY + " study=test-bad-run", "--out", c.a_file()],
         "is a file, not a folder"),
    Case("report-study-escapes-process", lambda c: ["report", "--set", "study=../../escaped"], "is not allowed", process=True),
    # --------------------------------------------------------------- steps on Kubernetes (checked before any connection)
    Case("kube-no-config", lambda c: ["run", "--tracking-uri", DEAD, "--backend", "kubernetes"], "needs --backend-config FILE"),
    Case("kube-config-without-backend", lambda c: ["run", "--tracking-uri", DEAD, "--backend-config", kube_config(c)],
         "--backend-config is read only with --backend kubernetes"),
    Case("kube-config-absent", kube_run(lambda c: str(c.path("absent.json"))), "No such file or directory"),
    Case("kube-config-not-json", kube_run(lambda c: c.text("kube-bad.json", "{nope")), "is not JSON"),
    Case("kube-config-list", kube_run(lambda c: c.text("kube-list.json", "[]")), "is not a JSON object"),
    Case("kube-config-lacks-template", kube_run(lambda c: c.text("kube-lacks.json", '{"repository-uri": "r.example/p"}')),
         "lacks 'kube-job-template-path'"),
    Case("kube-template-absent", kube_run(lambda c: kube_config(c, **{"kube-job-template-path": str(c.path("absent.yaml"))})),
         "No such file or directory"),
    Case("kube-template-not-a-job", kube_run(lambda c: kube_config(c, **{"kube-job-template-path": c.text("job.yaml", "kind: Job\n")})),
         "is not a Kubernetes Job with a container"),
    Case("kube-image-empty", kube_run(lambda c: kube_config(c, image="")), "'image' must name the step image"),
    Case("kube-tracking-loopback", kube_run(lambda c: kube_config(c)), "pods cannot reach the tracking server at http://127.0.0.1:9"),
    Case("kube-study-file", kube_run(lambda c: kube_config(c), "--study", "{preset}"), "cannot read the preset file"),
    # --------------------------------------------------------------- sync
    Case("sync-absent", lambda c: ["sync", str(c.path("no-such-spool"))], "is not a spooled run"),
    Case("sync-not-spool", lambda c: ["sync", c.spool("empty")], "is not a spooled run"),
    Case("sync-garbage", lambda c: ["sync", c.spool("garbage")], "cannot be read (JSONDecodeError)"),
    Case("sync-foreign", lambda c: ["sync", c.spool("foreign")], "is not a prunelab spool record"),
    Case("sync-incomplete", lambda c: ["sync", c.spool("incomplete")], "is not a valid spool record: tracking_uri is 5, not a URI"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tracking_uri, client, fashion_dir, dogs_cats_dir, cifar_dir):
    made = Inputs(tmp_path_factory.mktemp("bad-inputs"), fashion_dir, dogs_cats_dir, cifar_dir, tracking_uri)
    made.spool("empty")
    made.evil_model()  # logged here, so MLflow's warning about pickle is not any row's output
    made.evil_model_beside_pt2()
    sys.path.insert(0, str(made.root))  # where MARKER_MODULE is written: importable, as any installed module is
    yield made
    sys.path.remove(str(made.root))
    assert not made.marker.exists(), "a bad input ran code it carried"


def running_runs(client) -> set[str]:
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")}


def all_runs(client) -> set[str]:
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id for r in client.search_runs(ids, run_view_type=ViewType.ALL, max_results=50_000)}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def argv_of(case: Case, inputs: Inputs) -> list[str]:
    argv = case.argv(inputs)
    subs = {"{evil}": lambda: f"runs:/{inputs.evil_model()[0]}/evil", "{evil-run}": lambda: inputs.evil_model()[0],
            "{junk}": lambda: inputs.text("junk.pt", "this is no checkpoint"),
            "{resnet18-weights}": lambda: inputs.torchvision_weights("resnet18"), "{pickled}": inputs.pickled_module,
            "{round-abc}": lambda: inputs.round_run("abc"),
            "{mask-list}": lambda: inputs.mask_round("list"), "{mask-junk}": lambda: inputs.mask_round("junk"),
            "{mask-ints}": lambda: inputs.mask_round("ints"), "{round-1.5}": lambda: inputs.round_run("1.5")}
    out = []
    for a in argv:
        for key, value in subs.items():
            if key in a:
                a = a.replace(key, value())
        out.append(a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line(case, inputs, client, tmp_path, monkeypatch, capsys):
    work, cache, spool = tmp_path / "work", tmp_path / "cache", tmp_path / "spool"
    work.mkdir()
    monkeypatch.chdir(work)  # a report would write reports/<study> here
    monkeypatch.setenv("PRUNELAB_CACHE", str(cache))
    monkeypatch.setenv("PRUNELAB_SPOOL", str(spool))
    argv = argv_of(case, inputs)  # may log what the row refers to (a model, a run): before the count
    runs_before, running_before = all_runs(client), running_runs(client)
    env = {key: value.replace("{root}", str(inputs.root)) for key, value in case.env}
    with environment(env):  # only while prunelab runs: the counts' own client must not read them
        if case.process:
            python_path = os.pathsep.join([str(inputs.root), os.environ.get("PYTHONPATH", "")])
            proc = subprocess.run([sys.executable, "-m", "prunelab", *argv], capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "PYTHONPATH": python_path}, cwd=work)
            code, err = proc.returncode, proc.stderr
        else:
            code = cli.main(argv)
            err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: "), err[-3000:]
    assert "Traceback" not in err
    assert case.needle in lines[0], lines[0]
    assert len(lines[0]) <= len("prunelab: error: ") + MAX_MESSAGE
    assert code == 2, f"exit code {code}, not 2"
    assert all_runs(client) - runs_before == set(), "a run was created"
    assert running_runs(client) - running_before == set(), "a run was left RUNNING"
    assert not inputs.marker.exists(), "a bad input ran code it carried"
    assert list(work.iterdir()) == [], "something was written to the working folder"
    assert not list(tmp_path.rglob("*.part")), "a half-written file was left"
    assert not spool.exists(), "a run was spooled"
    if case.absent is not None:
        assert not case.absent(inputs).exists(), "a refused input created a path"


def test_the_table_is_large_enough():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
