"""``prefmodule report <log dir>``: one self-contained ``report.html`` of a run, written at the end of ``fit``
too: its curves from ``metrics.csv`` (PNG images embedded in the page) and its samples before vs after."""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import os
from datetime import datetime

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# (title, metrics.csv columns): one plot each; train lines, val points
PLOTS = [
    ("Loss", ["train/loss", "val/loss"]),
    ("Reward accuracy", ["train/rewards/accuracies", "val/rewards/accuracies", "train/accuracy", "val/accuracy"]),
    ("Reward margin", ["train/rewards/margins", "val/rewards/margins", "train/margin", "val/margin"]),
    ("Rewards: chosen vs rejected",
     ["train/rewards/chosen", "train/rewards/rejected", "val/rewards/chosen", "val/rewards/rejected"]),
    ("Rewards: min, mean, max (reward models)",
     ["train/min_reward", "train/mean_reward", "train/max_reward", "val/min_reward", "val/mean_reward",
      "val/max_reward"]),
    ("Log-probs: chosen vs rejected",
     ["train/logps/chosen", "train/logps/rejected", "val/logps/chosen", "val/logps/rejected"]),
    ("Reward of sampled completions", ["train/reward", "val/reward"]),
    ("Clipped ratios", ["train/clip_ratio/low_mean", "train/clip_ratio/high_mean", "train/clip_ratio/region_mean"]),
    ("KL to the reference, entropy", ["train/kl", "val/kl", "train/entropy", "val/entropy"]),
    ("Learning rate", ["train/lr"]),
    ("Throughput (tokens/s, all ranks)", ["train/tokens_per_sec"]),
]
OPTIONAL_PLOTS = {"Rewards: min, mean, max (reward models)"}  # not noted as missing in other runs
# The curves of preference pairs, and those of completions sampled and rewarded (GRPO, RLOO): a run of one kind is
# not told it lacks the other's.
PAIR_PLOTS = {"Reward accuracy", "Reward margin", "Rewards: chosen vs rejected", "Log-probs: chosen vs rejected"}
SAMPLED_PLOTS = {"Reward of sampled completions", "Clipped ratios", "KL to the reference, entropy"}
NO_METRICS = ("no metrics.csv in this folder: the plots come from a CSV logger's metrics.csv, which the prefmodule "
              "CLI always writes; from Python, add lightning.pytorch.loggers.CSVLogger to Trainer(logger=[...]).")


def write_report(run_dir: str, path: str | None = None) -> str:
    """Write the report of the run in ``run_dir`` to ``path`` (default ``<run_dir>/report.html``); returns the path."""
    path = path or os.path.join(run_dir, "report.html")
    metrics = read_metrics(os.path.join(run_dir, "metrics.csv"))
    samples = read_samples(os.path.join(run_dir, "samples.jsonl"))
    hparams_file = os.path.join(run_dir, "hparams.yaml")
    hparams = open(hparams_file).read().strip() if os.path.isfile(hparams_file) else None  # as Lightning wrote it
    sections = [
        f"<h1>prefmodule run report</h1><p><code>{html.escape(os.path.abspath(run_dir))}</code>, written "
        f"{datetime.now():%Y-%m-%d %H:%M}</p>",
        _final_metrics(metrics),
        _plots(metrics),
        _samples(samples),
        f"<h2>Hyperparameters</h2><pre>{html.escape(hparams)}</pre>" if hparams else "",
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>prefmodule report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(sections)}</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(page)
    return path


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]] | None:
    """Column -> its (step, value) points, from a CSV logger's ``metrics.csv``; ``None`` if there is none."""
    if not os.path.isfile(path):
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


def read_samples(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _final_metrics(metrics: dict | None) -> str:
    if metrics is None:
        return f"<p class='missing'>{html.escape(NO_METRICS)}</p>"
    final = {name: points[-1][1] for name, points in sorted(metrics.items()) if name.startswith("val/")}
    if not final:
        return "<p class='missing'>no validation metrics logged.</p>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td></tr>" for name, value in final.items())
    return f"<h2>Final validation metrics</h2><table>{rows}</table>"


