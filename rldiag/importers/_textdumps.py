"""Dumps that hold text and one score per sample but no per-token values: read, checked, and refused.

verl's ``trainer.rollout_data_dir`` and AReaL's rollout dumps record what was generated (decoded text), the
reward and a few scalars per sample. Every rldiag metric needs per-token log-probs and advantages, so these
dumps cannot become a run; the importers read them (so a user learns what the folder holds and what it
lacks, with the file and line of anything malformed) and stop with that explanation.
"""

from __future__ import annotations

from pathlib import Path

from rldiag.importers._core import (
    DumpFile,
    ImportInputError,
    Policy,
    jsonl_records,
)


def survey(files: list[DumpFile], policy: Policy, required: tuple[str, ...]) -> tuple[int, set[str]]:
    """(samples, keys seen) over JSONL dump files; a line without ``required`` keys is a bad record."""
    samples, keys = 0, set[str]()
    for f in files:
        policy.report.files += 1
        for where, rec, exc in jsonl_records(f.path, policy):
            if exc is None and rec is not None:
                missing = [k for k in required if k not in rec]
                if missing:
                    exc = ImportInputError(f"{where}: lacks {missing} (has {sorted(rec)[:12]})")
            if exc is not None:
                policy.problem(
                    where, str(exc).split(": ", 1)[-1] if str(exc).startswith(where) else str(exc), "bad record"
                )
                continue
            samples += 1
            keys.update(rec or {})
    return samples, keys


def refuse(source: Path, trainer: str, files: list[DumpFile], samples: int, keys: set[str], advice: str) -> None:
    steps = sorted({f.step for f in files})
    raise ImportInputError(
        f"{source}: {trainer}'s dump holds {samples:,} samples over {len(steps):,} step(s) with the fields "
        f"{sorted(keys)[:10]}: text and scalars per sample, no per-token log-probs or advantages, which every "
        f"rldiag metric needs; no run was built. {advice}"
    )
