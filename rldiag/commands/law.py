"""``rldiag law RUN``: the entropy-performance law R = -a exp(H) + b, its ceiling, and the mechanism check."""

from __future__ import annotations

import argparse
import json

from rldiag.cli import RUN_HELP, CLIError
from rldiag.commands._util import clean_json, fmt, open_run_or_fail, write_frame


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("law", help="entropy-performance law: fit R = -a exp(H) + b, ceiling b - a, -cov sign check")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--metric", default="reward/mean", help="performance series R (default reward/mean)")
    p.add_argument("--window", type=int, default=5, help="steps averaged for the current R (default 5)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--per-step", action="store_true", help="also print H, R, the fit and the sign check per step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rldiag.analysis.law import fit_law

    r = open_run_or_fail(args.run)
    frame = r.step_metrics()
    if args.metric not in frame.columns:
        raise CLIError(f"{args.metric!r} is not a metric of this run; `rldiag summarize --list` shows the names")
    try:
        fit = fit_law(frame, metric=args.metric, window=args.window)
    except ValueError as exc:
        raise CLIError(f"cannot fit the law: {exc}") from None
    if args.format == "json":
        out = {"metric": args.metric, **fit.as_dict(), "caveats": fit.caveats()}
        if args.per_step:
            out["steps"] = fit.steps.to_dicts()
        print(json.dumps(clean_json(out)))
        return 0
    print(f"{r.name}: {args.metric} = -a exp(entropy/mean) + b over {fit.n} steps")
    print(f"  a = {fmt(fit.a)}, b = {fmt(fit.b)}, R^2 = {fmt(fit.r2)}")
    print(
        f"  ceiling at entropy exhaustion b - a = {fmt(fit.ceiling)}; reached {fmt(fit.reached)} of it "
        f"(current {args.metric} / ceiling), {fmt(fit.gain_reached)} of the gain from the first step"
    )
    print(
        f"  mechanism: sign(-entropy/cov) matched the next entropy change in {fmt(fit.sign_agreement)} "
        f"of {fit.n_sign} steps"
    )
    for caveat in fit.caveats():
        print(f"  caution: {caveat}")
    if args.per_step:
        write_frame(fit.steps, "table")
    return 0
