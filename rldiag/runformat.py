"""The run format: everything about a run directory that more than one part of rldiag reads or writes.

This module is the one home of the on-disk layout. The recorder and its writer create runs with it, the
reader (:mod:`rldiag.analysis.io`), the alert follower, the dashboard and the importers read them with it;
``docs/run-format.md`` describes the same things in prose. It imports only the standard library and
:mod:`rldiag.config`, so any layer may use it.

A run directory holds::

    manifest.json            created once by the first writer, never rewritten (MANIFEST_NAME)
    writers/<writer>.json    one per writer process: rank, host, pid, start, config, closed (WRITERS_DIR)
    stats/<writer>-<seg>.parquet    statistics rows of one published segment (STATS_DIR)
    tokens/<writer>-<seg>.parquet   token rows of the same segment, when any were written (TOKENS_DIR)
    scalars/<writer>-<n>.parquet    custom scalars logged with Recorder.log (SCALARS_DIR; rldiag.record.scalars)
    alerts.jsonl             alert events, one JSON object a line, append-only (ALERTS_FILE; local runs)
    alerts/<source>-<n>.jsonl    the same events on object storage, each object rewritten whole (ALERTS_DIR)
    tokenizer/               optional tokenizer saved with the run (TOKENIZER_DIR)
    .rldiag-index/           the reader's cache of merged statistics (INDEX_DIR; may be deleted)

Every file is written under a temporary name (``.<name>.<pid>.tmp``) in the same folder and renamed into
place when complete, so a reader that lists ``*.parquet`` never sees half a file; writers never share a
file name, so ranks and restarts need no locks.

>>> segment_name("r00000-host-12-abc", 3)
'r00000-host-12-abc-000003.parquet'
>>> is_published("r00000-host-12-abc-000003.parquet"), is_published(".x.parquet.12.tmp")
(True, False)
>>> run_status(closed=False, last_data_time=100.0, now=800.0, stall_seconds=600.0)
'stalled'
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from rldiag import __version__, storage
from rldiag.config import RecorderConfig

__all__ = [
    "SCHEMA_VERSION",
    "PARQUET_META_KEY",
    "SUMMARY_META_KEY",
    "SUMMARY_MAX_BYTES",
    "RunFormatWarning",
    "MANIFEST_NAME",
    "WRITERS_DIR",
    "STATS_DIR",
    "TOKENS_DIR",
    "SCALARS_DIR",
    "ALERTS_FILE",
    "ALERTS_DIR",
    "AlertHistoryObjects",
    "alert_source_id",
    "alerts_signature",
    "is_tmp_name",
    "LIVE_DIR",
    "LIVE_META_KEY",
    "LIVE_MAX_BYTES",
    "TOKENIZER_DIR",
    "INDEX_DIR",
    "TMP_SUFFIX",
    "SEGMENT_SUFFIX",
    "STALL_SECONDS",
    "TMP_GRACE_SECONDS",
    "RunFormatError",
    "WriterInfo",
    "writer_id",
    "segment_name",
    "is_published",
    "published_files",
    "tmp_path",
    "atomic_write_bytes",
    "is_run_dir",
    "create_run_dir",
    "read_manifest",
    "write_writer_file",
    "read_writer_file",
    "read_writers",
    "latest_writers",
    "run_closed",
    "newest_data_time",
    "run_status",
    "file_metadata",
    "read_file_metadata",
    "read_alerts",
    "ALERT_KEYS",
    "parse_segment_name",
    "AttemptData",
    "Resume",
    "resolve_attempts",
]

# --- versions and names ------------------------------------------------------------------------------
SCHEMA_VERSION: Final[int] = 1
"""Version of the on-disk run format. Readers refuse runs with a newer version."""
PARQUET_META_KEY: Final = b"rldiag"
"""Key of the JSON blob (schema version, rldiag version, writer, rank, config) in every Parquet file's metadata."""
SUMMARY_META_KEY: Final = b"rldiag.summary"
"""Key, in a statistics segment's Parquet metadata, of its write-time summary: the segment's records merged per
step, with the keys of the records each step holds, as Arrow IPC bytes. A reader folds it instead of reading the
records (the same numbers, bit for bit); a segment without one (older rldiag, too large) is read record by record."""
SUMMARY_MAX_BYTES: Final = 16 * 2**20
"""A summary larger than this is not written (the segment's footer stays small; readers read the records)."""
MANIFEST_NAME: Final = "manifest.json"
"""Run-level manifest: created by the first writer, never rewritten."""
WRITERS_DIR: Final = "writers"
"""One JSON file per writer process: ``writers/r<rank>-<host>-<pid>-<start>.json``."""
STATS_DIR: Final = "stats"
"""Statistics segments: one row per record (step, rank, micro)."""
TOKENS_DIR: Final = "tokens"
"""Token-row segments (the same names as their statistics segments)."""
SCALARS_DIR: Final = "scalars"
"""Custom scalars (``Recorder.log``): ``scalars/<writer>-<n>.parquet``, published whole by the writer thread."""
ALERTS_FILE: Final = "alerts.jsonl"
"""Alert events of the run, one JSON object per line (``Notification.to_json``), append-only."""
ALERTS_DIR: Final = "alerts"
"""Alert history where files cannot be appended to (object storage): ``alerts/<source>-<n>.jsonl``, one
object per evaluator process (``<source>``: :func:`alert_source_id`), each rewritten whole with every event
of that process so far (:class:`AlertHistoryObjects`); :func:`read_alerts` reads it with ``alerts.jsonl``."""
TOKENIZER_DIR: Final = "tokenizer"
"""Optional: a transformers tokenizer saved in the run (``tokenizer.save_pretrained``); the dashboard decodes
token ids with it when no ``--tokenizer`` is given."""
INDEX_DIR: Final = ".rldiag-index"
"""The reader's index of merged statistics (a cache: deleting it only costs a slower next open)."""
TMP_SUFFIX: Final = ".tmp"
"""Files are written under this suffix and renamed into place when closed."""
SEGMENT_SUFFIX: Final = ".parquet"
"""Suffix of a published segment; readers list only these."""
TMP_GRACE_SECONDS: Final[float] = 3600.0
"""A temporary file older than this is left over from a write that never finished (a writer renames its
temporary file within seconds): ``rldiag info`` lists it, ``rldiag info --repair`` removes it."""
STALL_SECONDS: Final[float] = 600.0
"""A run that is open and has had no new data for this long is *stalled* (docs/alerts.md)."""

