"""Compiled passes of the mismatch bucket tables (``Run.bucket_metrics(by="prob")`` and ``by="route"``).

docs/metrics.md (metrics-spec section 5): the probability table buckets tokens by the sampler's probability
``exp(rollout_logp)``, the routing table by ``route_agree``. The per-(step, bucket) statistics are the kernel's
own (:func:`rldiag.stats.kernel.compute` with the bucket as a record key); this module only assigns the buckets
and adds the one sum the kernel does not keep, the sum of ``|d|`` (``d = old_logp - rollout_logp``) over the
tokens the kernel's mismatch pass uses: valid tokens (:func:`rldiag.stats.definitions.token_valid`) with a
finite ``d``.
"""

from __future__ import annotations

import math
from typing import Final

import numba
import numpy as np

from rldiag.stats import definitions

PROB_EDGES: Final[tuple[float, ...]] = (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0)
"""Edges of the probability buckets: bucket 0 is ``p <= 1e-6``, bucket ``k`` is ``(PROB_EDGES[k-1],
PROB_EDGES[k]]`` (a probability above 1 by rounding goes to the last bucket)."""

ROUTE_EDGES: Final[tuple[float, ...]] = (0.0, 0.5, 0.75, 0.9, 1.0)
"""Edges of the routing buckets: bucket ``k < 4`` is ``[ROUTE_EDGES[k], ROUTE_EDGES[k+1])``, bucket 4 is
``route_agree == 1`` (full agreement); a value outside [0, 1] or NaN gets no bucket."""

ABSD_STAT: Final[str] = "s_mm_absd"
"""Name of the extra statistics column: sum of ``|d|`` over the record's tokens with a finite ``d``."""

_token_valid = numba.njit(inline="always")(definitions.token_valid)


