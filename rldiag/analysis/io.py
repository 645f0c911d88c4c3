"""Open a run directory and read it: while it is being written, tolerating damaged files.

``open_run`` reads the manifest (refusing a newer run format), lists the published Parquet segments, skips a
corrupt or truncated file with a warning that names it, and merges statistics exactly across micro-batches,
ranks and files. ``Run.refresh()`` picks up segments published since, reading only those.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import runformat, schema, storage
from rldiag.analysis import aggregate
from rldiag.analysis.recompute import BUCKET_METRICS, bucket_stats, scan_tokens
from rldiag.config import RecorderConfig
from rldiag.metrics.registry import REGISTRY, needed_stats
from rldiag.runformat import read_manifest
from rldiag.stats.kernel import STATS, affected_stats
from rldiag.stats.table import STATS_SCHEMA
from rldiag.stats.table import validate as validate_stats

RunFormatWarning = runformat.RunFormatWarning  # its home is rldiag.runformat; this name stays


@dataclass
class _FileInfo:
    path: storage.Location
    size: int
    mtime: float
    rows: int
    config: dict[str, Any] | None = None
    steps: tuple[int, int] | None = None
    """Smallest and largest step in the file (None when it holds no rows)."""

    @property
    def writer(self) -> tuple[str, int, int] | None:
        """(writer id, rank, start ns) parsed from the segment name (None for a name rldiag did not give)."""
        return runformat.parse_segment_name(self.path.name)


@dataclass
class Problem:
    """Something wrong with a run that did not stop reading it."""

    path: str
    message: str


INDEX_DIR = runformat.INDEX_DIR
"""Folder (in the run, or in ~/.cache/rldiag when the run is read-only) of the run index."""
INDEX_MIN_FILES = 16
"""The index is (re)written once this many statistics files are not in it yet."""
INDEX_VERSION = 2
"""Version of the index's own metadata (2: per-file step ranges and the restart cutoffs it was built with)."""
_NO_CUTOFF = 2**63 - 1


