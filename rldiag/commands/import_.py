"""``rldiag import tokens FILE RUN`` and ``rldiag import <trainer> SOURCE RUN``: runs from data made elsewhere.

Every importer stops at the first bad value with one line naming the file, the row or record and the column
(``--errors strict``, the default) or skips and counts what it cannot use (``--errors lenient``); either way
the run is built in a staging folder and appears only when the import succeeded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from rldiag.cli import CLIError
from rldiag.commands._util import stop_on_signals

if TYPE_CHECKING:
    from rldiag.config import RecorderConfig

_T = TypeVar("_T")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="new run directory (must not exist, or be empty)")
    p.add_argument(
        "--errors",
        choices=("strict", "lenient"),
        default="strict",
        help="strict: stop at the first bad value (file, row, column); lenient: skip and count bad "
        "rows/records (default: strict)",
    )
    p.add_argument("--eps-low", type=float, default=0.2, help="the trainer's lower clip (clip/* metrics)")
    p.add_argument("--eps-high", type=float, default=0.2, help="the trainer's upper clip (clip/* metrics)")
    p.add_argument(
        "--tis-cap",
        type=float,
        default=2.0,
        help="importance-ratio cap C counted by mismatch/tis_frac and mismatch/mis_frac",
    )
    p.add_argument("--quiet", action="store_true", help="print only errors")


def register(sub: argparse._SubParsersAction) -> None:
    from rldiag.importers import TRAINERS

    p = sub.add_parser(
        "import", help="build an rldiag run (with statistics) from token rows or another trainer's dumps"
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    t = kinds.add_parser("tokens", help="a Parquet or CSV file with rldiag's token-row columns (docs/run-format.md)")
    t.add_argument("file")
    _common(t)
    t.set_defaults(func=run_tokens)
    for imp in TRAINERS.values():
        if importlib.util.find_spec(imp.module) is None:
            continue
        tp = kinds.add_parser(imp.name, help=imp.help)
        tp.add_argument("source", help=imp.source_help)
        _common(tp)
        tp.add_argument(
            "--follow",
            action="store_true",
            help="keep importing new dump files as the trainer writes them (Ctrl-C or SIGTERM stops)",
        )
        tp.add_argument("--poll", type=float, default=2.0, help="--follow: seconds between looks (default 2)")
        tp.add_argument(
            "--idle-exit", type=float, default=None, help="--follow: stop after this many seconds without a new file"
        )
        tp.set_defaults(func=run_trainer, trainer=imp.name)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _config(args: argparse.Namespace) -> RecorderConfig:
    from rldiag.config import RecorderConfig

    try:
        return RecorderConfig(eps_low=args.eps_low, eps_high=args.eps_high, tis_cap=args.tis_cap, errors=args.errors)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _guard(what: str, fn: Callable[[], _T]) -> _T:
    """Run an import; any failure becomes one line (CLIError), never a traceback."""
    from rldiag.importers._core import ImportInputError, one_line

    try:
        return fn()
    except (CLIError, KeyboardInterrupt):
        raise
    except ImportInputError as exc:
        raise CLIError(one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the promise is one line for any input, never a traceback
        raise CLIError(f"{what}: {type(exc).__name__}: {one_line(exc)}; no run was published") from None


def run_tokens(args: argparse.Namespace) -> int:
    from rldiag.importers.tokens import import_token_file

    report = _guard(
        f"importing {args.file}",
        lambda: import_token_file(args.file, args.run, config=_config(args), errors=args.errors),
    )
    if not args.quiet:
        print(report.summary())
        print(f"try `rldiag summarize {args.run}`")
    return 0


def run_trainer(args: argparse.Namespace) -> int:
    from rldiag.importers import ImportReport, get

    imp = get(args.trainer)
    cfg = _config(args)
    if args.follow:
        from rldiag.importers.follow import follow

        with stop_on_signals(threading.Event(), "rldiag import") as stop:
            report = _guard(
                f"following {args.source}",
                lambda: follow(
                    imp.name,
                    args.source,
                    args.run,
                    config=cfg,
                    errors=args.errors,
                    poll=args.poll,
                    idle_exit=args.idle_exit,
                    stop=stop,
                    log=None if args.quiet else sys.stdout,
                ),
            )
    else:
        report = ImportReport(trainer=imp.name, source=args.source)
        fn = _guard(f"the {imp.name} importer", imp.load)
        _guard(
            f"importing {args.source}", lambda: fn(args.source, args.run, config=cfg, errors=args.errors, report=report)
        )
    if not args.quiet:
        print(report.summary())
        print(f"try `rldiag summarize {args.run}`")
    return 0
