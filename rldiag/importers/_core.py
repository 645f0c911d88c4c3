"""What every importer shares: the error policy, the import report, and a run built in a staging folder.

An importer reads another trainer's files, turns each record into sequences of token values, checks them,
and hands them to :class:`~rldiag.record.recorder.Recorder` (so the statistics come from the one kernel). The
run is written into a hidden staging folder beside the target and renamed into place only when every input
was read: a failure leaves nothing behind and a retry starts clean.

Bad input is handled by one policy (``errors``):

- ``strict`` (default): the first bad value stops the import with one line naming the file, the row (or
  record) and the column: ``rows.csv: row 17 (line 18), column logp: 0.5 is a positive log-probability``.
- ``lenient``: a bad row or record is skipped, a token with a positive log-probability is left out, and each
  is counted by reason in the :class:`ImportReport` (with the first place it happened).

Missing values that a trainer writes on purpose (prime-rl writes ``null`` for a non-finite float) are not
errors: they become NaN, which the statistics count as non-finite, and the report counts them per column.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar

import numpy as np

from rldiag import storage
from rldiag.config import RecorderConfig
from rldiag.storage import one_line

if TYPE_CHECKING:
    from rldiag.record.recorder import Recorder

_T = TypeVar("_T")

ErrorPolicy = Literal["strict", "lenient"]

REPORT_FILE = ".rldiag-import.json"
"""The import report, stored in the run (a hidden file: run readers ignore it)."""
MAX_STEP = 2**62
"""Largest step (and sequence id) accepted: the run format stores them as int64."""
MAX_RANK = 65_535
"""Largest rank accepted."""
MAX_POS = 2**31 - 1
"""Largest position accepted (int32 column)."""
MAX_CELLS = 50_000_000
"""Largest responses x positions grid handed to the recorder in one call."""


class ImportInputError(ValueError):
    """Bad input to an importer; the message names the file, the row or record, and the column."""


@dataclass
class ImportReport:
    """What an import read, wrote and left out. ``tokens`` is exactly the number of token rows in the run."""

    trainer: str
    source: str
    run: str = ""
    errors: ErrorPolicy = "strict"
    rows_read: int = 0
    """Input rows (token files) or records (one per sequence in the trainers' dumps) read."""
    files: int = 0
    sequences: int = 0
    tokens: int = 0
    """Token rows written into the run (valid, trained tokens)."""
    steps: set[int] = field(default_factory=set)
    ranks: set[int] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)
    """Rows/records (or tokens, for token-level reasons) left out in lenient mode, by reason."""
    first: dict[str, str] = field(default_factory=dict)
    """Where each skip reason happened first."""
    missing: Counter[str] = field(default_factory=Counter)
    """Per column: trained tokens whose value was missing (null / NaN) and enters the run as NaN."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Importer-specific facts (e.g. prime-rl's env_name -> stage code mapping, tokens outside the RL stream)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "trainer": self.trainer,
            "source": self.source,
            "run": self.run,
            "errors": self.errors,
            "rows_read": self.rows_read,
            "files": self.files,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "steps": len(self.steps),
            "ranks": sorted(self.ranks),
            "skipped": dict(self.skipped),
            "first": dict(self.first),
            "missing": dict(self.missing),
            "notes": self.notes,
            "imported_at": time.time(),
        }

    def summary(self) -> str:
        """A few human-readable lines: counts, then what was skipped or missing."""
        head = (
            f"imported {self.tokens:,} token rows ({self.sequences:,} sequences, {len(self.steps):,} steps, "
            f"{len(self.ranks) or 1} rank(s)) from {self.rows_read:,} {self._unit()} in {self.files:,} file(s) "
            f"into {self.run}"
        )
        lines = [head]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n:,}: {reason} (first at {self.first.get(reason, '?')})")
        for col, n in sorted(self.missing.items()):
            lines.append(f"  {n:,} token(s) with a missing {col}: stored as NaN, counted as non-finite")
        for key, value in sorted(self.notes.items()):
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)

    def _unit(self) -> str:
        return "rows" if self.trainer == "tokens" else "records"


class Policy:
    """Applies ``errors`` to one problem: raise (strict) or count and go on (lenient)."""

    def __init__(self, errors: ErrorPolicy, report: ImportReport) -> None:
        if errors not in ("strict", "lenient"):
            raise ValueError(f"errors must be 'strict' or 'lenient', got {errors!r}")
        self.errors = errors
        self.report = report

    @property
    def strict(self) -> bool:
        return self.errors == "strict"

    def problem(self, where: str, message: str, reason: str, count: int = 1) -> None:
        """Report a problem at ``where``: raises :class:`ImportInputError` when strict, else counts it."""
        if self.strict:
            raise ImportInputError(f"{where}: {message}")
        self.report.skipped[reason] += count
        self.report.first.setdefault(reason, f"{where}: {message}")


# --- values -------------------------------------------------------------------------------------------
def is_int(v: object) -> TypeGuard[int | np.integer]:
    """A JSON/Python integer (not a bool)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: object) -> TypeGuard[int | float | np.integer | np.floating]:
    """A JSON/Python real number (not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_int(v: object, lo: int, hi: int) -> bool:
    """Whether ``v`` is an integer in [lo, hi]."""
    return is_int(v) and lo <= int(v) <= hi


def short(v: object, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters (a bad value may be a megabyte of digits)."""
    if hasattr(v, "to_list"):  # a polars Series cell (a list column)
        v = v.to_list()
    try:
        text = repr(v) if not (isinstance(v, int) and abs(v) > 10**40) else f"an integer of {len(str(abs(v)))} digits"
    except ValueError:  # int too large to print
        text = "an integer too large to print"
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def float_list(values: object, key: str, where: str) -> np.ndarray:
    """A JSON list of numbers (``None`` for missing: NaN) as float64; raises ImportInputError naming ``key``."""
    if not isinstance(values, list):
        raise ImportInputError(f"{where}, column {key}: must be a list of numbers, got {type(values).__name__}")
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
        elif is_number(v):
            try:
                out[i] = float(v)
            except OverflowError:
                raise ImportInputError(f"{where}, column {key}[{i}]: {short(v)} is too large") from None
        else:
            raise ImportInputError(f"{where}, column {key}[{i}]: {short(v)} is not a number")
    return out


