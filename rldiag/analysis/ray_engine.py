"""Token-row analysis on a Ray cluster (``engine="ray"``): the same numbers as the local engine, on many nodes.

Three analyses read token rows; each becomes Ray tasks that read their part of the run *where they run*
(a local path on a shared filesystem, or an object on S3/GCS through :mod:`rldiag.storage`) and send back
small results that the driver merges exactly:

* recompute (``Run.step_metrics(config=..., from_tokens=True)``): one task per Parquet row group, running
  the same row-group job as the local threads (:func:`rldiag.analysis.recompute.iter_file_stats` with a
  :class:`RowGroupExecutor`); tasks return per-record sufficient statistics plus the few rows of the records
  that a row-group boundary cuts, which the driver joins in file order. Bit-identical to the local engine.
* the bucket table (``Run.bucket_metrics``): one task per group of whole steps, returning statistics rows
  per (step, bucket, rank, micro); the driver merges them by (step, bucket). Bit-identical.
* the objective lens (``Run.lens``): one task per group of whole steps, returning the finished per-step rows
  (a step never spans tasks, so nothing is merged across tasks).

Ray is optional: ``pip install 'rldiag[ray]'``. ``address`` joins a running cluster (``"ray://host:10001"``
or ``"auto"``); without one, the Ray this process is already connected to is used, else ``RAY_ADDRESS``,
else a local Ray is started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from rldiag.config import RecorderConfig

__all__ = ["require_ray", "connect", "RowGroupExecutor", "TokenSource", "bucket_stats", "lens", "step_chunks"]

_MISSING = (
    "engine='ray' needs Ray, which is not installed: pip install 'rldiag[ray]' (or use the default engine='local')"
)


def require_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(_MISSING) from None
    return ray


def connect(address: str | None = None) -> Any:
    """Join the Ray cluster at ``address`` (see the module docstring) and return the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class _RayFuture:
    __slots__ = ("ray", "ref")

    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray, self.ref = ray, ref

    def result(self) -> Any:
        return self.ray.get(self.ref)


class RowGroupExecutor:
    """Runs :func:`rldiag.analysis.recompute.iter_file_stats`'s row-group jobs as Ray tasks (one CPU each).

    ``parallelism`` (row groups in flight) is twice the cluster's CPUs, so every worker has the next row group
    queued while the driver joins the previous results.
    """

    def __init__(self, address: str | None = None) -> None:
        self.ray = connect(address)
        self.parallelism = 2 * _cluster_cpus(self.ray)
        self._remote: dict[Any, Any] = {}

    def submit(self, fn: Any, *args: Any) -> _RayFuture:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(num_cpus=1)(fn)
        return _RayFuture(self.ray, remote.remote(*args))

    def __enter__(self) -> RowGroupExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


@dataclass(frozen=True)
class TokenSource:
    """What a task needs to scan a run's token rows where it runs: the files, the restart limits and the
    run's config (it has :meth:`tokens` and :attr:`config`, so :func:`rldiag.analysis.lens.lens` reads it
    like a :class:`~rldiag.analysis.io.Run`)."""

    files: tuple[Any, ...]
    limits: Mapping[Any, int]
    config: RecorderConfig

    def tokens(self) -> pl.LazyFrame:
        from rldiag.analysis.recompute import scan_tokens

        return scan_tokens(list(self.files), dict(self.limits))


def step_chunks(steps: Sequence[int], parts: int) -> list[list[int]]:
    """``steps`` cut into at most ``parts`` runs of consecutive steps of (nearly) equal length."""
    steps = list(steps)
    if not steps:
        return []
    size = max(1, math.ceil(len(steps) / max(1, parts)))
    return [steps[i : i + size] for i in range(0, len(steps), size)]


def _bucket_task(source: TokenSource, steps: list[int], by: str, buckets: int, width: int | None) -> pa.Table:
    from rldiag.analysis.recompute import bucket_stats as local_bucket_stats

    lf = source.tokens().filter(pl.col("step").is_in(steps))
    return local_bucket_stats(lf, source.config, by, buckets, width, threads=1)  # a task holds one CPU


def _lens_task(source: TokenSource, steps: list[int], objectives: Sequence[str] | None, params: Any) -> pl.DataFrame:
    from rldiag.analysis.lens import lens as local_lens

    return local_lens(source, objectives, steps, params, threads=1)  # a task holds one CPU


