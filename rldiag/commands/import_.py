"""``rldiag import tokens FILE RUN`` and ``rldiag import prime-rl DIR RUN``: runs from logs made elsewhere."""

from __future__ import annotations

import argparse
import importlib

from rldiag.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="build an rldiag run (with statistics) from token rows made elsewhere")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    t = kinds.add_parser("tokens", help="a Parquet or CSV file with the metrics-spec token columns")
    t.add_argument("file")
    t.add_argument("run", help="new run directory")
    t.add_argument("--eps-low", type=float, default=0.2)
    t.add_argument("--eps-high", type=float, default=0.2)
    t.set_defaults(func=run_tokens)
    pr = kinds.add_parser("prime-rl", help="prime-rl token exports: <output_dir>/token_exports/step_N/rank_R.jsonl")
    pr.add_argument("dir", help="prime-rl output directory (or its token_exports folder)")
    pr.add_argument("run", help="new run directory")
    pr.add_argument("--eps-low", type=float, default=0.2)
    pr.add_argument("--eps-high", type=float, default=0.2)
    pr.add_argument("--tis-cap", type=float, default=2.0, help="prime-rl's importance-ratio bound (mismatch/tis_frac)")
    pr.set_defaults(func=run_prime_rl)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run_tokens(args: argparse.Namespace) -> int:
    from rldiag.config import RecorderConfig
    from rldiag.record.importer import import_tokens, read_token_file

    df = read_token_file(args.file)
    out = import_tokens(df, args.run, config=RecorderConfig(eps_low=args.eps_low, eps_high=args.eps_high))
    print(f"imported {df.height:,} token rows into {out}; try `rldiag summarize {out}`")
    return 0


def run_prime_rl(args: argparse.Namespace) -> int:
    from rldiag.config import RecorderConfig

    try:
        mod = importlib.import_module("rldiag.record.integrations.prime_rl")
    except ImportError as exc:
        raise CLIError(f"the prime-rl importer is not available: {exc}") from None
    cfg = RecorderConfig(eps_low=args.eps_low, eps_high=args.eps_high, tis_cap=args.tis_cap)
    out = mod.import_prime_rl(args.dir, args.run, config=cfg)
    print(f"imported prime-rl token exports from {args.dir} into {out}; try `rldiag summarize {out}`")
    return 0
