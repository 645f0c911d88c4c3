"""The recorder: the only rldiag object a training loop touches.

``record()`` checks shapes, takes host snapshots of its inputs (asynchronous for CUDA tensors: it never
synchronises the GPU) and hands them to a background :class:`~rldiag.record.writer.Writer` through a bounded
queue. Statistics cover every token; when the queue is full, the record's statistics are computed at once
and its token rows are dropped (counted), so training is never held up for more than
``RecorderConfig.max_block_seconds``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from rldiag import runformat, schema, storage
from rldiag.config import RecorderConfig
from rldiag.record.scalars import ScalarLog, check_step
from rldiag.record.tensors import BufferPool, HostSnapshot, is_torch, shape_of
from rldiag.record.writer import Job, Precomputed, Writer, WriterError, build_batch, check_values, resolve_problems
from rldiag.stats import kernel

log = logging.getLogger("rldiag")

# argument name -> (column name, allowed shapes: "BT", "B", "B|BT", is float)
_ARGS: dict[str, tuple[str, str, bool]] = {
    "logprobs": (schema.LOGP, "BT", True),
    "old_logprobs": (schema.OLD_LOGP, "BT", True),
    "advantages": (schema.ADV, "B|BT", True),
    "mask": ("mask", "BT", False),
    "entropy": (schema.ENTROPY, "BT", True),
    "rollout_logprobs": (schema.ROLLOUT_LOGP, "BT", True),
    "ref_logprobs": (schema.REF_LOGP, "BT", True),
    "teacher_logprobs": (schema.TEACHER_LOGP, "BT", True),
    "base_logprobs": (schema.BASE_LOGP, "BT", True),
    "group_ids": (schema.GROUP, "B", False),
    "rewards": (schema.REWARD, "B", True),
    "token_ids": (schema.TOKEN_ID, "BT", False),
    "versions": (schema.VERSION, "B|BT", False),
    "turns": (schema.TURN, "B|BT", False),
    "stages": (schema.STAGE, "B|BT", False),
    "route_agree": (schema.ROUTE_AGREE, "BT", True),
}
_INTEGER_ARGS = ("group_ids", "token_ids", "versions", "turns", "stages")
_LOGPROB_ARGS = ("logprobs", "old_logprobs", "rollout_logprobs", "ref_logprobs", "teacher_logprobs", "base_logprobs")

_COLUMN_ARGS = {col: arg for arg, (col, _, _) in _ARGS.items()}

_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()

SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)
"""Signals on which recorders publish what they hold before the process's previous handler runs: the
ones schedulers send to stop a job (SLURM, Kubernetes and torchrun send SIGTERM, then SIGKILL after a grace
period; a closed terminal or ssh session sends SIGHUP)."""

_previous_handlers: dict[int, Any] = {}
"""signal -> the handler that was installed before rldiag's (chained after rldiag has published)."""


def _on_signal(signum: int, frame: Any) -> None:
    """Publish every recorder of this process and mark its writer closed, then run the previous handler."""
    pid = os.getpid()
    start = time.monotonic()
    recs = [rec for rec in list(_LIVE) if rec._pid == pid and rec._signals]
    for rec in recs:
        try:
            rec._publish_for_signal(signum)
        except Exception as exc:  # noqa: BLE001 - the previous handler must run whatever happened here
            log.warning("rldiag: publishing %s on signal %s failed: %s", rec.run_dir, signum, exc)
    for rec in recs:  # every recorder of the process published first: a rank-0 evaluator then sees them all
        try:
            rec._drain_for_signal(start + rec._signal_timeout)
        except Exception as exc:  # noqa: BLE001
            log.warning("rldiag: alerts and exports of %s on signal %s failed: %s", rec.run_dir, signum, exc)
    prev = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        # The default action (terminate): re-raise the signal with the default disposition, so the process
        # ends exactly as it would have without rldiag (exit status -signum, no atexit handlers).
        _uninstall(signum)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(pid, signum)
    # SIG_IGN: never installed over (see _install)


def _install(signums: tuple[int, ...]) -> None:
    """Install rldiag's handler for ``signums`` (main thread only; a signal that is ignored stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signums:
        current = signal.getsignal(sig)
        if current is _on_signal or current == signal.SIG_IGN or current is None:
            continue  # ours already, ignored on purpose (nohup), or set from C: leave it alone
        _previous_handlers[sig] = current
        signal.signal(sig, _on_signal)


def _uninstall(signum: int | None = None) -> None:
    """Give the previous handlers back (when the last recorder closes), unless someone replaced ours."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in [signum] if signum is not None else list(_previous_handlers):
        prev = _previous_handlers.pop(sig, None)
        if prev is not None and signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)


