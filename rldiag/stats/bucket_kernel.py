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

from rldiag.config import RecorderConfig
from rldiag.stats import definitions, kernel

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


_LOG_MARGIN = 1e-9
"""Log-probabilities this close to the log of a probability edge are bucketed through ``exp`` (exactly as
defined); the others by comparing log-probabilities with the edges' logs, which gives the same bucket: exp and
log err by about 1e-16 relative, far inside the margin."""


_PROB_EDGES_T = tuple(float(e) for e in PROB_EDGES)
_PROB_LOG_EDGES_T = tuple(float(v) for v in np.log(np.array(PROB_EDGES[:-1])))
_NEAR = -2
"""What :func:`_prob_bucket_log` gives a log-probability within the margin of an edge's log."""


@numba.njit(inline="always")
def _prob_bucket_log(x: float) -> int:  # pragma: no cover - compiled
    """Bucket of a log-probability by comparing it with the edges' logs (branch-free: it vectorizes); -1 when
    not finite, :data:`_NEAR` within :data:`_LOG_MARGIN` of an edge's log (then :func:`_prob_bucket_exact`)."""
    b = 0
    near = False
    for k in range(len(_PROB_LOG_EDGES_T)):  # the edges below p, in log space
        b += x > _PROB_LOG_EDGES_T[k]
        near |= abs(x - _PROB_LOG_EDGES_T[k]) <= _LOG_MARGIN
    b = _NEAR if near else b
    return b if math.isfinite(x) else -1


@numba.njit(inline="always")
def _prob_bucket_exact(x: float) -> int:  # pragma: no cover - compiled
    """The definition: p = exp(x) against the edges (x finite)."""
    last = len(_PROB_EDGES_T) - 1
    p = math.exp(x)
    b = 0
    while b < last and p > _PROB_EDGES_T[b]:
        b += 1
    if p > _PROB_EDGES_T[last]:
        b = last
    return b if p > _PROB_EDGES_T[0] else 0


