"""``rldiag cliff``: the extrapolation-cliff threshold lambda*, from numbers or from a run's token rows."""

from __future__ import annotations

import argparse
import json
import math
from typing import TypedDict

from rldiag.cli import RUN_HELP, CLIError
from rldiag.commands._util import (
    add_engine_args,
    clean_json,
    engine_kwargs,
    fmt,
    open_run_or_fail,
    print_table,
    steps_in,
    write_frame,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cliff",
        help="extrapolation cliff of on-policy distillation: lambda*(p, b, c), or per step of a run",
        description="lambda*(p, b, c) is rldiag's derivation of the clip-safety threshold (see docs/cliff.md). "
        "Numbers: rldiag cliff --p 0.96 --b 0.9 --c 2 [--eps 0.2] [--lam 0.7]. "
        "K-ary: --teacher 0.97,0.02,0.01 --base 0.9,0.06,0.04 --c 2. "
        "A run (teacher_logprobs and base_logprobs recorded): rldiag cliff RUN --lam 1.5.",
    )
    p.add_argument("run", nargs="?", help=RUN_HELP + " (per-step report)")
    p.add_argument("--p", type=float, help="teacher modal probability")
    p.add_argument("--b", type=float, help="warm-start (base) mass on the teacher's modal token")
    p.add_argument("--c", type=float, help="IS clip strength (ratio form: ratios in [1/c, c])")
    p.add_argument("--eps", type=float, help="clip range (eps form: c = 1/(1-eps))")
    p.add_argument("--teacher", help="full teacher distribution at a position, comma-separated (K-ary solver)")
    p.add_argument("--base", help="full base distribution at the same position, comma-separated")
    p.add_argument(
        "--lam",
        type=float,
        help="the reward-extrapolation coefficient lambda in use: reports the headroom lambda/lambda*",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="run: teacher modal probability above which a position binds (default 0.9)",
    )
    p.add_argument("--steps", help="run: step range A:B (B exclusive)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    add_engine_args(p)
    p.set_defaults(func=run)


def _dist(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated probabilities (got {text!r})") from None


class _Row(TypedDict, total=False):
    """One clip form's line of the numbers report (``headroom`` and ``severity`` only with ``--lam``)."""

    form: str
    c: float
    lambda_star: float
    headroom: float
    severity: str


def run(args: argparse.Namespace) -> int:
    from rldiag.analysis import cliff

    if args.run:
        if args.p is not None or args.b is not None or args.teacher:
            raise CLIError("give either a run or --p/--b (or --teacher/--base), not both")
        return _run_report(args)
    if args.c is None and args.eps is None:
        raise CLIError("give the clip strength: --c (ratio form) or --eps (eps form), or both")
    rows: list[_Row] = []
    if args.teacher or args.base:
        if not (args.teacher and args.base):
            raise CLIError("--teacher and --base go together")
        t, b = _dist(args.teacher, "--teacher"), _dist(args.base, "--base")
        for form, kw in (("ratio", {"c": args.c}), ("eps", {"eps": args.eps})):
            if next(iter(kw.values())) is not None:
                rows.append(
                    {
                        "form": form,
                        "c": kw.get("c") or cliff.c_from_eps(args.eps),
                        "lambda_star": cliff.lambda_star_kary(t, b, **kw),
                    }
                )
    else:
        if args.p is None or args.b is None:
            raise CLIError("give --p and --b (or --teacher and --base, or a run directory)")
        for form, kw in (("ratio", {"c": args.c}), ("eps", {"eps": args.eps})):
            if next(iter(kw.values())) is not None:
                rows.append(
                    {
                        "form": form,
                        "c": kw.get("c") or cliff.c_from_eps(args.eps),
                        "lambda_star": cliff.lambda_star(args.p, args.b, **kw),
                    }
                )
    for row in rows:
        if args.lam is not None:
            star = row["lambda_star"]
            row["headroom"] = args.lam / star if star > 0 else math.inf
            row["severity"] = cliff.severity(row["headroom"])
    if args.format == "json":
        print(json.dumps(clean_json(rows)))
    elif args.format == "csv":
        cols = list(rows[0])
        print(",".join(cols))
        for row in rows:  # every row has the same keys, in the same order
            print(",".join(fmt(v) if isinstance(v, float) else str(v) for v in row.values()))
    else:
        for row in rows:
            star = row["lambda_star"]
            text = f"lambda* = {fmt(star)}" if math.isfinite(star) else "lambda* = inf (the clip never binds)"
            line = f"{row['form']} form (c = {row['c']:.6g}): {text}"
            if "headroom" in row:
                line += f"; lambda/lambda* = {fmt(row['headroom'])} ({row['severity']})"
            print(line)
        print("lambda* is rldiag's derivation of the paper's threshold (docs/cliff.md)")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from rldiag.analysis import cliff

    r = open_run_or_fail(args.run)
    steps = steps_in(r, args.steps)
    if args.c is not None and args.eps is not None:
        raise CLIError("give --c or --eps for a run, not both")
    try:
        engine = engine_kwargs(args)
        if engine["engine"] == "ray":
            rep = r.cliff(args.lam, args.threshold, c=args.c, eps=args.eps, steps=steps, **engine)
        else:
            rep = cliff.cliff_report(r, lam=args.lam, threshold=args.threshold, c=args.c, eps=args.eps, steps=steps)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if rep.height == 0:
        raise CLIError(f"{args.run} has no token rows" + (f" in steps {args.steps}" if args.steps else ""))
    if args.format != "table":  # json: NaN -> null, strict JSON
        write_frame(rep, args.format)
        return 0
    print(
        f"{r.name}: extrapolation cliff per step (c = {rep['cliff/c'][0]:.6g}, binding positions: teacher "
        f"modal probability > {args.threshold}); lambda* is rldiag's derivation (docs/cliff.md)"
    )
    print_table(rep.to_dicts(), [c for c in rep.columns if c != "cliff/c"])
    if args.lam is not None and "cliff/severity" in rep.columns:
        worst = max(rep["cliff/severity"].to_list(), key=["ok", "warn", "critical"].index)
        print(f"worst: {worst}")
    return 0
