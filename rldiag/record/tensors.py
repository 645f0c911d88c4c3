"""Tensor helpers: memory-safe entropy and log-prob gather, and host snapshots that never sync a GPU.

``entropy_from_logits`` and ``gather_logprobs`` work on ``[..., V]`` logits in row chunks with an fp32
upcast, so a 150k vocabulary in bf16 never materialises a full fp32 ``[B, T, V]`` copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "this function needs torch; install it with `pip install rldiag[torch]` "
            "(or pass numpy arrays to the recorder)"
        ) from exc
    return torch


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dimension, computed in fp32 chunks of rows.

    Returns a float32 tensor of shape ``logits.shape[:-1]`` on the logits' device. Peak extra memory is
    about ``chunk_size * V * 4`` bytes.

    >>> import torch
    >>> entropy_from_logits(torch.zeros(2, 3, 4)).allclose(torch.full((2, 3), float(torch.log(torch.tensor(4.)))))
    True
    """
    torch = _torch()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(0, flat.shape[0], chunk_size):
            x = flat[i : i + chunk_size].float()
            logz = torch.logsumexp(x, dim=-1, keepdim=True)
            p = torch.exp(x - logz)
            out[i : i + chunk_size] = logz.squeeze(-1) - (p * x).sum(-1)
    return out.reshape(shape)


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[token_ids] over the last dimension, in fp32 chunks of rows.

    ``logits``: ``[..., V]``; ``token_ids``: ``[...]`` (same leading shape). Differentiable: use it in the loss
    as well as for recording. Returns float32 ``[...]``.
    """
    torch = _torch()
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"gather_logprobs: token_ids has shape {tuple(token_ids.shape)} but logits have leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    ids = token_ids.reshape(-1, 1).long()
    parts = []
    for i in range(0, flat.shape[0], chunk_size):
        x = flat[i : i + chunk_size].float()
        parts.append(x.gather(-1, ids[i : i + chunk_size]).squeeze(-1) - torch.logsumexp(x, dim=-1))
    if not parts:
        return torch.empty(token_ids.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(parts).reshape(token_ids.shape)


def is_torch(x: Any) -> bool:
    """True for a torch tensor (without importing torch when it is not loaded)."""
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach")


class BufferPool:
    """Reusable host buffers, keyed by shape and dtype.

    Copying into a fresh multi-megabyte array costs a page fault per 4 KiB page (several milliseconds per
    batch on a VM); training loops record the same shapes every step, so the writer hands buffers back here
    once it has gathered the tokens out of them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = __import__("threading").Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                arr = free.pop()
                self._bytes -= arr.nbytes
                return arr
        return np.empty(shape, dtype=dtype)

    def put(self, arr: np.ndarray) -> None:
        if arr.base is not None or not arr.flags.c_contiguous or arr.nbytes < 65536:
            return
        with self._lock:
            if self._bytes + arr.nbytes > self.max_bytes:
                return
            self._free.setdefault((arr.shape, arr.dtype.str), []).append(arr)
            self._bytes += arr.nbytes


class HostSnapshot:
    """A host copy of one input, taken without synchronising a GPU.

    CPU tensors and numpy arrays are copied at once (the caller may reuse its buffers when ``record()``
    returns). CUDA tensors are copied with ``non_blocking=True`` into pinned memory and an event is recorded
    on the current stream; :meth:`get` waits on that event in the writer thread, never in the caller's (the
    recorder's full-queue path checks :meth:`ready` first).
    """

    __slots__ = ("_array", "_tensor", "_event", "nbytes", "dtype_kind", "pooled")

    def __init__(self, x: Any, *, float_cast: bool, pool: BufferPool | None = None) -> None:
        self.pooled = False
        self._event = None
        self._tensor = None
        self._array: np.ndarray | None = None
        if is_torch(x):
            t = x.detach()
            self.dtype_kind = "f" if t.is_floating_point() else ("b" if t.dtype.__str__() == "torch.bool" else "i")
            if float_cast and t.is_floating_point() and t.dtype.itemsize < 4:
                t = t.float()  # bf16/fp16 -> fp32 on device (async), numpy has no bf16
            if t.device.type == "cpu":
                if t.dtype.__str__() == "torch.bfloat16":
                    self._array = t.float().numpy()
                else:
                    src = t.numpy()
                    self._array = self._copy(src, pool)
            else:
                torch = _torch()
                self._tensor = t.to("cpu", non_blocking=True)
                if t.device.type == "cuda":
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(t.device))
                    self._event = ev
            self.nbytes = int(t.numel() * t.element_size())
        else:
            arr = np.asarray(x)
            self.dtype_kind = arr.dtype.kind
            self._array = self._copy(arr, pool)
            self.nbytes = int(self._array.nbytes)

    def _copy(self, src: np.ndarray, pool: BufferPool | None) -> np.ndarray:
        if pool is None or src.nbytes < 65536:
            return np.array(src, copy=True)
        dst = pool.get(src.shape, src.dtype)
        np.copyto(dst, src)
        self.pooled = True
        return dst

    def release(self, pool: BufferPool | None) -> None:
        """Give a pooled buffer back (the caller no longer reads it)."""
        if pool is not None and self.pooled and self._array is not None:
            pool.put(self._array)
        self._array = None

    def ready(self) -> bool:
        """Whether the host copy is complete; never waits (a CUDA event query, not a synchronisation).

        The recorder asks this when its queue is full: a record whose copy is still in flight goes to the
        writer thread (which waits for it) instead of being reduced in the caller's thread.
        """
        return self._array is not None or self._event is None or bool(self._event.query())

    def get(self) -> np.ndarray:
        """The host array (waits for the device copy if there is one: call it off the training thread)."""
        if self._array is None:
            if self._event is not None and not self._event.query():
                self._event.synchronize()
            tensor = self._tensor
            assert tensor is not None  # a snapshot holds its array or the tensor being copied
            self._array = tensor.numpy()
            self._tensor = None
            self._event = None
        return self._array


def shape_of(x: Any) -> tuple[int, ...]:
    """Shape of a tensor or array-like without copying it."""
    if hasattr(x, "shape"):
        return tuple(int(s) for s in x.shape)
    return tuple(np.shape(x))
