"""``rldiag import skyrl SOURCE RUN``: SkyRL's ``trainer.dump_data_batch`` pickles.

With ``trainer.dump_data_batch=true`` SkyRL's trainer pickles the training batch of every step, after
advantages are computed and before the policy update, to
``{export_path}/dumped_data/global_step_{N}_training_input.pkl`` (``RayPPOTrainer.dump_data`` in
``skyrl/train/trainer.py``, older ``skyrl_train/trainer.py``; ``TensorBatch.save`` in ``training_batch.py``).
The pickle holds a ``TrainingInputBatch`` (a dict of ``[batch, len]`` tensors plus ``metadata``): ``sequences``
(prompt + response ids, left-padded), ``attention_mask``, ``response_mask``, ``loss_mask``,
``action_log_probs``, ``base_action_log_probs``, ``advantages``, ``returns``, ``values``, ``kl`` and, when the
generator reported them, ``rollout_logprobs``; ``rewards`` and the prompt ``uids`` are removed before the dump.
skyrl-train 0.3.x stores each tensor as ``torch.save`` bytes; newer SkyRL as raw numpy bytes with dtype and
shape (``torch.save`` bytes for bfloat16). Both are read.

The pickle is read with a restricted unpickler: only the batch classes, tensors (through torch's
``weights_only`` loader) and plain containers are accepted, so a planted file cannot run code.

Mapping: ``action_log_probs`` -> ``old_logp`` and ``logp`` (at dump time the forward pass of the policy
before this step's update: ratio = 1), ``rollout_logprobs`` -> ``rollout_logp``, ``base_action_log_probs``
-> ``ref_logp``, ``advantages`` -> ``adv``, the response part of ``sequences`` -> ``token_id``; trained tokens
are ``loss_mask != 0`` (and ``response_mask``). Lacks: current log-probs, entropy, rewards, prompt-group ids
(both removed before the dump), rank.
"""

from __future__ import annotations

import io
import os
import pickle
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
    clean_sequence,
    import_dump,
    load_checked,
    named_dump_file,
    trained_span,
)

__all__ = ["FORMAT", "import_skyrl", "load_batch"]

_FILE = re.compile(r"^global_step_(\d{1,18})_training_input\.pkl$")
_NAMES = {
    "logp": "action_log_probs",
    "old_logp": "action_log_probs",
    "rollout_logp": "rollout_logprobs",
    "ref_logp": "base_action_log_probs",
    "adv": "advantages",
    "token_ids": "sequences",
}
MAX_FILE_BYTES = 64 << 30
"""A pickle larger than this is refused (it is loaded whole)."""


def import_skyrl(
    source: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy | None = None,
    report: ImportReport | None = None,
) -> Path:
    """Build the run ``run_dir`` from SkyRL's dumped training batches under ``source`` (``export_path``, its
    ``dumped_data`` folder, or one ``.pkl``); returns its path."""
    return import_dump(FORMAT, source, run_dir, config=config, errors=errors, report=report)


def _list(src: Path) -> list[DumpFile]:
    one = named_dump_file(src, _FILE, "SkyRL global_step_N_training_input.pkl")
    if one is not None:
        return one
    folder = src / "dumped_data" if (src / "dumped_data").is_dir() else src
    files = [
        DumpFile(p, int(m.group(1)))
        for p in folder.iterdir()
        if (m := _FILE.match(p.name)) and p.is_file() and not p.is_symlink()
    ]
    if not files:
        raise ImportInputError(
            f"{folder}: no global_step_N_training_input.pkl files (SkyRL writes them with "
            "trainer.dump_data_batch=true to <export_path>/dumped_data/)"
        )
    return sorted(files, key=lambda f: f.step)


class _Batch(dict):
    """Stand-in for SkyRL's TensorBatch classes: keeps the pickled state, runs nothing."""

    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_batch(cls: Any, state: Any) -> _Batch:
    b = _Batch()
    b.__setstate__(state)
    return b


def _torch_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _Unpickler(pickle.Unpickler):
    """Accepts only what SkyRL's batch pickles hold."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(("skyrl_train.", "skyrl.")) and module.endswith("training_batch"):
            if name == "_rebuild_tensor_batch":
                return _rebuild_batch
            if name in ("TrainingInputBatch", "TensorBatch", "TrainingOutputBatch"):
                return _Batch
        if module == "torch.storage" and name == "_load_from_bytes":
            return _torch_bytes  # a tensor pickled as a dict value (skyrl-train 0.3.x): weights-only load
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            import torch._utils as tu

            return getattr(tu, name)
        if module == "torch" and name in ("device", "Size") or (module == "torch" and name.endswith("Storage")):
            import torch

            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "copyreg" and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor  # type: ignore[attr-defined]
        if module == "builtins" and name in (
            "object",
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "int",
            "float",
            "bool",
            "str",
            "bytes",
            "slice",
            "complex",
        ):
            import builtins

            return getattr(builtins, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return np.core.multiarray.scalar  # type: ignore[attr-defined]
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a SkyRL batch pickle")


def _array(value: Any, key: str, path: Path) -> np.ndarray | None:
    """One serialised tensor of the batch as a numpy array (float64 for floats)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = _torch_bytes(bytes(value))
    elif isinstance(value, dict):
        fmt = value.get("format", "numpy")
        if fmt == "tensor_list":
            return None  # pixel values and the like: nothing per token
        if fmt == "torch":
            value = _torch_bytes(value["data"])
        else:
            dtype, shape = np.dtype(str(value["dtype"])), tuple(int(x) for x in value["shape"])
            if dtype.kind not in "biuf":
                raise ImportInputError(f"{path}, column {key}: dtype {dtype} is not numeric")
            arr = np.frombuffer(value["data"], dtype=dtype)
            if arr.size != int(np.prod(shape)):
                raise ImportInputError(f"{path}, column {key}: {arr.size} values do not fill shape {list(shape)}")
            value = arr.reshape(shape)
    if hasattr(value, "detach"):
        value = value.detach().float().numpy() if value.is_floating_point() else value.detach().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ImportInputError(f"{path}, column {key}: not a numeric tensor ({arr.dtype})")
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr


