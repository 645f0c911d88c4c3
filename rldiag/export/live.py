"""Live export from the recorder: ``Recorder(..., log_to=..., metrics_port=...)``.

The recorder's writer thread hands each processed statistics table to :meth:`LiveExport.observe_stats`, which
only enqueues (a full queue drops the table and counts it). A worker thread of its own finalizes a step once a
newer one arrives (or at close), writes its metrics and histograms to the trackers and updates the Prometheus
endpoint, so neither training nor the writer ever waits for a tracker.

On a multi-rank run only rank 0 exports, and it exports the numbers of every rank merged: instead of its own
tables it reads the run directory every :data:`FOLLOW_INTERVAL` seconds, as ``rldiag export RUN --follow``
does (:func:`rldiag.export.trackers.export_pass`), and writes the steps complete on every rank (in their
segments or live tails).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from rldiag.export.trackers import Exporter, export_pass, make_exporter, replace_from, step_histograms
from rldiag.runformat import RANKS_CLOSE_WAIT, complete_steps, read_until_closed, run_closed

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["LiveExport", "parse_log_to"]

log = logging.getLogger("rldiag.export")

FOLLOW_INTERVAL = 5.0
"""Seconds between a multi-rank live export's reads of the run directory (each costs a listing and the live
tails: about 0.08 s of CPU with 8 ranks)."""

LogTo: TypeAlias = "Exporter | str | Iterable[Exporter | str] | Literal[False] | None"
"""What ``Recorder(log_to=...)`` takes: an exporter, a ``"kind:target"`` string, a list of those, or nothing."""


def parse_log_to(log_to: LogTo, run: str) -> list[Exporter]:
    """Exporters from ``log_to``: an :class:`Exporter`, a string ``"tensorboard:DIR"``, ``"mlflow:URI"``,
    ``"wandb"`` / ``"wandb:DIR"``, ``"trackio"`` / ``"trackio:PROJECT"``, or a list of those."""
    if log_to is None or log_to is False:
        return []
    items: Sequence[Any] = [log_to] if isinstance(log_to, (str, Exporter)) else list(log_to)
    out: list[Exporter] = []
    for item in items:
        if isinstance(item, Exporter):
            out.append(item)
        elif isinstance(item, str):
            kind, _, target = item.partition(":")
            out.append(make_exporter(kind, target or None, run))
        else:
            raise TypeError(f"log_to takes exporters or strings like 'tensorboard:DIR'; got {type(item).__name__}")
    return out


@dataclass
class _Drain:
    """Export what was handed over now (:meth:`LiveExport.drain`)."""

    until: float
    """Following several ranks: until when (``time.monotonic()``) to read the run again while a rank's writer file
    does not say closed yet."""
    done: threading.Event = field(default_factory=threading.Event)


class LiveExport:
    """Per-step export to trackers and a Prometheus endpoint, on its own thread.

    ``log_to``: see :func:`parse_log_to`. ``metrics_port``: serve the latest step's headline metrics on
    ``http://127.0.0.1:PORT/metrics`` (:class:`rldiag.export.prometheus.MetricsServer`). ``resumed``: this
    process is a later attempt of a restarted job (the recorder found an earlier writer of its rank), so what a
    tracker holds from its first step on was written by the attempt it replaces (:meth:`_replace_from`).
    ``follow``: the run directory of a multi-rank run, whose merged statistics are exported instead of the
    tables handed over (read every :data:`FOLLOW_INTERVAL` seconds, and at :meth:`drain` and :meth:`close`).
    """

    def __init__(
        self,
        log_to: LogTo = None,
        *,
        metrics_port: int | None = None,
        run: str = "run",
        queue_size: int = 64,
        resumed: bool = False,
        follow: Any = None,
    ):
        self.run = run
        self.resumed = resumed
        self.follow = follow
        self._run: Any = None  # the followed run, once it could be opened
        self._served: int | None = None  # the step the Prometheus endpoint shows, following
        self._seen: dict[int, Any] = {}  # exporter -> the run's restarts at its last pass (export_pass)
        self.exporters = parse_log_to(log_to, run)
        self.server = None
        if metrics_port is not None:
            from rldiag.export.prometheus import MetricsServer

            self.server = MetricsServer(metrics_port)
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None
        self.kept_earlier: list[tuple[str, int, int]] = []
        """(tracker, first, last step) a restarted job found in a tracker that cannot drop them: they keep the
        replaced attempt's numbers there (a warning says so)."""
        self._first_step: int | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._pending_step: int | None = None
        self._parts: list[Any] = []
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="rldiag-export", daemon=True)
        self._thread.start()

    def observe_stats(self, step: int, table: pa.Table) -> None:
        """Enqueue one processed statistics table (never blocks; a full queue drops it, counted)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait((int(step), table))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("rldiag export: queue full, %d step tables dropped so far", self.dropped)

    def drain(self, timeout: float | None = None) -> bool:
        """Write the newest step now, with the records it has, and flush the trackers; False if ``timeout``
        seconds pass first. A step is otherwise written once a record of a later step arrives: the recorder calls
        this when a signal stops the process, after its writer published. Records of that step that arrive later
        are not written (a tracker keeps a step once). Following several ranks (``follow``): the run directory is
        read again until every rank's writer file says closed, for at most half of ``timeout``, and the steps
        every rank completed are written (the last one too once all are closed)."""
        if self._closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        marker = _Drain(time.monotonic() + (RANKS_CLOSE_WAIT if timeout is None else timeout / 2))
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        if self.follow is not None:
            self._follow_loop()
            return
        while True:
            item = self._queue.get()
            if item is None:
                self._finish_step()
                return
            if isinstance(item, _Drain):
                self._finish_step()
                item.done.set()
                continue
            step, table = item
            if self._pending_step is not None and step != self._pending_step:
                self._finish_step()
            self._pending_step = step
            self._parts.append(table)

    def _follow_loop(self) -> None:
        """Multi-rank: read the run directory every :data:`FOLLOW_INTERVAL` seconds and export what every rank
        completed (the tables handed over only say that data arrives); at a drain, again until every rank's
        writer file says closed (the other ranks got the same signal), for at most the drain's ``until``; at
        close, once more."""
        next_pass = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_pass - time.monotonic()))
            except queue.Empty:
                item = ()  # time for the next pass
            if item is None:
                self._follow_pass(closed=None)
                return
            if isinstance(item, _Drain):
                read_until_closed(lambda: self._follow_pass(closed=None), self.follow, item.until)
                item.done.set()
            elif time.monotonic() < next_pass:
                continue  # a table before the next pass is due
            else:
                self._follow_pass(closed=False)  # this rank is running: the run is not closed
            next_pass = time.monotonic() + FOLLOW_INTERVAL

    def _follow_pass(self, closed: bool | None) -> bool:
        """One pass over the followed run (``closed`` None: as its writer files say); True when it was closed."""
        try:
            if self._run is None:
                import rldiag

                self._run = rldiag.open_run(self.follow)
            else:
                self._run.refresh()
            is_closed = run_closed(self._run.path) if closed is None else closed
            if is_closed:
                self._run.refresh()  # what was published between the listing and the close marks
            for exp in self.exporters:
                _, self._seen[id(exp)], note = export_pass(self._run, exp, self._seen.get(id(exp)), closed=is_closed)
                if note is not None:
                    log.warning("rldiag export: %s", note)
            if self.server is not None:
                done = complete_steps(self._run, after=self._served, closed=is_closed)
                if done:
                    row = self._run.step_metrics(steps=done[-1:]).row(0, named=True)
                    row.pop("step", None)
                    self.server.update(self.run, done[-1], row)
                    self._served = done[-1]
            return bool(is_closed)
        except FileNotFoundError:
            return False  # no manifest yet
        except Exception as exc:  # an exporter or a read must never take the recorder down
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("rldiag export: following %s: %s", self.follow, self.last_error)
            return False

    def _finish_step(self) -> None:
        if self._pending_step is None or not self._parts:
            return
        step, parts = self._pending_step, self._parts
        self._pending_step, self._parts = None, []
        try:
            import pyarrow as pa

            from rldiag.metrics.aggregate import metrics_of

            table = pa.concat_tables(parts)
            row = metrics_of(table).row(0, named=True)
            row.pop("step", None)
            hists = None
            if self._first_step is None:  # this attempt's first step: a restart replaces what trackers hold
                self._first_step = step
                if self.resumed:
                    self._replace_from(step)
            for exp in self.exporters:
                last = exp.last_step()
                if last is not None and step <= last:
                    continue  # already there (a restarted run)
                if exp.histograms and hists is None:
                    hists = step_histograms(table, [step]).get(step, {})
                exp.write(step, row, hists if exp.histograms else None)
                exp.flush()
            if self.server is not None:
                self.server.update(self.run, step, row)
        except Exception as exc:  # an exporter must never take the recorder down
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("rldiag export: step %s not exported: %s", step, self.last_error)

    def _replace_from(self, step: int) -> None:
        """A job restarted from a checkpoint at ``step``: the steps a tracker holds from there on were written by
        the attempt this one replaces (rldiag counts this attempt's). Each tracker that can drops them; for the
        others, one warning names the steps that keep the earlier numbers."""
        for exp in self.exporters:
            last = exp.last_step()
            note = replace_from(exp, step)
            if note is not None and last is not None:
                self.kept_earlier.append((exp.name, step, last))
                log.warning("rldiag export: %s", note)

    def close(self, timeout: float = 30.0) -> None:
        """Export the last step, close the trackers and the endpoint (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        for exp in self.exporters:
            try:
                exp.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("rldiag export: closing %s failed: %s", exp.name, exc)
        if self.server is not None:
            self.server.close()
