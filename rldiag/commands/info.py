"""``rldiag info RUN``: manifest, steps, ranks, tokens, dropped rows, files, problems.

``rldiag info RUN --repair [--dry-run] [--grace S]`` removes what no reader uses and no live writer will
touch again (temporary files older than the grace period, orphan token files of ended writers, orphan live
tails; :func:`rldiag.analysis.inventory.repair`) and prints each file removed; local runs and URIs alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from rldiag.cli import RUN_HELP
from rldiag.commands._util import clean_json, open_run_or_fail
from rldiag.runformat import TMP_GRACE_SECONDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a run holds: steps, ranks, tokens, dropped rows, files, problems")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove what is safe to remove: temporary files older than --grace, orphan token files and live "
        "tails that no reader uses (never a live writer's files); prints each file removed",
    )
    p.add_argument("--dry-run", action="store_true", help="with --repair: print what would be removed, remove nothing")
    p.add_argument(
        "--grace",
        type=float,
        default=TMP_GRACE_SECONDS,
        metavar="S",
        help=f"with --repair: keep temporary files younger than this (default {TMP_GRACE_SECONDS:.0f} s)",
    )
    p.set_defaults(func=run)


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _repair(args: argparse.Namespace) -> int:
    import warnings

    from rldiag.analysis.inventory import repair
    from rldiag.cli import CLIError

    if args.grace < 0:
        raise CLIError(f"--grace must be >= 0 seconds, got {args.grace}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the problems are what this command is for; they are printed below
        r = open_run_or_fail(args.run)
    done = repair(r, grace=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, verb.replace(" ", "_"): [str(x.path) for x in done]}, indent=2))
        return 0
    for x in done:
        print(f"{verb} {x.path}  ({x.kind}: {x.reason})")
    kept = r.info()["problems"] if not args.dry_run else []
    print(f"{verb} {len(done)} file(s)" + (f"; {len(kept)} problem(s) left (rldiag info lists them)" if kept else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    repair, dry_run = getattr(args, "repair", False), getattr(args, "dry_run", False)  # callers build Namespaces
    if dry_run and not repair:
        from rldiag.cli import CLIError

        raise CLIError("--dry-run goes with --repair")
    if repair:
        return _repair(args)
    r = open_run_or_fail(args.run)
    info = r.info()
    if args.json:
        print(json.dumps(clean_json(info), indent=2))
        return 0
    print(f"run          {info['name']}  ({info['path']})")
    print(
        f"format       v{info['schema_version']} written by rldiag {info['rldiag_version']}, created "
        f"{_when(info['created'])}"
    )
    span = f"  ({info['first_step']} .. {info['last_step']})" if info["steps"] else ""
    print(f"steps        {info['steps']}{span}")
    print(f"ranks        {info['ranks']}  (world size {info['world_size']})")
    dup = info.get("records_duplicate") or 0
    note = f"  ({dup} duplicate records counted once, see problems)" if dup else ""
    print(f"records      {info['records']}{note}")
    print(
        f"tokens       {info['tokens']:,} valid of {info['tokens_masked_in']:,} masked-in "
        f"({info['tokens_nonfinite']:,} non-finite, {info['tokens_invalid']:,} invalid)"
    )
    print(
        f"token rows   {info['token_rows_written']:,} written, {info['token_rows_dropped']:,} dropped "
        f"(sample rate {info['config']['token_sample_rate']})"
    )
    print(
        f"files        {info['stats_files']} statistics, {info['token_files']} token files, "
        f"{info['bytes'] / 2**20:.1f} MiB"
    )
    last = info["seconds_since_last_write"]
    print(f"last write   {_when(info['last_write'])}" + (f"  ({last:.0f} s ago)" if last is not None else ""))
    cfg = info["config"]
    print(
        f"clip         eps_low {cfg['eps_low']}, eps_high {cfg['eps_high']}, dual-clip c {cfg['dual_clip_c']}, "
        f"TIS cap {cfg['tis_cap']}"
    )
    print(f"writers      {len(info['resume_points'])} (resume points):")
    for w in info["resume_points"]:
        state = "closed" if w.get("closed") is not None else "open or crashed"
        print(
            f"  rank {w['rank']}  started {_when(w['started'])}  first step {w['first_step']}  {state}  {w['writer']}"
        )
    if info["superseded"]:
        print(
            f"superseded   records a restart replaced (on disk, counted nowhere; {info['records_superseded']} records):"
        )
        for x in info["superseded"]:
            print(
                f"  rank {x['rank']}  steps {x['from_step']} .. {x['to_step']} of {x['writer']}  "
                f"(restarted by {x['by']})"
            )
    for g in info["gaps"]:
        print(
            f"gap          rank {g['rank']}  steps {g['from_step']} .. {g['to_step']} hold no data "
            f"(restart {g['writer']} began later than the rank's last published step)"
        )
    if info["problems"]:
        print(f"problems     {len(info['problems'])}:")
        for p in info["problems"]:
            print(f"  - {p}")
    else:
        print("problems     none")
    return 0
