"""Statistics recomputed from token rows, by the same kernel the recorder runs.

Used to answer "what would the metrics have been with another configuration?", to build statistics for
token rows imported from elsewhere, and for the position/stage bucket table.

Throughput: token files are read one row group at a time (no copy of the columns), cut at record boundaries
(a record's rows are contiguous in a file and never span files), and the pieces go to a pool of kernel
threads (the numba kernel releases the GIL) while the next row groups are read. At most a few pieces are
in flight, so memory stays bounded whatever the size of the run.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.stats import kernel
from rldiag.stats.table import STATS_SCHEMA, to_table

_RECORD_KEYS = (schema.STEP, schema.RANK, schema.MICRO)
_VALUE_COLS = (schema.LOGP, schema.OLD_LOGP, schema.ADV, schema.ENTROPY, schema.ROLLOUT_LOGP, schema.REF_LOGP,
               schema.VERSION, schema.STAGE, schema.GROUP, schema.REWARD)


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


def batch_from_tokens(table: pa.Table, record_keys: tuple[str, ...] = _RECORD_KEYS,
                      sort: bool = True) -> tuple[kernel.TokenBatch, dict[str, np.ndarray]]:
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
    batch = kernel.TokenBatch(
        rec_off=rec_off, seq_off=seq_tok,
        steps=rec_keys.get(schema.STEP, np.zeros(rec_first.size, np.int64)),
        logp=_col(table, schema.LOGP), old_logp=_col(table, schema.OLD_LOGP), adv=_col(table, schema.ADV),
        pos=table.column(schema.POS).to_numpy(),
        entropy=_col(table, schema.ENTROPY), rollout_logp=_col(table, schema.ROLLOUT_LOGP),
        ref_logp=_col(table, schema.REF_LOGP), version=_col(table, schema.VERSION, np.int64),
        stage=_col(table, schema.STAGE, np.int64) if "bucket" not in record_keys else None,
        group=None if group is None else group[first], reward=None if reward is None else reward[first],
    )
    if batch.logp is None or batch.old_logp is None or batch.adv is None:
        raise ValueError("token rows need the columns logp, old_logp and adv (metrics-spec section 1)")
    return batch, rec_keys


def stats_of_table(table: pa.Table, cfg: RecorderConfig, record_keys: tuple[str, ...] = _RECORD_KEYS, *,
                   sort: bool = True, hists: bool = True) -> pa.Table:
    """Statistics rows (``STATS_SCHEMA`` plus any extra record keys) of the records in ``table``."""
    if table.num_rows == 0:
        return STATS_SCHEMA.empty_table()
    batch, keys = batch_from_tokens(table, record_keys, sort=sort)
    stats = kernel.compute(batch, cfg, hists=hists, cov=False)
    n = batch.n_records
    out = to_table(
        stats, keys.get(schema.STEP, np.zeros(n)), keys.get(schema.RANK, np.zeros(n)),
        keys.get(schema.MICRO, np.zeros(n)),
        overrides={"rows_written": stats.scalars[:, kernel.SCALARS.index("n_masked")]},
    )
    for k, v in keys.items():
        if k not in _RECORD_KEYS:
            out = out.append_column(k, pa.array(v))
    return out


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


def _first_rows_of(table: pa.Table, record: pa.Table) -> int:
    """How many leading rows of ``table`` belong to the record of ``record``'s last row."""
    end = table.num_rows
    for k in _RECORD_KEYS:
        col = record.column(k)
        end = min(end, _head_run_end(table.column(k).to_numpy(), col[len(col) - 1].as_py()))
    return end


def _non_null(meta: pq.RowGroupMetaData, names: list[str]) -> list[str]:
    """``names`` less the optional columns that are all null in this row group (per its statistics)."""
    out = []
    for i in range(meta.num_columns):
        col = meta.column(i)
        name = col.path_in_schema
        if name not in names:
            continue
        st = col.statistics
        if name not in schema.KEY_COLUMNS and st is not None and st.has_null_count and st.null_count == meta.num_rows:
            continue
        out.append(name)
    return out


def row_groups(files: Iterable[Path]) -> int:
    """Number of Parquet row groups in ``files``: the pieces :func:`iter_record_chunks` yields."""
    return sum(pq.read_metadata(f).num_row_groups for f in files)


def iter_record_chunks(files: Iterable[Path], *, steps: set[int] | None = None,
                       columns: Iterable[str] | None = None) -> Iterator[list[pa.Table]]:
    """Token rows of ``files``, one list of tables of whole records per Parquet row group.

    A record's rows are contiguous in one file. The rows of a record that a row-group boundary cuts are
    carried over and joined to its rows in the next row group: a small table of its own, so the bulk of each
    row group is used without a copy. ``steps`` keeps only those steps (row groups without any are not read).
    """
    cols = list(columns) if columns is not None else list(schema.KEY_COLUMNS) + list(_VALUE_COLS)
    wanted = None if steps is None else pa.array(sorted(steps), pa.int64())
    lo, hi = (min(steps, default=0), max(steps, default=-1)) if steps is not None else (0, 0)
    for path in files:
        pf = pq.ParquetFile(path)
        present = [c for c in cols if c in pf.schema_arrow.names]
        step_idx = pf.schema_arrow.get_field_index(schema.STEP)
        carry: pa.Table | None = None
        n_groups = pf.metadata.num_row_groups
        for g in range(n_groups):
            pieces: list[pa.Table] = []
            part = None
            if wanted is not None:
                st = pf.metadata.row_group(g).column(step_idx).statistics
                if st is not None and st.has_min_max and (st.max < lo or st.min > hi):
                    part = pf.schema_arrow.empty_table().select(present)
            if part is None:
                part = pf.read_row_group(g, columns=_non_null(pf.metadata.row_group(g), present))
                if wanted is not None:
                    part = part.filter(pc.is_in(part.column(schema.STEP), wanted))
            if carry is not None and carry.num_rows:
                head = _first_rows_of(part, carry) if part.num_rows else 0
                joined = pa.concat_tables([carry, part.slice(0, head)], promote_options="default").combine_chunks()
                if head == part.num_rows and g < n_groups - 1:  # the record goes on in the next row group
                    carry = joined
                    yield pieces
                    continue
                pieces.append(joined)
                part = part.slice(head)
            cut = part.num_rows if g == n_groups - 1 or part.num_rows == 0 else _last_record_start(part)
            if cut:
                pieces.append(part.slice(0, cut))
            carry = part.slice(cut)
            yield pieces


def default_threads() -> int:
    """Kernel threads for a recompute: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def iter_file_stats(files: Iterable[Path], cfg: RecorderConfig, *, steps: set[int] | None = None,
                    hists: bool = True, threads: int | None = None) -> Iterator[pa.Table]:
    """Statistics of the records in ``files``, in file order, one table per Parquet row group (see
    :func:`iter_record_chunks`).

    Pieces are computed on ``threads`` kernel threads (default: one per core)
    while the next are read; at most ``2 * threads`` pieces are in flight.
    """
    threads = threads or default_threads()

    def stats_of(pieces: list[pa.Table]) -> pa.Table:
        parts = [stats_of_table(p, cfg, sort=False, hists=hists) for p in pieces]
        return pa.concat_tables(parts) if parts else STATS_SCHEMA.empty_table()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[pa.Table]] = deque()
        for pieces in iter_record_chunks(files, steps=steps):
            pending.append(pool.submit(stats_of, pieces))
            while len(pending) > 2 * threads or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
