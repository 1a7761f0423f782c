"""Runs -> tables -> figures. Reads only what the tracking server returns;
never touches a model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from prunelab import paths, tracking  # noqa: E402
from prunelab.config import StudyConfig  # noqa: E402
from prunelab.errors import TrackingError  # noqa: E402
from prunelab.report_kmeans import kmeans_report  # noqa: E402


def latest_per_trial(runs: list) -> dict[int, object]:
    """The newest finished run of each trial (runs come newest first)."""
    out: dict[int, object] = {}
    for r in runs:
        trial = int(r.data.tags.get(paths.TAG_TRIAL, -1))
        out.setdefault(trial, r)
    return out


def histories(runs: dict[int, object], metrics: list[str]) -> pd.DataFrame:
    """Long table: trial, run_id, metric, step, value."""
    rows = []
    for trial, r in sorted(runs.items()):
        for key in metrics:
            rows += [(trial, r.info.run_id, key, step, value) for step, value in tracking.metric_history(r.info.run_id, key)]
    return pd.DataFrame(rows, columns=["trial", "run_id", "metric", "step", "value"])


def band(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, min and max over trials of `metric` at each step."""
    sub = df[df.metric == metric]
    return sub.groupby("step")["value"].agg(["mean", "min", "max", "count"]).reset_index()


def finish(fig, ax, xlabel: str, ylabel: str, title: str, legend_size: float | None = None) -> plt.Figure:
    """Labels, grid, legend and layout: the same finish on every report's figures."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def plot_band(ax, table: pd.DataFrame, label: str, **style) -> None:
    """Mean line with min/max error bars and a shaded min-max band."""
    yerr = [table["mean"] - table["min"], table["max"] - table["mean"]]
    bars = ax.errorbar(table["step"], table["mean"], yerr=yerr, marker="o", capsize=3, label=f"{label}: mean, min-max", **style)
    ax.fill_between(table["step"], table["min"], table["max"], alpha=0.15, color=bars.lines[0].get_color())


# Settings that do not change what a run computes (`study` is the preset name
# under `mlflow run`, the experiment name otherwise: runs are found by their tag;
# a weights path says where the same weights were read from).
_IGNORED_SETTINGS = {"data.data_dir", "trials", "seed", "study", "kmeans.weights"}


def same_settings(run, cfg: StudyConfig) -> bool:
    """Whether `run` was made with the settings of `cfg` (so a quick test run and a
    full-scale run of one study never share a figure)."""
    logged = run.data.params
    return all(logged.get(k) == str(v) for k, v in cfg.flat().items() if k not in _IGNORED_SETTINGS and k in logged)


def stage_runs(cfg: StudyConfig, stage: str) -> dict[int, object]:
    """The newest finished run per trial of one stage of the study, at these settings."""
    runs = tracking.find_runs(cfg.study, f"tags.{paths.TAG_STAGE} = '{stage}' and tags.{paths.TAG_STUDY} = '{cfg.study}'")
    return latest_per_trial([r for r in runs if same_settings(r, cfg)])


def filter_pruning_report(cfg: StudyConfig) -> tuple[dict[str, plt.Figure], pd.DataFrame]:
    """Test accuracy / loss per epoch, original vs fine-tuned pruned, and the size table."""
    train_runs, prune_runs, ft_runs = (stage_runs(cfg, s) for s in ("train", "prune", "finetune"))
    if not train_runs and not ft_runs:
        raise TrackingError(f"experiment {cfg.study!r} on {tracking.tracking_uri()} has no finished train or finetune runs at these settings: "
                            f"run the study first (`prunelab run --study {cfg.study}`)")
    curves = {"train": histories(train_runs, ["test_accuracy", "test_loss", "params", "macs"]),
              "finetune": histories(ft_runs, ["test_accuracy", "test_loss", "params", "macs"])}
    figures = {}
    for metric, label in (("test_accuracy", "test accuracy"), ("test_loss", "test loss")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for stage, name in (("train", "original"), ("finetune", "pruned + fine-tuned")):
            table = band(curves[stage], metric)
            if len(table):  # a finetune run's epoch 0 is the pruned model before fine-tuning
                plot_band(ax, table, f"{name}, {int(table['count'].max())} trials")
        figures[f"{metric}.png"] = finish(fig, ax, "epoch", label, f"{cfg.study}: {label}")
    return figures, size_table(curves, prune_runs)


def size_table(curves: dict[str, pd.DataFrame], prune_runs: dict) -> pd.DataFrame:
    def last(df: pd.DataFrame, metric: str) -> pd.Series:
        sub = df[df.metric == metric]
        return sub.sort_values("step").groupby("trial")["value"].last()

    rows = []
    for stage, name in (("train", "original"), ("finetune", "pruned + fine-tuned")):
        df = curves[stage]
        if df.empty:
            continue
        acc = last(df, "test_accuracy")
        rows.append({"model": name, "trials": len(acc), "params": last(df, "params").mean(),
                     "macs": last(df, "macs").mean(), "test_accuracy_mean": acc.mean(),
                     "test_accuracy_min": acc.min(), "test_accuracy_max": acc.max()})
    table = pd.DataFrame(rows)
    if len(table) == 2:
        table["params_fraction"] = table["params"] / table["params"].iloc[0]
        table["macs_fraction"] = table["macs"] / table["macs"].iloc[0]
    return table


def _transfer_pruning_report(cfg: StudyConfig):
    from prunelab.report_transfer import transfer_pruning_report  # it builds on this module

    return transfer_pruning_report(cfg)


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (what the README shows), numbers rounded for reading."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"
        return str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _lottery_report(cfg: StudyConfig):
    from prunelab.report_lottery import lottery_report  # its own module: four figures and a table

    return lottery_report(cfg)


REPORTS = {
    "filter_pruning": filter_pruning_report,
    "lottery_ticket": _lottery_report,
    "transfer_pruning": _transfer_pruning_report,
    "kmeans_clustering": kmeans_report,
}


def report(cfg: StudyConfig, out_dir: str | Path | None = None) -> str:
    """Draw the study's figures from its runs, log them to a report run and write them to `out_dir`."""
    figures, table = REPORTS[cfg.kind](cfg)
    with tracking.run(cfg.study, "report", {paths.TAG_STUDY: cfg.study}, "report") as run:
        run.log_params({"study": cfg.study, "kind": cfg.kind})
        with tempfile.TemporaryDirectory() as tmp:
            for name, fig in figures.items():
                fig.savefig(Path(tmp) / name, dpi=120)
            table.to_csv(Path(tmp) / paths.REPORT_TABLE, index=False)
            (Path(tmp) / paths.REPORT_MARKDOWN).write_text(markdown_table(table))
            for f in sorted(Path(tmp).iterdir()):
                run.log_file(f, paths.REPORT_DIR)
            if out_dir is not None:
                # Written to disk only once everything was drawn: no half-made folder.
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                for f in Path(tmp).iterdir():
                    (out / f.name).write_bytes(f.read_bytes())
        for fig in figures.values():
            plt.close(fig)
        return run.run_id
