"""``rldiag import nemo-rl LOG_DIR RUN``: NeMo-RL's GRPO training data, ``train_data_step{N}.jsonl``.

NeMo-RL's GRPO loops write one file per step into the logger's log directory (``grpo_train`` and
``async_grpo_train`` in ``nemo_rl/algorithms/grpo.py`` build ``log_data`` and call
``Logger.log_batched_dict_as_jsonl`` in ``nemo_rl/utils/logger.py``), unless
``env.should_log_nemo_gym_responses`` turns it off. ``log_batched_dict_as_jsonl`` iterates the batch in
micro-batches of one, so each line is one sample whose values are batch-of-one lists:
``content``, ``rewards`` ``[r]``, ``input_lengths`` ``[n]``, ``token_ids`` ``[[...]]``, ``token_loss_mask``
``[[...]]``, ``sample_loss_mask`` ``[m]``, ``advantages`` ``[[...]]``, ``generation_logprobs`` ``[[...]]``,
``prev_logprobs`` ``[[...]]``, ``idx`` (and ``filtered_rewards``, ``agent_ref`` in some setups). Per-token
lists are right-padded to the batch's longest sequence and aligned with ``token_ids`` (the log-prob at
position t is that of token t; position 0 holds 0). ``N`` is the step the file was written after
(``total_steps + 1``).

Mapping: ``prev_logprobs`` -> ``old_logp`` and ``logp`` (the dump has no log-probs of the updated policy:
ratio = 1), ``generation_logprobs`` -> ``rollout_logp`` (NeMo-RL's ``token_mult_prob_error`` is
``mismatch/mult_err`` of this gap), ``advantages`` -> ``adv``, ``token_ids`` -> ``token_id``, ``rewards`` ->
``reward``; trained tokens are ``token_loss_mask`` inside ``input_lengths``, for samples whose
``sample_loss_mask`` is not 0. Lacks: current log-probs, entropy, prompt-group ids, reference log-probs, rank.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rldiag.config import RecorderConfig
from rldiag.importers._core import (
    DumpFile,
    DumpFormat,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
    Sequence,
    bool_list,
    check_int,
    clean_sequence,
    float_list,
    import_dump,
    int_list,
    is_number,
    named_dump_file,
    parse_jsonl,
    short,
    trained_span,
)

__all__ = ["FORMAT", "REQUIRED_KEYS", "import_nemo_rl"]

REQUIRED_KEYS = ("token_loss_mask", "advantages", "generation_logprobs", "prev_logprobs")
"""Keys every line must have (NeMo-RL versions before these were logged cannot be imported)."""
_FILE = re.compile(r"^train_data_step(\d{1,18})\.jsonl$")
_NAMES = {
    "logp": "prev_logprobs",
    "old_logp": "prev_logprobs",
    "rollout_logp": "generation_logprobs",
    "adv": "advantages",
    "reward": "rewards",
    "token_ids": "token_ids",
}


def import_nemo_rl(
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Build the run ``run_dir`` from NeMo-RL's ``train_data_step{N}.jsonl`` files under ``source`` (a log
    directory, searched one level deep, or one file); returns its path.

    >>> import_nemo_rl("logs/exp_001", "runs/nemo")  # doctest: +SKIP
    """
    return import_dump(FORMAT, source, run_dir, config=config, errors=errors, report=report)


def _list(src: Path) -> list[DumpFile]:
    one = named_dump_file(src, _FILE, "NeMo-RL train_data_step{N}.jsonl")
    if one is not None:
        return one
    found = [p for p in src.iterdir() if _FILE.match(p.name)]
    if not found:  # the logger's base_log_dir is often one level down (exp_001/)
        found = [
            p for d in src.iterdir() if d.is_dir() and not d.is_symlink() for p in d.iterdir() if _FILE.match(p.name)
        ]
    files = [
        DumpFile(p, int(m.group(1)))
        for p in found
        if p.is_file() and not p.is_symlink() and (m := _FILE.match(p.name)) is not None
    ]
    if not files:
        raise ImportInputError(f"{src}: no train_data_step{{N}}.jsonl files (NeMo-RL writes them to its log dir)")
    steps: dict[int, Path] = {}
    for f in files:
        if f.step in steps:
            raise ImportInputError(f"{f.path}: step {f.step} also in {steps[f.step]}; import one run's folder")
        steps[f.step] = f.path
    return sorted(files, key=lambda f: f.step)


