"""``rldiag import verl DIR RUN``: verl's ``trainer.rollout_data_dir`` dumps, and what they lack.

With ``trainer.rollout_data_dir=<dir>`` verl's ``RayPPOTrainer`` writes ``<dir>/{global_step}.jsonl`` each step
(``_log_rollout_data`` -> ``_dump_generations`` -> ``_write_generations`` in
``verl/trainer/ppo/ray_trainer.py``): one JSON object per sample with ``input`` and ``output`` (the decoded
prompt and response), ``gts`` (ground truth), ``score`` (the summed token-level score), ``step`` and the
reward function's extra per-sample values (``request_id`` too when present).

These dumps carry no per-token data: no log-probs (current, old, rollout or reference), no advantages, no
token ids or masks. Every rldiag metric needs per-token log-probs and advantages, so the importer reads and
checks the folder and stops with what it found. Record verl live instead with rldiag's registered policy
loss (docs/integrations.md, verl), which sees every token.
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
    named_dump_file,
)
from rldiag.importers._textdumps import refuse, survey

__all__ = ["import_verl", "list_files"]

_FILE = re.compile(r"^(\d{1,18})\.jsonl$")
REQUIRED_KEYS = ("input", "output", "score", "step")


def list_files(src: Path) -> list[DumpFile]:
    """The ``{step}.jsonl`` files of a rollout_data_dir (or one such file), in step order."""
    one = named_dump_file(src, _FILE, "verl {step}.jsonl dump")
    if one is not None:
        return one
    files = [
        DumpFile(p, int(m.group(1)))
        for p in src.iterdir()
        if (m := _FILE.match(p.name)) and p.is_file() and not p.is_symlink()
    ]
    if not files:
        raise ImportInputError(f"{src}: no {{step}}.jsonl files (verl's trainer.rollout_data_dir)")
    return sorted(files, key=lambda f: f.step)


def import_verl(
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Check a verl rollout_data_dir and explain why it cannot become a run (it has no per-token values).

    Always raises :class:`ImportInputError`: with the file, line and column of a malformed line (strict), or
    with what the dump holds and lacks.
    """
    rep = report if report is not None else ImportReport(trainer="verl", source=str(source))
    policy = Policy(errors or (config.errors if config else "strict"), rep)
    files = list_files(Path(source))
    samples, keys = survey(files, policy, REQUIRED_KEYS)
    refuse(
        Path(source),
        "verl",
        files,
        samples,
        keys,
        "Record verl live with rldiag's policy loss instead (docs/integrations.md, verl).",
    )
    raise AssertionError("unreachable")  # pragma: no cover
