"""The files of a run: listing, the run index, restarts, live tails, and validation of what is read.

:class:`RunFiles` is the scanning half of :class:`rldiag.analysis.io.Run`: it lists the published segments (one
listing per folder, so a live run on object storage costs a bounded number of requests per refresh), reads
and validates each new statistics file (skipping and naming a damaged one), applies the restart rule of
:mod:`rldiag.runformat` (a later writer attempt supersedes its rank's earlier records from its first step on),
keeps the statistics merged per step (the *compacted* table, saved as the run index), and adds the writers'
live tails. Everything that reads a run goes through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rldiag import runformat, schema, storage
from rldiag.config import RecorderConfig
from rldiag.metrics import aggregate
from rldiag.stats.table import KEYS, STATS_SCHEMA, from_ipc, from_packed_ipc, to_ipc, with_later_columns
from rldiag.stats.table import validate as validate_stats

RunFormatWarning = runformat.RunFormatWarning


@dataclass
class FileInfo:
    path: storage.Location
    size: int
    mtime: float
    rows: int
    config: dict[str, Any] | None = None
    steps: tuple[int, int] | None = None
    """Smallest and largest step in the file (None when it holds no rows)."""
    meta_writer: str | None = None
    """The writer id in the file's own metadata (a copied or renamed file keeps it)."""

    @property
    def writer(self) -> tuple[str, int, int] | None:
        """(writer id, rank, start ns) parsed from the segment name, else from the writer id of the file's
        metadata (a copy ``x (copy).parquet`` is its writer's), None for a file rldiag did not write."""
        parsed = runformat.parse_segment_name(self.path.name)
        if parsed is None and self.meta_writer:
            parsed = runformat.parse_segment_name(runformat.segment_name(self.meta_writer, 0))
        return parsed

    @property
    def canonical(self) -> bool:
        """Whether the file has the name its writer gave it (a copy or a renamed file has not)."""
        parsed = runformat.parse_segment_name(self.path.name)
        return parsed is not None and (self.meta_writer is None or parsed[0] == self.meta_writer)


@dataclass
class Problem:
    """Something wrong with a run that did not stop reading it."""

    path: str
    message: str


INDEX_DIR = runformat.INDEX_DIR
"""Folder (in the run, or in ~/.cache/rldiag when the run is read-only) of the run index."""
INDEX_MIN_FILES = 16
"""The index is (re)written once this many statistics files are not in it yet."""
INDEX_FILE = "steps.arrow"
"""File name of the run index: an Arrow IPC file, lz4-compressed buffers (reads 4-10x faster than the same table
in Parquet; index version 3 and older were ``steps.parquet``)."""
INDEX_VERSION = 5
"""Version of the index's own metadata (2: per-file step ranges and the restart cutoffs it was built with;
3: each file's writer and the duplicate records left out; 4: stored as Arrow IPC, :data:`INDEX_FILE`;
5: a segment with a write-time summary adds its summary rows, :meth:`RunFiles._pieces`; an older reader's
index added its records)."""
_OLD_INDEX_FILE = "steps.parquet"
_NO_CUTOFF = 2**63 - 1


