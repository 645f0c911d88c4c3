"""What a run holds and what is wrong with it: the summary that ``rldiag info`` prints (``Run.info()``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

if TYPE_CHECKING:
    from rldiag.analysis.io import Run


def describe(run: Run) -> dict[str, Any]:
    """Manifest, steps, ranks, token counts, dropped rows, files, restarts (resume points, superseded ranges,
    gaps) and problems of ``run``, as plain values (what ``rldiag info --json`` prints)."""
    files = run.files
    t = run.compact_table()

    def total(c: str) -> int:
        return int(pc.sum(t.column(c)).as_py() or 0) if t.num_rows else 0

    steps = run.steps()
    superseded_records = files.superseded_records()
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
        "records": sum(f.rows for f in files.stats_files.values()) - superseded_records,
        "records_superseded": superseded_records,
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
        "problems": [p.message for p in files.problems],
    }