MAX_MANIFEST_BYTES: Final = 1 << 20
"""A manifest or writer file larger than this is refused (they are a few hundred bytes)."""
MAX_ALERT_LINE_BYTES: Final = 1 << 20
"""A line of ``alerts.jsonl`` longer than this is skipped."""
_RUN_ENTRIES: Final = frozenset(
    {MANIFEST_NAME, STATS_DIR, TOKENS_DIR, SCALARS_DIR, WRITERS_DIR, ALERTS_FILE, ALERTS_DIR, TOKENIZER_DIR}
)


class RunFormatWarning(UserWarning):
    """A file of a run was skipped or a run's files disagree; the message names the file."""


class RunFormatError(ValueError):
    """A file of a run is not what the run format says; the message names the file and the problem."""

    def __init__(self, message: str, path: storage.Location | None = None) -> None:
        super().__init__(message)
        self.path = path
        """The file, when one is to blame."""


# --- names and atomic files ----------------------------------------------------------------------------
def writer_id(rank: int, start_ns: int | None = None) -> str:
    """Unique name of a writer process: ``r<rank>-<host>-<pid>-<start>``."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    start = time.time_ns() if start_ns is None else start_ns
    return f"r{rank:05d}-{host}-{os.getpid()}-{start:x}"


def earlier_attempts(path: storage.Location, rank: int, wid: str) -> bool:
    """Whether the run at ``path`` holds a writer file of ``rank`` besides writer ``wid``'s: the job that writer
    belongs to was restarted (a later attempt of the rank). Reads names only."""
    prefix = f"r{rank:05d}-"
    return any(
        e.name.startswith(prefix) and e.name.endswith(".json") and e.name != f"{wid}.json"
        for e in storage.list_files(storage.location(path) / WRITERS_DIR)
    )


def segment_name(wid: str, seg: int) -> str:
    """File name of segment ``seg`` of writer ``wid`` (the same in ``stats/`` and ``tokens/``)."""
    return f"{wid}-{seg:06d}{SEGMENT_SUFFIX}"


def is_published(name: str) -> bool:
    """Whether a file name is a published segment (not a temporary or hidden file)."""
    return name.endswith(SEGMENT_SUFFIX) and not name.startswith(".")


def published_files(folder: Path) -> list[Path]:
    """The published segments of ``stats/`` or ``tokens/``, sorted by name (empty when the folder is absent);
    regular files only (:func:`rldiag.storage.list_files`; one listing request on object storage)."""
    return [e.path for e in storage.list_files(storage.location(folder)) if is_published(e.name)]  # type: ignore[misc]


def is_tmp_name(name: str) -> bool:
    """Whether a file name is a temporary file of a writer (``.<name>[.<pid>].tmp``): never read, removed by
    ``rldiag info --repair`` once older than its grace period."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: storage.Location, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and ``os.replace`` (on object storage:
    one whole-object write)."""
    if storage.is_remote(path):
        storage.write_whole(path, data)
        return
    path = cast(Path, path)  # a local path from here on
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- manifest ----------------------------------------------------------------------------------------
def is_run_dir(path: storage.Location) -> bool:
    """Whether ``path`` is a run directory (it has a manifest)."""
    return (storage.location(path) / MANIFEST_NAME).is_file()


def _read_small_json(path: storage.Location, what: str) -> Any:
    raw = storage.read_limited(path, MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RunFormatError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not an rldiag {what}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"{path} is corrupt ({exc}); restore it from a copy of the run") from None


def create_run_dir(path: storage.Location, cfg: RecorderConfig, world_size: int, name: str | None) -> dict[str, Any]:
    """Create the run directory and its manifest if absent; return the manifest in force.

    Idempotent and safe when many processes (the ranks of one job) do it at once: the manifest is written to
    a private temporary file and hard-linked into place, so exactly one wins and the others read the winner's
    (complete) file. A directory that exists and holds something other than an rldiag run is refused.
    """
    path = storage.location(path)
    if path.exists() and not path.is_dir():
        raise RunFormatError(f"run directory {path} exists and is a file; choose another path")
    manifest_path = path / MANIFEST_NAME
    if path.is_dir() and not manifest_path.exists():
        # the run's own entries are allowed: another rank may be creating the same run right now
        foreign = [p.name for p in path.iterdir() if p.name not in _RUN_ENTRIES and not p.name.startswith(".")]
        if foreign:
            raise RunFormatError(
                f"{path} is not empty and is not an rldiag run (found {', '.join(sorted(foreign)[:5])}); "
                "give the recorder an empty or new directory"
            )
    for sub in (STATS_DIR, TOKENS_DIR, WRITERS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "rldiag_version": __version__,
            "created": time.time(),
            "name": name or path.resolve().name,
            "world_size": world_size,
            "config": cfg.to_dict(),
        }
        _publish_once(manifest_path, json.dumps(manifest, indent=2).encode())
    for _ in range(40):
        try:
            return read_manifest(path)
        except RunFormatError:
            # only where hard links are missing can another rank's manifest be seen while it is written
            if time.time() - manifest_path.stat().st_mtime > 2.0:
                raise
            time.sleep(0.05)
    return read_manifest(path)


def _publish_once(final: storage.Location, data: bytes) -> None:
    """Put ``data`` at ``final`` unless a file is already there; never exposes a partial file."""
    if storage.is_remote(final):
        storage.write_once(final, data)
        return
    final = cast(Path, final)  # a local path from here on
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # atomic, and fails if another process won the race
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create of the whole file
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: storage.Location) -> dict[str, Any]:
    """The manifest of a run, validated; a clear error for a missing, corrupt or newer one."""
    manifest_path = storage.location(path) / MANIFEST_NAME
    try:
        manifest = _read_small_json(manifest_path, "manifest")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is not an rldiag run: {MANIFEST_NAME} is missing (record into it with rldiag.Recorder, "
            "or build one with `rldiag import`)"
        ) from None
    if not isinstance(manifest, dict):
        raise RunFormatError(
            f"{manifest_path} is a JSON {type(manifest).__name__}, not an object; it was not written by rldiag"
        )
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunFormatError(f"{manifest_path} has no integer schema_version; it was not written by rldiag")
    if version > SCHEMA_VERSION:
        raise RunFormatError(
            f"{path} was written with run-format version {version} by rldiag {manifest.get('rldiag_version')}, "
            f"newer than this rldiag {__version__} reads (version {SCHEMA_VERSION}); upgrade rldiag"
        )
    if "config" in manifest and not isinstance(manifest["config"], dict):
        raise RunFormatError(f"{manifest_path}: 'config' is a {type(manifest['config']).__name__}, not an object")
    return manifest


# --- writer files --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriterInfo:
    """One ``writers/<writer>.json``: a writer process of the run (a resume point)."""

    path: storage.Location
    writer: str
    rank: int
    started: float
    """Start time (Unix seconds); the latest writer of a rank is the one that started last."""
    closed: float | None
    """When ``Recorder.close()`` ran (Unix seconds), None while open or after a crash."""
    host: str | None = None
    pid: int | None = None
    world_size: int | None = None
    first_step: int | None = None
    config: dict[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The file's whole JSON object (fields a newer rldiag may add)."""

    def records_not_published(self) -> tuple[int, int]:
        """From the file's ``counters``: (records the writer gave up because nothing could be written for too
        long, records it still held when a signal's wait for it ran out). 0 where absent or not a count."""
        counters = self.raw.get("counters")
        if not isinstance(counters, Mapping):
            return 0, 0

        def count(key: str) -> int:
            v = counters.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

        return count("records_lost"), count("unpublished_at_signal")

    def process_gone(self) -> bool:
        """True when the writer ran on this machine and its process no longer exists.

        Writers on other hosts cannot be checked (False), nor can this very process's own recorder.
        """
        if self.host != os.uname().nodename or self.pid is None or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, OSError):
            return False
        return False


