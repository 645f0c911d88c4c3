"""``rldiag lens RUN``: how each policy-gradient objective would have treated the run's tokens."""

from __future__ import annotations

import argparse
import ast
from typing import Any

import polars as pl

from rldiag.cli import RUN_HELP, CLIError
from rldiag.commands._util import add_engine_args, engine_kwargs, open_run_or_fail, print_table, steps_in, write_frame


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="objective lens: PPO, DAPO, CISPO, GSPO, BAPO, ... replayed on the run's tokens")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument(
        "--objectives",
        help="comma-separated subset (default: all): ppo,dapo,dual_clip,dcpo,cispo,sapo,gspo,ctpo,tis,mis,bapo,ttb",
    )
    p.add_argument("--steps", help="step range A:B (B exclusive)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OBJ.FIELD=VALUE",
        help="override a parameter, e.g. --set dapo.eps_high=0.3 (repeatable)",
    )
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table: one line per objective (mean over steps, last step); csv/json: one row per step",
    )
    p.add_argument("--per-step", action="store_true", help="table format: one line per step and objective")
    add_engine_args(p)
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["dapo.eps_high=0.3"]`` -> ``{"dapo": {"eps_high": 0.3}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        obj, dot, name = key.strip().partition(".")
        if not sep or not dot or not obj or not name:
            raise CLIError(f"--set takes OBJECTIVE.FIELD=VALUE, e.g. dapo.eps_high=0.3 (got {item!r})")
        try:
            out.setdefault(obj, {})[name] = float(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError, TypeError):
            raise CLIError(f"--set {item!r}: the value must be a number") from None
    return out


def summary(frame: pl.DataFrame, objectives: list[str]) -> list[dict[str, Any]]:
    from rldiag.analysis.lens import NEEDS, QUANTITIES, column

    rows = []
    for o in objectives:
        row: dict[str, Any] = {"objective": o}
        for q in QUANTITIES:
            values = frame[column(o, q)]
            row[q] = values.fill_nan(None).mean()
            last = values[-1]
            row[f"{q}@last"] = None if last is None or last != last else last  # NaN: no value, shown as "-"
        if o == "bapo":
            row["note"] = (
                f"last bounds [{frame[column('bapo', 'clip_low')][-1]:g}, "
                f"{frame[column('bapo', 'clip_high')][-1]:g}], saturated in "
                f"{int(frame[column('bapo', 'saturated')].sum())}/{frame.height} steps"
            )
        elif o == "ttb":
            ess = frame[column("ttb", "ess")].fill_nan(None).mean()  # None when every step's ESS is NaN
            row["note"] = f"mean ESS {ess:.4f}" if isinstance(ess, float) else "mean ESS n/a"
        elif row[QUANTITIES[0]] is None and o in NEEDS:
            row["note"] = "no value: the run's token rows lack " + " or ".join(NEEDS[o])
        rows.append(row)
    return rows


def long_rows(frame: pl.DataFrame, objectives: list[str]) -> list[dict[str, Any]]:
    from rldiag.analysis.lens import QUANTITIES, column

    rows = []
    for rec in frame.iter_rows(named=True):
        for o in objectives:
            row = {"step": rec["step"], "objective": o, **{q: rec[column(o, q)] for q in QUANTITIES}}
            if o == "bapo":
                row["note"] = f"[{rec[column('bapo', 'clip_low')]:g}, {rec[column('bapo', 'clip_high')]:g}]" + (
                    " saturated" if rec[column("bapo", "saturated")] else ""
                )
            elif o == "ttb":
                row["note"] = f"ESS {rec[column('ttb', 'ess')]:.4f}"
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from rldiag.analysis.lens import OBJECTIVES, QUANTITIES, lens

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()] if args.objectives else list(OBJECTIVES)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise CLIError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    objectives = [o for o in OBJECTIVES if o in objectives]
    r = open_run_or_fail(args.run)
    steps = steps_in(r, args.steps)
    engine = engine_kwargs(args)
    params = parse_overrides(args.set) or None
    if engine["engine"] == "ray":
        frame = r.lens(objectives=objectives, steps=steps, params=params, **engine)
    else:
        frame = lens(r, objectives=objectives, steps=steps, params=params)
    if frame.height == 0:
        raise CLIError(
            f"{args.run} has no token rows"
            + (f" in steps {args.steps}" if args.steps else "")
            + " (the lens needs token rows: token_sample_rate > 0)"
        )
    if args.format != "table":  # json: NaN -> null, strict JSON
        write_frame(frame, args.format)
        return 0
    print(
        f"{r.name}: objective lens over {frame.height} steps ({frame['step'][0]} .. {frame['step'][-1]})"
        + ("; token rows are sampled" if getattr(r, "token_rows_sampled", False) else "")
    )
    if args.per_step:
        print_table(long_rows(frame, objectives), ["step", "objective", *QUANTITIES, "note"])
    else:
        print("mean over steps, and the last step (@last)")
        print_table(
            summary(frame, objectives), ["objective", *[c for q in QUANTITIES for c in (q, f"{q}@last")], "note"]
        )
    return 0
