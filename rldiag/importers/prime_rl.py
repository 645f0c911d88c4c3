"""``rldiag import prime-rl DIR RUN``: prime-rl's token exports.

With ``enable_token_export = true`` prime-rl's trainer writes, per step and rank,
``<output_dir>/token_exports/step_N/rank_R.jsonl`` and touches ``step_N/STABLE`` once every rank has flushed
(``TokenExporter`` in prime-rl's ``src/prime_rl/trainer/rl/token_export.py``). Each line is one packed sequence
of one micro-step, with the scalars ``schema_version``, ``step``, ``rank``, ``micro_step``,
``micro_sequence_idx``, ``export_sequence_idx``, ``env_name`` and per-token lists ``token_ids``,
``position_ids``, ``loss_mask``, ``advantages``, ``inference_logprobs``, ``trainer_logprobs``, ``entropy``,
``mismatch_kl``, ``log_importance_ratio``, ``importance_ratio``, ``prob_delta``, ``is_masked``,
``is_masked_high``, ``is_masked_low``, ``rl_weights``, ``ce_weights``, ``ref_kl_weights``. Non-finite floats
are written as ``null``; a weight stream that the batch did not have is a list of ``null``.

Mapping (per token; docs/importers.md has the full table and what the export lacks):

- ``trainer_logprobs`` -> ``logp`` and ``old_logp`` (prime-rl never recomputes old log-probs: ratio = 1),
- ``inference_logprobs`` -> ``rollout_logp`` (the whole trainer-vs-sampler gap lands in ``mismatch/*``),
- ``advantages`` -> ``adv``, ``entropy`` -> ``entropy``, ``token_ids`` -> ``token_id``,
- the RL tokens are ``loss_mask`` and, when the batch carries weight streams, a non-zero ``rl_weights`` or
  ``ref_kl_weights`` (the tokens prime-rl's own ``mismatch_kl`` covers; CE-only tokens are left out and
  counted), ``micro_step`` -> the record (``micro``), ``env_name`` -> ``stage`` (codes in the report),
- each run of RL tokens after an untrained gap (tool output, the next user turn) is the next ``turn``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rldiag.config import RecorderConfig
from rldiag.importers._core import (
    MAX_STEP,
    DumpFile,
    DumpFormat,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
    RunBuilder,
    Sequence,
    bool_list,
    check_int,
    clean_sequence,
    float_list,
    import_target,
    int_list,
    is_number,
    parse_jsonl,
    short,
    staged_run,
    trained_span,
)
from rldiag.storage import RemotePath

__all__ = ["REQUIRED_KEYS", "TOKEN_KEYS", "PrimeRLImportError", "find_files", "import_prime_rl"]

REQUIRED_KEYS = ("token_ids", "loss_mask", "advantages", "inference_logprobs", "trainer_logprobs", "step", "rank")
"""Keys every record must have."""
TOKEN_KEYS = (
    "token_ids",
    "loss_mask",
    "inference_logprobs",
    "trainer_logprobs",
    "entropy",
    "rl_weights",
    "ce_weights",
    "ref_kl_weights",
)
"""Per-token lists that must all have the same length (when present)."""

_STEP_DIR = re.compile(r"^step_(\d{1,18})$")
_RANK_FILE = re.compile(r"^rank_(\d{1,5})\.jsonl$")
_NAMES = {
    "logp": "trainer_logprobs",
    "old_logp": "trainer_logprobs",
    "rollout_logp": "inference_logprobs",
    "adv": "advantages",
    "entropy": "entropy",
    "token_ids": "token_ids",
}


class PrimeRLImportError(ImportInputError):
    """Bad prime-rl export input; the message names the file, the line and the key."""


def import_prime_rl(
    src_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path | RemotePath:
    """Build the rldiag run ``run_dir`` from the prime-rl token exports under ``src_dir``; returns its path.

    ``run_dir`` may be a run URI (``s3://...``): the run is staged locally and uploaded when complete.

    ``src_dir`` is prime-rl's ``output_dir`` (holding ``token_exports/``) or the ``token_exports`` folder
    itself. ``run_dir`` must not exist yet (or be empty): the run is built beside it and moved into place only
    when every file was read, so bad input leaves nothing behind. When some step folders carry prime-rl's
    ``STABLE`` marker, folders without it (still being written) are skipped with a warning. ``errors``
    defaults to ``config.errors``; pass a fresh ``report`` to get the counts.

    >>> import_prime_rl("outputs/my-run", "runs/my-run")  # doctest: +SKIP
    PosixPath('runs/my-run')
    """
    cfg = config or RecorderConfig()
    mode: ErrorPolicy = errors or cfg.errors
    rep = report if report is not None else ImportReport(trainer="prime-rl", source=str(src_dir))
    rep.errors = mode
    policy = Policy(mode, rep)
    files = find_files(Path(src_dir))
    target = import_target(run_dir)
    envs: dict[str, int] = {}
    with staged_run(target, rep) as staging:
        builder = RunBuilder(staging, cfg, rep, world_size=max(files) + 1, name=target.name)
        try:
            for rank, entries in files.items():
                for step, path in entries:
                    rep.files += 1
                    for seq in _read(path, step, rank, policy, cfg.logp_tolerance, envs):
                        builder.add(seq)
        finally:
            builder.close()
        if rep.tokens == 0:
            raise PrimeRLImportError(
                f"{src_dir}: no trained tokens to import ({rep.rows_read:,} records read; "
                f"skipped: {dict(rep.skipped) or 'none'})"
            )
        if envs:
            rep.notes["env_name -> stage"] = {name: code for name, code in sorted(envs.items(), key=lambda kv: kv[1])}
    return target


def find_files(src: Path) -> dict[int, list[tuple[int, Path]]]:
    """rank -> [(step, file)] sorted by step, from an ``output_dir`` or its ``token_exports`` folder."""
    if not src.is_dir():
        raise PrimeRLImportError(f"{src}: not a directory (expected prime-rl's output_dir or its token_exports/)")
    root = src / "token_exports" if (src / "token_exports").is_dir() else src
    step_dirs = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()
    )
    if not step_dirs:
        raise PrimeRLImportError(f"{root}: no step_N folders; expected <output_dir>/token_exports/step_N/rank_R.jsonl")
    if any((p / "STABLE").exists() for _, p in step_dirs):
        unstable = [p.name for _, p in step_dirs if not (p / "STABLE").exists()]
        if unstable:
            warnings.warn(
                f"skipping {len(unstable)} step folder(s) without prime-rl's STABLE marker (still being "
                f"written?): {', '.join(unstable[:5])}{' ...' if len(unstable) > 5 else ''}",
                stacklevel=3,
            )
        step_dirs = [(s, p) for s, p in step_dirs if (p / "STABLE").exists()]
    by_rank: dict[int, list[tuple[int, Path]]] = {}
    for step, folder in step_dirs:
        for f in folder.iterdir():
            m = _RANK_FILE.match(f.name)
            if m and f.is_file() and not f.is_symlink():
                by_rank.setdefault(int(m.group(1)), []).append((step, f))
    if not by_rank:
        raise PrimeRLImportError(f"{root}: step folders hold no rank_R.jsonl files")
    for entries in by_rank.values():
        entries.sort()
    return dict(sorted(by_rank.items()))


def _read(
    path: Path, folder_step: int, rank: int, policy: Policy, tolerance: float, envs: dict[str, int]
) -> Iterator[Sequence]:
    def parse(rec: dict[str, Any], where: str) -> Sequence | None:
        return _parse(rec, where, folder_step, rank, tolerance, policy, envs)

    yield from parse_jsonl(path, policy, parse, key=_key, error=PrimeRLImportError)


def _key(rec: dict[str, Any]) -> Any:
    """export_sequence_idx counts the sequences of one file: a repeat is a copied or doubled line."""
    key = rec.get("export_sequence_idx")
    if key is None and rec.get("micro_sequence_idx") is not None:
        key = (rec.get("micro_step"), rec.get("micro_sequence_idx"))
    return key


def _weights(rec: dict[str, Any], key: str, where: str) -> np.ndarray | None:
    """A weight stream, or None when absent (missing key, null, or a list of nulls: prime-rl's default)."""
    values = rec.get(key)
    if values is None or (isinstance(values, list) and all(v is None for v in values)):
        return None
    arr = float_list(values, key, where)
    if np.isnan(arr).any():
        i = int(np.flatnonzero(np.isnan(arr))[0])
        raise PrimeRLImportError(f"{where}, column {key}[{i}]: null weight in a weight stream that has values")
    return arr


def _parse(
    rec: dict[str, Any],
    where: str,
    folder_step: int,
    file_rank: int,
    tolerance: float,
    policy: Policy,
    envs: dict[str, int],
) -> Sequence | None:
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise PrimeRLImportError(f"{where}: record lacks required key(s) {missing} (has {sorted(rec)[:12]})")
    step, rank = rec["step"], rec["rank"]
    if not check_int(step, 0, MAX_STEP):
        raise PrimeRLImportError(f"{where}, column step: {short(step)} is not a non-negative integer")
    if step != folder_step:
        raise PrimeRLImportError(f"{where}, column step: {step} does not match the folder step_{folder_step}")
    if not check_int(rank, 0, 65_535) or rank != file_rank:
        raise PrimeRLImportError(
            f"{where}, column rank: {short(rank)} does not match the file name rank_{file_rank}.jsonl"
        )
    micro = rec.get("micro_step")
    if micro is not None and not check_int(micro, 0, 2**31 - 1):
        raise PrimeRLImportError(f"{where}, column micro_step: {short(micro)} is not a non-negative integer")
    for k in ("token_ids", "loss_mask", "inference_logprobs", "trainer_logprobs"):
        if not isinstance(rec[k], list):
            raise PrimeRLImportError(f"{where}, column {k}: must be a list, got {short(rec[k])}")
    lengths = {k: len(rec[k]) for k in TOKEN_KEYS if isinstance(rec.get(k), list)}
    for k in TOKEN_KEYS:
        if rec.get(k) is not None and not isinstance(rec[k], list):
            raise PrimeRLImportError(f"{where}, column {k}: must be a list, got {type(rec[k]).__name__}")
    adv = rec["advantages"]
    if isinstance(adv, list):
        lengths["advantages"] = len(adv)
    elif not is_number(adv):
        raise PrimeRLImportError(f"{where}, column advantages: must be a list of numbers or a number, got {short(adv)}")
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise PrimeRLImportError(f"{where}: per-token lists have different lengths ({detail})")
    loss_mask = bool_list(rec["loss_mask"], "loss_mask", where)
    rl_w, ref_w = _weights(rec, "rl_weights", where), _weights(rec, "ref_kl_weights", where)
    ce_w = _weights(rec, "ce_weights", where)
    if rl_w is None and ref_w is None:
        rl = loss_mask
    else:  # prime-rl's loss: rl component on loss_mask & rl_weights != 0; sampled tokens include ref_kl members
        member = np.zeros_like(loss_mask)
        if rl_w is not None:
            member |= rl_w != 0
        else:
            member |= True
        if ref_w is not None:
            member |= ref_w != 0
        rl = loss_mask & member
    outside = int(np.count_nonzero(loss_mask & ~rl)) + (
        int(np.count_nonzero((ce_w != 0) & ~loss_mask)) if ce_w is not None else 0
    )
    if outside:
        policy.report.notes["tokens outside the RL stream (zero rl weight, CE only)"] = (
            policy.report.notes.get("tokens outside the RL stream (zero rl weight, CE only)", 0) + outside
        )
    span = trained_span(rl)
    if span is None:
        return None
    lo, hi, sub, turns = span
    token_ids = int_list(rec["token_ids"][lo:hi], "token_ids", where, 0, 2**31 - 1)
    logp = float_list(rec["trainer_logprobs"][lo:hi], "trainer_logprobs", where)
    rollout = float_list(rec["inference_logprobs"][lo:hi], "inference_logprobs", where)
    advantages = float_list(adv[lo:hi], "advantages", where) if isinstance(adv, list) else np.full(hi - lo, float(adv))
    entropy = float_list(rec["entropy"][lo:hi], "entropy", where) if rec.get("entropy") is not None else None
    env = rec.get("env_name")
    stages = None
    if isinstance(env, str) and env:
        code = envs.setdefault(env[:200], len(envs))
        stages = np.full(hi - lo, code, dtype=np.int64)
    seq = Sequence(
        step=int(step),
        rank=int(rank),
        mask=sub,
        logp=logp,
        old_logp=logp.copy(),
        adv=advantages,
        rollout_logp=rollout,
        entropy=entropy,
        token_ids=token_ids,
        turns=turns,
        stages=stages,
        micro=int(micro) if micro is not None else None,
    )
    return clean_sequence(seq, where, _NAMES, policy, tolerance, offset=lo)


def _list(src: Path) -> list[DumpFile]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # --follow waits for STABLE instead of warning about it
        files = find_files(src)
    return sorted(
        (DumpFile(path, step, rank) for rank, entries in files.items() for step, path in entries),
        key=lambda f: (f.step, f.rank),
    )


def _read_file(f: DumpFile, policy: Policy, tolerance: float) -> Iterator[Sequence]:
    envs: dict[str, int] = policy.report.notes.setdefault("env_name -> stage", {})
    yield from _read(f.path, f.step, f.rank, policy, tolerance, envs)


def _ready(f: DumpFile) -> bool:
    if (f.path.parent / "STABLE").exists():
        return True
    return not any((p / "STABLE").exists() for p in f.path.parent.parent.glob("step_*"))


FORMAT = DumpFormat("prime-rl", _list, _read_file, _ready)
"""prime-rl's token exports as a :class:`DumpFormat` (used by ``--follow``)."""