def int_list(values: object, key: str, where: str, lo: int, hi: int) -> np.ndarray:
    """A JSON list of integers in [lo, hi] as int64; raises ImportInputError naming ``key`` and the index."""
    if not isinstance(values, list):
        raise ImportInputError(f"{where}, column {key}: must be a list of integers, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not check_int(v, lo, hi):
            raise ImportInputError(f"{where}, column {key}[{i}]: {short(v)} is not an integer in [{lo}, {hi}]")
    return np.array(values, dtype=np.int64)


def bool_list(values: Any, key: str, where: str) -> np.ndarray:
    """A JSON list of booleans (or 0/1) as bool."""
    if not isinstance(values, list):
        raise ImportInputError(f"{where}, column {key}: must be a list of booleans, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not (isinstance(v, bool) or (is_number(v) and v in (0, 1))):
            raise ImportInputError(f"{where}, column {key}[{i}]: {short(v)} is not a boolean (or 0/1)")
    return np.array(values, dtype=bool)


# --- sequences into a run -------------------------------------------------------------------------------
@dataclass
class Sequence:
    """One response's trained tokens, ready for the recorder. Arrays have one entry per position from the
    first trained token; ``mask`` says which positions are trained (gaps: tool output, the next user turn)."""

    step: int
    rank: int
    mask: np.ndarray
    logp: np.ndarray
    old_logp: np.ndarray
    adv: np.ndarray
    rollout_logp: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    entropy: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    versions: np.ndarray | None = None
    turns: np.ndarray | None = None
    stages: np.ndarray | None = None
    reward: float | None = None
    group: int | None = None
    micro: int | None = None
    """The trainer's own micro-batch index; sequences of one (rank, step, micro) go into one record."""


_LOGP_FIELDS = ("logp", "old_logp", "rollout_logp", "ref_logp")
_OPTIONAL = ("rollout_logp", "ref_logp", "entropy", "token_ids", "versions", "turns", "stages")
_ARG = {
    "rollout_logp": "rollout_logprobs",
    "ref_logp": "ref_logprobs",
    "entropy": "entropy",
    "token_ids": "token_ids",
    "versions": "versions",
    "turns": "turns",
    "stages": "stages",
}


def clean_sequence(
    seq: Sequence, where: str, names: dict[str, str], policy: Policy, tolerance: float, offset: int = 0
) -> Sequence | None:
    """Check a sequence's values; returns it (positive log-probs masked out in lenient mode) or ``None``.

    ``names`` maps rldiag's field names to the source's column names, for messages. Lengths must agree;
    log-probs above ``tolerance`` and negative entropies are errors (strict) or left-out tokens (lenient);
    missing values (NaN) are kept and counted in the report (once per source column). ``offset`` is the
    index in the source's lists of the sequence's first position (for messages).
    """
    n = seq.mask.size
    for fname in ("logp", "old_logp", "adv") + _OPTIONAL:
        arr = getattr(seq, fname)
        if arr is not None and arr.shape != (n,):
            policy.problem(
                f"{where}, column {names.get(fname, fname)}",
                f"{arr.size} values but the loss mask has {n}",
                "per-token lists of different lengths",
            )
            return None
    f32 = float(np.finfo(np.float32).max)
    for fname in ("logp", "old_logp", "adv", "rollout_logp", "ref_logp", "entropy"):
        arr = getattr(seq, fname)
        if arr is not None:
            with np.errstate(invalid="ignore"):
                huge = seq.mask & np.isfinite(arr) & (np.abs(arr) > f32)
            if huge.any():
                i = int(np.flatnonzero(huge)[0])
                policy.problem(
                    f"{where}, column {names.get(fname, fname)}[{i + offset}]",
                    f"{float(arr[i])!r} is outside the float32 range",
                    "value outside float32 range",
                )
                return None
    if seq.reward is not None and np.isfinite(seq.reward) and abs(seq.reward) > f32:
        policy.problem(
            f"{where}, column {names.get('reward', 'reward')}",
            f"{seq.reward!r} is outside the float32 range",
            "value outside float32 range",
        )
        return None
    bad = np.zeros(n, dtype=bool)
    for fname in _LOGP_FIELDS:
        arr = getattr(seq, fname)
        if arr is None:
            continue
        with np.errstate(invalid="ignore"):
            pos = seq.mask & (arr > tolerance) & ~bad  # a token is counted once, whichever column is bad
        if pos.any():
            i = int(np.flatnonzero(pos)[0])
            col = names.get(fname, fname)
            policy.problem(
                f"{where}, column {col}[{i + offset}]",
                f"{float(arr[i])!r} is a positive log-probability "
                f"({int(pos.sum())} such token(s)); log-probabilities cannot be positive",
                "positive log-probability (tokens)",
                int(pos.sum()),
            )
            bad |= pos
    if seq.entropy is not None:
        with np.errstate(invalid="ignore"):
            neg = seq.mask & (seq.entropy < 0) & ~bad
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            policy.problem(
                f"{where}, column {names.get('entropy', 'entropy')}[{i + offset}]",
                f"{float(seq.entropy[i])!r} is a negative entropy",
                "negative entropy (tokens)",
                int(neg.sum()),
            )
            bad |= neg
    if bad.any():
        seq.mask = seq.mask & ~bad
    if not seq.mask.any():
        return None
    counted: set[str] = set()
    for fname in ("logp", "old_logp", "adv", "rollout_logp", "ref_logp", "entropy"):
        arr, col = getattr(seq, fname), names.get(fname, fname)
        if arr is not None and col not in counted:
            counted.add(col)
            miss = int(np.count_nonzero(np.isnan(arr[seq.mask])))
            if miss:
                policy.report.missing[col] += miss
    return seq


def import_config(config: RecorderConfig) -> RecorderConfig:
    """The recorder settings of an import: ``record()`` waits for the writer instead of dropping token rows
    (an import must hold every row it reports), and segments roll every 1M rows to bound memory."""
    return config.replace(
        max_block_seconds=max(config.max_block_seconds, 3600.0), roll_rows=min(config.roll_rows, 1 << 20)
    )


class RunBuilder:
    """Writes sequences into a run through one :class:`Recorder` per rank, a record per (rank, step, micro).

    Sequences of one rank must come in step order per rank for records to stay whole; a record is cut when
    its padded grid would pass ``max_cells``.
    """

    def __init__(
        self,
        run_dir: Path,
        config: RecorderConfig,
        report: ImportReport,
        *,
        world_size: int = 1,
        name: str | None = None,
        max_cells: int = 1 << 22,
    ) -> None:
        self.run_dir = run_dir
        self.config = import_config(config)
        self.report = report
        self.world_size = max(1, world_size)
        self.name = name
        self.max_cells = max_cells
        self._recs: dict[int, Recorder] = {}
        self._buf: dict[int, list[Sequence]] = {}

    def add(self, seq: Sequence) -> None:
        """Queue one sequence (already cleaned)."""
        buf = self._buf.setdefault(seq.rank, [])
        if buf and (
            buf[0].step != seq.step
            or buf[0].micro != seq.micro
            or (len(buf) + 1) * max(max(s.mask.size for s in buf), seq.mask.size) > self.max_cells
        ):
            self._emit(seq.rank)
        self._buf.setdefault(seq.rank, []).append(seq)

    def flush(self) -> None:
        """Record everything queued and publish it (readers see it)."""
        for rank in list(self._buf):
            self._emit(rank)
        for rec in self._recs.values():
            rec.flush()

    def close(self) -> None:
        """Record what is queued and close every recorder."""
        try:
            for rank in list(self._buf):
                self._emit(rank)
        finally:
            recs, self._recs = self._recs, {}
            errors: list[BaseException] = []
            for rec in recs.values():
                try:
                    rec.close()
                except Exception as exc:  # noqa: BLE001 - close the others, then raise the first
                    errors.append(exc)
            dropped = sum(int(rec.stats.get("rows_dropped", 0)) for rec in recs.values())
            if dropped and not errors:
                errors.append(RuntimeError(f"the recorder dropped {dropped:,} token rows; the import is incomplete"))
            if errors:
                raise errors[0]

    def _recorder(self, rank: int) -> Recorder:
        rec = self._recs.get(rank)
        if rec is None:
            from rldiag.record.recorder import Recorder

            self.world_size = max(self.world_size, rank + 1)
            rec = Recorder(self.run_dir, config=self.config, rank=rank, world_size=self.world_size, name=self.name)
            self._recs[rank] = rec
        return rec

    def _emit(self, rank: int) -> None:
        seqs = self._buf.pop(rank, [])
        if not seqs:
            return
        b, t = len(seqs), max(s.mask.size for s in seqs)
        mask = np.zeros((b, t), dtype=bool)
        grids = {f: np.zeros((b, t), dtype=np.float32) for f in ("logp", "old_logp", "adv")}
        opt: dict[str, np.ndarray] = {}
        for f in _OPTIONAL:
            if all(getattr(s, f) is not None for s in seqs):
                opt[f] = np.zeros(
                    (b, t), dtype=np.int64 if f in ("token_ids", "versions", "turns", "stages") else np.float32
                )
        for i, s in enumerate(seqs):
            n = s.mask.size
            mask[i, :n] = s.mask
            for f, g in grids.items():
                g[i, :n] = np.where(s.mask, getattr(s, f), 0.0)
            for f, g in opt.items():
                g[i, :n] = np.where(s.mask, getattr(s, f), 0)
        kwargs: dict[str, Any] = {_ARG[f]: g for f, g in opt.items()}
        if "turns" in kwargs:
            kwargs["turns"] = kwargs["turns"].astype(np.int32)
        if "stages" in kwargs:
            kwargs["stages"] = kwargs["stages"].astype(np.int32)
        if all(s.reward is not None for s in seqs):
            kwargs["rewards"] = np.array([s.reward for s in seqs], dtype=np.float32)
        if all(s.group is not None for s in seqs):
            kwargs["group_ids"] = np.array([s.group for s in seqs], dtype=np.int64)
        self._recorder(rank).record(
            step=int(seqs[0].step),
            logprobs=grids["logp"],
            old_logprobs=grids["old_logp"],
            advantages=grids["adv"],
            mask=mask,
            **kwargs,
        )
        self.report.tokens += int(mask.sum())
        self.report.sequences += b
        self.report.steps.add(int(seqs[0].step))
        self.report.ranks.add(rank)


# --- JSON lines ----------------------------------------------------------------------------------------
MAX_LINE_BYTES = 1 << 28
"""A JSON line longer than this is refused (a packed sequence of 1M tokens is about 60 MB)."""


def jsonl_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of a JSONL file; text is None for a line over MAX_LINE_BYTES or not UTF-8."""
    with path.open("rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = fh.readline(MAX_LINE_BYTES)
                yield lineno, None
                continue
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, "\x00"


def decode_json(line: str | None, where: str) -> dict[str, Any]:
    if line is None:
        raise ImportInputError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
    if line == "\x00":
        raise ImportInputError(f"{where}: not UTF-8 text")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ImportInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ImportInputError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ImportInputError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(rec, dict):
        raise ImportInputError(f"{where}: expected a JSON object per line, got {type(rec).__name__}")
    return rec


def jsonl_records(path: Path, policy: Policy) -> Iterator[tuple[str, dict[str, Any] | None, ImportInputError | None]]:
    """(where, record, error) per non-blank line of a JSONL file, streamed (files larger than memory are fine);
    counts each line in ``policy.report.rows_read``."""
    for lineno, line in jsonl_lines(path):
        where = f"{path}:{lineno}"
        if line is not None and not line.strip():
            continue
        policy.report.rows_read += 1
        try:
            yield where, decode_json(line, where), None
        except ImportInputError as exc:
            yield where, None, exc


def parse_jsonl(
    path: Path,
    policy: Policy,
    parse: Callable[[dict[str, Any], str], Sequence | None],
    *,
    key: Callable[[dict[str, Any]], Any] | None = None,
    error: type[ImportInputError] = ImportInputError,
) -> Iterator[Sequence]:
    """Sequences of a JSONL dump, one record a line, under the error policy.

    ``parse(record, where)`` returns a sequence (or None: nothing trained) and raises
    :class:`ImportInputError` on bad input; strict re-raises it (as ``error``), lenient skips the record and
    counts it as "bad record". ``key(record)`` identifies a record within the file: a repeat is a
    "duplicate record".
    """
    seen: dict[str, str] = {}
    for where, rec, exc in jsonl_records(path, policy):
        seq = None
        try:
            if exc is not None:
                raise exc
            assert rec is not None
            seq = parse(rec, where)
        except ImportInputError as err:
            if policy.strict:
                raise err if isinstance(err, error) else error(str(err)) from None
            policy.report.skipped["bad record"] += 1
            policy.report.first.setdefault("bad record", str(err))
            continue
        if seq is None:
            continue
        k = key(rec) if key is not None and rec is not None else None
        if k is not None:
            hk = short(k, 200)
            if hk in seen:
                if policy.strict:
                    raise error(f"{where}: repeats the record {short(k)} of {seen[hk]} (a copied or doubled record)")
                policy.problem(
                    where,
                    f"repeats the record {short(k)} of {seen[hk]} (a copied or doubled record)",
                    "duplicate record",
                )
                continue
            seen[hk] = where
        yield seq


def trained_span(mask: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """(lo, hi, mask[lo:hi], turns) from the first to the last trained position, or None when none is trained.
    Each run of trained positions after an untrained gap (tool output, the next user turn) is the next turn."""
    trained = np.flatnonzero(mask)
    if trained.size == 0:
        return None
    lo, hi = int(trained[0]), int(trained[-1]) + 1
    sub = np.asarray(mask[lo:hi], dtype=bool)
    starts = np.concatenate([[True], sub[1:] & ~sub[:-1]])
    turns = (np.cumsum(starts & sub) - 1).astype(np.int64)
    return lo, hi, sub.copy(), turns


# --- staging and publishing -----------------------------------------------------------------------------
def check_target(target: Path) -> None:
    """Refuse a target that exists and is not an empty directory."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImportInputError(f"{target} already exists and is not empty; import into a new run directory")


def _stale_staging(parent: Path, name: str) -> Iterator[Path]:
    prefix = f".{name}.rldiag-import-"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
            pid = p.name[len(prefix) :]
            if pid.isdigit() and not _alive(int(pid)):
                yield p


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier import of this process that failed: ours to clean
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def import_target(run_dir: str | os.PathLike[str] | storage.RemotePath) -> Path | storage.RemotePath:
    """The run an import writes: a local folder, or a run URI (``s3://...``, staged locally, uploaded at the end)."""
    return storage.location(run_dir)


@contextmanager
def _staged_remote(target: storage.RemotePath, report: ImportReport) -> Iterator[Path]:
    """Stage in a local temporary folder, then upload every file with one whole-object write each, the
    manifest last: until it lands, readers see no run at the target, so a failure midway exposes nothing."""
    if target.exists() and any(True for _ in target.iterdir()):
        raise ImportInputError(f"{target} already exists and is not empty; import into a new run")
    report.run = str(target)
    staging = Path(tempfile.mkdtemp(prefix="rldiag-import-"))
    try:
        yield staging
        if not any(staging.iterdir()):
            raise ImportInputError(f"{report.source}: no token rows to import")
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1, default=str))
        files = sorted(
            (p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == "manifest.json", str(p))
        )
        for p in files:
            dest = target
            for part in p.relative_to(staging).parts:
                dest = dest / part
            dest.write_bytes(p.read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_run(run_dir: str | os.PathLike[str] | storage.RemotePath, report: ImportReport) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``run_dir``; on success rename it to ``run_dir``, else delete it.

    Staging folders left by an import that was killed (its process is gone) are removed first, so a retry
    works. The report is stored in the run as ``.rldiag-import.json``. A run URI (``s3://...``) is staged in a
    local temporary folder and uploaded when the import succeeded (the manifest last).
    """
    target = import_target(run_dir)
    if isinstance(target, storage.RemotePath):
        with _staged_remote(target, report) as staging:
            yield staging
        return
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_staging(target.parent, target.name):
        shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{target.name}.rldiag-import-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    report.run = str(target)
    try:
        yield staging
        if not staging.exists():
            raise ImportInputError(f"{report.source}: no token rows to import")
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1, default=str))
        check_target(target)  # something may have appeared there while we read
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- dump formats: a folder of files, one or more per step ----------------------------------------------
@dataclass(frozen=True)
class DumpFile:
    """One dump file and what its name says."""

    path: Path
    step: int
    rank: int = 0


def named_dump_file(src: Path, pattern: re.Pattern[str], what: str) -> list[DumpFile] | None:
    """``[src]`` when ``src`` is a file named like ``pattern`` (its first group is the step), None when it is a
    folder; a file of another name or a missing path is an :class:`ImportInputError` (``what``: the file kind)."""
    if src.is_file():
        m = pattern.match(src.name)
        if not m:
            raise ImportInputError(f"{src}: not a {what} file")
        return [DumpFile(src, int(m.group(1)))]
    if not src.is_dir():
        raise ImportInputError(f"{src}: no such file or directory")
    return None


@dataclass(frozen=True)
class DumpFormat:
    """A trainer's dump format: how to list its files and read sequences from one.

    ``list_files(source)`` returns the dump files in step order (raises :class:`ImportInputError` when the
    source is not such a dump); ``read_file(file, policy, tolerance)`` yields cleaned sequences; ``ready(file)``
    says whether a file is complete (``--follow`` also waits for its size to settle).
    """

    trainer: str
    list_files: Callable[[Path], list[DumpFile]]
    read_file: Callable[[DumpFile, Policy, float], Iterator[Sequence]]
    ready: Callable[[DumpFile], bool] = lambda f: True


def import_dump(
    fmt: DumpFormat,
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Import every file of a dump into the new run ``run_dir`` (staged, published at the end)."""
    cfg = config or RecorderConfig()
    mode: ErrorPolicy = errors or cfg.errors
    rep = report if report is not None else ImportReport(trainer=fmt.trainer, source=str(source))
    rep.errors = mode
    policy = Policy(mode, rep)
    files = fmt.list_files(Path(source))
    if not files:
        raise ImportInputError(f"{source}: no {fmt.trainer} dump files found")
    target = Path(run_dir)
    with staged_run(target, rep) as staging:
        builder = RunBuilder(staging, cfg, rep, world_size=max(f.rank for f in files) + 1, name=target.name)
        try:
            for f in files:
                rep.files += 1
                for seq in fmt.read_file(f, policy, cfg.logp_tolerance):
                    builder.add(seq)
        finally:
            builder.close()
        if rep.tokens == 0:
            raise ImportInputError(
                f"{source}: no trained tokens to import ({rep.rows_read:,} records read; "
                f"skipped: {dict(rep.skipped) or 'none'})"
            )
    return target


def load_checked(path: Path, loader: Callable[[Path], _T], what: str) -> _T:
    """Run a whole-file loader (pickle, torch) and turn any failure into one ImportInputError naming the file."""
    try:
        return loader(path)
    except ImportInputError:
        raise
    except MemoryError:
        raise ImportInputError(f"{path}: too large to load into memory as {what}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file fails in many ways inside the loader
        raise ImportInputError(f"{path}: not a readable {what} ({type(exc).__name__}: {one_line(exc)[:200]})") from None
