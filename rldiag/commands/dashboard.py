"""``rldiag dashboard [PATH]``: browse runs in a web dashboard (live runs update as they train).

PATH is one run directory or a folder of runs (searched a few levels deep); without it the bundled sample
runs open. The server listens on 127.0.0.1 unless told otherwise: to share it, bind another address and
turn on basic authentication (``--auth USER:PASSWORD``), ideally behind a TLS reverse proxy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rldiag.cli import CLIError
from rldiag.commands._util import check_port

AUTH_ENV = "RLDIAG_DASHBOARD_AUTH"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="web dashboard: live runs, every diagnostic, drill-down to tokens",
        description=(__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        metavar="PATH",
        nargs="?",
        help="a run or a folder of runs, local or on object storage (s3://bucket/runs; default: the sample runs)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="require HTTP basic authentication (or set RLDIAG_DASHBOARD_AUTH, which keeps the "
        "password out of the process list)",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="local tokenizer folder (transformers AutoTokenizer) to decode token ids"
    )
    p.add_argument("--poll", metavar="S", type=float, default=2.0, help="seconds between live updates (default 2)")
    p.add_argument(
        "--debug",
        action="store_true",
        help="Dash debug mode (dev tools, reloader off); only with --auth on a loopback --host",
    )
    p.add_argument("--verbose", action="store_true", help="print the web server's log line of every request")
    p.set_defaults(func=run)


def build(args: argparse.Namespace) -> Any:
    """The Dash app for ``args`` (validated); separate from :func:`run` so tests need not serve it."""
    from app.app import create_app, parse_auth

    if args.path is not None:
        from rldiag import storage

        try:
            path = storage.location(args.path)
        except (ImportError, ValueError) as exc:
            raise CLIError(str(exc)) from None
        if not path.exists():
            raise CLIError(f"{path} does not exist: pass a run directory or a folder of runs")
        if not path.is_dir():
            raise CLIError(f"{path} is a file: pass the run directory (the folder the recorder wrote)")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise CLIError(f"--tokenizer {args.tokenizer} is not a folder (save one with tokenizer.save_pretrained)")
    if not (0 < args.port < 65536):
        raise CLIError(f"--port must be in 1..65535 (got {args.port})")
    if args.poll <= 0:
        raise CLIError("--poll must be positive")
    try:
        auth = parse_auth(auth_value(args))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if getattr(args, "debug", False):
        from app.security import debug_refusal

        refusal = debug_refusal(args.host, auth)
        if refusal:
            raise CLIError(refusal)
    try:
        app = create_app(args.path, auth=auth, tokenizer=args.tokenizer, poll_seconds=args.poll)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    from app.security import request_log

    request_log(bool(getattr(args, "verbose", False)))
    return app


def auth_value(args: argparse.Namespace) -> str | None:
    return args.auth if args.auth is not None else (os.environ.get(AUTH_ENV) or None)


def run(args: argparse.Namespace) -> int:
    from app.app import exposure_warning, parse_auth

    app = build(args)
    check_port(args.host, args.port)
    warning = exposure_warning(args.host, parse_auth(auth_value(args)))
    if warning:
        print(f"rldiag dashboard: {warning}", file=sys.stderr)
    from app.app import preload
    from app.data import catalog

    cat = catalog()
    preload(cat)
    print(f"rldiag dashboard: serving {len(cat.run_ids())} run(s) from {cat.root}", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    print(f"rldiag dashboard: open http://{host}:{args.port}/", file=sys.stderr)
    app.run(host=args.host, port=args.port, debug=args.debug, use_reloader=False)
    return 0
