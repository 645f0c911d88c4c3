"""Statistics recomputed from token rows, by the same kernel the recorder runs.

Used to answer "what would the metrics have been with another configuration?", to build statistics for
token rows imported from elsewhere, and for the position/stage bucket table.

Throughput: token files are read one row group at a time (no copy of the columns), cut at record boundaries
(a record's rows are contiguous in a file and never span files), and the pieces go to a pool of kernel
threads (the numba kernel releases the GIL) while the next row groups are read. At most a few pieces are
in flight, so memory stays bounded whatever the size of the run.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import schema, storage
from rldiag.analysis.progress import progress
from rldiag.config import RecorderConfig
from rldiag.metrics import aggregate
from rldiag.metrics.registry import BUCKET_METRICS, PROB_BUCKET_METRICS, needed_stats
from rldiag.stats import bucket_kernel, kernel
from rldiag.stats.table import STATS_SCHEMA, to_table

_RECORD_KEYS = (schema.STEP, schema.RANK, schema.MICRO)
_VALUE_COLS = (
    schema.LOGP,
    schema.OLD_LOGP,
    schema.ADV,
    schema.ENTROPY,
    schema.ROLLOUT_LOGP,
    schema.REF_LOGP,
    schema.VERSION,
    schema.STAGE,
    schema.GROUP,
    schema.REWARD,
    schema.ROUTE_AGREE,
    schema.TEACHER_LOGP,
    schema.BASE_LOGP,
)
_CONFIG_FREE_COLS = (
    schema.REF_LOGP,
    schema.VERSION,
    schema.GROUP,
    schema.ROUTE_AGREE,
    schema.TEACHER_LOGP,
    schema.BASE_LOGP,
)
"""Columns that only config-independent statistics read (reference KL, staleness, groups, MoE routing, the
non-finite teacher/base log-probs)."""


def token_read_columns(*, config_only: bool = False) -> list[str]:
    """The token columns :func:`iter_file_stats` asks for (``config_only``: a config recompute's, which leaves
    :data:`_CONFIG_FREE_COLS` on disk); a row group's all-null ones are then skipped."""
    return [c for c in schema.KEY_COLUMNS + _VALUE_COLS if not (config_only and c in _CONFIG_FREE_COLS)]


def _col(table: pa.Table, name: str, dtype: type = np.float32) -> np.ndarray | None:
    """A column as numpy (no copy for a single-chunk column without nulls); None when absent or all null."""
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count == len(col):
        return None
    if col.null_count:
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        col = pc.fill_null(col, fill)
    return col.to_numpy().astype(dtype, copy=False)


@numba.njit(nogil=True, cache=True)
def _layout(k0, k1, k2, k3, seq):  # pragma: no cover - compiled
    """Sequence starts (token offsets, plus the end) and record starts (sequence offsets, plus the end) of
    rows ordered by record keys k0..k3 and then ``seq``: one pass."""
    n = seq.size
    seq_off = np.empty(n + 1, dtype=np.int64)
    rec_off = np.empty(n + 1, dtype=np.int64)
    n_seq = 0
    n_rec = 0
    for i in range(n):
        new_rec = i == 0 or k0[i] != k0[i - 1] or k1[i] != k1[i - 1] or k2[i] != k2[i - 1] or k3[i] != k3[i - 1]
        if new_rec or seq[i] != seq[i - 1]:
            if new_rec:
                rec_off[n_rec] = n_seq
                n_rec += 1
            seq_off[n_seq] = i
            n_seq += 1
    seq_off[n_seq] = n
    rec_off[n_rec] = n_seq
    return seq_off[: n_seq + 1].copy(), rec_off[: n_rec + 1].copy()


def batch_from_tokens(
    table: pa.Table, record_keys: tuple[str, ...] = _RECORD_KEYS, sort: bool = True
) -> tuple[kernel.TokenBatch, dict[str, np.ndarray]]:
    """Kernel layout of token rows: records are runs of ``record_keys``, sequences runs of ``seq``.

    Returns the batch and the key values of each record. With ``sort=False`` the rows must already come in
    record, sequence and position order (as the recorder writes them).
    """
    if sort:
        table = table.sort_by([(k, "ascending") for k in record_keys + (schema.SEQ, schema.POS)])
    keys = {k: table.column(k).to_numpy() for k in record_keys}
    if not 1 <= len(keys) <= 4:
        raise ValueError(f"one to four record keys, got {record_keys}")
    k = list(keys.values())
    k += [k[-1]] * (4 - len(k))
    seq_tok, rec_off = _layout(k[0], k[1], k[2], k[3], table.column(schema.SEQ).to_numpy())
    first = seq_tok[:-1]
    rec_first = first[rec_off[:-1]]
    group = _col(table, schema.GROUP, np.int64)
    reward = _col(table, schema.REWARD)
    rec_keys = {name: v[rec_first].astype(np.int64) for name, v in keys.items()}
    logp, old_logp, adv = _col(table, schema.LOGP), _col(table, schema.OLD_LOGP), _col(table, schema.ADV)
    if logp is None or old_logp is None or adv is None:
        raise ValueError("token rows need the columns logp, old_logp and adv (docs/run-format.md, token columns)")
    batch = kernel.TokenBatch(
        rec_off=rec_off,
        seq_off=seq_tok,
        steps=rec_keys.get(schema.STEP, np.zeros(rec_first.size, np.int64)),
        logp=logp,
        old_logp=old_logp,
        adv=adv,
        pos=table.column(schema.POS).to_numpy(),
        entropy=_col(table, schema.ENTROPY),
        rollout_logp=_col(table, schema.ROLLOUT_LOGP),
        ref_logp=_col(table, schema.REF_LOGP),
        version=_col(table, schema.VERSION, np.int64),
        stage=_col(table, schema.STAGE, np.int64) if "bucket" not in record_keys else None,
        group=None if group is None else group[first],
        reward=None if reward is None else reward[first],
        route_agree=_col(table, schema.ROUTE_AGREE),
        teacher_logp=_col(table, schema.TEACHER_LOGP),
        base_logp=_col(table, schema.BASE_LOGP),
    )
    return batch, rec_keys


