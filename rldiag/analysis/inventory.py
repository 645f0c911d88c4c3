"""What a run holds and what is wrong with it: the summary that ``rldiag info`` prints (``Run.info()``), and
what ``rldiag info --repair`` may remove (:func:`leftovers`, :func:`repair`).

Problems listed besides the reader's own (skipped files, duplicates, restart conflicts):

- *temporary files* (``.<name>[.<pid>].tmp``) older than :data:`rldiag.runformat.TMP_GRACE_SECONDS`: a write
  that never finished (a writer killed mid-write); never read; removable;
- *orphan token files*: a token file whose segment's statistics file was never published (a writer killed
  between the two publishes); no reader uses it (:meth:`rldiag.analysis.scan.RunFiles.token_used`); removable
  once its writer has certainly ended (closed, its process gone from this machine, restarted by a later
  attempt of its rank, or a later segment of it published), never while it may still publish the statistics;
- *orphan live tails* (``live/<writer>.parquet``) that no reader uses (their rows are in a segment, or cannot
  be added) of a writer that ended, or untouched for the grace period; removable. A tail that a reader still
  uses (a crashed writer's last, never published steps) is listed and kept;
- *incomplete last steps*: the last step of a writer that ended without closing holds fewer micro-batches than
  its other steps (its metrics cover part of the step); listed, nothing to remove.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from rldiag import runformat, storage

if TYPE_CHECKING:
    from rldiag.analysis.io import Run

_TMP_FOLDERS = (
    "",
    runformat.STATS_DIR,
    runformat.TOKENS_DIR,
    runformat.WRITERS_DIR,
    runformat.SCALARS_DIR,
    runformat.LIVE_DIR,
    runformat.ALERTS_DIR,
    runformat.INDEX_DIR,
)


@dataclass(frozen=True)
class Leftover:
    """A file of a run that no reader uses: what it is, why, and whether ``--repair`` may remove it."""

    path: storage.Location
    kind: str
    """``tmp``, ``orphan-tokens`` or ``live-tail``."""
    reason: str
    removable: bool
    mtime: float = 0.0


def _ended(run: Run) -> dict[str, bool]:
    """Writer id -> whether it has certainly stopped writing (closed, process gone from this machine, or a later
    attempt of its rank started)."""
    infos = run.files.writer_infos
    out: dict[str, bool] = {}
    for w in infos:
        later = any(o.rank == w.rank and o.started > w.started for o in infos)
        out[w.writer] = w.closed is not None or w.process_gone() or later
    return out


def leftovers(run: Run, *, grace: float = runformat.TMP_GRACE_SECONDS, now: float | None = None) -> list[Leftover]:
    """Temporary files, orphan token files and orphan live tails of ``run`` (see the module docstring)."""
    now = time.time() if now is None else now
    files = run.files
    ended = _ended(run)
    out: list[Leftover] = []
    for folder in _TMP_FOLDERS:
        where = run.path / folder if folder else run.path
        for e in storage.list_files(where):
            if runformat.is_tmp_name(e.name) and now - e.mtime > grace:
                out.append(
                    Leftover(
                        e.path,
                        "tmp",
                        f"temporary file {e.path} ({now - e.mtime:.0f} s old) of a write that never finished; "
                        "never read",
                        True,
                        e.mtime,
                    )
                )
    published: dict[str, set[int]] = {}
    for name in files.stats_files:
        parsed = runformat.parse_segment_name(name)
        if parsed is not None:
            published.setdefault(parsed[0], set()).add(int(name[len(parsed[0]) + 1 : -len(".parquet")]))
    local = not isinstance(run.path, storage.RemotePath)  # live tails are written on local runs only
    if local:
        from rldiag.analysis.scan import _read_live

        tails = {seg for seg, _ in _read_live(run.path, files.stats_files)}  # type: ignore[arg-type]
    else:
        tails = set()
    for name in files.orphan_tokens():
        info = files.token_infos[name]
        parsed = runformat.parse_segment_name(name)
        wid = parsed[0] if parsed is not None else None
        seg = int(name[len(wid) + 1 : -len(".parquet")]) if wid is not None else -1
        moved_on = wid is not None and any(s > seg for s in published.get(wid, ()))
        done = wid is None or ended.get(wid, False) or moved_on
        if name in tails:
            why = "its statistics are only in the writer's live tail so far (counted from there)"
        elif name in files.bad:
            why = "its statistics file was skipped as unreadable"
        elif name in files.stats_files:
            why = "its statistics file is a copy of another file's records"
        else:
            why = "its statistics file was never published (the writer stopped between the two publishes)"
        if not done:
            continue  # a live writer between its two publishes: not an orphan yet
        # only a writer's own segment name: a token file copied under another name is listed, never removed
        removable = wid is not None and name not in files.bad and name not in files.stats_files and name not in tails
        out.append(
            Leftover(
                info.path,
                "orphan-tokens",
                f"orphan token file {info.path}: {why}; no reader uses it",
                removable,
                info.mtime,
            )
        )
    if not local:
        return out
    used = {seg.rsplit("-", 1)[0] for seg in tails}
    for e in storage.list_files(run.path / runformat.LIVE_DIR):
        if not runformat.is_published(e.name):
            continue
        wid = e.name[: -len(".parquet")]
        stopped = ended.get(wid, False)
        if wid in used:
            if stopped:
                out.append(
                    Leftover(
                        e.path,
                        "live-tail",
                        f"writer {wid} stopped with statistics only in its live tail {e.path} (never published "
                        "in a segment); they are counted from there: keep it",
                        False,
                        e.mtime,
                    )
                )
            continue
        if stopped or now - e.mtime > grace:
            out.append(
                Leftover(
                    e.path,
                    "live-tail",
                    f"orphan live tail {e.path}: its rows are in a published segment or cannot be added, and its "
                    f"writer {'ended' if stopped else 'has not touched it for ' + format(now - e.mtime, '.0f') + ' s'}"
                    "; no reader uses it",
                    True,
                    e.mtime,
                )
            )
    return out


def incomplete_steps(run: Run) -> list[str]:
    """The last step of each writer that ended without closing, when it holds fewer micro-batches (records per
    rank) than the writer's other steps and still counts (a restart did not supersede it)."""
    files = run.files
    closed = {w.writer: w.closed is not None for w in files.writer_infos}
    ended = _ended(run)
    by_writer: dict[str, list[str]] = {}
    for name, info in files.stats_files.items():
        w = info.writer
        if w is not None and info.steps is not None and name not in files.dropped:
            by_writer.setdefault(w[0], []).append(name)
    out = []
    for wid, names in sorted(by_writer.items()):
        if closed.get(wid, True) or not ended.get(wid, False):
            continue  # closed (complete), live (its last step may still grow), or no writer file
        names.sort(key=lambda n: files.stats_files[n].steps or (0, 0))
        parts = [t for t in (files.table(n) for n in names[-3:]) if t is not None]
        rows = pa.concat_tables([files.surviving(n, t) for n, t in zip(names[-3:], parts)]) if parts else None
        if rows is None or rows.num_rows == 0:
            continue
        counts = rows.group_by(["step", "rank"]).aggregate([("micro", "count_distinct")])
        steps = counts.column("step").to_pylist()
        micro = counts.column("micro_count_distinct").to_pylist()
        last = max(steps)
        have = max(m for s, m in zip(steps, micro) if s == last)
        others = [m for s, m in zip(steps, micro) if s != last]
        if others and have < max(others):
            out.append(
                f"incomplete last step: step {last} of writer {wid} holds {have} of {max(others)} micro-batches "
                "(the writer stopped mid-step); its metrics cover part of the step"
            )
    return out


