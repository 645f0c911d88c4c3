"""``rldiag import slime SOURCE RUN``: slime's ``--save-debug-train-data`` files.

With ``--save-debug-train-data <dir>/{rollout_id}.pt`` (or ``--dump-details``, which sets
``<dump_details>/train_data/{rollout_id}.pt``) slime's Megatron actor saves, after each rollout's training, one
``torch.save`` file per rollout (``save_debug_train_data`` and ``_build_dump_payload`` in
``slime/observability/train_data_utils.py``). The version-2 payload is a dict: ``format_version`` (2),
``rollout_id``, ``rank`` (the writer), ``samples`` (one dict per training sample: ``data_parallel_rank``,
``sample_index``/``rollout_position`` when known, and the per-sample fields of the rollout data, e.g.
``tokens``, ``response_lengths``, ``total_lengths``, ``loss_masks``, ``rewards``, ``truncated``,
``log_probs``, ``rollout_log_probs``, ``ref_log_probs``, ``advantages``, ``returns``, ``entropy``), ``dp_shards``
(the data-parallel / micro-batch layout) and whole-batch fields such as ``raw_reward``. Response-token fields
hold one value per response token (``response_lengths``).

The file is read with ``torch.load(weights_only=True, mmap=True)``: no code runs, and tensors are mapped
from disk rather than read into memory.

Mapping: ``log_probs`` -> ``old_logp`` and ``logp`` (the actor's log-probs before the update, or snapshotted
from the first training forward when slime reuses them: ratio = 1), ``rollout_log_probs`` ->
``rollout_logp``, ``ref_log_probs`` -> ``ref_logp``, ``advantages`` -> ``adv``, ``entropy`` -> ``entropy``,
the response part of ``tokens`` -> ``token_id``, ``rewards`` -> ``reward``, ``data_parallel_rank`` -> ``rank``,
``rollout_id`` -> ``step``; trained tokens are ``loss_masks``. Lacks: current log-probs, prompt-group ids.
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
    MAX_RANK,
    MAX_STEP,
    DumpFile,
    DumpFormat,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
    Sequence,
    check_int,
    clean_sequence,
    import_dump,
    is_number,
    load_checked,
    short,
    trained_span,
)

__all__ = ["FORMAT", "import_slime", "load_payload"]

_FILE = re.compile(r"^(?:\D*?)(\d{1,18})\.pt$")
_NAMES = {
    "logp": "log_probs",
    "old_logp": "log_probs",
    "rollout_logp": "rollout_log_probs",
    "ref_logp": "ref_log_probs",
    "adv": "advantages",
    "reward": "rewards",
    "entropy": "entropy",
    "token_ids": "tokens",
}


def import_slime(
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Build the run ``run_dir`` from slime's train debug files under ``source`` (a folder of
    ``{rollout_id}.pt`` files, or one file); returns its path."""
    return import_dump(FORMAT, source, run_dir, config=config, errors=errors, report=report)


def _list(src: Path) -> list[DumpFile]:
    if src.is_file():
        m = _FILE.match(src.name)
        return [DumpFile(src, int(m.group(1)) if m else 0)]
    if not src.is_dir():
        raise ImportInputError(f"{src}: no such file or directory")
    folder = src / "train_data" if (src / "train_data").is_dir() else src
    files = [
        DumpFile(p, int(m.group(1)))
        for p in folder.iterdir()
        if (m := _FILE.match(p.name)) and p.is_file() and not p.is_symlink()
    ]
    if not files:
        raise ImportInputError(f"{folder}: no {{rollout_id}}.pt files (slime writes them with --save-debug-train-data)")
    steps: dict[int, Path] = {}
    for f in files:
        if f.step in steps:
            raise ImportInputError(
                f"{f.path}: rollout {f.step} also in {steps[f.step]} (a copied file?); import one run's files"
            )
        steps[f.step] = f.path
    return sorted(files, key=lambda f: f.step)


def load_payload(path: Path) -> dict[str, Any]:
    """The payload of one slime train debug file (``torch.load`` with ``weights_only=True``)."""

    def load(p: Path) -> Any:
        try:
            import torch
        except ImportError:
            raise ImportInputError("reading slime's .pt files needs torch (pip install torch)") from None
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mapped

    payload = load_checked(path, load, "slime train debug file (torch.save)")
    if not isinstance(payload, dict):
        raise ImportInputError(f"{path}: holds a {type(payload).__name__}, not slime's train debug payload (a dict)")
    return payload


def _vector(value: Any, key: str, where: str, n: int) -> np.ndarray:
    """A response-token field as float64 of length n."""
    if hasattr(value, "detach"):
        value = value.detach().float().numpy() if value.is_floating_point() else value.detach().numpy()
    if isinstance(value, list) and not all(v is None or is_number(v) for v in value):
        raise ImportInputError(f"{where}, column {key}: not a list of numbers")
    try:
        arr = np.asarray(
            [np.nan if v is None else v for v in value] if isinstance(value, list) else value, dtype=np.float64
        )
    except (TypeError, ValueError, OverflowError):
        raise ImportInputError(f"{where}, column {key}: not numbers ({type(value).__name__})") from None
    if arr.shape != (n,):
        raise ImportInputError(f"{where}, column {key}: shape {list(arr.shape)}, expected {n} response tokens")
    return arr