def _index_location(run_path: storage.Location) -> storage.Location:
    own = run_path / INDEX_DIR
    if isinstance(run_path, storage.RemotePath) or os.access(run_path, os.W_OK):
        return own / "steps.parquet"
    import hashlib

    digest = hashlib.sha1(str(run_path.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rldiag" / digest / "steps.parquet"


@dataclass
class Run:
    """A run directory, read lazily. Create with :func:`open_run`.

    Step metrics come from a per-step *compacted* statistics table: published files are immutable and merging
    is associative, so the statistics of files already seen are kept merged per step (and saved as the run
    index, ``.rldiag-index/steps.parquet``), and new files merge into them. Per-record rows (``stats_table``,
    rank filters) are read from the files when asked for.
    """

    path: storage.Location
    """The run folder: a local path or a :class:`rldiag.storage.RemotePath` (``str()`` gives its URI)."""
    manifest: dict[str, Any]
    config: RecorderConfig
    problems: list[Problem] = field(default_factory=list)
    _stats_files: dict[str, _FileInfo] = field(default_factory=dict)
    _stats_tables: dict[str, pa.Table] = field(default_factory=dict)
    _token_files: dict[str, _FileInfo] = field(default_factory=dict)
    _bad: set[str] = field(default_factory=set)
    _stats_cache: pa.Table | None = None
    _compact: pa.Table | None = None
    _live_view: pa.Table | None = None
    _indexed: set[str] = field(default_factory=set)
    _index_loaded: bool = False
    _alerts_cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
    resume: runformat.Resume = field(default_factory=runformat.Resume)
    """How restarted writers combine: the records that later attempts superseded, gaps, problems."""
    _applied: dict[str, int] = field(default_factory=dict)
    """The restart cutoffs the compacted table was built with (writer -> first superseded step)."""
    _writer_infos: list[runformat.WriterInfo] = field(default_factory=list)
    _writer_cache: dict[str, tuple[tuple[int, float], runformat.WriterInfo | None]] = field(default_factory=dict)

    # ---- scanning ---------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Read segments published since the last scan; returns their names (statistics files).

        Costs one listing of ``stats/``, ``tokens/`` and ``writers/`` (three requests on object storage), plus
        reading the new segments and the writer files that changed.
        """
        listed = {e.name: e for e in storage.list_files(self.path / schema.STATS_DIR) if runformat.is_published(e.name)}
        if not self._index_loaded:
            self._index_loaded = True
            self._load_index(listed)
        new: list[str] = []
        tables: list[pa.Table] = []
        todo = [e.path for name, e in listed.items() if name not in self._stats_files and name not in self._bad]
        # files are read on a few threads (pyarrow releases the GIL); checks and bookkeeping stay here, in order
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
                loaded = list(pool.map(_load_stats, todo))
        else:
            loaded = [_load_stats(p) for p in todo]
        for p, got in zip(todo, loaded):
            info = self._read_stats_file(p, loaded=got, entry=listed[p.name])
            if info is not None:
                self._stats_files[p.name] = info
                tables.append(self._stats_tables[p.name])
                new.append(p.name)
        tdir = self.path / schema.TOKENS_DIR
        for e in storage.list_files(tdir):
            p = e.path
            if not runformat.is_published(e.name) or p.name in self._token_files or ("tokens/" + p.name) in self._bad:
                continue
            try:
                meta = _parquet_metadata(p)
                _check_token_schema(meta.schema.to_arrow_schema())
                self._token_files[p.name] = _FileInfo(p, e.size, e.mtime, meta.num_rows)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
                self._skip("tokens/" + p.name, p, exc)
        changed = self._update_resume()
        if new or changed:
            self._stats_cache = None
        if new:
            self._fold([self._surviving(name, self._stats_tables[name]) for name in new])
        for lo, hi in changed:
            self._rebuild(lo, hi)
        if (new or changed) and (
            len(self._stats_files) - len(self._indexed) >= INDEX_MIN_FILES or (changed and self._indexed)
        ):
            self._save_index()
        self._live_view = self._with_live_tails()
        return new

    def _with_live_tails(self) -> pa.Table | None:
        """The compacted table plus the writers' live tails (statistics not in a segment yet; local runs), or
        None when there are none. Never folded into ``_compact`` or the index: segments replace them."""
        if storage.is_remote(self.path):
            return None

        tails = [self._surviving(name, t) for name, t in _read_live(Path(self.path), self._stats_files)]
        tails = [t for t in tails if t.num_rows]
        if not tails:
            return None
        fresh = pa.concat_tables(tails)
        base = self._compact if self._compact is not None else STATS_SCHEMA.empty_table()
        hit = pc.is_in(base.column("step"), pc.unique(fresh.column("step")))
        redo = aggregate.compact(pa.concat_tables([base.filter(hit), fresh]))
        return pa.concat_tables([base.filter(pc.invert(hit)), redo]).sort_by("step")

    # ---- restarts ---------------------------------------------------------------------------------
    def _update_resume(self) -> list[tuple[int, int]]:
        """Apply the restart rule (:func:`rldiag.runformat.resolve_attempts`) to the files seen so far; returns
        the step ranges ``[lo, hi)`` whose compacted statistics must be rebuilt because a cutoff changed."""
        infos, bad = self._read_writers()
        self._writer_infos = infos
        data: dict[str, dict[str, Any]] = {}
        for info in self._stats_files.values():
            parsed = info.writer
            if parsed is None or info.steps is None:
                continue
            d = data.setdefault(
                parsed[0],
                {"rank": parsed[1], "start": parsed[2], "lo": info.steps[0], "hi": info.steps[1], "t": info.mtime},
            )
            d["lo"], d["hi"], d["t"] = min(d["lo"], info.steps[0]), max(d["hi"], info.steps[1]), max(d["t"], info.mtime)
        known = set(data)
        self.resume = runformat.resolve_attempts(
            [runformat.AttemptData(w, d["rank"], d["start"], d["lo"], d["hi"], d["t"]) for w, d in data.items()],
            [i for i in infos if i.writer in known or i.first_step is not None],
        )
        for exc in bad:
            msg = f"unreadable writer file: {exc}"
            if not any(p.message == msg for p in self.problems):
                self.problems.append(Problem(str(exc.path), msg))
        for msg in self.resume.problems:
            if not any(p.message == msg for p in self.problems):
                self.problems.append(Problem(str(self.path / runformat.WRITERS_DIR), msg))
                warnings.warn(msg, RunFormatWarning, stacklevel=4)
        ranges = []
        for w in known | set(self._applied) | set(self.resume.cutoff):
            old, new = self._applied.get(w, _NO_CUTOFF), self.resume.cutoff.get(w, _NO_CUTOFF)
            if old != new and w in known:
                ranges.append((min(old, new), max(old, new)))
        self._applied = {w: c for w, c in self.resume.cutoff.items() if w in known}
        return ranges

    def _read_writers(self) -> tuple[list[runformat.WriterInfo], list[runformat.RunFormatError]]:
        """The writer files (one listing; a file is read again only when its size or time changed)."""
        infos: list[runformat.WriterInfo] = []
        bad: list[runformat.RunFormatError] = []
        seen = set()
        for e in storage.list_files(self.path / runformat.WRITERS_DIR):
            if not e.name.endswith(".json") or e.name.startswith("."):
                continue
            seen.add(e.name)
            key = (e.size, e.mtime)
            cached = self._writer_cache.get(e.name)
            if cached is None or cached[0] != key:
                try:
                    info: runformat.WriterInfo | None = runformat.read_writer_file(e.path)
                except FileNotFoundError:
                    continue
                except (runformat.RunFormatError, OSError) as exc:
                    bad.append(
                        runformat.RunFormatError(
                            str(exc) if isinstance(exc, runformat.RunFormatError) else f"{e.path}: {exc}", path=e.path
                        )
                    )
                    info = None
                self._writer_cache[e.name] = cached = (key, info)
            if cached[1] is not None:
                infos.append(cached[1])
        for name in set(self._writer_cache) - seen:
            del self._writer_cache[name]
        return infos, bad

    def _cutoff(self, name: str) -> int | None:
        info = self._stats_files.get(name) or self._token_files.get(name)
        w = runformat.parse_segment_name(name) if info is None else info.writer
        return None if w is None else self.resume.cutoff.get(w[0])

    def _surviving(self, name: str, table: pa.Table) -> pa.Table:
        """The rows of a statistics file that a later attempt of their rank did not supersede."""
        cut = self._cutoff(name)
        if cut is None:
            return table
        return table.filter(pc.less(table.column("step"), pa.scalar(cut, pa.int64())))

    def _table(self, name: str) -> pa.Table | None:
        if name not in self._stats_tables:
            self._read_stats_file(self._stats_files[name].path, check=False)
        return self._stats_tables.get(name)

    def _rebuild(self, lo: int, hi: int) -> None:
        """Recompute the compacted statistics of steps ``lo <= step < hi`` from the surviving records."""
        parts = []
        for name, info in sorted(self._stats_files.items()):
            if info.steps is None or info.steps[1] < lo or info.steps[0] >= hi:
                continue
            table = self._table(name)
            if table is None:
                continue
            step = table.column("step")
            rows = self._surviving(name, table.filter(pc.and_(pc.greater_equal(step, lo), pc.less(step, hi))))
            if rows.num_rows:
                parts.append(rows)
        base = self._compact if self._compact is not None else STATS_SCHEMA.empty_table()
        step = base.column("step")
        keep = base.filter(pc.or_(pc.less(step, lo), pc.greater_equal(step, hi)))
        if parts:
            keep = pa.concat_tables([keep, aggregate.compact(pa.concat_tables(parts))]).sort_by("step")
        self._compact = keep

    def _fold(self, tables: list[pa.Table]) -> None:
        """Merge new statistics rows into the compacted table, touching only the steps they hold."""
        fresh = pa.concat_tables(tables)
        if self._compact is None or self._compact.num_rows == 0:
            self._compact = aggregate.compact(fresh)
            return
        steps = pc.unique(fresh.column("step"))
        hit = pc.is_in(self._compact.column("step"), steps)
        keep = self._compact.filter(pc.invert(hit))
        redo = aggregate.compact(pa.concat_tables([self._compact.filter(hit), fresh]))
        self._compact = pa.concat_tables([keep, redo]).sort_by("step")

    def _load_index(self, listed: dict[str, storage.Entry]) -> None:
        path = _index_location(self.path)
        try:
            table = _read_parquet(path)
        except (FileNotFoundError, IsADirectoryError):
            return
        except Exception:  # noqa: BLE001 - a damaged index is rebuilt from the files
            return
        try:
            meta = json.loads((table.schema.metadata or {})[schema.PARQUET_META_KEY])
            if meta.get("index_version") != INDEX_VERSION:
                raise ValueError("an index of an older rldiag")
            files: dict[str, list[float]] = meta["files"]
            cutoffs = {str(k): int(v) for k, v in meta["cutoff"].items()}
            infos = {}
            for name, (size, rows, lo, hi) in files.items():
                e = listed.get(name)
                if e is None or e.size != size:
                    raise ValueError(f"{name} changed since the index was written")
                steps = None if lo is None else (int(lo), int(hi))
                infos[name] = _FileInfo(e.path, e.size, e.mtime, int(rows), None, steps)
            table = table.select(STATS_SCHEMA.names).cast(STATS_SCHEMA)
            validate_stats(table)
        except Exception:  # noqa: BLE001 - a stale or damaged index is rebuilt from the files
            return
        self._compact = table
        self._stats_files.update(infos)
        self._indexed = set(infos)
        self._applied = cutoffs

    def _save_index(self) -> None:
        if self._compact is None:
            return
        path = _index_location(self.path)
        files = {
            name: [info.size, info.rows, *(info.steps or (None, None))] for name, info in self._stats_files.items()
        }
        meta = {
            schema.PARQUET_META_KEY: json.dumps(
                {
                    "schema_version": schema.SCHEMA_VERSION,
                    "index_version": INDEX_VERSION,
                    "files": files,
                    "cutoff": self._applied,
                }
            ).encode()
        }
        if isinstance(path, storage.RemotePath):  # one whole-object write: no rename needed
            buf = pa.BufferOutputStream()
            pq.write_table(self._compact.replace_schema_metadata(meta), buf, compression="zstd")
            try:
                storage.write_whole(path, buf.getvalue().to_pybytes())
                self._indexed = set(files)
            except OSError:
                pass
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}{schema.TMP_SUFFIX}")
            pq.write_table(self._compact.replace_schema_metadata(meta), tmp, compression="zstd")
            os.replace(tmp, path)
            self._indexed = set(files)
        except OSError:
            pass  # a read-only location: the index stays in memory

    def _skip(self, key: str, path: storage.Location, exc: BaseException) -> None:
        self._bad.add(key)
        msg = f"skipped unreadable file {path} ({type(exc).__name__}: {exc}); the rest of the run is read"
        self.problems.append(Problem(str(path), msg))
        warnings.warn(msg, RunFormatWarning, stacklevel=3)

    def _read_stats_file(
        self,
        p: storage.Location,
        *,
        check: bool = True,
        loaded: tuple[pa.Table | None, dict[str, Any], Exception | None] | None = None,
        entry: storage.Entry | None = None,
    ) -> _FileInfo | None:
        """Record a statistics file (read now, or ``loaded`` by :func:`_load_stats` on a worker thread)."""
        table, meta, exc = loaded if loaded is not None else _load_stats(p)
        if table is None:
            self._skip(p.name, p, exc)
            return None
        cfg = meta.get("config")
        if check and cfg is not None and RecorderConfig.from_dict(cfg).stats_key() != self.config.stats_key():
            msg = (
                f"{p} was recorded with other clip settings than the manifest ({cfg}); its config-dependent "
                "statistics (clip fractions, balance) mix settings: use run.step_metrics(config=...) to recompute"
            )
            self.problems.append(Problem(str(p), msg))
            warnings.warn(msg, RunFormatWarning, stacklevel=3)
        self._stats_tables[p.name] = table
        st = entry if entry is not None else self._stats_files.get(p.name)
        size, mtime = (st.size, st.mtime) if st is not None else (p.stat().st_size, p.stat().st_mtime)
        steps = None
        if table.num_rows:
            mm = pc.min_max(table.column("step"))
            steps = (int(mm["min"].as_py()), int(mm["max"].as_py()))
        return _FileInfo(p, size, mtime, table.num_rows, cfg, steps)

    # ---- raw access -------------------------------------------------------------------------------
    def stats_table(self) -> pa.Table:
        """All statistics rows, one per record (step, rank, micro), read from the files (cached); records that
        a restarted writer superseded (:attr:`resume`) are left out."""
        if self._stats_cache is None:
            for name in sorted(self._stats_files):
                if name not in self._stats_tables:
                    self._read_stats_file(self._stats_files[name].path, check=False)
            tables = [self._surviving(k, self._stats_tables[k]) for k in sorted(self._stats_tables)]
            self._stats_cache = pa.concat_tables(tables) if tables else STATS_SCHEMA.empty_table()
        return self._stats_cache

    def compact_table(self) -> pa.Table:
        """Statistics merged per step (all ranks and records): one row per step."""
        if self._live_view is not None:
            return self._live_view
        return self._compact if self._compact is not None else STATS_SCHEMA.empty_table()

    def step_stats(self) -> pl.DataFrame:
        """Sufficient statistics per (step, rank, micro), as stored (histograms as sparse lists)."""
        return pl.from_arrow(self.stats_table()).sort(["step", "rank", "micro"])

    def token_files(self) -> list[storage.Location]:
        """Published token files, sorted by name (with superseded rows: see :meth:`token_limits`)."""
        return [self._token_files[k].path for k in sorted(self._token_files)]

    def token_limits(self) -> dict[storage.Location, int]:
        """Token files some of whose rows a restarted writer superseded -> the first superseded step (the file's
        rows at that step and later count nowhere)."""
        out = {}
        for name, info in self._token_files.items():
            cut = self._cutoff(name)
            if cut is not None:
                out[info.path] = cut
        return out

    def token_step_ranges(self) -> dict[storage.Location, tuple[int, int]]:
        """Token file -> its smallest and largest step (from the statistics file of the same segment, which holds
        the same records); files without a known range are left out."""
        out = {}
        for name, info in self._token_files.items():
            stats = self._stats_files.get(name)
            if stats is not None and stats.steps is not None:
                out[info.path] = stats.steps
        return out

    def tokens(self) -> pl.LazyFrame:
        """Token rows of the published segments (columns of :mod:`rldiag.schema`), lazily; rows that a restarted
        writer superseded are left out."""
        files = self.token_files()
        if not files:
            return pl.LazyFrame(
                schema={k: pl.from_arrow(pa.array([], v)).dtype for k, v in schema.TOKEN_DTYPES.items()}
            )
        return scan_tokens(files, self.token_limits())

    def steps(self) -> list[int]:
        """Steps with statistics, ascending."""
        t = self.compact_table()
        return t.column("step").to_numpy().tolist() if t.num_rows else []

    @property
    def ranks(self) -> list[int]:
        """Ranks that wrote statistics (from the writers' file names, ``r<rank>-...``)."""
        ranks = set()
        for name in self._stats_files:
            head = name.split("-", 1)[0]
            if head.startswith("r") and head[1:].isdigit():
                ranks.add(int(head[1:]))
            else:
                return sorted(set(self.stats_table().column("rank").to_numpy().tolist()))
        return sorted(ranks)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)

    # ---- run state (the rules of rldiag.runformat) ---------------------------------------------------
    def is_closed(self, *, count_gone: bool = False) -> bool:
        """Whether every rank's latest writer closed the run (the rule of :func:`rldiag.runformat.run_closed`;
        one listing of ``writers/``, and only the writer files that changed are read again)."""
        latest = runformat.latest_writers(self._read_writers()[0])
        return bool(latest) and all(w.closed is not None or (count_gone and w.process_gone()) for w in latest.values())

    def newest_data_time(self) -> float | None:
        """When data last landed: modification time of the newest statistics segment (None before any)."""
        return runformat.newest_data_time(self.path)

    def alerts(self) -> list[dict[str, Any]]:
        """The events of the run's ``alerts.jsonl``, oldest first (``[]`` when there is none); the file is
        parsed again only when it changed (the same list is returned until then)."""
        path = self.path / runformat.ALERTS_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_size, st.st_mtime_ns)
        if self._alerts_cache is None or self._alerts_cache[0] != key:
            self._alerts_cache = (key, runformat.read_alerts(path))  # type: ignore[arg-type]
        return self._alerts_cache[1]

    def file_steps(self, names: Sequence[str]) -> set[int]:
        """The steps that the named statistics files (as :meth:`refresh` returns them) hold."""
        out: set[int] = set()
        for name in names:
            if name not in self._stats_tables and name in self._stats_files:
                self._read_stats_file(self._stats_files[name].path, check=False)
            table = self._stats_tables.get(name)
            if table is not None:
                out.update(pc.unique(table.column("step")).to_pylist())
        return out

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
        names = list(REGISTRY) if metrics is None else list(metrics)
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; `rldiag summarize --list` shows the names")
        by = ("step", "rank") if by_rank else ("step",)
        table = self._filtered(ranks, steps, compact=ranks is None and not by_rank)
        if not from_tokens and (config is None or config.stats_key() == self.config.stats_key()):
            return aggregate.finalize(aggregate.merge(table, by=by, stats=needed_stats(names)), names)
        config = config or self.config
        # a setting that decides which tokens count (logp_tolerance) changes every statistic, not only the
        # clip-dependent ones
        every = from_tokens or affected_stats(self.config.stat_fields_changed(config)) == STATS.keys()
        return self._recomputed(
            table, config, names, by, ranks, steps, everything=every, engine=engine, ray_address=ray_address
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
        from rldiag.analysis.recompute import iter_file_stats, row_groups

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
        step_set = None
        if steps is not None:
            all_steps = np.array(self.steps())
            step_set = set(
                all_steps[(all_steps >= (steps.start or -(2**62))) & (all_steps < (steps.stop or 2**62))]
                if isinstance(steps, slice)
                else list(steps)
            )
        from rldiag.analysis.progress import progress

        files = self.token_files()
        executor = None
        if engine == "ray":
            from rldiag.analysis import ray_engine

            executor = ray_engine.RowGroupExecutor(ray_address)
        stats_iter = iter_file_stats(
            files, config, steps=step_set, config_only=not everything, limits=self.token_limits(), executor=executor
        )
        parts = list(progress(stats_iter, row_groups(files), "rldiag: recomputing from token rows"))
        fresh = pa.concat_tables(parts) if parts else STATS_SCHEMA.empty_table()
        if ranks is not None:
            fresh = fresh.filter(pc.is_in(fresh.column("rank"), pa.array(list(ranks), pa.int32())))
        need = needed_stats(names)
        dep = set(need) if everything else {s for s in need if STATS[s].config_dependent}
        merged_stored = aggregate.merge(stored, by=by, stats=(need - dep) | {"rows_written"})
        merged_fresh = aggregate.merge(fresh, by=by, stats=dep | {"rows_written"})
        # align fresh statistics to the stored groups: a group whose token rows were not all read (no rows, a
        # damaged file) gets NaN rather than the statistics of part of its records
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
        return aggregate.finalize(aggregate.Merged(keys=merged_stored.keys, stats=out_stats), names)

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
        or fixed ``width`` positions per bucket; ``by="stage"`` or ``"turn"``: the column's values.
        ``engine="ray"``: Ray tasks over groups of whole steps compute the statistics where they run
        (:mod:`rldiag.analysis.ray_engine`); the result is the same.
        """
        if by not in ("pos", "stage", "turn"):
            raise ValueError(f"by must be 'pos', 'stage' or 'turn', got {by!r}")
        _check_engine(engine)
        names = list(BUCKET_METRICS)
        cols = ["step", "bucket", "n"] + names
        if engine == "ray":
            from rldiag.analysis import ray_engine

            chosen = self.steps() if steps is None else sorted({int(x) for x in steps})
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
            stats = bucket_stats(lf, self.config, by, buckets, width)
        if stats.num_rows == 0:
            return pl.DataFrame(
                schema={"step": pl.Int64, "bucket": pl.Int64, "n": pl.Float64} | {n: pl.Float64 for n in names}
            )
        merged = aggregate.merge(stats, by=("step", "bucket"), stats=needed_stats(names) | {"n"})
        out = aggregate.finalize(merged, names).with_columns(pl.Series("n", merged.stats["n"]))
        return out.select(cols)

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

            chosen = self.steps() if steps is None else sorted({int(x) for x in steps})
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
            chosen = self.steps() if steps is None else sorted({int(x) for x in steps})
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
        """What ``rldiag info`` prints: manifest, steps, ranks, tokens, dropped rows, files, problems."""
        t = self.compact_table()

        def total(c: str) -> int:
            return int(pc.sum(t.column(c)).as_py() or 0) if t.num_rows else 0

        writers = self._writer_infos
        steps = self.steps()
        superseded_records = 0
        for name in self._stats_files:
            if self._cutoff(name) is not None:
                table = self._table(name)
                if table is not None:
                    superseded_records += table.num_rows - self._surviving(name, table).num_rows
        last_write = max([f.mtime for f in self._stats_files.values()], default=None)
        return {
            "path": str(self.path),
            "name": self.name,
            "schema_version": self.manifest.get("schema_version"),
            "rldiag_version": self.manifest.get("rldiag_version"),
            "created": self.manifest.get("created"),
            "world_size": self.manifest.get("world_size"),
            "config": self.config.to_dict(),
            "steps": len(steps),
            "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None,
            "ranks": self.ranks,
            "records": sum(f.rows for f in self._stats_files.values()) - superseded_records,
            "records_superseded": superseded_records,
            "tokens": total("n"),
            "tokens_masked_in": total("n_masked"),
            "tokens_nonfinite": total("n_nonfinite"),
            "tokens_invalid": total("n_invalid"),
            "token_rows_written": total("rows_written"),
            "token_rows_dropped": total("rows_dropped"),
            "stats_files": len(self._stats_files),
            "token_files": len(self._token_files),
            "bytes": sum(f.size for f in self._stats_files.values()) + sum(f.size for f in self._token_files.values()),
            "last_write": last_write,
            "seconds_since_last_write": None if last_write is None else time.time() - last_write,
            "resume_points": [
                {
                    "writer": w.writer,
                    "rank": w.rank,
                    "started": w.started,
                    "first_step": w.first_step,
                    "closed": w.closed,
                }
                for w in writers
            ],
            "superseded": list(self.resume.superseded),
            "gaps": list(self.resume.gaps),
            "problems": [p.message for p in self.problems],
        }


def _load_stats(p: storage.Location) -> tuple[pa.Table | None, dict[str, Any], Exception | None]:
    """A statistics file read and validated: (table in STATS_SCHEMA, its rldiag metadata, None), or
    (None, {}, the error) for a file that is unreadable, too new or incomplete."""
    try:
        table = _read_parquet(p)
        meta = runformat.read_file_metadata(table.schema.metadata)
        present = set(table.column_names)
        missing = [f.name for f in STATS_SCHEMA if f.name not in present]
        if missing:
            raise ValueError(f"statistics columns missing: {missing[:5]}")
        table = table.select(STATS_SCHEMA.names).cast(STATS_SCHEMA)
        validate_stats(table)
        _check_bucket_lengths(table, meta)
        _check_counts(table)
        return table, meta, None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
        return None, {}, exc


def _check_token_schema(arrow_schema: pa.Schema) -> None:
    """A token file must hold exactly the token columns, each of its type (one odd file must not break the
    scan of every other)."""
    got = {f.name: f.type for f in arrow_schema}
    odd = [
        n
        for n, t in schema.TOKEN_DTYPES.items()
        if got.get(n) != t and not (pa.types.is_dictionary(got.get(n, pa.null())) and got[n].value_type == t)
    ]
    extra = sorted(set(got) - set(schema.TOKEN_DTYPES))
    for _key, value in (arrow_schema.metadata or {}).items():
        value.decode("utf-8")  # polars refuses a file whose key-value metadata is not text: skip it alone
    if odd or extra:
        raise ValueError(
            f"token columns missing or of another type: {odd[:5]}"
            + (f", unknown columns: {extra[:5]}" if extra else "")
        )


def _check_counts(table: pa.Table) -> None:
    """Token counts are finite and >= 0 (a NaN or infinite count made ``info`` raise for the whole run)."""
    for name in ("n", "n_masked", "n_nonfinite", "n_invalid", "rows_written", "rows_dropped"):
        if name in table.column_names and table.num_rows:
            col = table.column(name)
            ok = pc.and_(pc.is_finite(col), pc.greater_equal(col, 0))
            if not pc.all(pc.fill_null(ok, False)).as_py():
                raise ValueError(f"statistics column {name} holds a count that is negative, NaN or infinite")


def _check_bucket_lengths(table: pa.Table, meta: dict[str, Any]) -> None:
    """Bucket vectors hold the file's own ``n_buckets`` values (a damaged file must not refuse the whole run)."""
    nb = (meta.get("config") or {}).get("n_buckets") if isinstance(meta, dict) else None
    if not isinstance(nb, int) or not table.num_rows:
        return
    for name in ("b_n", "b_s", "b_s2"):
        if name in table.column_names:
            lengths = pc.list_value_length(table.column(name))
            if pc.any(pc.not_equal(lengths, nb)).as_py():
                raise ValueError(
                    f"statistics column {name} holds vectors whose length is not the file's n_buckets={nb}"
                )


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


def _read_parquet(p: Any) -> pa.Table:
    """A whole Parquet file (a regular local file, or an object read through fsspec)."""
    src = storage.parquet_source(p)
    if isinstance(src, str):
        return pq.read_table(src)
    with src:
        return pq.read_table(src)


def _parquet_metadata(p: Any) -> pq.FileMetaData:
    src = storage.parquet_source(p)
    if isinstance(src, str):
        return pq.read_metadata(src)
    with src:
        return pq.read_metadata(src)


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


def _read_live(run_dir: Path, published: Any) -> list[tuple[str, pa.Table]]:
    """The live tails of a local run that a reader holding the segments ``published`` (names) may add.

    Returns ``(segment name the rows will have, statistics table)`` pairs. A tail is used only when its
    segment is not published yet and the one before it is (so rows are never counted twice, whatever the
    order in which writer and reader act); regular files only, bounded in size; a bad tail is ignored (it is
    a hint, replaced within a second; the segments stay the record).
    """
    out: list[tuple[str, pa.Table]] = []
    try:
        entries = list(os.scandir(Path(run_dir) / runformat.LIVE_DIR))
    except OSError:
        return out
    for e in entries:
        try:
            if (
                e.name.startswith(".")
                or not e.name.endswith(".parquet")
                or not e.is_file(follow_symlinks=False)
                or e.stat(follow_symlinks=False).st_size > 2 * runformat.LIVE_MAX_BYTES
            ):
                continue
            table = pq.read_table(e.path)
            meta = json.loads((table.schema.metadata or {})[runformat.LIVE_META_KEY])
            seg = int(meta["segment"])
            name = runformat.segment_name(str(meta["writer"]), seg)
            if name in published or (seg > 0 and runformat.segment_name(str(meta["writer"]), seg - 1) not in published):
                continue
            table = table.select(STATS_SCHEMA.names).cast(STATS_SCHEMA)
            validate_stats(table)
            out.append((name, table))
        except Exception:  # noqa: BLE001 - gone (published meanwhile) or damaged: the segments are the record
            continue
    return out
