"""Custom scalars: your own numbers next to rldiag's (``rec.log(step, {"loss": 0.41, "lr": 3e-4})``).

TensorBoard's ``add_scalar`` and W&B's ``log`` users expect to keep their loss, learning rate and eval
accuracy next to the diagnostics. :meth:`rldiag.Recorder.log` takes a step and a mapping of names to numbers;
this module holds the recording side (:class:`ScalarLog`, used by the recorder and its writer thread) and the
reading side (:class:`ScalarFiles`, used by :meth:`rldiag.analysis.io.Run.custom_metrics`).

The rules (docs/run-format.md, "Custom scalars"):

- **Exact per step.** A value is stored as the float64 it was logged as, with its step and rank.
- **Logged twice at a step** (same name, same writer): the later call wins.
- **After a restart** the run format's rule applies: a later writer attempt of a rank supersedes the earlier
  attempts' records from its first step on, custom scalars included (and where an earlier attempt's value is
  not cut off, the later attempt's value of the same step and name wins).
- **Several ranks** logging the same name at a step: each rank's value is kept; the step's value is their
  mean (``Run.custom_metrics(reduce=...)`` also gives the sum, min, max, or one row per rank with
  ``by_rank=True``). Log on rank 0 only for a value that is the same everywhere.
- **Names** are free text (``"loss"``, ``"eval/acc"``) up to 200 characters, but never the name of a metric
  of the registry (``kl/k3``...), ``step`` or ``rank``: that is refused with a one-line error. An alert rule
  names a custom scalar as ``custom:<name>`` (``metric = "custom:eval/acc"``).

Files: ``scalars/<writer>-<n>.parquet`` (columns ``step``, ``rank``, ``seq``, ``name``, ``value``), published
whole (temporary name and rename; one PUT on object storage) by the writer thread whenever it publishes a
statistics segment, on ``flush()`` and at ``close()``; the training thread only appends to a list. On a local
run the values not yet published are also in ``live/<writer>.scalars`` (:data:`LIVE_SUFFIX`), rewritten with
the statistics' live tail, so readers see them within about a second.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import runformat, storage
from rldiag.record.tensors import is_torch

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl

__all__ = [
    "CUSTOM_PREFIX",
    "SCALARS_DIR",
    "SCALAR_SCHEMA",
    "MAX_NAME_LENGTH",
    "REDUCTIONS",
    "check_name",
    "ScalarLog",
    "ScalarFiles",
]

LIVE_SUFFIX: Final = ".scalars"
"""``live/<writer>.scalars``: the live tail of a writer's unpublished custom scalars (a Parquet file)."""
SCALARS_DIR: Final = runformat.SCALARS_DIR
"""Folder of the custom-scalar files in a run (``scalars/``)."""
CUSTOM_PREFIX: Final = "custom:"
"""An alert rule names a custom scalar ``custom:<name>``; a rule's registry-metric typo stays an error."""
MAX_NAME_LENGTH: Final = 200
"""Longest custom scalar name (characters)."""
REDUCTIONS: Final = ("mean", "sum", "min", "max")
"""How :meth:`ScalarFiles.frame` combines the ranks that logged a name at a step."""
SCALAR_SCHEMA: Final = pa.schema(
    [
        ("step", pa.int64()),
        ("rank", pa.int32()),
        ("seq", pa.int64()),
        ("name", pa.string()),
        ("value", pa.float64()),
    ]
)
"""Columns of a ``scalars/*.parquet`` file. ``seq`` orders one writer's calls (the later call wins)."""
_RESERVED: Final = frozenset({"step", "rank"})
_checked: set[str] = set()
"""Names already accepted (a training loop logs the same few names every step)."""


@functools.cache
def _reserved_names() -> frozenset[str]:
    from rldiag.metrics.registry import METRICS

    return frozenset(METRICS) | _RESERVED


