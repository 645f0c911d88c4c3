"""The background writer: turns queued records into statistics and token rows, and publishes Parquet files.

The recorder's hot path only copies its inputs and enqueues a :class:`Job`; this thread runs the statistics
kernel, samples token rows, buffers both, and publishes a segment (``stats/`` and ``tokens/`` files of the
same name) when the roll policy says so or on ``flush()``. Files are written under a temporary name and
renamed into place, so a crash leaves only whole files behind.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import schema, storage
from rldiag.config import RecorderConfig
from rldiag.metrics import aggregate
from rldiag.record.tensors import HostSnapshot
from rldiag.runformat import (
    LIVE_DIR,
    LIVE_MAX_BYTES,
    LIVE_META_KEY,
    SUMMARY_MAX_BYTES,
    SUMMARY_META_KEY,
    file_metadata,
    segment_name,
)
from rldiag.stats import kernel
from rldiag.stats.table import to_packed_ipc, to_table

PER_SEQ = ("group", "reward")
"""Inputs given per sequence ``[B]``."""
BROADCAST_OK = ("adv", "version", "turn", "stage")
"""Inputs that may be given per sequence and are broadcast over the tokens."""


class Precomputed(NamedTuple):
    """Statistics of a record computed in the caller's thread when the queue was full (no token rows)."""

    stats: kernel.BatchStats
    flat: np.ndarray
    """Flat indices of the record's masked-in tokens."""
    cov: np.ndarray
    batch: kernel.TokenBatch
    cols: dict[str, np.ndarray]
    """The gathered token columns (as :func:`build_batch` returns them)."""
    dropped: int
    """Token rows not written."""


@dataclass
class Job:
    """One record waiting for the writer."""

    step: int
    micro: int
    shape: tuple[int, int]
    inputs: dict[str, HostSnapshot]
    """Host snapshots by token-row column name (``logp``, ``old_logp``, ``adv``, ``mask``...)."""
    invalid: bool = False
    checked: bool = True
    """The inputs' values were checked at the call (host inputs); False: the writer checks them (device)."""
    drop_rows: bool = False
    """The queue was full: compute the statistics, write no token rows (counted as dropped)."""
    nbytes: int = 0
    precomputed: Precomputed | None = None
    """Statistics computed in the caller's thread when the queue was full: (BatchStats, n_dropped)."""


@dataclass
class _Barrier:
    event: threading.Event = field(default_factory=threading.Event)
    publish: bool = True


