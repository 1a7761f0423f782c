"""The CLI as a user meets it. Bad input: one line saying what was wrong and what to do, exit 2,
no traceback, no run left RUNNING (most cases call the real CLI entry function in-process);
output into a pipe: progress as lines, a reader that leaves early met quietly."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from prunelab import checkpoints, cli
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.server import probe


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


TINY = "data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200"


@pytest.mark.parametrize("args, needles", [
    (["--set", "model=resnet999"], ["unknown model 'resnet999'", "simple_cnn"]),
    (["--set", "data.dataset=mnist3d"], ["unknown dataset 'mnist3d'", "fashionmnist"]),
    (["--set", "prune.method=magic"], ["unknown pruning method 'magic'", "taylor"]),
    (["--set", "prune.target=1.2"], ["prune.target must be inside (0, 1)"]),
    (["--set", "train.epochs=0"], ["train.epochs must be >= 1"]),
    (["--set", "finetune.epochs=-3"], ["finetune.epochs must be >= 1"]),
])
def test_bad_settings(capsys, args, needles):
    """Refused before any server contact or data loading."""
    code, _, err = run_cli(capsys, "train", "--tracking-uri", "http://127.0.0.1:9", *args)
    one_line_error(code, err, *needles)


def test_unreachable_server_names_uri_and_make_server(capsys, fashion_dir):
    uri = f"http://127.0.0.1:{probe.free_port()}"
    code, _, err = run_cli(capsys, "train", "--tracking-uri", uri)
    one_line_error(code, err, uri, "make server")


def test_missing_data_folder(capsys, tracking_uri, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-dir", str(tmp_path / "absent"))
    one_line_error(code, err, "no FashionMNIST files", "--data-dir")


def test_unknown_run_id_and_model_uri(capsys, tracking_uri, fashion_dir):
    code, _, err = run_cli(capsys, "finetune", "--overrides", TINY, "--model-uri", "0" * 32)
    one_line_error(code, err, "no run 00000000")
    code, _, err = run_cli(capsys, "finetune", "--overrides", TINY, "--model-uri", "models:/m-doesnotexist")
    one_line_error(code, err, "cannot load model models:/m-doesnotexist")


def test_checkpoint_that_would_unpickle_code(capsys, tmp_path, fashion_dir):
    evil = tmp_path / "evil.pt"
    torch.save(SimpleCNN(), evil)  # a whole pickled module: loading it would run code
    code, _, err = run_cli(capsys, "evaluate", str(evil), "--dataset", "fashionmnist", "--model", "simple_cnn")
    one_line_error(code, err, "not a plain weights file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is no checkpoint")
    code, _, err = run_cli(capsys, "evaluate", str(junk), "--dataset", "fashionmnist", "--model", "simple_cnn")
    one_line_error(code, err, "junk.pt")


def test_evaluate_prints_one_json_line(capsys, tmp_path, fashion_dir):
    """A weights file with its own architecture, and a bare state dict with --model."""
    import json

    torch.manual_seed(0)
    model = SimpleCNN(channels=[5, 9])
    checkpoints.save(model, tmp_path / "pruned.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    results = []
    for f in ("pruned.pt", "bare.pt"):
        code, out, _ = run_cli(capsys, "evaluate", str(tmp_path / f), "--dataset", "fashionmnist", "--model", "simple_cnn", "--n-test", "300")
        assert code == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1] and results[0]["n"] == 300 and 0 <= results[0]["accuracy"] <= 1


def test_unreachable_target_is_refused_before_any_run(capsys, tracking_uri, client, fashion_dir):
    code, _, err = run_cli(capsys, "prune", "--overrides", TINY + " study=test-cli-target prune.target=0.01")
    one_line_error(code, err, "without removing every filter of a layer")
    exp = client.get_experiment_by_name("test-cli-target")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_report_without_runs(capsys, tracking_uri):
    code, _, err = run_cli(capsys, "report", "--set", "study=test-never-ran")
    one_line_error(code, err, "no finished train or finetune runs", "test-never-ran")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The installed console entry point, as a user runs it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{probe.free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "prunelab", "prune", "--set", "prune.target=0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "prunelab: error: prune.target must be inside (0, 1), got 0.0: it is the fraction that remains"


def _prunelab(args: list[str], env: dict, missing: str = "") -> subprocess.CompletedProcess:
    """`python -m prunelab ...` in a fresh process; `missing` names a package it lacks
    (marked missing in sys.modules, as Python marks a module that is not there)."""
    code = f"import sys\nsys.modules[{missing!r}] = None\n" if missing else "import sys\n"
    code += "from prunelab.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_system_metrics_are_logged_with_the_run(tracking_uri, client, fashion_dir):
    """--system-metrics: CPU and memory use as system/... metrics of the stage's run."""
    from conftest import clean_env

    env = {**clean_env(tracking_uri), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc = _prunelab(["train", "--system-metrics", "--overrides", TINY + " study=test-cli-system-metrics"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = client.search_runs([client.get_experiment_by_name("test-cli-system-metrics").experiment_id])
    assert run.info.status == "FINISHED"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


def test_system_metrics_without_psutil_is_refused_before_any_run(tracking_uri, client, fashion_dir):
    from conftest import clean_env

    proc = _prunelab(["train", "--system-metrics", "--overrides", TINY + " study=test-cli-no-psutil"],
                     clean_env(tracking_uri), missing="psutil")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("prunelab: error: --system-metrics needs the psutil package")
    assert client.get_experiment_by_name("test-cli-no-psutil") is None  # no run, so none left RUNNING


def test_progress_reaches_a_pipe(tracking_uri, fashion_dir):
    """`prunelab prune ... 2>&1 | cat`: with no terminal to draw bars on, each epoch and each
    pruning round is a line, with the seconds since its loop started, as it happens."""
    from conftest import clean_env

    proc = subprocess.run([sys.executable, "-m", "prunelab", "prune", "--overrides", TINY + " train.epochs=2 study=test-cli-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(tracking_uri), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    lines = proc.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("prunelab: prune-t0: pretrain epoch ")]
    assert [line.split(":")[2].strip() for line in epochs] == ["pretrain epoch 1/2", "pretrain epoch 2/2"], proc.stdout[-2000:]
    assert all(re.search(r"train loss \d\.\d{4}, val accuracy \d\.\d{4}, test accuracy \d\.\d{4} \(\d+ s\)$", line) for line in epochs), epochs
    rounds = [line for line in lines if line.startswith("prunelab: prune-t0: round ")]
    assert len(rounds) >= 2 and rounds[0].startswith("prunelab: prune-t0: round 0: 100.0% of the params left"), rounds
    assert lines.index(rounds[-1]) < next(i for i, line in enumerate(lines) if line.startswith("prunelab: prune run "))


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_output_into_a_closed_pipe_stops_quietly(reader):
    """`prunelab settings | head -1`: the reader leaves early (`true` before the first line
    is written); prunelab stops without a traceback, as Unix tools do."""
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m prunelab settings | {reader}", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr[-2000:]
    if reader == "head -1":
        assert proc.stdout.startswith("study ") and len(proc.stdout.splitlines()) == 1


def test_a_warning_is_held_only_while_the_input_is_checked(tracking_uri, client, dogs_cats_dir, tmp_path):
    """A library's warning raised while the input is checked (PIL decoding an image over its
    pixel limit) is not printed before a refusal's one line (tests/test_bad_inputs.py), and is
    printed once the input is accepted: a run that goes ahead hides nothing."""
    import shutil

    from PIL import Image

    from conftest import clean_env

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for f in sorted((dogs_cats_dir / split / cls).iterdir())[:3]:
                shutil.copy(f, tmp_path / "images" / split / cls / f.name)
    Image.new("L", (10_000, 9_000)).save(tmp_path / "images" / "train" / "cat" / "huge.png")
    env = {**clean_env(tracking_uri), "PRUNELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "prunelab", "train", "--data-dir", str(tmp_path / "images"),
                           "--overrides", "data.dataset=imagefolder data.image_size=32 data.val_size=0 train.epochs=1 "
                                          "study=test-cli-held-warning"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DecompressionBombWarning" in proc.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("test-cli-held-warning").experiment_id])
    assert run.info.status == "FINISHED"
