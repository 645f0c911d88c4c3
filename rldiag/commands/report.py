"""``rldiag report RUN [--compare OTHER] --out report.html``: one self-contained HTML file to share."""

from __future__ import annotations

import argparse

from rldiag.cli import RUN_HELP, CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report: headline panels, alerts, worst steps and tokens, summary",
        description="Write one self-contained HTML file (plotly.js inlined: it opens from disk, offline) with the "
        "headline panels, the alerts, the worst steps and their worst tokens, and a plain-language "
        "summary of what went wrong and when. See docs/report.md.",
    )
    p.add_argument("run", help=RUN_HELP)
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="OTHER",
        help="another run drawn on the same panels (repeatable); one colour per run",
    )
    p.add_argument("--out", "-o", required=True, help="the HTML file to write (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--top-steps", type=int, default=6, help="worst steps per run with a token table (6)")
    p.add_argument("--top-tokens", type=int, default=5, help="tokens per ranking and step (5)")
    p.add_argument("--max-points", type=int, default=2000, help="points per line at most (2000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rldiag.report import ReportError, check_out, write_report

    for name in ("top_steps", "top_tokens", "max_points"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    try:
        check_out(args.out, force=args.force)  # before reading any run: a bad --out fails at once
        path = write_report(
            args.run,
            args.out,
            compare=args.compare,
            force=args.force,
            top_steps=args.top_steps,
            top_tokens=args.top_tokens,
            max_points=args.max_points,
        )
    except ReportError as exc:
        raise CLIError(str(exc)) from None
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB)")
    return 0
