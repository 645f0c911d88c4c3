"""Compiled passes of the objective lens (:mod:`rldiag.analysis.lens`): token rows -> per-step sufficient sums.

Every quantity the lens reports is a ratio of sums over a step's valid tokens (``kept``, ``w``, ``pos``,
``abs``, ``kadv`` per objective, see :func:`rldiag.analysis.lens._finalize`); these passes compute those sums
for the rows of some whole steps in a few linear loops, compiled with numba (``nogil``: several chunks run at
once in threads). The rules themselves come from :mod:`rldiag.stats.definitions` (validity, CTPO's clip,
the batch ESS), compiled here from their one source like the statistics kernel does.

* :func:`token_pass`: one pass over the rows for every token-level objective (PPO, DAPO, dual-clip, DCPO,
  CISPO, SAPO, TIS, MIS), the step's ``n``, ``sum |A|``, ``sum r``, ``sum r^2``, and BAPO's per-(step, sign of
  A, ratio bucket) table; it leaves each valid token's ratio in ``r_out`` for Trust the Batch.
* :func:`ttb_pass`: Trust the Batch's sums, once the step's ESS is known.
* :func:`sequence_pass`: GSPO (per-sequence mean log-ratio and advantage) and CTPO (cumulative log-ratio in
  position order). Rows in the recorder's order (each sequence contiguous, positions increasing, sequence ids
  increasing within a step) are read as they are; the pass says when they are not, and the caller gives it
  the rows' sorted order instead.
"""

from __future__ import annotations

import math
from typing import Final

import numba
import numpy as np

from rldiag.stats import definitions

_token_valid = numba.njit(inline="always")(definitions.token_valid)
_ctpo_clipped = numba.njit(inline="always")(definitions.ctpo_clipped)

TOKEN_OBJECTIVES: Final[tuple[str, ...]] = ("ppo", "dapo", "dual_clip", "dcpo", "cispo", "sapo", "tis", "mis")
"""Objectives whose verdict and weight depend on one token only (their sums come from :func:`token_pass`)."""

SUMS: Final[tuple[str, ...]] = ("kept", "w", "pos", "abs", "kadv", "n", "aadv")
"""Sums of one objective: kept tokens, weight, positive and total gradient mass, kept advantage mass; then its
own token count and advantage mass (TIS and MIS only: tokens with a rollout weight)."""

STEP_SUMS: Final[tuple[str, ...]] = ("n", "aadv", "sr", "sr2")
"""Sums of a step's valid tokens: count, ``sum |A|``, ``sum r``, ``sum r^2``."""

N_STEP: Final[int] = len(STEP_SUMS)
N_SUMS: Final[int] = len(SUMS)
BAPO_SUMS: Final[tuple[str, ...]] = ("n", "r", "ra", "a")
"""Sums per (step, sign of A, ratio bucket) of BAPO's table: count, ``sum r``, ``sum r |A|``, ``sum |A|``."""

# slots of the thresholds array ``th`` (filled by rldiag.analysis.lens from LensParams)
TH_PPO_LO, TH_PPO_HI = 0, 1
TH_DAPO_LO, TH_DAPO_HI = 2, 3
TH_DUAL_LO, TH_DUAL_HI, TH_DUAL_C = 4, 5, 6
TH_DCPO_EL4, TH_DCPO_EH4 = 7, 8
TH_CISPO_C = 9
TH_SAPO_POS, TH_SAPO_NEG = 10, 11
TH_TIS_LO, TH_TIS_HI, TH_TIS_CAP = 12, 13, 14
TH_MIS_LO, TH_MIS_HI, TH_MIS_LOW_W, TH_MIS_CAP = 15, 16, 17, 18
N_TH: Final[int] = 19

_PPO, _DAPO, _DUAL, _DCPO, _CISPO, _SAPO, _TIS, _MIS = range(8)
_BAPO = 8
N_FLAGS: Final[int] = 9
"""``flags[k]``: whether objective ``TOKEN_OBJECTIVES[k]`` is wanted (``flags[8]``: BAPO's table)."""

_OFF = N_STEP  # column of the first objective's first sum in ``acc``