def _one(rec: dict[str, Any], key: str, where: str) -> Any:
    """A batch-of-one value: ``[x]`` -> x (a bare x is accepted too)."""
    v = rec[key]
    if isinstance(v, list) and len(v) == 1:
        return v[0]
    if isinstance(v, list) and key in ("rewards", "input_lengths", "sample_loss_mask"):
        raise ImportInputError(f"{where}, column {key}: expected one value per line, got {len(v)}")
    return v


def _read_file(f: DumpFile, policy: Policy, tolerance: float) -> Iterator[Sequence]:
    def parse(rec: dict[str, Any], where: str) -> Sequence | None:
        return _parse(rec, where, f.step, policy, tolerance)

    yield from parse_jsonl(f.path, policy, parse, key=lambda r: r.get("idx"))


def _parse(rec: dict[str, Any], where: str, step: int, policy: Policy, tolerance: float) -> Sequence | None:
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ImportInputError(
            f"{where}: lacks {missing} (has {sorted(rec)[:12]}); NeMo-RL versions that do not "
            "log token_loss_mask, advantages and both log-probs cannot be imported"
        )
    mask = bool_list(_one(rec, "token_loss_mask", where), "token_loss_mask", where)
    n = mask.size
    if "input_lengths" in rec:
        length = _one(rec, "input_lengths", where)
        if not check_int(length, 0, n):
            raise ImportInputError(f"{where}, column input_lengths: {short(length)} is not an integer in [0, {n}]")
        mask[int(length) :] = False
    if "sample_loss_mask" in rec:
        sm = _one(rec, "sample_loss_mask", where)
        if not is_number(sm):
            raise ImportInputError(f"{where}, column sample_loss_mask: {short(sm)} is not a number")
        if sm == 0:
            policy.report.notes["samples with sample_loss_mask 0 (not trained)"] = (
                policy.report.notes.get("samples with sample_loss_mask 0 (not trained)", 0) + 1
            )
            return None
    lists = {k: _one(rec, k, where) for k in ("advantages", "generation_logprobs", "prev_logprobs")}
    for k, v in lists.items():
        if not isinstance(v, list) or len(v) != n:
            got = len(v) if isinstance(v, list) else type(v).__name__
            raise ImportInputError(f"{where}, column {k}: {got} values but token_loss_mask has {n}")
    span = trained_span(mask)
    if span is None:
        return None
    lo, hi, sub, turns = span
    old = float_list(lists["prev_logprobs"][lo:hi], "prev_logprobs", where)
    token_ids = None
    if rec.get("token_ids") is not None:
        ids = _one(rec, "token_ids", where)
        if not isinstance(ids, list) or len(ids) != n:
            raise ImportInputError(f"{where}, column token_ids: length differs from token_loss_mask ({n})")
        token_ids = int_list(ids[lo:hi], "token_ids", where, 0, 2**31 - 1)
    reward = None
    if "rewards" in rec:
        r = _one(rec, "rewards", where)
        if not is_number(r):
            raise ImportInputError(f"{where}, column rewards: {short(r)} is not a number")
        reward = float(r)
    seq = Sequence(
        step=step,
        rank=0,
        mask=sub,
        logp=old,
        old_logp=old.copy(),
        adv=float_list(lists["advantages"][lo:hi], "advantages", where),
        rollout_logp=float_list(lists["generation_logprobs"][lo:hi], "generation_logprobs", where),
        token_ids=token_ids,
        turns=turns,
        reward=reward,
    )
    if not np.isfinite(seq.adv[sub]).all():
        i = lo + int(np.flatnonzero(sub & ~np.isfinite(seq.adv))[0])
        raise ImportInputError(f"{where}, column advantages[{i}]: not a finite number")
    return clean_sequence(seq, where, _NAMES, policy, tolerance, offset=lo)


FORMAT = DumpFormat("nemo-rl", _list, _read_file)
"""NeMo-RL's per-step training data as a :class:`DumpFormat`."""
