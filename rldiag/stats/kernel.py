"""The statistics kernel: records (micro-batches at one step) -> their sufficient statistics.

This is the single implementation of every per-token statistic of metrics-spec section 2. The recorder runs
it in its background thread on host copies of the tensors; the analysis layer runs it on token rows read back
from Parquet (recompute with another configuration, ``rldiag import``). It is one fused pass per record,
compiled with numba (``nogil``, so several threads run it at once); no I/O, no torch.

Every statistic is declared in :data:`STATS` with how it merges (sum, min, max, log-sum-exp, histogram
counts, vector sum, set union), so the statistics of micro-batches, ranks and files combine exactly (the
metrics-spec exactness rule). Metric specs in :mod:`rldiag.metrics.registry` name the statistics they need.

Token layout: the masked-in tokens of all records, concatenated, each sequence's tokens contiguous and in
position order; ``seq_off`` gives each sequence's token range and ``rec_off`` each record's sequence range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import numba
import numpy as np

from rldiag.config import RecorderConfig
from rldiag.stats import hist

MergeKind = Literal["sum", "min", "max", "lse", "hist_mag", "hist_signed", "vec_sum", "set"]


@dataclass(frozen=True)
class StatDecl:
    """A sufficient statistic: its column in the statistics table, how it merges, and what it is."""

    name: str
    merge: MergeKind
    doc: str
    config_dependent: bool = False
    """True when its value depends on the clip settings (recomputed from token rows for another config)."""


_DECLS: Final[tuple[StatDecl, ...]] = (
    StatDecl("n", "sum", "valid tokens: masked in, finite logp/old_logp/adv, log-probs <= tolerance"),
    StatDecl("n_masked", "sum", "masked-in tokens before validity checks"),
    StatDecl("n_nonfinite", "sum", "masked-in tokens with a NaN/Inf logp, old_logp or adv"),
    StatDecl("n_invalid", "sum", "masked-in tokens rejected: a log-prob above 0, or a wrong dtype (lenient mode)"),
    StatDecl("rows_written", "sum", "token rows written to Parquet for this record"),
    StatDecl("rows_dropped", "sum", "token rows not written because the queue was full"),
    StatDecl("s_lr", "sum", "sum of lr = logp - old_logp"),
    StatDecl("s_lr2", "sum", "sum of lr^2"),
    StatDecl("s_rm1", "sum", "sum of r - 1 (expm1(lr): exact near r = 1)"),
    StatDecl("s_rm1sq", "sum", "sum of (r - 1)^2"),
    StatDecl("s_k3", "sum", "sum of r - 1 - lr"),
    StatDecl("min_r", "min", "smallest ratio"),
    StatDecl("max_r", "max", "largest ratio"),
    StatDecl("n_clip_low", "sum", "r < 1 - eps_low and adv < 0", True),
    StatDecl("n_clip_high", "sum", "r > 1 + eps_high and adv > 0", True),
    StatDecl("n_clip_sym", "sum", "r < 1 - eps_low or r > 1 + eps_high", True),
    StatDecl("n_dual", "sum", "adv < 0 and r > c (dual clip)", True),
    StatDecl("n_pos_up", "sum", "adv > 0 and r > 1"),
    StatDecl("n_pos_down", "sum", "adv > 0 and r < 1"),
    StatDecl("n_neg_up", "sum", "adv < 0 and r > 1"),
    StatDecl("n_neg_down", "sum", "adv < 0 and r < 1"),
    StatDecl("s_bal_pos", "sum", "sum of max(eff*adv, 0), eff the clipped ratio (BAPO)", True),
    StatDecl("s_bal_neg", "sum", "sum of max(-eff*adv, 0)", True),
    StatDecl("n_ent", "sum", "valid tokens with a finite entropy"),
    StatDecl("s_ent", "sum", "sum of entropy"),
    StatDecl("n_ent_low", "sum", "entropy < entropy_low", True),
    StatDecl("s_logp", "sum", "sum of logp"),
    StatDecl("s_adv", "sum", "sum of adv"),
    StatDecl("s_adv2", "sum", "sum of adv^2"),
    StatDecl("s_logp_adv", "sum", "sum of logp*adv"),
    StatDecl("n_adv_pos", "sum", "adv > 0"),
    StatDecl("n_adv_zero", "sum", "adv == 0"),
    StatDecl("n_cov_band", "sum", "centered product (adv - mean)(logp - mean), record means, inside cov_band", True),
    StatDecl("s_cov_pos", "sum", "sum of the positive centered products"),
    StatDecl("s_cov_top", "sum", "positive centered-product mass of the record's top cov_top_frac tokens", True),
    StatDecl("n_seq", "sum", "sequences with at least one masked-in token"),
    StatDecl("n_seq_valid", "sum", "sequences with at least one valid token"),
    StatDecl("n_seq_reward", "sum", "sequences with a finite reward"),
    StatDecl("s_reward", "sum", "sum of sequence rewards"),
    StatDecl("s_reward2", "sum", "sum of squared sequence rewards"),
    StatDecl("lse_seq", "lse", "log sum_i exp(L_i), L_i = sum_t lr over sequence i"),
    StatDecl("lse_seq2", "lse", "log sum_i exp(2 L_i)"),
    StatDecl("s_gspo", "sum", "sum over sequences of s_i = exp(mean_t lr)"),
    StatDecl("max_gspo", "max", "largest s_i"),
    StatDecl("n_gspo_clip", "sum", "sequences outside the GSPO sequence clip (eps_low, eps_high)", True),
    StatDecl("max_cum_abs", "max", "largest |L_t|, L_t the cumulative lr within a sequence"),
    StatDecl("n_ctpo_clip", "sum", "tokens with L_t outside the CTPO bounds", True),
    StatDecl("n_minprefix", "sum", "tokens with an earlier valid token in their sequence"),
    StatDecl("n_ref", "sum", "valid tokens with a finite ref_logp"),
    StatDecl("s_ref_k3", "sum", "sum of exp(x) - x - 1, x = ref_logp - logp"),
    StatDecl("n_mm", "sum", "valid tokens with a finite rollout_logp"),
    StatDecl("s_mm_d", "sum", "sum of d = old_logp - rollout_logp"),
    StatDecl("s_mm_k3", "sum", "sum of w - 1 - d, w = exp(d)"),
    StatDecl("s_mm_wm1", "sum", "sum of w - 1"),
    StatDecl("s_mm_wm1sq", "sum", "sum of (w - 1)^2"),
    StatDecl("min_w", "min", "smallest mismatch weight w"),
    StatDecl("max_w", "max", "largest mismatch weight w"),
    StatDecl("n_tis", "sum", "w > C", True),
    StatDecl("n_mis", "sum", "w > C or w < 1/C", True),
    StatDecl("n_ver", "sum", "valid tokens with a policy version"),
    StatDecl("s_stale", "sum", "sum of step - version"),
    StatDecl("max_stale", "max", "largest step - version"),
    StatDecl("h_lr", "hist_signed", "histogram of lr (signed log-spaced bins, rldiag.stats.hist)"),
    StatDecl("h_ent", "hist_mag", "histogram of entropy"),
    StatDecl("h_absd", "hist_mag", "histogram of |d|, d = old_logp - rollout_logp"),
    StatDecl("h_minprefix", "hist_signed", "histogram of the exclusive prefix minimum of lr in a sequence"),
    StatDecl("b_n", "vec_sum", "valid tokens per position/stage bucket", True),
    StatDecl("b_s", "vec_sum", "sum of r - 1 per bucket", True),
    StatDecl("b_s2", "vec_sum", "sum of (r - 1)^2 per bucket", True),
    StatDecl("groups_all", "set", "prompt groups with at least one masked-in token"),
    StatDecl("groups_nonzero", "set", "prompt groups with a valid token of non-zero advantage"),
)

STATS: Final[dict[str, StatDecl]] = {d.name: d for d in _DECLS}
"""Every sufficient statistic the kernel produces, by name, in storage order."""

SCALARS: Final[tuple[str, ...]] = tuple(d.name for d in _DECLS if d.merge in ("sum", "min", "max", "lse"))
HISTS: Final[dict[str, int]] = {
    d.name: (hist.N_SIGNED if d.merge == "hist_signed" else hist.N_MAG)
    for d in _DECLS
    if d.merge.startswith("hist")
}
VECTORS: Final[tuple[str, ...]] = tuple(d.name for d in _DECLS if d.merge == "vec_sum")
SETS: Final[tuple[str, ...]] = tuple(d.name for d in _DECLS if d.merge == "set")
IDENTITY: Final[dict[str, float]] = {"sum": 0.0, "min": math.inf, "max": -math.inf, "lse": -math.inf}
_IDX = {name: i for i, name in enumerate(SCALARS)}


def _i(name: str) -> int:
    return _IDX[name]


# Scalar indices as module constants, so numba folds them.
I_N, I_NMASK, I_NONFIN, I_INVALID = _i("n"), _i("n_masked"), _i("n_nonfinite"), _i("n_invalid")
I_SLR, I_SLR2, I_SRM1, I_SRM1SQ, I_SK3 = _i("s_lr"), _i("s_lr2"), _i("s_rm1"), _i("s_rm1sq"), _i("s_k3")
I_MINR, I_MAXR = _i("min_r"), _i("max_r")
I_CLO, I_CHI, I_CSYM, I_DUAL = _i("n_clip_low"), _i("n_clip_high"), _i("n_clip_sym"), _i("n_dual")
I_PU, I_PD, I_NU, I_ND = _i("n_pos_up"), _i("n_pos_down"), _i("n_neg_up"), _i("n_neg_down")
I_BPOS, I_BNEG = _i("s_bal_pos"), _i("s_bal_neg")
I_NENT, I_SENT, I_NENTLOW = _i("n_ent"), _i("s_ent"), _i("n_ent_low")
I_SLP, I_SADV, I_SADV2, I_SLPADV = _i("s_logp"), _i("s_adv"), _i("s_adv2"), _i("s_logp_adv")
I_NAPOS, I_NAZERO = _i("n_adv_pos"), _i("n_adv_zero")
I_CBAND, I_CPOS, I_CTOP = _i("n_cov_band"), _i("s_cov_pos"), _i("s_cov_top")
I_NSEQ, I_NSEQV = _i("n_seq"), _i("n_seq_valid")
I_LSE, I_LSE2, I_SGSPO, I_MGSPO, I_CGSPO = _i("lse_seq"), _i("lse_seq2"), _i("s_gspo"), _i("max_gspo"), _i("n_gspo_clip")
I_MCUM, I_CTPO, I_NMINP = _i("max_cum_abs"), _i("n_ctpo_clip"), _i("n_minprefix")
I_NREF, I_SREF = _i("n_ref"), _i("s_ref_k3")
I_NMM, I_MMD, I_MMK3, I_MMW, I_MMW2 = _i("n_mm"), _i("s_mm_d"), _i("s_mm_k3"), _i("s_mm_wm1"), _i("s_mm_wm1sq")
I_MINW, I_MAXW, I_TIS, I_MIS = _i("min_w"), _i("max_w"), _i("n_tis"), _i("n_mis")
I_NVER, I_SSTALE, I_MSTALE = _i("n_ver"), _i("s_stale"), _i("max_stale")

_NMAG = hist.N_MAG
_BPO_I = hist.BINS_PER_OCTAVE
_MIN_EDGE = 2.0**hist.MIN_EXP


_MANT_SHIFT = 52 - hist.MANT_BITS
_MANT_MASK = 2**hist.MANT_BITS - 1
_MANT_BIN = hist.MANT_BIN
_OCT_EDGES = hist.OCTAVE_EDGES
_FIRST_BIN = hist.FIRST_BIN
_MAX_EDGE = 2.0**hist.MAX_EXP


@numba.njit(inline="always")
def _mag(a: float) -> int:
    """Magnitude bin: the exact binning of :func:`rldiag.stats.hist.mag_index` (bits and a table, no log2)."""
    a = abs(a)
    if not (a >= _MIN_EDGE):
        return 0
    if a >= _MAX_EDGE:
        return _NMAG - 1
    bits = np.float64(a).view(np.int64)
    f = np.int64((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)
    j = _MANT_BIN[(bits >> _MANT_SHIFT) & _MANT_MASK]
    j += f >= _OCT_EDGES[j + 1]
    return int(_BPO_I * ((bits >> 52) - 1023) + j + _FIRST_BIN)


_EXP_N = 128
_EXP_T = 2.0 ** (np.arange(_EXP_N) / _EXP_N)
_INV_LN2N = _EXP_N / math.log(2.0)
_LN2N_HI = float(np.float64(math.log(2.0) / _EXP_N).astype(np.float32))
_LN2N_LO = math.log(2.0) / _EXP_N - _LN2N_HI
_SHIFT = 1.5 * 2.0**52


@numba.njit(inline="always")
def _expm1(x: float) -> float:
    """exp(x) - 1, relative error below 1e-13 everywhere (exact polynomial near 0), about 3x faster than libm:
    x = (128 m + j) ln2/128 + r, exp(x) = 2^m 2^(j/128) e^r with a table of 2^(j/128) and a degree-6
    polynomial for e^r - 1 (|r| <= ln2/256); expm1 = (S - 1) + S (e^r - 1), S - 1 exact near S = 1."""
    if not (abs(x) <= 700.0):
        return math.exp(x) - 1.0
    kf = (x * _INV_LN2N + _SHIFT) - _SHIFT
    r = (x - kf * _LN2N_HI) - kf * _LN2N_LO
    p = r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))))
    k = int(kf)
    S = _EXP_T[k & (_EXP_N - 1)] * np.int64(((k >> 7) + 1023) << 52).view(np.float64)
    return (S - 1.0) + S * p


@numba.njit(inline="always")
def _signed(x: float) -> int:
    m = _mag(x)
    neg = x < 0
    return (_NMAG - 1 - m) * neg + (_NMAG + m) * (1 - neg)


@numba.njit(inline="always")
def _sift_down(h, i, k):
    v = h[i]
    while True:
        c = 2 * i + 1
        if c >= k:
            break
        if c + 1 < k and h[c + 1] < h[c]:
            c += 1
        if h[c] >= v:
            break
        h[i] = h[c]
        i = c
    h[i] = v


@numba.njit
def _top_positive_sum(vals, m, k):
    """Sum of the k largest of vals[:m] (all positive; all of them when m <= k). A size-k min-heap: one
    comparison per value once the heap holds the current top k."""
    acc = 0.0
    if m <= k:
        for i in range(m):
            acc += vals[i]
        return acc
    h = vals[:k].copy()
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(h, i, k)
    for i in range(k, m):
        if vals[i] > h[0]:
            h[0] = vals[i]
            _sift_down(h, 0, k)
    for i in range(k):
        acc += h[i]
    return acc


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _kernel(rec_off, seq_off, steps, lp, olp, adv, ent, roll, ref, ver, stage, pos, flags, cfg,
            S, H_lr, H_ent, H_absd, H_min, BK, cov_out, seq_flag):  # pragma: no cover - compiled
    has_ent, has_roll, has_ref, has_ver, has_stage = flags[0], flags[1], flags[2], flags[3], flags[4]
    want_hist = flags[5]
    want_cov = flags[6]
    eps_lo, eps_hi, dual_c, cap = cfg[0], cfg[1], cfg[2], cfg[3]
    ent_low, band_lo, band_hi, top_frac = cfg[4], cfg[5], cfg[6], cfg[7]
    ctpo_a, ctpo_b, tol = cfg[8], cfg[9], cfg[11]
    nb = int(cfg[10])
    lo_thr = 1.0 - eps_lo
    hi_thr = 1.0 + eps_hi
    inv_cap = 1.0 / cap
    n_rec = rec_off.size - 1
    for R in range(n_rec):
        s0, s1 = rec_off[R], rec_off[R + 1]
        step = steps[R]
        t_first, t_last = seq_off[s0], seq_off[s1]
        # valid tokens of the record, for pass 2
        vidx = np.empty(t_last - t_first, dtype=np.int64)
        vrm1 = np.empty(t_last - t_first)
        n = 0
        n_mask = 0
        n_nonfin = 0
        n_inv = 0
        maxpos = 0
        n_seq_valid = 0
        n_seq = 0
        s_lr = s_lr2 = s_rm1 = s_rm1sq = s_k3 = 0.0
        min_r = np.inf
        max_r = -np.inf
        c_lo = c_hi = c_sym = c_dual = 0
        n_pu = n_pd = n_nu = n_nd = 0
        n_apos = n_azero = 0
        b_pos = b_neg = 0.0
        n_ent = n_entlow = 0
        s_ent = 0.0
        s_lp = s_adv = s_adv2 = s_lpadv = 0.0
        n_minp = 0
        max_cum = -np.inf
        n_ctpo = 0
        n_ref = 0
        s_ref = 0.0
        n_mm = 0
        mm_d = mm_k3 = mm_w = mm_w2 = 0.0
        min_w = np.inf
        max_w = -np.inf
        n_tis = n_mis = 0
        n_ver = 0
        s_stale = 0.0
        max_stale = -np.inf
        seq_L = np.zeros(s1 - s0)
        seq_len = np.zeros(s1 - s0)
        seq_A = np.zeros(s1 - s0)
        # ---------------- pass 1: per-token sums, in sequence order ----------------
        for s in range(s0, s1):
            a0, a1 = seq_off[s], seq_off[s + 1]
            if a1 > a0:
                n_seq += 1
                seq_flag[s, 0] = 1
            L = 0.0
            A = 0.0
            pmin = np.inf
            pmin_bin = 0
            nz = False
            cnt = 0
            n_mask += a1 - a0
            for t in range(a0, a1):
                x_lp = np.float64(lp[t])
                x_olp = np.float64(olp[t])
                a = np.float64(adv[t])
                if not (math.isfinite(x_lp) and math.isfinite(x_olp) and math.isfinite(a)):
                    n_nonfin += 1
                    continue
                if x_lp > tol or x_olp > tol:
                    n_inv += 1
                    continue
                vidx[n] = t
                cnt += 1
                p = pos[t]
                maxpos = max(maxpos, p)
                lr = x_lp - x_olp
                rm1 = _expm1(lr)
                vrm1[n] = rm1
                n += 1
                r = rm1 + 1.0
                s_lr += lr
                s_lr2 += lr * lr
                s_rm1 += rm1
                s_rm1sq += rm1 * rm1
                s_k3 += rm1 - lr
                min_r = min(min_r, r)
                max_r = max(max_r, r)
                if want_hist:
                    H_lr[R, _signed(lr)] += 1
                # branch-free: the signs of adv and of r - 1 are data (a mispredicted branch costs more than
                # these adds)
                ap = a > 0.0
                an = a < 0.0
                up = r > 1.0
                dn = r < 1.0
                lo_c = r < lo_thr
                hi_c = r > hi_thr
                c_sym += lo_c | hi_c
                c_hi += ap & hi_c
                c_lo += an & lo_c
                c_dual += an & (r > dual_c)
                n_apos += ap
                n_azero += not (ap | an)
                n_pu += ap & up
                n_pd += ap & dn
                n_nu += an & up
                n_nd += an & dn
                b_pos += max(min(r, hi_thr) * a, 0.0)
                b_neg += max(-max(r, lo_thr) * a, 0.0)
                if has_ent:
                    e = np.float64(ent[t])
                    if math.isfinite(e):
                        n_ent += 1
                        s_ent += e
                        n_entlow += e < ent_low
                        if want_hist:
                            H_ent[R, _mag(e if e > 0.0 else 0.0)] += 1
                s_lp += x_lp
                s_adv += a
                s_adv2 += a * a
                s_lpadv += x_lp * a
                nz |= a != 0.0
                # sequence level: cumulative log-ratio and exclusive prefix minimum
                if cnt > 1:
                    n_minp += 1
                    if want_hist:
                        H_min[R, pmin_bin] += 1
                if lr < pmin:  # rarely taken: the prefix minimum and its bin change a few times per sequence
                    pmin = lr
                    pmin_bin = _signed(lr)
                L += lr
                A += a
                max_cum = max(max_cum, abs(L))
                root = math.sqrt(p + 1.0)
                n_ctpo += (L < -ctpo_a * root) | (L > ctpo_b * root)
                if has_ref:
                    xr = np.float64(ref[t]) - x_lp
                    if math.isfinite(xr):
                        n_ref += 1
                        s_ref += _expm1(xr) - xr
                if has_roll:
                    d = x_olp - np.float64(roll[t])
                    if math.isfinite(d):
                        wm1 = _expm1(d)
                        w = wm1 + 1.0
                        n_mm += 1
                        mm_d += d
                        mm_k3 += wm1 - d
                        mm_w += wm1
                        mm_w2 += wm1 * wm1
                        min_w = min(min_w, w)
                        max_w = max(max_w, w)
                        n_tis += w > cap
                        n_mis += (w > cap) | (w < inv_cap)
                        if want_hist:
                            H_absd[R, _mag(d)] += 1
                if has_ver:
                    st = float(step - ver[t])
                    n_ver += 1
                    s_stale += st
                    if st > max_stale:
                        max_stale = st
            seq_L[s - s0] = L
            seq_len[s - s0] = cnt
            seq_A[s - s0] = A
            if cnt > 0:
                n_seq_valid += 1
                seq_flag[s, 1] = 1
                if nz:
                    seq_flag[s, 2] = 1
        S[R, I_N] = n
        S[R, I_NMASK] = n_mask
        S[R, I_NONFIN] = n_nonfin
        S[R, I_INVALID] = n_inv
        S[R, I_NSEQ] = n_seq
        S[R, I_NSEQV] = n_seq_valid
        if n == 0:
            continue
        S[R, I_SLR] = s_lr
        S[R, I_SLR2] = s_lr2
        S[R, I_SRM1] = s_rm1
        S[R, I_SRM1SQ] = s_rm1sq
        S[R, I_SK3] = s_k3
        S[R, I_MINR] = min_r
        S[R, I_MAXR] = max_r
        S[R, I_CLO] = c_lo
        S[R, I_CHI] = c_hi
        S[R, I_CSYM] = c_sym
        S[R, I_DUAL] = c_dual
        S[R, I_PU] = n_pu
        S[R, I_PD] = n_pd
        S[R, I_NU] = n_nu
        S[R, I_ND] = n_nd
        S[R, I_BPOS] = b_pos
        S[R, I_BNEG] = b_neg
        S[R, I_NENT] = n_ent
        S[R, I_SENT] = s_ent
        S[R, I_NENTLOW] = n_entlow
        S[R, I_SLP] = s_lp
        S[R, I_SADV] = s_adv
        S[R, I_SADV2] = s_adv2
        S[R, I_SLPADV] = s_lpadv
        S[R, I_NAPOS] = n_apos
        S[R, I_NAZERO] = n_azero
        S[R, I_NMINP] = n_minp
        S[R, I_MCUM] = max_cum
        S[R, I_CTPO] = n_ctpo
        S[R, I_NREF] = n_ref
        S[R, I_SREF] = s_ref
        S[R, I_NMM] = n_mm
        S[R, I_MMD] = mm_d
        S[R, I_MMK3] = mm_k3
        S[R, I_MMW] = mm_w
        S[R, I_MMW2] = mm_w2
        S[R, I_MINW] = min_w
        S[R, I_MAXW] = max_w
        S[R, I_TIS] = n_tis
        S[R, I_MIS] = n_mis
        S[R, I_NVER] = n_ver
        S[R, I_SSTALE] = s_stale
        S[R, I_MSTALE] = max_stale
        # ---------------- sequence-level statistics ----------------
        mL = -np.inf
        for i in range(s1 - s0):
            if seq_len[i] > 0 and seq_L[i] > mL:
                mL = seq_L[i]
        acc = 0.0
        acc2 = 0.0
        for i in range(s1 - s0):
            if seq_len[i] > 0:
                acc += math.exp(seq_L[i] - mL)
                acc2 += math.exp(2.0 * (seq_L[i] - mL))
        S[R, I_LSE] = mL + math.log(acc)
        S[R, I_LSE2] = 2.0 * mL + math.log(acc2)
        g_sum = 0.0
        g_max = -np.inf
        g_clip = 0
        for i in range(s1 - s0):
            if seq_len[i] > 0:
                g = math.exp(seq_L[i] / seq_len[i])
                A = seq_A[i] / seq_len[i]
                g_sum += g
                if g > g_max:
                    g_max = g
                if (g > hi_thr and A > 0) or (g < lo_thr and A < 0):
                    g_clip += 1
        S[R, I_SGSPO] = g_sum
        S[R, I_MGSPO] = g_max
        S[R, I_CGSPO] = g_clip
        # ---------------- pass 2 over the valid tokens: covariance products and buckets ----------------
        mean_a = s_adv / n
        mean_lp = s_lp / n
        tmp = np.empty(n)
        longest = maxpos + 1
        if not has_stage:
            btab = np.empty(longest, dtype=np.int64)
            for p in range(longest):
                b = (p * nb) // longest
                btab[p] = b if b < nb - 1 else nb - 1
        c_band = 0
        c_pos = 0.0
        n_pos = 0
        b_cur = 0
        k0 = k1 = k2 = 0.0
        for j in range(n):
            t = vidx[j]
            c = (np.float64(adv[t]) - mean_a) * (np.float64(lp[t]) - mean_lp)
            if want_cov:
                cov_out[t] = c
            c_band += (c > band_lo) & (c < band_hi)
            c_pos += max(c, 0.0)
            tmp[n_pos] = c
            n_pos += c > 0.0
            if has_stage:
                b = min(max(stage[t], 0), nb - 1)
            else:
                b = btab[pos[t]]
            # bucket sums in registers, flushed when the bucket changes (rarely: tokens come in sequence order)
            if b != b_cur:
                BK[R, 0, b_cur] += k0
                BK[R, 1, b_cur] += k1
                BK[R, 2, b_cur] += k2
                k0 = k1 = k2 = 0.0
                b_cur = b
            rm1 = vrm1[j]
            k0 += 1.0
            k1 += rm1
            k2 += rm1 * rm1
        BK[R, 0, b_cur] += k0
        BK[R, 1, b_cur] += k1
        BK[R, 2, b_cur] += k2
        S[R, I_CBAND] = c_band
        S[R, I_CPOS] = c_pos
        k = int(math.ceil(top_frac * n - 1e-9))
        if k < 1:
            k = 1
        acc = _top_positive_sum(tmp, n_pos, k)
        S[R, I_CTOP] = acc


def config_array(cfg: RecorderConfig) -> np.ndarray:
    """The configuration values the kernel reads, in its order."""
    return np.array(
        [cfg.eps_low, cfg.eps_high, cfg.dual_clip_c, cfg.tis_cap, cfg.entropy_low, cfg.cov_band[0],
         cfg.cov_band[1], cfg.cov_top_frac, cfg.ctpo_bounds[0], cfg.ctpo_bounds[1], float(cfg.n_buckets),
         cfg.logp_tolerance],
        dtype=np.float64,
    )


@dataclass
class TokenBatch:
    """Masked-in tokens of one or more records in kernel layout (see the module docstring).

    Optional columns are ``None`` when absent. ``group`` and ``reward`` are per sequence.
    """

    rec_off: np.ndarray
    seq_off: np.ndarray
    steps: np.ndarray
    logp: np.ndarray
    old_logp: np.ndarray
    adv: np.ndarray
    pos: np.ndarray
    entropy: np.ndarray | None = None
    rollout_logp: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    version: np.ndarray | None = None
    stage: np.ndarray | None = None
    group: np.ndarray | None = None
    reward: np.ndarray | None = None
    invalid: np.ndarray | None = None
    """Per record: lenient mode saw a wrong dtype, so all its tokens count as invalid."""

    @property
    def n_records(self) -> int:
        return int(self.rec_off.size - 1)


@dataclass
class BatchStats:
    """Statistics of the records of a :class:`TokenBatch`.

    ``scalars[i, j]`` is record i's value of ``SCALARS[j]``; ``hists[name]`` is ``[n_rec, n_bins]``;
    ``vectors[name]`` is ``[n_rec, n_buckets]``; ``sets[name]`` a list of int64 arrays; ``cov`` the centered
    product of each token (NaN for invalid ones).
    """

    scalars: np.ndarray
    hists: dict[str, np.ndarray]
    vectors: dict[str, np.ndarray]
    sets: dict[str, list[np.ndarray]]
    cov: np.ndarray

    def record(self, i: int) -> dict[str, Any]:
        """All statistics of record ``i`` as a dict (histograms sparse: (indices, counts))."""
        out: dict[str, Any] = {name: float(self.scalars[i, j]) for j, name in enumerate(SCALARS)}
        for name, h in self.hists.items():
            out[name] = hist.sparse_row(h[i])
        for name, v in self.vectors.items():
            out[name] = v[i]
        for name, sets in self.sets.items():
            out[name] = sets[i]
        return out


_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_I = np.zeros(0, dtype=np.int64)


def _f32(a: np.ndarray | None) -> np.ndarray:
    """Token values as float32, the precision of the token rows (arithmetic in the kernel is float64): live
    statistics and statistics recomputed from stored rows then see the same values, and no copy is made of
    the usual float32 inputs."""
    return _EMPTY_F if a is None else np.ascontiguousarray(a, dtype=np.float32)


def compute(batch: TokenBatch, cfg: RecorderConfig, *, hists: bool = True, cov: bool = True) -> BatchStats:
    """Sufficient statistics of every record of ``batch`` under ``cfg``.

    ``hists=False`` skips the histograms (left empty): they do not depend on the configuration, so a
    recompute with other clip settings takes them from the stored statistics. ``cov=False`` skips the
    per-token centered products (``BatchStats.cov`` left empty), which only the recorder writes out.
    """
    n_rec = batch.n_records
    n_seq = batch.seq_off.size - 1
    n_tok = batch.logp.size
    S = np.empty((n_rec, len(SCALARS)))
    for j, name in enumerate(SCALARS):
        S[:, j] = IDENTITY[STATS[name].merge]
    H = {name: np.zeros((n_rec, nb), dtype=np.int64) for name, nb in HISTS.items()}
    BK = np.zeros((n_rec, 3, cfg.n_buckets))
    want_cov = cov
    cov = np.full(n_tok if cov else 0, np.nan)
    seq_flag = np.zeros((n_seq, 3), dtype=np.uint8)
    flags = np.array(
        [batch.entropy is not None, batch.rollout_logp is not None, batch.ref_logp is not None,
         batch.version is not None, batch.stage is not None, hists, want_cov],
        dtype=np.int64,
    )
    _kernel(
        np.ascontiguousarray(batch.rec_off, dtype=np.int64),
        np.ascontiguousarray(batch.seq_off, dtype=np.int64),
        np.ascontiguousarray(batch.steps, dtype=np.int64),
        _f32(batch.logp), _f32(batch.old_logp), _f32(batch.adv), _f32(batch.entropy),
        _f32(batch.rollout_logp), _f32(batch.ref_logp),
        _EMPTY_I if batch.version is None else np.ascontiguousarray(batch.version, dtype=np.int64),
        _EMPTY_I if batch.stage is None else np.ascontiguousarray(batch.stage, dtype=np.int64),
        np.ascontiguousarray(batch.pos, dtype=np.int32),
        flags, config_array(cfg), S, H["h_lr"], H["h_ent"], H["h_absd"], H["h_minprefix"], BK, cov, seq_flag,
    )
    seq_rec = np.repeat(np.arange(n_rec), np.diff(batch.rec_off))
    # rewards: over sequences with at least one masked-in token
    if batch.reward is not None:
        rw = np.asarray(batch.reward, dtype=np.float64)
        ok = (seq_flag[:, 0] == 1) & np.isfinite(rw)
        S[:, _i("n_seq_reward")] = np.bincount(seq_rec[ok], minlength=n_rec)
        S[:, _i("s_reward")] = np.bincount(seq_rec[ok], weights=rw[ok], minlength=n_rec)
        S[:, _i("s_reward2")] = np.bincount(seq_rec[ok], weights=rw[ok] ** 2, minlength=n_rec)
    sets: dict[str, list[np.ndarray]] = {name: [_EMPTY_I] * n_rec for name in SETS}
    if batch.group is not None:
        g = np.asarray(batch.group, dtype=np.int64)
        for name, col in (("groups_all", 0), ("groups_nonzero", 2)):
            sel = seq_flag[:, col] == 1
            sets[name] = _split_unique(seq_rec[sel], g[sel], n_rec)
    if batch.invalid is not None and batch.invalid.any():
        bad = np.flatnonzero(batch.invalid)
        nm = S[bad, _i("n_masked")].copy()
        for j, name in enumerate(SCALARS):
            S[bad, j] = IDENTITY[STATS[name].merge]
        S[bad, _i("n_masked")] = nm
        S[bad, _i("n_invalid")] = nm
        S[bad, _i("n_seq")] = np.bincount(seq_rec[seq_flag[:, 0] == 1], minlength=n_rec)[bad]
        for h in H.values():
            h[bad] = 0
        BK[bad] = 0
        for name in SETS:
            for b in bad:
                sets[name][b] = _EMPTY_I
        for b in bad:
            cov[batch.seq_off[batch.rec_off[b]] : batch.seq_off[batch.rec_off[b + 1]]] = np.nan
    vectors = {"b_n": BK[:, 0], "b_s": BK[:, 1], "b_s2": BK[:, 2]}
    return BatchStats(scalars=S, hists=H, vectors=vectors, sets=sets, cov=cov)


def _split_unique(rec: np.ndarray, vals: np.ndarray, n_rec: int) -> list[np.ndarray]:
    if rec.size == 0:
        return [_EMPTY_I] * n_rec
    pairs = np.unique(np.stack([rec, vals], axis=1), axis=0)
    bounds = np.searchsorted(pairs[:, 0], np.arange(n_rec + 1))
    return [pairs[bounds[i] : bounds[i + 1], 1].copy() for i in range(n_rec)]


def warmup() -> None:
    """Compile the kernel (cached on disk after the first process) on a tiny batch."""
    b = TokenBatch(
        rec_off=np.array([0, 1]), seq_off=np.array([0, 2]), steps=np.array([0]),
        logp=np.array([-1.0, -2.0]), old_logp=np.array([-1.0, -2.1]), adv=np.array([1.0, 1.0]),
        pos=np.array([0, 1]),
    )
    compute(b, RecorderConfig())
