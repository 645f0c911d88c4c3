"""``rldiag compare RUN_A RUN_B ...``: the same metrics side by side, and where the runs diverge most."""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from rldiag.cli import CLIError
from rldiag.commands._util import open_run_or_fail, parse_steps, print_table, select_metrics, write_frame


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare runs: last values side by side and the step of largest divergence")
    p.add_argument("runs", nargs="+", help="two or more run directories (the first is the baseline)")
    p.add_argument("--metrics", help="comma-separated names or globs (default: the headline metrics)")
    p.add_argument("--steps", help="step range A:B")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=run)


def divergence(a: pl.DataFrame, b: pl.DataFrame, name: str) -> tuple[int | None, float]:
    """Step where |a - b| / (|a| + |b|) is largest over the common steps, and that relative gap."""
    j = a.select("step", name).join(b.select("step", name), on="step", suffix="_b")
    x, y = j[name].to_numpy(), j[f"{name}_b"].to_numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return None, float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ok, np.abs(x - y) / np.maximum(np.abs(x) + np.abs(y), 1e-12), -1.0)
    i = int(np.argmax(rel))
    return int(j["step"][i]), float(rel[i])


def run(args: argparse.Namespace) -> int:
    from rldiag.metrics.registry import HEADLINE

    if len(args.runs) < 2:
        raise CLIError("compare needs at least two runs")
    runs = [open_run_or_fail(p) for p in args.runs]
    names = select_metrics(args.metrics) if args.metrics else list(HEADLINE)
    steps = parse_steps(args.steps)
    frames = [r.step_metrics(steps=steps, metrics=names) for r in runs]
    labels = []
    for r in runs:
        label = r.name
        while label in labels:
            label += "'"
        labels.append(label)
    rows = []
    for name in names:
        row: dict = {"metric": name}
        for label, df in zip(labels, frames):
            v = df[name].drop_nans().drop_nulls()
            row[label] = float(v[-1]) if len(v) else float("nan")
        for label, df in zip(labels[1:], frames[1:]):
            step, gap = divergence(frames[0], df, name)
            row[f"diverge@ ({label})"] = step
            row[f"gap ({label})"] = gap
        rows.append(row)
    cols = ["metric"] + labels + [c for label in labels[1:] for c in (f"diverge@ ({label})", f"gap ({label})")]
    if args.format != "table":
        write_frame(pl.DataFrame(rows), args.format)
        return 0
    print(
        "last value of each metric; diverge@ = step of the largest relative gap |a-b|/(|a|+|b|) to "
        f"{labels[0]} over common steps"
    )
    print_table(rows, cols)
    return 0
