"""``rldiag import areal DIR RUN``: AReaL's rollout dumps, and what they lack.

AReaL's workflow executor dumps each accepted trajectory (``WorkflowExecutor._dump_trajectory`` in
``areal/infra/workflow_executor.py``, AReaL 1.0) to ``<fileroot>/logs/.../rollout/<tail_version>/<task_id>.jsonl``
(``eval-rollout/`` for evaluation): one JSON object per sample with ``task_id``, ``sample_idx``, ``seqlen``,
``prompt_len``, ``head_version`` and ``tail_version`` (the oldest and newest policy version that generated
its tokens), ``reward``, and the decoded ``prompt`` and ``completion``.

The per-token ``versions`` tensor of the trajectory is reduced to its min and max before the dump, and no
log-probs or advantages are written, so no rldiag metric can be computed from these files: the importer reads
and checks the folder and stops with what it found. Record AReaL live instead: its training batch carries the
per-token ``versions`` (pass them as ``versions=`` to ``Recorder.record`` for ``staleness/*``), the old and
current log-probs and the advantages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rldiag.config import RecorderConfig
from rldiag.importers._core import (
    DumpFile,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
)
from rldiag.importers._textdumps import refuse, survey

__all__ = ["import_areal", "list_files"]

_FILE = re.compile(r"^(\d{1,18})\.jsonl$")
REQUIRED_KEYS = ("task_id", "head_version", "tail_version", "reward")


def list_files(src: Path) -> list[DumpFile]:
    """``<version>/<task_id>.jsonl`` files under a rollout dump folder (or its parent), by version."""
    if src.is_file():
        m = re.match(r"^\d{1,18}$", src.parent.name)
        return [DumpFile(src, int(src.parent.name) if m else 0)]
    if not src.is_dir():
        raise ImportInputError(f"{src}: no such file or directory")
    root = src / "rollout" if (src / "rollout").is_dir() else src
    files = [
        DumpFile(p, int(d.name))
        for d in root.iterdir()
        if d.is_dir() and re.fullmatch(r"\d{1,18}", d.name)
        for p in d.iterdir()
        if _FILE.match(p.name) and p.is_file() and not p.is_symlink()
    ]
    if not files:
        raise ImportInputError(f"{root}: no <version>/<task_id>.jsonl files (AReaL's rollout dump)")
    return sorted(files, key=lambda f: (f.step, f.path.name))


def import_areal(
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Check an AReaL rollout dump and explain why it cannot become a run (it has no per-token values).

    Always raises :class:`ImportInputError`.
    """
    rep = report if report is not None else ImportReport(trainer="areal", source=str(source))
    policy = Policy(errors or (config.errors if config else "strict"), rep)
    files = list_files(Path(source))
    samples, keys = survey(files, policy, REQUIRED_KEYS)
    refuse(
        Path(source),
        "AReaL",
        files,
        samples,
        keys,
        "Record AReaL live instead, passing its per-token `versions` to Recorder.record for staleness/*.",
    )
    raise AssertionError("unreachable")  # pragma: no cover
