"""Following a run directory as it grows: which steps are complete, whether the run is closed, when data landed.

Used by ``rldiag watch`` and by the online evaluator of a multi-rank run (rank 0 reads every rank's
published statistics, so it evaluates exactly merged metrics).

A step is *complete* when every rank of the run has data of a later step, in a published segment or its live
tail (a writer may publish a step's first micro-batches in one segment and the rest in the next), or when the
run's writers closed it (:func:`rldiag.runformat.complete_steps`, which the live export follows too).
Evaluating only complete steps keeps the engine exact: it never sees a step twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rldiag import runformat, storage
from rldiag.alerts.engine import Engine, Notification
from rldiag.runformat import ALERTS_FILE, complete_steps, last_step_per_rank

__all__ = ["RunFollower", "run_closed", "newest_mtime", "complete_steps", "last_step_per_rank", "ALERTS_FILE"]


def run_closed(run: Any) -> bool:
    """Whether the run's writers closed it (a closed run cannot stall): :func:`rldiag.runformat.run_closed`
    on ``run.path``. A crashed writer does not close the run, so its stall alert still fires."""
    return runformat.run_closed(run.path)


def newest_mtime(path: storage.Location) -> float | None:
    """When data last landed in the run at ``path`` (:func:`rldiag.runformat.newest_data_time`)."""
    return runformat.newest_data_time(path)


class RunFollower:
    """Evaluates the complete steps of a run directory with an :class:`Engine`, one :meth:`poll` at a time.

    ``open_run`` opens the directory (default :func:`rldiag.open_run`); a directory that is not a run yet
    (no manifest) is retried at the next poll.
    """

    def __init__(
        self,
        run_dir: str | storage.Location,
        engine: Engine,
        *,
        open_run: Callable[[storage.Location], Any] | None = None,
        augment: Callable[[Any, Any], Any] | None = None,
        reload: Callable[[], Engine] | None = None,
    ):
        self.run_dir = storage.location(run_dir)
        self.engine = engine
        self.reload = reload
        """Builds an engine that resumes from the run's alert history as it is now: given, a restart seen while
        following (records this follower had evaluated were replaced) replaces :attr:`engine` with a new one that
        evaluates the run again as it now stands, as a follower started then would (nothing sent is sent again)."""
        self._open_run = open_run
        self.augment = augment
        """``augment(run, frame) -> frame`` adds columns (e.g. cliff/headroom from token rows) before evaluation."""
        self.run: Any = None
        self.polls = 0
        self._restarts: tuple[Any, ...] | None = None  # the run's restarts at the last poll

    def _open(self) -> Any:
        if self._open_run is not None:
            return self._open_run(self.run_dir)
        import rldiag

        return rldiag.open_run(self.run_dir)

    def ensure_open(self) -> bool:
        if self.run is None:
            try:
                self.run = self._open()
            except FileNotFoundError:
                return False
        return True

    def poll(self, now: float, *, closed: bool | None = None) -> list[Notification]:
        """Rescan, evaluate the newly complete steps, apply close/reopen, check stalls and repeats.

        ``closed``: override what the writer files say (the online evaluator knows when it is closed).
        """
        events: list[Notification] = []
        if not self.ensure_open():
            return events
        # closed first, then the listing: every segment published before the close mark is then seen
        is_closed = run_closed(self.run) if closed is None else closed
        if self.polls or is_closed:
            self.run.refresh()
        resume = getattr(self.run, "resume", None)
        restarts = resume.restart_keys() if resume is not None else ()
        if restarts != (self._restarts or ()):  # history events computed from records a restart replaced
            if self._restarts is not None and set(restarts) - set(self._restarts) and self.reload is not None:
                self.engine = self.reload()  # the steps evaluated from replaced records are evaluated again
            self.engine.supersede(resume.superseded_alert)  # type: ignore[union-attr]
        self._restarts = restarts
        steps = complete_steps(self.run, after=self.engine.last_step, closed=is_closed)
        if steps:
            frame = self.run.step_metrics(steps=steps)
            if self.augment is not None:
                frame = self.augment(self.run, frame)
            data_time = newest_mtime(self.run_dir)
            events += self.engine.update(frame, now=now, data_time=min(now, data_time or now), backfill=self.polls == 0)
        if is_closed and not self.engine.closed:
            events += self.engine.close(now)
        elif not is_closed and self.engine.closed:
            self.engine.reopen()
        if not is_closed:
            data_time = newest_mtime(self.run_dir)
            if data_time is not None:
                events += self.engine.touch(now=now, data_time=min(now, data_time))
        events += self.engine.tick(now)
        self.polls += 1
        return events