def load_batch(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one SkyRL batch pickle, by key, as numpy arrays (restricted unpickling)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImportInputError(f"{path}: {size:,} bytes, over the {MAX_FILE_BYTES:,} accepted")

    def load(p: Path) -> dict[str, np.ndarray]:
        with p.open("rb") as fh:
            obj = _Unpickler(fh).load()
        if not isinstance(obj, _Batch):
            raise ImportInputError(f"{p}: holds a {type(obj).__name__}, not a SkyRL TrainingInputBatch")
        state = obj.state
        raw = state.get("batch_dict")
        if isinstance(raw, dict):  # the tensors travel in the state (both versions)
            items = raw
        else:
            items = dict(obj)
        out: dict[str, np.ndarray] = {}
        for key, value in items.items():
            arr = _array(value, str(key), p)
            if arr is not None:
                out[str(key)] = arr
        return out

    return load_checked(path, load, "SkyRL batch pickle")


def _open(f: DumpFile) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
    """(batch, trained mask, sequences) of one dump file, its shapes checked."""
    batch = load_batch(f.path)
    for key in ("action_log_probs", "advantages", "loss_mask"):
        if key not in batch:
            raise ImportInputError(f"{f.path}: the batch lacks {key!r} (has {sorted(batch)})")
    old = batch["action_log_probs"]
    if old.ndim != 2:
        raise ImportInputError(f"{f.path}, column action_log_probs: shape {list(old.shape)} is not [batch, len]")
    b, r = old.shape
    for key in ("advantages", "loss_mask", "response_mask", "rollout_logprobs", "base_action_log_probs"):
        if key in batch and batch[key].shape != (b, r):
            raise ImportInputError(
                f"{f.path}, column {key}: shape {list(batch[key].shape)}, action_log_probs has {[b, r]}"
            )
    seqs = batch.get("sequences")
    if seqs is not None and (seqs.ndim != 2 or seqs.shape[0] != b or seqs.shape[1] < r):
        raise ImportInputError(
            f"{f.path}, column sequences: shape {list(seqs.shape)} cannot hold {r} response tokens per row"
        )
    mask_all = batch["loss_mask"] != 0
    if "response_mask" in batch:
        mask_all &= batch["response_mask"] != 0
    return batch, mask_all, seqs


def _read_file(f: DumpFile, policy: Policy, tolerance: float) -> Iterator[Sequence]:
    try:
        batch, mask_all, seqs = _open(f)
    except ImportInputError as exc:
        policy.report.rows_read += 1
        if policy.strict:
            raise
        policy.report.skipped["unreadable file"] += 1
        policy.report.first.setdefault("unreadable file", str(exc))
        return
    old = batch["action_log_probs"]
    b, r = old.shape
    for i in range(b):
        policy.report.rows_read += 1
        where = f"{f.path}: row {i}"
        span = trained_span(mask_all[i])
        if span is None:
            continue
        lo, hi, sub, turns = span
        token_ids = None
        if seqs is not None:
            ids = seqs[i, seqs.shape[1] - r + lo : seqs.shape[1] - r + hi].astype(np.int64)
            if (ids < 0).any() or (ids > 2**31 - 1).any():
                policy.problem(where, "column sequences: token ids outside [0, 2^31)", "bad record")
                continue
            token_ids = ids
        rollout = batch["rollout_logprobs"][i, lo:hi] if "rollout_logprobs" in batch else None
        ref = batch["base_action_log_probs"][i, lo:hi] if "base_action_log_probs" in batch else None
        seq = Sequence(
            step=f.step,
            rank=0,
            mask=sub,
            logp=old[i, lo:hi].copy(),
            old_logp=old[i, lo:hi].copy(),
            adv=batch["advantages"][i, lo:hi].astype(np.float64),
            rollout_logp=rollout,
            ref_logp=ref,
            token_ids=token_ids,
            turns=turns,
        )
        cleaned = clean_sequence(seq, where, _NAMES, policy, tolerance, offset=lo)
        if cleaned is not None:
            yield cleaned


FORMAT = DumpFormat("skyrl", _list, _read_file)
"""SkyRL's dumped training batches as a :class:`DumpFormat`."""
