"""Statistics recomputed from token rows, by the same kernel the recorder runs.

Used to answer "what would the metrics have been with another configuration?", to build statistics for
token rows imported from elsewhere, and for the position/stage bucket table. Files are processed one at a
time (bounded memory) on a thread pool: the numba kernel releases the GIL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.stats import kernel
from rldiag.stats.table import STATS_SCHEMA, to_table

_VALUE_COLS = (schema.LOGP, schema.OLD_LOGP, schema.ADV, schema.ENTROPY, schema.ROLLOUT_LOGP, schema.REF_LOGP,
               schema.VERSION, schema.STAGE, schema.GROUP, schema.REWARD)


def _col(table: pa.Table, name: str, dtype: type = np.float32) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count == len(col):
        return None
    if col.null_count:
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        col = pc.fill_null(col, fill)
    return col.to_numpy().astype(dtype, copy=False)


def _runs(*keys: np.ndarray) -> np.ndarray:
    """Start offsets (plus the end) of runs of equal consecutive key tuples."""
    n = keys[0].size
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.concatenate([np.flatnonzero(change), [n]]).astype(np.int64)


def batch_from_tokens(table: pa.Table, record_keys: tuple[str, ...] = (schema.STEP, schema.RANK, schema.MICRO),
                      sort: bool = True) -> tuple[kernel.TokenBatch, dict[str, np.ndarray]]:
    """Kernel layout of token rows: records are runs of ``record_keys``, sequences runs of ``seq``.

    Returns the batch and the key values of each record.
    """
    if sort:
        table = table.sort_by([(k, "ascending") for k in record_keys + (schema.SEQ, schema.POS)])
    keys = {k: table.column(k).to_numpy().astype(np.int64) for k in record_keys}
    seq = table.column(schema.SEQ).to_numpy().astype(np.int64)
    rec_tok = _runs(*keys.values())
    seq_tok = _runs(*keys.values(), seq)
    rec_off = np.searchsorted(seq_tok, rec_tok).astype(np.int64)
    first = seq_tok[:-1]
    group = _col(table, schema.GROUP, np.int64)
    reward = _col(table, schema.REWARD)
    batch = kernel.TokenBatch(
        rec_off=rec_off, seq_off=seq_tok,
        steps=keys[schema.STEP][rec_tok[:-1]] if schema.STEP in keys else np.zeros(rec_tok.size - 1, np.int64),
        logp=_col(table, schema.LOGP), old_logp=_col(table, schema.OLD_LOGP), adv=_col(table, schema.ADV),
        pos=table.column(schema.POS).to_numpy().astype(np.int64),
        entropy=_col(table, schema.ENTROPY), rollout_logp=_col(table, schema.ROLLOUT_LOGP),
        ref_logp=_col(table, schema.REF_LOGP), version=_col(table, schema.VERSION, np.int64),
        stage=_col(table, schema.STAGE, np.int64) if "bucket" not in record_keys else None,
        group=None if group is None else group[first], reward=None if reward is None else reward[first],
    )
    if batch.logp is None or batch.old_logp is None or batch.adv is None:
        raise ValueError("token rows need the columns logp, old_logp and adv (metrics-spec section 1)")
    return batch, {k: v[rec_tok[:-1]] for k, v in keys.items()}


def stats_of_table(table: pa.Table, cfg: RecorderConfig,
                   record_keys: tuple[str, ...] = (schema.STEP, schema.RANK, schema.MICRO), *,
                   sort: bool = True, hists: bool = True) -> pa.Table:
    """Statistics rows (``STATS_SCHEMA`` plus any extra record keys) of the records in ``table``."""
    if table.num_rows == 0:
        return STATS_SCHEMA.empty_table()
    batch, keys = batch_from_tokens(table, record_keys, sort=sort)
    stats = kernel.compute(batch, cfg, hists=hists)
    n = batch.n_records
    out = to_table(
        stats, keys.get(schema.STEP, np.zeros(n)), keys.get(schema.RANK, np.zeros(n)),
        keys.get(schema.MICRO, np.zeros(n)),
        overrides={"rows_written": stats.scalars[:, kernel.SCALARS.index("n_masked")]},
    )
    for k, v in keys.items():
        if k not in (schema.STEP, schema.RANK, schema.MICRO):
            out = out.append_column(k, pa.array(v))
    return out


def iter_file_stats(files: Iterable[Path], cfg: RecorderConfig, *, steps: set[int] | None = None,
                    hists: bool = True) -> Iterator[pa.Table]:
    """Statistics of each token file (records never span files), one file at a time.

    The next file is read on a background thread while the kernel works on the current one (pyarrow's
    reader already uses the cores; two kernels side by side were slower than this pipeline on 2 cores).
    """
    files = list(files)

    def read(path: Path) -> pa.Table:
        table = pq.read_table(path, columns=list(schema.KEY_COLUMNS) + [c for c in _VALUE_COLS])
        if steps is not None:
            table = table.filter(pc.is_in(table.column(schema.STEP), pa.array(sorted(steps), pa.int64())))
        return table

    if not files:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, files[0])
        for i in range(len(files)):
            table = pending.result()
            if i + 1 < len(files):
                pending = pool.submit(read, files[i + 1])
            yield stats_of_table(table, cfg, sort=False, hists=hists)
