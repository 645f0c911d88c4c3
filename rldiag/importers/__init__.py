"""Importers: rldiag runs from other trainers' on-disk dumps (``rldiag import <trainer> SOURCE RUN``).

One module per format. Each reads the files that trainer's own dump code writes, maps them onto rldiag's
token-row columns (docs/importers.md: the mapping, and what each format lacks), checks every value under one
error policy (``strict`` stops at the first bad value naming file, record and column; ``lenient`` skips and
counts), and writes the run through :class:`rldiag.Recorder` in a staging folder that is renamed into place
at the end, so a failed import leaves nothing behind.

>>> from rldiag.importers import TRAINERS
>>> sorted(TRAINERS)[:2]
['areal', 'nemo-rl']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rldiag.importers._core import ImportInputError, ImportReport

__all__ = ["TRAINERS", "ImportInputError", "ImportReport", "Importer", "get"]


@dataclass(frozen=True)
class Importer:
    """One trainer's importer: ``module.function(source, run, *, config, errors, report) -> Path``."""

    name: str
    module: str
    function: str
    help: str
    source_help: str

    def load(self) -> Callable[..., Any]:
        """The import function."""
        return getattr(importlib.import_module(self.module), self.function)


TRAINERS: dict[str, Importer] = {
    imp.name: imp
    for imp in (
        Importer(
            "prime-rl",
            "rldiag.importers.prime_rl",
            "import_prime_rl",
            "prime-rl token exports: <output_dir>/token_exports/step_N/rank_R.jsonl",
            "prime-rl output directory (or its token_exports folder)",
        ),
        Importer(
            "nemo-rl",
            "rldiag.importers.nemo_rl",
            "import_nemo_rl",
            "NeMo-RL GRPO training data: <log_dir>/train_data_step{N}.jsonl",
            "NeMo-RL log directory (or one train_data_step{N}.jsonl file)",
        ),
        Importer(
            "slime",
            "rldiag.importers.slime",
            "import_slime",
            "slime --save-debug-train-data files: <dir>/{rollout_id}.pt",
            "folder of slime's train debug .pt files (or one file)",
        ),
        Importer(
            "skyrl",
            "rldiag.importers.skyrl",
            "import_skyrl",
            "SkyRL trainer.dump_data_batch pickles: <export_path>/dumped_data/global_step_N_training_input.pkl",
            "SkyRL export_path, its dumped_data folder, or one .pkl file",
        ),
        Importer(
            "areal",
            "rldiag.importers.areal",
            "import_areal",
            "AReaL rollout dumps: checked, then refused (text and versions per sample, no per-token values)",
            "AReaL dump folder (or one file)",
        ),
        Importer(
            "verl",
            "rldiag.importers.verl",
            "import_verl",
            "verl trainer.rollout_data_dir dumps: checked, then refused (text and a score per sample, "
            "no per-token values)",
            "verl rollout_data_dir (or one {step}.jsonl file)",
        ),
    )
}
"""Trainers with an importer, by the name ``rldiag import`` takes."""


def get(name: str) -> Importer:
    """The importer of trainer ``name`` (KeyError names the known ones)."""
    try:
        return TRAINERS[name]
    except KeyError:
        raise KeyError(f"no importer for {name!r}; known: {', '.join(sorted(TRAINERS))}") from None