def check_name(name: Any) -> str:
    """``name`` if it may name a custom scalar, else a one-line :class:`ValueError` (or :class:`TypeError`).

    >>> check_name("eval/acc")
    'eval/acc'
    """
    if type(name) is str and name in _checked:
        return name
    if not isinstance(name, str):
        raise TypeError(f"custom scalar names are strings, got {type(name).__name__} {name!r:.60}")
    if not name or name != name.strip() or len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"custom scalar name {name!r:.80} must be 1 to {MAX_NAME_LENGTH} characters without leading or "
            "trailing spaces"
        )
    if not name.isprintable() or name.startswith("^"):  # polars reads "^...$" column names as patterns
        raise ValueError(f"custom scalar name {name!r:.80} contains control characters or starts with '^'")
    if name.startswith(CUSTOM_PREFIX):
        raise ValueError(
            f"custom scalar name {name!r:.80} starts with {CUSTOM_PREFIX!r}: that prefix is how alert rules refer to "
            f"custom scalars; log it as {name[len(CUSTOM_PREFIX) :]!r}"
        )
    if name in _reserved_names():
        raise ValueError(
            f"custom scalar {name!r} has the name of an rldiag metric (docs/metrics.md) or column; log it under "
            f"another name, e.g. 'my/{name}'"
        )
    if len(_checked) < 10_000:
        _checked.add(name)
    return name


def _value_of(name: str, v: Any) -> Any:
    """A float, or a detached one-element device tensor converted on the writer thread (never syncs a GPU)."""
    if type(v) is float or type(v) is int:  # the common case, without numpy
        return float(v)
    if is_torch(v):
        if v.numel() != 1:
            raise ValueError(f"custom scalar {name!r} is a tensor of shape {list(v.shape)}; log one number")
        if v.is_complex():
            raise TypeError(f"custom scalar {name!r} is a complex tensor; log a real number")
        if v.device.type == "cpu":
            return float(v.detach().reshape(()))
        return v.detach().reshape(()).clone()  # asynchronous on the device; read by the writer thread
    if isinstance(v, (str, bytes)) or v is None:
        raise TypeError(f"custom scalar {name!r} is {type(v).__name__} {v!r:.40}; log a number")
    try:
        a = np.asarray(v)
    except Exception as exc:  # noqa: BLE001 - anything that is not array-like
        raise TypeError(f"custom scalar {name!r}: {type(v).__name__} is not a number ({exc})") from None
    if a.size != 1 or a.dtype.kind not in "biuf":
        raise TypeError(
            f"custom scalar {name!r} is {type(v).__name__} (dtype {a.dtype}, size {a.size}); log one real number"
        )
    return float(a.reshape(()))