def repair(
    run: Run, *, grace: float = runformat.TMP_GRACE_SECONDS, dry_run: bool = False, now: float | None = None
) -> list[Leftover]:
    """Remove what :func:`leftovers` marks removable (never a file a reader uses, never a live writer's); returns
    what was removed (with ``dry_run``: what would be). A file that changed since it was looked at is kept."""
    done = []
    for item in leftovers(run, grace=grace, now=now):
        if not item.removable:
            continue
        if not dry_run:
            try:
                if abs(item.path.stat().st_mtime - item.mtime) > 1e-3:
                    continue  # rewritten meanwhile (a live tail): not a leftover any more
                if isinstance(item.path, storage.RemotePath):
                    item.path.unlink(missing_ok=True)
                else:
                    os.unlink(item.path)
            except FileNotFoundError:
                continue
        done.append(item)
    return done


def unpublished_records(run: Run) -> list[str]:
    """Problems: records a writer took and never published, as its writer file counts them (a signal whose wait
    for the writer ran out, or a store that could not be written for too long). They are in no file."""
    out = []
    for w in run.files.writer_infos:
        gave_up, at_signal = w.records_not_published()
        if at_signal:
            out.append(
                f"rank {w.rank}: writer {w.writer} was stopped by a signal before it published the {at_signal} "
                "records it held (lost; its warning on stderr says why)"
            )
        if gave_up:
            out.append(
                f"rank {w.rank}: writer {w.writer} gave up {gave_up} records it could not publish (lost: the store "
                "could not be written for too long)"
            )
    return out


def describe(run: Run) -> dict[str, Any]:
    """Manifest, steps, ranks, token counts, dropped rows, files, restarts (resume points, superseded ranges,
    gaps, the restarts themselves) and problems of ``run``, as plain values (what ``rldiag info --json``
    prints)."""
    files = run.files
    t = run.compact_table()

    def total(c: str) -> int:
        return int(pc.sum(t.column(c)).as_py() or 0) if t.num_rows else 0

    steps = run.steps()
    extra = [x.reason for x in leftovers(run)] + incomplete_steps(run) + unpublished_records(run)
    superseded_records = files.superseded_records()
    duplicate_records = files.duplicate_records()
    last_write = max([f.mtime for f in files.stats_files.values()], default=None)
    return {
        "path": str(run.path),
        "name": run.name,
        "schema_version": run.manifest.get("schema_version"),
        "rldiag_version": run.manifest.get("rldiag_version"),
        "created": run.manifest.get("created"),
        "world_size": run.manifest.get("world_size"),
        "config": run.config.to_dict(),
        "steps": len(steps),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "ranks": run.ranks,
        "records": sum(f.rows for f in files.stats_files.values()) - superseded_records - duplicate_records,
        "records_superseded": superseded_records,
        "records_duplicate": duplicate_records,
        "tokens": total("n"),
        "tokens_masked_in": total("n_masked"),
        "tokens_nonfinite": total("n_nonfinite"),
        "tokens_invalid": total("n_invalid"),
        "token_rows_written": total("rows_written"),
        "token_rows_dropped": total("rows_dropped"),
        "stats_files": len(files.stats_files),
        "token_files": len(files.token_infos),
        "bytes": sum(f.size for f in files.stats_files.values()) + sum(f.size for f in files.token_infos.values()),
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
            for w in files.writer_infos
        ],
        "superseded": list(files.resume.superseded),
        "gaps": list(files.resume.gaps),
        "restarts": list(files.resume.restarts),
        "problems": [p.message for p in files.problems] + extra + list(run.custom.problems),
    }