def bounds(by: str) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound of each bucket of ``by`` (``"prob"`` or ``"route"``), as the table shows them."""
    if by == "prob":
        hi = np.array(PROB_EDGES)
        return np.concatenate([[0.0], hi[:-1]]), hi
    if by == "route":
        e = np.array(ROUTE_EDGES)
        return np.concatenate([e[:-1], [1.0]]), np.concatenate([e[1:], [1.0]])
    raise ValueError(f"no fixed bucket bounds for by={by!r}")


@numba.njit(nogil=True, cache=True)
def _prob_buckets(roll: np.ndarray, edges: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    n = roll.size
    out = np.empty(n, dtype=np.int64)
    last = edges.size - 1
    for i in range(n):
        x = np.float64(roll[i])
        if not math.isfinite(x):
            out[i] = -1
            continue
        p = math.exp(x)
        b = 0
        while b < last and p > edges[b]:
            b += 1
        if p > edges[last]:
            b = last
        out[i] = b if p > edges[0] else 0
    return out


@numba.njit(nogil=True, cache=True)
def _route_buckets(route: np.ndarray, edges: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    n = route.size
    out = np.empty(n, dtype=np.int64)
    top = edges.size - 1  # index of the "== 1" bucket
    for i in range(n):
        x = np.float64(route[i])
        if not (x >= 0.0 and x <= 1.0):  # NaN and out-of-range values get no bucket
            out[i] = -1
        elif x == 1.0:
            out[i] = top
        else:
            b = 0
            while x >= edges[b + 1]:
                b += 1
            out[i] = b
    return out


def buckets(by: str, values: np.ndarray) -> np.ndarray:
    """Bucket of each token (-1: none) for ``by="prob"`` (``values`` = rollout_logp) or ``"route"``."""
    if by == "prob":
        return _prob_buckets(values, np.array(PROB_EDGES))
    if by == "route":
        return _route_buckets(values, np.array(ROUTE_EDGES))
    raise ValueError(f"by must be 'prob' or 'route' here, got {by!r}")


@numba.njit(nogil=True, cache=True)
def _absd_sums(
    tok_off: np.ndarray, lp: np.ndarray, olp: np.ndarray, adv: np.ndarray, roll: np.ndarray, tol: float
) -> np.ndarray:  # pragma: no cover - compiled
    n_rec = tok_off.size - 1
    out = np.zeros(n_rec)
    for r in range(n_rec):
        s = 0.0
        for i in range(tok_off[r], tok_off[r + 1]):
            x_lp = np.float64(lp[i])
            x_olp = np.float64(olp[i])
            x_a = np.float64(adv[i])
            d = x_olp - np.float64(roll[i])
            if _token_valid(x_lp, x_olp, x_a, tol) and math.isfinite(d):
                s += abs(d)
        out[r] = s
    return out


def absd_sums(
    tok_off: np.ndarray,
    logp: np.ndarray,
    old_logp: np.ndarray,
    adv: np.ndarray,
    rollout_logp: np.ndarray | None,
    tol: float,
) -> np.ndarray:
    """Per record (tokens ``tok_off[r]:tok_off[r+1]``): the sum of ``|old_logp - rollout_logp|`` over the valid
    tokens with a finite difference, the tokens ``n_mm`` counts. Zeros without rollout log-probs."""
    if rollout_logp is None:
        return np.zeros(max(tok_off.size - 1, 0))
    return _absd_sums(tok_off, logp, old_logp, adv, rollout_logp, float(tol))


@numba.njit(nogil=True, cache=True)
def _record_ordered(
    step: np.ndarray, rank: np.ndarray, micro: np.ndarray, seq: np.ndarray, pos: np.ndarray
) -> bool:  # pragma: no cover - compiled
    """Whether rows come ordered by (step, rank, micro, seq, pos), as the recorder writes them."""
    for i in range(1, step.size):
        a = (step[i - 1], rank[i - 1], micro[i - 1], seq[i - 1], pos[i - 1])
        b = (step[i], rank[i], micro[i], seq[i], pos[i])
        if b < a:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _step_partition(step: np.ndarray, bucket: np.ndarray, n_buckets: int) -> np.ndarray:  # pragma: no cover - compiled
    """Row order that sorts rows (grouped by step, in runs) by (step, bucket), stable: the rows with a bucket
    (>= 0) only. A counting sort per run of equal steps."""
    n = step.size
    out = np.empty(n, dtype=np.int64)
    count = np.zeros(n_buckets + 1, dtype=np.int64)
    k = 0
    i = 0
    while i < n:
        j = i
        while j < n and step[j] == step[i]:
            j += 1
        count[:] = 0
        for r in range(i, j):
            if bucket[r] >= 0:
                count[bucket[r] + 1] += 1
        for b in range(n_buckets):
            count[b + 1] += count[b]
        for r in range(i, j):
            b = bucket[r]
            if b >= 0:
                out[k + count[b]] = r
                count[b] += 1
        k += count[n_buckets - 1]
        i = j
    return out[:k].copy()


def record_ordered(step: np.ndarray, rank: np.ndarray, micro: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> bool:
    """Whether token rows come in (step, rank, micro, seq, pos) order (the recorder's file order)."""
    return bool(_record_ordered(step, rank, micro, seq, pos))


def step_partition(step: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """Row indices that order rows of contiguous steps by (step, bucket), stably, leaving out bucket -1: with
    rows in record order, the order of a sort by (step, bucket, rank, micro, seq, pos)."""
    nb = int(bucket.max()) + 1 if bucket.size else 0
    if nb <= 0:
        return np.zeros(0, dtype=np.int64)
    return _step_partition(step, bucket, nb)


@numba.njit(nogil=True, cache=True)
def _gather(a: np.ndarray, order: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(order.size, dtype=a.dtype)
    for i in range(order.size):
        out[i] = a[order[i]]
    return out


def gather(a: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``a[order]`` in one compiled loop (about 4x numpy's fancy indexing on the rows of a step)."""
    return _gather(np.ascontiguousarray(a), order)
