"""``rldiag export RUN --to TRACKER [TARGET]``: write a run's step metrics into an experiment tracker.

  rldiag export runs/exp1 --to tensorboard tb/exp1          # event files; then: tensorboard --logdir tb
  rldiag export runs/exp1 --to mlflow sqlite:///mlflow.db   # an MLflow run tagged rldiag.run=exp1
  WANDB_MODE=offline rldiag export runs/exp1 --to wandb wandb-out   # a W&B run rldiag-exp1 (wandb sync uploads)
  rldiag export runs/exp1 --to trackio rldiag               # a trackio run in project rldiag

Every step metric (or those named with --metric) is written at the run's own steps; TensorBoard, W&B and
trackio also get the per-step log-ratio and entropy histograms. Only complete steps are written (on a live run, the step
in progress waits). Running it again writes only the steps the tracker does not hold yet. --follow keeps
exporting the steps of a live run as they complete, until the run is closed. Ctrl-C or SIGTERM end an export
after the step being written (a tracker never holds part of a step) and print what was written; a second Ctrl-C
stops at once.
"""

from __future__ import annotations

import argparse
import sys
import threading

from rldiag import storage
from rldiag.cli import RUN_HELP
from rldiag.commands._util import ReadTrouble, stop_on_signals
from rldiag.storage import read_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's step metrics (and histograms) into TensorBoard, MLflow, W&B or trackio",
        description=(__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument(
        "--to",
        nargs="+",
        metavar=("TRACKER", "TARGET"),
        required=True,
        help="tensorboard DIR | mlflow URI | wandb [DIR] | trackio [PROJECT]",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME",
        help="export only this metric (repeatable; default: every step metric)",
    )
    p.add_argument("--follow", action="store_true", help="keep exporting new steps until the run is closed")
    p.add_argument(
        "--interval", type=float, default=5.0, metavar="S", help="seconds between rescans with --follow (default 5)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import rldiag
    from rldiag.alerts.follow import run_closed
    from rldiag.alerts.online import run_label
    from rldiag.cli import CLIError
    from rldiag.export.trackers import export_pass, make_exporter, select_metrics

    if len(args.to) > 2:
        raise CLIError(f"--to takes a tracker and its target, got {' '.join(args.to)}")
    kind, target = args.to[0], (args.to[1] if len(args.to) > 1 else None)
    if args.interval <= 0:
        raise CLIError(f"--interval must be positive, got {args.interval}")
    run_dir = storage.location(args.run)
    try:
        r = rldiag.open_run(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"cannot read run {run_dir}: {exc}") from None
    if args.metric and r.steps():
        try:
            select_metrics(r.step_metrics(steps=r.steps()[:1]).columns, args.metric)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    try:
        exporter = make_exporter(kind, target, run_label(run_dir))
    except (ImportError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    total = 0
    stop = threading.Event()
    try:
        with stop_on_signals(stop, "rldiag export"):
            trouble = ReadTrouble("rldiag export", args.interval)
            seen: set[tuple[int, int, str]] | None = None  # the restarts of the run at the last pass
            passes = 0
            while True:
                passes += 1
                try:
                    if passes > 1:
                        r.refresh()  # the files published since the last pass
                    closed = run_closed(r)
                    if closed and args.follow:
                        r.refresh()  # what was published between the last refresh and the close mark
                    written, seen, note = export_pass(
                        r, exporter, seen, closed=closed, metrics=args.metric or None, stop=stop
                    )
                    total += written
                    if note is not None:
                        print(f"rldiag export: {r.name}: {note}", file=sys.stderr)
                except ValueError as exc:
                    raise CLIError(str(exc)) from None
                except Exception as exc:
                    # following, a run read before that cannot be read now (network, mount): try again later
                    message = read_failure(exc) if args.follow else None
                    if message is None:
                        raise
                    trouble.update(r.name, message)
                    closed = False
                else:
                    trouble.update(r.name, None)
                if not args.follow or closed or stop.is_set():
                    break
                if stop.wait(args.interval):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        exporter.close()
    print(
        f"rldiag export: {total} step(s) of {r.name} written to {kind}"
        + (f" {target}" if target else "")
        + (f" (last step {exporter.last_step()})" if exporter.last_step() is not None else ""),
        file=sys.stderr,
    )
    return 0
