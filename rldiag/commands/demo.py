"""``rldiag demo``: train a tiny model with GRPO on the CPU, record it, and tell what the diagnostics saw.

A 2-layer Llama built from a config learns a synthetic task with TRL's GRPOTrainer (no download). It learns
healthily, then at --change-step the learning rate jumps and each rollout batch is reused many times: the
ratios grow heavy tails and the entropy collapses, caused by the training itself. The same --seed gives the
same run. Needs the demo extra: pip install 'rldiag[demo]'.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rldiag.cli import CLIError
from rldiag.commands._util import check_port


def register(subparsers: Any) -> None:
    from rldiag.demo.config import TIMING, DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train a tiny model with GRPO on the CPU, recorded with rldiag (healthy, then a collapse)",
        description=(__doc__ or "").split("\n\n", 1)[-1].rstrip() + f"\n\nMeasured: {TIMING}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=d.out, help=f"run directory to write (default {d.out})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, prompts and sampling (default {d.seed})")
    p.add_argument(
        "--change-step",
        type=int,
        default=None,
        metavar="N",
        help=f"last healthy step; the regime changes after it (default {d.change_step}, scaled "
        f"by --steps/{d.steps} when --steps is given)",
    )
    p.add_argument("--healthy", action="store_true", help="no change of regime: the healthy run")
    p.add_argument("--no-alerts", action="store_true", help="do not evaluate alert rules while training")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument(
        "--serve",
        action="store_true",
        help="open the dashboard on the run while it trains (and keep serving until Ctrl-C)",
    )
    p.add_argument("--host", default="127.0.0.1", help="dashboard address with --serve (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050, help="dashboard port with --serve (default 8050)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~rldiag.demo.config.DemoConfig` the arguments ask for (validated)."""
    from rldiag.demo.config import DemoConfig

    d = DemoConfig()
    if args.steps < 2:
        raise CLIError(f"--steps must be at least 2 (got {args.steps})")
    if args.healthy:
        change = 0
    elif args.change_step is not None:
        change = args.change_step
    elif args.steps == d.steps:
        change = d.change_step
    else:
        change = max(1, round(args.steps * d.change_step / d.steps))
    if change < 0 or (change and change >= args.steps):
        raise CLIError(f"--change-step must be between 1 and --steps - 1 ({args.steps - 1}); got {change}")
    return DemoConfig(
        out=args.out, steps=args.steps, seed=args.seed, change_step=change, alerts=not args.no_alerts, quiet=args.quiet
    )


def run(args: argparse.Namespace) -> int:
    from rldiag.demo.config import check_out

    cfg = config_from_args(args)
    try:  # arguments first: a wrong --out or port is refused before torch and TRL are imported (seconds)
        check_out(cfg.out)
    except FileExistsError as exc:
        raise CLIError(str(exc)) from None
    if args.serve:
        check_port(args.host, args.port)
    _check_installed()
    from rldiag.demo.summary import summarize
    from rldiag.demo.train import main

    on_start = (lambda run_dir: start_dashboard(run_dir, args.host, args.port)) if args.serve else None
    if not cfg.quiet:
        what = "healthy throughout" if not cfg.change_step else f"regime change after step {cfg.change_step}"
        print(f"rldiag demo: GRPO on a tiny Llama, {cfg.steps} steps, seed {cfg.seed}, {what} -> {cfg.out}", flush=True)
    try:
        run_dir = main(cfg, on_start=on_start)
    except FileExistsError as exc:
        raise CLIError(str(exc)) from None
    print(summarize(run_dir))
    print(f"\nexplore it: rldiag dashboard {run_dir}    |    rldiag summarize {run_dir}")
    if args.serve:
        print("rldiag demo: the dashboard keeps serving; Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    return 0


def _check_installed() -> None:
    from importlib.util import find_spec

    missing = [mod for mod in ("torch", "trl", "datasets", "accelerate") if find_spec(mod) is None]  # no import
    if missing:
        raise CLIError(
            f"the demo needs {', '.join(missing)}: pip install 'rldiag[demo]' "
            "(and torch==2.13.0 first for the CPU build)"
        )


# ---- --serve: the dashboard hook ----------------------------------------------------------------------
# The dashboard lives in the separate `app` package (Dash). It is imported only here, lazily, so the demo
# runs without it; if it is missing the demo says so and trains anyway.
def start_dashboard(run_dir: Path, host: str, port: int) -> threading.Thread | None:
    """Serve the dashboard on ``run_dir`` from a daemon thread; None (with a message) if it is unavailable."""
    try:
        from app.app import create_app
    except ImportError as exc:
        print(
            f"rldiag demo: --serve: the dashboard is not available here ({exc}); training continues. "
            f"Afterwards: rldiag dashboard {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        return None
    dash_app = create_app(str(run_dir), poll_seconds=2.0)
    thread = threading.Thread(
        target=dash_app.run,
        kwargs={"host": host, "port": port, "debug": False, "use_reloader": False},
        name="rldiag-dashboard",
        daemon=True,
    )
    thread.start()
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(
        f"rldiag demo: dashboard at http://{shown}:{port}/ (updates live while training)", file=sys.stderr, flush=True
    )
    return thread
