"""`prunelab train|prune|finetune|report|run|evaluate|serve|sync|settings`.

Errors the user can fix print as one line and exit 2; `--debug` shows the
traceback instead. A library's warnings raised while the input is still being
checked are held until the first run starts, so a refused input prints its one
line alone. SIGTERM and SIGHUP stop the command like Ctrl-C does: the
run in progress ends FAILED and the exit code is 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import Iterator

from prunelab import config, files, paths, studies
from prunelab.config import DEFAULT_STUDY, MAX_SEED, DataConfig, check_range, preset_file
from prunelab.errors import ConfigError, HeldWarnings, NothingToDraw, PrunelabError, Stopped, one_line
from prunelab.models import is_rebuildable
from prunelab.pipeline.kubernetes import kubernetes_backend
from prunelab.pipeline.study import STEP_RUNNERS, StudyArgs, run_study
from prunelab.studies.common import Flag, check_fits, for_users, read_data
from prunelab.tracking import connection, loading, query, serving, sync
from prunelab.tracking.run import check_handed_run
from prunelab.tracking.spool import Spool
from prunelab.train import evaluate


def _common(p: argparse.ArgumentParser, trial: bool = True, studies_many: bool = False) -> None:
    if studies_many:
        p.add_argument("--study", dest="studies", action="append", default=[], metavar="STUDY",
                       help=f"study preset name or YAML file (default: {DEFAULT_STUDY}); repeat it for several studies")
    else:
        p.add_argument("--study", default=DEFAULT_STUDY, help="study preset name or YAML file (default: %(default)s)")
    p.add_argument("--overrides", default="", help="space-separated KEY=VALUE settings, e.g. 'train.epochs=2 data.n_train=5000'")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="one setting (repeatable)")
    p.add_argument("--data-dir", default="", help="folder holding the data set (default: search, then download)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000)")
    if trial:
        p.add_argument("--trial", type=int, default=0, help="trial number; its seed is seed + trial (default: 0)")
    for kind, flag in kind_flags():
        p.add_argument(flag.option, action=flag.action, default=False if flag.action == "store_true" else "",
                       help=f"{kind} studies: {flag.help}; other kinds refuse it")
    p.add_argument("--system-metrics", action="store_true", help="also log CPU, memory (and GPU) use as system/... "
                   "metrics of every run, every 10 s (needs psutil)")


def kind_flags() -> list[tuple[str, Flag]]:
    """(kind, flag) of every study kind's own flags, each option once."""
    seen: dict[str, tuple[str, Flag]] = {}
    for kind in studies.KINDS.values():
        for flag in kind.flags:
            seen.setdefault(flag.option, (kind.name, flag))
    return list(seen.values())


