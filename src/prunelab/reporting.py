"""Runs -> tables -> figures -> a report run, for any study kind.

Reads only what the tracking server returns and never touches a model. Knows
no study kind: each kind's module draws its own figures with these helpers and
hands them to `publish`.
"""

from __future__ import annotations

import contextlib
import numbers
import re
import tempfile
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from prunelab import files, paths  # noqa: E402
from prunelab.tracking import connection, lineage, query, run as runs  # noqa: E402
from prunelab.config import StudyConfig  # noqa: E402
from prunelab import data as datasets  # noqa: E402
from prunelab.errors import NothingToDraw  # noqa: E402


def latest_per_trial(runs: list) -> dict[int, object]:
    """The newest finished run of each trial (runs come newest first)."""
    return {trial: r for (trial,), r in latest_per(runs).items()}


def latest_per(runs: list, params: tuple[str, ...] = ()) -> dict[tuple, object]:
    """The newest finished run (runs come newest first) of each (trial, *values of `params`): a
    study whose steps carry their own settings (a method, a target) has a run per trial of each."""
    out: dict[tuple, object] = {}
    for r in runs:
        key = (int(r.data.tags.get(paths.TAG_TRIAL, -1)), *(r.data.params.get(p) for p in params))
        out.setdefault(key, r)
    return out


# The run ids a report draws from, collected while it is drawn (see `drawing_from`).
_drawn: list[set[str]] = []


@contextlib.contextmanager
def drawing_from() -> Iterator[set[str]]:
    """Collect the ids of the runs whose numbers the report drawn in this block uses
    (every table of runs goes through `drew`), so the report run can name them."""
    ids: set[str] = set()
    _drawn.append(ids)
    try:
        yield ids
    finally:
        _drawn.remove(ids)


def drew(run_ids) -> None:
    """Record that these runs' numbers go into the report being drawn."""
    for ids in _drawn:
        ids.update(run_ids)


def histories(runs: dict[int, object], metrics: list[str]) -> pd.DataFrame:
    """Long table: trial, run_id, metric, step, value."""
    drew(r.info.run_id for r in runs.values())
    rows = []
    for trial, r in sorted(runs.items()):
        for key in metrics:
            rows += [(trial, r.info.run_id, key, step, value) for step, value in query.metric_history(r.info.run_id, key)]
    return pd.DataFrame(rows, columns=["trial", "run_id", "metric", "step", "value"])