def _run_chunks(
    fn: Any,
    source: TokenSource,
    steps: Sequence[int],
    address: str | None,
    *args: Any,
    ranges: Mapping[Any, tuple[int, int]] | None = None,
    chunks_per_cpu: int = 2,
) -> list[Any]:
    """One task per group of whole steps; each scans only the files whose step range meets its steps."""
    ray = connect(address)
    remote = ray.remote(num_cpus=1)(fn)
    refs = []
    for chunk in step_chunks(steps, chunks_per_cpu * _cluster_cpus(ray)):
        lo, hi = chunk[0], chunk[-1]
        files = tuple(
            f for f in source.files if ranges is None or f not in ranges or not (ranges[f][1] < lo or ranges[f][0] > hi)
        )
        if files:
            part = TokenSource(files, {f: c for f, c in source.limits.items() if f in files}, source.config)
            refs.append(remote.remote(part, chunk, *args))
    return ray.get(refs)


def bucket_stats(
    files: Sequence[Any],
    limits: Mapping[Any, int],
    config: RecorderConfig,
    steps: Sequence[int],
    *,
    by: str,
    buckets: int,
    width: int | None,
    address: str | None = None,
    ranges: Mapping[Any, tuple[int, int]] | None = None,
) -> pa.Table:
    """The statistics rows of :func:`rldiag.analysis.recompute.bucket_stats`, computed by Ray tasks over groups
    of whole steps (in step order, so merging them equals the local engine's merge). ``ranges``: each file's
    smallest and largest step, when known, so a task opens only the files that hold its steps."""
    from rldiag.stats.table import STATS_SCHEMA

    if not files or not steps:
        return STATS_SCHEMA.empty_table()
    parts = _run_chunks(
        _bucket_task, TokenSource(tuple(files), dict(limits), config), steps, address, by, buckets, width, ranges=ranges
    )
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts, promote_options="default") if parts else STATS_SCHEMA.empty_table()


def lens(
    files: Sequence[Any],
    limits: Mapping[Any, int],
    config: RecorderConfig,
    steps: Sequence[int],
    objectives: Sequence[str] | None = None,
    params: Any = None,
    *,
    address: str | None = None,
    ranges: Mapping[Any, tuple[int, int]] | None = None,
) -> pl.DataFrame:
    """:func:`rldiag.analysis.lens.lens` of a run's token rows, by Ray tasks over groups of whole steps (each
    opening only the files whose step range, when known, meets its steps)."""
    from rldiag.analysis.lens import lens as local_lens

    source = TokenSource(tuple(files), dict(limits), config)
    if not files or not steps:
        return local_lens(source, objectives, steps, params)
    parts = [p for p in _run_chunks(_lens_task, source, steps, address, objectives, params, ranges=ranges) if p.height]
    if not parts:
        return local_lens(source, objectives, [], params)
    return pl.concat(parts).sort("step")


def _cliff_task(source: TokenSource, steps: list[int], lam: float | None, threshold: float, kw: Any) -> pl.DataFrame:
    from rldiag.analysis.cliff import cliff_report

    return cliff_report(source, lam, threshold, steps=steps, **kw)


def cliff(
    files: Sequence[Any],
    limits: Mapping[Any, int],
    config: RecorderConfig,
    steps: Sequence[int],
    lam: float | None = None,
    threshold: float = 0.9,
    *,
    address: str | None = None,
    ranges: Mapping[Any, tuple[int, int]] | None = None,
    **kw: Any,
) -> pl.DataFrame:
    """:func:`rldiag.analysis.cliff.cliff_report` of a run's token rows by Ray tasks over groups of whole steps
    (every step is computed whole in one task, so the rows equal the local engine's)."""
    from rldiag.analysis.cliff import cliff_report

    source = TokenSource(tuple(files), dict(limits), config)
    if not files or not steps:
        return cliff_report(source, lam, threshold, steps=list(steps), **kw)
    parts = [p for p in _run_chunks(_cliff_task, source, steps, address, lam, threshold, kw, ranges=ranges) if p.height]
    if not parts:
        return cliff_report(source, lam, threshold, steps=[], **kw)
    return pl.concat(parts).sort("step")
