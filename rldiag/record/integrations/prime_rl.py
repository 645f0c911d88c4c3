"""Import prime-rl token exports into an rldiag run.

prime-rl's trainer can write, per step and rank, ``<output_dir>/token_exports/step_N/rank_R.jsonl``: one JSON
object per trained sequence with per-token lists ``token_ids``, ``loss_mask``, ``advantages``,
``inference_logprobs``, ``trainer_logprobs``, ``entropy`` and the scalars ``step`` and ``rank``.
:func:`import_prime_rl` reads them and writes an rldiag run through :class:`rldiag.Recorder`, so the
statistics come from the same implementation as a live recording.

Column mapping (per token of a record):

============================ ================= ===============================================================
prime-rl                     rldiag            why
============================ ================= ===============================================================
``trainer_logprobs``         ``logp``          pi_theta at the gradient step
``trainer_logprobs``         ``old_logp``      prime-rl makes one optimizer step per batch and never recomputes
                                               old log-probs: the proximal policy *is* the trainer's policy at
                                               that step, so ratio = 1 and the ratio/clip family reads as
                                               "no within-step update" (not as missing)
``inference_logprobs``       ``rollout_logp``  the sampler's log-probs; the whole trainer-vs-inference gap
                                               (async staleness plus numerical mismatch, which prime-rl cannot
                                               separate) lands in the ``mismatch/*`` family: w = exp(trainer -
                                               inference) is prime-rl's importance ratio, ``mismatch/k3`` the
                                               mean of its ``mismatch_kl``
``advantages``               ``adv``           per token (a scalar is broadcast)
``entropy``                  ``entropy``       optional
``token_ids``                ``token_id``
``loss_mask``                mask              only trained tokens count; positions start at the first trained
                                               token, and each run of trained tokens after an untrained gap
                                               (tool output, next user turn) is a new ``turn``
``step`` / ``rank``          ``step``/``rank`` the record's own values (must agree with ``rank_R.jsonl``)
``reward`` or ``rewards``    ``reward``        optional; a per-token ``rewards`` list must be constant over the
                                               trained tokens (a broadcast sequence reward), else it is skipped
============================ ================= ===============================================================

prime-rl's records carry no prompt-group id, so ``group/*`` metrics are NaN. Set ``tis_cap`` in ``config`` to
the importance-ratio bound of your prime-rl loss so ``mismatch/tis_frac`` and ``mismatch/mis_frac`` count the
tokens its masking would act on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rldiag.config import RecorderConfig

__all__ = ["import_prime_rl", "PrimeRLImportError", "REQUIRED_KEYS", "TOKEN_KEYS"]

REQUIRED_KEYS = ("token_ids", "loss_mask", "advantages", "inference_logprobs", "trainer_logprobs", "step", "rank")
"""Keys every record must have."""
TOKEN_KEYS = ("token_ids", "loss_mask", "inference_logprobs", "trainer_logprobs", "entropy")
"""Per-token lists that must all have the same length (``entropy`` when present)."""

_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^rank_(\d+)\.jsonl$")
_CHUNK_TOKENS = 1 << 20  # padded tokens per recorder call: bounds memory on very large step files


class PrimeRLImportError(ValueError):
    """Bad prime-rl export input; the message names the file and line."""


@dataclass
class _Sequence:
    mask: np.ndarray
    token_ids: np.ndarray
    logp: np.ndarray
    rollout_logp: np.ndarray
    adv: np.ndarray
    entropy: np.ndarray | None
    turns: np.ndarray
    reward: float | None


def import_prime_rl(
    src_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
) -> Path:
    """Build the rldiag run ``run_dir`` from the prime-rl token exports under ``src_dir``; returns its path.

    ``src_dir`` is prime-rl's ``output_dir`` (holding ``token_exports/``) or the ``token_exports`` folder
    itself. ``run_dir`` must not exist yet (or be empty): the run is written beside it and moved into place
    only when every file has been read, so bad input leaves nothing behind. When some step folders carry
    prime-rl's ``STABLE`` marker, folders without it (still being written) are skipped with a warning.

    >>> import_prime_rl("outputs/my-run", "runs/my-run")  # doctest: +SKIP
    PosixPath('runs/my-run')
    """
    files = _find_files(Path(src_dir))
    target = Path(run_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PrimeRLImportError(f"{target} already exists and is not empty; choose a new run directory")
    staging = target.parent / f".{target.name}.importing-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_run(files, staging, config, name=target.name)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _find_files(src: Path) -> dict[int, list[tuple[int, Path]]]:
    """rank -> [(step, file)] sorted by step."""
    if not src.is_dir():
        raise PrimeRLImportError(f"{src}: not a directory (expected prime-rl's output_dir or its token_exports/)")
    root = src / "token_exports" if (src / "token_exports").is_dir() else src
    step_dirs = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
    )
    if not step_dirs:
        raise PrimeRLImportError(
            f"{root}: no step_N folders; expected <output_dir>/token_exports/step_N/rank_R.jsonl"
        )
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
            if m and f.is_file():
                by_rank.setdefault(int(m.group(1)), []).append((step, f))
    if not by_rank:
        raise PrimeRLImportError(f"{root}: step folders hold no rank_R.jsonl files")
    for entries in by_rank.values():
        entries.sort()
    return dict(sorted(by_rank.items()))


def _write_run(
    files: dict[int, list[tuple[int, Path]]], run_dir: Path, config: RecorderConfig | None, *, name: str
) -> None:
    from rldiag.record.recorder import Recorder

    world_size = max(files) + 1
    cfg = config or RecorderConfig()
    # strict: a positive log-prob is an input error, reported with its file and line (lenient: counted)
    logp_limit = cfg.logp_tolerance if cfg.errors == "strict" else None
    for rank, entries in files.items():
        rec = Recorder(run_dir, config=config, rank=rank, world_size=world_size, name=name)
        try:
            for _, path in entries:
                for step, chunk in _chunks(path, rank, logp_limit):
                    _record_chunk(rec, step, chunk)
        finally:
            rec.close()


def _chunks(path: Path, rank: int, logp_limit: float | None) -> Iterator[tuple[int, list[_Sequence]]]:
    """Sequences of one file, grouped by step, in chunks of about _CHUNK_TOKENS padded tokens."""
    chunk: list[_Sequence] = []
    chunk_step: int | None = None
    longest = 0
    for step, seq in _read(path, rank, logp_limit):
        if chunk and (step != chunk_step or (len(chunk) + 1) * max(longest, len(seq.logp)) > _CHUNK_TOKENS):
            yield chunk_step, chunk  # type: ignore[misc]
            chunk, longest = [], 0
        chunk_step = step
        chunk.append(seq)
        longest = max(longest, len(seq.logp))
    if chunk:
        yield chunk_step, chunk  # type: ignore[misc]


def _read(path: Path, rank: int, logp_limit: float | None) -> Iterator[tuple[int, _Sequence]]:
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrimeRLImportError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise PrimeRLImportError(f"{where}: expected a JSON object per line, got {type(rec).__name__}")
            seq = _parse(rec, where, rank, logp_limit)
            if seq is not None:
                yield int(rec["step"]), seq


def _parse(rec: dict[str, Any], where: str, file_rank: int, logp_limit: float | None) -> _Sequence | None:
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise PrimeRLImportError(f"{where}: record lacks required key(s) {missing} (has {sorted(rec)})")
    step, rank = rec["step"], rec["rank"]
    if not _is_int(step) or step < 0:
        raise PrimeRLImportError(f"{where}: step must be a non-negative integer, got {step!r}")
    if not _is_int(rank) or rank != file_rank:
        raise PrimeRLImportError(f"{where}: rank {rank!r} does not match the file name rank_{file_rank}.jsonl")
    lengths = {}
    for key in TOKEN_KEYS:
        if key in rec and rec[key] is not None:
            if not isinstance(rec[key], list):
                raise PrimeRLImportError(f"{where}: {key} must be a list, got {type(rec[key]).__name__}")
            lengths[key] = len(rec[key])
    adv = rec["advantages"]
    if isinstance(adv, list):
        lengths["advantages"] = len(adv)
    elif not isinstance(adv, (int, float)) or isinstance(adv, bool):
        raise PrimeRLImportError(f"{where}: advantages must be a list of numbers or a number, got {adv!r}")
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise PrimeRLImportError(f"{where}: per-token lists have different lengths ({detail})")
    mask = np.array([_as_bool(v, where, "loss_mask") for v in rec["loss_mask"]], dtype=bool)
    trained = np.flatnonzero(mask)
    if trained.size == 0:
        return None
    lo, hi = int(trained[0]), int(trained[-1]) + 1
    try:
        token_ids = np.array(rec["token_ids"][lo:hi], dtype=np.int64)
    except (TypeError, ValueError):
        raise PrimeRLImportError(f"{where}: token_ids must be integers") from None
    sub = mask[lo:hi]
    starts = np.concatenate([[True], sub[1:] & ~sub[:-1]])  # a trained run begins here
    turns = np.cumsum(starts & sub) - 1
    logp = _floats(rec["trainer_logprobs"], lo, hi, where, "trainer_logprobs")
    rollout = _floats(rec["inference_logprobs"], lo, hi, where, "inference_logprobs")
    advantages = (
        _floats(adv, lo, hi, where, "advantages") if isinstance(adv, list) else np.full(hi - lo, float(adv))
    )
    entropy = _floats(rec["entropy"], lo, hi, where, "entropy") if rec.get("entropy") is not None else None
    for arr in (logp, rollout, advantages):
        arr[~sub] = 0.0  # untrained gaps inside the response are masked; keep them finite
    if logp_limit is not None:
        for key, arr in (("trainer_logprobs", logp), ("inference_logprobs", rollout)):
            bad = np.flatnonzero(arr > logp_limit)
            if bad.size:
                raise PrimeRLImportError(
                    f"{where}: {key}[{lo + int(bad[0])}] = {float(arr[bad[0]])} is positive ({bad.size} such tokens); "
                    "log-probabilities cannot be, so these are not log-probs (or pass a RecorderConfig with "
                    "errors='lenient' to count and skip them)"
                )
    if entropy is not None:
        entropy[~sub] = 0.0
    return _Sequence(
        mask=sub,
        token_ids=token_ids,
        logp=logp,
        rollout_logp=rollout,
        adv=advantages,
        entropy=entropy,
        turns=turns.astype(np.int32),
        reward=_reward(rec, mask, where),
    )


def _reward(rec: dict[str, Any], mask: np.ndarray, where: str) -> float | None:
    if isinstance(rec.get("reward"), (int, float)) and not isinstance(rec.get("reward"), bool):
        return float(rec["reward"])
    rewards = rec.get("rewards")
    if not isinstance(rewards, list) or len(rewards) != len(mask):
        return None
    values = {float(r) for r, m in zip(rewards, mask) if m and isinstance(r, (int, float))}
    if len(values) == 1:
        return values.pop()
    if len(values) > 1:
        warnings.warn(f"{where}: per-token rewards vary over the trained tokens; reward not imported", stacklevel=5)
    return None


def _floats(values: list[Any], lo: int, hi: int, where: str, key: str) -> np.ndarray:
    out = np.empty(hi - lo, dtype=np.float64)
    for i, v in enumerate(values[lo:hi]):
        if v is None:
            out[i] = math.nan  # counted by ratio/nonfinite, excluded from the other metrics
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
        else:
            raise PrimeRLImportError(f"{where}: {key}[{lo + i}] is {v!r}, not a number")
    return out


def _as_bool(v: Any, where: str, key: str) -> bool:
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    raise PrimeRLImportError(f"{where}: {key} must hold booleans (or 0/1), got {v!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _record_chunk(rec: Any, step: int, seqs: list[_Sequence]) -> None:
    b, t = len(seqs), max(len(s.logp) for s in seqs)
    mask = np.zeros((b, t), dtype=bool)
    logp = np.zeros((b, t), dtype=np.float32)
    rollout = np.zeros((b, t), dtype=np.float32)
    adv = np.zeros((b, t), dtype=np.float32)
    token_ids = np.zeros((b, t), dtype=np.int64)
    turns = np.zeros((b, t), dtype=np.int32)
    has_entropy = all(s.entropy is not None for s in seqs)
    entropy = np.zeros((b, t), dtype=np.float32) if has_entropy else None
    has_reward = all(s.reward is not None for s in seqs)
    for i, s in enumerate(seqs):
        n = len(s.logp)
        logp[i, :n], rollout[i, :n], adv[i, :n] = s.logp, s.rollout_logp, s.adv
        token_ids[i, :n], turns[i, :n] = s.token_ids, s.turns
        if entropy is not None:
            entropy[i, :n] = s.entropy  # type: ignore[assignment]
        mask[i, :n] = s.mask
    extras: dict[str, Any] = {"token_ids": token_ids, "turns": turns}
    if entropy is not None:
        extras["entropy"] = entropy
    if has_reward:
        extras["rewards"] = np.array([s.reward for s in seqs], dtype=np.float32)
    rec.record(
        step=step,
        logprobs=logp,
        old_logprobs=logp,
        advantages=adv,
        mask=mask,
        rollout_logprobs=rollout,
        **extras,
    )