def _index_location(run_path: storage.Location) -> storage.Location:
    own = run_path / INDEX_DIR
    if isinstance(run_path, storage.RemotePath) or os.access(run_path, os.W_OK):
        return own / INDEX_FILE
    import hashlib

    digest = hashlib.sha1(str(run_path.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rldiag" / digest / INDEX_FILE


def _read_index(path: storage.Location) -> pa.Table:
    """The run index at ``path``: a regular file (never a link or a FIFO) holding one Arrow IPC table, fully
    validated by Arrow (offsets, lengths) before any of its values is used."""
    with storage.open_binary(path) as fh:
        data = fh.read()
    return from_ipc(data)


def _write_index(path: storage.Location, table: pa.Table) -> None:
    """Publish the index whole (a temporary name and a rename locally, one PUT on object storage)."""
    if not isinstance(path, storage.RemotePath):
        path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_whole(path, to_ipc(table))
    if not isinstance(path, storage.RemotePath):
        (path.parent / _OLD_INDEX_FILE).unlink(missing_ok=True)  # an index of an older rldiag: never read again


@dataclass
class RunFiles:
    """The published files of one run folder and what was read from them (see the module docstring).

    Published files are immutable and merging is associative, so the statistics of files already seen are kept
    merged per step (:meth:`compact_table`) and new files merge into them; per-record rows
    (:meth:`stats_table`) are read from the files when asked for.
    """

    path: storage.Location
    config: RecorderConfig
    problems: list[Problem] = field(default_factory=list)
    """What is wrong with the run but did not stop reading it (skipped files, restart conflicts)."""
    stats_files: dict[str, FileInfo] = field(default_factory=dict)
    stats_tables: dict[str, pa.Table] = field(default_factory=dict)
    """Records of the statistics files read so far (a file with a write-time summary is read only when asked)."""
    key_tables: dict[str, pa.Table] = field(default_factory=dict)
    """(step, rank, micro) of each statistics file's records (in file order, or by step from a summary)."""
    token_infos: dict[str, FileInfo] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    """Names of the files skipped as unreadable (token files as ``tokens/<name>``)."""
    compact: pa.Table | None = None
    """Statistics merged per step, from the published segments (never the live tails)."""
    live_view: pa.Table | None = None
    """:attr:`compact` plus the live tails, or None when there are none."""
    live_last: dict[int, int] = field(default_factory=dict)
    """rank -> the newest step in that rank's live tails (those :attr:`live_view` holds); empty without any."""
    resume: runformat.Resume = field(default_factory=runformat.Resume)
    """How restarted writers combine: the records that later attempts superseded, gaps, problems."""
    writer_infos: list[runformat.WriterInfo] = field(default_factory=list)
    _stats_cache: pa.Table | None = None
    _indexed: set[str] = field(default_factory=set)
    _index_loaded: bool = False
    _applied: dict[str, int] = field(default_factory=dict)
    """The restart cutoffs the compacted table was built with (writer -> first superseded step)."""
    _writer_cache: dict[str, tuple[tuple[int, float], runformat.WriterInfo | None]] = field(default_factory=dict)
    dropped: dict[str, list[tuple[int, int, int]] | None] = field(default_factory=dict)
    """Duplicate records left out: statistics file -> the (step, rank, micro) keys another file of the same
    writer holds too and counts (None: all of them, a copy of a whole file). See :meth:`_find_duplicates`."""
    duplicate_notes: dict[str, str] = field(default_factory=dict)
    """Statistics file -> what was found duplicated in it (kept with the index, listed as problems)."""
    _dup_winners: dict[str, set[str]] = field(default_factory=dict)

    # ---- scanning ---------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Read segments published since the last scan; returns their names (statistics files).

        Costs one listing of ``stats/``, ``tokens/`` and ``writers/`` (three requests on object storage), plus
        reading the new segments and the writer files that changed.
        """
        listed = {e.name: e for e in storage.list_files(self.path / schema.STATS_DIR) if runformat.is_published(e.name)}
        gone = sorted(n for n in self.stats_files if n not in listed)
        if gone:  # published segments never change: the run was deleted and written again, or files removed
            self._start_over(gone)
        if not self._index_loaded:
            self._index_loaded = True
            self._load_index(listed)
        new: list[str] = []
        summaries: dict[str, pa.Table | None] = {}
        todo = [e.path for name, e in listed.items() if name not in self.stats_files and name not in self.bad]
        # files are read on a few threads (pyarrow releases the GIL); checks and bookkeeping stay here, in order
        loaded = _load_many(todo)
        for p, got in zip(todo, loaded):
            info = self._read_stats_file(p, loaded=got, entry=listed[p.name])
            if info is not None:
                self.stats_files[p.name] = info
                summaries[p.name] = got.summary
                new.append(p.name)
        tdir = self.path / schema.TOKENS_DIR
        for e in storage.list_files(tdir):
            p = e.path
            if not runformat.is_published(e.name) or p.name in self.token_infos or ("tokens/" + p.name) in self.bad:
                continue
            try:
                meta = _parquet_metadata(p)
                _check_token_schema(meta.schema.to_arrow_schema())
                self.token_infos[p.name] = FileInfo(p, e.size, e.mtime, meta.num_rows)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
                self._skip("tokens/" + p.name, p, exc)
        duplicated = self._find_duplicates(new)
        changed = self._update_resume() + duplicated
        if new or changed:
            self._stats_cache = None
        counted = [t for t in self._pieces(new, summaries) if t.num_rows]
        if counted:  # a new file may count nowhere (a whole duplicate, or superseded)
            self._fold(counted)
        for lo, hi in changed:
            self._rebuild(lo, hi)
        if (new or changed) and (
            len(self.stats_files) - len(self._indexed) >= INDEX_MIN_FILES or (changed and self._indexed)
        ):
            self._save_index()
        self.live_view = self._with_live_tails()
        return new

    def _start_over(self, gone: Sequence[str]) -> None:
        """Forget everything read so far (the next steps of :meth:`refresh` read the run again), after statistics
        files it had read disappeared; named in :attr:`problems` and warned about."""
        msg = (
            f"{len(gone)} statistics file(s) read before are gone (the run was deleted and written again, or files "
            f"were removed; first: {gone[0]}): the run was read again from its files"
        )
        fresh = RunFiles(self.path, self.config)
        self.__dict__.update(fresh.__dict__)
        self.problems.append(Problem(str(self.path / schema.STATS_DIR), msg))
        warnings.warn(msg, RunFormatWarning, stacklevel=4)

    def _with_live_tails(self) -> pa.Table | None:
        """The compacted table plus the writers' live tails (statistics not in a segment yet; local runs), or
        None when there are none. Never folded into ``_compact`` or the index: segments replace them."""
        if isinstance(self.path, storage.RemotePath):
            return None
        tails = [self.surviving(name, t) for name, t in _read_live(self.path, self.stats_files)]
        tails = [t for t in tails if t.num_rows]
        self.live_last = {}
        if not tails:
            return None
        fresh = pa.concat_tables(tails)
        by_rank = fresh.group_by("rank").aggregate([("step", "max")])
        self.live_last = dict(zip(by_rank.column("rank").to_pylist(), by_rank.column("step_max").to_pylist()))
        base = self.compact if self.compact is not None else STATS_SCHEMA.empty_table()
        hit = pc.is_in(base.column("step"), pc.unique(fresh.column("step")))
        redo = aggregate.compact(pa.concat_tables([base.filter(hit), fresh]))
        return pa.concat_tables([base.filter(pc.invert(hit)), redo]).sort_by("step")

    # ---- restarts ---------------------------------------------------------------------------------
    def _update_resume(self) -> list[tuple[int, int]]:
        """Apply the restart rule (:func:`rldiag.runformat.resolve_attempts`) to the files seen so far; returns
        the step ranges ``[lo, hi)`` whose compacted statistics must be rebuilt because a cutoff changed."""
        infos, bad = self.read_writers()
        self.writer_infos = infos
        data: dict[str, dict[str, Any]] = {}
        for info in self.stats_files.values():
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

    def read_writers(self) -> tuple[list[runformat.WriterInfo], list[runformat.RunFormatError]]:
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

    def cutoff(self, name: str) -> int | None:
        info = self.stats_files.get(name) or self.token_infos.get(name)
        w = runformat.parse_segment_name(name) if info is None else info.writer
        return None if w is None else self.resume.cutoff.get(w[0])

    def surviving(self, name: str, table: pa.Table) -> pa.Table:
        """The rows of a statistics file that count: not superseded by a later attempt of their rank, and not
        a duplicate of a record another file counts (:attr:`dropped`)."""
        if name in self.dropped:
            drop = self.dropped[name]
            if drop is None:
                return table.slice(0, 0)
            table = _without_keys(table, set(drop))
        return self._not_superseded(name, table)

    def _pieces(self, names: Sequence[str], summaries: dict[str, pa.Table | None]) -> list[pa.Table]:
        """What the named files add to the compacted table, one table per file in the order of ``names``: a
        file's write-time summary (``summaries``; None where it has none), cut by restarts, else its surviving
        records. Folding these in file order is the one order every reader folds a run in (the first open, a
        live reader file by file, a rebuild), so the first open and the index give the same bits; records are
        read only for a file without a summary or with some of its records left out as duplicates."""
        out = []
        for name in names:
            if name in self.dropped and self.dropped[name] is None:
                continue  # a whole duplicate: counts nowhere
            summary = summaries.get(name)
            if summary is not None and name not in self.dropped:
                out.append(self._not_superseded(name, summary))
                continue
            table = self.table(name)
            if table is not None:
                out.append(self.surviving(name, table))
        return out

    def _summary(self, name: str) -> pa.Table | None:
        """The write-time summary of a statistics file (read again from its footer), or None when it has none
        (its records are then read and kept)."""
        if name in self.stats_tables:
            return None
        got = _load_stats(self.stats_files[name].path)
        if got.table is not None:
            self.stats_tables[name] = got.table
        return got.summary if got.table is None else None

    def _not_superseded(self, name: str, table: pa.Table) -> pa.Table:
        cut = self.cutoff(name)
        if cut is None:
            return table
        return table.filter(pc.less(table.column("step"), pa.scalar(cut, pa.int64())))

    # ---- duplicates ------------------------------------------------------------------------------
    def _find_duplicates(self, new: Sequence[str]) -> list[tuple[int, int]]:
        """Detect records that two statistics files of one writer both hold (a copied file ``x (copy).parquet``,
        a file restored under another name) and decide which copy counts: the file with its writer's own name
        first, then the smaller name (deterministic whatever the listing order). The others' copies go to
        :attr:`dropped`, are named in :attr:`problems` and warned about (:class:`RunFormatWarning`); records
        are never summed twice. Each new file is compared with the files of its writer whose step ranges
        overlap its own (the neighbouring segments: a step may span two), keeping one owner per record, the
        first in that order. Returns the step ranges ``[lo, hi)`` of files already merged whose counted records
        changed (to rebuild)."""
        ranges: list[tuple[int, int]] = []
        if not new:
            return ranges

        def rank(n: str) -> tuple[bool, str]:
            return (not self.stats_files[n].canonical, n)

        by_writer: dict[str, list[str]] = {}
        for name, info in self.stats_files.items():
            w = info.writer
            if info.steps is not None:
                by_writer.setdefault(w[0] if w is not None else name, []).append(name)
        fresh = set(new)
        seen: set[str] = set()
        for name in sorted((n for n in new if n in self.stats_files), key=rank):
            seen.add(name)
            info = self.stats_files[name]
            w = info.writer
            if info.steps is None:
                continue
            lo, hi = info.steps
            spans = {o: self.stats_files[o].steps for o in by_writer.get(w[0] if w is not None else name, [])}
            others = [
                o
                for o, sp in spans.items()
                if o != name and (o not in fresh or o in seen) and sp is not None and sp[0] <= hi and lo <= sp[1]
            ]
            if not others:
                continue
            mine = self.keys(name)
            if mine is None:
                continue
            for other in sorted(others, key=rank):
                theirs = self.keys(other)
                if theirs is None:
                    continue
                olo, ohi = self.stats_files[other].steps  # type: ignore[misc]
                span = [(max(lo, olo), min(hi, ohi))]
                common = set(_keys_in(self.surviving(name, mine), span)) & set(
                    _keys_in(self.surviving(other, theirs), span)
                )
                if not common:
                    continue
                loser, winner = (other, name) if rank(name) < rank(other) else (name, other)
                self._drop(loser, winner, common)
                if loser != name:
                    llo, lhi = self.stats_files[loser].steps  # type: ignore[misc]
                    ranges.append((llo, lhi + 1))
        return ranges

    def _drop(self, loser: str, winner: str, keys: set[tuple[int, int, int]]) -> None:
        """Leave ``keys`` of file ``loser`` out (``winner`` counts them) and name it in the problems."""
        old = self.dropped.get(loser, [])
        if old is None:
            return
        merged = sorted(set(old) | keys)
        whole = len(merged) >= self.stats_files[loser].rows
        self.dropped[loser] = None if whole else merged
        winners = self._dup_winners.setdefault(loser, set())
        winners.add(winner)
        first = min(winners, key=lambda n: (not self.stats_files[n].canonical, n) if n in self.stats_files else (1, n))
        msg = (
            f"{self.stats_files[loser].path} duplicates {', '.join(sorted(winners))}: "
            + (f"all of its {self.stats_files[loser].rows} records" if whole else f"{len(merged)} of its records")
            + f" (same writer, step, rank and micro-batch) are there too; they count once, from {first}"
            + (" (this copy counts nowhere: delete it)" if whole else "")
        )
        self._note_duplicate(loser, msg)

    def _note_duplicate(self, name: str, msg: str) -> None:
        before = self.duplicate_notes.get(name)
        if before == msg:
            return
        if before is not None:  # the file lost more records since: one problem per file, the latest
            self.problems[:] = [p for p in self.problems if p.message != before]
        self.duplicate_notes[name] = msg
        self.problems.append(Problem(str(self.stats_files[name].path), msg))
        warnings.warn(msg, RunFormatWarning, stacklevel=4)

    def duplicate_records(self) -> int:
        """How many statistics records count nowhere because another file holds them too."""
        n = 0
        for name, drop in self.dropped.items():
            if name in self.stats_files:
                n += self.stats_files[name].rows if drop is None else len(drop)
        return n

    def table(self, name: str) -> pa.Table | None:
        """The records of a statistics file (read on first use, then kept), first of each key."""
        if name not in self.stats_tables:
            self._read_stats_file(self.stats_files[name].path, check=False, records=True)
        return self.stats_tables.get(name)

    def keys(self, name: str) -> pa.Table | None:
        """The (step, rank, micro) keys of a statistics file's records (from its summary when it has one: the
        records are not read)."""
        if name not in self.key_tables:
            self._read_stats_file(self.stats_files[name].path, check=False)
        return self.key_tables.get(name)

    def _rebuild(self, lo: int, hi: int) -> None:
        """Recompute the compacted statistics of steps ``lo <= step < hi`` from the surviving records."""
        names = [
            name
            for name, info in sorted(self.stats_files.items())
            if info.steps is not None and info.steps[1] >= lo and info.steps[0] < hi and name not in self.bad
        ]
        parts = []
        for piece in self._pieces(names, {n: self._summary(n) for n in names}):
            step = piece.column("step")
            rows = piece.filter(pc.and_(pc.greater_equal(step, lo), pc.less(step, hi)))
            if rows.num_rows:
                parts.append(rows)
        base = self.compact if self.compact is not None else STATS_SCHEMA.empty_table()
        step = base.column("step")
        keep = base.filter(pc.or_(pc.less(step, lo), pc.greater_equal(step, hi)))
        if parts:
            keep = pa.concat_tables([keep, aggregate.compact(pa.concat_tables(parts))]).sort_by("step")
        self.compact = keep

    def _fold(self, tables: list[pa.Table]) -> None:
        """Merge new statistics rows into the compacted table, touching only the steps they hold."""
        fresh = pa.concat_tables(tables)
        if self.compact is None or self.compact.num_rows == 0:
            self.compact = aggregate.compact(fresh)
            return
        steps = pc.unique(fresh.column("step"))
        if pc.min(steps).as_py() > pc.max(self.compact.column("step")).as_py():
            # only steps past the last one (a live run's tick): append them, nothing to re-merge or re-sort
            tail = aggregate.compact(fresh).sort_by("step")
            self.compact = pa.concat_tables([self.compact, tail])
            if self.compact.column("step").num_chunks > 64:  # keep the per-tick chunks from piling up
                self.compact = self.compact.combine_chunks()
            return
        hit = pc.is_in(self.compact.column("step"), steps)
        keep = self.compact.filter(pc.invert(hit))
        redo = aggregate.compact(pa.concat_tables([self.compact.filter(hit), fresh]))
        self.compact = pa.concat_tables([keep, redo]).sort_by("step")

    def _load_index(self, listed: dict[str, storage.Entry]) -> None:
        path = _index_location(self.path)
        try:
            table = _read_index(path)
        except (FileNotFoundError, IsADirectoryError):
            return
        except Exception:  # noqa: BLE001 - a damaged index is rebuilt from the files
            return
        try:
            meta = json.loads((table.schema.metadata or {})[schema.PARQUET_META_KEY])
            if meta.get("index_version") != INDEX_VERSION:
                raise ValueError("an index of an older rldiag")
            files: dict[str, list[Any]] = meta["files"]
            cutoffs = {str(k): int(v) for k, v in meta["cutoff"].items()}
            dropped = {
                str(k): None if v is None else [(int(a), int(b), int(c)) for a, b, c in v]
                for k, v in meta["dropped"].items()
            }
            notes = {str(k): str(v) for k, v in meta["notes"].items()}
            infos = {}
            for name, (size, rows, lo, hi, wid) in files.items():
                e = listed.get(name)
                if e is None or e.size != size:
                    raise ValueError(f"{name} changed since the index was written")
                steps = None if lo is None else (int(lo), int(hi))
                infos[name] = FileInfo(e.path, e.size, e.mtime, int(rows), None, steps, wid)
            table = table.select(STATS_SCHEMA.names).cast(STATS_SCHEMA)
            validate_stats(table)
        except Exception:  # noqa: BLE001 - a stale or damaged index is rebuilt from the files
            return
        self.compact = table
        self.stats_files.update(infos)
        self._indexed = set(infos)
        self._applied = cutoffs
        self.dropped.update(dropped)
        for name, msg in notes.items():
            if name in self.stats_files:
                self._note_duplicate(name, msg)

    def _save_index(self) -> None:
        if self.compact is None:
            return
        path = _index_location(self.path)
        files = {
            name: [info.size, info.rows, *(info.steps or (None, None)), info.meta_writer]
            for name, info in self.stats_files.items()
        }
        meta = {
            schema.PARQUET_META_KEY: json.dumps(
                {
                    "schema_version": schema.SCHEMA_VERSION,
                    "index_version": INDEX_VERSION,
                    "files": files,
                    "cutoff": self._applied,
                    "dropped": self.dropped,
                    "notes": self.duplicate_notes,
                }
            ).encode()
        }
        try:
            _write_index(path, self.compact.replace_schema_metadata(meta))
            self._indexed = set(files)
        except OSError:
            pass  # a read-only location: the index stays in memory

    def _skip(self, key: str, path: storage.Location, exc: BaseException) -> None:
        self.bad.add(key)
        msg = f"skipped unreadable file {path} ({type(exc).__name__}: {exc}); the rest of the run is read"
        self.problems.append(Problem(str(path), msg))
        warnings.warn(msg, RunFormatWarning, stacklevel=3)

    def _read_stats_file(
        self,
        p: storage.Location,
        *,
        check: bool = True,
        loaded: _Loaded | None = None,
        entry: storage.Entry | None = None,
        records: bool = False,
    ) -> FileInfo | None:
        """Record a statistics file (read now, or ``loaded`` by :func:`_load_stats` on a worker thread; its
        write-time summary unless ``records``)."""
        got = loaded if loaded is not None else _load_stats(p, records=records)
        if got.keys is None:
            self._skip(p.name, p, got.error or ValueError("unreadable"))
            return None
        meta = got.meta
        if check and got.repeated:
            msg = (
                f"{p} holds {got.repeated} repeated records (the same step, rank and micro-batch twice); the "
                "first of each counts, the repeats count nowhere"
            )
            self.duplicate_notes[p.name] = msg
            self.problems.append(Problem(str(p), msg))
            warnings.warn(msg, RunFormatWarning, stacklevel=3)
        cfg = meta.get("config")
        if check and cfg is not None and RecorderConfig.from_dict(cfg).stats_key() != self.config.stats_key():
            msg = (
                f"{p} was recorded with other clip settings than the manifest ({cfg}); its config-dependent "
                "statistics (clip fractions, balance) mix settings: use run.step_metrics(config=...) to recompute"
            )
            self.problems.append(Problem(str(p), msg))
            warnings.warn(msg, RunFormatWarning, stacklevel=3)
        if got.table is not None:
            self.stats_tables[p.name] = got.table
        keys = self.key_tables[p.name] = got.keys
        st = entry if entry is not None else self.stats_files.get(p.name)
        size, mtime = (st.size, st.mtime) if st is not None else (p.stat().st_size, p.stat().st_mtime)
        steps = None
        if keys.num_rows:
            mm = pc.min_max(keys.column("step"))
            steps = (int(mm["min"].as_py()), int(mm["max"].as_py()))
        wid = meta.get("writer")
        return FileInfo(p, size, mtime, keys.num_rows, cfg, steps, wid if isinstance(wid, str) else None)

    def stats_table(self) -> pa.Table:
        """All statistics rows, one per record (step, rank, micro), read from the files (cached); records that
        a restarted writer superseded (:attr:`resume`) are left out."""
        if self._stats_cache is None:
            for name in sorted(self.stats_files):
                if name not in self.stats_tables:
                    self._read_stats_file(self.stats_files[name].path, check=False, records=True)
            tables = [self.surviving(k, self.stats_tables[k]) for k in sorted(self.stats_tables)]
            self._stats_cache = pa.concat_tables(tables) if tables else STATS_SCHEMA.empty_table()
        return self._stats_cache

    def last_step_per_rank(self) -> dict[int, int]:
        """rank -> the newest step of its records that count, in the published segments (from each file's keys:
        no record is read for a file with a write-time summary) or in its live tail (:attr:`live_last`)."""
        keys = [self.surviving(name, k) for name in sorted(self.stats_files) if (k := self.keys(name)) is not None]
        last: dict[int, int] = {}
        table = pa.concat_tables(keys) if keys else None
        if table is not None and table.num_rows:
            grouped = table.group_by("rank").aggregate([("step", "max")])
            last = dict(zip(grouped.column("rank").to_pylist(), grouped.column("step_max").to_pylist()))
        for rank, step in self.live_last.items():
            last[rank] = max(step, last.get(rank, step))
        return last

    def compact_table(self) -> pa.Table:
        """Statistics merged per step (all ranks and records): one row per step."""
        if self.live_view is not None:
            return self.live_view
        return self.compact if self.compact is not None else STATS_SCHEMA.empty_table()

    def token_used(self, name: str) -> bool:
        """Whether a token file counts: only with its segment's statistics file, read and not a whole duplicate.

        The statistics file is published after the token file, so it is the segment's commit record: a token
        file without it (a writer killed between the two publishes, a live writer between them, a token file
        copied alone) is an *orphan* that no reader uses (``rldiag info`` lists it once its writer ended)."""
        return name in self.stats_files and not (name in self.dropped and self.dropped[name] is None)

    def orphan_tokens(self) -> list[str]:
        """Token files that no reader uses (:meth:`token_used`), by name."""
        return sorted(k for k in self.token_infos if not self.token_used(k))

    def token_files(self) -> list[storage.Location]:
        """Published token files that count (:meth:`token_used`), sorted by name (with superseded rows: see
        :meth:`token_limits`)."""
        return [self.token_infos[k].path for k in sorted(self.token_infos) if self.token_used(k)]

    def token_limits(self) -> dict[storage.Location, int]:
        """Token files some of whose rows a restarted writer superseded -> the first superseded step (the file's
        rows at that step and later count nowhere)."""
        out = {}
        for name, info in self.token_infos.items():
            cut = self.cutoff(name)
            if cut is not None and self.token_used(name):
                out[info.path] = cut
        return out

    def token_step_ranges(self) -> dict[storage.Location, tuple[int, int]]:
        """Token file -> its smallest and largest step (from the statistics file of the same segment, which holds
        the same records); files without a known range are left out."""
        out = {}
        for name, info in self.token_infos.items():
            stats = self.stats_files.get(name)
            if stats is not None and stats.steps is not None and self.token_used(name):
                out[info.path] = stats.steps
        return out

    def file_steps(self, names: Sequence[str]) -> set[int]:
        """The steps that the named statistics files (as :meth:`refresh` returns them) hold."""
        out: set[int] = set()
        for name in names:
            table = self.keys(name) if name in self.stats_files else None
            if table is not None:
                out.update(pc.unique(table.column("step")).to_pylist())
        return out

    @property
    def ranks(self) -> list[int]:
        """Ranks that wrote statistics (from the writers' file names, ``r<rank>-...``)."""
        ranks = set()
        for name in self.stats_files:
            head = name.split("-", 1)[0]
            if head.startswith("r") and head[1:].isdigit():
                ranks.add(int(head[1:]))
            else:
                return sorted(set(self.stats_table().column("rank").to_numpy().tolist()))
        return sorted(ranks)

    def superseded_records(self) -> int:
        """How many statistics records a later attempt of their rank superseded."""
        n = 0
        for name in self.stats_files:
            if self.cutoff(name) is not None:
                table = self.keys(name)
                if table is not None:
                    n += table.num_rows - self._not_superseded(name, table).num_rows
        return n


@dataclass
class _Loaded:
    """What :func:`_load_stats` read from one statistics file (``keys`` is None when it is unreadable)."""

    table: pa.Table | None = None
    """Its records (first of each key), when they were read."""
    summary: pa.Table | None = None
    """Its write-time summary (statistics rows merged per step), None when the records were read instead."""
    keys: pa.Table | None = None
    """(step, rank, micro) of its records (in file order, or by step from a summary)."""
    meta: dict[str, Any] = field(default_factory=dict)
    repeated: int = 0
    error: Exception | None = None
    checked: bool = True
    """False for a summary whose values are not checked yet (:func:`_load_many` checks many at once)."""


def _load_many(paths: Sequence[storage.Location]) -> list[_Loaded]:
    """:func:`_load_stats` of each path, on a few threads (pyarrow releases the GIL while it parses footers and
    unpacks summaries); the summaries' values are then checked in one pass over all of them (the per-file checks
    cost more than the reading), and file by file only when that pass finds a problem: a summary that fails its
    checks is replaced by the file's records."""
    if len(paths) <= 1:
        return [_load_stats(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        loaded = list(pool.map(lambda p: _load_stats(p, use_threads=False, check=False), paths))
    todo = [i for i, got in enumerate(loaded) if not got.checked]
    if todo:
        try:
            _check_summaries([loaded[i] for i in todo])
        except Exception:  # noqa: BLE001 - find the bad ones
            for i in todo:
                try:
                    _check_summaries([loaded[i]])
                except Exception:  # noqa: BLE001 - the records are the data: read them instead
                    loaded[i] = _load_stats(paths[i], records=True)
    return loaded


def _check_summaries(items: Sequence[_Loaded]) -> None:
    """The checks of :func:`_checked_stats` on the summaries of several files at once (bucket vectors against
    each file's own ``n_buckets``); raises ``ValueError`` when any fails."""
    tables = [got.summary for got in items if got.summary is not None]
    whole = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    validate_stats(whole)
    _check_counts(whole)
    nb = [(got.meta.get("config") or {}).get("n_buckets") if isinstance(got.meta, dict) else None for got in items]
    want = np.repeat([n if isinstance(n, int) else -1 for n in nb], [t.num_rows for t in tables])
    known = want >= 0
    for name in ("b_n", "b_s", "b_s2"):
        lengths = pc.list_value_length(whole.column(name)).to_numpy(zero_copy_only=False)
        if (lengths[known] != want[known]).any():
            raise ValueError(f"statistics column {name} holds vectors whose length is not the file's n_buckets")
    for got in items:
        got.checked = True


def _load_stats(p: storage.Location, *, use_threads: bool = True, records: bool = False, check: bool = True) -> _Loaded:
    """A statistics file read and validated: its write-time summary from the footer (one small read; the records
    stay on disk) unless ``records`` or it has none, else its records; an unreadable, too new or incomplete file
    gives the error. ``use_threads=False`` when the caller reads several files on its own threads (pyarrow's own
    threads on top oversubscribe the cores: the 160 files of the stats benchmark read in a median 1.2 s instead
    of 1.9 s, 5 interleaved repeats). ``check=False`` leaves a summary's values to :func:`_check_summaries`."""
    try:
        src = storage.parquet_source(p)
        with contextlib.nullcontext(src) if isinstance(src, str) else src as fh:
            pf = pq.ParquetFile(fh)
            footer = pf.metadata.metadata
            meta = runformat.read_file_metadata(footer)
            if not records:
                summary = _read_summary(footer, meta, check=check)
                if summary is not None:
                    return summary
            table = pf.read(use_threads=use_threads)
        if footer and runformat.SUMMARY_META_KEY in footer:  # pyarrow adds every footer key to the schema's
            table = table.replace_schema_metadata(  # metadata: not the summary's 100s of KB on every table
                {k: v for k, v in (table.schema.metadata or {}).items() if k != runformat.SUMMARY_META_KEY}
            )
        table = _checked_stats(table, meta)
        table, repeated = aggregate.first_of_each_record(table)
        return _Loaded(table=table, keys=table.select(list(KEYS)), meta=meta, repeated=repeated)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
        return _Loaded(error=exc)


def _checked_stats(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    """Statistics rows in :data:`STATS_SCHEMA` (older files: the later columns as not recorded), validated
    before any value indexes memory; raises ``ValueError`` naming the problem."""
    table = _in_stats_schema(table)
    validate_stats(table)
    _check_bucket_lengths(table, meta)
    _check_counts(table)
    return table


def _in_stats_schema(table: pa.Table) -> pa.Table:
    """Statistics rows in :data:`STATS_SCHEMA` (older files: the later columns as not recorded); not validated."""
    table = with_later_columns(table)
    if not table.schema.equals(STATS_SCHEMA):  # a file of another writer, or written by pyarrow with other types
        table = table.cast(STATS_SCHEMA)
    return table


def _read_summary(footer: dict[bytes, bytes] | None, meta: dict[str, Any], *, check: bool = True) -> _Loaded | None:
    """The write-time summary in a statistics file's footer (:data:`rldiag.runformat.SUMMARY_META_KEY`), checked
    like the records (schema, histogram bins, counts), one row per step in order and as many record keys as the
    file's records; None when there is none or it is damaged (the records are read instead: they are the data)."""
    data = (footer or {}).get(runformat.SUMMARY_META_KEY)
    if data is None or len(data) > runformat.SUMMARY_MAX_BYTES:
        return None
    try:
        raw = from_packed_ipc(data)
        ranks, micros = (raw.column(c).combine_chunks() for c in aggregate.SUMMARY_KEY_COLUMNS)
        stats = raw.drop_columns(list(aggregate.SUMMARY_KEY_COLUMNS))
        summary = _checked_stats(stats, meta) if check else _in_stats_schema(stats)
        steps = summary.column("step").to_numpy()
        if steps.size > 1 and not (np.diff(steps) > 0).all():
            raise ValueError("summary steps are not one row per step in order")
        counts = np.diff(ranks.offsets.to_numpy())
        if not np.array_equal(counts, np.diff(micros.offsets.to_numpy())) or ranks.null_count or micros.null_count:
            raise ValueError("summary record keys are damaged")
        keys = pa.table(
            {
                "step": pa.array(np.repeat(steps, counts), pa.int64()),
                "rank": ranks.flatten().cast(pa.int32()),
                "micro": micros.flatten().cast(pa.int32()),
            }
        )
        repeated = int((raw.schema.metadata or {}).get(b"repeated", b"0"))
    except (ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return _Loaded(summary=summary, keys=keys, meta=meta, repeated=max(repeated, 0), checked=check)


def _keys_in(table: pa.Table, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The (step, rank, micro) keys of the rows whose step lies in one of ``spans`` (inclusive bounds)."""
    step = table.column("step")
    mask = None
    for lo, hi in spans:
        m = pc.and_(pc.greater_equal(step, lo), pc.less_equal(step, hi))
        mask = m if mask is None else pc.or_(mask, m)
    t = table.filter(mask) if mask is not None else table
    return list(zip(t.column("step").to_pylist(), t.column("rank").to_pylist(), t.column("micro").to_pylist()))


def _without_keys(table: pa.Table, keys: set[tuple[int, int, int]]) -> pa.Table:
    if not keys or not table.num_rows:
        return table
    got = zip(table.column("step").to_pylist(), table.column("rank").to_pylist(), table.column("micro").to_pylist())
    return table.filter(pa.array([k not in keys for k in got], pa.bool_()))


def _check_token_schema(arrow_schema: pa.Schema) -> None:
    """A token file must hold exactly the token columns, each of its type (one odd file must not break the
    scan of every other)."""
    got = {f.name: f.type for f in arrow_schema}
    odd = [
        n
        for n, t in schema.TOKEN_DTYPES.items()
        if got.get(n) != t
        and not (pa.types.is_dictionary(got.get(n, pa.null())) and got[n].value_type == t)
        and not (n not in got and n in schema.LATER_TOKEN_COLUMNS)  # a file of an older rldiag
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
            x = np.asarray(table.column(name).to_numpy(), dtype=np.float64)  # a null reads as NaN: refused too
            with np.errstate(invalid="ignore"):
                if not (np.isfinite(x) & (x >= 0)).all():
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


def _parquet_metadata(p: Any) -> pq.FileMetaData:
    src = storage.parquet_source(p)
    if isinstance(src, str):
        return pq.read_metadata(src)
    with src:
        return pq.read_metadata(src)


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
