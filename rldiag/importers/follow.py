"""``rldiag import <trainer> SOURCE RUN --follow``: import a live dump folder as the trainer writes it.

The run is written directly (not staged: it is a live run, like one a Recorder writes during training); each
dump file is imported once it is complete (the format says so, e.g. prime-rl's ``STABLE`` marker, and its
size and modification time did not change between two looks), then published, so the dashboard and
``rldiag watch`` see every step seconds after the trainer wrote it. A bad file stops following in strict mode
(what was imported before stays: whole files only) and is skipped and counted in lenient mode.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from pathlib import Path
from typing import IO

from rldiag.config import RecorderConfig
from rldiag.importers._core import (
    DumpFormat,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
    RunBuilder,
    check_target,
)

__all__ = ["follow"]


def dump_format(trainer: str) -> DumpFormat:
    """The :class:`DumpFormat` of a trainer (its module's ``FORMAT``)."""
    from rldiag.importers import get

    fmt = getattr(importlib.import_module(get(trainer).module), "FORMAT", None)
    if fmt is None:
        raise ImportInputError(f"the {trainer} importer cannot follow a live folder")
    return fmt


def follow(
    trainer: str,
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy = "strict",
    poll: float = 2.0,
    idle_exit: float | None = None,
    stop: threading.Event | None = None,
    log: IO[str] | None = None,
) -> ImportReport:
    """Import ``source`` into ``run_dir`` and keep importing new files until ``stop`` is set, ``idle_exit``
    seconds pass without a new file, or Ctrl-C. Returns the report."""
    fmt = dump_format(trainer)
    cfg = config or RecorderConfig()
    report = ImportReport(trainer=trainer, source=str(source), errors=errors, run=str(run_dir))
    policy = Policy(errors, report)
    target = Path(run_dir)
    check_target(target)
    builder = RunBuilder(target, cfg, report, name=target.name)
    done: set[Path] = set()
    seen: dict[Path, tuple[int, int]] = {}
    last_new = time.monotonic()
    try:
        while True:
            try:
                files = fmt.list_files(Path(source))
            except ImportInputError:
                files = []  # not there yet (the trainer has not written its first dump)
            ready = []
            for f in files:
                if f.path in done:
                    continue
                try:
                    st = f.path.stat()
                except OSError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if seen.get(f.path) == sig and fmt.ready(f):
                    ready.append(f)
                else:
                    seen[f.path] = sig
            for f in ready:
                if stop is not None and stop.is_set():
                    break  # after the file in progress: a dump is imported whole or not at all
                done.add(f.path)
                report.files += 1
                before = report.tokens
                try:
                    for seq in fmt.read_file(f, policy, cfg.logp_tolerance):
                        builder.add(seq)
                except ImportInputError as exc:
                    if policy.strict:
                        raise
                    policy.report.skipped["bad file"] += 1
                    policy.report.first.setdefault("bad file", str(exc))
                builder.flush()
                if log is not None:
                    print(f"{f.path}: step {f.step}, {report.tokens - before:,} token rows", file=log, flush=True)
            if ready:
                last_new = time.monotonic()
            if stop is not None and stop.is_set():
                break
            if idle_exit is not None and time.monotonic() - last_new > idle_exit:
                break
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        builder.close()
    return report