@numba.njit(inline="always")
def _prob_fill(vals: np.ndarray, t0: int, m: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Probability bucket of ``vals[t0 + u]`` into ``out[u]``, u < m: a vectorized pass, then the rare values
    near an edge by the definition."""
    for u in range(m):
        out[u] = _prob_bucket_log(np.float64(vals[t0 + u]))
    for u in range(m):
        if out[u] == _NEAR:
            out[u] = _prob_bucket_exact(np.float64(vals[t0 + u]))


@numba.njit(inline="always")
def _route_bucket(x: float, edges: np.ndarray) -> int:  # pragma: no cover - compiled
    top = edges.size - 1  # index of the "== 1" bucket
    b = 0
    for k in range(1, top):  # the edges at or below x (branch-free: x is often random)
        b += x >= edges[k]
    b = top if x == 1.0 else b
    return b if (x >= 0.0) & (x <= 1.0) else -1  # NaN and out-of-range values get no bucket


@numba.njit(nogil=True, cache=True)
def _prob_buckets(roll: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(roll.size, dtype=np.int64)
    _prob_fill(roll, 0, roll.size, out)
    return out


@numba.njit(nogil=True, cache=True)
def _route_buckets(route: np.ndarray, edges: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(route.size, dtype=np.int64)
    for i in range(route.size):
        out[i] = _route_bucket(np.float64(route[i]), edges)
    return out


@numba.njit(nogil=True, cache=True)
def _decile_buckets(
    step: np.ndarray, pos: np.ndarray, steps: np.ndarray, longest: np.ndarray, nb: int
) -> np.ndarray:  # pragma: no cover - compiled
    n = step.size
    out = np.empty(n, dtype=np.int64)
    top = 0
    for i in range(n):
        if i == 0 or step[i] != step[i - 1]:
            top = longest[np.searchsorted(steps, step[i])]
        b = (np.int64(pos[i]) * nb) // top if top != 0 else 0
        out[i] = min(max(b, 0), nb - 1)
    return out


@numba.njit(nogil=True, cache=True)
def _run_longest(step: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    n = step.size
    rs = np.empty(n, dtype=np.int64)
    rl = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        p = np.int64(pos[i]) + 1
        if i == 0 or step[i] != step[i - 1]:
            rs[k] = step[i]
            rl[k] = p
            k += 1
        elif p > rl[k - 1]:
            rl[k - 1] = p
    return rs[:k].copy(), rl[:k].copy()


def step_longest(step: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each step's longest response (``max(pos) + 1``) from its rows (any order): sorted steps and lengths."""
    rs, rl = _run_longest(step, pos)  # runs of equal steps (one per step in the recorder's order)
    if rs.size == 0:
        return rs, rl
    order = np.argsort(rs, kind="stable")
    rs, rl = rs[order], rl[order]
    first = np.flatnonzero(np.concatenate([[True], rs[1:] != rs[:-1]]))
    return rs[first], np.maximum.reduceat(rl, first)


def decile_buckets(step: np.ndarray, pos: np.ndarray, steps: np.ndarray, longest: np.ndarray, nb: int) -> np.ndarray:
    """Position bucket of each row: ``nb`` equal parts of its step's longest response (``longest[k]``: positions
    of ``steps[k]``, sorted), clipped to [0, nb): ``clip(pos * nb // longest, 0, nb - 1)``."""
    return _decile_buckets(step, pos, steps.astype(np.int64), longest.astype(np.int64), int(nb))


def buckets(by: str, values: np.ndarray) -> np.ndarray:
    """Bucket of each token (-1: none) for ``by="prob"`` (``values`` = rollout_logp) or ``"route"``."""
    if by == "prob":
        return _prob_buckets(values)
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


# --- the bucket tables' statistics, accumulated in place (no reordering of the rows) ---
BUCKET_STATS: Final[tuple[str, ...]] = (
    "n",
    "n_masked",
    "n_clip_low",
    "n_clip_high",
    "n_ent",
    "s_ent",
    "s_rm1",
    "s_rm1sq",
    "n_mm",
    "s_mm_d",
    "s_mm_k3",
    "n_mm_extreme",
)
"""The statistics :func:`bucket_records` computes: every one the bucket tables read (``needed_stats`` of
``BUCKET_METRICS`` and ``PROB_BUCKET_METRICS``, plus ``n``, ``n_mm`` and ``n_masked``)."""

_MAX_SLOTS = 1 << 16
"""Most (bucket, rank/micro) records of one step that :func:`bucket_records` accumulates at once."""

_W = kernel.W
_expm1 = kernel._expm1
_LN2 = math.log(2.0)
_BLOCK = 1024
"""Rows whose elementwise values are computed before the scan adds them to their records: the temporaries of
a block stay in the core's cache (a whole step's, 70,000 rows of the recorder's benchmark run, did not)."""

KIND_IDS, KIND_DECILE, KIND_WIDTH, KIND_PROB, KIND_ROUTE = 0, 1, 2, 3, 4
"""How :func:`_bucket_steps` finds a row's bucket: given ids; position deciles of the step's longest response;
fixed-width positions; probability buckets of ``rollout_logp``; routing buckets of ``route_agree``."""

OK, TOO_MANY, NOT_ORDERED = 0, 1, 2
"""Outcomes of :func:`_bucket_steps`: records; a step with more than ``max_slots`` (bucket, rank/micro)
combinations; rows not in the recorder's order (``check_order``)."""


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _bucket_steps(
    step: np.ndarray,
    rank: np.ndarray,
    micro: np.ndarray,
    seq: np.ndarray,
    pos: np.ndarray,
    ids: np.ndarray,
    vals: np.ndarray,
    kind: int,
    param: int,
    top_steps: np.ndarray,
    top_len: np.ndarray,
    edges: np.ndarray,
    check_order: bool,
    max_slots: int,
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    ent: np.ndarray,
    roll: np.ndarray,
    has_ent: bool,
    has_roll: bool,
    tol: float,
    lo_thr: float,
    hi_thr: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled
    """Per record (step, bucket, rank, micro), in that order: keys, :data:`BUCKET_STATS` and the sum of |d|,
    and :data:`OK`; or nothing and :data:`TOO_MANY` / :data:`NOT_ORDERED`.

    Rows come in runs of equal steps (each run a whole step) and, within a step, in (rank, micro) runs (checked
    with seq and pos when ``check_order``). A row's bucket (-1: none) follows ``kind`` (:data:`KIND_IDS`:
    ``ids``; :data:`KIND_DECILE`: ``param`` parts of the step's longest response, ``top_len`` of ``top_steps``
    when given, else from the step's own rows; :data:`KIND_WIDTH`: ``pos // param``; :data:`KIND_PROB` /
    :data:`KIND_ROUTE`: of ``vals``).

    The kernel's passes for these statistics (valid, ratio, clip, entropy, mismatch and the extreme count of
    the correction pass) with the same operations: per block of a step's rows, the elementwise values in loops
    of their own (they vectorize, as in the kernel), then a scan in file order that adds each token's values to
    its record's lane ``j % W`` (j: the token's index within its record), the kernel's order on the rows
    gathered into (step, bucket, rank, micro, seq, pos) order. So the results are bit-identical, without the
    gather."""
    n = step.size
    cap = 256  # records; the arrays grow by doubling (no counting pass)
    keys = np.empty((cap, 4), dtype=np.int64)
    S = np.zeros((cap, 12))
    absd = np.zeros(cap)
    longest = 0
    i = 0
    while i < n:
        j = i
        while j < n and step[j] == step[i]:
            j += 1
        if check_order and j < n and step[j] < step[i]:
            return keys[:0], S[:0], absd[:0], NOT_ORDERED
        longest = max(longest, j - i)
        i = j
    b_s = np.empty(longest, dtype=np.int64)
    blk = min(longest, _BLOCK)
    ok_s = np.empty(blk, dtype=np.int64)
    y_s = np.empty(blk)
    y2_s = np.empty(blk)
    clo_s = np.empty(blk, dtype=np.int64)
    chi_s = np.empty(blk, dtype=np.int64)
    e_s = np.empty(blk)
    eu_s = np.empty(blk, dtype=np.int64)
    d_s = np.empty(blk)
    du_s = np.empty(blk, dtype=np.int64)
    ext_s = np.empty(blk, dtype=np.int64)
    k3_s = np.empty(blk)
    a_s = np.empty(blk)
    out = 0
    i = 0
    while i < n:
        j = i
        n_rm = 1
        top: int = 0
        while j < n and step[j] == step[i]:
            if j > i:
                if rank[j] != rank[j - 1] or micro[j] != micro[j - 1]:
                    n_rm += 1
                if check_order:
                    prev = (rank[j - 1], micro[j - 1], seq[j - 1], pos[j - 1])
                    cur = (rank[j], micro[j], seq[j], pos[j])
                    if cur < prev:
                        return keys[:0], S[:0], absd[:0], NOT_ORDERED
            if kind == KIND_DECILE:
                top = max(top, int(pos[j]) + 1)
            j += 1
        m = j - i
        if kind == KIND_DECILE and top_steps.size:
            k = np.searchsorted(top_steps, step[i])
            top = int(top_len[k]) if k < top_steps.size and top_steps[k] == step[i] else top
        # each row's bucket, one loop per kind (they vectorize)
        if kind == KIND_IDS:
            for u in range(m):
                b_s[u] = ids[i + u]
        elif kind == KIND_DECILE:
            for u in range(m):
                bd = (np.int64(pos[i + u]) * param) // top if top != 0 else 0
                b_s[u] = min(max(bd, 0), param - 1)
        elif kind == KIND_WIDTH:
            for u in range(m):
                b_s[u] = np.int64(pos[i + u]) // param
        elif kind == KIND_PROB:
            _prob_fill(vals, i, m, b_s)
        else:
            for u in range(m):
                b_s[u] = _route_bucket(np.float64(vals[i + u]), edges)
        nbs = 0
        for u in range(m):
            nbs = max(nbs, b_s[u] + 1)
        if nbs * n_rm > max_slots:
            return keys[:0], S[:0], absd[:0], TOO_MANY
        ns = nbs * n_rm
        cnt = np.zeros(ns, dtype=np.int64)
        ints = np.zeros((ns, 6), dtype=np.int64)  # n, clip low, clip high, n_ent, n_mm, extreme
        acc = np.zeros((ns, 5, _W))  # s_rm1, s_rm1sq, s_ent, s_mm_d, s_mm_k3 by lane
        sabs = np.zeros(ns)
        rm_rank = np.empty(n_rm, dtype=np.int64)
        rm_micro = np.empty(n_rm, dtype=np.int64)
        rm = 0
        rm_rank[0] = rank[i]
        rm_micro[0] = micro[i]
        for u0 in range(0, m, blk):
            u1 = min(m, u0 + blk)
            mb = u1 - u0
            t0 = i + u0
            for v in range(mb):
                t = t0 + v
                x_lp = np.float64(lp[t])
                x_olp = np.float64(olp[t])
                x_a = np.float64(adv[t])
                ok = _token_valid(x_lp, x_olp, x_a, tol)
                ok_s[v] = ok
                y_s[v] = x_lp - x_olp if ok else 0.0
                a_s[v] = x_a if ok else 0.0
            for v in range(mb):  # r - 1, in a loop of its own so that it vectorizes
                y_s[v] = _expm1(y_s[v])
            for v in range(mb):
                y = y_s[v]
                y2_s[v] = y * y
                a = a_s[v]
                ok = ok_s[v] != 0
                r = y + 1.0
                clo_s[v] = (a < 0.0) & (ok & (r < lo_thr))
                chi_s[v] = (a > 0.0) & (ok & (r > hi_thr))
            if has_ent:
                for v in range(mb):
                    e = np.float64(ent[t0 + v])
                    use = (ok_s[v] != 0) & math.isfinite(e)
                    eu_s[v] = use
                    e_s[v] = e if use else 0.0
            if has_roll:
                for v in range(mb):
                    d = np.float64(olp[t0 + v]) - np.float64(roll[t0 + v])
                    use = (ok_s[v] != 0) & math.isfinite(d)
                    du_s[v] = use
                    d_s[v] = d if use else 0.0
                    ext_s[v] = use & (abs(d) > _LN2)
                for v in range(mb):  # w - 1 - d
                    k3_s[v] = _expm1(d_s[v]) - d_s[v]
            for v in range(mb):
                u = u0 + v
                t = t0 + v
                if u > 0 and (rank[t] != rank[t - 1] or micro[t] != micro[t - 1]):
                    rm += 1
                    rm_rank[rm] = rank[t]
                    rm_micro[rm] = micro[t]
                b = b_s[u]
                if b < 0:
                    continue
                k = b * n_rm + rm
                lane = cnt[k] & (_W - 1)  # cnt >= 0; W is a power of two
                cnt[k] += 1
                ints[k, 0] += ok_s[v]
                ints[k, 1] += clo_s[v]
                ints[k, 2] += chi_s[v]
                acc[k, 0, lane] += y_s[v]
                acc[k, 1, lane] += y2_s[v]
                if has_ent:
                    ints[k, 3] += eu_s[v]
                    acc[k, 2, lane] += e_s[v]
                if has_roll:
                    d = d_s[v]
                    ints[k, 4] += du_s[v]
                    ints[k, 5] += ext_s[v]
                    acc[k, 3, lane] += d
                    acc[k, 4, lane] += k3_s[v]
                    sabs[k] += abs(d)
        used = 0
        for k in range(ns):
            used += cnt[k] > 0
        if out + used > cap:
            cap = max(2 * cap, out + used)
            keys2 = np.empty((cap, 4), dtype=np.int64)
            S2 = np.zeros((cap, 12))
            absd2 = np.zeros(cap)
            keys2[:out] = keys[:out]
            S2[:out] = S[:out]
            absd2[:out] = absd[:out]
            keys, S, absd = keys2, S2, absd2
        for k in range(ns):  # (bucket, rank, micro) order: rank/micro runs come sorted within a step
            if cnt[k] == 0:
                continue
            keys[out, 0] = step[i]
            keys[out, 1] = k // n_rm
            keys[out, 2] = rm_rank[k % n_rm]
            keys[out, 3] = rm_micro[k % n_rm]
            row = S[out]
            row[0] = ints[k, 0]
            row[1] = cnt[k]
            row[2] = ints[k, 1]
            row[3] = ints[k, 2]
            row[4] = ints[k, 3]
            row[8] = ints[k, 4]
            row[11] = ints[k, 5]
            for c, col in ((0, 6), (1, 7), (2, 5), (3, 9), (4, 10)):
                s = 0.0
                for lane in range(_W):
                    s += acc[k, c, lane]
                row[col] = s
            absd[out] = sabs[k]
            out += 1
        i = j
    return keys[:out].copy(), S[:out].copy(), absd[:out].copy(), OK


_NO_I64 = np.zeros(0, dtype=np.int64)
_NO_I32 = np.zeros(0, dtype=np.int32)
_NO_F32 = np.zeros(0, dtype=np.float32)


def _i64(a: np.ndarray | None) -> np.ndarray:
    return _NO_I64 if a is None else np.ascontiguousarray(a, dtype=np.int64)


def _i32(a: np.ndarray | None) -> np.ndarray:
    return _NO_I32 if a is None else np.ascontiguousarray(a, dtype=np.int32)


def bucket_steps(
    step: np.ndarray,
    rank: np.ndarray,
    micro: np.ndarray,
    seq: np.ndarray | None,
    pos: np.ndarray | None,
    kind: int,
    *,
    ids: np.ndarray | None = None,
    values: np.ndarray | None = None,
    param: int = 0,
    tops: tuple[np.ndarray, np.ndarray] | None = None,
    logp: np.ndarray,
    old_logp: np.ndarray,
    adv: np.ndarray,
    entropy: np.ndarray | None,
    rollout_logp: np.ndarray | None,
    cfg: RecorderConfig,
    check_order: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | int:
    """The bucket tables' records of token rows in runs of whole steps, each step's rows in the recorder's order
    ((rank, micro, seq, pos); checked when ``check_order``, which needs ``seq`` and ``pos``), bucketed as
    ``kind`` says (:data:`KIND_IDS`, ``ids`` with -1 for none; :data:`KIND_DECILE`, ``param`` parts of the
    step's longest response, from ``tops`` = (sorted steps, longest) when given, else from the step's rows;
    :data:`KIND_WIDTH`, ``pos // param``; :data:`KIND_PROB` / :data:`KIND_ROUTE`, of ``values``):
    ``(keys [n, 4] = step, bucket, rank, micro; stats [n, len(BUCKET_STATS)]; sum of |d| [n])``, records in key
    order. :data:`TOO_MANY` or :data:`NOT_ORDERED` instead when the rows cannot be accumulated in place (then
    gather and run the kernel)."""
    f32 = kernel._f32
    c = kernel.config_array(cfg)  # the values, and the thresholds, exactly as the kernel derives them
    edges = np.array(ROUTE_EDGES if kind == KIND_ROUTE else PROB_EDGES)
    top_steps, top_len = (_NO_I64, _NO_I64) if tops is None else (_i64(tops[0]), _i64(tops[1]))
    if kind in (KIND_PROB, KIND_ROUTE) and values is None:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, len(BUCKET_STATS))), np.zeros(0)
    keys, stats, sums, status = _bucket_steps(
        _i64(step),
        _i32(rank),
        _i32(micro),
        _i64(seq) if check_order else _NO_I64,
        _i32(pos) if (check_order or kind in (KIND_DECILE, KIND_WIDTH)) else _NO_I32,
        _i64(ids),
        f32(values),
        int(kind),
        int(param),
        top_steps,
        top_len,
        edges,
        bool(check_order),
        _MAX_SLOTS,
        f32(logp),
        f32(old_logp),
        f32(adv),
        f32(entropy),
        f32(rollout_logp),
        entropy is not None,
        rollout_logp is not None,
        c[kernel.C_LOGP_TOLERANCE],
        1.0 - c[kernel.C_EPS_LOW],
        1.0 + c[kernel.C_EPS_HIGH],
    )
    return (keys, stats, sums) if status == OK else int(status)


def bucket_records(
    step: np.ndarray,
    rank: np.ndarray,
    micro: np.ndarray,
    bucket: np.ndarray,
    logp: np.ndarray,
    old_logp: np.ndarray,
    adv: np.ndarray,
    entropy: np.ndarray | None,
    rollout_logp: np.ndarray | None,
    cfg: RecorderConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The bucket tables' records of token rows in the recorder's order ((step, rank, micro, seq, pos), steps
    contiguous) with each row's ``bucket`` (-1: none): ``(keys [n, 4] = step, bucket, rank, micro; stats [n,
    len(BUCKET_STATS)]; sum of |d| [n])``, records in key order. None when a step has too many (bucket,
    rank/micro) combinations to accumulate at once (then gather and run the kernel instead)."""
    if bucket.size == 0 or int(bucket.max()) < 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, len(BUCKET_STATS))), np.zeros(0)
    got = bucket_steps(
        step,
        rank,
        micro,
        None,
        None,
        KIND_IDS,
        ids=bucket,
        logp=logp,
        old_logp=old_logp,
        adv=adv,
        entropy=entropy,
        rollout_logp=rollout_logp,
        cfg=cfg,
        check_order=False,
    )
    return None if isinstance(got, int) else got
