"""A report's table as metrics: each number named by its row and column, rows told apart; `prunelab
report` of several studies, and the command it names for a study the server has no runs of."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from prunelab.reporting import table_metrics


def test_rows_named_by_their_first_column():
    table = pd.DataFrame({"model": ["original", "pruned + fine-tuned"], "trials": [5, 5], "params": [126698.0, 71161.0],
                          "note": ["a", "b"]})
    assert table_metrics(table) == {"original.trials": 5.0, "original.params": 126698.0,
                                    "pruned_fine-tuned.trials": 5.0, "pruned_fine-tuned.params": 71161.0}


def test_rows_that_share_a_first_column_take_the_next_one_too():
    table = pd.DataFrame({"variant": ["winning ticket", "winning ticket", "random reinit"], "pm_percent": [100.0, 80.0, 80.0],
                          "accuracy_mean": [0.5, 0.6, float("nan")]})
    assert table_metrics(table) == {"winning_ticket.pm_percent_100.accuracy_mean": 0.5,
                                    "winning_ticket.pm_percent_80.accuracy_mean": 0.6}  # NaN is no number to log


def test_a_numeric_first_column_names_itself():
    assert table_metrics(pd.DataFrame({"keep": [0.5, 0.25], "params": [10, 5]})) == {"keep_0.5.params": 10.0,
                                                                                    "keep_0.25.params": 5.0}
    assert table_metrics(pd.DataFrame()) == {}


# --------------------------------------------------------------------------- reports of several studies, and the
# command a report names when the server has no runs of a study

TINY = "data.n_train=600 data.n_test=200 train.epochs=1 finetune.epochs=1 prune.rank_images=200 prune.latency_repeats=0 trials=1"


def _preset(folder, study: str):
    """The default study's preset under another study name, as a user's own YAML file."""
    import yaml

    from prunelab.config import DEFAULT_STUDY, presets_dir

    raw = yaml.safe_load((presets_dir() / f"{DEFAULT_STUDY}.yaml").read_text())
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump({**raw, "study": study}))
    return str(path)


def _prunelab(tracking_uri, *args, cwd=None):
    import subprocess
    import sys

    from conftest import clean_env

    return subprocess.run([sys.executable, "-m", "prunelab", *args], capture_output=True, text=True,
                          env=clean_env(tracking_uri), timeout=900, cwd=cwd)


def _hint(stderr_line: str) -> list[str]:
    """The command a line names in backquotes, as argument lists after `prunelab`."""
    import re
    import shlex

    (command,) = re.findall(r"`(prunelab run [^`]+)`", stderr_line)
    return shlex.split(command)[1:]


@pytest.mark.slow
def test_report_draws_the_studies_it_has_and_names_the_command_for_the_others(tracking_uri, client, fashion_dir, tmp_path):
    """`prunelab report --study A --study B --out '.../{study}'` (what `make report` runs): A's
    figures drawn, B named in one line with a command that, run as written, makes B's runs; the
    report then draws both. With none of its studies on the server: one line, exit 2."""
    drawn, absent = _preset(tmp_path, "test-report-drawn"), _preset(tmp_path, "test-report-absent")
    ran = _prunelab(tracking_uri, "run", "--study", drawn, "--overrides", TINY, "--out", str(tmp_path / "run"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    out = str(tmp_path / "figures" / "{study}")

    report = _prunelab(tracking_uri, "report", "--study", drawn, "--study", absent, "--overrides", TINY, "--out", out)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "figures" / "test-report-drawn" / "test_accuracy.png").is_file()
    assert not (tmp_path / "figures" / "test-report-absent").exists()
    (line,) = report.stderr.strip().splitlines()
    assert line.startswith("prunelab: not drawn: experiment 'test-report-absent'") and "Traceback" not in line

    # The command it names works as written, from any folder, and gives the report its runs.
    hinted = _prunelab(tracking_uri, *_hint(line), cwd=tmp_path)
    assert hinted.returncode == 0, hinted.stderr[-2000:]
    again = _prunelab(tracking_uri, "report", "--study", drawn, "--study", absent, "--overrides", TINY, "--out", out)
    assert again.returncode == 0 and again.stderr == "", again.stderr[-2000:]
    assert (tmp_path / "figures" / "test-report-absent" / "test_accuracy.png").is_file()

    none = _prunelab(tracking_uri, "report", "--study", _preset(tmp_path, "test-report-none-a"),
                     "--study", _preset(tmp_path, "test-report-none-b"), "--overrides", TINY, "--out", out)
    assert none.returncode == 2
    (line,) = none.stderr.strip().splitlines()
    assert line.startswith("prunelab: error: ") and "test-report-none-a, test-report-none-b" in line, line


def test_report_hint_names_the_study_as_given(capsys, tracking_uri):
    """A study renamed by a setting is no preset: the command names the preset and the setting."""
    from prunelab import cli

    assert cli.main(["report", "--set", "study=test-report-renamed", "--overrides", "train.epochs=1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert _hint(line) == ["run", "--study", "taylor-cnn-fashionmnist", "--overrides", "train.epochs=1 study=test-report-renamed"]


def test_report_hint_adds_what_the_study_lacks(capsys, tracking_uri, tmp_path):
    """Inputs the study has no default for are placeholders: the images of a transfer study and
    its weights; given ones are passed on as given."""
    from prunelab import cli

    assert cli.main(["report", "--study", "taylor-resnet20-dogscats"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert _hint(line) == ["run", "--study", "taylor-resnet20-dogscats", "--data-dir", "DIR", "--weights", "PATH"]
    assert cli.main(["report", "--study", "taylor-resnet20-dogscats", "--data-dir", str(tmp_path), "--weights", "w.th"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert _hint(line) == ["run", "--study", "taylor-resnet20-dogscats", "--overrides",
                           f"transfer.weights={os.path.abspath('w.th')}", "--data-dir", str(tmp_path)]


def test_several_studies_need_a_study_in_out(capsys):
    from prunelab import cli

    assert cli.main(["report", "--study", "taylor-cnn-fashionmnist", "--study", "lth-lenet300-fashionmnist",
                     "--out", "figures", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("prunelab: error: --out figures would hold the figures of 2 studies: put {study} in it")