def _overrides(args) -> list[str]:
    """--overrides, --set and the kinds' flags, as one list of KEY=VALUE (flags become
    overrides so that `mlflow run` can pass them as -P overrides=... too)."""
    out = args.overrides.split() + list(args.sets)
    for _, flag in kind_flags():
        setting = flag.override(getattr(args, flag.dest, None))
        if setting is not None:
            out.append(setting)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line too (the usage is one `--help` away)."""

    def error(self, message: str):
        raise PrunelabError(f"{message} (see `{self.prog} --help`)")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="prunelab", description="Pruning studies for convolutional networks, tracked in MLflow.")
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch")
    _common(p)
    p = sub.add_parser("prune", help="prune a trained model (trains one when --model-uri is not given)")
    _common(p)
    p.add_argument("--model-uri", default="", help="run id, model URI (runs:/…, models:/…) or weights file "
                   "(empty: train one, as MLproject's prune passes it when model_uri is not given)")
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model")
    _common(p)
    p.add_argument("--model-uri", required=True, help="run id, model URI or weights file")
    p = sub.add_parser("report", help="draw the study's figures from its runs")
    _common(p, trial=False, studies_many=True)
    p.add_argument("--out", default="", help="also write the figures here (default: reports/<study>); with several "
                   "studies it must hold {study}, which each study's name replaces")
    p = sub.add_parser("run", help="the whole study: every trial's stages, then the report")
    _common(p, trial=False)
    p.add_argument("--out", default="", help="where the report writes its figures (default: reports/<study>)")
    p.add_argument("--steps", default="in-process", choices=STEP_RUNNERS,
                   help="run each step in this process (default; ~10 s less per step) or as a `mlflow run` "
                        "process of its own (as `mlflow run -e <entry point>` does)")
    p.add_argument("--backend", default="local", choices=("local", "kubernetes"),
                   help="where the steps run: here (default), or as Kubernetes Jobs through MLflow Projects "
                        "(needs --backend-config; the registry and the report still run here)")
    p.add_argument("--backend-config", default=None, metavar="FILE",
                   help="MLflow's Kubernetes backend config (JSON; deploy/kubernetes/backend-config.json)")
    p = sub.add_parser("evaluate", help="print test loss and accuracy of a model as JSON; logs nothing. A model a "
                       "run made is scored on the data settings that run logged (data set, folder, image size, "
                       "test subset) unless told otherwise")
    p.add_argument("model", help="model URI, run id or weights file")
    p.add_argument("--dataset", default=None, help="dataset registry name (default: the run's; needed for a weights file)")
    p.add_argument("--data-dir", default=None, help="folder holding the data set (default: the run's)")
    p.add_argument("--model", dest="model_name", default=None, help="architecture of a weights file without one; for a "
                   "model built by your own factory (PACKAGE.MODULE:FUNCTION), that factory, which is then imported")
    p.add_argument("--n-test", type=int, default=None, help="score only the first N test images (0: all; default: "
                   "the run's data.n_test, else all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="data.KEY=VALUE",
                   help="one data setting (repeatable), e.g. data.image_size=32")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server, for run ids and model URIs")
    p = sub.add_parser("serve", help="serve a logged model over HTTP with MLflow's scoring server "
                       "(`mlflow models serve`, with this environment's uvicorn)")
    p.add_argument("model", help="model URI (models:/<study>@champion, models:/m-…) or run id")
    p.add_argument("--port", type=int, default=serving.DEFAULT_PORT, help="port to listen on (default: %(default)s; "
                   "the tracking server of `make server` has 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server the model is on (default: "
                   "$MLFLOW_TRACKING_URI or http://127.0.0.1:5000)")
    p = sub.add_parser("sync", help="upload a run kept on disk while the tracking server was gone")
    p.add_argument("folder", help="the folder named by the error that said the server stopped answering")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or "
                   "http://127.0.0.1:5000; never the one the folder names, which anyone could have written)")
    sub.add_parser("settings", help="list every setting a preset or override may set, with its help")
    return top


def _from_here(args) -> None:
    """A preset file or data folder on the command line is relative to the folder the
    command was typed in; the steps of a study may run elsewhere (a `mlflow run` process
    runs in the project's folder), so those paths travel absolute (--out too, below).
    URIs stay as they are."""
    if preset_file(args.study) is not None:  # checked: an existing .yaml file, or a plain preset name
        args.study = os.path.abspath(args.study)
    # On a cluster, a data folder is one inside the step's container, as typed.
    if args.data_dir and not paths.is_uri(args.data_dir) and getattr(args, "backend", "local") == "local":
        args.data_dir = os.path.abspath(args.data_dir)


def _config(args):
    _from_here(args)
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
    if args.command == "sync":
        return _sync(args)
    if args.command == "serve":
        check_range("--port", args.port, 1, 65535, hint="a TCP port")
        serving.serve(args.model, args.port, args.host, args.tracking_uri)  # returns only by raising
        return 2
    if args.command == "report":
        return _report(args)
    model_uri = getattr(args, "model_uri", None) or None  # prune: empty is "train one"
    if args.command == "finetune" and not (model_uri or "").strip():
        raise ConfigError("--model-uri is empty: pass the run id, model URI (runs:/…, models:/…) or weights file "
                          "of the model to fine-tune")
    cfg = _config(args)
    if hasattr(args, "trial"):
        # Every seed a stage derives from seed + trial must stay a valid seed.
        check_range("--trial", args.trial, 0, MAX_SEED - cfg.seed, hint="trials are numbered from 0")
    if hasattr(args, "out"):
        args.out = os.path.abspath(args.out or report_dir(cfg.study))
        files.check_writable(args.out, "--out")  # before a step runs, not after the whole study
    if args.system_metrics:
        connection.system_metrics()  # refused in one line, before any run, when psutil is missing
    cluster = _cluster(args) if args.command == "run" else None  # before any connection, like the settings
    connection.connect(args.tracking_uri)
    check_handed_run(cfg.study)  # under `mlflow run`: its run must be in the study's experiment
    if args.command == "run":
        run_study(StudyArgs(args.study, " ".join(_overrides(args)), args.data_dir, args.out, args.steps), cfg, cluster)
        return 0
    # What each entry point means depends on the study's kind.
    run_id = studies.get(cfg.kind).run(args.command, cfg, args.trial, model_uri)
    print(f"prunelab: {args.command} run {run_id} finished", flush=True)
    return 0


def _report(args) -> int:
    """`prunelab report`: each study given, in turn. A study without runs on the server is one
    line naming the `prunelab run` that makes them (the study, settings, data folder and server
    as given here); with several studies the others are still drawn, those without runs are
    named, and the command fails only when none could be drawn."""
    given = args.studies or [DEFAULT_STUDY]
    if len(given) > 1 and args.out and "{study}" not in args.out:
        raise PrunelabError(f"--out {args.out} would hold the figures of {len(given)} studies: put {{study}} in it, "
                            "which each study's name replaces (e.g. --out 'resources/figures/{study}')")
    reports = []
    for study in given:  # every study's settings and folder checked before any connection
        args.study = study
        cfg = _config(args)
        out = os.path.abspath(args.out.replace("{study}", cfg.study) if args.out else report_dir(cfg.study))
        files.check_writable(out, "--out")
        command = StudyArgs(args.study, " ".join(_overrides(args)), args.data_dir).command(args.tracking_uri)
        reports.append((cfg, out, command))
    if args.system_metrics:
        connection.system_metrics()
    connection.connect(args.tracking_uri)
    missing: list[NothingToDraw] = []
    for cfg, out, command in reports:
        check_handed_run(cfg.study)  # under `mlflow run -e report`: its run must be in the study's experiment
        try:
            run_id = studies.report(cfg, out, command)
        except NothingToDraw as exc:
            if len(reports) == 1:
                raise
            missing.append(exc)
            continue
        print(f"prunelab: report run {run_id} finished: {cfg.study} drawn into {out}", flush=True)
    if len(missing) == len(reports) > 1:
        raise PrunelabError(f"the tracking server {connection.tracking_uri()} has no finished runs of any of the studies "
                            f"{', '.join(exc.study for exc in missing)} at these settings: run one first "
                            f"(`{missing[0].command}`)")
    for exc in missing:
        print(f"prunelab: not drawn: {exc}", file=sys.stderr, flush=True)
    return 0


def _cluster(args) -> dict | None:
    """The checked Kubernetes backend config of `run --backend kubernetes`, else None."""
    if args.backend == "local":
        if args.backend_config:
            raise PrunelabError("--backend-config is read only with --backend kubernetes")
        return None
    if preset_file(args.study) is not None:
        raise PrunelabError(f"--backend kubernetes: the Jobs cannot read the preset file {args.study} on this machine: "
                            "use a preset shipped with prunelab (prunelab settings lists the keys) and --overrides")
    return kubernetes_backend(args.backend_config, args.tracking_uri or connection.tracking_uri())


def report_dir(study: str) -> str:
    """Where a report writes its figures when no --out is given (study names cannot leave it)."""
    return f"reports/{study}"


def _sync(args) -> int:
    spooled = Spool.open(args.folder)  # the whole folder checked before any connection
    # The server is the user's choice alone: a folder naming its own could send the user's run
    # (and its credentials) anywhere. The one it names is only mentioned when it differs.
    uri = args.tracking_uri or connection.tracking_uri()
    named = spooled.record["tracking_uri"]
    hint = f" (the folder names {named}: pass --tracking-uri {named} if that is the server you mean)" \
        if named != uri else ""
    try:
        connection.connect(uri)
    except PrunelabError as exc:
        raise type(exc)(f"{exc}{hint}") from None
    run_id, uploaded = sync.sync(spooled)
    if uploaded:
        print(f"prunelab: synced {args.folder} to run {run_id} on {uri}{hint}", flush=True)
    else:
        print(f"prunelab: {args.folder} was already synced to run {run_id}", flush=True)
    return 0


# The data settings a model's run logged that say what its test images were; how it trained
# (n_train, val_size, augment) does not change how it is scored.
SCORED_ON = ("dataset", "data_dir", "n_test", "image_size")


def _evaluate(args) -> int:
    if args.n_test is not None:
        check_range("--n-test", args.n_test, 0, hint="the number of test images to score, 0 for all")
    weights = loading.weights_file(args.model)
    if weights is None:  # a run id or model URI: the server holds it
        connection.connect(args.tracking_uri)
    made_with = _made_with(args.model) if weights is None else {}
    flags = {"dataset": args.dataset, "data_dir": args.data_dir, "n_test": args.n_test}
    raw = config.apply_overrides({"data": {**made_with, **{k: v for k, v in flags.items() if v is not None}}},
                                 args.sets)
    if not raw["data"].get("dataset"):
        raise ConfigError(f"{args.model} names no run that says what data it was made on: pass --dataset "
                          "(and --data-dir, --set data.image_size=N as the model needs)")
    cfg = config.data_settings(raw)
    model = loading.load_model(args.model, args.model_name)
    dataset = read_data(cfg)
    if is_rebuildable(model):  # a bare network (weights file, a run's checkpoint): its data set's normalisation first
        model = for_users(model, dataset)
    # Every logged model takes float pixels in [0, 1] and normalises them itself.
    check_fits(model, dataset, dataset.pixels)
    result = evaluate(model, dataset.test_x, dataset.test_y, dataset.pixels)
    print(json.dumps({"loss": round(result["loss"], 6), "accuracy": round(result["accuracy"], 6), "n": result["n"]}))
    return 0


def _made_with(ref: str) -> dict:
    """The data settings the run that made `ref` logged (`SCORED_ON`), as settings."""
    run_id = loading.source_run(ref)
    if run_id is None:
        return {}
    params = query.get_run(run_id).data.params
    fields = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    out = {}
    for key in SCORED_ON:
        if f"data.{key}" in params:
            try:  # MLflow keeps params as text: each is read back as its setting's type
                out[key] = type(fields[key])(params[f"data.{key}"])
            except ValueError:
                raise ConfigError(f"run {run_id} logged data.{key}={params[f'data.{key}']!r:.60}, which is no "
                                  f"{type(fields[key]).__name__}: pass --set data.{key}=VALUE") from None
    return out


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` where the process is, so every run in
    progress ends FAILED on the way out; a repeat while stopping is ignored so
    that the cleanup finishes. The previous handlers come back afterwards."""
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    # Quiet MLflow's own chatter; our one-line messages say what matters.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not debug:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    with HeldWarnings() as held:  # a library's warnings before a refusal: the refusal's one line alone
        return _run(argv, debug, held)


def _run(argv: list[str] | None, debug: bool, held: HeldWarnings) -> int:
    try:
        with signals_stop():
            code = dispatch(parser().parse_args(argv))
            sys.stdout.flush()  # a reader that went away shows here, not in Python's exit
            return code
    except BrokenPipeError:
        # The reader of the output went away (`prunelab settings | head`): stop quietly, as
        # Unix tools do (they die of SIGPIPE: exit 141). Whatever is still buffered for it goes
        # nowhere, so Python's exit does not fail on it again. A run in progress ended FAILED.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except PrunelabError as exc:
        if debug:
            raise
        held.drop()
        print(f"prunelab: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        held.release()  # not a refusal: what was held comes before the last line
        print("prunelab: interrupted; any run in progress was marked FAILED", file=sys.stderr)
        return 130
    except Stopped as exc:
        held.release()
        print(f"prunelab: error: stopped by {exc.name}; any run in progress was marked FAILED", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        held.release()
        # A tracking server that went away mid-command is the user's to fix, not a bug.
        gone = None if debug else connection.outage(exc)
        if gone is None:
            raise
        print(f"prunelab: error: {one_line(str(gone))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
