"""`prunelab train|prune|finetune|report|run|evaluate|settings`.

Errors the user can fix print as one line and exit 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pathlib import Path

from prunelab import data, studies, tracking
from prunelab.config import DEFAULT_STUDY, DataConfig
from prunelab.errors import PrunelabError
from prunelab.models import is_registered
from prunelab.studies.common import check_fits, for_users
from prunelab.study import STEP_RUNNERS, run_study
from prunelab.train import evaluate


def _common(p: argparse.ArgumentParser, trial: bool = True) -> None:
    p.add_argument("--study", default=DEFAULT_STUDY, help="study preset name or YAML file (default: %(default)s)")
    p.add_argument("--overrides", default="", help="space-separated KEY=VALUE settings, e.g. 'train.epochs=2 data.n_train=5000'")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="one setting (repeatable)")
    p.add_argument("--data-dir", default="", help="folder holding the data set (default: search, then download)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000)")
    if trial:
        p.add_argument("--trial", type=int, default=0, help="trial number; its seed is seed + trial (default: 0)")
    p.add_argument("--weights", default="", help="transfer_pruning studies: local pretrained state-dict file "
                   "(same as transfer.weights=PATH; other kinds refuse it)")
    p.add_argument("--no-pretrained", action="store_true", help="transfer_pruning studies: random initial features "
                   "(same as transfer.pretrained=false)")
    p.add_argument("--system-metrics", action="store_true", help="also log CPU, memory (and GPU) use as system/... "
                   "metrics of every run, every 10 s (needs psutil)")


def _overrides(args) -> list[str]:
    """--overrides, --set and the setting flags, as one list of KEY=VALUE (flags become
    overrides so that `mlflow run` can pass them as -P overrides=... too)."""
    out = args.overrides.split() + list(args.sets)
    if getattr(args, "weights", ""):
        out.append(f"transfer.weights={os.path.abspath(args.weights)}")  # stages may run in another folder
    if getattr(args, "no_pretrained", False):
        out.append("transfer.pretrained=false")
    return out


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="prunelab", description="Pruning studies for convolutional networks, tracked in MLflow.")
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch")
    _common(p)
    p = sub.add_parser("prune", help="prune a trained model (trains one when --model-uri is not given)")
    _common(p)
    p.add_argument("--model-uri", default="", help="run id, model URI (runs:/…, models:/…) or weights file")
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model")
    _common(p)
    p.add_argument("--model-uri", required=True, help="run id, model URI or weights file")
    p = sub.add_parser("report", help="draw the study's figures from its runs")
    _common(p, trial=False)
    p.add_argument("--out", default="", help="also write the figures here (default: reports/<study>)")
    p = sub.add_parser("run", help="the whole study: every trial's stages, then the report")
    _common(p, trial=False)
    p.add_argument("--out", default="", help="where the report writes its figures (default: reports/<study>)")
    p.add_argument("--steps", default="in-process", choices=STEP_RUNNERS,
                   help="run each step in this process (default; ~10 s less per step) or as a `mlflow run` "
                        "process of its own (as `mlflow run -e <entry point>` does)")
    p = sub.add_parser("evaluate", help="print test loss and accuracy of a model as JSON; logs nothing")
    p.add_argument("model", help="model URI, run id or weights file")
    p.add_argument("--dataset", required=True, help="dataset registry name")
    p.add_argument("--data-dir", default="", help="folder holding the data set")
    p.add_argument("--model", dest="model_name", default=None, help="architecture of a weights file without one")
    p.add_argument("--n-test", type=int, default=0, help="score only the first N test images (0: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server, for run ids and model URIs")
    sub.add_parser("settings", help="list every setting a preset or override may set, with its help")
    return top


def _config(args):
    overrides = _overrides(args)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return studies.load_config(args.study, overrides)  # bad settings fail before any connection


def dispatch(args) -> int:
    if args.command == "settings":
        for key, text in studies.field_help().items():
            print(f"{key:34s} {text}")
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    cfg = _config(args)
    if args.system_metrics:
        tracking.system_metrics()  # refused in one line, before any run, when psutil is missing
    tracking.connect(args.tracking_uri)
    if args.command == "run":
        run_study(args.study, " ".join(_overrides(args)), args.data_dir, args.out, args.steps)
        return 0
    if args.command == "report":
        run_id = studies.report(cfg, args.out or f"reports/{cfg.study}")
    else:  # what each entry point means depends on the study's kind
        run_id = studies.get(cfg.kind).run(args.command, cfg, args.trial, getattr(args, "model_uri", None) or None)
    print(f"prunelab: {args.command} run {run_id} finished", flush=True)
    return 0


def _evaluate(args) -> int:
    cfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, n_test=max(args.n_test, 0))
    if not Path(args.model).is_file():
        tracking.connect(args.tracking_uri)
    model = tracking.load_model(args.model, args.model_name)
    dataset = data.get(cfg)
    if is_registered(model):  # a bare network (weights file, a run's checkpoint): its data set's normalisation first
        model = for_users(model, dataset)
    # Every logged model takes float pixels in [0, 1] and normalises them itself.
    check_fits(model, dataset, dataset.pixels)
    result = evaluate(model, dataset.test_x, dataset.test_y, dataset.pixels)
    print(json.dumps({"loss": round(result["loss"], 6), "accuracy": round(result["accuracy"], 6), "n": result["n"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Quiet MLflow's own chatter; our one-line messages say what matters.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not args.debug:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return dispatch(args)
    except PrunelabError as exc:
        if args.debug:
            raise
        print(f"prunelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
