"""Helpers shared by the CLI commands: opening runs with clear errors, step ranges, output formats."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import json
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypedDict

import polars as pl

from rldiag.cli import CLIError

if TYPE_CHECKING:
    from rldiag.analysis.io import Run


@contextmanager
def stop_on_signals(stop: threading.Event, command: str = "rldiag") -> Iterator[threading.Event]:
    """While inside, SIGTERM (a scheduler, ``kill``, a pod's shutdown) and a first Ctrl-C (SIGINT) set ``stop``
    instead of interrupting whatever runs, so that a follow loop ends after the step or pass in progress: nothing
    it writes (an alert history, a tracker's step, a run's files) is left half-done, what it holds is flushed and
    its summary printed. The first signal says so on stderr (``command: stopping ...``), since a pass can take a
    while (a slow store); a second Ctrl-C raises KeyboardInterrupt at once, as without this. The previous
    handlers are put back on leaving. Outside the main thread, where Python cannot install handlers, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        if not stop.is_set():
            with contextlib.suppress(RuntimeError, OSError):  # stderr busy in the interrupted code, or closed
                print(f"{command}: stopping after the work in progress (Ctrl-C again stops at once)", file=sys.stderr)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ReadTrouble:
    """What a follow loop (``watch``, ``export --follow``) says on stderr about runs it read before and cannot read
    now (a network store, a mount): once when a run stops being readable or the reason changes, once when it is
    read again, nothing while it stays either way."""

    def __init__(self, command: str, interval: float) -> None:
        self.command, self.interval = command, interval
        self._why: dict[str, str | None] = {}

    def update(self, name: str, why: str | None) -> None:
        """The outcome of one pass over run ``name``: ``why`` it could not be read, None when it could."""
        before = self._why.get(name)
        if why and why != before:
            print(
                f"{self.command}: cannot read {name} ({why}); trying again every {self.interval:g} s", file=sys.stderr
            )
        elif before and not why:
            print(f"{self.command}: reading {name} again", file=sys.stderr)
        self._why[name] = why


def check_port(host: str, port: int) -> None:
    """A :class:`~rldiag.cli.CLIError` when the dashboard could not listen on ``host:port`` (another program
    holds it, or the host is not this machine's), said before anything is loaded; the web server's own message
    would come after the start-up lines, with a traceback-like text."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed one's port is free
            s.bind((host.strip("[]"), port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = "another program (a dashboard already running?) listens there; stop it or pass another --port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "that is not an address of this machine; pass --host 127.0.0.1 or one of its addresses"
        else:
            hint = "pass another --port or --host"
        raise CLIError(f"cannot serve the dashboard on {host}:{port} ({exc.strerror or exc}): {hint}") from None


def open_run_or_fail(path: str) -> Run:
    """The run at ``path`` (a folder or a URI); a :class:`~rldiag.cli.CLIError` saying why it cannot be opened."""
    from rldiag.analysis.io import open_run

    try:
        return open_run(path)
    except (OSError, ValueError, ImportError) as exc:  # missing, not a run, a link, no backend for the URI
        raise CLIError(str(exc)) from None


class EngineKwargs(TypedDict):
    """The ``engine=`` / ``ray_address=`` keyword arguments of the analysis calls that read token rows."""

    engine: str
    ray_address: str | None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray`` and ``--ray-address`` for a command that reads token rows."""
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where token rows are read and computed: this process (default) or a Ray cluster",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join with --engine ray (default: RAY_ADDRESS, else a local Ray)",
    )


def engine_kwargs(args: argparse.Namespace) -> EngineKwargs:
    """``engine=`` and ``ray_address=`` for the analysis call; a clear error when Ray is missing."""
    if args.engine == "ray":
        from rldiag.analysis.ray_engine import require_ray

        try:
            require_ray()
        except ImportError as exc:
            raise CLIError(str(exc)) from None
    elif args.ray_address:
        raise CLIError("--ray-address needs --engine ray")
    return {"engine": args.engine, "ray_address": args.ray_address}


def parse_steps(text: str | None) -> slice | None:
    """``A:B`` (B exclusive), ``A:`` or ``:B`` or a single step ``A``.

    >>> parse_steps("100:200"), parse_steps(":5"), parse_steps("7"), parse_steps(None)
    (slice(100, 200, None), slice(None, 5, None), slice(7, 8, None), None)
    """
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            sl = slice(int(a) if a else None, int(b) if b else None)
        else:
            s = int(text)
            sl = slice(s, s + 1)
    except ValueError:
        raise CLIError(f"--steps must look like 100:200, 100: or :200 (got {text!r})") from None
    if sl.start is not None and sl.stop is not None and sl.stop <= sl.start:
        raise CLIError(f"--steps {text} holds no step: A:B means A <= step < B, so B must be above A")
    return sl


def steps_in(run: Run, text: str | None) -> list[int] | None:
    """The run's steps within ``A:B`` (see :func:`parse_steps`); None for all of them."""
    sl = parse_steps(text)
    if sl is None:
        return None
    return [s for s in run.steps() if (sl.start is None or s >= sl.start) and (sl.stop is None or s < sl.stop)]


def select_metrics(pattern: str | None) -> list[str]:
    """Registry names matching a comma-separated list of glob patterns (``clip/*,entropy/mean``)."""
    from rldiag.metrics.registry import REGISTRY

    if not pattern:
        return list(REGISTRY)
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    names = [n for n in REGISTRY if any(fnmatch.fnmatchcase(n, p) or n.startswith(p.rstrip("/") + "/") for p in pats)]
    if not names:
        raise CLIError(f"no metric matches {pattern!r}; `rldiag summarize --list` shows the names")
    return names


def fmt(v: object) -> str:
    """A table cell: floats to 4 decimals (scientific when tiny or huge), ``None`` as ``-``.

    >>> fmt(0.5), fmt(1e-5), fmt(float("nan")), fmt(None), fmt(3), fmt(-0.0)
    ('0.5000', '1.000e-05', 'nan', '-', '3', '0.0000')
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        v += 0.0  # -0.0 (a product of a zero and a negative, say) reads 0
        a = abs(v)
        if a != 0 and (a < 1e-3 or a >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns`` (a missing cell prints as ``-``)."""
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def write_frame(df: pl.DataFrame, form: str) -> None:
    """Print a frame as ``csv``, strict ``json`` (NaN/Inf as null) or a full text table (any other ``form``)."""
    if form == "csv":
        sys.stdout.write(df.write_csv())
    elif form == "json":
        print(json.dumps(clean_json(df.to_dicts()), default=_json_default, allow_nan=False))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
            print(df)


def _json_default(v: Any) -> Any:
    return None


def clean_json(obj: Any) -> Any:
    """NaN/Inf -> None so the output is strict JSON (inside dicts and lists too).

    >>> clean_json({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    return obj
