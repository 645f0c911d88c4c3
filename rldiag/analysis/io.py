"""Open a run directory and read it: while it is being written, tolerating damaged files.

``open_run`` reads the manifest (refusing a newer run format), lists the published Parquet segments, skips a
corrupt or truncated file with a warning that names it, and merges statistics exactly across micro-batches,
ranks and files. ``Run.refresh()`` picks up segments published since, reading only those.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from rldiag import runformat, schema, storage
from rldiag.analysis import inventory, recompute
from rldiag.analysis.recompute import bucket_stats, bucket_table, scan_tokens
from rldiag.analysis.scan import INDEX_DIR, INDEX_MIN_FILES, Problem, RunFiles
from rldiag.config import RecorderConfig
from rldiag.metrics import aggregate
from rldiag.metrics.registry import BUCKET_KINDS, REGISTRY, needed_stats
from rldiag.record.scalars import ScalarFiles
from rldiag.runformat import read_manifest
from rldiag.stats.kernel import STATS, affected_stats

__all__ = ["INDEX_DIR", "INDEX_MIN_FILES", "Problem", "Run", "RunFormatWarning", "open_run"]

RunFormatWarning = runformat.RunFormatWarning  # its home is rldiag.runformat; this name stays


@dataclass
class Run:
    """A run directory, read lazily. Create with :func:`open_run`.

    Step metrics come from a per-step *compacted* statistics table: published files are immutable and merging
    is associative, so the statistics of files already seen are kept merged per step (and saved as the run
    index, ``.rldiag-index/steps.arrow``), and new files merge into them. Per-record rows (``stats_table``,
    rank filters) are read from the files when asked for.

    The jobs are split: :class:`rldiag.analysis.scan.RunFiles` (:attr:`files`) lists, validates and indexes the
    files and applies the restart rule; this class answers questions about the run from them (raw access,
    metrics, and the token-row analyses of :mod:`rldiag.analysis.recompute`, :mod:`~rldiag.analysis.lens` and
    :mod:`~rldiag.analysis.cliff`); :mod:`rldiag.analysis.inventory` describes it (``info()``).
    """

    path: storage.Location
    """The run folder: a local path or a :class:`rldiag.storage.RemotePath` (``str()`` gives its URI)."""
    manifest: dict[str, Any]
    config: RecorderConfig
    files: RunFiles = field(init=False)
    """The run's published files and what was read from them."""
    _alerts_cache: tuple[Any, list[dict[str, Any]], list[dict[str, Any]]] | None = field(default=None, init=False)
    custom: ScalarFiles = field(init=False)
    """The run's custom scalars (``Recorder.log``, ``scalars/``): :meth:`custom_metrics` reads them."""

    def __post_init__(self) -> None:
        self.files = RunFiles(self.path, self.config)
        self.custom = ScalarFiles(self.path)

    @property
    def problems(self) -> list[Problem]:
        """What is wrong with the run but did not stop reading it (skipped files, restart conflicts)."""
        return self.files.problems

    @property
    def resume(self) -> runformat.Resume:
        """How restarted writers combine: the records that later attempts superseded, gaps, problems."""
        return self.files.resume

    def refresh(self) -> list[str]:
        """Read segments published since the last scan; returns their names (statistics files).

        Costs one listing of ``stats/``, ``tokens/`` and ``writers/`` (three requests on object storage), plus
        reading the new segments and the writer files that changed; custom scalar files are listed too.
        """
        new = self.files.refresh()
        self.custom.refresh()
        return new

    # ---- raw access -------------------------------------------------------------------------------
    def stats_table(self) -> pa.Table:
        """All statistics rows, one per record (step, rank, micro), read from the files (cached); records that
        a restarted writer superseded (:attr:`resume`) are left out."""
        return self.files.stats_table()

    def compact_table(self) -> pa.Table:
        """Statistics merged per step (all ranks and records): one row per step."""
        return self.files.compact_table()

    def last_step_per_rank(self) -> dict[int, int]:
        """rank -> its newest step, in a published segment or in its writer's live tail (a rank writes its steps
        in order, so every record of an older step is in one or the other): :func:`rldiag.runformat.complete_steps`."""
        return self.files.last_step_per_rank()

    def step_stats(self) -> pl.DataFrame:
        """Sufficient statistics per (step, rank, micro), as stored (histograms as sparse lists)."""
        frame = pl.from_arrow(self.stats_table())
        assert isinstance(frame, pl.DataFrame)  # a Table gives a DataFrame
        return frame.sort(["step", "rank", "micro"])

    def token_files(self) -> list[storage.Location]:
        """Published token files, sorted by name (with superseded rows: see :meth:`token_limits`)."""
        return self.files.token_files()

    def token_limits(self) -> dict[storage.Location, int]:
        """Token files some of whose rows a restarted writer superseded -> the first superseded step (the file's
        rows at that step and later count nowhere)."""
        return self.files.token_limits()

    def token_step_ranges(self) -> dict[storage.Location, tuple[int, int]]:
        """Token file -> its smallest and largest step (files without a known range are left out)."""
        return self.files.token_step_ranges()

    def tokens(self) -> pl.LazyFrame:
        """Token rows of the published segments (columns of :mod:`rldiag.schema`), lazily; rows that a restarted
        writer superseded are left out."""
        files = self.token_files()
        if not files:
            return pl.LazyFrame(schema={k: pl.Series(pa.array([], v)).dtype for k, v in schema.TOKEN_DTYPES.items()})
        return scan_tokens(files, self.token_limits())

    def steps(self) -> list[int]:
        """Steps with statistics, ascending."""
        t = self.compact_table()
        return t.column("step").to_numpy().tolist() if t.num_rows else []

    @property
    def ranks(self) -> list[int]:
        """Ranks that wrote statistics (from the writers' file names, ``r<rank>-...``)."""
        return self.files.ranks

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    # ---- run state (the rules of rldiag.runformat) ---------------------------------------------------
    def is_closed(self, *, count_gone: bool = False) -> bool:
        """Whether every rank's latest writer closed the run (the rule of :func:`rldiag.runformat.run_closed`;
        one listing of ``writers/``, and only the writer files that changed are read again)."""
        latest = runformat.latest_writers(self.files.read_writers()[0])
        return bool(latest) and all(w.closed is not None or (count_gone and w.process_gone()) for w in latest.values())

    def newest_data_time(self) -> float | None:
        """When data last landed: modification time of the newest statistics segment (None before any)."""
        return runformat.newest_data_time(self.path)

    def alerts(self, *, replaced: bool = False) -> list[dict[str, Any]]:
        """The events of the run's ``alerts.jsonl``, oldest first (``[]`` when there is none), without those a
        restart replaced (:meth:`rldiag.runformat.Resume.superseded_alert`: computed from records a later attempt
        replaced) unless ``replaced``; the file is parsed again only when it or the restarts changed (the same
        list is returned until then)."""
        key = runformat.alerts_signature(self.path)  # alerts.jsonl and, on object storage, alerts/*.jsonl
        if not key:
            return []
        resume = self.resume
        restarts = resume.restart_keys()
        if self._alerts_cache is None or self._alerts_cache[0] != (key, restarts):
            events = runformat.read_alerts(self.path / runformat.ALERTS_FILE)
            kept = [e for e in events if not resume.superseded_alert(e)]
            self._alerts_cache = ((key, restarts), kept, events)
        return self._alerts_cache[2] if replaced else self._alerts_cache[1]

    def file_steps(self, names: Sequence[str]) -> set[int]:
        """The steps that the named statistics files (as :meth:`refresh` returns them) hold."""
        return self.files.file_steps(names)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer saved in the run (``tokenizer/``), or None."""
        if isinstance(self.path, storage.RemotePath):
            return None  # a tokenizer is loaded from a local folder: pass --tokenizer
        own = self.path / runformat.TOKENIZER_DIR
        return own if own.is_dir() else None

    @property
    def token_rows_sampled(self) -> bool:
        """True when token rows cover only part of the tokens (sampling, dropped rows, or none written)."""
        t = self.compact_table()
        if t.num_rows == 0:
            return False
        written = float(pc.sum(t.column("rows_written")).as_py() or 0)
        masked = float(pc.sum(t.column("n_masked")).as_py() or 0)
        return written < masked

    # ---- metrics ----------------------------------------------------------------------------------
    def _filtered(
        self, ranks: Sequence[int] | None, steps: Sequence[int] | slice | None, *, compact: bool = False
    ) -> pa.Table:
        t = self.compact_table() if compact else self.stats_table()
        mask = None
        if ranks is not None:
            mask = pc.is_in(t.column("rank"), pa.array(list(ranks), pa.int32()))
        if steps is not None:
            if isinstance(steps, slice):
                col = t.column("step")
                m = pc.and_(
                    pc.greater_equal(col, steps.start if steps.start is not None else -(2**62)),
                    pc.less(col, steps.stop if steps.stop is not None else 2**62),
                )
            else:
                m = pc.is_in(t.column("step"), pa.array(list(steps), pa.int64()))
            mask = m if mask is None else pc.and_(mask, m)
        return t if mask is None else t.filter(mask)

    def step_metrics(
        self,
        ranks: Sequence[int] | None = None,
        steps: Sequence[int] | slice | None = None,
        *,
        config: RecorderConfig | None = None,
        metrics: Sequence[str] | None = None,
        by_rank: bool = False,
        from_tokens: bool = False,
        engine: str = "local",
        ray_address: str | None = None,
    ) -> pl.DataFrame:
        """One row per step: ``step`` plus one Float64 column per metric name (NaN where inputs are missing).

        Args:
            ranks: only these ranks (default: all, merged exactly).
            steps: only these steps (a list, or a ``slice(start, stop)``).
            config: recompute with other clip settings. Statistics that do not depend on them come from the
                stored statistics (exact over all tokens); the others are recomputed from the token rows,
                which covers only the sampled tokens when token rows were sampled (a warning says so).
            metrics: only these metric names (default: the whole registry).
            by_rank: one row per (step, rank) instead of per step.
            from_tokens: recompute every statistic from the token rows (with ``config`` or the run's own),
                not only those that depend on the clip settings; with sampled token rows they then all cover
                the sampled tokens only.
            engine: where a recompute from token rows runs: ``"local"`` (threads of this process) or ``"ray"``
                (one Ray task per Parquet row group, reading where it runs and returning statistics that are
                merged here; the same numbers). Without a recompute the stored statistics are used either way.
            ray_address: the Ray cluster to join (default: the one this process is connected to, else
                ``RAY_ADDRESS``, else a local Ray).
        """
        _check_engine(engine)
        custom = self.custom.names() if metrics is None else [m for m in metrics if m in self.custom.names()]
        if custom:  # custom scalars (Recorder.log) joined under their names; see custom_metrics()
            frame = self.step_metrics(
                ranks,
                steps,
                config=config,
                metrics=[m for m in metrics or REGISTRY if m not in custom],
                by_rank=by_rank,
                from_tokens=from_tokens,
                engine=engine,
                ray_address=ray_address,
            )
            extra = self.custom_metrics(custom, steps=steps, ranks=ranks, by_rank=by_rank)
            keys = ["step", "rank"] if by_rank else ["step"]
            extra = extra.with_columns([pl.col(k).cast(frame.schema[k]) for k in keys])
            return frame.join(extra, on=keys, how="left").with_columns(
                [pl.col(c).fill_null(float("nan")) for c in custom]
            )
        names = list(REGISTRY) if metrics is None else list(metrics)
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; `rldiag summarize --list` shows the names")
        by = ("step", "rank") if by_rank else ("step",)
        table = self._filtered(ranks, steps, compact=ranks is None and not by_rank)
        if not from_tokens and (config is None or config.stats_key() == self.config.stats_key()):
            merged = aggregate.merge(table, by=by, stats=needed_stats(names), sparse_hists=True)
            return aggregate.finalize(merged, names)
        config = config or self.config
        # a setting that decides which tokens count (logp_tolerance) changes every statistic, not only the
        # clip-dependent ones
        every = from_tokens or affected_stats(self.config.stat_fields_changed(config)) == STATS.keys()
        return self._recomputed(
            table, config, names, by, ranks, steps, everything=every, engine=engine, ray_address=ray_address
        )

    def custom_metrics(
        self,
        names: Sequence[str] | None = None,
        *,
        steps: Sequence[int] | slice | None = None,
        ranks: Sequence[int] | None = None,
        reduce: Literal["mean", "sum", "min", "max"] = "mean",
        by_rank: bool = False,
    ) -> pl.DataFrame:
        """The custom scalars logged with ``Recorder.log``: ``step`` plus one Float64 column per name (NaN where
        a step has no value of it), one row per step where any was logged (:mod:`rldiag.record.scalars`).

        A restarted writer's values supersede the earlier attempt's as for statistics; the later of two calls
        at a step wins; ranks are combined by ``reduce`` (``"mean"``, ``"sum"``, ``"min"``, ``"max"``), or one
        row per (step, rank) with ``by_rank``. ``self.custom.names()`` lists the names.

        >>> open_run("runs/exp1").custom_metrics(["loss"])   # doctest: +SKIP
        """
        unknown = [n for n in names or () if n not in self.custom.names()]
        if unknown:
            raise ValueError(f"no custom scalar {unknown[0]!r} in {self.path} (logged: {self.custom.names()[:10]})")
        return self.custom.frame(
            self.files.resume.cutoff,
            names=names,
            steps=steps,
            ranks=ranks,
            reduce=reduce,
            by_rank=by_rank,
        )

    def _recomputed(
        self,
        stored: pa.Table,
        config: RecorderConfig,
        names: list[str],
        by: tuple[str, ...],
        ranks: Sequence[int] | None,
        steps: Sequence[int] | slice | None,
        *,
        everything: bool = False,
        engine: str = "local",
        ray_address: str | None = None,
    ) -> pl.DataFrame:
        if self.token_rows_sampled:
            warnings.warn(
                f"token rows of {self.path} cover only part of the tokens (sampled or dropped): "
                + (
                    "every statistic is recomputed from those rows only"
                    if everything
                    else "metrics that depend on the clip settings are recomputed from those rows only; the others "
                    "stay exact"
                ),
                RunFormatWarning,
                stacklevel=3,
            )
        executor = None
        if engine == "ray":
            from rldiag.analysis import ray_engine

            executor = ray_engine.RowGroupExecutor(ray_address)
        return recompute.step_metrics_from_tokens(
            stored,
            self.token_files(),
            config,
            names,
            by,
            limits=self.token_limits(),
            ranks=ranks,
            steps=None if steps is None else set(self._chosen_steps(steps)),
            everything=everything,
            executor=executor,
        )

    def _chosen_steps(self, steps: Sequence[int] | slice | None) -> list[int]:
        """The run's steps that ``steps`` (a list, a ``slice(start, stop)`` or None for all) selects, ascending
        (the one place a step selection is resolved)."""
        all_steps = self.steps()
        if steps is None:
            return all_steps
        if isinstance(steps, slice):
            lo = steps.start if steps.start is not None else -(2**62)
            hi = steps.stop if steps.stop is not None else 2**62
            return [s for s in all_steps if lo <= s < hi]
        return sorted({int(s) for s in steps})

    def bucket_metrics(
        self,
        by: str = "pos",
        buckets: int = 10,
        *,
        width: int | None = None,
        steps: Sequence[int] | None = None,
        engine: str = "local",
        ray_address: str | None = None,
    ) -> pl.DataFrame:
        """The position/stage table of docs/metrics.md, from token rows.

        One row per (step, bucket) with ``n``, ``ratio/mean``, ``ratio/std``, ``clip/region``,
        ``entropy/mean``, ``mismatch/k3``. ``by="pos"``: deciles (``buckets``) of the step's longest response,
        or fixed ``width`` positions per bucket; ``by="stage"`` or ``"turn"``: the column's values;
        ``by="route"``: buckets of ``route_agree`` ([0, 0.5), [0.5, 0.75), [0.75, 0.9), [0.9, 1), 1).
        ``by="prob"``: buckets of the sampler probability exp(rollout_logp) (<= 1e-6, then up to 1e-4, 1e-3,
        1e-2, 0.1, 0.5, 0.9, 1) with ``n``, ``mismatch/k1``, ``mismatch/k3``, ``mismatch/absd_mean`` (mean |d|)
        and ``mismatch/extreme_frac``. ``prob`` and ``route`` tables also give each bucket's ``bucket_lo`` and
        ``bucket_hi``, and are empty when the run lacks the column.
        ``engine="ray"``: Ray tasks over groups of whole steps compute the statistics where they run
        (:mod:`rldiag.analysis.ray_engine`); the result is the same.
        """
        if by not in BUCKET_KINDS:
            raise ValueError(f"by must be one of {', '.join(map(repr, BUCKET_KINDS))}, got {by!r}")
        _check_engine(engine)
        if engine == "ray":
            from rldiag.analysis import ray_engine

            chosen = self._chosen_steps(steps)
            stats = ray_engine.bucket_stats(
                self.token_files(),
                self.token_limits(),
                self.config,
                chosen,
                by=by,
                buckets=buckets,
                width=width,
                address=ray_address,
                ranges=self.token_step_ranges(),
            )
        else:
            lf = self.tokens()
            if steps is not None:
                lf = lf.filter(pl.col("step").is_in(list(steps)))
            rows = recompute.stored_step_rows(self.compact_table(), steps)  # sizes the pieces: no pass over steps
            files, limits = self.token_files(), self.token_limits()  # each row group read once (recompute)
            stats = bucket_stats(
                lf, self.config, by, buckets, width, step_rows=rows, files=files, limits=limits, steps=steps
            )
        return bucket_table(stats, by)

    # ---- advanced analytics (rldiag.analysis.lens / cliff / law) ------------------------------------
    def lens(
        self,
        objectives: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        params: Any = None,
        *,
        engine: str = "local",
        ray_address: str | None = None,
    ) -> pl.DataFrame:
        """How each clipping objective of the literature would have treated this run's tokens, per step
        (``engine="ray"``: Ray tasks over groups of whole steps, :mod:`rldiag.analysis.ray_engine`)."""
        _check_engine(engine)
        if engine == "ray":
            from rldiag.analysis import ray_engine

            chosen = self._chosen_steps(steps)
            return ray_engine.lens(
                self.token_files(),
                self.token_limits(),
                self.config,
                chosen,
                objectives,
                params,
                address=ray_address,
                ranges=self.token_step_ranges(),
            )
        from rldiag.analysis.lens import lens

        return lens(self, objectives, steps, params)

    def cliff(
        self,
        lam: float | None = None,
        threshold: float = 0.9,
        *,
        engine: str = "local",
        ray_address: str | None = None,
        **kw: Any,
    ) -> Any:
        """Extrapolation-cliff report per step (needs ``teacher_logp`` and ``base_logp``); ``engine="ray"``: Ray
        tasks over groups of whole steps (each step is computed whole in one task, so the rows are the same)."""
        _check_engine(engine)
        if engine == "ray":
            from rldiag.analysis import ray_engine

            steps = kw.pop("steps", None)
            chosen = self._chosen_steps(steps)
            return ray_engine.cliff(
                self.token_files(),
                self.token_limits(),
                self.config,
                chosen,
                lam,
                threshold,
                address=ray_address,
                ranges=self.token_step_ranges(),
                **kw,
            )
        from rldiag.analysis.cliff import cliff_report

        return cliff_report(self, lam, threshold, **kw)

    def law(self, metric: str = "reward/mean", **kw: Any) -> Any:
        """Fit of the entropy-performance law R = -a exp(H) + b over this run."""
        from rldiag.analysis.law import fit_law

        return fit_law(self, metric=metric, **kw)

    # ---- summary ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What ``rldiag info`` prints: manifest, steps, ranks, tokens, dropped rows, files, problems
        (:func:`rldiag.analysis.inventory.describe`)."""
        return inventory.describe(self)


def _check_engine(engine: str) -> None:
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")


def open_run(
    path: str | os.PathLike[str] | storage.RemotePath, *, storage_options: dict[str, Any] | None = None
) -> Run:
    """Open a run written by :class:`rldiag.Recorder` (also while it is being written): a local folder or a
    URI (``s3://bucket/runs/exp1``, ``gs://...``; see :mod:`rldiag.storage`).

    >>> run = open_run("runs/exp1")            # doctest: +SKIP
    >>> run.step_metrics()["entropy/mean"]     # doctest: +SKIP
    """
    p = storage.location(path, storage_options)
    if not p.exists():
        raise FileNotFoundError(f"no run at {p}: the directory does not exist")
    if not p.is_dir():
        raise ValueError(f"{p} is a file; a run is a directory (pass the folder the recorder wrote)")
    manifest = read_manifest(p)
    run = Run(path=p, manifest=manifest, config=RecorderConfig.from_dict(manifest.get("config", {})))
    run.refresh()
    return run