def parquet_options(table: pa.Table, compression: str) -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options of rldiag's files.

    Dictionary encoding pays off only on the low-cardinality key columns (on float columns it doubles the
    write time for nothing; on ``pos``, which changes every row, plain encoding reads twice as fast for the
    same file size). Column statistics are written for every column (about 3% of the write time):
    their null counts let a reader skip the columns a run never recorded, their step ranges the row groups
    outside a step filter.
    """
    keys = [c for c in ("step", "rank", "micro", "seq", "group", "turn", "stage") if c in table.column_names]
    return {"compression": compression, "use_dictionary": keys, "write_statistics": True}


def write_parquet(table: pa.Table, where: Any, compression: str, footer: dict[bytes, bytes] | None = None) -> None:
    """Write ``table`` as rldiag writes its segments (:func:`parquet_options`); ``footer`` entries go into the
    file's key-value metadata only, not into the Arrow schema that pyarrow also stores there (a summary is not
    stored twice). pyarrow's readers still add them to a read table's schema metadata; rldiag's reader drops
    the summary there. Values must be UTF-8 text (polars refuses a file with binary bytes there)."""
    with pq.ParquetWriter(where, table.schema, **parquet_options(table, compression)) as w:
        w.write_table(table)
        if footer:
            w.add_key_value_metadata(footer)


STATS_BUFFER_MAX_BYTES = 64 * 2**20
"""While nothing can be published (a full disk), statistics rows are kept up to this many bytes (about 20,000
records); past it the oldest are given up, counted in ``Writer.records_lost``."""
RETRY_MAX_SECONDS = 30.0
"""Longest wait between two publication attempts after a failure (the wait doubles from 0.5 s)."""


class WriterError(RuntimeError):
    """The writer thread failed (disk full, permission denied...). Files already published are intact."""


LOGPROB_COLUMNS = (
    schema.LOGP,
    schema.OLD_LOGP,
    schema.ROLLOUT_LOGP,
    schema.REF_LOGP,
    schema.TEACHER_LOGP,
    schema.BASE_LOGP,
)
"""Token columns holding log-probabilities: at most ``RecorderConfig.logp_tolerance``."""
KERNEL_CHECKED = (schema.LOGP, schema.OLD_LOGP)
"""Log-prob columns whose positive values the statistics kernel itself counts as invalid tokens."""
ENTROPY_TOLERANCE = 1e-4
"""Entropy (nats) below ``-ENTROPY_TOLERANCE`` is not float rounding: the input is not an entropy."""
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    schema.GROUP: (-(2**63), 2**63 - 1),
    schema.TOKEN_ID: (0, 2**31 - 1),
    schema.VERSION: (-(2**63), 2**63 - 1),
    schema.TURN: (-(2**31), 2**31 - 1),
    schema.STAGE: (-(2**31), 2**31 - 1),
}
"""Integer token columns and the values their stored dtype holds (token ids: a vocabulary index)."""


@dataclass
class ValueProblem:
    """An input whose values do not mean what the argument says (found by :func:`check_values`)."""

    column: str
    message: str
    """What is wrong, without the argument name: ``"has 3 masked-in values above 0.0001 (largest 0.7)"``."""
    count: int
    bad: np.ndarray | None = None
    """Per-token problems: where (a lenient recorder blanks those values)."""
    drop: bool = False
    """A lenient recorder leaves this input out of the record (ids it cannot store); neither ``bad`` nor
    ``drop``: the whole record is unusable (a mask that is not a mask)."""


def summary_metadata(stats: pa.Table) -> dict[bytes, bytes]:
    """The footer entry (:func:`write_parquet`) that carries a statistics segment's write-time summary
    (:data:`rldiag.runformat.SUMMARY_META_KEY`: :func:`rldiag.metrics.aggregate.segment_summary` as packed
    Arrow IPC bytes, :func:`rldiag.stats.table.to_packed_ipc`), or ``{}`` when it cannot be built, is larger
    than :data:`rldiag.runformat.SUMMARY_MAX_BYTES`, or
    would not halve the rows a reader reads (fewer than two records per step). Readers then read the records;
    a summary never stops a segment from being published."""
    if stats.num_rows < 2 * len(pc.unique(stats.column("step"))):
        return {}  # about one record per step: a summary would not spare a reader anything, only take space
    try:
        summary, repeated = aggregate.segment_summary(stats)
        data = to_packed_ipc(summary.replace_schema_metadata({b"repeated": str(repeated).encode()}))
    except (ValueError, OverflowError, pa.ArrowException):  # e.g. a bin past 2**32 tokens in one step
        return {}
    return {SUMMARY_META_KEY: data} if len(data) <= SUMMARY_MAX_BYTES else {}


def check_values(arrays: dict[str, np.ndarray], shape: tuple[int, int], logp_tolerance: float) -> list[ValueProblem]:
    """Check what the values of one record's host arrays mean (by token-row column name).

    A mask must hold 0/1 (a float loss-weight mask is not a mask); integer inputs must be integral and fit
    their column; log-probs must be at most ``logp_tolerance`` and entropies at least ``-ENTROPY_TOLERANCE``
    on masked-in tokens. Cheap when the record is fine: one min or max per input; masked counts are taken
    only when that reduction shows a problem. NaN and Inf are not problems here (they are counted per input
    by the writer).
    """
    out: list[ValueProblem] = []
    B, T = shape
    mask = arrays.get("mask")

    def masked_in(bad: np.ndarray) -> np.ndarray:  # only on the slow path: a problem was seen
        return bad if mask is None else bad & (mask.reshape(B, T) != 0)

    if mask is not None:
        if mask.dtype.kind != "b" and mask.size:
            lo, hi = mask.min(), mask.max()
            if not (lo >= 0 and hi <= 1) or (mask.dtype.kind == "f" and np.count_nonzero((mask != 0) & (mask != 1))):
                n = int(np.count_nonzero((mask != 0) & (mask != 1)))
                out.append(
                    ValueProblem(
                        "mask",
                        f"must hold 0/1 or booleans, got {n} other values (in [{lo:g}, "
                        f"{hi:g}]); pass (weights > 0) as the mask",
                        n,
                    )
                )
    for col in LOGPROB_COLUMNS:
        a = arrays.get(col)
        if a is None or not a.size or a.max() <= logp_tolerance:
            continue
        a2 = a.reshape(B, T)
        bad = masked_in((a2 > logp_tolerance) & (a2 < np.inf))  # NaN and +Inf are counted as non-finite
        n = int(np.count_nonzero(bad))
        if n:
            top = float(a.reshape(B, T)[bad].max())
            out.append(
                ValueProblem(
                    col,
                    f"has {n} masked-in values above {logp_tolerance:g} (largest {top:.4g}); "
                    "log-probabilities cannot be positive: pass log-probs, not logits or "
                    "probabilities",
                    n,
                    bad,
                )
            )
    ent = arrays.get(schema.ENTROPY)
    if ent is not None and ent.size and not ent.min() >= -ENTROPY_TOLERANCE:
        bad = masked_in(ent.reshape(B, T) < -ENTROPY_TOLERANCE)
        n = int(np.count_nonzero(bad))
        if n:
            low = float(ent.reshape(B, T)[bad].min())
            out.append(
                ValueProblem(
                    schema.ENTROPY,
                    f"has {n} masked-in negative values (smallest {low:.4g}); an entropy is >= 0",
                    n,
                    bad,
                )
            )
    ra = arrays.get(schema.ROUTE_AGREE)
    if ra is not None and ra.size and not (ra.min() >= 0.0 and ra.max() <= 1.0):  # NaN fails both: a problem
        bad = masked_in(~((ra.reshape(B, T) >= 0.0) & (ra.reshape(B, T) <= 1.0)))
        n = int(np.count_nonzero(bad))
        if n:
            out.append(
                ValueProblem(
                    schema.ROUTE_AGREE,
                    f"has {n} masked-in values that are not finite numbers in [0, 1] (e.g. "
                    f"{float(ra.reshape(B, T)[bad][0])!r}); it is a share of expert choices",
                    n,
                    bad,
                )
            )
    for col, (lo_ok, hi_ok) in INTEGER_RANGES.items():
        a = arrays.get(col)
        if a is None or not a.size or a.dtype.kind == "b":
            continue
        if a.dtype.kind == "f":
            frac = int(np.count_nonzero(a != np.trunc(a)))  # NaN != NaN: counted here too
            if frac:
                out.append(
                    ValueProblem(
                        col,
                        f"must hold integers, got {frac} fractional or non-finite values "
                        f"(e.g. {float(a.reshape(-1)[np.flatnonzero(a != np.trunc(a))[0]])!r})",
                        frac,
                        drop=True,
                    )
                )
                continue
        lo, hi = a.min(), a.max()
        if lo < lo_ok or hi > hi_ok:
            n = int(np.count_nonzero((a < lo_ok) | (a > hi_ok)))
            out.append(ValueProblem(col, f"has {n} values outside [{lo_ok}, {hi_ok}] (in [{lo}, {hi}])", n, drop=True))
    return out


def resolve_problems(
    problems: list[ValueProblem], arrays: dict[str, np.ndarray], *, strict: bool, names: dict[str, str], where: str
) -> tuple[bool, set[str], dict[str, int]]:
    """Act on :func:`check_values`' findings: raise (strict), or (lenient) blank per-token problems and tell
    which inputs to leave out and whether the whole record is unusable. Returns (record invalid, columns to
    leave out, {argument: values concerned})."""
    if strict and problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{names.get(p.column, p.column)} {p.message}{more}; {where} was not recorded")
    invalid, drop, counts = False, set(), {}
    for p in problems:
        counts[names.get(p.column, p.column)] = p.count
        if p.drop:
            drop.add(p.column)
        elif p.bad is None:
            invalid = True
        elif p.column not in KERNEL_CHECKED:  # the kernel counts positive logp/old_logp as invalid itself
            a = arrays[p.column]
            a.reshape(p.bad.shape)[p.bad] = np.nan  # left out of that input's statistics, counted
    return invalid, drop, counts


def _sample_mask(cfg: RecorderConfig, step: int, rank: int, micro: int, n_seq: int) -> np.ndarray:
    if cfg.token_sample_rate >= 1.0:
        return np.ones(n_seq, dtype=bool)
    rng = np.random.default_rng([cfg.sample_seed, step & 0x7FFFFFFF, rank, micro])
    return rng.random(n_seq) < cfg.token_sample_rate


def build_batch(job: Job, step: int) -> tuple[kernel.TokenBatch, np.ndarray, dict[str, np.ndarray]]:
    """Kernel layout of a job: (batch, flat indices of its masked-in tokens, the gathered token columns)."""
    B, T = job.shape
    arr = {k: v.get() for k, v in job.inputs.items()}
    mask = arr.pop("mask", None)
    mask = np.ones((B, T), dtype=bool) if mask is None else mask.astype(bool, copy=False).reshape(B, T)
    flat = np.flatnonzero(mask.reshape(-1))
    counts = mask.sum(axis=1)
    cols: dict[str, np.ndarray] = {}
    for name, a in arr.items():
        if name in PER_SEQ:
            cols[name] = a.reshape(B).copy()
            continue
        if name in BROADCAST_OK and (a.ndim == 1 or a.shape == (B, 1)):  # per sequence: one value per row
            a = np.broadcast_to(a.reshape(B, 1), (B, T))
        cols[name] = a.reshape(-1)[flat]
    tb = kernel.TokenBatch(
        rec_off=np.array([0, B]),
        seq_off=np.concatenate([[0], np.cumsum(counts)]),
        steps=np.array([step]),
        logp=cols["logp"],
        old_logp=cols["old_logp"],
        adv=cols["adv"],
        pos=flat % T,
        entropy=cols.get("entropy"),
        rollout_logp=cols.get("rollout_logp"),
        ref_logp=cols.get("ref_logp"),
        version=cols.get("version"),
        stage=cols.get("stage"),
        group=cols.get("group"),
        reward=cols.get("reward"),
        invalid=np.array([job.invalid]),
        route_agree=cols.get(schema.ROUTE_AGREE),
        teacher_logp=cols.get(schema.TEACHER_LOGP),
        base_logp=cols.get(schema.BASE_LOGP),
    )
    return tb, flat, cols


def token_table(
    job: Job,
    rank: int,
    seq_base: int,
    tb: kernel.TokenBatch,
    flat: np.ndarray,
    cols: dict[str, np.ndarray],
    cov: np.ndarray,
    keep_seq: np.ndarray,
) -> pa.Table:
    """Token rows of the sampled sequences of one record, in (seq, pos) order, all schema columns present."""
    B, T = job.shape
    counts = np.diff(tb.seq_off)
    row = np.repeat(np.arange(B), counts)
    sel = keep_seq[row]
    n = int(sel.sum())
    out: dict[str, pa.Array] = {}
    for name, dtype in schema.TOKEN_DTYPES.items():
        values: np.ndarray | None
        if name == schema.STEP:
            values = np.full(n, job.step, dtype=np.int64)
        elif name == schema.RANK:
            values = np.full(n, rank, dtype=np.int32)
        elif name == schema.MICRO:
            values = np.full(n, job.micro, dtype=np.int32)
        elif name == schema.SEQ:
            values = (np.int64(rank) << 32) + seq_base + row[sel].astype(np.int64)
        elif name == schema.POS:
            values = (flat % T)[sel].astype(np.int32)
        elif name == schema.COV:
            values = cov[sel].astype(np.float32)
        elif name in PER_SEQ:
            values = cols[name][row[sel]] if name in cols else None
        else:
            values = cols[name][sel] if name in cols else None
        if values is None:
            out[name] = pa.nulls(n, type=dtype)
        else:
            out[name] = pa.array(np.ascontiguousarray(values).astype(dtype.to_pandas_dtype(), copy=False), type=dtype)
    return pa.table(out)


class Writer(threading.Thread):
    """Background thread of one :class:`~rldiag.record.recorder.Recorder`."""

    def __init__(
        self,
        run_dir: storage.Location,
        wid: str,
        rank: int,
        cfg: RecorderConfig,
        on_step: Callable[[int, pa.Table], None] | None = None,
    ) -> None:
        super().__init__(name=f"rldiag-writer-{wid}", daemon=True)
        self.run_dir = storage.location(run_dir)
        self.wid = wid
        self.rank = rank
        self.cfg = cfg
        self._on_step = on_step
        self.pool: Any = None
        self.scalars: Any = None
        """The recorder's :class:`rldiag.record.scalars.ScalarLog`: published first whenever this thread publishes."""
        self._cv = threading.Condition()
        self._queue: collections.deque[Job | _Barrier | None] = collections.deque()
        self.queued_bytes = 0
        self.error: BaseException | None = None
        self.error_text = ""
        self.failures = 0
        self._stats_parts: list[pa.Table] = []
        self._stats_bytes = 0
        """Buffer size of ``_stats_parts``, kept as they come and go: summing ``Table.nbytes`` over them on
        every record cost 0.2 ms per part (131 columns), quadratic in the records of a segment."""
        self._token_parts: list[pa.Table] = []
        self._buffer_rows = 0
        self._buffer_steps: set[int] = set()
        self._oldest: float | None = None
        self._segment = 0
        self._seq_counter: dict[int, int] = {}
        self.published: list[str] = []
        self.rows_written = 0
        self.rows_dropped = 0
        self.records = 0
        self._meta = file_metadata(wid, rank, cfg)
        # a failed publication (disk full...): token rows are dropped until one succeeds, statistics are kept
        # (up to STATS_BUFFER_MAX_BYTES) and retried with a doubling wait, so memory stays bounded
        self._failing = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._drop_tokens_until = 0.0
        self._token_backoff = 0.0
        self._tokens_done = False
        self.records_lost = 0
        self.arg_names: dict[str, str] = {}
        """Token-row column -> the record() argument it comes from (set by the recorder, for messages)."""
        self._count_lock = threading.Lock()
        self.nonfinite: dict[str, int] = {}
        """NaN/Inf values per argument (masked-in tokens; per sequence for group-level inputs)."""
        self.invalid_values: dict[str, int] = {}
        """Values refused per argument in lenient mode (out of range, not 0/1, fractional ids...)."""
        """Statistics rows given up because nothing could be published for too long (full disk)."""
        self.publish_failures = 0
        self._in_process = 0
        self.warming = True
        """Still loading (or, on an empty numba cache, compiling) the statistics kernel; no record is processed."""
        self.live_seconds: float | None = 1.0
        """Rewrite the live tail at most this often while unpublished statistics exist (None: never)."""
        self._live_dirty = False
        self._live_at = 0.0
        self._live_path = Path(str(self.run_dir)) / LIVE_DIR / f"{wid}.parquet"  # local runs only (recorder)

    # ---- producer side -------------------------------------------------------------------------
    def put(self, job: Job) -> None:
        with self._cv:
            self._queue.append(job)
            self.queued_bytes += job.nbytes
            self._cv.notify()

    def wait_for_space(self, nbytes: int, timeout: float) -> bool:
        """True when ``nbytes`` more fit in the queue bound (waits up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.queued_bytes + nbytes > self.cfg.queue_max_bytes:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._cv.wait(left)
            return True

    def barrier(self, publish: bool = True, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is processed (and published when ``publish``)."""
        b = _Barrier(publish=publish)
        with self._cv:
            self._queue.append(b)
            self._cv.notify()
        if not self.is_alive():
            return False
        return b.event.wait(timeout)

    def stop(self) -> None:
        with self._cv:
            self._queue.append(None)
            self._cv.notify()

    # ---- consumer side -------------------------------------------------------------------------
    def run(self) -> None:
        # Load (or, in a fresh environment with no compiled cache, compile: about 10 s on a 2-core machine) the
        # statistics kernel now, while the trainer still loads its model or samples its first rollout, rather
        # than at the first record, when a preemption in those seconds would find nothing published.
        with contextlib.suppress(Exception):
            kernel.warmup()
        self.warming = False
        while True:
            with self._cv:
                while not self._queue:
                    timeout = None
                    if self._oldest is not None:
                        due = self._oldest + self.cfg.roll_seconds
                        if self._failing:
                            due = max(due, self._retry_at)
                        if self._live_dirty and self.live_seconds is not None:
                            due = min(due, self._live_at + self.live_seconds)
                        timeout = max(0.0, due - time.monotonic())
                    if not self._cv.wait(timeout) and self._oldest is not None:
                        break  # timed out: publish what is buffered
                item = self._queue.popleft() if self._queue else "tick"
            if item is None:
                self._safe(self._publish)
                self.records_lost += sum(t.num_rows for t in self._stats_parts)  # could not be published
                return
            if isinstance(item, str):  # "tick": a roll or live-tail time came
                if self._should_roll():
                    self._safe(self._publish)
                else:
                    self._write_live()
                continue
            if isinstance(item, _Barrier):
                if item.publish:
                    self._safe(self._publish)
                item.event.set()
                continue
            self._in_process = 1
            try:
                self._process(item)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                self._fail(exc)
            finally:
                self._in_process = 0
                with self._cv:
                    self.queued_bytes -= item.nbytes
                    self._cv.notify_all()
            if self._should_roll():
                self._safe(self._publish)
            elif (
                self._live_dirty
                and self.live_seconds is not None
                and (time.monotonic() >= self._live_at + self.live_seconds)
            ):
                self._write_live()

    def _write_live(self) -> None:
        """Rewrite ``live/<writer>.parquet`` with the statistics not yet in a segment (no fsync: a hint)."""
        if not self._live_dirty or not self._stats_parts or self.live_seconds is None:
            return
        self._live_dirty = False
        self._live_at = time.monotonic()
        table = pa.concat_tables(self._stats_parts)
        meta = dict(self._meta)
        meta[LIVE_META_KEY] = json.dumps({"writer": self.wid, "segment": self._segment}).encode()
        tmp = self._live_path.with_name(f".{self._live_path.name}{schema.TMP_SUFFIX}")
        try:
            self._live_path.parent.mkdir(exist_ok=True)
            pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")
            os.replace(tmp, self._live_path)
        except Exception:  # noqa: BLE001 - a full disk...: the segments are what counts
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if self.scalars is not None:  # unpublished custom scalars: live/<writer>.scalars
            self.scalars.write_live(self._live_path.with_suffix(".scalars"), self._meta)

    def _drop_live(self) -> None:
        try:
            self._live_path.unlink(missing_ok=True)
        except OSError:
            pass

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failures += 1
        if self.error is None:
            self.error = exc
            self.error_text = "".join(traceback.format_exception_only(type(exc), exc)).strip()

    def _process(self, job: Job) -> None:
        if job.precomputed is not None:
            pre = job.precomputed
            stats, flat, cov, tb, cols, dropped = pre.stats, pre.flat, pre.cov, pre.batch, pre.cols, pre.dropped
            written = 0
        else:
            if not job.checked:  # device inputs: their values are first seen here
                arrays = {k: v.get() for k, v in job.inputs.items()}
                where = f"the record at step {job.step} (micro {job.micro})"
                problems = check_values(arrays, job.shape, self.cfg.logp_tolerance)
                bad, drop, counts = resolve_problems(
                    problems, arrays, strict=self.cfg.errors == "strict", names=self.arg_names, where=where
                )
                job.invalid |= bad
                for col in drop:
                    job.inputs.pop(col, None)
                self.count(self.invalid_values, counts)
            tb, flat, cols = build_batch(job, job.step)
            if self.pool is not None:  # every column was gathered out of the snapshots
                for snap in job.inputs.values():
                    snap.release(self.pool)
            stats = kernel.compute(tb, self.cfg)
            cov = stats.cov
            dropped = 0
            written = 0
        B = job.shape[0]
        self.count(
            self.nonfinite,
            {
                self.arg_names.get(k, k): int(np.count_nonzero(~np.isfinite(c)))
                for k, c in cols.items()
                if c.dtype.kind == "f"
            },
        )
        n_bad = stats.scalars[0, kernel.SCALARS.index("n_invalid")]
        if self.cfg.errors == "strict" and n_bad > 0:
            raise ValueError(
                f"record at step {job.step} (micro {job.micro}) has {int(n_bad)} log-probs above "
                f"{self.cfg.logp_tolerance} (log-probabilities cannot be positive): it was not written. Pass "
                "log-probs, not logits or probabilities, or use errors='lenient' to count and skip such tokens"
            )
        seq_base = self._seq_counter.get(job.step, 0)
        self._seq_counter[job.step] = seq_base + B
        if len(self._seq_counter) > 4096:
            for k in sorted(self._seq_counter)[:2048]:
                del self._seq_counter[k]
        if job.drop_rows:  # the queue was full with device inputs: statistics only, token rows dropped (counted)
            dropped = int(flat.size)
        if job.precomputed is None and not job.invalid and not job.drop_rows:
            keep = _sample_mask(self.cfg, job.step, self.rank, job.micro, B)
            tokens = token_table(job, self.rank, seq_base, tb, flat, cols, cov, keep)
            written = tokens.num_rows
            if self._failing or time.monotonic() < self._drop_tokens_until:  # bounded memory: drop (counted)
                dropped, written = dropped + written, 0
            elif written:
                self._token_parts.append(tokens)
        overrides = {"rows_written": np.array([float(written)]), "rows_dropped": np.array([float(dropped)])}
        table = to_table(stats, np.array([job.step]), np.array([self.rank]), np.array([job.micro]), overrides)
        self._stats_parts.append(table)
        self._stats_bytes += table.get_total_buffer_size()
        self._buffer_rows += written
        self._buffer_steps.add(job.step)
        self.rows_written += written
        self.rows_dropped += dropped
        self.records += 1
        if self._oldest is None:
            self._oldest = time.monotonic()
        self._live_dirty = True
        if self._on_step is not None:
            self._on_step(job.step, table)

    def _should_roll(self) -> bool:
        if not self._stats_parts:
            return False
        if self._failing and time.monotonic() < self._retry_at:
            return False
        return (
            (self.live_seconds is not None and self._stats_bytes > LIVE_MAX_BYTES)
            or len(self._buffer_steps) >= self.cfg.roll_steps
            or self._buffer_rows >= self.cfg.roll_rows
            or (self._oldest is not None and time.monotonic() - self._oldest >= self.cfg.roll_seconds)
        )

    def _write(
        self, table: pa.Table, folder: str, name: str, compression: str, extra_meta: dict[bytes, bytes] | None = None
    ) -> None:
        final = self.run_dir / folder / name
        table = table.replace_schema_metadata(self._meta)
        if storage.is_remote(final):  # object storage: the whole file in one write, never part of an object
            buf = pa.BufferOutputStream()
            write_parquet(table, buf, compression, extra_meta)
            storage.write_whole(final, buf.getvalue().to_pybytes())
            return
        assert isinstance(final, Path)
        tmp = final.with_name(f".{name}{schema.TMP_SUFFIX}")
        try:
            write_parquet(table, tmp, compression, extra_meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _publish(self) -> None:
        if self.scalars is not None and self.scalars.pending:  # custom scalars (Recorder.log), their own files
            self._safe(lambda: self.scalars.publish(self.run_dir, self.wid, self._meta))  # kept on failure
        if not self._stats_parts:
            self._oldest = None
            return
        name = segment_name(self.wid, self._segment)
        # token rows first: a reader that sees the statistics of a segment can also see its rows
        if self._token_parts and not self._tokens_done:
            try:
                self._write(pa.concat_tables(self._token_parts), schema.TOKENS_DIR, name, self.cfg.compression)
            except BaseException as exc:  # noqa: BLE001 - the statistics may still fit: try them
                self._tokens_failed(exc)
            else:
                self._token_backoff = 0.0
                self._tokens_done = True
                self._token_parts.clear()  # on disk: a retry of the statistics does not write them again
        try:
            self._write_stats(name)
        except BaseException as exc:
            if not self._give_up_segment_tokens(name, exc):
                self._publish_failed(exc)
                self._bound_stats()
                return
        self._segment += 1
        self.published.append(name)
        self._stats_parts.clear()
        self._stats_bytes = 0
        self._token_parts.clear()
        self._tokens_done = False
        self._buffer_rows = 0
        self._buffer_steps.clear()
        self._oldest = None
        self._failing = False
        self._backoff = 0.0
        self._live_dirty = False
        self._drop_live()  # its rows are in the segment now (readers that saw both keep the segment's)

    def _write_stats(self, name: str) -> None:
        """Publish the buffered statistics as segment ``name``, with its write-time summary in the footer."""
        table = pa.concat_tables(self._stats_parts)
        self._write(table, schema.STATS_DIR, name, "zstd", summary_metadata(table))

    def _tokens_failed(self, exc: BaseException) -> None:
        """The buffered token rows cannot be published: count them as dropped, report ``exc``, and drop token
        rows for a doubling while (up to RETRY_MAX_SECONDS) so that the statistics keep what space is left."""
        self._drop_buffered_tokens()
        self._fail(exc)
        self.publish_failures += 1
        self._token_backoff = min(RETRY_MAX_SECONDS, max(0.5, 2 * self._token_backoff))
        self._drop_tokens_until = time.monotonic() + self._token_backoff

    def _give_up_segment_tokens(self, name: str, exc: BaseException) -> bool:
        """The statistics of segment ``name`` failed after its token file was written (on a full disk, that
        file took the space they need): remove the token file (no reader uses a token file without its
        statistics), count its rows as dropped, drop token rows for a while, and write the statistics again.
        Statistics come before token rows. Returns whether the statistics are now written."""
        path = self.run_dir / schema.TOKENS_DIR / name
        if not self._tokens_done or storage.is_remote(path) or not isinstance(exc, OSError):
            return False
        assert isinstance(path, Path)
        try:
            path.unlink()
        except OSError:
            return False
        self._tokens_done = False
        self._tokens_failed(exc)
        try:
            self._write_stats(name)
        except BaseException:  # noqa: BLE001 - reported by the caller, as the first failure
            return False
        return True

    def count(self, counter: dict[str, int], counts: dict[str, int]) -> None:
        """Add ``counts`` to one of the per-argument counters (the recorder's thread and this one both do)."""
        with self._count_lock:
            for k, n in counts.items():
                if n:
                    counter[k] = counter.get(k, 0) + n

    def unpublished_records(self) -> int:
        """Records handed to this writer and not yet published: queued, being processed, or processed and held
        until the next publication (read from another thread: a count of that moment)."""
        with self._cv:
            queued = sum(1 for item in self._queue if isinstance(item, Job))
        return queued + self._in_process + sum(t.num_rows for t in list(self._stats_parts))

    @property
    def buffered_bytes(self) -> int:
        """Memory held by processed, unpublished statistics and token rows."""
        return self._stats_bytes + sum(t.get_total_buffer_size() for t in self._token_parts)

    def _publish_failed(self, exc: BaseException) -> None:
        """Count a failed publication, report it, and wait longer before the next automatic attempt."""
        self._fail(exc)
        self.publish_failures += 1
        self._failing = True
        self._backoff = min(RETRY_MAX_SECONDS, max(0.5, 2 * self._backoff))
        self._retry_at = time.monotonic() + self._backoff

    def _drop_buffered_tokens(self) -> None:
        """Give up the buffered token rows (counted as dropped in the statistics rows that describe them)."""
        n = self._buffer_rows
        self.rows_written -= n
        self.rows_dropped += n
        parts = []
        for t in self._stats_parts:
            written = t.column("rows_written")
            dropped = pc.add(t.column("rows_dropped"), written)
            t = t.set_column(t.schema.get_field_index("rows_dropped"), "rows_dropped", dropped)
            zero = pa.array(np.zeros(t.num_rows), type=written.type)
            parts.append(t.set_column(t.schema.get_field_index("rows_written"), "rows_written", zero))
        self._stats_parts[:] = parts
        self._stats_bytes = sum(t.get_total_buffer_size() for t in parts)
        self._token_parts.clear()
        self._buffer_rows = 0

    def _bound_stats(self) -> None:
        """Keep at most STATS_BUFFER_MAX_BYTES of unpublished statistics (the oldest go first, counted)."""
        while self._stats_bytes > STATS_BUFFER_MAX_BYTES and len(self._stats_parts) > 1:
            old = self._stats_parts.pop(0)
            self._stats_bytes -= old.get_total_buffer_size()
            self.records_lost += old.num_rows
