"""``rldiag summarize RUN``: every metric of a run, per step or summarized."""

from __future__ import annotations

import argparse
import math

import numpy as np
import polars as pl

from rldiag.cli import RUN_HELP, CLIError
from rldiag.commands._util import (
    add_engine_args,
    engine_kwargs,
    open_run_or_fail,
    parse_steps,
    print_table,
    select_metrics,
    write_frame,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="metrics of a run: a summary per metric, or the per-step table")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table: one line per metric (first, last, min, max); csv/json: one row per step",
    )
    p.add_argument("--metrics", help="comma-separated names or globs, e.g. 'clip/*,entropy/mean'")
    p.add_argument("--steps", help="step range A:B (B exclusive)")
    p.add_argument("--per-step", action="store_true", help="print the per-step table in table format too")
    p.add_argument("--eps-low", type=float, help="recompute with another eps_low (from token rows)")
    p.add_argument("--eps-high", type=float, help="recompute with another eps_high (from token rows)")
    p.add_argument(
        "--from-tokens",
        action="store_true",
        help="recompute every statistic from the token rows, not only those the clip settings change",
    )
    p.add_argument("--list", action="store_true", help="list the metric names and exit")
    add_engine_args(p)
    p.set_defaults(func=run)


def summary_rows(df: pl.DataFrame, names: list[str]) -> list[dict]:
    rows = []
    steps = df["step"].to_numpy()
    for name in names:
        v = df[name].to_numpy()
        ok = np.isfinite(v)
        if not ok.any():
            rows.append(
                {
                    "metric": name,
                    "first": math.nan,
                    "last": math.nan,
                    "min": math.nan,
                    "min@": None,
                    "max": math.nan,
                    "max@": None,
                }
            )
            continue
        fv, st = v[ok], steps[ok]
        rows.append(
            {
                "metric": name,
                "first": float(fv[0]),
                "last": float(fv[-1]),
                "min": float(fv.min()),
                "min@": int(st[fv.argmin()]),
                "max": float(fv.max()),
                "max@": int(st[fv.argmax()]),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from rldiag.metrics.registry import REGISTRY

    if args.list:
        print_table(
            [{"metric": s.name, "unit": s.unit or "-", "better": s.direction, "doc": s.doc} for s in REGISTRY.values()],
            ["metric", "unit", "better", "doc"],
        )
        return 0
    if not args.run:
        raise CLIError("give a run directory (or --list)")
    r = open_run_or_fail(args.run)
    names = select_metrics(args.metrics)
    config = None
    if args.eps_low is not None or args.eps_high is not None:
        changes = {k: v for k, v in (("eps_low", args.eps_low), ("eps_high", args.eps_high)) if v is not None}
        config = r.config.replace(**changes)
    if args.from_tokens and not r.token_files():
        raise CLIError(
            f"{args.run} has no token rows, and --from-tokens recomputes every statistic from them; without it the "
            "stored statistics give every metric (a recorder writes token rows with token_sample_rate > 0)"
        )
    df = r.step_metrics(
        steps=parse_steps(args.steps), metrics=names, config=config, from_tokens=args.from_tokens, **engine_kwargs(args)
    )
    if df.height == 0:
        raise CLIError(f"{args.run} has no steps" + (f" in {args.steps}" if args.steps else "") + " yet")
    if args.format != "table" or args.per_step:
        write_frame(df, args.format)
        return 0
    print(f"{r.name}: {df.height} steps ({int(df['step'][0])} .. {int(df['step'][-1])})")
    restarts = r.resume.describe(limit=8)
    if restarts:
        print("restarted: " + "; ".join(restarts))
    rows = summary_rows(df, names)
    absent = [] if args.metrics else [row["metric"] for row in rows if row["min@"] is None]
    print_table(
        [row for row in rows if row["metric"] not in absent], ["metric", "first", "last", "min", "min@", "max", "max@"]
    )
    if absent:
        print(
            "NaN on every step (most often: the run did not record their inputs; --metrics lists them): "
            + _families(absent, names)
        )
    return 0


def _families(absent: list[str], names: list[str]) -> str:
    """``absent`` metric names, a family written ``family/*`` when none of its metrics has a value."""
    gone = set(absent)
    out: list[str] = []
    for name in absent:
        fam = name.split("/")[0]
        members = [n for n in names if n.split("/")[0] == fam]
        label = f"{fam}/*" if len(members) > 1 and gone.issuperset(members) else name
        if label not in out:
            out.append(label)
    return ", ".join(out)