def _after_fork_in_child() -> None:
    for rec in list(_LIVE):
        rec._forked = True  # the writer thread did not survive fork(): refuse to record rather than lose data


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for rec in list(_LIVE):
        try:
            rec.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("rldiag: closing %s at exit failed: %s", rec.run_dir, exc)


def _dist_rank_world() -> tuple[int, int]:
    """Rank and world size from torch.distributed when it is initialised (without importing torch)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Recorder:
    """Record per-token RL signals of a training run into ``run_dir``.

    Example::

        with rldiag.Recorder("runs/exp1", clip_low=0.2, clip_high=0.28) as rec:
            for step in range(n_steps):
                ...
                rec.record(step=step, logprobs=logp, old_logprobs=old_logp, advantages=adv, mask=mask,
                           entropy=ent, group_ids=groups, rewards=rewards)

    Args:
        run_dir: run directory (created; an existing run is appended to, e.g. after a restart).
        clip_low, clip_high: the trainer's eps_low / eps_high (override ``config``).
        config: a :class:`RecorderConfig`; keyword overrides of its fields are accepted too.
        alerts: online alerting (``True`` for the default rules, a rule-file path, or an alerts object).
        log_to: live export to trackers, off the training thread (``"tensorboard:DIR"``, ``"mlflow:URI"``,
            ``"wandb"``, ``"trackio"``, an exporter or a list; rank 0 only, with every rank's statistics merged
            on a multi-rank run): :mod:`rldiag.export.live`.
        metrics_port: serve the latest step's headline metrics for Prometheus on 127.0.0.1 (rank 0 only).
        rank, world_size: default to torch.distributed's (or RANK / WORLD_SIZE, else 0 / 1).
        name: run name stored in the manifest (default: the directory name).
        handle_signals: on SIGTERM and SIGHUP (how schedulers stop a job), publish what is buffered and mark
            the writer closed, then evaluate the alerts of the last steps and write them to the trackers
            (``alerts``, ``log_to``; a step is otherwise finished by the next step's first record) and deliver
            what fired, all within ``signal_timeout`` seconds; then run the handler that was installed before
            (the default one ends the process with the same status as without rldiag). ``False`` leaves signal
            handling alone. Only possible when the recorder is created in the main thread.
        signal_timeout: the most seconds a signal waits for the writer, the alerts and the trackers before the
            previous handler runs.
        live_seconds: readers see a step within about this many seconds of ``record()``: the writer rewrites a
            small live tail (``live/<writer>.parquet``: the statistics not yet in a segment) at most this often,
            while segments keep rolling by ``roll_steps``/``roll_seconds`` (few files). ``None``: segments only.
        storage_options: options of the fsspec filesystem when ``run_dir`` is a URI (``s3://bucket/runs/x``);
            without them the backend's usual configuration is used (for S3 the ``AWS_*`` variables).

    Signals: a recorder that receives SIGTERM or SIGHUP stays usable; a ``record()`` after the signal (a
    training loop that finishes its step on a "stop soon" flag) reopens the writer file. A handler installed
    after the recorder replaces rldiag's unless it chains to it. After ``fork()`` a recorder created in the
    parent raises at the first call in the child (its writer thread does not exist there): create one in the
    child instead.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        clip_low: float | None = None,
        clip_high: float | None = None,
        *,
        config: RecorderConfig | None = None,
        alerts: Any = None,
        log_to: Any = None,
        metrics_port: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        name: str | None = None,
        handle_signals: bool = True,
        signal_timeout: float = 5.0,
        live_seconds: float | None = 1.0,
        storage_options: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> None:
        cfg = config or RecorderConfig()
        changes = dict(config_overrides)
        if clip_low is not None:
            changes["eps_low"] = clip_low
        if clip_high is not None:
            changes["eps_high"] = clip_high
        if changes:
            unknown = set(changes) - set(cfg.to_dict())
            if unknown:
                raise TypeError(f"Recorder got unknown settings {sorted(unknown)}; see rldiag.RecorderConfig")
            cfg = cfg.replace(**changes)
        self.config = cfg
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not (0 <= self.rank < max(self.world_size, 1)):
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not signal_timeout >= 0:
            raise ValueError(f"signal_timeout must be >= 0 seconds, got {signal_timeout!r}")
        self._pid = os.getpid()
        self._forked = False
        self._signals = bool(handle_signals)
        self._signal_timeout = float(signal_timeout)
        self._signalled: int | None = None
        self._unpublished_at_signal = 0
        """Records the writer still held when a signal's wait for it ran out (kept in the writer file)."""
        self._closed_at: float | None = None
        self.run_dir = storage.location(run_dir, storage_options)
        self.manifest = runformat.create_run_dir(self.run_dir, cfg, self.world_size, name)
        self.writer_id = runformat.writer_id(self.rank)
        self._started = time.time()
        self._first_step: int | None = None
        self._write_writer_file()
        self._micro: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reported_error = False
        self._recent: OrderedDict[int, list[pa.Table]] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.alerts = None
        self.exports: Any = None
        self.raise_on_stop = True
        """record() raises :class:`rldiag.alerts.StopTraining` once a stop-training alert fired. Integrations
        that stop the trainer themselves at the end of a step (TRL) turn this off, so that the micro-batches
        left in that step are still recorded; :attr:`should_stop` tells either way."""
        self._writer = Writer(self.run_dir, self.writer_id, self.rank, cfg, on_step=self._on_step)
        self._pool = BufferPool(max_bytes=min(cfg.queue_max_bytes, 512 * 2**20))
        self._writer.pool = self._pool
        self._writer.arg_names = _COLUMN_ARGS
        self._scalars = ScalarLog(self.rank)
        self._writer.scalars = self._scalars
        if live_seconds is not None and not live_seconds > 0:
            raise ValueError(f"live_seconds must be > 0 seconds or None, got {live_seconds!r}")
        self._writer.live_seconds = None if storage.is_remote(self.run_dir) else live_seconds  # local runs only
        self._warned: set[str] = set()
        self._writer.start()
        if alerts:
            from rldiag.alerts import online_from_arg  # the alerts package wires itself in

            self.alerts = online_from_arg(
                alerts, run_dir=self.run_dir, rank=self.rank, world_size=self.world_size, config=cfg
            )
        if (log_to or metrics_port is not None) and self.rank == 0:
            from rldiag.export.live import LiveExport  # trackers and Prometheus, on their own thread

            resumed = runformat.earlier_attempts(self.run_dir, self.rank, self.writer_id)
            self.exports = LiveExport(
                log_to,
                metrics_port=metrics_port,
                run=self.run_dir.name,
                resumed=resumed,
                follow=self.run_dir if self.world_size > 1 else None,  # every rank's statistics, merged
            )
        _LIVE.add(self)
        if self._signals:
            _install(SIGNALS)

    # ---- public API -------------------------------------------------------------------------------
    def record(
        self,
        step: int,
        logprobs: Any,
        old_logprobs: Any,
        advantages: Any,
        mask: Any = None,
        entropy: Any = None,
        rollout_logprobs: Any = None,
        ref_logprobs: Any = None,
        teacher_logprobs: Any = None,
        base_logprobs: Any = None,
        group_ids: Any = None,
        rewards: Any = None,
        token_ids: Any = None,
        versions: Any = None,
        turns: Any = None,
        stages: Any = None,
        route_agree: Any = None,
    ) -> None:
        """Record one micro-batch of ``B`` responses of length ``T`` at optimizer step ``step``.

        Tensors (any device) or numpy arrays. ``logprobs``, ``old_logprobs``, ``mask`` and the other per-token
        inputs are ``[B, T]``; ``advantages``, ``versions``, ``turns``, ``stages`` are ``[B]`` or ``[B, T]``;
        ``group_ids`` and ``rewards`` are ``[B]``. ``route_agree`` (MoE) is ``[B, T]``: the share of each token's
        expert choices, over all MoE layers and top-k slots, on which the trainer's router agrees with the
        sampler's (1 = same routing), in [0, 1]. ``mask`` defaults to all tokens valid. Never synchronises
        a GPU; the inputs may be reused by the caller as soon as it returns.
        """
        self._check_open()
        self._raise_pending()
        if self._signalled is not None:
            self._reopen_after_signal()
        if self.alerts is not None and self.raise_on_stop:
            self.alerts.check()  # raises rldiag.alerts.StopTraining once a stop-training alert fired
        args = {
            "logprobs": logprobs,
            "old_logprobs": old_logprobs,
            "advantages": advantages,
            "mask": mask,
            "entropy": entropy,
            "rollout_logprobs": rollout_logprobs,
            "ref_logprobs": ref_logprobs,
            "teacher_logprobs": teacher_logprobs,
            "base_logprobs": base_logprobs,
            "group_ids": group_ids,
            "rewards": rewards,
            "token_ids": token_ids,
            "versions": versions,
            "turns": turns,
            "stages": stages,
            "route_agree": route_agree,
        }
        shape = self._validate(step, args)
        invalid = self._check_dtypes(args)
        self._unmask(args, shape)
        est = sum(self._nbytes(v) for v in args.values() if v is not None)
        fits = self._writer.queued_bytes + est <= self.config.queue_max_bytes
        if not fits and self.config.max_block_seconds > 0:
            fits = self._writer.wait_for_space(est, self.config.max_block_seconds)
        snaps = {
            _ARGS[k][0]: HostSnapshot(v, float_cast=_ARGS[k][2], pool=self._pool)
            for k, v in args.items()
            if v is not None
        }
        host = {k: s._array for k, s in snaps.items()}
        arrays = {k: a for k, a in host.items() if a is not None}
        checked = len(arrays) == len(host)
        if checked:  # host inputs: what their values mean is checked here, so an error names the call
            problems = check_values(arrays, shape, self.config.logp_tolerance)
            if problems:
                bad, drop, counts = resolve_problems(
                    problems,
                    arrays,
                    strict=self.config.errors == "strict",
                    names=_COLUMN_ARGS,
                    where=f"the record at step {step}",
                )
                invalid |= bad
                for col in drop:
                    del snaps[col]
                self._writer.count(self._writer.invalid_values, counts)
                self._warn_values(problems)
        with self._lock:
            step = int(step)
            micro = self._micro.get(step, 0)
            self._micro[step] = micro + 1
            if len(self._micro) > 1024:
                for k in list(self._micro)[:512]:
                    del self._micro[k]
            if self._first_step is None:
                self._first_step = step
                self._write_writer_file()
        job = Job(
            step=step,
            micro=micro,
            shape=shape,
            inputs=snaps,
            invalid=invalid,
            checked=checked,
            nbytes=sum(s.nbytes for s in snaps.values()),
        )
        if not fits and not all(s.ready() for s in snaps.values()):
            # Device inputs still being copied: reducing them here would wait for the GPU in the caller's thread.
            # The writer reduces them (statistics kept, token rows dropped and counted); past twice the queue
            # bound the caller waits for the writer instead, so memory stays bounded and the GPU is never synced.
            while job.nbytes + self._writer.queued_bytes > 2 * self.config.queue_max_bytes and self._writer.is_alive():
                self._writer.wait_for_space(job.nbytes - self.config.queue_max_bytes, 1.0)
            job.drop_rows = True
        elif not fits:
            # Statistics are never dropped: reduce here, enqueue only the (small) statistics.
            tb, flat, cols = build_batch(job, step)
            stats = kernel.compute(tb, self.config)
            dropped = int(flat.size)
            job = Job(
                step=step,
                micro=micro,
                shape=shape,
                inputs={},
                invalid=invalid,
                nbytes=0,
                precomputed=Precomputed(stats, flat, stats.cov, tb, cols, dropped),
            )
        self._writer.put(job)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Log your own scalars at ``step`` (``rec.log(step, {"loss": 0.41, "lr": 3e-4, "eval/acc": 0.7})``).

        Values are Python or numpy numbers or one-element tensors (a device tensor is read on the writer
        thread: no GPU sync here), stored exactly (float64) and published with the run's segments, on
        ``flush()`` and at ``close()``. A name logged twice at a step keeps the later value; several ranks
        logging a name at a step give their mean in ``Run.custom_metrics()`` (and in ``step_metrics()``, which
        adds custom scalars under their names). Names of rldiag's metrics are refused. Alert rules name a
        custom scalar ``custom:<name>``. See :mod:`rldiag.record.scalars`.
        """
        self._check_open()
        self._raise_pending()
        floats = self._scalars.add(step, values)
        if self.alerts is not None and floats:  # rules on custom:<name> (device tensors: `rldiag watch` sees them)
            self.alerts.observe_custom(int(step), floats)
        with self._lock:
            if self._first_step is None:  # a resume point, as for record()
                self._first_step = int(step)
                self._write_writer_file()

    def flush(self, timeout: float | None = None) -> None:
        """Barrier: everything recorded so far is in published files when it returns."""
        self._check_open()
        if not self._writer.barrier(publish=True, timeout=timeout):
            if self._writer.is_alive():
                raise TimeoutError(f"rldiag: flush did not finish within {timeout} s")
        self._raise_pending(force=True)

    def close(self) -> None:
        """Publish what is buffered and stop the writer thread. Idempotent; also runs at interpreter exit.

        In a child forked after the recorder was created it only marks this copy closed: the data and the
        writer belong to the parent.
        """
        if self._closed:
            return
        self._closed = True
        if self._forked:
            _LIVE.discard(self)
            return
        self._writer.stop()
        self._writer.join()
        self._closed_at = time.time()
        try:  # marks a finished run (not a crashed or stalled one) for the watcher and the dashboard
            self._write_writer_file()
        except OSError as exc:
            log.warning("rldiag: could not mark %s closed: %s", self.run_dir, exc)
        if self.alerts is not None:
            try:
                self.alerts.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("rldiag: closing alerts failed: %s", exc)
        if self.exports is not None:
            self.exports.close()
        _LIVE.discard(self)
        if self._signals and not any(r._signals and r._pid == self._pid for r in _LIVE):
            _uninstall()
        self._raise_pending(force=True)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            try:
                self.close()
            except Exception as err:  # noqa: BLE001 - don't mask the training error
                log.warning("rldiag: close after an error failed: %s", err)
        else:
            self.close()

    def local_metrics(self, step: int | None = None, *, wait: bool = False) -> dict[str, float]:
        """Metrics of one step from this process's records (default: the latest step processed).

        With ``wait=True`` it first waits until every record so far is processed (without publishing files).
        On several ranks these are this rank's numbers; ``rldiag.open_run`` merges all ranks.
        """
        if wait and not self._closed:
            self._writer.barrier(publish=False)
        with self._recent_lock:
            if not self._recent:
                return {}
            key = next(reversed(self._recent)) if step is None else step
            parts = self._recent.get(key)
            if parts is None:
                return {}
            table = pa.concat_tables(parts)
        from rldiag.metrics.aggregate import metrics_of

        row = metrics_of(table).row(0, named=True)
        return {k: float(v) for k, v in row.items() if k != "step"}

    @property
    def last_metrics(self) -> dict[str, float]:
        """Metrics of the latest step processed by the writer (this rank)."""
        return self.local_metrics()

    @property
    def should_stop(self) -> bool:
        """True when a critical alert asked to stop training (trainer integrations poll it)."""
        return bool(self.alerts is not None and getattr(self.alerts, "should_stop", False))

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of this recorder: records, token rows written and dropped, writer failures, files.

        ``nonfinite`` counts NaN/Inf values per argument (masked-in tokens); ``invalid_values`` the values a
        lenient recorder refused per argument (positive log-probs, negative entropies, a mask that is not 0/1,
        fractional or out-of-range ids). ``publish_failures`` counts failed publications (a full disk: token
        rows are then dropped and the statistics retried); ``records_lost`` counts statistics rows given up
        after nothing could be written for too long; ``buffered_bytes`` is the memory held by processed,
        unpublished rows.
        """
        w = self._writer
        return {
            "records": w.records,
            "rows_written": w.rows_written,
            "rows_dropped": w.rows_dropped,
            "failures": w.failures,
            "files": list(w.published),
            "queued_bytes": w.queued_bytes,
            "publish_failures": w.publish_failures,
            "records_lost": w.records_lost,
            "buffered_bytes": w.buffered_bytes,
            "nonfinite": dict(w.nonfinite),
            "invalid_values": dict(w.invalid_values),
        }

    # ---- internals --------------------------------------------------------------------------------
    def _on_step(self, step: int, table: pa.Table) -> None:
        with self._recent_lock:
            self._recent.setdefault(step, []).append(table)
            self._recent.move_to_end(step)
            while len(self._recent) > 8:
                self._recent.popitem(last=False)
        if self.alerts is not None:
            self.alerts.observe_stats(step, table)
        if self.exports is not None:
            self.exports.observe_stats(step, table)

    def _file_counters(self) -> dict[str, Any]:
        """What went missing or was refused, kept in the writer file (rewritten at close and on a signal)."""
        w = getattr(self, "_writer", None)
        if w is None:
            return {}
        return {
            "rows_written": w.rows_written,
            "rows_dropped": w.rows_dropped,
            "publish_failures": w.publish_failures,
            "records_lost": w.records_lost,
            "unpublished_at_signal": self._unpublished_at_signal,
            "nonfinite": dict(w.nonfinite),
            "invalid_values": dict(w.invalid_values),
        }

    def _write_writer_file(self) -> None:
        runformat.write_writer_file(
            self.run_dir,
            self.writer_id,
            {
                "writer": self.writer_id,
                "rank": self.rank,
                "world_size": self.world_size,
                "host": os.uname().nodename,
                "pid": os.getpid(),
                "started": self._started,
                "first_step": self._first_step,
                "schema_version": schema.SCHEMA_VERSION,
                "config": self.config.to_dict(),
                "closed": getattr(self, "_closed_at", None),
                "counters": self._file_counters(),
            },
        )

    def _warn_values(self, problems: list[Any]) -> None:
        """Lenient mode: one warning per argument whose values were refused (all are counted in stats)."""
        for p in problems:
            arg = _COLUMN_ARGS.get(p.column, p.column)
            if arg not in self._warned:
                self._warned.add(arg)
                warnings.warn(
                    f"rldiag: {arg} {p.message}; counted in Recorder.stats['invalid_values'] and left out "
                    "(further cases are counted, not warned)",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rldiag.Recorder for {self.run_dir} is closed; create a new one to record more")
        if self._forked:
            raise RuntimeError(
                f"rldiag.Recorder for {self.run_dir} was created in process {self._pid} and this is a child forked "
                f"from it (pid {os.getpid()}): its writer thread does not exist here, so nothing would be recorded. "
                "Create a Recorder in the child (with its own rank), or record in the parent"
            )

    def _publish_for_signal(self, signum: int) -> None:
        """Publish what is buffered (bounded by ``signal_timeout``) and mark the writer file closed."""
        if self._closed or self._forked:
            return
        self._signalled = signum
        done = self._writer.barrier(publish=True, timeout=self._signal_timeout)
        self._closed_at = time.time()
        self._unpublished_at_signal = 0 if done else self._writer.unpublished_records()
        self._write_writer_file()
        if not done:
            why = (
                "; it was still compiling its statistics kernel, as numba's cache held none: `rldiag precompile` "
                "where rldiag is installed (a container image's build) compiles it ahead (docs/cluster.md)"
                if self._writer.warming
                else ""
            )
            log.warning(
                "rldiag: %s: the writer did not publish within %.1f s of signal %d; the %d records it held may be "
                "lost%s",
                self.run_dir,
                self._signal_timeout,
                signum,
                self._unpublished_at_signal,
                why,
            )

    def _drain_for_signal(self, deadline: float) -> None:
        """After the signal's publish: evaluate the alerts of the steps the evaluator holds and write them to the
        trackers (a step is otherwise finished by a record of the next one, which will not come), and deliver
        what fired, until ``deadline`` (``time.monotonic()``)."""
        if self._closed or self._forked:
            return
        for what, part in (("alerts", self.alerts), ("exports", self.exports)):
            if part is None:
                continue
            if not part.drain(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "rldiag: %s: the %s of the last steps were not all delivered within %.1f s of the signal",
                    self.run_dir,
                    what,
                    self._signal_timeout,
                )

    def _reopen_after_signal(self) -> None:
        """The process went on recording after a signal: the writer file no longer says closed."""
        self._signalled = None
        self._closed_at = None
        self._unpublished_at_signal = 0
        self._write_writer_file()

    def _raise_pending(self, force: bool = False) -> None:
        w = self._writer
        if w.error is None:
            return
        if self.config.errors == "strict":
            err, w.error = w.error, None
            raise WriterError(
                f"rldiag writer for {self.run_dir} failed: {w.error_text}. Files published before the failure "
                f"are intact ({len(w.published)} segments)"
            ) from err
        if not self._reported_error:
            self._reported_error = True
            warnings.warn(
                f"rldiag writer for {self.run_dir} failed ({w.error_text}); recording continues, "
                f"{w.failures} failure(s) so far",
                RuntimeWarning,
                stacklevel=3,
            )

    @staticmethod
    def _nbytes(x: Any) -> int:
        if is_torch(x):
            return int(x.numel() * x.element_size())
        return int(np.asarray(x).nbytes) if not hasattr(x, "nbytes") else int(x.nbytes)

    def _validate(self, step: Any, args: dict[str, Any]) -> tuple[int, int]:
        check_step(step)
        for req in ("logprobs", "old_logprobs", "advantages"):
            if args[req] is None:
                raise ValueError(f"record() needs {req}")
        lp_shape = shape_of(args["logprobs"])
        if len(lp_shape) != 2:
            raise ValueError(
                f"logprobs must be [B, T] (responses x tokens), got shape {lp_shape}; add a batch dimension "
                "with x[None] for one response"
            )
        B, T = lp_shape
        for name, value in args.items():
            if value is None or name == "logprobs":
                continue
            kind = _ARGS[name][1]
            shp = shape_of(value)
            ok = (
                (shp == (B, T) and "BT" in kind)
                or (shp == (B,) and "B" in kind.split("|"))
                or (name == "advantages" and shp == (B, 1))
            )
            if not ok:
                want = {"BT": f"[{B}, {T}]", "B": f"[{B}]", "B|BT": f"[{B}] or [{B}, {T}]"}[kind]
                raise ValueError(
                    f"{name} has shape {list(shp)} but logprobs has shape [{B}, {T}]: {name} must be {want}"
                )
        return B, T

    def _check_dtypes(self, args: dict[str, Any]) -> bool:
        """Refuse dtypes that mean nothing here (naming the argument and the dtype); True when a float input
        came as integers or booleans in lenient mode (the record's tokens then count as invalid)."""
        bad = []
        for name, v in args.items():
            if v is None:
                continue
            kind, dtname = _dtype_of(v)
            if kind not in "biuf":
                want = (
                    "integers"
                    if name in _INTEGER_ARGS
                    else "booleans or 0/1 integers"
                    if name == "mask"
                    else "floating point numbers"
                )
                hint = (
                    " (map labels to integers, e.g. np.unique(labels, return_inverse=True)[1])"
                    if name in _INTEGER_ARGS and kind in "USO"
                    else ""
                )
                raise TypeError(f"{name} has dtype {dtname}: it must hold {want}{hint}")
            if name in _LOGPROB_ARGS + ("advantages",) and kind != "f":
                bad.append(f"{name} ({dtname})")
        if not bad:
            return False
        msg = (
            f"{', '.join(bad)} must be floating point (log-probabilities and advantages), got an integer "
            "or boolean dtype"
        )
        if self.config.errors == "strict":
            raise TypeError(msg)
        warnings.warn(msg + "; the record's tokens are counted as invalid", RuntimeWarning, stacklevel=3)
        return True

    def _unmask(self, args: dict[str, Any], shape: tuple[int, int]) -> None:
        """numpy masked arrays: a masked token is left out (folded into ``mask``); per-sequence inputs with
        masked entries are refused (there is no token mask to fold them into)."""
        B, T = shape
        keep = None
        for name, v in args.items():
            if not isinstance(v, np.ma.MaskedArray):
                continue
            m = np.ma.getmaskarray(v)
            if name == "mask":
                args[name] = np.asarray(v.filled(0))
                continue
            if shape_of(v) == (B, T):
                keep = ~m if keep is None else keep & ~m
            elif m.any():
                raise ValueError(
                    f"{name} is a masked array with {int(m.sum())} masked entries: per-sequence "
                    "inputs cannot be masked (fill them, or leave those responses out)"
                )
            args[name] = np.asarray(v.data)
        if keep is None:
            return
        mask = args["mask"]
        if mask is None:
            args["mask"] = keep
        elif is_torch(mask):
            if mask.device.type != "cpu":
                raise TypeError(
                    "mask is a device tensor but other inputs are numpy masked arrays: pass the mask as a numpy array"
                )
            args["mask"] = mask.numpy().astype(bool) & keep
        else:
            args["mask"] = (np.asarray(mask) != 0) & keep


def _dtype_of(v: Any) -> tuple[str, str]:
    """(numpy dtype kind, dtype name) of a tensor or array-like, without copying or syncing."""
    if is_torch(v):
        name = str(v.dtype).replace("torch.", "")
        if v.is_complex():
            return "c", name
        if v.is_floating_point():
            return "f", name
        return ("b" if name == "bool" else "u" if name.startswith("uint") else "i"), name
    dt = v.dtype if isinstance(v, np.ndarray) else np.asarray(v).dtype
    return dt.kind, str(dt)
