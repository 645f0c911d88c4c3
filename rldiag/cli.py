"""The ``rldiag`` command line.

Each sub-command lives in its own module under :mod:`rldiag.commands` and exposes
``register(subparsers) -> None``; the module registers its parser(s) and sets ``func`` on them
(``parser.set_defaults(func=run)``, with ``run(args: argparse.Namespace) -> int``). This file only
discovers and dispatches, so adding a command never touches it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from rldiag import __version__


class CLIError(Exception):
    """An error whose message is shown to the user as is (no traceback); exit status 2."""


RUN_HELP = "run directory, or its URI on object storage (s3://bucket/runs/exp1; gs://, az://, hdfs://)"
"""The help of every command's run argument: each opens a run wherever :mod:`rldiag.storage` reaches."""

RUNS_HELP = "each a run directory or its URI on object storage (s3://bucket/runs/exp1; gs://, az://, hdfs://)"
"""The same, for commands that take several runs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rldiag",
        description="Diagnostics for RL training of language models: record, analyze, watch, browse.",
    )
    parser.add_argument("--version", action="version", version=f"rldiag {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import rldiag.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"rldiag.commands.{info.name}")
        module.register(sub)
    return parser


def _one_line_warnings(command: str, default: Any) -> Any:
    """``warnings.showwarning`` for a command: rldiag's own warnings (about the run's files, say) as one line
    ``rldiag COMMAND: warning: ...`` on stderr, without the source line Python shows for a programmer; any
    other warning as Python shows it."""
    from rldiag.runformat import RunFormatWarning

    def show(
        message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if issubclass(category, RunFormatWarning):
            print(f"rldiag {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"rldiag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"rldiag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of the output went away (`rldiag summarize RUN | head`): stop quietly, as `cat` does, and
        # point stdout at /dev/null so that the interpreter's last flush does not fail again
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        from rldiag.storage import backend_error

        message = backend_error(exc)  # an object store's client: no credentials, an endpoint it cannot reach...
        if message is None:
            raise
        print(f"rldiag {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