def write_writer_file(path: storage.Location, wid: str, info: dict[str, Any]) -> None:
    """Publish (or replace) ``writers/<wid>.json`` of the run at ``path``."""
    atomic_write_bytes(storage.location(path) / WRITERS_DIR / f"{wid}.json", json.dumps(info, indent=2).encode())


def _int(
    d: Mapping[str, Any], key: str, *, lo: int, hi: int, where: storage.Location, required: bool = False
) -> int | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not (lo <= v <= hi):
        raise RunFormatError(f"{where}: {key!r} must be an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _time(d: Mapping[str, Any], key: str, *, where: storage.Location) -> float | None:
    v = d.get(key)
    if v is None or v is False:
        return None
    if v is True:
        return 0.0  # an old or hand-written ``"closed": true``
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    raise RunFormatError(f"{where}: {key!r} must be a time in seconds or null, got {v!r:.60}")


def read_writer_file(p: storage.Location) -> WriterInfo:
    """Parse one writer file; :class:`RunFormatError` names the file and what is wrong with it."""
    p = storage.location(p)
    d = _read_small_json(p, "writer file")
    if not isinstance(d, dict):
        raise RunFormatError(f"{p} is a JSON {type(d).__name__}, not an object")
    cfg = d.get("config")
    if cfg is not None and not isinstance(cfg, dict):
        raise RunFormatError(f"{p}: 'config' is a {type(cfg).__name__}, not an object")
    for key in ("writer", "host"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise RunFormatError(f"{p}: {key!r} must be a string, got {d[key]!r:.60}")
    rank = _int(d, "rank", lo=0, hi=2**31 - 1, where=p)
    return WriterInfo(
        path=p,
        writer=d.get("writer") or p.stem,
        rank=0 if rank is None else rank,
        started=_time(d, "started", where=p) or 0.0,
        closed=_time(d, "closed", where=p),
        host=d.get("host"),
        pid=_int(d, "pid", lo=0, hi=2**63 - 1, where=p),
        world_size=_int(d, "world_size", lo=0, hi=2**31 - 1, where=p),
        first_step=_int(d, "first_step", lo=-(2**63), hi=2**63 - 1, where=p),
        config=cfg,
        raw=d,
    )


def read_writers(path: storage.Location) -> tuple[list[WriterInfo], list[RunFormatError]]:
    """Every readable writer file of the run at ``path`` (sorted by name) and the problems of the others."""
    infos: list[WriterInfo] = []
    problems: list[RunFormatError] = []
    for p in [
        e.path
        for e in storage.list_files(storage.location(path) / WRITERS_DIR)
        if e.name.endswith(".json") and not e.name.startswith(".")
    ]:
        try:
            infos.append(read_writer_file(p))
        except FileNotFoundError:
            continue  # replaced or removed while listing
        except (RunFormatError, OSError) as exc:
            problems.append(RunFormatError(str(exc) if isinstance(exc, RunFormatError) else f"{p}: {exc}", path=p))
    return infos, problems


def latest_writers(infos: Iterable[WriterInfo]) -> dict[int, WriterInfo]:
    """The most recent writer of each rank (by start time; a restart supersedes the crashed writer)."""
    latest: dict[int, WriterInfo] = {}
    for info in infos:
        if info.rank not in latest or info.started >= latest[info.rank].started:
            latest[info.rank] = info
    return latest


# --- the closed and stalled rules, newest data ------------------------------------------------------------
def run_closed(path: storage.Location, *, count_gone: bool = False) -> bool:
    """Whether the run at ``path`` ended: for every rank, its latest writer recorded ``closed``.

    ``count_gone``: also count a writer whose process is gone from this machine as ended (a crash or a kill
    leaves no ``closed`` mark). The dashboard uses it so a finished sample run is not shown as stalled
    forever; the alert follower does not, so a crashed training still raises its stall alert. A run with
    no readable writer file is open.
    """
    latest = latest_writers(read_writers(path)[0])
    if not latest:
        return False
    return all(w.closed is not None or (count_gone and w.process_gone()) for w in latest.values())


def last_step_per_rank(run: Any) -> dict[int, int]:
    """The newest step of every rank of an opened run (:func:`rldiag.open_run`), in its published segments or, on
    a local run, its live tail (the records a writer has taken and not yet published, rewritten every
    ``live_seconds``): a rank writes its steps in order, so every record of an older step is in one or the
    other."""
    return dict(run.last_step_per_rank())


def complete_steps(run: Any, *, after: int | None, closed: bool) -> list[int]:
    """Steps newer than ``after`` whose statistics are complete on every rank (all of them once closed): what a
    follower of a growing run (the alerts' :class:`rldiag.alerts.follow.RunFollower`, ``rldiag export --follow``,
    a multi-rank recorder's live export) may evaluate or write without ever seeing part of a step. ``run``: an
    opened run (:func:`rldiag.open_run`)."""
    steps = [s for s in run.steps() if after is None or s > after]
    if not steps or closed:
        return steps
    last = last_step_per_rank(run)
    world = int(run.manifest.get("world_size") or 1) if isinstance(getattr(run, "manifest", None), dict) else 1
    if len(last) < world:
        return []  # a rank has not published anything yet
    bound = min(last.values())
    return [s for s in steps if s < bound]


RANKS_CLOSE_WAIT: Final = 2.5
"""Seconds a follower drained without a timeout (a signal stopped the job) waits for the other ranks' writers to
close (:func:`read_until_closed`)."""


def read_until_closed(read: Callable[[], bool], path: storage.Location, until: float) -> None:
    """Call ``read`` (one reading of the run at ``path``, True once it found every rank's writer closed) until it
    returns True or ``time.monotonic()`` passes ``until``: what a follower of a multi-rank run (rank 0's alerts
    and live export) does when a signal stops the job, while the other ranks, signalled too, publish and mark
    their writers closed; only then is the run's last step complete. Again every 0.1 s, every 0.5 s on object
    storage (each reading costs requests)."""
    while not read() and time.monotonic() < until:
        time.sleep(0.5 if storage.is_remote(path) else 0.1)


LIVE_DIR = "live"
"""``live/<writer>.parquet``: the statistics rows a writer holds but has not published in a segment yet,
rewritten (atomically) at most every ``live_seconds``, removed once they are in a segment."""
LIVE_META_KEY = b"rldiag.live"
"""Metadata of a live tail: ``{"writer": ..., "segment": N}``, the segment its rows will be published in."""
LIVE_MAX_BYTES = 4 * 2**20
"""A writer holding more unpublished statistics than this publishes a segment (bounds the live rewrite)."""


def newest_data_time(path: storage.Location) -> float | None:
    """When data last landed: modification time of the newest published statistics segment or live tail
    (None before any).

    Statistics are what every metric and alert is computed from, and a segment's statistics file is
    published after its token file, so token files need not be looked at.
    """
    newest: float | None = None
    for folder in (STATS_DIR, LIVE_DIR):  # a live tail is newer data than the last segment
        try:
            entries = storage.list_files(storage.location(path) / folder)
        except OSError:
            continue
        times = [e.mtime for e in entries if is_published(e.name)]
        if times:
            newest = max(times) if newest is None else max(newest, max(times))
    return newest


def run_status(
    *, closed: bool, last_data_time: float | None, now: float, stall_seconds: float = STALL_SECONDS
) -> Literal["finished", "live", "stalled"]:
    """``finished`` when closed, ``stalled`` when open with no new data for ``stall_seconds``, else ``live``."""
    if closed:
        return "finished"
    if last_data_time is not None and now - last_data_time > stall_seconds:
        return "stalled"
    return "live"


# --- Parquet file metadata -----------------------------------------------------------------------------
def file_metadata(wid: str, rank: int, cfg: RecorderConfig) -> dict[bytes, bytes]:
    """The schema metadata every Parquet segment of writer ``wid`` carries (makes the file self-describing)."""
    blob = {
        "schema_version": SCHEMA_VERSION,
        "rldiag_version": __version__,
        "writer": wid,
        "rank": rank,
        "config": cfg.to_dict(),
    }
    return {PARQUET_META_KEY: json.dumps(blob).encode()}


def read_file_metadata(metadata: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The rldiag metadata of a Parquet file (``{}`` when absent), checked: a newer format version, a blob
    that is not a JSON object or a ``config`` that is not one raise :class:`RunFormatError`."""
    raw = (metadata or {}).get(PARQUET_META_KEY)
    if raw is None:
        return {}
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RunFormatError(f"rldiag metadata of {len(raw)} bytes is larger than {MAX_MANIFEST_BYTES}")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"rldiag metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise RunFormatError(f"rldiag metadata is a JSON {type(meta).__name__}, not an object")
    version = meta.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RunFormatError(f"rldiag metadata has a non-integer schema_version {version!r:.60}")
    if version > SCHEMA_VERSION:
        raise RunFormatError(f"written with run-format version {version}, newer than {SCHEMA_VERSION}")
    cfg = meta.get("config")
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise RunFormatError(f"metadata 'config' is a {type(cfg).__name__}, not an object")
        try:
            RecorderConfig.from_dict(cfg)  # odd settings make this one file unusable, not the run
        except (TypeError, ValueError) as exc:
            raise RunFormatError(f"metadata 'config' is not a valid RecorderConfig ({exc})") from None
    return meta


# --- alert history: alerts.jsonl (local) and alerts/<source>-<n>.jsonl (object storage) -------------------
ALERT_KEYS: Final = frozenset({"event", "rule", "fingerprint", "step"})
"""Keys every event of ``alerts.jsonl`` has (``rldiag.alerts.engine.Notification.to_json`` writes them)."""
MAX_ALERT_OBJECT_BYTES: Final = 64 << 20
"""An object of ``alerts/`` larger than this is skipped (one holds at most :data:`ALERT_OBJECT_ROLL_BYTES`)."""
ALERT_OBJECT_ROLL_BYTES: Final = 256 << 10
"""An evaluator starts its next ``alerts/<source>-<n>.jsonl`` once the current one holds this much, so each
event rewrites a bounded object."""
_ALERT_OBJECT_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,200}\.jsonl$")


def alert_source_id(kind: str = "alerts") -> str:
    """A name for the alert history of one evaluator process: ``<kind>-<host>-<pid>-<start ns, hex>`` (unique
    per process, like a writer id, so no two processes ever write the same object)."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    kind = re.sub(r"[^A-Za-z0-9_.]", "_", kind)[:20] or "alerts"
    return f"{kind}-{host}-{os.getpid()}-{time.time_ns():x}"


class AlertHistoryObjects:
    """The alert history of one evaluator on a store that cannot append (object storage).

    Each :meth:`append` rewrites ``alerts/<source>-<n>.jsonl`` whole (one PUT) with every event this object
    holds, so a reader sees a whole object or the previous one, never part of a line; after
    :data:`ALERT_OBJECT_ROLL_BYTES` the next event starts object ``n + 1``. A restarted evaluator has another
    ``source``, so it never overwrites what the process before it wrote; it reads that history with
    :func:`read_alerts` and does not notify it again.

    >>> h = AlertHistoryObjects(Path("runs/exp1"), "alerts-host-1-a")     # doctest: +SKIP
    >>> h.append({"event": "firing", "rule": "kl_spike", "fingerprint": "f", "step": 3})  # doctest: +SKIP
    """

    def __init__(
        self, run_dir: storage.Location, source: str | None = None, *, roll_bytes: int = ALERT_OBJECT_ROLL_BYTES
    ) -> None:
        self.folder = storage.location(run_dir) / ALERTS_DIR
        self.source = source or alert_source_id()
        if not _ALERT_OBJECT_RE.match(self.source + ".jsonl"):
            raise ValueError(f"alert history source {self.source!r}: use letters, digits, '_', '.' and '-' only")
        self.roll_bytes = int(roll_bytes)
        self.part = 0
        self._lines: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()

    @property
    def path(self) -> storage.Location:
        """The object the next event goes to."""
        return self.folder / f"{self.source}-{self.part:04d}.jsonl"

    def append(self, event: Mapping[str, Any]) -> None:
        """Add one event (a ``Notification.to_json`` dict) and publish the current object whole."""
        line = (json.dumps(dict(event), separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            if self._lines and self._size + len(line) > self.roll_bytes:
                self.part += 1
                self._lines, self._size = [], 0
            self._lines.append(line)
            self._size += len(line)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)  # a prefix on object storage: nothing to do
                storage.write_whole(self.path, b"".join(self._lines))
            except BaseException:
                self._lines.pop()  # not published: the next append must not carry it as if it were
                self._size -= len(line)
                raise


def _parse_alert_lines(lines: Iterable[bytes], out: list[dict[str, Any]]) -> None:
    for raw in lines:
        if len(raw) > MAX_ALERT_LINE_BYTES:
            continue
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(d, dict) and ALERT_KEYS <= d.keys():
            out.append(d)


def _alert_objects(run_dir: storage.Location) -> list[storage.Entry]:
    return [
        e
        for e in storage.list_files(storage.location(run_dir) / ALERTS_DIR)
        if _ALERT_OBJECT_RE.match(e.name) and not e.name.startswith(".")
    ]


def _event_time(ev: Mapping[str, Any]) -> float:
    t = ev.get("time")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t)
    return -math.inf


def read_alerts(path: storage.Location) -> list[dict[str, Any]]:
    """The alert events of a run, oldest first (``[]`` when there are none).

    ``path`` is the run's ``alerts.jsonl`` (``run_dir / ALERTS_FILE``; any other file is read alone). Both
    layouts are read: the appended ``alerts.jsonl`` of a local run (and of runs recorded before the objects
    existed), and the objects ``alerts/*.jsonl`` an evaluator writes on object storage; events from several
    sources are merged by their ``time`` (the order within a source is kept). A torn last line (a writer
    mid-append), a line that is not a JSON object with :data:`ALERT_KEYS`, an over-long line and an
    over-large object are skipped.
    """
    out: list[dict[str, Any]] = []
    path = storage.location(path)
    try:
        fh = storage.open_binary(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    else:
        with fh:
            _parse_alert_lines(fh, out)
    if path.name != ALERTS_FILE:
        return out
    objects = _alert_objects(path.parent)
    if not objects:
        return out  # a local run: alerts.jsonl alone, in file order
    for e in objects:
        if e.size > MAX_ALERT_OBJECT_BYTES:
            continue
        try:
            raw = storage.read_limited(e.path, MAX_ALERT_OBJECT_BYTES + 1)
        except (FileNotFoundError, OSError):
            continue
        _parse_alert_lines(raw.splitlines(keepends=True), out)
    return sorted(out, key=_event_time)  # stable: each source's own order is kept among equal times


def alert_history_name(run_dir: storage.Location | str) -> str:
    """The name of the run's alert history in its folder, for messages: ``alerts.jsonl`` on a local run, the
    objects ``alerts/`` on object storage (where files cannot be appended; :func:`read_alerts` reads both)."""
    return ALERTS_FILE if isinstance(storage.location(run_dir), Path) else f"{ALERTS_DIR}/"


def alert_history_where(run_dir: storage.Location | str) -> str:
    """The run's alert history with the run's location: ``RUN/alerts.jsonl``, or ``s3://.../RUN/alerts/``."""
    return f"{storage.location(run_dir)}/{alert_history_name(run_dir)}"


def alerts_signature(run_dir: storage.Location) -> tuple[tuple[str, int, float], ...]:
    """What changes when the run's alert history changes: name, size and time of ``alerts.jsonl`` and of the
    objects in ``alerts/`` (``()`` when the run has no history). One listing of the run folder, plus one of
    ``alerts/`` when it exists (the cost of a dashboard tick on object storage)."""
    files, subs = storage.list_folders(storage.location(run_dir))
    sig = [(e.name, e.size, e.mtime) for e in files if e.name == ALERTS_FILE]
    if ALERTS_DIR in subs:
        sig += [(e.name, e.size, e.mtime) for e in _alert_objects(run_dir)]
    return tuple(sig)


# --- restarts: which records of a rank survive ---------------------------------------------------------
_SEGMENT_RE: Final = re.compile(r"^(r(\d{1,10})-(.+)-(\d{1,19})-([0-9a-f]{1,20}))-(\d{6,})\.parquet$")


def parse_segment_name(name: str) -> tuple[str, int, int] | None:
    """``(writer, rank, start_ns)`` of a segment named by :func:`segment_name` (None for any other name).

    The writer id ``r<rank>-<host>-<pid>-<start>`` identifies one *attempt* of a rank: a process that
    recorded it from its start until it closed, crashed or was killed. ``start`` (hex nanoseconds) orders
    the attempts of a rank.
    """
    m = _SEGMENT_RE.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), int(m.group(5), 16)


@dataclass(frozen=True)
class AttemptData:
    """What the published segments of one attempt hold (the input of :func:`resolve_attempts`)."""

    writer: str
    rank: int
    start_ns: int
    first_step: int | None
    last_step: int | None
    last_publish: float | None = None
    """Modification time (Unix seconds) of its newest published statistics segment."""


@dataclass
class Resume:
    """How the attempts of each rank combine (resume semantics, like TensorBoard's ``purge_step``).

    Per rank, a later attempt supersedes the earlier attempts' records from its first step on: a record of
    writer ``w`` at step ``s`` counts only when ``s < cutoff[w]``. Superseded records stay on disk.
    """

    cutoff: dict[str, int] = field(default_factory=dict)
    """writer -> the first step of its records that later attempts superseded (absent: none superseded)."""
    superseded: list[dict[str, Any]] = field(default_factory=list)
    """``{rank, writer, from_step, to_step, by}``: records on disk that no metric counts."""
    gaps: list[dict[str, Any]] = field(default_factory=list)
    """``{rank, from_step, to_step, writer}``: a restart later than where the rank stopped left these steps out."""
    restarts: list[dict[str, Any]] = field(default_factory=list)
    """``{rank, step, writer, started}``: each attempt of a rank after its first (by start time), at its first
    step: where a restarted job resumed, and when that attempt started (seconds since the epoch)."""
    problems: list[str] = field(default_factory=list)
    """Two writers of one rank live at once, and similar: reported, never silently merged."""

    def restart_keys(self) -> tuple[tuple[int, int, str], ...]:
        """(rank, step, writer) of each restart: what a reader compares to see that a restart happened since."""
        return tuple((int(r["rank"]), int(r["step"]), str(r["writer"])) for r in self.restarts)

    def restarted_ranks(self) -> dict[int, list[int]]:
        """Step -> the ranks restarted at that step (sorted), in step order."""
        by_step: dict[int, list[int]] = {}
        for r in self.restarts:
            by_step.setdefault(int(r["step"]), []).append(int(r["rank"]))
        return {step: sorted(ranks) for step, ranks in sorted(by_step.items())}

    def superseded_alert(self, event: Mapping[str, Any]) -> bool:
        """Whether an alert event (a line of ``alerts.jsonl``) was computed from records a restart replaced: an
        event of a metric rule at or after a restart's step, notified before that restart's attempt started.
        It stays in the history file and counts nowhere, like those records; if the resumed attempt's records
        reproduce it, its evaluator records it again (``record_only``, notified once). Stalled-run events
        describe the process, not its records, and always count. Times are each host's clock."""
        if event.get("metric") is None:
            return False
        try:
            step, t = int(event["step"]), float(event["time"])
        except (KeyError, TypeError, ValueError):
            return False
        return any(
            step >= int(r["step"]) and r.get("started") is not None and t < float(r["started"]) for r in self.restarts
        )

    def gap_ranges(self) -> list[tuple[int, int]]:
        """(first, last) step of each range a restart left without data for some rank (:attr:`gaps`)."""
        return [(int(g["from_step"]), int(g["to_step"])) for g in self.gaps]

    def describe(self, limit: int | None = None) -> list[str]:
        """Each restart (``step 6 (rank 0)``, the ranks restarted at one step together) and each gap (``steps
        0..5 hold no data (rank 0)``, the ranks that lost the same steps together), for people: the dashboard's
        Overview, ``rldiag summarize``, the report. With ``limit``, at most that many, then ``and N more (rldiag
        info lists them)``: a job preempted every hour on 64 ranks would otherwise fill the screen."""
        out = [f"step {step} ({ranks_text(ranks)})" for step, ranks in self.restarted_ranks().items()]
        lost: dict[tuple[int, int], list[int]] = {}
        for g in self.gaps:
            lost.setdefault((int(g["from_step"]), int(g["to_step"])), []).append(int(g["rank"]))
        out += [f"steps {a}..{b} hold no data ({ranks_text(sorted(ranks))})" for (a, b), ranks in sorted(lost.items())]
        if limit is not None and len(out) > limit:
            out = [*out[:limit], f"and {len(out) - limit} more (rldiag info lists them)"]
        return out


def ranks_text(ranks: Sequence[int]) -> str:
    """Ranks for people: ``rank 0, 3`` for up to three, else ``8 ranks``."""
    return f"rank {', '.join(map(str, ranks))}" if len(ranks) <= 3 else f"{len(ranks)} ranks"


def gap_breaks(steps: Sequence[float], gaps: Iterable[tuple[int, int]]) -> list[int]:
    """Indices ``i`` of the sorted ``steps`` drawn (integer steps) after which a line breaks: a step of some gap
    (``(first, last)``, :meth:`Resume.gap_ranges`) lies strictly between ``steps[i]`` and ``steps[i + 1]``. A gap
    of one rank that other ranks' steps fill breaks nothing between those steps. The dashboard's line panels,
    its Ranks page and the report draw restarts with it.

    >>> gap_breaks([0, 1, 2, 3, 6, 7], [(4, 5)]), gap_breaks([3, 4, 5, 6], [(4, 5)]), gap_breaks([0, 9], [(4, 5)])
    ([3], [], [0])
    """
    n = len(steps)
    out: set[int] = set()
    for first, last in gaps:
        # candidates: steps[i] < last and steps[i + 1] > first
        for i in range(max(bisect.bisect_right(steps, first) - 1, 0), min(bisect.bisect_left(steps, last), n - 1)):
            if max(first, math.floor(steps[i]) + 1) <= min(last, math.ceil(steps[i + 1]) - 1):
                out.add(i)
    return sorted(out)


def _alive_here(info: WriterInfo) -> bool:
    if info.host != os.uname().nodename or info.pid is None:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def resolve_attempts(data: Iterable[AttemptData], writers: Iterable[WriterInfo] = ()) -> Resume:
    """Apply the resume rule to every rank's attempts.

    ``data``: the published records of each attempt; ``writers``: the writer files, whose ``first_step`` is
    a resume point even before the attempt published anything. Attempts are ordered by their start time.
    An attempt starts at its smallest recorded step; it supersedes the earlier attempts' records from there
    on. Two attempts of a rank were live at once when the earlier one published a segment after the later one
    started, or when both writer files are open and both processes run on this machine: that is a problem.
    """
    by_writer: dict[str, dict[str, Any]] = {}
    for d in data:
        by_writer[d.writer] = {
            "rank": d.rank,
            "start": d.start_ns / 1e9,
            "first": d.first_step,
            "last": d.last_step,
            "published": d.last_publish,
            "info": None,
        }
    for w in writers:
        e = by_writer.setdefault(
            w.writer, {"rank": w.rank, "start": w.started, "first": None, "last": None, "published": None, "info": None}
        )
        e["info"] = w
        if w.first_step is not None:
            e["first"] = w.first_step if e["first"] is None else min(e["first"], w.first_step)
    out = Resume()
    ranks: dict[int, list[tuple[float, str]]] = {}
    for wid, e in by_writer.items():
        ranks.setdefault(e["rank"], []).append((e["start"], wid))
    for rank in sorted(ranks):
        order = [wid for _, wid in sorted(ranks[rank])]
        bound: int | None = None  # smallest first step of the attempts after the current one
        for wid in reversed(order):
            e = by_writer[wid]
            if bound is not None:
                out.cutoff[wid] = bound
                if e["last"] is not None and e["last"] >= bound:
                    later = min(
                        (w for w in order[order.index(wid) + 1 :] if by_writer[w]["first"] == bound), key=order.index
                    )
                    out.superseded.append(
                        {
                            "rank": rank,
                            "writer": wid,
                            "from_step": max(bound, e["first"]),
                            "to_step": e["last"],
                            "by": later,
                        }
                    )
            if e["first"] is not None:
                bound = e["first"] if bound is None else min(bound, e["first"])
        reached: int | None = None  # the newest surviving step of the attempts so far
        expect: int | None = None  # the step the next attempt must start at for no step to be missing
        started = False
        for i, wid in enumerate(order):
            e = by_writer[wid]
            if e["first"] is None:
                continue
            if started:
                out.restarts.append({"rank": rank, "step": e["first"], "writer": wid, "started": e["start"]})
            started = True
            if expect is not None and e["first"] > expect:
                out.gaps.append({"rank": rank, "from_step": expect, "to_step": e["first"] - 1, "writer": wid})
            if e["last"] is None:
                # published nothing (killed before its first publish, or still open): its steps hold no data yet,
                # so they are missing unless a later attempt records them again
                expect = e["first"] if expect is None else min(expect, e["first"])
            else:
                cut = out.cutoff.get(wid)
                last = min(e["last"], cut - 1) if cut is not None else e["last"]
                if last >= e["first"]:
                    reached = last if reached is None else max(reached, last)
                if reached is not None:
                    expect = reached + 1
            for later in order[i + 1 :]:
                l_e = by_writer[later]
                both_live = (
                    e["info"] is not None
                    and l_e["info"] is not None
                    and e["info"].closed is None
                    and l_e["info"].closed is None
                    and e["info"].pid != l_e["info"].pid
                    and _alive_here(e["info"])
                    and _alive_here(l_e["info"])
                )
                overlap = e["published"] is not None and e["published"] > l_e["start"]
                if both_live or overlap:
                    why = "both processes are running" if both_live else "the first published after the second started"
                    out.problems.append(
                        f"rank {rank}: two writers were live at once ({wid} and {later}: {why}); the later one's "
                        f"records supersede the earlier one's from its first step on, which may hide data: "
                        "give each process of a job its own rank"
                    )
    return out