def stats_of_table(
    table: pa.Table,
    cfg: RecorderConfig,
    record_keys: tuple[str, ...] = _RECORD_KEYS,
    *,
    sort: bool = True,
    hists: bool = True,
    absd: bool = False,
) -> pa.Table:
    """Statistics rows (``STATS_SCHEMA`` plus any extra record keys) of the records in ``table``.

    ``absd``: also the column :data:`rldiag.stats.bucket_kernel.ABSD_STAT` (sum of ``|d|`` of the tokens
    ``n_mm`` counts), for the probability and routing bucket tables."""
    if table.num_rows == 0:
        return STATS_SCHEMA.empty_table()
    batch, keys = batch_from_tokens(table, record_keys, sort=sort)
    stats = kernel.compute(batch, cfg, hists=hists, cov=False)
    n = batch.n_records
    out = to_table(
        stats,
        keys.get(schema.STEP, np.zeros(n)),
        keys.get(schema.RANK, np.zeros(n)),
        keys.get(schema.MICRO, np.zeros(n)),
        overrides={"rows_written": stats.scalars[:, kernel.SCALARS.index("n_masked")]},
    )
    for k, v in keys.items():
        if k not in _RECORD_KEYS:
            out = out.append_column(k, pa.array(v))
    if absd:
        tok_off = batch.seq_off[batch.rec_off]
        sums = bucket_kernel.absd_sums(
            tok_off, batch.logp, batch.old_logp, batch.adv, batch.rollout_logp, cfg.logp_tolerance
        )
        out = out.append_column(bucket_kernel.ABSD_STAT, pa.array(sums, pa.float64()))
    return out


@dataclass
class _Stats:
    """Statistics of records as the kernel returns them, with their keys: the pieces of a recompute are joined
    into one table (:func:`_join`) instead of one table each (about 3 ms of mostly GIL-holding Python per
    table)."""

    stats: kernel.BatchStats
    step: np.ndarray
    rank: np.ndarray
    micro: np.ndarray

    @property
    def n(self) -> int:
        return int(self.step.size)


def _stats_arrays(table: pa.Table, cfg: RecorderConfig, *, hists: bool) -> _Stats | None:
    """:func:`stats_of_table` of rows in record order (``sort=False``, the default record keys), as arrays."""
    if table.num_rows == 0:
        return None
    batch, keys = batch_from_tokens(table, _RECORD_KEYS, sort=False)
    return _Stats(kernel.compute(batch, cfg, hists=hists, cov=False), *(keys[k] for k in _RECORD_KEYS))


def _join(parts: Sequence[_Stats]) -> pa.Table:
    """One statistics table (:data:`STATS_SCHEMA`) of the records of ``parts``, in order: the same rows as
    concatenating :func:`stats_of_table` of each."""
    parts = [p for p in parts if p.n]
    if not parts:
        return STATS_SCHEMA.empty_table()
    first = parts[0].stats
    stats = kernel.BatchStats(
        scalars=np.concatenate([p.stats.scalars for p in parts]),
        hists={k: np.concatenate([p.stats.hists[k] for p in parts]) for k in first.hists},
        vectors={k: np.concatenate([p.stats.vectors[k] for p in parts]) for k in first.vectors},
        sets={k: [x for p in parts for x in p.stats.sets[k]] for k in first.sets},
        cov=np.zeros(0),
    )
    return to_table(
        stats,
        np.concatenate([p.step for p in parts]),
        np.concatenate([p.rank for p in parts]),
        np.concatenate([p.micro for p in parts]),
        overrides={"rows_written": stats.scalars[:, kernel.SCALARS.index("n_masked")]},
    )


@numba.njit(nogil=True, cache=True)
def _tail_run_start(k):  # pragma: no cover - compiled
    i = k.size - 1
    while i > 0 and k[i - 1] == k[k.size - 1]:
        i -= 1
    return i


@numba.njit(nogil=True, cache=True)
def _head_run_end(k, value):  # pragma: no cover - compiled
    i = 0
    while i < k.size and k[i] == value:
        i += 1
    return i


def _last_record_start(table: pa.Table) -> int:
    """Row where the last record of ``table`` begins (rows in record order): a scan back from the end."""
    return max(_tail_run_start(table.column(k).to_numpy()) for k in _RECORD_KEYS)


def _first_record_end(table: pa.Table) -> int:
    """How many leading rows of ``table`` belong to the record of its first row."""
    end = table.num_rows
    for k in _RECORD_KEYS:
        col = table.column(k)
        end = min(end, _head_run_end(col.to_numpy(), col[0].as_py()))
    return end


def _read_row_group(pf: pq.ParquetFile, g: int, names: list[str], local: str | None = None) -> pa.Table:
    """Row group ``g`` of ``names``, reading only what its column statistics leave open: optional columns
    that are all null there (a run that never recorded them) are left out, and key columns with a single
    value there (the writer's rank, often the step) are filled with it instead of being decoded.

    A local file (``local``, its name) is decoded by polars' reader, in this thread: about half the CPU time
    of pyarrow's on token rows (measured on the benchmark runs); the columns then pass to pyarrow without a
    copy."""
    meta = pf.metadata.row_group(g)
    read: list[str] = []
    const: dict[str, object] = {}
    for i in range(meta.num_columns):
        col = meta.column(i)
        name = col.path_in_schema
        if name not in names:
            continue
        st = col.statistics
        if st is not None and st.has_null_count and st.null_count == meta.num_rows and name not in schema.KEY_COLUMNS:
            continue
        if (
            name in schema.KEY_COLUMNS
            and st is not None
            and st.has_min_max
            and st.has_null_count
            and st.null_count == 0
            and st.min == st.max
        ):
            const[name] = st.min
            continue
        read.append(name)
    if local is not None:
        start = sum(pf.metadata.row_group(i).num_rows for i in range(g))
        frame = pl.scan_parquet(local, parallel="none").slice(start, meta.num_rows).select(read).collect()
        table = frame.to_arrow() if read else pa.table({})
        if table.num_rows != meta.num_rows:  # an empty selection, or a reader that disagrees with the footer
            table = pf.read_row_group(g, columns=read, use_threads=False)
    else:
        table = pf.read_row_group(g, columns=read, use_threads=False)  # each worker is one thread already
    for name, value in const.items():
        field = pf.schema_arrow.field(name)
        table = table.append_column(field, _constant(value, str(field.type), meta.num_rows))
    return table


@functools.lru_cache(maxsize=8)
def _constant(value: Any, dtype: str, n: int) -> pa.Array:
    """A read-only column of ``n`` times ``value``: the same few (a writer's rank, micro-batch 0) recur in every
    row group, and filling fresh memory for them cost as much as decoding two columns (page faults)."""
    arr = np.full(n, value, dtype=pa.type_for_alias(dtype).to_pandas_dtype())
    arr.flags.writeable = False
    return pa.array(arr)


def row_groups(files: Iterable[storage.Location]) -> int:
    """Number of Parquet row groups in ``files``: the tables :func:`iter_file_stats` yields."""
    return sum(_metadata(f).num_row_groups for f in files)