def band(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, min and max over trials of `metric` at each step."""
    sub = df[df.metric == metric]
    return sub.groupby("step")["value"].agg(["mean", "min", "max", "count"]).reset_index()


# Where `finish` puts the legend: inside the axes, where it covers the fewest points; or below
# them, where it covers nothing (for figures whose curves fill the axes).
LEGEND_INSIDE, LEGEND_BELOW = "inside", "below"


def finish(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: float | None = None,
           legend: str | None = LEGEND_INSIDE) -> plt.Figure:
    """Labels, grid, legend and layout: the same finish on every report's figures. `legend`:
    `LEGEND_INSIDE`, `LEGEND_BELOW` (the figure's, holding `ax`'s entries) or None."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend == LEGEND_BELOW:
        # Constrained layout makes room for a legend outside the axes (tight_layout does not).
        fig.set_layout_engine("constrained")
        handles, labels = ax.get_legend_handles_labels()
        # As many columns as fit across the figure: a wider legend would be cut off at its edges.
        for ncols in range(max(1, len(handles)), 0, -1):
            box = fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=legend_size)
            if ncols == 1 or box.get_window_extent(fig.canvas.get_renderer()).width <= fig.bbox.width:
                break
            box.remove()
        return fig
    if legend == LEGEND_INSIDE:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def held_to_the_end(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """`df` (a `histories` table) with each trial's series of `metrics` carried on, at its last
    value, through the later steps other trials logged: a trial that stopped early (its pruning
    target reached a round sooner) stays in the later steps' bands as what it ended as, so every
    step's band spans every trial and the last step's is the trials' final state."""
    held = []
    for key in metrics:
        sub = df[df.metric == key]
        steps = sorted(sub.step.unique())
        for (trial, run_id), series in sub.groupby(["trial", "run_id"]):
            last = series.sort_values("step").iloc[-1]
            held += [(trial, run_id, key, step, last.value) for step in steps if step > last.step]
    return pd.concat([df, pd.DataFrame(held, columns=df.columns)], ignore_index=True) if held else df


def plot_band(ax, table: pd.DataFrame, label: str, say_band: bool = True, **style) -> None:
    """Mean line with min/max error bars and a shaded min-max band; `say_band=False` leaves
    ": mean, min-max" out of the legend entry (for figures whose title says it once)."""
    yerr = [table["mean"] - table["min"], table["max"] - table["mean"]]
    label = f"{label}: mean, min-max" if say_band else label
    bars = ax.errorbar(table["step"], table["mean"], yerr=yerr, marker="o", capsize=3, label=label, **style)
    ax.fill_between(table["step"], table["min"], table["max"], alpha=0.15, color=bars.lines[0].get_color())


# Settings that do not change what a run computes (`study` is the preset name
# under `mlflow run`, the experiment name otherwise: runs are found by their tag).
_IGNORED_SETTINGS = frozenset({"data.data_dir", "trials", "seed", "study"})


def same_settings(run, cfg: StudyConfig, ignore: frozenset[str] = frozenset()) -> bool:
    """Whether `run` was made with the settings of `cfg` (so a quick test run and a
    full-scale run of one study never share a figure); `ignore` names more settings
    that do not change what a run computes."""
    logged = run.data.params
    skip = _IGNORED_SETTINGS | ignore
    return all(logged.get(k) == str(v) for k, v in cfg.flat().items() if k not in skip and k in logged)


def find_study_runs(cfg: StudyConfig, filter_string: str, ignore: frozenset[str] = frozenset()) -> list:
    """The study's finished runs matching `filter_string`, at these settings, newest first."""
    runs = query.find_runs(cfg.study, f"tags.{paths.TAG_STUDY} = '{cfg.study}' and {filter_string}")
    return [r for r in runs if same_settings(r, cfg, ignore)]


def stage_runs(cfg: StudyConfig, stage: str, ignore: frozenset[str] = frozenset()) -> dict[int, object]:
    """The newest finished run per trial of one stage of the study, at these settings (but `ignore`)."""
    return latest_per_trial(find_study_runs(cfg, f"tags.{paths.TAG_STAGE} = '{stage}'", ignore))


def no_runs(cfg: StudyConfig, what: str, needs: tuple[str, ...] = ()) -> NothingToDraw:
    """The one-line error of a report that finds nothing to draw. `needs`: what the command
    that makes the runs must add for the study's kind (`--weights PATH`); `--data-dir DIR` is
    added here when the data set is not on this machine."""
    data = ("--data-dir DIR",) if datasets.needs_folder(cfg.data) else ()
    return NothingToDraw(cfg.study, connection.tracking_uri(), what, data + needs)


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (what the README shows), numbers rounded for reading."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"
        return str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The table's numbers as metrics `<row>.<column>`. A row is named by its leading
    columns, as many as it takes to tell the rows apart: `original.test_accuracy_mean`,
    `keep_0.5.params`, `winning_ticket.pm_percent_80.accuracy_mean`."""
    if table.empty:
        return {}
    width = next((k for k in range(1, len(table.columns)) if not table.iloc[:, :k].duplicated().any()),
                 max(1, len(table.columns) - 1))
    out = {}
    for row in table.itertuples(index=False):
        parts = [f"{col}_{v:g}" if isinstance(v, numbers.Real) else str(v) for col, v in zip(table.columns, row[:width])]
        label = re.sub(r"[^\w.\-]+", "_", ".".join(parts)).strip("_")
        for col, value in zip(table.columns[width:], row[width:]):
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value:
                out[f"{label}.{col}"] = float(value)
    return out


def publish(cfg: StudyConfig, figures: dict[str, plt.Figure], table: pd.DataFrame,
            out_dir: str | Path | None = None, sources: set[str] | frozenset[str] = frozenset()) -> str:
    """Log a study's figures and table to a report run and write them to `out_dir`; returns the run id.

    The run names the runs it drew from (`sources`: a tag and a JSON file), records the
    image sets they read, logs the table's numbers as metrics, the figures as figures and
    the table as an MLflow table, beside the CSV and markdown files."""
    ids = sorted(sources)
    description = f"**report** of study `{cfg.study}` ({cfg.kind}): {len(figures)} figures and a table drawn from {len(ids)} runs."
    with contextlib.ExitStack() as cleanup:
        # The files are written before the run starts, all of them or none (a full disk, a folder
        # that cannot be written: one line, and no report run); the run uploads them from there.
        folder = Path(out_dir) if out_dir is not None else Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        with files.written_together(folder) as stage:
            for name, fig in figures.items():
                fig.savefig(stage / name, dpi=120)
            table.to_csv(stage / paths.REPORT_TABLE, index=False)
            (stage / paths.REPORT_MARKDOWN).write_text(markdown_table(table))
        with runs.start_run(cfg.study, "report", {paths.TAG_STUDY: cfg.study}, "report", description) as run:
            run.log_params({"study": cfg.study, "kind": cfg.kind})
            joined = ",".join(ids)
            run.set_tags({paths.TAG_SOURCE_RUNS: joined if len(joined) <= 8000 else f"{len(ids)} runs: see {paths.SOURCE_RUNS}"})
            run.log_dict({"source_runs": ids}, paths.SOURCE_RUNS)
            lineage.copy_dataset_inputs(run.run_id, ids)
            run.log_metrics(table_metrics(table), step=0)
            for name, fig in figures.items():
                run.log_figure(fig, f"{paths.REPORT_DIR}/{name}", dpi=120)
            for name in (paths.REPORT_TABLE, paths.REPORT_MARKDOWN):
                run.log_file(folder / name, paths.REPORT_DIR)
            run.log_table(table, paths.REPORT_JSON_TABLE)  # beside figures/, which holds what out_dir gets
    for fig in figures.values():
        plt.close(fig)
    return run.run_id
