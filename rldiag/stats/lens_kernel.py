"""Compiled passes of the objective lens (:mod:`rldiag.analysis.lens`): token rows -> per-step sufficient sums.

Every quantity the lens reports is a ratio of sums over a step's valid tokens (``kept``, ``w``, ``pos``,
``abs``, ``kadv`` per objective, see :func:`rldiag.analysis.lens._finalize`); these passes compute those sums
for the rows of some whole steps in a few linear loops, compiled with numba (``nogil``: blocks of rows run at
once in threads, and their sums add). The rules themselves come from :mod:`rldiag.stats.definitions`
(validity, CTPO's clip, the batch ESS), compiled here from their one source like the statistics kernel does.

* :func:`lens_pass`: one pass over the rows for every objective. It fills a small table of sums per (step,
  sign of A, bucket of r among every ratio bound the clip-style objectives use, bucket of the rollout weight
  among the TIS/MIS caps), from which PPO, DAPO, dual-clip, CISPO, TIS, MIS and each point of BAPO's search are
  exact sums (the bucket says on which side of every bound a token lies); it sums DCPO and SAPO directly (their
  weights and bounds depend on the token, not only on its buckets) and, for rows in the recorder's order (each
  sequence contiguous, positions increasing, sequence ids increasing within a step), GSPO (per-sequence mean
  log-ratio and advantage) and CTPO (cumulative log-ratio in position order). Each row's columns are read once
  and its ratio ``exp(logp - old_logp)`` computed once; it leaves each valid token's ratio for Trust the Batch.
  The ratios, rollout weights, SAPO gates and ratio buckets of each block of :data:`EXP_BLOCK` rows are
  computed ahead (:func:`block_exps`): the exponentials in SIMD lanes (:mod:`rldiag.stats.exact_exp`), with the
  C library's bits where they are certain and the library itself, in a short loop of its own, for the values
  where they are not, so every result has the bits of a call per row; a ratio's bucket from a lookup table on
  the bits of the number (:func:`bucket_lut`), one load and two comparisons.
* :func:`ttb_pass`: Trust the Batch's sums, once the step's ESS is known.
* :func:`sequence_pass`: GSPO and CTPO over rows taken in a given order, for rows not in the recorder's order
  (:func:`lens_pass` says when they are not; the caller gives this pass the rows' sorted order instead).
"""

from __future__ import annotations

import math
from typing import Final

import numba
import numpy as np

from rldiag.stats import definitions
from rldiag.stats.exact_exp import exp_sure

_token_valid = numba.njit(inline="always")(definitions.token_valid)
_ctpo_clipped = numba.njit(inline="always")(definitions.ctpo_clipped)

SUMS: Final[tuple[str, ...]] = ("kept", "w", "pos", "abs", "kadv")
"""Sums of one objective: kept tokens, weight, positive and total gradient mass, kept advantage mass."""

TABLE_SUMS: Final[tuple[str, ...]] = ("n", "r", "ra", "a", "rw", "rwa")
"""Sums of :func:`lens_pass`'s table per (step, sign of A, ratio bucket, weight bucket): count, ``sum r``,
``sum r |A|``, ``sum |A|``, ``sum r w``, ``sum r w |A|``."""

ACC_SUMS: Final[tuple[str, ...]] = (
    "sr2",
    *(f"dcpo.{q}" for q in SUMS),
    "sapo.w",
    "sapo.pos",
    "sapo.abs",
)
"""Sums of :func:`lens_pass`'s ``acc`` per step: ``sum r^2``, DCPO's :data:`SUMS`, SAPO's weight and gradient
masses (SAPO keeps every token)."""

# slots of the parameter array ``th``
TH_DCPO_EL4, TH_DCPO_EH4, TH_DCPO_LO_MAX, TH_DCPO_HI_MIN, TH_SAPO_POS, TH_SAPO_NEG = range(6)
N_TH: Final[int] = 6

# slots of the flags array of lens_pass: what to compute (W_ROLL: the rollout weight for TIS/MIS; W_LUT: ratio
# buckets from bucket_lut's table rather than by binary search)
W_ROLL, W_DCPO, W_SAPO, W_GSPO, W_CTPO, W_LUT = range(6)
N_WANT: Final[int] = 6


@numba.njit(inline="always")
def _find(uniq: np.ndarray, v: int) -> int:  # pragma: no cover - compiled
    """Index of step ``v`` in the sorted array ``uniq``, -1 when it is not there."""
    j = np.searchsorted(uniq, v)
    return int(j) if j < uniq.size and uniq[j] == v else -1