def _metadata(f: Any) -> pq.FileMetaData:
    """The footer of a local or remote Parquet file (:func:`rldiag.storage.parquet_source`)."""
    src = storage.parquet_source(f)
    if isinstance(src, str):
        return pq.read_metadata(src)
    with src:
        return pq.read_metadata(src)


MAX_THREADS = 8
"""At most this many recompute workers: each holds a row group (about 50 MB) in flight."""


def default_threads() -> int:
    """Recompute workers: one per core this process may use, at most :data:`MAX_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


@dataclass
class _GroupResult:
    """One row group, read and computed by a worker: the statistics of the records that start and end in it,
    and its first and last rows, which may belong to records that a row-group boundary cuts."""

    head: pa.Table
    stats: pa.Table | _Stats | None
    """Statistics rows, or (``arrays``) the kernel's arrays (None: no records)."""
    tail: pa.Table | None
    open: bool
    """No record boundary inside: the whole row group is ``head``, part of one record."""
    error: str | None = None
    """Why the row group could not be read (damaged file); the result is otherwise empty."""
    rest: Any = None
    """A future of the statistics (arrays) of the whole records after ``stats``'s, computed as a task of its own
    (``pool``); None when the row group was not split."""


def _row_group_skipped(pf: pq.ParquetFile, g: int, limit: int | None, steps: pa.Array | None) -> bool:
    """Whether row group ``g`` holds no row that counts, by its step statistics alone (not read then): all of it
    superseded by a restart (steps from ``limit`` on), or outside the ``steps`` asked for."""
    if steps is not None and len(steps) == 0:
        return True
    st = pf.metadata.row_group(g).column(pf.schema_arrow.get_field_index(schema.STEP)).statistics
    if st is None or not st.has_min_max:
        return False
    if limit is not None and st.min >= limit:
        return True
    return steps is not None and (st.max < steps[0].as_py() or st.min > steps[len(steps) - 1].as_py())


def _rows_that_count(table: pa.Table, limit: int | None, steps: pa.Array | None) -> pa.Table:
    """The rows of ``table`` at the ``steps`` asked for (None: all) and before a restart's ``limit``."""
    if steps is not None:
        table = table.filter(pc.is_in(table.column(schema.STEP), steps))
    if limit is not None:
        table = table.filter(pc.less(table.column(schema.STEP), pa.scalar(limit, pa.int64())))
    return table


