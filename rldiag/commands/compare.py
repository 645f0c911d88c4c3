"""``rldiag compare RUN_A RUN_B ...``: whole runs (or a window of steps) side by side, and where they diverge.

Each metric is summarized over every step of the run (or of ``--steps A:B``), not by its last value: the last
step of a run that reuses rollouts can be on-policy, where every ratio is exactly 1 and KL is 0 whatever
happened before. For each run the table gives the mean and the worst step value (the maximum of a metric
where lower is better, the minimum where higher is better, otherwise the value farthest from the run's
median). Steps whose importance ratios are all exactly 1 (on-policy by construction) are left out of the
ratio, KL, clipping and ESS summaries, where they carry no information. ``diverge@`` is the step where the
two runs differ most in units of the metric's spread (the pooled standard deviation of both runs over their
common steps), so a side that is 0 does not saturate the measure; ``gap`` is that difference in those units.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
from rldiag.cli import RUNS_HELP, CLIError
from rldiag.commands._util import open_run_or_fail, parse_steps, print_table, select_metrics, write_frame

ON_POLICY_FAMILIES = ("ratio/", "kl/", "clip/", "ess/")
"""Metrics whose on-policy steps (every ratio exactly 1) are left out of the run summaries."""
_ON_POLICY_COLUMNS = ("ratio/min", "ratio/max")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare runs: each metric's mean and worst value over the whole run (or --steps), and where they diverge",
        description=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument(
        "runs",
        nargs="+",
        help="two or more runs (the first is the baseline), " + RUNS_HELP,
    )
    p.add_argument(
        "--metrics",
        help="comma-separated names or globs (default: the headline metrics); custom scalars by their exact name",
    )
    p.add_argument("--steps", help="only the window A:B of steps (B exclusive; A: or :B), in every run")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=run)


def on_policy_steps(frame: pl.DataFrame) -> np.ndarray:
    """Boolean per row: every importance ratio of the step is exactly 1 (False where unknown)."""
    if not all(c in frame.columns for c in _ON_POLICY_COLUMNS):
        return np.zeros(frame.height, dtype=bool)
    lo, hi = (frame[c].to_numpy() for c in _ON_POLICY_COLUMNS)
    return (lo == 1.0) & (hi == 1.0)


def summarize(frame: pl.DataFrame, name: str, direction: str) -> dict[str, float]:
    """``mean`` and ``worst`` of metric ``name`` over the rows of ``frame`` (NaN when it has no finite value)."""
    x = frame[name].to_numpy().astype(float)
    keep = np.isfinite(x)
    if name.startswith(ON_POLICY_FAMILIES):
        keep &= ~on_policy_steps(frame)
    x = x[keep]
    if not x.size:
        return {"mean": math.nan, "worst": math.nan}
    if direction == "lower":
        worst = float(x.max())
    elif direction == "higher":
        worst = float(x.min())
    else:  # neutral: the step farthest from the run's median
        worst = float(x[np.argmax(np.abs(x - np.median(x)))])
    return {"mean": float(x.mean()), "worst": worst}


def divergence(a: pl.DataFrame, b: pl.DataFrame, name: str) -> tuple[int | None, float]:
    """Step where ``|a - b|`` is largest in units of the pooled standard deviation of both runs over their
    common steps, and that gap. ``(None, nan)`` without common finite steps; ``(None, 0.0)`` when the runs are
    equal there. A run that is 0 where the other is not gives a finite gap (no saturation at 1)."""
    j = a.select("step", name).join(b.select("step", name), on="step", suffix="_b")
    x, y = j[name].to_numpy().astype(float), j[f"{name}_b"].to_numpy().astype(float)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return None, math.nan
    x, y, steps = x[ok], y[ok], j["step"].to_numpy()[ok]
    diff = np.abs(x - y)
    if not diff.max() > 0:
        return None, 0.0
    scale = float(np.sqrt((np.var(x) + np.var(y)) / 2))
    if not scale > 0:  # both constant (and different): the difference itself is the measure
        scale = float(diff.max())
    i = int(np.argmax(diff))
    return int(steps[i]), float(diff[i] / scale)


def _metric_names(pattern: str, runs: list[Any]) -> list[str]:
    """Registry names matching ``pattern`` (globs), plus custom scalars (``Recorder.log``) of every run named
    exactly."""
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    custom = [p for p in pats if all(p in r.custom.names() for r in runs)]
    rest = [p for p in pats if p not in custom]
    return (select_metrics(",".join(rest)) if rest else []) + custom


def _label(runs: list[Any]) -> list[str]:
    labels: list[str] = []
    for r in runs:
        label = r.name
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def run(args: argparse.Namespace) -> int:
    from rldiag.metrics.registry import HEADLINE, METRICS

    if len(args.runs) < 2:
        raise CLIError("compare needs at least two runs")
    runs = [open_run_or_fail(p) for p in args.runs]
    names = _metric_names(args.metrics, runs) if args.metrics else list(HEADLINE)
    steps = parse_steps(args.steps)
    wanted = list(dict.fromkeys([*names, *_ON_POLICY_COLUMNS]))
    frames = [r.step_metrics(steps=steps, metrics=wanted) for r in runs]
    labels = _label(runs)
    for label, f in zip(labels, frames):
        if f.height == 0:
            where = f" in steps {args.steps}" if args.steps else ""
            raise CLIError(f"run {label} has no steps{where}; nothing to compare")
    rows = []
    for name in names:
        direction = METRICS[name].direction if name in METRICS else "neutral"
        row: dict[str, Any] = {"metric": name}
        for label, df in zip(labels, frames):
            s = summarize(df, name, direction)
            row[f"{label} mean"], row[f"{label} worst"] = s["mean"], s["worst"]
        for label, df in zip(labels[1:], frames[1:]):
            step, gap = divergence(frames[0], df, name)
            row[f"diverge@ ({label})"] = step
            row[f"gap ({label})"] = gap
        rows.append(row)
    cols = (
        ["metric"]
        + [f"{label} mean" for label in labels]
        + [f"{label} worst" for label in labels]
        + [c for label in labels[1:] for c in (f"diverge@ ({label})", f"gap ({label})")]
    )
    if args.format != "table":
        write_frame(pl.DataFrame(rows).select(cols), args.format)
        return 0
    spans = ", ".join(
        f"{label} {f['step'].to_numpy().min()}..{f['step'].to_numpy().max()}" for label, f in zip(labels, frames)
    )
    print(
        f"over {'steps ' + args.steps if args.steps else 'whole runs'} ({spans}): mean and worst step value "
        "(max where lower is better, min where higher is better, else farthest from the median); on-policy "
        "steps (every ratio exactly 1) left out of ratio, KL, clip and ESS; diverge@ = step of the largest "
        f"|a-b| in pooled standard deviations (gap) against {labels[0]}"
    )
    empty = [r["metric"] for r in rows if all(math.isnan(r[f"{label} mean"]) for label in labels)]
    print_table([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows], cols)
    if empty:
        print(f"no value in any run ('-'): {', '.join(_why_empty(name) for name in empty)}")
    return 0


def _why_empty(name: str) -> str:
    """``name`` and the optional token-row inputs it needs, for a metric without a value in any run."""
    from rldiag.metrics.registry import METRICS

    spec = METRICS.get(name)
    optional = [c for c in spec.inputs if c not in schema.REQUIRED_VALUE_COLUMNS] if spec else []
    return f"{name} (needs {' and '.join(optional)} recorded)" if optional else name