@numba.njit(inline="always")
def _bucket(edges: np.ndarray, x: float) -> int:  # pragma: no cover - compiled
    """``2 * #(edges < x) + #(edges == x)``: ``x <= e`` is ``bucket <= 2 i + 1`` and ``x >= e`` is
    ``bucket >= 2 i + 1`` for the edge ``e = edges[i]`` (sorted, distinct), exactly. No branch: the compiler
    vectorizes the count (about 2.6 ns for 27 edges here, where a binary search mispredicts)."""
    b = 0
    for j in range(edges.size):
        e = edges[j]
        b += int(e < x) + int(e <= x)
    return b


@numba.njit(inline="always")
def _search_bucket(padded: np.ndarray, n_real: int, x: float) -> int:  # pragma: no cover - compiled
    """:func:`_bucket` by a branch-free binary search over ``padded`` (the edges, then +inf up to a power of two
    entries): a fixed number of steps whatever x is, so nothing mispredicts."""
    base = 0
    n = padded.size
    while n > 1:
        half = n >> 1
        base = base + half if padded[base + half - 1] < x else base
        n -= half
    below = base + int(padded[base] < x)
    return 2 * below + int(below < n_real and padded[below] == x)


@numba.njit(nogil=True, cache=True)
def step_runs(step: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """The step of each run of equal steps in row order (its unique values are the rows' steps, found without
    sorting the rows)."""
    n = step.size
    k = 0
    for i in range(n):
        k += i == 0 or step[i] != step[i - 1]
    out = np.empty(k, dtype=np.int64)
    k = 0
    for i in range(n):
        if i == 0 or step[i] != step[i - 1]:
            out[k] = step[i]
            k += 1
    return out


def bucket_lut(edges: np.ndarray, max_cells: int = 4096) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """A lookup table that gives :func:`_bucket` of a number >= 0 with one load: (counts, edge, base, shift).

    The bits of a float64 >= 0 read as an int64 increase with its value, so ``bits >> shift`` cuts the numbers
    into cells of consecutive values. ``counts[k]`` is the number of edges below cell ``k`` (cell ``k`` is
    ``bits >> shift == base + k - 1``; cell 0 holds everything below the first edge's cell and the last cell
    everything above the last edge's), ``edge[k]`` the one edge inside the cell (NaN if none), so the bucket is
    ``2 * counts[k] + (edge < x) + (edge <= x)``, exactly. None when no cut with at most one edge per cell fits
    in ``max_cells`` cells (edges closer than about 2**-15 of their value, or many powers of two apart): the
    caller uses :func:`_search_bucket` instead. The edges must be sorted, distinct and >= 0.
    """
    e = np.asarray(edges, dtype=np.float64) + 0.0  # -0.0 -> 0.0
    if e.size and (not (e >= 0).all() or not (np.diff(e) > 0).all()):
        raise ValueError("bucket edges must be sorted, distinct and >= 0")
    if e.size == 0:
        return np.zeros(3, np.int64), np.full(3, np.nan), 0, 63
    bits = e.view(np.int64)
    for shift in range(45, 36, -1):  # cells of 2**-7 .. 2**-15 of a power of two, coarsest first
        cell = (bits >> shift) - (bits[0] >> shift)
        n_cells = int(cell[-1]) + 1
        if n_cells > max_cells:
            return None
        if np.all(np.diff(cell) > 0):
            counts = np.empty(n_cells + 2, np.int64)
            counts[0], counts[-1] = 0, e.size
            counts[1:-1] = np.searchsorted(cell, np.arange(n_cells))  # edges in earlier cells
            edge = np.full(n_cells + 2, np.nan)
            edge[cell + 1] = e
            return counts, edge, int(bits[0] >> shift), shift
    return None


@numba.njit(inline="always")
def _lut_bucket(counts: np.ndarray, edge: np.ndarray, base: int, shift: int, x: float) -> int:  # pragma: no cover
    """:func:`_bucket` of ``x >= 0`` (or NaN) from :func:`bucket_lut`'s table: one load, two comparisons."""
    k = int((np.float64(x).view(np.int64) >> shift) - base + 1)
    k = min(max(k, 0), counts.size - 1)
    e = edge[k]
    return 2 * counts[k] + int(e < x) + int(e <= x)


@numba.njit(inline="always")
def _close_sequence(
    gacc: np.ndarray, s: int, n: float, lr: float, pos_aa: float, neg_aa: float, g_lo: float, g_hi: float
) -> None:  # pragma: no cover - compiled
    """GSPO's verdict on one sequence and its sums: s_i = exp(mean lr), A_i = mean A; a clipped sequence drops
    all its tokens, a kept one gives each token the weight s_i."""
    if n == 0.0:
        return
    si = math.exp(lr / n)
    a_mean = (pos_aa - neg_aa) / n
    gacc[s, 5] += 1.0  # sequences of the step
    if (si > g_hi and a_mean > 0) or (si < g_lo and a_mean < 0):
        return
    a = pos_aa + neg_aa
    gacc[s, 0] += n
    gacc[s, 1] += n * si
    gacc[s, 2] += si * pos_aa
    gacc[s, 3] += si * a
    gacc[s, 4] += a


@numba.njit(inline="always")
def _seq_token(
    sn: float,
    slr: float,
    spa: float,
    sna: float,
    L: float,
    c: tuple[float, float, float, float, float],
    lr: float,
    a: float,
    aa: float,
    p: int,
    want_ctpo: bool,
    c_low: float,
    c_high: float,
) -> tuple[float, float, float, float, float, tuple[float, float, float, float, float]]:  # pragma: no cover
    """One valid token of the current sequence: its count, log-ratio and |advantage| added to the sequence's
    running sums, and to CTPO's sums ``c`` (:data:`SUMS`) unless CTPO clips it (``L``: the sequence's log-ratio
    so far); returns them all. The sums stay in registers while a step's rows run (the caller keeps them)."""
    sn += 1.0
    slr += lr
    if a > 0:
        spa += aa
    elif a < 0:
        sna += aa
    if want_ctpo:
        L += lr
        if not _ctpo_clipped(L, a, math.sqrt(p + 1.0), c_low, c_high):
            eL = math.exp(L)
            wa = eL * aa
            c = (c[0] + 1.0, c[1] + eL, c[2] + wa if a > 0 else c[2], c[3] + wa, c[4] + aa)
    return sn, slr, spa, sna, L, c


@numba.njit(inline="always")
def _row5(a: np.ndarray, s: int) -> tuple[float, float, float, float, float]:  # pragma: no cover - compiled
    return a[s, 0], a[s, 1], a[s, 2], a[s, 3], a[s, 4]


@numba.njit(inline="always")
def _put5(a: np.ndarray, s: int, v: tuple[float, float, float, float, float]) -> None:  # pragma: no cover
    a[s, 0], a[s, 1], a[s, 2], a[s, 3], a[s, 4] = v


@numba.njit(inline="always")
def _store_step(
    acc: np.ndarray,
    cacc: np.ndarray,
    s: int,
    d: tuple[float, float, float, float, float],
    sp: tuple[float, float, float, float, float],
    c: tuple[float, float, float, float, float],
) -> None:  # pragma: no cover - compiled
    """Store the sums :func:`lens_pass` keeps in registers while step ``s``'s rows run: ``acc[s, :5]`` (d),
    ``acc[s, 5:9]`` (the first four of sp) and ``cacc[s]`` (c)."""
    _put5(acc, s, d)
    acc[s, 5], acc[s, 6], acc[s, 7], acc[s, 8] = sp[0], sp[1], sp[2], sp[3]
    _put5(cacc, s, c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def next_sequence_start(step: np.ndarray, seq: np.ndarray, i: int) -> int:  # pragma: no cover - compiled
    """The first row at or after ``i`` (0 < i) where (step, seq) differs from the row before it, ``step.size`` if
    none: a cut there splits no sequence."""
    n = step.size
    while i < n and step[i] == step[i - 1] and seq[i] == seq[i - 1]:
        i += 1
    return i


@numba.njit(inline="always")
def _sapo_exponent(r: float, a: float, tau_pos: float, tau_neg: float) -> float:  # pragma: no cover - compiled
    """The exponent of SAPO's gate ``g = 1 / (1 + exp(-tau (r - 1)))``, ``tau`` by the sign of A: one source for the
    block's vectorized gates and the pass's calls of the C library, so both apply the same operations."""
    tau = tau_pos if a > 0 else tau_neg
    return -tau * (r - 1.0)


EXP_BLOCK: Final[int] = 256
"""Rows whose exponentials :func:`lens_pass` computes ahead, in SIMD lanes (:func:`block_exps`)."""


@numba.njit(nogil=True, cache=True, error_model="numpy")
def block_exps(
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    roll: np.ndarray,
    want_w: bool,
    want_sapo: bool,
    tau_pos: float,
    tau_neg: float,
    r: np.ndarray,
    w: np.ndarray,
    g: np.ndarray,
    sure: np.ndarray,
    use_lut: bool,
    r_counts: np.ndarray,
    r_edge: np.ndarray,
    r_base: int,
    r_shift: int,
    rb: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """For the rows of a block (``lp.size`` of them): the ratio ``r = exp(logp - old_logp)``, the rollout weight
    ``w = exp(old_logp - rollout_logp)`` (``want_w``), SAPO's gate ``g = 1 / (1 + exp(-tau (r - 1)))``
    (``want_sapo``; ``tau`` by the sign of A) and, with ``use_lut``, the ratio's bucket ``rb`` from
    :func:`bucket_lut`'s table, each with the very operations :func:`lens_pass` would apply to the row.

    Each exponential is :func:`rldiag.stats.exact_exp.exp_sure` in a loop without a call or a branch (SIMD
    lanes); then, in a short loop of its own, the C library's ``exp`` for the values it was not sure of (about
    4 % of each), so every value has the bits of a call. NaN arguments are sure: an invalid token's ratio is never
    read, and a token without a rollout log-prob only has its weight tested for NaN (a run that recorded none
    sends no row to the C library). ``sure`` is scratch space of at least ``lp.size`` flags. Returns the number
    of values computed by the C library."""
    m = lp.size
    calls = 0
    for j in range(m):
        x = np.float64(lp[j]) - np.float64(olp[j])
        v, ok = exp_sure(x)
        r[j] = v
        sure[j] = ok | (x != x)
    for j in range(m):
        if not sure[j]:
            r[j] = math.exp(np.float64(lp[j]) - np.float64(olp[j]))
            calls += 1
    if want_w:
        for j in range(m):
            x = np.float64(olp[j]) - np.float64(roll[j])
            v, ok = exp_sure(x)
            w[j] = v
            sure[j] = ok | (x != x)
        for j in range(m):
            if not sure[j]:
                w[j] = math.exp(np.float64(olp[j]) - np.float64(roll[j]))
                calls += 1
    if want_sapo:
        for j in range(m):
            v, ok = exp_sure(_sapo_exponent(r[j], np.float64(adv[j]), tau_pos, tau_neg))
            g[j] = 1.0 / (1.0 + v)
            sure[j] = ok
        for j in range(m):
            if not sure[j]:
                g[j] = 1.0 / (1.0 + math.exp(_sapo_exponent(r[j], np.float64(adv[j]), tau_pos, tau_neg)))
                calls += 1
    if use_lut:
        for j in range(m):
            rb[j] = _lut_bucket(r_counts, r_edge, r_base, r_shift, r[j])
    return calls


@numba.njit(nogil=True, cache=True, error_model="numpy")
def lens_pass(  # pragma: no cover - compiled
    step: np.ndarray,
    uniq: np.ndarray,
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    roll: np.ndarray,
    seq: np.ndarray,
    pos: np.ndarray,
    want: np.ndarray,
    tol: float,
    th: np.ndarray,
    r_counts: np.ndarray,
    r_edge: np.ndarray,
    r_base: int,
    r_shift: int,
    r_padded: np.ndarray,
    n_r: int,
    w_edges: np.ndarray,
    g_lo: float,
    g_hi: float,
    c_low: float,
    c_high: float,
    table: np.ndarray,
    acc: np.ndarray,
    gacc: np.ndarray,
    cacc: np.ndarray,
    r_out: np.ndarray,
    span: np.ndarray,
) -> bool:
    """One pass over the rows for every objective: the table of sums the clip-style objectives are read from,
    the sums of DCPO and SAPO, and GSPO's and CTPO's sequence sums.

    ``table[s, side + 1, rb, wb, j]``: sums :data:`TABLE_SUMS` of the valid tokens of step ``uniq[s]`` by sign of
    A, bucket of r among the ratio bounds (:func:`_bucket`; from :func:`bucket_lut`'s table ``r_counts``,
    ``r_edge``, ``r_base``, ``r_shift`` when ``want[W_LUT]``, else by :func:`_search_bucket` in ``r_padded``,
    ``n_r`` edges) and bucket of the rollout weight ``w = exp(old_logp - rollout_logp)`` among ``w_edges`` (the
    last slot ``2 * w_edges.size + 1`` holds tokens without a weight: NaN, or not ``want[W_ROLL]``). PPO, DAPO,
    dual-clip, CISPO, TIS, MIS and every point of BAPO's search are sums over parts of this table, read exactly
    by bucket. ``acc[s]``: ``sum r^2``, DCPO's five :data:`SUMS` (its bounds depend on the token's prior), SAPO's
    weight, positive and total gradient mass (:data:`ACC_SUMS`). ``r_out[i]``: the ratio of valid row i, NaN for
    the others (Trust the Batch's pass, :func:`ttb_pass`). Rows of steps not in ``uniq`` are skipped.

    ``gacc[s, :5]`` and ``cacc[s, :5]``: GSPO's and CTPO's :data:`SUMS` (``gacc[s, 5]``: the step's sequences),
    for the rows taken as they come, which must be in the recorder's order (each sequence's valid rows
    contiguous with increasing ``pos``, sequence ids increasing within a step). ``span[s]`` gets (1, first,
    last) sequence id of the step's valid rows here, for the caller to check the order across blocks of rows.
    Returns False as soon as the order does not hold (the sequence sums are then incomplete and the caller
    computes them with :func:`sequence_pass` in the rows' sorted order; the other sums are complete).
    """
    n = step.size
    no_w = 2 * w_edges.size + 1
    want_w = want[W_ROLL]
    want_dcpo = want[W_DCPO]
    want_sapo = want[W_SAPO]
    want_gspo = want[W_GSPO]
    want_ctpo = want[W_CTPO]
    use_lut = want[W_LUT]
    ok = want_gspo or want_ctpo  # sequences wanted and, so far, in the recorder's order
    # a sequence's running sums (GSPO: valid tokens, log-ratio, positive and negative advantage mass; CTPO: L_t)
    cur_s = -1
    cur_q = 0
    last_pos = 0
    sn = slr = spa = sna = L = 0.0
    last = 0
    s = -2
    # the per-step sums of acc and cacc, kept in registers while the rows of one step run (stored when the step
    # changes): the same additions in the same order, without a store and a reload per row
    zero = (0.0, 0.0, 0.0, 0.0, 0.0)
    d, sp, c = zero, zero, zero  # acc[s, :5] (sr2, DCPO's first four), acc[s, 5:] (DCPO's kadv, SAPO's three)
    r_ahead, w_ahead, g_ahead = np.empty(EXP_BLOCK), np.empty(EXP_BLOCK), np.empty(EXP_BLOCK)
    sure = np.empty(EXP_BLOCK, dtype=np.bool_)
    rb_ahead = np.zeros(EXP_BLOCK, dtype=np.int64)
    for i in range(n):
        j = i % EXP_BLOCK
        if j == 0:  # the next block's exponentials and ratio buckets, ahead of its rows
            b1 = min(n, i + EXP_BLOCK)
            block_exps(
                lp[i:b1],
                olp[i:b1],
                adv[i:b1],
                roll[i:b1],
                want_w,
                want_sapo,
                th[TH_SAPO_POS],
                th[TH_SAPO_NEG],
                r_ahead,
                w_ahead,
                g_ahead,
                sure,
                use_lut,
                r_counts,
                r_edge,
                r_base,
                r_shift,
                rb_ahead,
            )
        if step[i] != last or s == -2:
            if s >= 0:
                _store_step(acc, cacc, s, d, sp, c)
            last = step[i]
            s = _find(uniq, last)
            if s >= 0:
                d, c = _row5(acc, s), _row5(cacc, s)
                sp = (acc[s, 5], acc[s, 6], acc[s, 7], acc[s, 8], 0.0)
        if s < 0:
            r_out[i] = np.nan
            continue
        x = np.float64(lp[i])
        y = np.float64(olp[i])
        a = np.float64(adv[i])
        if not _token_valid(x, y, a, tol):
            r_out[i] = np.nan
            continue
        lr = x - y
        r = r_ahead[j]
        w = w_ahead[j] if want_w else np.nan
        g = g_ahead[j] if want_sapo else 0.0
        side = 1 if a > 0 else (-1 if a < 0 else 0)
        k = True
        if want_dcpo:
            # DCPO's upper bound decreases and its lower bound increases with the prior q <= exp(tol), so a
            # token inside [TH_DCPO_LO_MAX, TH_DCPO_HI_MIN] (the bounds at q's largest value, computed with the
            # same correctly rounded operations) is kept without computing its own bounds
            if side > 0 and r > th[TH_DCPO_HI_MIN]:
                prior = math.exp(y)
                k = not (r > 0.5 + 0.5 * math.sqrt(1.0 + th[TH_DCPO_EH4] / prior))
            elif side < 0 and r < th[TH_DCPO_LO_MAX]:
                prior = math.exp(y)
                v = 1.0 - th[TH_DCPO_EL4] / prior
                if v < 0.0:
                    v = 0.0
                k = not (r < 0.5 + 0.5 * math.sqrt(v))
        r_out[i] = r
        aa = abs(a)
        ra = r * aa
        sr2 = d[0] + r * r
        wb = no_w
        rw = 0.0
        if w == w:
            wb = _bucket(w_edges, w)
            rw = r * w
        rb = rb_ahead[j] if use_lut else _search_bucket(r_padded, n_r, r)
        t = table[s, side + 1, rb, wb]
        t[0] += 1.0
        t[1] += r
        t[2] += ra
        t[3] += aa
        t[4] += rw
        t[5] += rw * aa
        if want_dcpo:
            wk = r if k else 0.0
            wa = wk * aa
            d = (sr2, d[1] + (1.0 if k else 0.0), d[2] + wk, d[3] + (wa if side > 0 else 0.0), d[4] + wa)
            k5 = sp[0] + (aa if k else 0.0)
        else:
            d = (sr2, d[1], d[2], d[3], d[4])
            k5 = sp[0]
        if want_sapo:
            sw = 4.0 * g * (1.0 - g) * r
            swa = sw * aa
            sp = (k5, sp[1] + sw, sp[2] + (swa if side > 0 else 0.0), sp[3] + swa, 0.0)
        else:
            sp = (k5, sp[1], sp[2], sp[3], 0.0)
        if ok:
            q = seq[i]
            p = pos[i]
            if s != cur_s or q != cur_q:
                if want_gspo and cur_s >= 0:
                    _close_sequence(gacc, cur_s, sn, slr, spa, sna, g_lo, g_hi)
                if span[s, 0] and q <= span[s, 2]:
                    ok = False
                    continue
                if not span[s, 0]:
                    span[s, 0] = 1
                    span[s, 1] = q
                span[s, 2] = q
                cur_s, cur_q = s, q
                sn = slr = spa = sna = L = 0.0
            elif want_ctpo and p <= last_pos:
                ok = False
                continue
            last_pos = p
            sn, slr, spa, sna, L, c = _seq_token(sn, slr, spa, sna, L, c, lr, a, aa, p, want_ctpo, c_low, c_high)
    if s >= 0:
        _store_step(acc, cacc, s, d, sp, c)
    if want_gspo and cur_s >= 0 and ok:
        _close_sequence(gacc, cur_s, sn, slr, spa, sna, g_lo, g_hi)
    return ok


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ttb_pass(
    step: np.ndarray, uniq: np.ndarray, adv: np.ndarray, r_out: np.ndarray, ess: np.ndarray, acc: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Trust the Batch: every valid token (a ratio in ``r_out``, not NaN) kept with weight ``min(r, ESS of its
    step)``; sums :data:`SUMS` (the first five) into ``acc[step]``, token by token in row order.

    Each run of rows of one step is summed in registers without a branch: a row without a ratio adds +0.0, which
    leaves these sums (of terms >= 0, from +0.0) exactly as they were, as if it had been skipped."""
    n = step.size
    i = 0
    while i < n:
        st = step[i]
        j = i + 1
        while j < n and step[j] == st:
            j += 1
        s = _find(uniq, st)
        if s >= 0:
            e = ess[s]
            c0, c1, c2, c3, c4 = _row5(acc, s)
            for k in range(i, j):
                r = r_out[k]
                v = r == r
                w = r if r <= e else e
                a = np.float64(adv[k])
                aa = abs(a)
                wa = w * aa
                c0 += 1.0 if v else 0.0
                c1 += w if v else 0.0
                c2 += wa if v and a > 0 else 0.0
                c3 += wa if v else 0.0
                c4 += aa if v else 0.0
            _put5(acc, s, (c0, c1, c2, c3, c4))
        i = j


@numba.njit(nogil=True, cache=True, error_model="numpy")
def sequence_pass(  # pragma: no cover - compiled
    step: np.ndarray,
    uniq: np.ndarray,
    seq: np.ndarray,
    pos: np.ndarray,
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    tol: float,
    order: np.ndarray,
    want_gspo: bool,
    want_ctpo: bool,
    g_lo: float,
    g_hi: float,
    c_low: float,
    c_high: float,
    gacc: np.ndarray,
    cacc: np.ndarray,
) -> bool:
    """GSPO sums into ``gacc[step, :5]`` (and the step's sequence count in ``gacc[step, 5]``) and CTPO sums
    into ``cacc[step, :5]``, over the valid rows taken in the order ``order`` (row indices; empty: as they are).

    Taken as they are, the rows must come in the recorder's order: each sequence's valid rows contiguous with
    increasing ``pos``, and sequence ids increasing within a step (so a sequence cannot reappear later). The
    pass returns False as soon as they do not (the sums are then incomplete: call it again with the rows'
    order by (step, seq, pos)); with ``order`` given it trusts it and returns True.
    """
    n_steps = gacc.shape[0]
    seen = np.zeros(n_steps, dtype=np.bool_)
    last_seq = np.zeros(n_steps, dtype=np.int64)
    n = order.size if order.size else step.size
    check = order.size == 0
    last = 0
    s = -2
    cur_s = -1
    cur_q = 0
    last_pos = 0
    sn = slr = spa = sna = L = 0.0
    for k in range(n):
        i = order[k] if order.size else k
        if step[i] != last or s == -2:
            last = step[i]
            s = _find(uniq, last)
        if s < 0:
            continue
        x = np.float64(lp[i])
        y = np.float64(olp[i])
        a = np.float64(adv[i])
        if not _token_valid(x, y, a, tol):
            continue
        q = seq[i]
        p = pos[i]
        if s != cur_s or q != cur_q:
            if want_gspo and cur_s >= 0:
                _close_sequence(gacc, cur_s, sn, slr, spa, sna, g_lo, g_hi)
            if check:
                if seen[s] and q <= last_seq[s]:
                    return False
                seen[s] = True
                last_seq[s] = q
            cur_s, cur_q = s, q
            sn = slr = spa = sna = L = 0.0
        elif check and want_ctpo and p <= last_pos:
            return False
        last_pos = p
        lr = x - y
        aa = abs(a)
        c = _row5(cacc, s)
        sn, slr, spa, sna, L, c = _seq_token(sn, slr, spa, sna, L, c, lr, a, aa, p, want_ctpo, c_low, c_high)
        _put5(cacc, s, c)
    if want_gspo and cur_s >= 0:
        _close_sequence(gacc, cur_s, sn, slr, spa, sna, g_lo, g_hi)
    return True


def ess_of(sr: np.ndarray, sr2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Trust the Batch's ESS per step from its ``sum r``, ``sum r^2`` and token count (NaN where ``sum r^2`` is
    0): :func:`rldiag.stats.definitions.batch_ess`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ess: np.ndarray = np.where(sr2 > 0, definitions.batch_ess(sr, sr2, n), np.nan)
    return ess


def dcpo_shortcut(el4: float, eh4: float, tol: float) -> tuple[float, float]:
    """DCPO's largest lower bound and smallest upper bound over every prior ``q = exp(old_logp)`` a valid token
    can have (``old_logp <= tol``): a ratio between them is inside its own bounds whatever its prior.

    The bounds are monotone in q and computed with correctly rounded operations (monotone too), at a q above any
    value ``exp(old_logp)`` can round to; so ``r >= lo_max`` implies ``r >= lo(q)`` and ``r <= hi_min`` implies
    ``r <= hi(q)`` exactly, with the very operations :func:`lens_pass` uses.
    """
    q_max = math.exp(tol) * (1.0 + 1e-12)
    v = 1.0 - el4 / q_max
    lo_max = 0.5 + 0.5 * math.sqrt(v if v > 0.0 else 0.0)
    hi_min = 0.5 + 0.5 * math.sqrt(1.0 + eh4 / q_max)
    return lo_max, hi_min


def padded(edges: np.ndarray) -> np.ndarray:
    """``edges`` followed by +inf up to a power of two entries (at least one +inf), for :func:`_search_bucket`."""
    size = 1
    while size <= edges.size:
        size *= 2
    return np.concatenate([edges, np.full(size - edges.size, np.inf)])