def _read_file(f: DumpFile, policy: Policy, tolerance: float) -> Iterator[Sequence]:
    try:
        payload = load_payload(f.path)
        version = payload.get("format_version")
        if version != 2:
            raise ImportInputError(
                f"{f.path}: format_version {short(version)}; this importer reads slime's version 2 "
                "payload (top-level `samples`)"
            )
        samples = payload.get("samples")
        if not isinstance(samples, list):
            raise ImportInputError(f"{f.path}: `samples` is not a list")
        step = payload.get("rollout_id", f.step)
        if not check_int(step, 0, MAX_STEP):
            raise ImportInputError(f"{f.path}, column rollout_id: {short(step)} is not a non-negative integer")
    except ImportInputError as exc:
        policy.report.rows_read += 1
        if policy.strict:
            raise
        policy.report.skipped["unreadable file"] += 1
        policy.report.first.setdefault("unreadable file", str(exc))
        return
    seen: dict[Any, int] = {}
    for i, sample in enumerate(samples):
        policy.report.rows_read += 1
        where = f"{f.path}: samples[{i}]"
        try:
            seq = _parse(sample, where, int(step), policy, tolerance)
            key = sample.get("sample_index") if isinstance(sample, dict) else None
            if seq is not None and key is not None:
                k = short(key)
                if k in seen:
                    policy.problem(where, f"repeats sample_index {k} of samples[{seen[k]}]", "duplicate record")
                    continue
                seen[k] = i
        except ImportInputError as exc:
            if policy.strict:
                raise
            policy.report.skipped["bad record"] += 1
            policy.report.first.setdefault("bad record", str(exc))
            continue
        if seq is not None:
            yield seq


def _parse(sample: Any, where: str, step: int, policy: Policy, tolerance: float) -> Sequence | None:
    if not isinstance(sample, dict):
        raise ImportInputError(f"{where}: a {type(sample).__name__}, not a sample dict")
    missing = [k for k in ("response_lengths", "loss_masks", "log_probs", "advantages") if sample.get(k) is None]
    if missing:
        raise ImportInputError(f"{where}: lacks {missing} (has {sorted(map(str, sample))[:12]})")
    n = sample["response_lengths"]
    n = int(n.item()) if hasattr(n, "item") else n
    if not check_int(n, 0, 2**31 - 1):
        raise ImportInputError(f"{where}, column response_lengths: {short(n)} is not a length")
    rank = sample.get("data_parallel_rank", 0)
    if not check_int(rank, 0, MAX_RANK):
        raise ImportInputError(f"{where}, column data_parallel_rank: {short(rank)} is not a rank")
    mask = _vector(sample["loss_masks"], "loss_masks", where, n)
    if not np.isin(mask, (0.0, 1.0)).all():
        raise ImportInputError(f"{where}, column loss_masks: values other than 0 and 1")
    span = trained_span(mask != 0)
    if span is None:
        return None
    lo, hi, sub, turns = span
    old = _vector(sample["log_probs"], "log_probs", where, n)[lo:hi]

    def opt(key: str) -> np.ndarray | None:
        return _vector(sample[key], key, where, n)[lo:hi] if sample.get(key) is not None else None

    token_ids = None
    if sample.get("tokens") is not None:
        tokens = _vector(sample["tokens"], "tokens", where, len(sample["tokens"]))
        if (
            tokens.size < n
            or not np.isfinite(tokens).all()
            or (tokens < 0).any()
            or (tokens > 2**31 - 1).any()
            or (tokens != np.floor(tokens)).any()
        ):
            raise ImportInputError(f"{where}, column tokens: not {n}+ token ids in [0, 2^31)")
        token_ids = tokens[tokens.size - n + lo : tokens.size - n + hi].astype(np.int64)
    reward = None
    r = sample.get("rewards")
    if r is not None:
        r = r.item() if hasattr(r, "item") else r
        if not is_number(r):
            raise ImportInputError(f"{where}, column rewards: {short(r)} is not a number")
        reward = float(r)
    seq = Sequence(
        step=step,
        rank=int(rank),
        mask=sub,
        logp=old,
        old_logp=old.copy(),
        adv=opt("advantages"),  # type: ignore[arg-type]
        rollout_logp=opt("rollout_log_probs"),
        ref_logp=opt("ref_log_probs"),
        entropy=opt("entropy"),
        token_ids=token_ids,
        turns=turns,
        reward=reward,
    )
    return clean_sequence(seq, where, _NAMES, policy, tolerance, offset=lo)


FORMAT = DumpFormat("slime", _list, _read_file)
"""slime's train debug files as a :class:`DumpFormat`."""