def _plots(metrics: dict | None) -> str:
    if metrics is None:
        return ""
    figures, missing = [], []
    sampled = bool(metrics.get("train/reward") or metrics.get("val/reward"))
    optional = OPTIONAL_PLOTS | (PAIR_PLOTS if sampled else SAMPLED_PLOTS)
    for title, columns in PLOTS:
        present = [column for column in columns if metrics.get(column)]
        if not present:
            if title not in optional:
                missing.append(title)
            continue
        figures.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
                       f"{_plot(title, {column: metrics[column] for column in present})}'></figure>")
    note = f"<p class='missing'>not logged: {html.escape(', '.join(missing))}</p>" if missing else ""
    return f"<h2>Curves</h2><div class='grid'>{''.join(figures)}</div>{note}"


def _plot(title: str, series: dict[str, list[tuple[int, float]]]) -> str:
    """One PNG, base64: training series as lines, validation ones dashed with points; chosen green, rejected red."""
    figure = Figure(figsize=(5.2, 3.4), dpi=100, layout="tight")
    axes = figure.add_subplot()
    for name, points in series.items():
        steps, values = zip(*points)
        validation = name.startswith("val/")
        color = "tab:green" if name.endswith("chosen") else "tab:red" if name.endswith("rejected") else \
            "tab:orange" if validation else "tab:blue"
        axes.plot(steps, values, color=color, linestyle="--" if validation else "-", marker="o" if validation else None,
                  markersize=4, label=name)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _samples(samples: list[dict]) -> str:
    if not samples:
        return "<h2>Samples</h2><p class='missing'>no samples.jsonl (samples off, or no validation data).</p>"
    first, last = min(row["step"] for row in samples), max(row["step"] for row in samples)
    before = {row["index"]: row for row in samples if row["step"] == first}
    after = {row["index"]: row for row in samples if row["step"] == last}

    def completion(row: dict | None) -> str:
        if row is None:
            return ""
        reward = f"<div class='reward'>reward {row['reward']:.3f}</div>" if row.get("reward") is not None else ""
        return f"{html.escape(row['completion'])}{reward}"

    rows = "".join(
        f"<tr><td>{html.escape(row['prompt'])}</td><td>{completion(row)}</td><td>{completion(after.get(index))}</td>"
        f"<td>{html.escape(row['chosen'] or '')}</td><td>{html.escape(row['rejected'] or '')}</td></tr>"
        for index, row in before.items()
    )
    return (f"<h2>Samples: before (step {first}) vs after (step {last})</h2><table class='samples'><tr><th>prompt</th>"
            f"<th>before</th><th>after</th><th>chosen</th><th>rejected</th></tr>{rows}</table>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
.samples td { max-width: 22em; white-space: pre-wrap; }
.reward { color: #666; font-size: 0.85em; margin-top: 0.3em; }
.grid { display: flex; flex-wrap: wrap; gap: 0.5em; }
.missing { color: #a60; }
figure { margin: 0; }
"""


def main(args: list[str]) -> str:
    """``prefmodule report LOG_DIR [--output PATH]``."""
    parser = argparse.ArgumentParser(prog="prefmodule report", description="Write a run's report.html: its curves "
                                     "(from metrics.csv) and its samples before vs after training.")
    parser.add_argument("log_dir", help="the run's folder, e.g. runs/dpo/lightning_logs/version_0")
    parser.add_argument("--output", "-o", help="where to write the page (default: <log_dir>/report.html)")
    options = parser.parse_args(args)
    if not os.path.isdir(options.log_dir):
        parser.error(f"{options.log_dir}: no such folder (give a run's log folder, the one holding metrics.csv)")
    path = write_report(options.log_dir, options.output)
    print(f"prefmodule: report -> {path}")
    return path