def _group_job(
    path: storage.Location,
    meta: pq.FileMetaData,
    g: int,
    last: bool,
    limit: int | None,
    names: list[str],
    steps: pa.Array | None,
    cfg: RecorderConfig,
    hists: bool,
    arrays: bool = False,
    pool: Any = None,
) -> _GroupResult:
    # the footer is parsed once per file, not per row group; a remote file is opened where this runs
    src = storage.parquet_source(path)
    pf = pq.ParquetFile(src, metadata=meta)
    nothing = None if arrays else STATS_SCHEMA.empty_table()
    if _row_group_skipped(pf, g, limit, steps):
        return _GroupResult(pf.schema_arrow.empty_table(), nothing, None, False)
    try:
        table = _read_row_group(pf, g, names, local=src if isinstance(src, str) else None)
    except Exception as exc:  # noqa: BLE001 - a damaged page: reported, the rest of the run is computed
        return _GroupResult(
            pf.schema_arrow.empty_table(),
            nothing,
            None,
            False,
            f"{path} row group {g}: {type(exc).__name__}: {exc}",
        )
    table = _rows_that_count(table, limit, steps)
    n = table.num_rows
    if n == 0:
        return _GroupResult(table, nothing, None, False)
    head = _first_record_end(table)
    if head == n and not last:
        return _GroupResult(table, nothing, None, True)
    cut = n if last else max(head, _last_record_start(table))
    inner = table.slice(head, cut - head)
    rest = None
    if pool is not None and inner.num_rows > 1:  # the second half of the records: a task for an idle worker
        mid = _last_record_start(inner.slice(0, inner.num_rows // 2 + 1))
        if mid > 0:
            inner, second = inner.slice(0, mid), inner.slice(mid)
            rest = pool.submit(_stats_arrays, second, cfg, hists=hists)
    stats: pa.Table | _Stats | None
    if arrays:
        stats = _stats_arrays(inner, cfg, hists=hists)
    else:
        stats = stats_of_table(inner, cfg, sort=False, hists=hists) if inner.num_rows else STATS_SCHEMA.empty_table()
    return _GroupResult(table.slice(0, head), stats, table.slice(cut) if cut < n else None, False, rest=rest)


def iter_file_stats(
    files: Iterable[storage.Location],
    cfg: RecorderConfig,
    *,
    steps: set[int] | None = None,
    config_only: bool = False,
    threads: int | None = None,
    limits: Mapping[storage.Location, int] | None = None,
    executor: Any = None,
) -> Iterator[pa.Table]:
    """Statistics of the records in ``files``, in file order, one table per Parquet row group.

    Each row group is read and computed by one of ``threads`` workers (default: one per core, at most
    :data:`MAX_THREADS`; pyarrow's reader and the numba kernel release the GIL), at most ``threads + 2`` row
    groups at a time, so memory stays bounded.
    A record's rows are contiguous in one file; the few rows of the records that a row-group boundary cuts
    are joined here, in order, and computed as a small piece of their own. ``steps`` keeps only those steps
    (row groups without any are not read).

    ``config_only``: only the statistics that depend on the configuration are wanted (``StatDecl.
    config_dependent``); the others come out empty or partial: no histograms, and the columns only they read
    (reference log-probs, versions, groups, rewards) stay on disk.

    ``limits``: file -> first step whose rows do not count (records a restarted writer superseded,
    :meth:`rldiag.analysis.io.Run.token_limits`).

    ``executor``: where the row groups are read and computed instead of this process's threads: an object
    with ``submit(fn, *args)`` returning something with ``result()`` and a ``parallelism`` (e.g.
    :class:`rldiag.analysis.ray_engine.RowGroupExecutor`). The pieces cut by row-group boundaries are joined
    and computed here, in file order, either way, so the results are the same.
    """
    for parts in _iter_parts(
        files, cfg, steps=steps, config_only=config_only, threads=threads, limits=limits, executor=executor
    ):
        tables = [p for p in parts if isinstance(p, pa.Table) and p.num_rows]
        yield pa.concat_tables(tables) if len(tables) > 1 else tables[0] if tables else STATS_SCHEMA.empty_table()


def _iter_parts(
    files: Iterable[storage.Location],
    cfg: RecorderConfig,
    *,
    steps: set[int] | None = None,
    config_only: bool = False,
    threads: int | None = None,
    limits: Mapping[storage.Location, int] | None = None,
    executor: Any = None,
    arrays: bool = False,
) -> Iterator[list[pa.Table | _Stats]]:
    """:func:`iter_file_stats`, one list of pieces per row group: statistics tables, or with ``arrays`` the
    kernel's arrays (:class:`_Stats`, local threads only), which :func:`_join` turns into one table."""
    threads = threads or (executor.parallelism if executor is not None else default_threads())
    names = token_read_columns(config_only=config_only)
    wanted = None if steps is None else pa.array(sorted(steps), pa.int64())
    metas = [(storage.location(f), _metadata(f)) for f in files]
    lim = {storage.location(k): v for k, v in (limits or {}).items()}
    jobs = [(f, md, g, g == md.num_row_groups - 1, lim.get(f)) for f, md in metas for g in range(md.num_row_groups)]

    arrays = arrays and executor is None

    def stitched(parts: list[pa.Table]) -> pa.Table | _Stats | None:
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return None
        table = pa.concat_tables(parts, promote_options="default").combine_chunks()
        if arrays:
            return _stats_arrays(table, cfg, hists=not config_only)
        return stats_of_table(table, cfg, sort=False, hists=not config_only)

    # the last row groups' second halves are tasks of their own, which a worker that has finished its row groups
    # takes up: the workers then finish together instead of up to one row group apart
    tail_from = len(jobs) - threads

    with ThreadPoolExecutor(max_workers=threads) if executor is None else nullcontext(executor) as pool:

        def extra(k: int) -> tuple[Any, ...]:
            return (True, pool if k >= tail_from else None) if arrays else ()

        pending: deque[tuple[Any, bool]] = deque()  # (future of a _GroupResult, last row group of its file)
        it = iter(enumerate(jobs))
        for k, job in it:
            pending.append((pool.submit(_group_job, *job, names, wanted, cfg, not config_only, *extra(k)), job[3]))
            if len(pending) >= threads + 2:
                break
        open_rows: list[pa.Table] = []
        after_error = False
        while pending:
            fut, last = pending.popleft()
            res = fut.result()
            after = next(it, None)
            if after is not None:
                k, nxt = after
                pending.append((pool.submit(_group_job, *nxt, names, wanted, cfg, not config_only, *extra(k)), nxt[3]))
            if res.error is not None:
                from rldiag.runformat import RunFormatWarning

                warnings.warn(
                    f"skipped an unreadable part of a token file ({res.error}); the records in it and "
                    "the ones it cuts are left out of the recompute (their steps read NaN)",
                    RunFormatWarning,
                    stacklevel=2,
                )
                # the record cut by the damaged part is incomplete; records never span files
                open_rows, after_error = [], not last
                yield []
                continue
            if after_error:  # the first rows may continue a record that began in the damaged part
                res.head, after_error = res.head.slice(0, 0), res.open and not last
            open_rows.append(res.head)
            if res.open:
                yield []
                continue
            edge = stitched(open_rows)
            open_rows = [res.tail] if res.tail is not None else []
            rest = res.rest.result() if res.rest is not None else None
            yield [p for p in (edge, res.stats, rest) if p is not None]


# --- token rows as a lazy frame, and the bucket table's statistics (used by the reader and by Ray tasks) ---
def scan_tokens(files: Sequence[Any], limits: dict[Any, int] | None = None) -> pl.LazyFrame:
    """A lazy scan of token files, leaving out the rows at or after ``limits[file]`` (superseded records).

    Module-level (and given plain lists) so that a worker of another process or node can scan the same rows.
    """
    limits = limits or {}
    whole = [f for f in files if f not in limits]
    parts = [_scan(whole)] if whole else []
    parts += [
        _scan([f]).filter(pl.col(schema.STEP) < cut) for f, cut in sorted(limits.items(), key=lambda x: str(x[0]))
    ]
    return parts[0] if len(parts) == 1 else pl.concat(parts, how="vertical")


_ABSD_MEAN = "mismatch/absd_mean"
_BUCKET_INPUT = {"prob": schema.ROLLOUT_LOGP, "route": schema.ROUTE_AGREE}


def bucket_names(by: str) -> list[str]:
    """The metric columns of the bucket table ``by``."""
    return list(PROB_BUCKET_METRICS if by == "prob" else BUCKET_METRICS)


_BUCKET_VALUES = (schema.LOGP, schema.OLD_LOGP, schema.ADV, schema.ENTROPY, schema.ROLLOUT_LOGP)
"""Value columns the bucket tables' statistics read (ratio, clip, entropy, mismatch)."""
_BUCKET_CHUNK_ROWS = 2_000_000
"""Token rows per piece of a bucket table: whole steps, about this many rows (memory stays bounded)."""


def bucket_read_columns(by: str) -> list[str]:
    """The token columns :func:`bucket_stats` reads for the table ``by``."""
    extra = {"stage": [schema.STAGE], "turn": [schema.TURN], "route": [schema.ROUTE_AGREE]}.get(by, [])
    return list(schema.KEY_COLUMNS) + list(_BUCKET_VALUES) + extra


def _bucket_ids(frame: pl.DataFrame, by: str, buckets: int, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Bucket of each row of a piece of whole steps, and which rows have one."""
    if by in _BUCKET_INPUT:
        ids = bucket_kernel.buckets(by, frame[_BUCKET_INPUT[by]].to_numpy())  # nulls read as NaN: no bucket
        return ids, ids >= 0
    if by == "pos":
        if width is not None:
            ids = frame[schema.POS].to_numpy().astype(np.int64) // width
        else:
            # the step's longest response, from the piece's own rows (it holds whole steps)
            if frame[schema.POS].null_count():
                per = frame.group_by(schema.STEP).agg(pl.col(schema.POS).max() + 1).sort(schema.STEP)
                uniq, top = per[schema.STEP].to_numpy(), per[schema.POS].to_numpy()
            else:
                uniq, top = bucket_kernel.step_longest(frame[schema.STEP].to_numpy(), frame[schema.POS].to_numpy())
            ids = bucket_kernel.decile_buckets(
                frame[schema.STEP].to_numpy(), frame[schema.POS].to_numpy(), uniq, top, buckets
            )
        return ids, np.ones(ids.size, dtype=bool)
    col = frame[by].cast(pl.Int64)
    return col.fill_null(0).to_numpy(), col.is_not_null().to_numpy()


def _bucket_piece(frame: pl.DataFrame, config: RecorderConfig, by: str, ids: np.ndarray, keep: np.ndarray) -> pa.Table:
    """Statistics rows per (step, bucket, rank, micro) of a piece of whole steps with bucket ``ids``."""
    keys = ("step", "bucket", "rank", "micro")
    absd = by == "prob"
    cols = {c: frame[c].to_numpy() for c in schema.KEY_COLUMNS}
    kept = ids[keep]
    small = kept.size == 0 or (int(kept.min()) >= 0 and int(kept.max()) < 1 << 20)
    if small and bucket_kernel.record_ordered(*(cols[c] for c in schema.KEY_COLUMNS)):
        values = {c: _frame_values(frame, c) for c in _BUCKET_VALUES}
        lp, olp, adv = values[schema.LOGP], values[schema.OLD_LOGP], values[schema.ADV]
        if lp is not None and olp is not None and adv is not None:
            got = bucket_kernel.bucket_records(
                cols[schema.STEP],
                cols[schema.RANK],
                cols[schema.MICRO],
                np.where(keep, ids, -1),
                lp,
                olp,
                adv,
                values[schema.ENTROPY],
                values[schema.ROLLOUT_LOGP],
                config,
            )
            if got is not None:
                return _bucket_records_table(*got, absd=absd)
        # the order of the sort below (step, bucket, rank, micro, seq, pos), in one linear pass
        order = bucket_kernel.step_partition(cols[schema.STEP], np.where(keep, ids, -1))
        if order.size == 0:
            return STATS_SCHEMA.empty_table()
        gathered = {c: bucket_kernel.gather(cols[c], order) for c in schema.KEY_COLUMNS}
        for c in _BUCKET_VALUES:  # nulls read as NaN (as _col fills them); an all-null column stays absent
            col = frame[c]
            if col.null_count() < col.len():
                gathered[c] = bucket_kernel.gather(col.to_numpy(), order)
        gathered["bucket"] = bucket_kernel.gather(ids, order)
        table = pa.table(gathered)
        return stats_of_table(table, config, record_keys=keys, sort=False, hists=False, absd=absd)
    table = frame.select(schema.KEY_COLUMNS + _BUCKET_VALUES).to_arrow().append_column("bucket", pa.array(ids))
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
        return STATS_SCHEMA.empty_table()
    return stats_of_table(table, config, record_keys=keys, hists=False, absd=absd)


def _frame_values(frame: pl.DataFrame, name: str) -> np.ndarray | None:
    """A value column of a piece as numpy (nulls as NaN), None when all null (as :func:`_col` reads it)."""
    col = frame[name]
    return None if col.null_count() == col.len() else col.to_numpy()


def _empty_lists(n: int, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], type_.value_type))


def _bucket_records_table(keys: np.ndarray, stats: np.ndarray, absd_sums: np.ndarray, *, absd: bool) -> pa.Table:
    """Statistics rows (:data:`STATS_SCHEMA`, then ``bucket`` and, for ``absd``, the sum of |d|) of the
    records of :func:`rldiag.stats.bucket_kernel.bucket_records`: the statistics the bucket tables read
    (:data:`rldiag.stats.bucket_kernel.BUCKET_STATS`); every other one holds its merge identity, its
    histograms, vectors and sets are empty."""
    n = keys.shape[0]
    have = {name: stats[:, j] for j, name in enumerate(bucket_kernel.BUCKET_STATS)}
    have["rows_written"] = have["n_masked"]
    cols: list[pa.Array] = [
        pa.array(keys[:, 0].astype(np.int64)),
        pa.array(keys[:, 2].astype(np.int32)),
        pa.array(keys[:, 3].astype(np.int32)),
    ]
    for field in STATS_SCHEMA:
        if field.name in ("step", "rank", "micro"):
            continue
        if pa.types.is_list(field.type):
            cols.append(_empty_lists(n, field.type))
        elif field.name in have:
            cols.append(pa.array(np.ascontiguousarray(have[field.name])))
        else:
            cols.append(pa.array(np.full(n, kernel.IDENTITY[kernel.STATS[field.name].merge])))
    out = pa.Table.from_arrays(cols, schema=STATS_SCHEMA).append_column("bucket", pa.array(keys[:, 1]))
    if absd:
        out = out.append_column(bucket_kernel.ABSD_STAT, pa.array(absd_sums, pa.float64()))
    return out


def bucket_stats(
    lf: pl.LazyFrame,
    config: RecorderConfig,
    by: str,
    buckets: int,
    width: int | None,
    *,
    chunk_rows: int = _BUCKET_CHUNK_ROWS,
    threads: int | None = None,
    step_rows: tuple[np.ndarray, np.ndarray] | None = None,
    files: Sequence[Any] | None = None,
    limits: Mapping[Any, int] | None = None,
    steps: Sequence[int] | None = None,
) -> pa.Table:
    """Statistics rows per (step, bucket, rank, micro) of token rows (whole steps: position deciles use the
    step's longest response). Merging them by (step, bucket) (:func:`bucket_table`) gives
    :meth:`Run.bucket_metrics`. ``by="prob"`` and ``"route"`` use the fixed buckets of
    :mod:`rldiag.stats.bucket_kernel` and add its sum of ``|d|``; no rows where the run lacks the column.

    Streams: pieces of whole steps of about ``chunk_rows`` rows, sized from ``step_rows`` (sorted steps and
    their token rows, e.g. :func:`stored_step_rows`; without them a first pass over the step column counts
    them), are read as step ranges that together cover every step (only the columns of
    :func:`bucket_read_columns`; a step's longest response comes from its piece) and bucketed. Rows in the
    recorder's order are accumulated in place by :func:`rldiag.stats.bucket_kernel.bucket_records`, which
    fills only the statistics the tables read (:data:`~rldiag.stats.bucket_kernel.BUCKET_STATS`; the others
    hold their merge identity); other rows are sorted into (step, bucket, record) order and computed by the
    kernel without histograms. Pieces go to ``threads`` workers (default: one per core, at most
    :data:`MAX_THREADS`), joined in step order.

    ``files`` (the token files ``lf`` scans, with their ``limits`` and the ``steps`` it keeps, as
    :meth:`Run.bucket_metrics` has them): read straight from the files, each row group once
    (:func:`_bucket_stats_files`), when their rows allow it; the same rows either way.
    """
    names = lf.collect_schema().names()
    need = bucket_read_columns(by)
    if by in _BUCKET_INPUT and _BUCKET_INPUT[by] not in names:
        return STATS_SCHEMA.empty_table()
    if files:
        spec = _BucketSpec(by, buckets, width, None, config)
        direct = _bucket_stats_files(files, limits or {}, steps, lf, spec, threads or default_threads())
        if direct is not None:
            return direct
    missing = [c for c in need if c not in names]
    lf = lf.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in missing) if missing else lf
    if step_rows is None:
        per_step = lf.group_by(schema.STEP).agg(pl.len().alias("rows")).sort(schema.STEP).collect()
        if per_step.height == 0:
            return STATS_SCHEMA.empty_table()
        step_rows = (per_step[schema.STEP].to_numpy(), per_step["rows"].to_numpy())
    counted, rows = step_rows
    # step ranges (lo, hi] of about chunk_rows rows; the first is open below and the last above, so that a step
    # the counts miss (stored counts of a run still being written) is read all the same
    ends: list[int] = []
    total = 0
    for k in range(counted.size):
        if k and total + int(rows[k]) > chunk_rows:
            ends.append(int(counted[k - 1]))
            total = 0
        total += int(rows[k])
    bounds: list[int | None] = [None, *ends, None]
    ranges = list(zip(bounds[:-1], bounds[1:]))

    def piece(lo: int | None, hi: int | None) -> pa.Table:
        frame = lf.filter(step_between(lo, hi)).select(need).collect()
        if frame.height == 0:
            return STATS_SCHEMA.empty_table()
        ids, keep = _bucket_ids(frame, by, buckets, width)
        return _bucket_piece(frame, config, by, ids, keep)

    # pieces read and computed by a few threads (polars' reader and the compiled passes release the GIL), at
    # most threads + 1 in flight, joined in step order
    threads = min(threads or default_threads(), len(ranges))
    parts: list[pa.Table] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Any] = deque()
        for lo, hi in ranges:
            pending.append(pool.submit(piece, lo, hi))
            if len(pending) > threads:
                parts.append(pending.popleft().result())
        parts.extend(f.result() for f in pending)
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return STATS_SCHEMA.empty_table()
    return pa.concat_tables(parts, promote_options="default")


# --- bucket tables straight from the files: every row group decoded once ---
_BY_KIND = {"prob": bucket_kernel.KIND_PROB, "route": bucket_kernel.KIND_ROUTE}
_FALLBACK = -1
"""A row group the in-place path cannot take (nulls in a key column, unordered rows, bucket ids out of range,
too many buckets per step): the whole table is then computed by the piece path."""


@dataclass(frozen=True)
class _BucketSpec:
    """What a bucket-table job computes: the table ``by``, its ``buckets`` or ``width``, each step's longest
    response over every file (``tops``, when a step's rows are in several files) and the thresholds."""

    by: str
    buckets: int
    width: int | None
    tops: tuple[np.ndarray, np.ndarray] | None
    config: RecorderConfig


def _bucket_table_records(table: pa.Table, spec: _BucketSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray] | int:
    """Records (:func:`rldiag.stats.bucket_kernel.bucket_steps`) of rows of whole steps in the recorder's order;
    :data:`_FALLBACK` when they cannot be accumulated in place."""
    keys = {}
    for c in schema.KEY_COLUMNS:
        col = table.column(c) if c in table.column_names else None
        if col is None or col.null_count:
            return _FALLBACK
        keys[c] = col.to_numpy()
    lp, olp, adv = _col(table, schema.LOGP), _col(table, schema.OLD_LOGP), _col(table, schema.ADV)
    if lp is None or olp is None or adv is None:
        return _FALLBACK
    ids = values = None
    param = 0
    if spec.by in _BY_KIND:
        kind = _BY_KIND[spec.by]
        values = _col(table, _BUCKET_INPUT[spec.by])
    elif spec.by == "pos":
        kind = bucket_kernel.KIND_DECILE if spec.width is None else bucket_kernel.KIND_WIDTH
        param = spec.buckets if spec.width is None else spec.width
        if param <= 0:
            return _FALLBACK
    else:
        kind = bucket_kernel.KIND_IDS
        raw = _col(table, spec.by, np.int64)  # stage / turn: nulls (read as 0 here) get no bucket
        if raw is None:
            return np.zeros((0, 4), dtype=np.int64), np.zeros((0, len(bucket_kernel.BUCKET_STATS))), np.zeros(0)
        col = table.column(spec.by)
        if col.null_count:
            raw = np.where(col.is_valid().to_numpy(zero_copy_only=False), raw, -1)
        kept = raw[raw >= 0] if col.null_count else raw
        if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= 1 << 20):
            return _FALLBACK
        ids = raw
    got = bucket_kernel.bucket_steps(
        keys[schema.STEP],
        keys[schema.RANK],
        keys[schema.MICRO],
        keys[schema.SEQ],
        keys[schema.POS],
        kind,
        ids=ids,
        values=values,
        param=param,
        tops=spec.tops,
        logp=lp,
        old_logp=olp,
        adv=adv,
        entropy=_col(table, schema.ENTROPY),
        rollout_logp=_col(table, schema.ROLLOUT_LOGP),
        cfg=spec.config,
    )
    return _FALLBACK if isinstance(got, int) else got


@dataclass
class _BucketPart:
    """One row group of a bucket table: the records of the steps that start and end in it, and its first and
    last steps' rows, which a row-group boundary may cut."""

    head: pa.Table
    records: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    tail: pa.Table | None
    open: bool
    """A single step fills the whole row group: it is all ``head``."""
    status: int = 0


def _bucket_job(
    path: storage.Location,
    meta: pq.FileMetaData,
    g: int,
    last: bool,
    limit: int | None,
    names: list[str],
    steps: pa.Array | None,
    spec: _BucketSpec,
) -> _BucketPart:
    src = storage.parquet_source(path)
    pf = pq.ParquetFile(src, metadata=meta)
    if _row_group_skipped(pf, g, limit, steps):
        return _BucketPart(pf.schema_arrow.empty_table(), None, None, False)
    table = _read_row_group(pf, g, names, local=src if isinstance(src, str) else None)
    table = _rows_that_count(table, limit, steps)
    n = table.num_rows
    if n == 0:
        return _BucketPart(table, None, None, False)
    if table.column(schema.STEP).null_count:
        return _BucketPart(table, None, None, False, _FALLBACK)
    step = table.column(schema.STEP).to_numpy()
    head = int(_head_run_end(step, step[0]))
    if head == n and not last:
        return _BucketPart(table, None, None, True)
    cut = n if last else max(head, int(_tail_run_start(step)))
    got = _bucket_table_records(table.slice(head, cut - head), spec) if cut > head else None
    if isinstance(got, int):
        return _BucketPart(table, None, None, False, got)
    return _BucketPart(table.slice(0, head), got, table.slice(cut) if cut < n else None, False)


def _file_step_ranges(metas: list[tuple[storage.Location, pq.FileMetaData]]) -> list[tuple[int, int]] | None:
    """Each file's (first, last) step from its row groups' statistics; None when one lacks them or a file's row
    groups do not come in step order (each one's steps at or after the previous one's)."""
    out = []
    for _, md in metas:
        i = md.schema.to_arrow_schema().get_field_index(schema.STEP)
        lo = hi = None
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(i).statistics
            if md.row_group(g).num_rows == 0:
                continue
            if st is None or not st.has_min_max or (hi is not None and st.min < hi):
                return None
            lo = st.min if lo is None else lo
            hi = st.max
        if lo is not None and hi is not None:
            out.append((int(lo), int(hi)))
    return out


def _bucket_stats_files(
    files: Sequence[Any],
    limits: Mapping[Any, int],
    steps: Sequence[int] | None,
    lf: pl.LazyFrame,
    spec: _BucketSpec,
    threads: int,
) -> pa.Table | None:
    """:func:`bucket_stats` read straight from the token files: each Parquet row group is read once by one of
    ``threads`` workers (at most ``threads + 2`` in flight) and its whole steps bucketed and accumulated in
    place (:func:`rldiag.stats.bucket_kernel.bucket_steps`, on the columns without a copy); the steps a
    row-group boundary cuts are joined here, in order, and computed as small pieces of their own. None when the
    rows do not allow it (see :data:`_FALLBACK`, or a record in two files)."""
    metas = [(storage.location(f), _metadata(f)) for f in files]
    lim = {storage.location(k): v for k, v in limits.items()}
    ranges = _file_step_ranges(metas)
    if ranges is None:
        return None
    if spec.by == "pos" and spec.width is None:
        ranges.sort()
        if any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:])):  # a step's rows in several files
            per = lf.group_by(schema.STEP).agg(pl.col(schema.POS).max().cast(pl.Int64) + 1).sort(schema.STEP).collect()
            spec = _BucketSpec(
                spec.by,
                spec.buckets,
                spec.width,
                (per[schema.STEP].to_numpy(), per[schema.POS].to_numpy()),
                spec.config,
            )
    names = bucket_read_columns(spec.by)
    wanted = None if steps is None else pa.array(sorted(set(steps)), pa.int64())
    jobs = [(f, md, g, g == md.num_row_groups - 1, lim.get(f)) for f, md in metas for g in range(md.num_row_groups)]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def edge(rows: list[pa.Table]) -> int:
        rows = [p for p in rows if p.num_rows]
        if not rows:
            return 0
        table = pa.concat_tables(rows, promote_options="default").combine_chunks()
        got = _bucket_table_records(table, spec)
        if isinstance(got, int):
            return got
        parts.append(got)
        return 0

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[tuple[Any, bool]] = deque()
        it = iter(jobs)
        for job in it:
            pending.append((pool.submit(_bucket_job, *job, names, wanted, spec), job[3]))
            if len(pending) >= threads + 2:
                break
        open_rows: list[pa.Table] = []
        while pending:
            fut, last = pending.popleft()
            res = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((pool.submit(_bucket_job, *nxt, names, wanted, spec), nxt[3]))
            if res.status:
                for f, _ in pending:
                    f.cancel()
                return None
            open_rows.append(res.head)
            if res.open:
                continue
            if edge(open_rows):
                for f, _ in pending:
                    f.cancel()
                return None
            if res.records is not None:
                parts.append(res.records)
            open_rows = [res.tail] if res.tail is not None else []
            if last:  # a file's last step; steps never continue into the next file's rows
                if edge(open_rows):
                    for f, _ in pending:
                        f.cancel()
                    return None
                open_rows = []
    if not parts:
        return STATS_SCHEMA.empty_table()
    keys = np.concatenate([p[0] for p in parts])
    order = np.lexsort((keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0]))
    keys = keys[order]
    if keys.shape[0] > 1 and bool(np.any(np.all(keys[1:] == keys[:-1], axis=1))):
        return None  # one record's rows in two places (not as the recorder writes them)
    stats = np.concatenate([p[1] for p in parts])[order]
    sums = np.concatenate([p[2] for p in parts])[order]
    return _bucket_records_table(keys, stats, sums, absd=spec.by == "prob")


def step_between(lo: int | None, hi: int | None) -> pl.Expr:
    """``lo < step <= hi``, a missing bound left out: a piece of whole steps (the bucket tables', the lens's)."""
    where = pl.lit(True)
    if lo is not None:
        where = where & (pl.col(schema.STEP) > lo)
    if hi is not None:
        where = where & (pl.col(schema.STEP) <= hi)
    return where


def stored_step_rows(compact: pa.Table, steps: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Token rows per step as a run's statistics record them (``rows_written`` of its per-step table, e.g.
    ``Run.compact_table()``; only ``steps``), sorted by step, for the pieces of :func:`bucket_stats` and the
    lens without a pass over the token rows; None when the table has none. Only the pieces' sizes depend on
    them."""
    if compact.num_rows == 0 or "rows_written" not in compact.column_names:
        return None
    step = compact.column(schema.STEP).to_numpy().astype(np.int64)
    rows = np.nan_to_num(compact.column("rows_written").to_numpy().astype(np.float64)).astype(np.int64)
    if steps is not None:
        keep = np.isin(step, np.asarray(list(steps), dtype=np.int64))
        step, rows = step[keep], rows[keep]
    order = np.argsort(step, kind="stable")
    return step[order], rows[order]


def bucket_table(stats: pa.Table, by: str) -> pl.DataFrame:
    """The bucket table (one row per (step, bucket)) of the statistics rows of :func:`bucket_stats`: ``step``,
    ``bucket`` (for ``prob``/``route`` also ``bucket_lo``, ``bucket_hi``), ``n`` and :func:`bucket_names`."""
    names = bucket_names(by)
    fixed = by in _BUCKET_INPUT
    keys = ["step", "bucket"] + (["bucket_lo", "bucket_hi"] if fixed else [])
    cols = keys + ["n"] + names
    if stats.num_rows == 0:
        return pl.DataFrame(schema={"step": pl.Int64, "bucket": pl.Int64} | {c: pl.Float64 for c in cols[2:]})
    kernel_names = [n for n in names if n != _ABSD_MEAN]
    merged = aggregate.merge(stats, by=("step", "bucket"), stats=needed_stats(kernel_names) | {"n", "n_mm"})
    out = aggregate.finalize(merged, kernel_names).with_columns(pl.Series("n", merged.stats["n"]))
    if _ABSD_MEAN in names:
        row_keys = {k: stats.column(k).to_numpy() for k in ("step", "bucket")}
        idx = _align(row_keys, merged.keys, ("step", "bucket"))  # every row's group
        total = np.bincount(idx, weights=stats.column(bucket_kernel.ABSD_STAT).to_numpy(), minlength=out.height)
        n_mm = merged.stats["n_mm"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n_mm > 0, total / np.where(n_mm > 0, n_mm, 1.0), np.nan)
        out = out.with_columns(pl.Series(_ABSD_MEAN, mean))
    if fixed:
        lo, hi = bucket_kernel.bounds(by)
        b = out["bucket"].to_numpy()
        out = out.with_columns(pl.Series("bucket_lo", lo[b]), pl.Series("bucket_hi", hi[b]))
    return out.select(cols)


_TOKEN_SCHEMA = pl.Schema({k: pl.Series(pa.array([], v)).dtype for k, v in schema.TOKEN_DTYPES.items()})


def _scan(files: list[Any]) -> pl.LazyFrame:
    """A lazy scan of token files: polars' own reader locally, a pyarrow dataset over fsspec remotely."""
    if not storage.is_remote(files[0]):
        # token files of an older rldiag lack the columns added since (schema.LATER_TOKEN_COLUMNS): read as null
        return pl.scan_parquet([str(f) for f in files], schema=_TOKEN_SCHEMA, missing_columns="insert")
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs = PyFileSystem(FSSpecHandler(files[0].fs))
    dataset = ds.dataset([f.key for f in files], filesystem=fs, format="parquet", schema=_arrow_token_schema())
    return pl.scan_pyarrow_dataset(dataset)


def _arrow_token_schema() -> pa.Schema:
    return pa.schema([pa.field(k, v) for k, v in schema.TOKEN_DTYPES.items()])


_JOIN_RECORDS = 2048
"""Records whose kernel arrays a recompute holds before joining them into a statistics table (their dense
histograms take about 17 kB each)."""


def step_metrics_from_tokens(
    stored: pa.Table,
    files: Sequence[Any],
    config: RecorderConfig,
    names: Sequence[str],
    by: tuple[str, ...],
    *,
    limits: Mapping[Any, int] | None = None,
    ranks: Sequence[int] | None = None,
    steps: set[int] | None = None,
    everything: bool = False,
    executor: Any = None,
) -> pl.DataFrame:
    """Step metrics (as :meth:`Run.step_metrics` returns them) with statistics recomputed from token rows.

    The statistics that depend on ``config`` (every statistic when ``everything``) are recomputed from the token
    rows of ``files`` (rows at or after ``limits[file]`` left out); the others come from the stored statistics
    ``stored``. Fresh statistics are aligned to the stored groups (``by``): a group whose token rows were not all
    read (no rows, a damaged file) gets NaN rather than the statistics of part of its records. ``executor``: a
    :class:`rldiag.analysis.ray_engine.RowGroupExecutor` to run the row groups on Ray (None: local threads).
    """
    pieces = _iter_parts(
        list(files),
        config,
        steps=steps,
        config_only=not everything,
        limits=dict(limits or {}),
        executor=executor,
        arrays=True,
    )
    # the kernel's arrays joined into a table every _JOIN_RECORDS records (dense histograms stay bounded)
    tables: list[pa.Table] = []
    held: list[_Stats] = []
    for group in progress(pieces, row_groups(list(files)), "rldiag: recomputing from token rows"):
        for piece in group:
            if isinstance(piece, pa.Table):  # not from local threads: tables already
                tables += [_join(held), piece]
                held = []
            else:
                held.append(piece)
        if sum(p.n for p in held) >= _JOIN_RECORDS:
            tables.append(_join(held))
            held = []
    tables.append(_join(held))
    tables = [t for t in tables if t.num_rows]
    fresh = pa.concat_tables(tables) if tables else STATS_SCHEMA.empty_table()
    if ranks is not None:
        fresh = fresh.filter(pc.is_in(fresh.column("rank"), pa.array(list(ranks), pa.int32())))
    need = needed_stats(list(names))
    dep = set(need) if everything else {s for s in need if kernel.STATS[s].config_dependent}
    merged_stored = aggregate.merge(stored, by=by, stats=(need - dep) | {"rows_written"})
    merged_fresh = aggregate.merge(fresh, by=by, stats=dep | {"rows_written"})
    out_stats = dict(merged_stored.stats)
    idx = _align(merged_stored.keys, merged_fresh.keys, by)
    fresh_rows = (
        np.where(idx >= 0, merged_fresh.stats["rows_written"][np.maximum(idx, 0)], 0.0)
        if merged_fresh.n_groups
        else np.zeros(idx.size)
    )
    idx = np.where(fresh_rows >= merged_stored.stats["rows_written"], idx, -1)
    same = idx.size == merged_fresh.n_groups and bool(np.all(idx == np.arange(idx.size)))
    for s in dep:
        src = merged_fresh.stats.get(s)
        if same and src is not None:
            out_stats[s] = src  # the usual case: every stored group has token rows
            continue
        shape = (merged_stored.n_groups,) + (src.shape[1:] if src is not None else ())
        arr = np.full(shape, np.nan)
        if src is not None and src.size:
            arr[idx >= 0] = src[idx[idx >= 0]]
        out_stats[s] = arr
    return aggregate.finalize(aggregate.Merged(keys=merged_stored.keys, stats=out_stats), list(names))


def _align(target: dict[str, np.ndarray], source: dict[str, np.ndarray], by: tuple[str, ...]) -> np.ndarray:
    """For each group of ``target``, the index of the group with the same keys in ``source`` (-1 where there
    is none). Both sides are sorted by ``by`` (as ``aggregate.merge`` returns them); the integer keys are
    combined into one int64 that keeps that order, and looked up by binary search."""
    present = [d for d in (target, source) if d[by[0]].size]
    if not present:
        return np.zeros(0, dtype=np.int64)
    lo = min(int(d[k].min()) for d in present for k in by)
    span = [max(int(d[k].max()) for d in present) - lo + 1 for k in by]

    def combined(d: dict[str, np.ndarray]) -> np.ndarray:
        out = np.zeros(d[by[0]].size, dtype=np.int64)
        for k, n in zip(by, span):
            out = out * n + (d[k].astype(np.int64) - lo)
        return out

    t, src = combined(target), combined(source)
    pos = np.searchsorted(src, t)
    hit = pos < src.size
    hit[hit] = src[pos[hit]] == t[hit]
    return np.where(hit, pos, -1)
