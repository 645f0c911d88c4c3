"""Merge statistics exactly and finalize them into metrics.

Merging is addition (sums, counts, histogram bins, bucket vectors), min/max, log-sum-exp and set union,
grouped by step (and optionally rank): never an average of averages. Finalizing applies each
:class:`~rldiag.metrics.registry.MetricSpec` to the merged statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from rldiag.metrics.registry import REGISTRY, needed_stats
from rldiag.stats.kernel import HISTS, SCALARS, SETS, STATS, VECTORS


@dataclass
class Merged:
    """Merged statistics: one entry per group (step, or (step, rank)), in ascending key order."""

    keys: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]

    @property
    def n_groups(self) -> int:
        return int(next(iter(self.keys.values())).size)


def _group_index(table: pa.Table, by: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    if table.num_rows == 0:
        return np.zeros(0, np.int64), {k: np.zeros(0, np.int64) for k in by}, 0
    cols = [table.column(k).to_numpy().astype(np.int64) for k in by]
    if len(cols) == 1:
        uniq, inv = np.unique(cols[0], return_inverse=True)
        return inv, {by[0]: uniq}, int(uniq.size)
    stacked = np.stack(cols, axis=1)
    uniq, inv = np.unique(stacked, axis=0, return_inverse=True)
    return inv.reshape(-1), {k: uniq[:, i] for i, k in enumerate(by)}, int(uniq.shape[0])


def _list_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per row, flat values) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64), values


def merge(table: pa.Table, by: Sequence[str] = ("step",), stats: Iterable[str] | None = None) -> Merged:
    """Merge the statistics rows of ``table`` by the key columns ``by``.

    ``stats`` limits the work to the statistics named (default: all that the registry needs).
    """
    wanted = set(needed_stats()) if stats is None else set(stats)
    inv, keys, g = _group_index(table, by)
    out: dict[str, np.ndarray] = {}
    for name in SCALARS:
        if name not in wanted:
            continue
        x = table.column(name).to_numpy()
        kind = STATS[name].merge
        if kind == "sum":
            out[name] = np.bincount(inv, weights=x, minlength=g)
        elif kind == "min":
            acc = np.full(g, np.inf)
            np.minimum.at(acc, inv, x)
            out[name] = acc
        elif kind == "max":
            acc = np.full(g, -np.inf)
            np.maximum.at(acc, inv, x)
            out[name] = acc
        else:  # lse
            m = np.full(g, -np.inf)
            np.maximum.at(m, inv, x)
            safe = np.where(np.isfinite(m), m, 0.0)
            with np.errstate(over="ignore", invalid="ignore"):
                s = np.bincount(inv, weights=np.exp(x - safe[inv]), minlength=g)
                out[name] = np.where(np.isfinite(m), safe + np.log(np.where(s > 0, s, 1.0)), m)
    for name, nb in HISTS.items():
        if name not in wanted:
            continue
        lengths, idx = _list_parts(table.column(f"{name}.idx"))
        _, cnt = _list_parts(table.column(f"{name}.cnt"))
        grp = np.repeat(inv, lengths)
        flat = grp * nb + idx.astype(np.int64)
        out[name] = np.bincount(flat, weights=cnt.astype(np.float64), minlength=g * nb).reshape(g, nb)
    for name in VECTORS:
        if name not in wanted:
            continue
        lengths, vals = _list_parts(table.column(name))
        nb = int(lengths.max()) if lengths.size else 0
        if nb and (lengths != nb).any():
            raise ValueError(f"statistics column {name} mixes bucket counts {sorted(set(lengths.tolist()))}; "
                             "the run was recorded with different n_buckets settings")
        mat = vals.reshape(-1, nb) if nb else np.zeros((table.num_rows, 0))
        acc = np.zeros((g, nb))
        np.add.at(acc, inv, mat)
        out[name] = acc
    for name in SETS:
        if name not in wanted:
            continue
        lengths, vals = _list_parts(table.column(name))
        grp = np.repeat(inv, lengths)
        if vals.size:
            pairs = np.unique(np.stack([grp, vals.astype(np.int64)], axis=1), axis=0)
            out[name] = np.bincount(pairs[:, 0], minlength=g).astype(np.float64)
        else:
            out[name] = np.zeros(g)
    return Merged(keys=keys, stats=out)


def finalize(merged: Merged, names: Sequence[str] | None = None) -> pl.DataFrame:
    """Metrics from merged statistics: the key columns plus one Float64 column per metric name."""
    names = list(REGISTRY) if names is None else list(names)
    data: dict[str, np.ndarray] = {k: v.astype(np.int64) for k, v in merged.keys.items()}
    g = merged.n_groups
    for name in names:
        spec = REGISTRY[name]
        if g == 0:
            data[name] = np.zeros(0)
            continue
        with np.errstate(all="ignore"):
            vals = np.asarray(spec.finalize(merged.stats), dtype=np.float64)
        data[name] = np.broadcast_to(vals, (g,)).copy()
    schema = {k: pl.Int64 for k in merged.keys} | {n: pl.Float64 for n in names}
    return pl.DataFrame(data, schema=schema)


def metrics_of(table: pa.Table, by: Sequence[str] = ("step",), names: Sequence[str] | None = None) -> pl.DataFrame:
    """Merge and finalize in one call (only the statistics the named metrics need are merged)."""
    stats = needed_stats(list(names)) if names is not None else None
    return finalize(merge(table, by=by, stats=stats), names)