def check_step(step: Any) -> None:
    """Refuse a step that is not a Python or numpy int in [0, 2**63), naming the argument (``record()`` and
    ``log()`` share it); a tensor is refused rather than read (reading it would sync the GPU)."""
    if is_torch(step):
        raise TypeError("step must be a Python int, not a tensor (reading a tensor would sync the GPU)")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int (the trainer's global step), got {type(step).__name__}")
    if not 0 <= step < 2**63:
        raise ValueError(f"step must be in [0, 2**63) (it is stored as int64), got {step}")


@dataclass
class ScalarLog:
    """The custom scalars a recorder holds until its writer publishes them (thread-safe).

    :meth:`add` runs on the training thread (checks and appends); :meth:`publish` on the writer thread.
    """

    rank: int
    published: list[str] = field(default_factory=list)
    """Names of the files published so far."""
    live_path: Path | None = None
    """The live tail last written (:meth:`write_live`), removed once its values are published."""
    _rows: list[tuple[int, int, str, Any]] = field(default_factory=list)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
        """Append one call's values (all checked first: a bad step, name or value records none of them); returns
        those already read as floats (device tensors are read on the writer thread)."""
        check_step(step)
        if not isinstance(values, Mapping):
            raise TypeError(f"log() takes a mapping of names to numbers, got {type(values).__name__}")
        rows = [(check_name(k), _value_of(k, v)) for k, v in values.items()]
        with self._lock:
            for name, value in rows:
                self._rows.append((int(step), self._seq, name, value))
                self._seq += 1
        return {name: value for name, value in rows if isinstance(value, float)}

    @property
    def pending(self) -> int:
        """Values logged and not yet published."""
        return len(self._rows)

    def _table(self, rows: list[tuple[int, int, str, Any]], metadata: Mapping[bytes, bytes]) -> pa.Table:
        values = [float(v) if not isinstance(v, float) else v for _, _, _, v in rows]  # device tensors: read now
        return pa.table(
            {
                "step": pa.array([r[0] for r in rows], pa.int64()),
                "rank": pa.array(np.full(len(rows), self.rank, dtype=np.int32)),
                "seq": pa.array([r[1] for r in rows], pa.int64()),
                "name": pa.array([r[2] for r in rows], pa.string()),
                "value": pa.array(values, pa.float64()),
            },
            schema=SCALAR_SCHEMA,
        ).replace_schema_metadata(dict(metadata))

    def publish(self, run_dir: storage.Location, wid: str, metadata: Mapping[bytes, bytes]) -> str | None:
        """Write the pending values as ``scalars/<wid>-<n>.parquet`` (whole); the file name, or None when there
        was nothing to write. On failure the values stay pending and the error propagates."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return None
        table = self._table(rows, metadata)
        name = runformat.segment_name(wid, len(self.published))
        folder = storage.location(run_dir) / SCALARS_DIR
        if not storage.is_remote(folder):
            folder.mkdir(exist_ok=True)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        runformat.atomic_write_bytes(folder / name, buf.getvalue().to_pybytes())
        with self._lock:
            del self._rows[: len(rows)]  # values logged while writing stay pending
        self.published.append(name)
        if self.live_path is not None:  # its values are in the published file now
            try:
                self.live_path.unlink(missing_ok=True)
            except OSError:
                pass
        return name

    def write_live(self, path: Path, metadata: Mapping[bytes, bytes]) -> None:
        """Rewrite the live tail ``path`` (``live/<writer>.scalars``, local runs) with the pending values, so
        readers see them within the writer's live interval; a hint like the statistics' tail (no fsync, errors
        ignored: the published files are the record)."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return
        tmp = path.with_name(f".{path.name}{runformat.TMP_SUFFIX}")
        try:
            path.parent.mkdir(exist_ok=True)
            pq.write_table(self._table(rows, metadata), tmp, compression="zstd")
            os.replace(tmp, path)
            self.live_path = path
        except Exception:  # noqa: BLE001 - a full disk...: the published files are what counts
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def _empty() -> pa.Table:
    return SCALAR_SCHEMA.empty_table()


@dataclass
class ScalarFiles:
    """The custom scalars of a run folder, read from ``scalars/`` (published files are read once, cached).

    ``refresh()`` lists the folder (one request on object storage) and reads new files; a damaged file is
    skipped and named in :attr:`problems`.
    """

    path: storage.Location
    tables: dict[str, pa.Table] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)
    live: dict[str, pa.Table] = field(default_factory=dict)
    """The writers' live tails (local runs), keyed like published files; read again at every refresh."""
    _version: int = 0
    _cache: dict[str, Any] = field(default_factory=dict)
    """What :meth:`rows` and :meth:`names` computed for the files of :attr:`_version` (a dashboard asks often)."""

    def refresh(self) -> list[str]:
        """Read the files published since the last call, and the live tails again; returns the new names."""
        live = _read_live(self.path)
        if live or self.live:
            self._version += 1
        self.live = live
        new = []
        for e in storage.list_files(storage.location(self.path) / SCALARS_DIR):
            if not runformat.is_published(e.name) or e.name in self.tables or e.name in self.bad:
                continue
            try:
                src = storage.parquet_source(e.path)
                table = pq.read_table(src) if isinstance(src, str) else _read_closing(src)
                table = table.select(SCALAR_SCHEMA.names).cast(SCALAR_SCHEMA)
                if runformat.parse_segment_name(e.name) is None:
                    raise ValueError("its name is not <writer>-<n>.parquet")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
                self.bad.add(e.name)
                self.problems.append(f"{e.path}: skipped custom scalars file ({type(exc).__name__}: {exc})"[:300])
                continue
            self.tables[e.name] = table
            new.append(e.name)
        if new:
            self._version += 1
        return new

    def rows(self, cutoff: Mapping[str, int] | None = None) -> pa.Table:
        """One row per (step, rank, name) that counts: restarts applied (``cutoff``: writer -> first superseded
        step, :attr:`rldiag.runformat.Resume.cutoff`), a later call of a name at a step over an earlier one."""
        key = (self._version, tuple(sorted((cutoff or {}).items())))
        cached = self._cache.get("rows")
        if cached is not None and cached[0] == key:
            return cached[1]
        out = self._rows(cutoff)
        self._cache["rows"] = (key, out)
        return out

    def _rows(self, cutoff: Mapping[str, int] | None) -> pa.Table:
        parts = []
        for fname, t in [*self.tables.items(), *self.live.items()]:  # a tail repeats published rows: same seq
            parsed = runformat.parse_segment_name(fname)
            assert parsed is not None  # checked when read
            wid, _, start_ns = parsed
            cut = (cutoff or {}).get(wid)
            if cut is not None:
                t = t.filter(pc.less(t.column("step"), pa.scalar(cut, pa.int64())))
            parts.append(
                t.select(["step", "rank", "seq", "name", "value"]).append_column(
                    "start", pa.array(np.full(t.num_rows, start_ns, dtype=np.uint64))
                )
            )
        if not parts:
            return _empty()
        import polars as pl

        df = pl.from_arrow(pa.concat_tables(parts))
        assert isinstance(df, pl.DataFrame)
        last = df.sort(["start", "seq"]).group_by(["step", "rank", "name"], maintain_order=True).last()
        return last.select(["step", "rank", "seq", "name", "value"]).sort(["step", "rank", "name"]).to_arrow()

    def names(self) -> list[str]:
        """Every name logged in the run, sorted."""
        cached = self._cache.get("names")
        if cached is not None and cached[0] == self._version:
            return list(cached[1])
        names: set[str] = set()
        for t in [*self.tables.values(), *self.live.values()]:
            names.update(pc.unique(t.column("name")).to_pylist())
        self._cache["names"] = (self._version, sorted(names))
        return sorted(names)

    def frame(
        self,
        cutoff: Mapping[str, int] | None = None,
        *,
        names: Sequence[str] | None = None,
        steps: Sequence[int] | slice | None = None,
        ranks: Sequence[int] | None = None,
        reduce: Literal["mean", "sum", "min", "max"] = "mean",
        by_rank: bool = False,
    ) -> pl.DataFrame:
        """``step`` (and ``rank`` with ``by_rank``) plus one Float64 column per name, NaN where a step has no
        value of that name; steps where nothing was logged have no row."""
        import polars as pl

        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
        df = pl.from_arrow(self.rows(cutoff))
        assert isinstance(df, pl.DataFrame)
        wanted = self.names() if names is None else list(names)
        if ranks is not None:
            df = df.filter(pl.col("rank").is_in([int(r) for r in ranks]))
        if isinstance(steps, slice):
            lo = steps.start if steps.start is not None else -(2**62)
            hi = steps.stop if steps.stop is not None else 2**62
            df = df.filter((pl.col("step") >= lo) & (pl.col("step") < hi))
        elif steps is not None:
            df = df.filter(pl.col("step").is_in([int(s) for s in steps]))
        df = df.filter(pl.col("name").is_in(wanted))
        keys = ["step", "rank"] if by_rank else ["step"]
        agg = {
            "mean": pl.col("value").mean(),
            "sum": pl.col("value").sum(),
            "min": pl.col("value").min(),
            "max": pl.col("value").max(),
        }[reduce]
        out = pl.DataFrame(schema={k: (pl.Int64 if k == "step" else pl.Int32) for k in keys})
        if df.height:
            long = df.group_by([*keys, "name"]).agg(agg.alias("value"))
            out = long.pivot(on="name", index=keys, values="value").sort(keys)
        for n in wanted:
            if n not in out.columns:
                out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias(n))
        return out.select([*keys, *wanted]).with_columns(
            [pl.col(n).cast(pl.Float64).fill_null(math.nan) for n in wanted]
        )


def _read_live(run_dir: storage.Location) -> dict[str, pa.Table]:
    """The live tails of a local run, under the name of a segment of their writer (for the restart rule)."""
    out: dict[str, pa.Table] = {}
    if storage.is_remote(run_dir):
        return out
    for e in storage.list_files(Path(str(run_dir)) / runformat.LIVE_DIR):
        if not e.name.endswith(LIVE_SUFFIX) or e.name.startswith(".") or e.size > runformat.LIVE_MAX_BYTES:
            continue
        key = runformat.segment_name(e.name[: -len(LIVE_SUFFIX)], 0)
        if runformat.parse_segment_name(key) is None:
            continue
        try:
            out[key] = pq.read_table(str(e.path)).select(SCALAR_SCHEMA.names).cast(SCALAR_SCHEMA)
        except Exception:  # noqa: BLE001 - gone (published meanwhile) or damaged: the published files are the record
            continue
    return out


def _read_closing(src: Any) -> pa.Table:
    with src:
        return pq.read_table(src)
