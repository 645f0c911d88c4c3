"""``rldiag precompile``: compile rldiag's kernels into numba's on-disk cache (for container images and jobs)."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precompile",
        help="compile rldiag's kernels into numba's cache now (a container image's build, a job's setup)",
        description=(
            "Compile every numba kernel of rldiag (the recorder's statistics, recomputes, bucket tables, the "
            "lens, the dashboard's smoothing) into numba's on-disk cache, so that a process started later loads "
            "them instead of compiling them at first use (about 9 s before a recorder's first statistics on a "
            "2-core machine, 30-50 s for all of them). The cache is numba's: __pycache__ beside the installed "
            "modules, or NUMBA_CACHE_DIR. numba keys it on the CPU: compile on the CPU model the jobs run on."
        ),
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rldiag.precompile import precompile

    done = precompile()
    if args.format == "json":
        print(json.dumps(done.as_dict()))
        return 0
    where = f"numba's cache under {os.path.commonpath(done.cache_dirs)}" if done.cache_dirs else "numba's cache"
    if done.compiled:
        print(
            f"rldiag precompile: compiled {len(done.compiled)} functions into {where} in {done.seconds:.1f} s "
            f"({len(done.loaded)} were there already); processes started from this installation load them",
        )
    else:
        print(
            f"rldiag precompile: every function was already compiled in {where} ({len(done.loaded)} loaded, "
            f"{done.seconds:.1f} s); nothing to do",
        )
    return 0
