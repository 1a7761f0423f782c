"""The table of bad inputs: every one is refused with one line on stderr
(`prunelab: error: ...`), a non-zero exit, no traceback, no run left RUNNING on
the server and nothing half-written (no report folder, no partial file in the
caches, nothing spooled). Most rows call the real CLI entry function in-process,
a few run `python -m prunelab` as a user would; all of them stop before any
training starts."""

from __future__ import annotations

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

from prunelab import checkpoints, cli
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import probe

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: settings must fail before any connection
TINY = "data.n_train=600 data.n_test=200 train.epochs=1 trials=1"
FORMAT = checkpoints.FORMAT


class Inputs:
    """The files and servers the rows refer to, made once for the whole table."""

    def __init__(self, root: Path, fashion_dir: Path, dogs_cats_dir: Path, cifar_dir: Path, tracking_uri: str):
        self.root, self.fashion, self.dogs_cats, self.cifar, self.uri = root, fashion_dir, dogs_cats_dir, cifar_dir, tracking_uri
        self.marker = root / "code-ran"  # the evil model's __reduce__ would create it
        self._made: dict[str, object] = {}
        self.running: set[str] = set()  # the RUNNING runs on the server after the previous row

    def once(self, key: str, make: Callable[[], object]):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------ files

    def text(self, name: str, content: str) -> str:
        return str(self.once(name, lambda: _write(self.path(name), content)))

    def a_file(self) -> str:
        return self.text("a-file.txt", "not a folder\n")

    def weights(self, name: str, payload) -> str:
        def make():
            torch.save(payload, self.path(name))
            return self.path(name)
        return str(self.once(name, make))

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

    def evil_model(self) -> tuple[str, str]:
        """(run id, models:/ URI) of a pickle-format MLflow model whose unpickling would create `marker`."""
        def make():
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            experiment = mlflow.set_experiment("test-bad-inputs-evil")
            with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
                # pip_requirements given: MLflow would otherwise load (unpickle) the model to infer them.
                info = mlflow.pytorch.log_model(_EvilModule(self.marker), name="evil", serialization_format="pickle",
                                                pip_requirements=["torch"])
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            assert not self.marker.exists(), "logging the model must not run it"
            return run.info.run_id, info.model_uri
        return self.once("evil", make)


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
    env: tuple[tuple[str, str], ...] = ()


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
    Case("factory-on-lottery", settings("model=torchvision:resnet18", study="lth-conv2-cifar10-quick"),
         "cannot be used in a lottery_ticket study: networks from a factory are pruned by filter_pruning studies"),
    Case("ignored-layers-number", settings("prune.ignored_layers=3"), "prune.ignored_layers must be a list of layer names"),
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
    Case("latency-repeats-negative", settings("prune.latency_repeats=-1"), "prune.latency_repeats must be >= 0"),
    Case("rank-batch-zero", settings("prune.rank_batch_size=0"), "prune.rank_batch_size must be >= 1"),
    Case("epochs-zero", settings("train.epochs=0"), "train.epochs must be >= 1"),
    Case("epochs-negative", settings("train.epochs=-3"), "train.epochs must be >= 1"),
    Case("epochs-word", settings("train.epochs=abc"), "train.epochs must be a int"),
    Case("epochs-fraction", settings("train.epochs=1.5"), "train.epochs must be a int"),
    Case("epochs-bool", settings("train.epochs=true"), "train.epochs must be a int"),
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
    Case("seed-fraction", settings("seed=1.5"), "seed must be a int"),
    Case("trials-zero", settings("trials=0"), "trials must be in [1, 10000]"),
    Case("trials-negative", settings("trials=-2"), "trials must be in [1, 10000]"),
    Case("trials-huge", settings("trials=1000000"), "trials must be in [1, 10000]"),
    Case("study-empty", settings("study="), "study name '' is not allowed"),
    Case("study-escapes", settings("study=../../escaped"), "study name '../../escaped' is not allowed"),
    Case("study-slash", settings("study=a/b"), "study name 'a/b' is not allowed"),
    Case("study-space", settings("study=has space"), "study name 'has space' is not allowed"),
    Case("study-hidden", settings("study=.hidden"), "study name '.hidden' is not allowed"),
    Case("study-too-long", settings("study=" + "x" * 101), "is not allowed"),
    Case("study-number", settings("study=[1, 2]"), "study name '[1, 2]' is not allowed"),
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
    # --------------------------------------------------------------- the command line itself
    Case("trial-negative", lambda c: ["train", "--tracking-uri", DEAD, "--trial", "-1"], "--trial must be in [0,"),
    Case("trial-huge", lambda c: ["train", "--tracking-uri", DEAD, "--trial", "4294967296"], "--trial must be in [0,"),
    Case("trial-word", lambda c: ["train", "--trial", "abc"], "argument --trial: invalid int value: 'abc'"),
    Case("command-unknown", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("command-missing", lambda c: [], "the following arguments are required: command"),
    Case("finetune-without-model", lambda c: ["finetune"], "the following arguments are required: --model-uri"),
    Case("evaluate-without-dataset", lambda c: ["evaluate", "x.pt"], "the following arguments are required: --dataset"),
    Case("flag-unknown", lambda c: ["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    Case("n-test-negative-flag", evaluate(lambda c: c.checkpoint("ok.pt"), "--n-test", "-5"), "--n-test must be >= 0"),
    Case("evaluate-dataset-unknown", lambda c: ["evaluate", c.checkpoint("ok.pt"), "--dataset", "mnist3d"], "unknown dataset 'mnist3d'"),
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
    Case("prune-unknown-run", staged("prune", "--set", "study=test-bad-prune", "--model-uri", ZERO_RUN), "no run 00000000"),
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
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tracking_uri, client, fashion_dir, dogs_cats_dir, cifar_dir):
    made = Inputs(tmp_path_factory.mktemp("bad-inputs"), fashion_dir, dogs_cats_dir, cifar_dir, tracking_uri)
    made.spool("empty")
    made.evil_model()  # logged here, so MLflow's warning about pickle is not any row's output
    made.running = running_runs(client)  # each row compares with the state the previous row left
    yield made
    assert not made.marker.exists(), "a bad input ran code it carried"


def running_runs(client) -> set[str]:
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")}


def argv_of(case: Case, inputs: Inputs) -> list[str]:
    argv = case.argv(inputs)
    subs = {"{evil}": lambda: f"runs:/{inputs.evil_model()[0]}/evil", "{evil-run}": lambda: inputs.evil_model()[0],
            "{junk}": lambda: inputs.text("junk.pt", "this is no checkpoint")}
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
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    argv = argv_of(case, inputs)
    if case.process:
        proc = subprocess.run([sys.executable, "-m", "prunelab", *argv], capture_output=True, text=True, timeout=300,
                              env={**os.environ}, cwd=work)
        code, err = proc.returncode, proc.stderr
    else:
        code = cli.main(argv)
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: "), err[-3000:]
    assert "Traceback" not in err
    assert case.needle in lines[0], lines[0]
    after = running_runs(client)
    left, inputs.running = after - inputs.running, after
    assert left == set(), "a run was left RUNNING"
    assert not inputs.marker.exists(), "a bad input ran code it carried"
    assert list(work.iterdir()) == [], "something was written to the working folder"
    assert not list(tmp_path.rglob("*.part")), "a half-written file was left"
    assert not spool.exists(), "a run was spooled"


def test_the_table_is_large_enough():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