@numba.njit(inline="always")
def _add(
    acc: np.ndarray, s: int, o: int, kept: bool, w: float, aa: float, side: int
) -> None:  # pragma: no cover - compiled
    """One token's contribution to objective ``o``'s sums (w is its weight; 0 when dropped)."""
    base = _OFF + o * N_SUMS
    if kept:
        wa = w * aa
        acc[s, base] += 1.0
        acc[s, base + 1] += w
        if side > 0:
            acc[s, base + 2] += wa
        acc[s, base + 3] += wa
        acc[s, base + 4] += aa


@numba.njit(inline="always")
def _clip_kept(r: float, side: int, lo: float, hi: float) -> bool:  # pragma: no cover - compiled
    """Sign-aware PPO clip: A > 0 keeps r <= hi, A < 0 keeps r >= lo, A == 0 keeps every token."""
    if side > 0:
        return r <= hi
    if side < 0:
        return r >= lo
    return True


@numba.njit(nogil=True, cache=True)
def step_index(step: np.ndarray, uniq: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Index in the sorted array ``uniq`` of each row's step (-1 for a step not in it): rows of one step
    usually follow each other, so the last answer is tried first."""
    n = step.size
    out = np.empty(n, dtype=np.int64)
    last_v = 0
    last_i = -2  # nothing looked up yet
    for i in range(n):
        v = step[i]
        if v != last_v or last_i == -2:
            j = np.searchsorted(uniq, v)
            last_i = j if j < uniq.size and uniq[j] == v else -1
            last_v = v
        out[i] = last_i
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def token_pass(  # pragma: no cover - compiled
    sidx: np.ndarray,
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    roll: np.ndarray,
    has_roll: bool,
    tol: float,
    flags: np.ndarray,
    th: np.ndarray,
    bapo_edges: np.ndarray,
    acc: np.ndarray,
    bapo: np.ndarray,
    r_out: np.ndarray,
) -> None:
    """Sums of every token-level objective into ``acc[step, N_STEP + k * N_SUMS + j]`` (objective k of
    :data:`TOKEN_OBJECTIVES`, sum j of :data:`SUMS`) and the step's :data:`STEP_SUMS` into ``acc[step, :4]``.

    ``bapo[step, side + 1, bucket, j]``: BAPO's table (sums :data:`BAPO_SUMS`), the bucket of r among the sorted
    ``bapo_edges`` being ``2 * #(edges < r) + [r is an edge]`` (so ``r <= e`` and ``r >= e`` are exact reads).
    ``r_out[i]``: the ratio of valid row i, NaN for the others. Rows with ``sidx < 0`` are skipped.
    """
    n = sidx.size
    n_edges = bapo_edges.size
    for i in range(n):
        s = sidx[i]
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
        r = math.exp(lr)
        r_out[i] = r
        aa = abs(a)
        side = 1 if a > 0 else (-1 if a < 0 else 0)
        acc[s, 0] += 1.0
        acc[s, 1] += aa
        acc[s, 2] += r
        acc[s, 3] += r * r
        if flags[_PPO]:
            k = _clip_kept(r, side, th[TH_PPO_LO], th[TH_PPO_HI])
            _add(acc, s, _PPO, k, r, aa, side)
        if flags[_DAPO]:
            k = _clip_kept(r, side, th[TH_DAPO_LO], th[TH_DAPO_HI])
            _add(acc, s, _DAPO, k, r, aa, side)
        if flags[_DUAL]:
            k = _clip_kept(r, side, th[TH_DUAL_LO], th[TH_DUAL_HI]) and not (side < 0 and r > th[TH_DUAL_C])
            _add(acc, s, _DUAL, k, r, aa, side)
        if flags[_DCPO]:
            # DCPO's upper bound is >= 1 and its lower bound <= 1 (exactly, in floating point too), so the
            # prior's bounds are computed only for the tokens they can drop
            k = True
            if side > 0 and r > 1.0:
                q = math.exp(y)
                k = not (r > 0.5 + 0.5 * math.sqrt(1.0 + th[TH_DCPO_EH4] / q))
            elif side < 0 and r < 1.0:
                q = math.exp(y)
                v = 1.0 - th[TH_DCPO_EL4] / q
                if v < 0.0:
                    v = 0.0
                k = not (r < 0.5 + 0.5 * math.sqrt(v))
            _add(acc, s, _DCPO, k, r, aa, side)
        if flags[_CISPO]:
            c = th[TH_CISPO_C]
            _add(acc, s, _CISPO, True, r if r <= c else c, aa, side)
        if flags[_SAPO]:
            tau = th[TH_SAPO_POS] if a > 0 else th[TH_SAPO_NEG]
            g = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
            _add(acc, s, _SAPO, True, 4.0 * g * (1.0 - g) * r, aa, side)
        if has_roll and (flags[_TIS] or flags[_MIS]):
            w = math.exp(y - np.float64(roll[i]))
            if w == w:
                if flags[_TIS]:
                    base = _OFF + _TIS * N_SUMS
                    acc[s, base + 5] += 1.0
                    acc[s, base + 6] += aa
                    k = _clip_kept(r, side, th[TH_TIS_LO], th[TH_TIS_HI])
                    cap = th[TH_TIS_CAP]
                    _add(acc, s, _TIS, k, r * w if w <= cap else cap * r, aa, side)
                if flags[_MIS]:
                    base = _OFF + _MIS * N_SUMS
                    acc[s, base + 5] += 1.0
                    acc[s, base + 6] += aa
                    k = _clip_kept(r, side, th[TH_MIS_LO], th[TH_MIS_HI])
                    k = k and w >= th[TH_MIS_LOW_W] and w <= th[TH_MIS_CAP]
                    _add(acc, s, _MIS, k, r * w, aa, side)
        if flags[_BAPO]:
            lo = 0
            hi = n_edges
            while lo < hi:  # edges below r
                mid = (lo + hi) // 2
                if bapo_edges[mid] < r:
                    lo = mid + 1
                else:
                    hi = mid
            b = 2 * lo + (1 if lo < n_edges and bapo_edges[lo] == r else 0)
            t = side + 1
            bapo[s, t, b, 0] += 1.0
            bapo[s, t, b, 1] += r
            bapo[s, t, b, 2] += r * aa
            bapo[s, t, b, 3] += aa


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ttb_pass(
    sidx: np.ndarray, adv: np.ndarray, r_out: np.ndarray, ess: np.ndarray, acc: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Trust the Batch: every valid token kept with weight ``min(r, ESS of its step)``; sums :data:`SUMS`
    (the first five) into ``acc[step]``."""
    for i in range(sidx.size):
        r = r_out[i]
        if r != r:
            continue
        s = sidx[i]
        e = ess[s]
        w = r if r <= e else e
        a = np.float64(adv[i])
        aa = abs(a)
        wa = w * aa
        acc[s, 0] += 1.0
        acc[s, 1] += w
        if a > 0:
            acc[s, 2] += wa
        acc[s, 3] += wa
        acc[s, 4] += aa


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


@numba.njit(nogil=True, cache=True, error_model="numpy")
def sequence_pass(  # pragma: no cover - compiled
    sidx: np.ndarray,
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
    n = order.size if order.size else sidx.size
    check = order.size == 0
    cur_s = -1
    cur_q = 0
    last_pos = 0
    sn = 0.0
    slr = 0.0
    spa = 0.0
    sna = 0.0
    L = 0.0
    for k in range(n):
        i = order[k] if order.size else k
        s = sidx[i]
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
        elif check and p <= last_pos:
            return False
        last_pos = p
        lr = x - y
        aa = abs(a)
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
                cacc[s, 0] += 1.0
                cacc[s, 1] += eL
                if a > 0:
                    cacc[s, 2] += eL * aa
                cacc[s, 3] += eL * aa
                cacc[s, 4] += aa
    if want_gspo and cur_s >= 0:
        _close_sequence(gacc, cur_s, sn, slr, spa, sna, g_lo, g_hi)
    return True


def ess_of(acc: np.ndarray) -> np.ndarray:
    """Trust the Batch's ESS per step from :func:`token_pass`'s step sums (NaN where ``sum r^2`` is 0)."""
    sr, sr2, n = acc[:, 2], acc[:, 3], acc[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sr2 > 0, _batch_ess_np(sr, sr2, n), np.nan)


def _batch_ess_np(sr: np.ndarray, sr2: np.ndarray, n: np.ndarray) -> np.ndarray:
    out: np.ndarray = definitions.batch_ess(sr, sr2, n)
    return out
