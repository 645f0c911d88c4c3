"""The statistics kernel: records (micro-batches at one step) -> their sufficient statistics.

This is the single implementation of every per-token statistic of docs/metrics.md. The recorder runs
it in its background thread on host copies of the tensors; the analysis layer runs it on token rows read back
from Parquet (recompute with another configuration, ``rldiag import``). Per record it runs a few small
vectorizable passes and one sequence scan (see the comment above ``_valid_pass``), compiled with numba
(``nogil``, so several threads run it at once); no I/O, no torch.

Every statistic is declared in :data:`STATS` with how it merges (sum, min, max, log-sum-exp, histogram
counts, vector sum, set union), so the statistics of micro-batches, ranks and files combine exactly (the
exactness rule of docs/metrics.md). Metric specs in :mod:`rldiag.metrics.registry` name the statistics they need.

Token layout: the masked-in tokens of all records, concatenated, each sequence's tokens contiguous and in
position order; ``seq_off`` gives each sequence's token range and ``rec_off`` each record's sequence range.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from rldiag.config import EVERY_STAT_FIELDS, KERNEL_INPUTS, STAT_FIELDS, RecorderConfig
from rldiag.stats import definitions, hist

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
    StatDecl(
        "n_ctpo_clip",
        "sum",
        "tokens whose gradient CTPO's clip removes (adv > 0 and L_t above its bound, or adv < 0 and L_t below)",
        True,
    ),
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
    # second-generation mismatch diagnostics (docs/metrics.md: mismatch, removed, moe)
    StatDecl("n_mm_extreme", "sum", "|d| > ln 2: w outside [1/2, 2]"),
    StatDecl("s_mm_multm1", "sum", "sum of exp(|d|) - 1"),
    StatDecl("n_icepop", "sum", "w outside icepop_band", True),
    StatDecl("s_mm_k3_low", "sum", "sum of w - 1 - d over tokens with exp(rollout_logp) < lowprob", True),
    StatDecl("s_absadv", "sum", "sum of |adv| over valid tokens"),
    StatDecl("s_rm_tis_abs", "sum", "sum of |adv| over tokens with w > C (TIS truncates them)", True),
    StatDecl("s_rm_tis_pos", "sum", "sum of adv > 0 over tokens with w > C", True),
    StatDecl("s_rm_mis_abs", "sum", "sum of |adv| over tokens with w outside [1/C, C] (MIS drops them)", True),
    StatDecl("s_rm_mis_pos", "sum", "sum of adv > 0 over tokens with w outside [1/C, C]", True),
    StatDecl("s_rm_icepop_abs", "sum", "sum of |adv| over tokens with w outside icepop_band", True),
    StatDecl("s_rm_icepop_pos", "sum", "sum of adv > 0 over tokens with w outside icepop_band", True),
    StatDecl("n_seq_mm", "sum", "sequences with a valid token of finite d"),
    StatDecl("max_seq_absd", "max", "largest |sum of d| over a sequence's tokens"),
    StatDecl("max_seq_mult", "max", "largest mean of exp(|d|) over a sequence's tokens"),
    StatDecl("n_geo", "sum", "sequences with exp(mean d) outside geo_bounds (Geo-MIS drops them)", True),
    StatDecl("s_rm_geo_abs", "sum", "sum of |adv| over the valid tokens of those sequences", True),
    StatDecl("s_rm_geo_pos", "sum", "sum of adv > 0 over the valid tokens of those sequences", True),
    StatDecl("n_rmseq_tis", "sum", "sequences with a finite reward and a token TIS truncates", True),
    StatDecl("n_rmseq_tis_ok", "sum", "... of them with reward >= correct_reward", True),
    StatDecl("n_rmseq_mis", "sum", "sequences with a finite reward and a token MIS drops", True),
    StatDecl("n_rmseq_mis_ok", "sum", "... of them with reward >= correct_reward", True),
    StatDecl("n_rmseq_icepop", "sum", "sequences with a finite reward and a token IcePop drops", True),
    StatDecl("n_rmseq_icepop_ok", "sum", "... of them with reward >= correct_reward", True),
    StatDecl("n_rmseq_geo", "sum", "sequences with a finite reward that Geo-MIS drops", True),
    StatDecl("n_rmseq_geo_ok", "sum", "... of them with reward >= correct_reward", True),
    StatDecl("n_route", "sum", "valid tokens with a finite route_agree"),
    StatDecl("s_route", "sum", "sum of route_agree"),
    StatDecl("n_route_mis", "sum", "route_agree < 1"),
    StatDecl("n_mm_rmis", "sum", "tokens with route_agree < 1 and a finite d"),
    StatDecl("s_mm_k3_rmis", "sum", "sum of w - 1 - d over them"),
    StatDecl("n_mm_ragree", "sum", "tokens with route_agree = 1 and a finite d"),
    StatDecl("s_mm_k3_ragree", "sum", "sum of w - 1 - d over them"),
    # non-finite values per input, among the masked-in tokens record() saw (`<input>/nonfinite`)
    StatDecl("nf_logp", "sum", "masked-in tokens with a NaN/Inf logp"),
    StatDecl("nf_old_logp", "sum", "masked-in tokens with a NaN/Inf old_logp"),
    StatDecl("nf_adv", "sum", "masked-in tokens with a NaN/Inf adv"),
    StatDecl("nf_entropy", "sum", "masked-in tokens with a NaN/Inf entropy"),
    StatDecl("ng_entropy", "sum", "masked-in tokens of records that gave entropy"),
    StatDecl("nf_rollout_logp", "sum", "masked-in tokens with a NaN/Inf rollout_logp"),
    StatDecl("ng_rollout_logp", "sum", "masked-in tokens of records that gave rollout_logp"),
    StatDecl("nf_ref_logp", "sum", "masked-in tokens with a NaN/Inf ref_logp"),
    StatDecl("ng_ref_logp", "sum", "masked-in tokens of records that gave ref_logp"),
    StatDecl("nf_route_agree", "sum", "masked-in tokens with a NaN/Inf route_agree"),
    StatDecl("ng_route_agree", "sum", "masked-in tokens of records that gave route_agree"),
    StatDecl("nf_teacher_logp", "sum", "masked-in tokens with a NaN/Inf teacher_logp"),
    StatDecl("ng_teacher_logp", "sum", "masked-in tokens of records that gave teacher_logp"),
    StatDecl("nf_base_logp", "sum", "masked-in tokens with a NaN/Inf base_logp"),
    StatDecl("ng_base_logp", "sum", "masked-in tokens of records that gave base_logp"),
    StatDecl("nf_reward", "sum", "sequences with a masked-in token and a NaN/Inf reward"),
    StatDecl("ng_reward", "sum", "sequences with a masked-in token, of records that gave rewards"),
    StatDecl("n_ver", "sum", "valid tokens with a policy version"),
    StatDecl("s_stale", "sum", "sum of step - version"),
    StatDecl("max_stale", "max", "largest step - version"),
    StatDecl("h_lr", "hist_signed", "histogram of lr (signed log-spaced bins, rldiag.stats.hist)"),
    StatDecl("h_ent", "hist_mag", "histogram of entropy"),
    StatDecl("h_absd", "hist_mag", "histogram of |d|, d = old_logp - rollout_logp"),
    StatDecl("h_d", "hist_signed", "histogram of d = ln w (the mismatch weight's quantiles)"),
    StatDecl("h_seq_absd", "hist_mag", "histogram over sequences of |sum of d|"),
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
    d.name: (hist.N_SIGNED if d.merge == "hist_signed" else hist.N_MAG) for d in _DECLS if d.merge.startswith("hist")
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
I_LSE, I_LSE2, I_SGSPO, I_MGSPO = _i("lse_seq"), _i("lse_seq2"), _i("s_gspo"), _i("max_gspo")
I_CGSPO = _i("n_gspo_clip")
I_MCUM, I_CTPO, I_NMINP = _i("max_cum_abs"), _i("n_ctpo_clip"), _i("n_minprefix")
I_NREF, I_SREF = _i("n_ref"), _i("s_ref_k3")
I_NMM, I_MMD, I_MMK3, I_MMW, I_MMW2 = _i("n_mm"), _i("s_mm_d"), _i("s_mm_k3"), _i("s_mm_wm1"), _i("s_mm_wm1sq")
I_MINW, I_MAXW, I_TIS, I_MIS = _i("min_w"), _i("max_w"), _i("n_tis"), _i("n_mis")
I_NVER, I_SSTALE, I_MSTALE = _i("n_ver"), _i("s_stale"), _i("max_stale")
I_MMEXT, I_MMMULT, I_ICE, I_MMK3LOW, I_SABSADV = (
    _i("n_mm_extreme"),
    _i("s_mm_multm1"),
    _i("n_icepop"),
    _i("s_mm_k3_low"),
    _i("s_absadv"),
)
I_RM_TIS_A, I_RM_TIS_P, I_RM_MIS_A, I_RM_MIS_P = (
    _i("s_rm_tis_abs"),
    _i("s_rm_tis_pos"),
    _i("s_rm_mis_abs"),
    _i("s_rm_mis_pos"),
)
I_RM_ICE_A, I_RM_ICE_P, I_RM_GEO_A, I_RM_GEO_P = (
    _i("s_rm_icepop_abs"),
    _i("s_rm_icepop_pos"),
    _i("s_rm_geo_abs"),
    _i("s_rm_geo_pos"),
)
I_NSEQMM, I_MSEQD, I_MSEQMULT, I_NGEO = _i("n_seq_mm"), _i("max_seq_absd"), _i("max_seq_mult"), _i("n_geo")
I_NROUTE, I_SROUTE, I_NRMIS = _i("n_route"), _i("s_route"), _i("n_route_mis")
I_NK3RM, I_SK3RM, I_NK3RA, I_SK3RA = _i("n_mm_rmis"), _i("s_mm_k3_rmis"), _i("n_mm_ragree"), _i("s_mm_k3_ragree")
I_NFLP, I_NFOLP, I_NFADV, I_NFENT = _i("nf_logp"), _i("nf_old_logp"), _i("nf_adv"), _i("nf_entropy")
I_NFROLL, I_NFREF, I_NFROUTE = _i("nf_rollout_logp"), _i("nf_ref_logp"), _i("nf_route_agree")
NONFINITE_INPUTS: Final[tuple[str, ...]] = (
    "logp",
    "old_logp",
    "adv",
    "entropy",
    "rollout_logp",
    "ref_logp",
    "route_agree",
    "teacher_logp",
    "base_logp",
    "reward",
)
"""Inputs whose NaN/Inf values are counted (``nf_<input>``; optional ones also ``ng_<input>``: given)."""
CORRECTIONS: Final[tuple[str, ...]] = ("tis", "mis", "icepop", "geo")
"""What the mismatch corrections remove (``removed/<c>/*``), in the order of their bits in the sequence flags."""

# Config slots (rldiag.config.KERNEL_INPUTS) and input flags as module constants, so numba folds them.
_SLOT = {k.slot: i for i, k in enumerate(KERNEL_INPUTS)}
C_EPS_LOW, C_EPS_HIGH = _SLOT["eps_low"], _SLOT["eps_high"]
C_DUAL_CLIP_C, C_TIS_CAP = _SLOT["dual_clip_c"], _SLOT["tis_cap"]
C_ENTROPY_LOW, C_COV_BAND_LO, C_COV_BAND_HI = _SLOT["entropy_low"], _SLOT["cov_band_lo"], _SLOT["cov_band_hi"]
C_COV_TOP_FRAC, C_CTPO_A, C_CTPO_B = _SLOT["cov_top_frac"], _SLOT["ctpo_a"], _SLOT["ctpo_b"]
C_N_BUCKETS, C_LOGP_TOLERANCE = _SLOT["n_buckets"], _SLOT["logp_tolerance"]
C_ICEPOP_LO, C_ICEPOP_HI, C_GEO_LO, C_GEO_HI = _SLOT["icepop_lo"], _SLOT["icepop_hi"], _SLOT["geo_lo"], _SLOT["geo_hi"]
C_CORRECT_REWARD, C_LOWPROB = _SLOT["correct_reward"], _SLOT["lowprob"]
FLAGS: Final[tuple[str, ...]] = ("entropy", "rollout", "ref", "version", "stage", "hists", "cov", "route")
"""The kernel's flags: which optional inputs are present, and whether histograms and products are wanted."""
F_ENTROPY, F_ROLLOUT, F_REF, F_VERSION, F_STAGE, F_HISTS, F_COV, F_ROUTE = range(len(FLAGS))
_LN2 = math.log(2.0)

# The shared definitions (rldiag.stats.definitions), compiled into the kernel from their one source.
_finite = numba.njit(inline="always")(definitions.finite)
_token_valid = numba.njit(inline="always")(definitions.token_valid)
_ctpo_clipped = numba.njit(inline="always")(definitions.ctpo_clipped)

_NMAG = hist.N_MAG
_BPO_I = hist.BINS_PER_OCTAVE
_MIN_EDGE = 2.0**hist.MIN_EXP


_OCT_EDGES = tuple(float(e) for e in hist.OCTAVE_EDGES[1:_BPO_I])
_FIRST_BIN = hist.FIRST_BIN
_MAX_EDGE = 2.0**hist.MAX_EXP


@numba.njit(inline="always")
def _octave_bin(f: float) -> int:
    """Bin of f in [1, 2) inside its octave: how many of the edges 2**(j/8), j = 1..7, are <= f (seven
    comparisons with constants; :data:`rldiag.stats.hist.MANT_BIN` and one comparison give the same count, as a
    table lookup that does not vectorize as well)."""
    j = 0
    for e in _OCT_EDGES:
        j += f >= e
    return j


@numba.njit(inline="always")
def _mag(a: float) -> Any:
    """Magnitude bin of |a|: the exact binning of :func:`rldiag.stats.hist.mag_index` (bits and comparisons, no
    log2), branch-free so that loops computing it vectorize. NaN goes to bin 0."""
    a = abs(a)
    bits = np.float64(a).view(np.int64)
    f = np.int64((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)
    k = _BPO_I * ((bits >> 52) - 1023) + _octave_bin(f) + _FIRST_BIN
    return _NMAG - 1 if a >= _MAX_EDGE else (k if a >= _MIN_EDGE else 0)


_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.0 / math.log(2.0)
_ROUND = 1.5 * 2.0**52  # (x + _ROUND) - _ROUND rounds x to the nearest integer
_EXP_OVERFLOW = 709.782712893384
_EXPM1_COEF = tuple(1.0 / math.factorial(i) for i in range(1, 14))


@numba.njit(error_model="numpy")
def _expm1(x: float) -> float:  # pragma: no cover - compiled
    """exp(x) - 1 with relative error below 1e-15, branch-free so that loops calling it vectorize.

    x = k ln2 + r with |r| <= ln2/2; e^r - 1 by its Taylor polynomial of degree 13 (remainder below 2e-16
    relative); expm1 = (2^k - 1) + 2^k (e^r - 1), where 2^k - 1 is exact, so there is no cancellation near 0.
    Arguments are clamped to +-708 (below -708 the result is -1 in double precision; between 708 and the
    overflow threshold it saturates at e^708), above the threshold it is inf; NaN stays NaN. Compiled on its
    own, without fast-math flags, so a caller's flags cannot reassociate the exact steps.
    """
    xc = min(max(x, -708.0), 708.0)
    kf = (xc * _INV_LN2 + _ROUND) - _ROUND
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    c = _EXPM1_COEF
    p = r * (
        c[0]
        + r
        * (
            c[1]
            + r
            * (
                c[2]
                + r
                * (
                    c[3]
                    + r
                    * (
                        c[4]
                        + r
                        * (
                            c[5]
                            + r * (c[6] + r * (c[7] + r * (c[8] + r * (c[9] + r * (c[10] + r * (c[11] + r * c[12]))))))
                        )
                    )
                )
            )
        )
    )
    two_k = np.int64((np.int64(kf) + 1023) << 52).view(np.float64)
    out = (two_k - 1.0) + two_k * p
    out = np.inf if x > _EXP_OVERFLOW else out  # type: ignore[assignment]
    return x if x != x else out


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


# Loops over a record's tokens are small and branch-free so that LLVM vectorizes them (AVX2/AVX-512): one
# fused loop with every statistic ran at a third of the speed. Floating-point sums are kept in W lanes
# (token j adds to lane j % W) and the lanes are added in a fixed order at the end: the summation order then
# depends only on the tokens' order, never on memory alignment or the machine's vector width, so the same
# tokens always give bit-identical statistics (a ``reassoc`` fast-math flag vectorized as well but gave
# results that changed with the arrays' addresses). Only the sequence scan (cumulative log-ratio, prefix
# minimum, histogram increments, bucket sums) is serial.
W: Final[int] = 8


def _lane(**extra: Any) -> Any:
    """``numba.njit`` with the options of every kernel loop (``inline="always"`` for the small named passes)."""
    return numba.njit(nogil=True, cache=True, error_model="numpy", **extra)


@_lane()
def _lane_total(acc, k):  # pragma: no cover - compiled
    s = 0.0
    for lane in range(W):
        s += acc[k, lane]
    return s


# The lane sums in SIMD registers. numba runs LLVM without its SLP vectorizer, so a loop that adds token
# j0 + lane to acc[lane] for lane in range(W) kept W scalar accumulators (W adds per W tokens); the intrinsics
# below give such a loop explicit ``<W x double>`` values, one vector add per W tokens. Each lane still adds its
# tokens one by one in token order, with the same IEEE operations on the same values (no fast-math flags, no
# fused multiply-add; min and max are numba's selects), so the lanes hold the same bits as the scalar loop's.
# The loops over a record's tokens are thus: an elementwise loop (LLVM vectorizes it: validity, differences,
# scratch values, counts), then a loop over whole blocks of W tokens with these vectors, then the last
# ``m % W`` tokens one by one into lanes 0, 1, ... (:func:`_lanes_of`). Loops index slices from 0 (``range(n)``):
# with an index numba cannot prove non-negative (``t0 + j``, ``range(c0, c1)``) it emits negative-index
# wraparound code at every access, and LLVM then kept the loop scalar.


class _F64xW(types.Type):
    """W float64 lanes (LLVM ``<W x double>``)."""

    def __init__(self) -> None:
        super().__init__(name=f"f64x{W}")


class _BoolxW(types.Type):
    """W booleans (LLVM ``<W x i1>``): a lane mask."""

    def __init__(self) -> None:
        super().__init__(name=f"b1x{W}")


_VF, _VB = _F64xW(), _BoolxW()
_LL_VF = ir.VectorType(ir.DoubleType(), W)
_LL_VB = ir.VectorType(ir.IntType(1), W)


@register_model(_F64xW)
class _F64xWModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _LL_VF)


@register_model(_BoolxW)
class _BoolxWModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _LL_VB)


def _vector_op(nargs: int, out: Any, emit: Any) -> Any:
    """An intrinsic on ``nargs`` vectors (f64xW, or masks where ``emit`` takes them) that returns an ``out``:
    ``emit(builder, *llvm_values)``."""

    def typer(typingctx: Any, *args: Any) -> Any:
        if any(not isinstance(a, (_F64xW, _BoolxW)) for a in args):
            return None

        def codegen(context: Any, builder: Any, sig: Any, vals: Any) -> Any:
            return emit(builder, *vals)

        return out(*args), codegen

    def unary(typingctx: Any, a: Any) -> Any:
        return typer(typingctx, a)

    def binary(typingctx: Any, a: Any, b: Any) -> Any:
        return typer(typingctx, a, b)

    def ternary(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        return typer(typingctx, a, b, c)

    return intrinsic((unary, binary, ternary)[nargs - 1])


def _fabs(builder: Any, x: Any) -> Any:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_LL_VF, [_LL_VF]), f"llvm.fabs.v{W}f64")
    return builder.call(fn, [x])


def _any(builder: Any, mask: Any) -> Any:
    return builder.icmp_unsigned("!=", builder.bitcast(mask, ir.IntType(W)), ir.Constant(ir.IntType(W), 0))


_vadd = _vector_op(2, _VF, lambda b, x, y: b.fadd(x, y))
_vsub = _vector_op(2, _VF, lambda b, x, y: b.fsub(x, y))
_vmul = _vector_op(2, _VF, lambda b, x, y: b.fmul(x, y))
_vmin = _vector_op(2, _VF, lambda b, x, y: b.select(b.fcmp_ordered("<", y, x), y, x))  # numba's min(x, y)
_vmax = _vector_op(2, _VF, lambda b, x, y: b.select(b.fcmp_ordered(">", y, x), y, x))  # numba's max(x, y)
_vneg = _vector_op(1, _VF, lambda b, x: b.fsub(ir.Constant(_LL_VF, [-0.0] * W), x))  # numba's -x
_vabs = _vector_op(1, _VF, _fabs)
_vnotnan = _vector_op(1, _VB, lambda b, x: b.fcmp_ordered("ord", x, x))  # x == x
_vlt = _vector_op(2, _VB, lambda b, x, y: b.fcmp_ordered("<", x, y))
_vge = _vector_op(2, _VB, lambda b, x, y: b.fcmp_ordered(">=", x, y))
_veq = _vector_op(2, _VB, lambda b, x, y: b.fcmp_ordered("==", x, y))
_vand = _vector_op(2, _VB, lambda b, x, y: b.and_(x, y))
_vwhere = _vector_op(3, _VF, lambda b, m, x, y: b.select(m, x, y))
_vany = _vector_op(1, types.boolean, _any)  # a mask with a true lane


def _splat_typer(typingctx: Any, x: Any) -> Any:
    if not isinstance(x, types.Float):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        v = context.cast(builder, args[0], sig.args[0], types.float64)
        first = builder.insert_element(ir.Constant(_LL_VF, None), v, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W)
        return builder.shuffle_vector(first, ir.Constant(_LL_VF, None), zeros)

    return _VF(x), codegen


def _load_typer(typingctx: Any, arr: Any, j: Any) -> Any:
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and isinstance(j, types.Integer)):
        return None
    if arr.dtype not in (types.float32, types.float64, types.boolean):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        dt = sig.args[0].dtype
        ety = context.get_data_type(dt)
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), ir.VectorType(ety, W).as_pointer())
        v = builder.load(ptr, align=context.get_abi_sizeof(ety))
        if dt == types.boolean:
            return builder.icmp_unsigned("!=", v, ir.Constant(ir.VectorType(ety, W), None))
        return builder.fpext(v, _LL_VF) if dt == types.float32 else v

    return (_VB if arr.dtype == types.boolean else _VF)(arr, j), codegen


def _lane_typer(typingctx: Any, v: Any, lane: Any) -> Any:
    if not (isinstance(v, _F64xW) and isinstance(lane, types.Integer)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.extract_element(args[0], args[1])

    return types.float64(v, lane), codegen


_vsplat: Any = intrinsic(_splat_typer)
"""W lanes of the float x."""
_vload: Any = intrinsic(_load_typer)
"""arr[j : j + W] (1-d, contiguous; no bounds check: the caller keeps j + W <= arr.size) as W float64 lanes
(float32 widened exactly), or a lane mask for a bool array."""
_vlane: Any = intrinsic(_lane_typer)
"""Lane ``lane`` of a vector, a float64."""


@_lane(inline="always")
def _lanes_of(acc, k, v):  # pragma: no cover - compiled
    """acc[k, :] = the W lanes of v (the tail of the record then adds into them)."""
    for lane in range(W):
        acc[k, lane] = _vlane(v, lane)


@_lane(inline="always")
def _lanes3(a, b, c):  # pragma: no cover - compiled
    """A new [3, W] array of the W lanes of three vector sums (a pass's record tail then adds into them)."""
    acc = np.empty((3, W))
    _lanes_of(acc, 0, a)
    _lanes_of(acc, 1, b)
    _lanes_of(acc, 2, c)
    return acc


_CHUNK: Final[int] = 2048
"""Tokens per chunk of a pass that writes a scratch array and then sums it (stays in the L1/L2 cache); a multiple
of W, so that chunks start on lane 0."""


@_lane()
def _top_positive_sum(vals, m, k):  # pragma: no cover - compiled
    """Sum of the positive values among the k largest of vals[:m] (NaN counts as 0). A size-k min-heap of
    max(v, 0): one comparison per value once it holds the current top k, W values at a time (a block with no
    value above the heap's smallest is skipped whole: the scalar loop would not have touched the heap)."""
    acc = 0.0
    if m <= k:
        for i in range(m):
            v = vals[i]
            acc += v if v > 0.0 else 0.0
        return acc
    h = np.empty(k)
    for i in range(k):
        v = vals[i]
        h[i] = v if v > 0.0 else 0.0
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(h, i, k)
    i = k
    while i < m:
        if i + W <= m and not _vany(_vlt(_vsplat(h[0]), _vload(vals, i))):
            i += W
            continue
        for t in range(i, min(i + W, m)):
            v = vals[t]
            if v > h[0]:
                h[0] = v
                _sift_down(h, 0, k)
        i += W
    for i in range(k):
        acc += h[i]
    return acc


@_lane(inline="always")
def _valid_acc(acc, lane, j, lr_s, a_s, lp):  # pragma: no cover - compiled
    """Adds token j's terms to the lanes ``lane`` of the six sums of :func:`_valid_pass` (lr is NaN exactly for
    the invalid tokens, whose terms are 0)."""
    lr0 = lr_s[j]
    ok = lr0 == lr0
    lr = lr0 if ok else 0.0
    xl = np.float64(lp[j]) if ok else 0.0
    a = a_s[j]
    acc[0, lane] += lr
    acc[1, lane] += lr * lr
    acc[2, lane] += xl
    acc[3, lane] += a
    acc[4, lane] += a * a
    acc[5, lane] += xl * a


@_lane()
def _valid_pass(lp, olp, adv, t0, t1, tol, ok_s, lr_s, a_s, row):  # pragma: no cover - compiled
    """Validity, log-ratio (NaN for invalid tokens) and the sums over logp and adv of the tokens [t0, t1).
    Writes n, n_nonfinite, n_invalid, s_lr, s_lr2, s_logp, s_adv, s_adv2, s_logp_adv into ``row``; returns n."""
    m = t1 - t0
    mb = m - m % W
    lp_r, olp_r, adv_r = lp[t0:t1], olp[t0:t1], adv[t0:t1]
    n = n_nonfin = n_inv = 0
    zero = _vsplat(0.0)
    s_lr = s_lr2 = s_lp = s_a = s_a2 = s_lpa = zero
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        lp_c, olp_c, adv_c = lp_r[c0:c1], olp_r[c0:c1], adv_r[c0:c1]
        ok_c, lr_c, a_c = ok_s[c0:c1], lr_s[c0:c1], a_s[c0:c1]
        for j in range(c1 - c0):  # indices from 0 (no negative-index wraparound): LLVM vectorizes the loop
            x_lp = np.float64(lp_c[j])
            x_olp = np.float64(olp_c[j])
            x_a = np.float64(adv_c[j])
            fin = _finite(x_lp) & _finite(x_olp) & _finite(x_a)
            ok = _token_valid(x_lp, x_olp, x_a, tol)
            n += ok
            n_nonfin += 1 - fin
            n_inv += fin ^ ok  # ok implies fin
            ok_c[j] = ok
            lr_c[j] = x_lp - x_olp if ok else np.nan
            a_c[j] = x_a if ok else 0.0
        for j0 in range(c0, min(c1, mb), W):
            lr0 = _vload(lr_s, j0)
            ok_v = _vnotnan(lr0)
            lr = _vwhere(ok_v, lr0, zero)
            xl = _vwhere(ok_v, _vload(lp_r, j0), zero)
            a = _vload(a_s, j0)
            s_lr = _vadd(s_lr, lr)
            s_lr2 = _vadd(s_lr2, _vmul(lr, lr))
            s_lp = _vadd(s_lp, xl)
            s_a = _vadd(s_a, a)
            s_a2 = _vadd(s_a2, _vmul(a, a))
            s_lpa = _vadd(s_lpa, _vmul(xl, a))
    row[I_N] = n
    row[I_NONFIN] = n_nonfin
    row[I_INVALID] = n_inv
    if n_nonfin > 0:  # rare: which of the three inputs, counted apart only then
        row[I_NFLP] = _nonfinite_count(lp, t0, t1)
        row[I_NFOLP] = _nonfinite_count(olp, t0, t1)
        row[I_NFADV] = _nonfinite_count(adv, t0, t1)
    if n > 0:
        acc = np.empty((6, W))
        _lanes_of(acc, 0, s_lr)
        _lanes_of(acc, 1, s_lr2)
        _lanes_of(acc, 2, s_lp)
        _lanes_of(acc, 3, s_a)
        _lanes_of(acc, 4, s_a2)
        _lanes_of(acc, 5, s_lpa)
        for j in range(mb, m):
            _valid_acc(acc, j - mb, j, lr_s, a_s, lp_r)
        row[I_SLR] = _lane_total(acc, 0)
        row[I_SLR2] = _lane_total(acc, 1)
        row[I_SLP] = _lane_total(acc, 2)
        row[I_SADV] = _lane_total(acc, 3)
        row[I_SADV2] = _lane_total(acc, 4)
        row[I_SLPADV] = _lane_total(acc, 5)
    return n


@_lane()
def _nonfinite_count(x, t0, t1):  # pragma: no cover - compiled
    """NaN/Inf values among x[t0:t1]."""
    n = 0
    for t in range(t0, t1):
        n += 1 - _finite(np.float64(x[t]))
    return n


@_lane()
def _expm1_pass(m, x_s, y_s):  # pragma: no cover - compiled
    """y = expm1(x) for x_s[:m]; over the non-NaN x (NaN marks unused tokens, whose y is 0) returns
    (sum y, sum y^2, sum y - x, min 1 + y, max 1 + y) (min and max are exact in any order)."""
    mb = m - m % W
    zero = _vsplat(0.0)
    one = _vsplat(1.0)
    inf = _vsplat(np.inf)
    ninf = _vsplat(-np.inf)
    s_y = s_y2 = s_k3 = zero
    lo_v = inf
    hi_v = ninf
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        x_c, y_c = x_s[c0:c1], y_s[c0:c1]
        for j in range(c1 - c0):  # an elementwise loop of its own: with the sums beside it, it did not vectorize
            x0 = x_c[j]
            y_c[j] = _expm1(x0 if x0 == x0 else 0.0)
        for j0 in range(c0, min(c1, mb), W):
            x0 = _vload(x_s, j0)
            use = _vnotnan(x0)
            x = _vwhere(use, x0, zero)
            y = _vload(y_s, j0)
            s_y = _vadd(s_y, y)
            s_y2 = _vadd(s_y2, _vmul(y, y))
            s_k3 = _vadd(s_k3, _vsub(y, x))
            y1 = _vadd(y, one)
            lo_v = _vmin(lo_v, _vwhere(use, y1, inf))
            hi_v = _vmax(hi_v, _vwhere(use, y1, ninf))
    acc = _lanes3(s_y, s_y2, s_k3)
    lo = np.empty(W)
    hi = np.empty(W)
    for lane in range(W):
        lo[lane] = _vlane(lo_v, lane)
        hi[lane] = _vlane(hi_v, lane)
    for j in range(mb, m):
        lane = j - mb
        x0 = x_s[j]
        use = x0 == x0
        x = x0 if use else 0.0
        y = y_s[j]
        acc[0, lane] += y
        acc[1, lane] += y * y
        acc[2, lane] += y - x
        lo[lane] = min(lo[lane], y + 1.0 if use else np.inf)
        hi[lane] = max(hi[lane], y + 1.0 if use else -np.inf)
    return _lane_total(acc, 0), _lane_total(acc, 1), _lane_total(acc, 2), lo.min(), hi.max()


@_lane(inline="always")
def _ratio_pass(m, lr_s, rm1_s, row):  # pragma: no cover - compiled
    """r - 1 = expm1(lr) of the valid tokens into rm1_s; writes s_rm1, s_rm1sq, s_k3, min_r, max_r."""
    row[I_SRM1], row[I_SRM1SQ], row[I_SK3], row[I_MINR], row[I_MAXR] = _expm1_pass(m, lr_s, rm1_s)


@_lane()
def _clip_pass(m, ok_s, rm1_s, a_s, lo_thr, hi_thr, dual_c, row):  # pragma: no cover - compiled
    """Writes n_clip_low, n_clip_high, n_clip_sym, n_dual, n_pos_up, n_pos_down, n_neg_up, n_neg_down,
    n_adv_pos, n_adv_zero, s_bal_pos, s_bal_neg, s_absadv (invalid tokens have a = 0 and r = 1: they count
    nowhere)."""
    c_lo = c_hi = c_sym = c_dual = n_pu = n_pd = n_nu = n_nd = n_apos = n_azero = 0
    for j in range(m):
        ok = ok_s[j]
        a = a_s[j]
        r = rm1_s[j] + 1.0
        ap = a > 0.0
        an = a < 0.0
        lo_c = ok & (r < lo_thr)
        hi_c = ok & (r > hi_thr)
        c_sym += lo_c | hi_c
        c_hi += ap & hi_c
        c_lo += an & lo_c
        c_dual += an & (r > dual_c)
        n_apos += ap
        n_azero += ok & (a == 0.0)
        n_pu += ap & (r > 1.0)
        n_pd += ap & (r < 1.0)
        n_nu += an & (r > 1.0)
        n_nd += an & (r < 1.0)
    mb = m - m % W
    zero = _vsplat(0.0)
    one = _vsplat(1.0)
    lo_v = _vsplat(lo_thr)
    hi_v = _vsplat(hi_thr)
    s_pos = s_neg = s_abs = zero
    for j0 in range(0, mb, W):
        a = _vload(a_s, j0)
        r = _vadd(_vload(rm1_s, j0), one)
        s_pos = _vadd(s_pos, _vmax(_vmul(_vmin(r, hi_v), a), zero))
        s_neg = _vadd(s_neg, _vmax(_vmul(_vneg(_vmax(r, lo_v)), a), zero))
        s_abs = _vadd(s_abs, _vabs(a))
    acc = _lanes3(s_pos, s_neg, s_abs)
    for j in range(mb, m):
        lane = j - mb
        a = a_s[j]
        r = rm1_s[j] + 1.0
        acc[0, lane] += max(min(r, hi_thr) * a, 0.0)
        acc[1, lane] += max(-max(r, lo_thr) * a, 0.0)
        acc[2, lane] += abs(a)
    row[I_CLO] = c_lo
    row[I_CHI] = c_hi
    row[I_CSYM] = c_sym
    row[I_DUAL] = c_dual
    row[I_PU] = n_pu
    row[I_PD] = n_pd
    row[I_NU] = n_nu
    row[I_ND] = n_nd
    row[I_NAPOS] = n_apos
    row[I_NAZERO] = n_azero
    row[I_BPOS] = _lane_total(acc, 0)
    row[I_BNEG] = _lane_total(acc, 1)
    row[I_SABSADV] = _lane_total(acc, 2)


@_lane()
def _entropy_pass(ent, t0, t1, ok_s, ent_low, e_s, row):  # pragma: no cover - compiled
    """Writes n_ent, s_ent, n_ent_low; e_s[j] the entropy (floored at 0, for its histogram) of valid tokens
    with a finite one, else NaN."""
    m = t1 - t0
    mb = m - m % W
    ent_r = ent[t0:t1]
    zero = _vsplat(0.0)
    s_e = zero
    n_ent = n_low = 0
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        ent_c, ok_c, e_c = ent_r[c0:c1], ok_s[c0:c1], e_s[c0:c1]
        for j in range(c1 - c0):
            e = np.float64(ent_c[j])
            use = ok_c[j] & math.isfinite(e)
            n_ent += use
            n_low += use & (e < ent_low)
            e_c[j] = max(e, 0.0) if use else np.nan
        for j0 in range(c0, min(c1, mb), W):  # e_s is NaN exactly where the entropy is not used
            s_e = _vadd(s_e, _vwhere(_vnotnan(_vload(e_s, j0)), _vload(ent_r, j0), zero))
    acc = np.empty((1, W))
    _lanes_of(acc, 0, s_e)
    for j in range(mb, m):
        acc[0, j - mb] += np.float64(ent_r[j]) if e_s[j] == e_s[j] else 0.0
    row[I_NENT] = n_ent
    row[I_SENT] = _lane_total(acc, 0)
    row[I_NENTLOW] = n_low
    if n_ent < m:  # some token without a usable entropy: count the non-finite ones (none to count otherwise)
        row[I_NFENT] = _nonfinite_count(ent, t0, t1)


@_lane()
def _diff_pass(x, y, t0, t1, ok_s, d_s):  # pragma: no cover - compiled
    """d = x - y of the valid tokens with a finite difference (NaN for the others); returns (count, sum)."""
    m = t1 - t0
    mb = m - m % W
    x_r, y_r = x[t0:t1], y[t0:t1]
    zero = _vsplat(0.0)
    s_d = zero
    n_use = 0
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        x_c, y_c, ok_c, d_c = x_r[c0:c1], y_r[c0:c1], ok_s[c0:c1], d_s[c0:c1]
        for j in range(c1 - c0):
            d0 = np.float64(x_c[j]) - np.float64(y_c[j])
            use = ok_c[j] & math.isfinite(d0)
            n_use += use
            d_c[j] = d0 if use else np.nan
        for j0 in range(c0, min(c1, mb), W):
            d = _vload(d_s, j0)
            s_d = _vadd(s_d, _vwhere(_vnotnan(d), d, zero))
    acc = np.empty((1, W))
    _lanes_of(acc, 0, s_d)
    for j in range(mb, m):
        d = d_s[j]
        acc[0, j - mb] += d if d == d else 0.0
    return n_use, _lane_total(acc, 0)


@_lane()
def _tis_pass(m, d_s, w_s, cap):  # pragma: no cover - compiled
    """(n_tis, n_mis): used tokens (finite d) with w = 1 + w_s above cap, or outside [1/cap, cap]."""
    inv_cap = 1.0 / cap
    n_tis = n_mis = 0
    for j in range(m):
        d = d_s[j]
        w = w_s[j] + 1.0
        use = d == d
        n_tis += use & (w > cap)
        n_mis += use & ((w > cap) | (w < inv_cap))
    return n_tis, n_mis


@_lane(inline="always")
def _ref_pass(ref, lp, t0, t1, ok_s, d_s, w_s, row):  # pragma: no cover - compiled
    """Reference KL: writes n_ref and s_ref_k3 (k3 of x = ref_logp - logp)."""
    n_ref, _ = _diff_pass(ref, lp, t0, t1, ok_s, d_s)
    row[I_NREF] = n_ref
    if n_ref < t1 - t0:  # some token without a usable ref_logp: count the non-finite ones
        row[I_NFREF] = _nonfinite_count(ref, t0, t1)
    row[I_SREF] = _expm1_pass(t1 - t0, d_s, w_s)[2]


@_lane(inline="always")
def _mismatch_pass(olp, roll, t0, t1, ok_s, cap, d_s, w_s, row):  # pragma: no cover - compiled
    """Training-inference mismatch of d = old_logp - rollout_logp, w = exp(d): writes n_mm, s_mm_d, s_mm_wm1,
    s_mm_wm1sq, s_mm_k3, min_w, max_w, n_tis, n_mis; d_s keeps d (NaN where unused) for its histogram."""
    m = t1 - t0
    n_mm, row[I_MMD] = _diff_pass(olp, roll, t0, t1, ok_s, d_s)
    row[I_NMM] = n_mm
    if n_mm < m:  # some token without a usable rollout_logp: count the non-finite ones
        row[I_NFROLL] = _nonfinite_count(roll, t0, t1)
    row[I_MMW], row[I_MMW2], row[I_MMK3], row[I_MINW], row[I_MAXW] = _expm1_pass(m, d_s, w_s)
    row[I_TIS], row[I_MIS] = _tis_pass(m, d_s, w_s, cap)


@_lane()
def _mismatch_hist_pass(m, d_s, bins, h_d, h_absd):  # pragma: no cover - compiled
    """Adds the used tokens' d (NaN marks the others) to the signed histogram h_d and |d| to h_absd: one
    signed binning, folded for the magnitude (the same bins as binning |d| directly)."""
    _bins_pass(m, d_s, True, bins)
    for j in range(m):
        b = bins[j]
        if b >= 0:
            h_d[b] += 1
            h_absd[b - _NMAG if b >= _NMAG else _NMAG - 1 - b] += 1


@_lane()
def _correction_pass(
    seq_off, s0, s1, t0, d_s, w_s, a_s, roll, cfg, ln_low, want_hist, h_seq, seq_flag, row, mult_s, k3_s, f_s
):  # pragma: no cover - compiled
    """What the mismatch corrections see and remove, in one scan over the record's sequences (d_s and w_s =
    expm1(d) from the mismatch pass, NaN d for unused tokens) after an elementwise loop that LLVM vectorizes:
    the counts, each token's exp(|d|) - 1 (mult_s), its low-probability k3 term (k3_s) and its removal bits
    (f_s), so that the serial scan only adds the sums in token order (the earlier two-pass version, with the
    sums in a second pass, was bound by memory traffic). Token level: n_mm_extreme, s_mm_multm1 (exp(|d|) - 1),
    n_icepop, s_mm_k3_low and the advantage masses that TIS (w > C), MIS (w outside [1/C, C]) and IcePop
    (w outside icepop_band) remove. Sequence level, over each sequence's tokens with a finite d: n_seq_mm,
    max_seq_absd (|sum d| also into h_seq), max_seq_mult (mean exp(|d|)), n_geo and the advantage mass of
    the sequences Geo-MIS drops (exp(mean d) outside geo_bounds). seq_flag[s, 3] gets the sequence's removal
    bits (1 TIS, 2 MIS, 4 IcePop, 8 Geo-MIS) for the correct_frac counts."""
    cap = cfg[C_TIS_CAP]
    inv_cap = 1.0 / cap
    ice_lo, ice_hi = cfg[C_ICEPOP_LO], cfg[C_ICEPOP_HI]
    geo_lo, geo_hi = cfg[C_GEO_LO], cfg[C_GEO_HI]
    m = seq_off[s1] - t0
    roll_r = roll[t0 : t0 + m]
    n_ext = n_ice = n_seq_mm = n_geo = 0
    for j in range(m):
        d = d_s[j]
        y = w_s[j]
        w = y + 1.0
        use = d == d
        n_ext += use & (abs(d) > _LN2)
        tis = w > cap
        mis = tis | (w < inv_cap)
        ice = (w < ice_lo) | (w > ice_hi)
        n_ice += use & ice
        f_s[j] = tis + 2 * mis + 4 * ice  # read for the used tokens only
        mult_s[j] = max(y, -y / w)  # exp(|d|) - 1: y for d >= 0, 1/w - 1 for d < 0
        k3_s[j] = (y - d) if np.float64(roll_r[j]) < ln_low else 0.0
    mult = 0.0
    k3low = 0.0
    rm = np.zeros(8)  # |A| and positive A removed by TIS, MIS, IcePop, Geo-MIS
    mx = -np.inf
    mult_max = -np.inf
    for s in range(s0, s1):
        S = 0.0
        M = 0.0
        A_abs = 0.0
        A_pos = 0.0
        cnt = 0
        bits = 0
        u0, u1 = seq_off[s], seq_off[s + 1]
        q0, q1 = u0 - t0, u1 - t0
        a_q, d_q, mult_q, k3_q, f_q = a_s[q0:q1], d_s[q0:q1], mult_s[q0:q1], k3_s[q0:q1], f_s[q0:q1]
        for u in range(u1 - u0):  # indices from 0: no negative-index wraparound code
            a = a_q[u]  # 0 for invalid tokens
            A_abs += abs(a)
            A_pos += max(a, 0.0)
            d = d_q[u]
            if d == d:
                S += d
                M += mult_q[u]
                cnt += 1
                k3low += k3_q[u]
                f = f_q[u]
                if f > 1:  # MIS or IcePop (TIS implies MIS): few tokens, their masses in a branch
                    aa = abs(a)
                    ap = max(a, 0.0)
                    if f & 1:
                        rm[0] += aa
                        rm[1] += ap
                        bits |= 1
                    if f & 2:
                        rm[2] += aa
                        rm[3] += ap
                        bits |= 2
                    if f & 4:
                        rm[4] += aa
                        rm[5] += ap
                        bits |= 4
        mult += M
        if cnt == 0:
            continue
        n_seq_mm += 1
        aS = abs(S)
        mx = max(mx, aS)
        if want_hist:
            h_seq[_mag(aS)] += 1
        mult_max = max(mult_max, 1.0 + M / cnt)
        g = math.exp(S / cnt)
        if g < geo_lo or g > geo_hi:
            n_geo += 1
            rm[6] += A_abs
            rm[7] += A_pos
            bits |= 8
        seq_flag[s, 3] = bits
    row[I_MMEXT] = n_ext
    row[I_ICE] = n_ice
    row[I_MMMULT] = mult
    row[I_MMK3LOW] = k3low
    row[I_RM_TIS_A], row[I_RM_TIS_P] = rm[0], rm[1]
    row[I_RM_MIS_A], row[I_RM_MIS_P] = rm[2], rm[3]
    row[I_RM_ICE_A], row[I_RM_ICE_P] = rm[4], rm[5]
    row[I_RM_GEO_A], row[I_RM_GEO_P] = rm[6], rm[7]
    row[I_NSEQMM] = n_seq_mm
    row[I_MSEQD] = mx
    row[I_MSEQMULT] = mult_max
    row[I_NGEO] = n_geo


@_lane()
def _route_pass(route, t0, m, ok_s, has_roll, d_s, w_s, row):  # pragma: no cover - compiled
    """MoE routing agreement of the valid tokens with a finite route_agree: writes nf_route_agree, n_route, s_route,
    n_route_mis (< 1) and, with the mismatch pass's d_s/w_s, the k3 sums of the disagreeing (< 1) and agreeing
    (= 1) tokens with a finite d."""
    route_r = route[t0 : t0 + m]
    n_r = n_mis = n_km = n_ka = 0
    for j in range(m):
        r = np.float64(route_r[j])
        use = ok_s[j] & (r - r == 0)
        d = d_s[j] if has_roll else np.nan
        du = use & (d == d)
        n_r += use
        n_mis += use & (r < 1.0)
        n_km += du & (r < 1.0)
        n_ka += du & (r >= 1.0)
    mb = m - m % W
    zero = _vsplat(0.0)
    one = _vsplat(1.0)
    nan = _vsplat(np.nan)
    s_r = s_km = s_ka = zero
    for j0 in range(0, mb, W):
        r = _vload(route_r, j0)
        use = _vand(_vload(ok_s, j0), _veq(_vsub(r, r), zero))
        d = _vload(d_s, j0) if has_roll else nan
        du = _vand(use, _vnotnan(d))
        k3 = _vwhere(du, _vsub(_vload(w_s, j0), d), zero)
        s_r = _vadd(s_r, _vwhere(use, r, zero))
        s_km = _vadd(s_km, _vwhere(_vand(du, _vlt(r, one)), k3, zero))
        s_ka = _vadd(s_ka, _vwhere(_vand(du, _vge(r, one)), k3, zero))
    acc = _lanes3(s_r, s_km, s_ka)
    for j in range(mb, m):
        lane = j - mb
        r = np.float64(route_r[j])
        use = ok_s[j] & (r - r == 0)
        d = d_s[j] if has_roll else np.nan
        du = use & (d == d)
        k3 = (w_s[j] - d) if du else 0.0
        acc[0, lane] += r if use else 0.0
        acc[1, lane] += k3 if du & (r < 1.0) else 0.0
        acc[2, lane] += k3 if du & (r >= 1.0) else 0.0
    row[I_NROUTE] = n_r
    if n_r < m:  # some token without a usable route_agree: count the non-finite ones
        row[I_NFROUTE] = _nonfinite_count(route, t0, t0 + m)
    row[I_SROUTE] = _lane_total(acc, 0)
    row[I_NRMIS] = n_mis
    row[I_NK3RM] = n_km
    row[I_SK3RM] = _lane_total(acc, 1)
    row[I_NK3RA] = n_ka
    row[I_SK3RA] = _lane_total(acc, 2)


@_lane(inline="always")
def _staleness_pass(ver, t0, m, ok_s, step, row):  # pragma: no cover - compiled
    """Writes n_ver, s_stale, max_stale (staleness = step - version of the valid tokens)."""
    n_ver = 0
    s_stale = 0.0
    max_stale = -np.inf
    for j in range(m):
        if ok_s[j]:
            st = float(step - ver[t0 + j])
            n_ver += 1
            s_stale += st
            max_stale = max(max_stale, st)
    row[I_NVER] = n_ver
    row[I_SSTALE] = s_stale
    row[I_MSTALE] = max_stale


@_lane()
def _cov_pass(m, ok_s, lp, t0, a_s, mean_a, mean_lp, band_lo, band_hi, c_s):  # pragma: no cover - compiled
    """Centered products c = (adv - mean)(logp - mean) of the valid tokens (NaN for the others): returns
    (n_cov_band, s_cov_pos)."""
    mb = m - m % W
    lp_r = lp[t0 : t0 + m]
    zero = _vsplat(0.0)
    s_c = zero
    c_band = 0
    for c0 in range(0, m, _CHUNK):
        c1 = min(c0 + _CHUNK, m)
        ok_c, a_c, lp_c, c_c = ok_s[c0:c1], a_s[c0:c1], lp_r[c0:c1], c_s[c0:c1]
        for j in range(c1 - c0):
            ok = ok_c[j]
            c = (a_c[j] - mean_a) * (np.float64(lp_c[j]) - mean_lp)
            c_band += ok & (c > band_lo) & (c < band_hi)
            c_c[j] = c if ok else np.nan
        for j0 in range(c0, min(c1, mb), W):
            s_c = _vadd(s_c, _vwhere(_vload(ok_s, j0), _vmax(_vload(c_s, j0), zero), zero))
    acc = np.empty((1, W))
    _lanes_of(acc, 0, s_c)
    for j in range(mb, m):
        acc[0, j - mb] += max(c_s[j], 0.0) if ok_s[j] else 0.0
    return c_band, _lane_total(acc, 0)


@_lane()
def _bins_pass(m, x_s, signed, bins):  # pragma: no cover - compiled
    """Histogram bin of each x_s[:m] (signed or magnitude bins), -1 for NaN (unused tokens)."""
    if signed:  # two loops: with the choice inside, the signed loop ran at half the speed
        for j in range(m):
            x = x_s[j]
            bins[j] = _signed(x) if x == x else -1
    else:
        for j in range(m):
            x = x_s[j]
            bins[j] = _mag(x) if x == x else -1


@_lane(inline="always")
def _hist_pass(m, x_s, bins, h):  # pragma: no cover - compiled
    """Adds the magnitude bins of the non-NaN x_s[:m] to the histogram row ``h`` (bins: scratch)."""
    _bins_pass(m, x_s, False, bins)
    for j in range(m):
        if bins[j] >= 0:
            h[bins[j]] += 1


@_lane()
def _cum_pass(m, L_s, a_s, pos, t0, ctpo_a, ctpo_b):  # pragma: no cover - compiled
    """(max |L_t|, tokens whose gradient CTPO's clip removes: :func:`rldiag.stats.definitions.ctpo_clipped`)
    over the non-NaN cumulative log-ratios L_s[:m]. The largest |L| is taken on the bits (non-negative doubles
    order as their int64 bits), an integer maximum that vectorizes; -inf when no L is used."""
    pos_r = pos[t0 : t0 + m]
    hi = np.int64(-1)
    n_ctpo = 0
    for j in range(m):
        L = L_s[j]
        use = L == L
        root = math.sqrt(pos_r[j] + 1.0)
        n_ctpo += use & _ctpo_clipped(L, a_s[j], root, ctpo_a, ctpo_b)
        bits = np.float64(abs(L)).view(np.int64)
        hi = max(hi, bits if use else np.int64(-1))
    return (np.int64(hi).view(np.float64) if hi >= 0 else -np.inf), n_ctpo


@_lane(inline="always")
def _bucket_table(m, ok_s, pos, t0, nb):  # pragma: no cover - compiled
    """Position -> bucket: ``nb`` equal parts of the record's longest valid response."""
    pos_r = pos[t0 : t0 + m]
    maxpos = 0
    for j in range(m):
        maxpos = max(maxpos, pos_r[j] if ok_s[j] else 0)
    longest = maxpos + 1
    btab = np.empty(longest, dtype=np.int64)
    for p in range(longest):
        b = (p * nb) // longest
        btab[p] = b if b < nb - 1 else nb - 1
    return btab


@_lane()
def _scan_pass(
    seq_off,
    s0,
    s1,
    t0,
    ok_s,
    lr_s,
    a_s,
    rm1_s,
    bin_s,
    pos,
    stage,
    has_stage,
    btab,
    nb,
    want_hist,
    h_lr,
    h_min,
    bk,
    L_s,
    seq_L,
    seq_len,
    seq_A,
    seq_flag,
):  # pragma: no cover - compiled
    """The serial scan over a record's sequences, in token order: the cumulative log-ratio L_s, the
    histograms of lr (bins in bin_s) and of its exclusive prefix minimum, the bucket sums ``bk`` (by stage
    or by position through ``btab``), each sequence's total log-ratio, length and advantage sum, and the
    sequence flags (column 1: a valid token, 2: a non-zero advantage). Returns (n_seq_valid, n_minprefix)."""
    n_seq_valid = 0
    n_minp = 0
    b_cur = 0
    k0 = k1 = k2 = 0.0
    for s in range(s0, s1):
        L = 0.0
        A = 0.0
        pmin = np.inf
        pmin_bin = 0
        pmin_run = 0
        nz = False
        cnt = 0
        u0, u1 = seq_off[s], seq_off[s + 1]
        q0, q1 = u0 - t0, u1 - t0
        # the sequence's slices, indexed from 0: no negative-index wraparound code in the loop
        ok_q, lr_q, a_q, rm1_q, bin_q, L_q = (
            ok_s[q0:q1],
            lr_s[q0:q1],
            a_s[q0:q1],
            rm1_s[q0:q1],
            bin_s[q0:q1],
            L_s[q0:q1],
        )
        pos_q = pos[u0:u1]
        stage_q = stage[u0:u1] if has_stage else stage
        for u in range(u1 - u0):
            if not ok_q[u]:
                L_q[u] = np.nan
                continue
            lr = lr_q[u]
            a = a_q[u]
            cnt += 1
            if want_hist:
                h_lr[bin_q[u]] += 1
            # the exclusive prefix minimum's bin is counted for every token after the first; it changes a
            # few times per sequence, so runs of equal bins are counted in a register
            pmin_run += cnt > 1
            if lr < pmin:
                if want_hist and pmin_run:
                    h_min[pmin_bin] += pmin_run
                pmin_run = 0
                pmin = lr
                pmin_bin = bin_q[u]
            L += lr
            L_q[u] = L
            A += a
            nz |= a != 0.0
            # bucket sums in registers, flushed when the bucket changes (tokens come in sequence order)
            if has_stage:
                b = min(max(stage_q[u], 0), nb - 1)
            else:
                b = btab[pos_q[u]]
            if b != b_cur:
                bk[0, b_cur] += k0
                bk[1, b_cur] += k1
                bk[2, b_cur] += k2
                k0 = k1 = k2 = 0.0
                b_cur = b
            rm1 = rm1_q[u]
            k0 += 1.0
            k1 += rm1
            k2 += rm1 * rm1
        if want_hist and pmin_run:
            h_min[pmin_bin] += pmin_run
        n_minp += max(cnt - 1, 0)
        seq_L[s - s0] = L
        seq_len[s - s0] = cnt
        seq_A[s - s0] = A
        if cnt > 0:
            n_seq_valid += 1
            seq_flag[s, 1] = 1
            if nz:
                seq_flag[s, 2] = 1
    bk[0, b_cur] += k0
    bk[1, b_cur] += k1
    bk[2, b_cur] += k2
    return n_seq_valid, n_minp


@_lane(inline="always")
def _sequence_pass(seq_L, seq_len, seq_A, lo_thr, hi_thr, row):  # pragma: no cover - compiled
    """Sequence-level statistics from each sequence's total log-ratio L, length and advantage sum: writes
    lse_seq, lse_seq2 (log-sum-exp of L and 2L, shifted by the largest L), s_gspo, max_gspo, n_gspo_clip."""
    k = seq_L.size
    mL = -np.inf
    for i in range(k):
        if seq_len[i] > 0 and seq_L[i] > mL:
            mL = seq_L[i]
    acc = 0.0
    acc2 = 0.0
    for i in range(k):
        if seq_len[i] > 0:
            acc += math.exp(seq_L[i] - mL)
            acc2 += math.exp(2.0 * (seq_L[i] - mL))
    row[I_LSE] = mL + math.log(acc)
    row[I_LSE2] = 2.0 * mL + math.log(acc2)
    g_sum = 0.0
    g_max = -np.inf
    g_clip = 0
    for i in range(k):
        if seq_len[i] > 0:
            g = math.exp(seq_L[i] / seq_len[i])
            A = seq_A[i] / seq_len[i]
            g_sum += g
            if g > g_max:
                g_max = g
            if (g > hi_thr and A > 0) or (g < lo_thr and A < 0):
                g_clip += 1
    row[I_SGSPO] = g_sum
    row[I_MGSPO] = g_max
    row[I_CGSPO] = g_clip


@_lane(inline="always")
def _covariance_pass(m, ok_s, lp, t0, a_s, n, band_lo, band_hi, top_frac, c_s, row):  # pragma: no cover - compiled
    """Centered products of the record (means over its n valid tokens) into c_s; writes n_cov_band,
    s_cov_pos and s_cov_top (the positive mass of the top ``top_frac`` share of tokens)."""
    c_band, c_pos = _cov_pass(m, ok_s, lp, t0, a_s, row[I_SADV] / n, row[I_SLP] / n, band_lo, band_hi, c_s)
    row[I_CBAND] = c_band
    row[I_CPOS] = c_pos
    k = int(math.ceil(top_frac * n - 1e-9))
    row[I_CTOP] = _top_positive_sum(c_s, m, max(k, 1))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _kernel(
    rec_off,
    seq_off,
    steps,
    lp,
    olp,
    adv,
    ent,
    roll,
    ref,
    ver,
    stage,
    pos,
    route,
    flags,
    cfg,
    S,
    H_lr,
    H_ent,
    H_absd,
    H_min,
    H_d,
    H_seqd,
    BK,
    cov_out,
    seq_flag,
    fs,
    ok_s,
    bin_s,
    f_s,
):  # pragma: no cover - compiled
    """The statistics of every record: the passes above, in order, on the record's tokens.

    ``flags`` holds the :data:`FLAGS` (which optional inputs are present, which outputs are wanted), ``cfg``
    the :data:`rldiag.config.KERNEL_INPUTS` values (:func:`config_array`); statistics go to the rows of S
    (columns :data:`SCALARS`), H_* (histograms), BK (bucket sums), cov_out (per-token products) and seq_flag.
    ``fs`` (8 rows), ``ok_s``, ``bin_s`` and ``f_s``: scratch for the longest record (contents not read before
    they are written).
    """
    has_ent, has_roll, has_ref = flags[F_ENTROPY], flags[F_ROLLOUT], flags[F_REF]
    has_ver, has_stage, has_route = flags[F_VERSION], flags[F_STAGE], flags[F_ROUTE]
    want_hist, want_cov = flags[F_HISTS], flags[F_COV]
    lo_thr = 1.0 - cfg[C_EPS_LOW]
    hi_thr = 1.0 + cfg[C_EPS_HIGH]
    nb = int(cfg[C_N_BUCKETS])
    n_rec = rec_off.size - 1
    lr_s, a_s, rm1_s, e_s, d_s, c_s, L_s, w_s = fs[0], fs[1], fs[2], fs[3], fs[4], fs[5], fs[6], fs[7]
    ln_low = math.log(cfg[C_LOWPROB])
    no_btab = np.empty(0, dtype=np.int64)
    for R in range(n_rec):
        row = S[R]
        s0, s1 = rec_off[R], rec_off[R + 1]
        t0, t1 = seq_off[s0], seq_off[s1]
        m = t1 - t0
        n_seq = 0
        for s in range(s0, s1):
            if seq_off[s + 1] > seq_off[s]:
                n_seq += 1
                seq_flag[s, 0] = 1
        row[I_NMASK] = m
        row[I_NSEQ] = n_seq
        n = _valid_pass(lp, olp, adv, t0, t1, cfg[C_LOGP_TOLERANCE], ok_s, lr_s, a_s, row)
        if n == 0:  # no pass runs: the optional inputs' non-finite values are still counted
            if has_ent:
                row[I_NFENT] = _nonfinite_count(ent, t0, t1)
            if has_roll:
                row[I_NFROLL] = _nonfinite_count(roll, t0, t1)
            if has_ref:
                row[I_NFREF] = _nonfinite_count(ref, t0, t1)
            if has_route:
                row[I_NFROUTE] = _nonfinite_count(route, t0, t1)
            continue
        _ratio_pass(m, lr_s, rm1_s, row)
        _clip_pass(m, ok_s, rm1_s, a_s, lo_thr, hi_thr, cfg[C_DUAL_CLIP_C], row)
        if has_ent:
            _entropy_pass(ent, t0, t1, ok_s, cfg[C_ENTROPY_LOW], e_s, row)
            if want_hist:
                _hist_pass(m, e_s, bin_s, H_ent[R])
        if has_ref:
            _ref_pass(ref, lp, t0, t1, ok_s, d_s, w_s, row)
        if has_roll:
            _mismatch_pass(olp, roll, t0, t1, ok_s, cfg[C_TIS_CAP], d_s, w_s, row)
            if want_hist:
                _mismatch_hist_pass(m, d_s, bin_s, H_d[R], H_absd[R])
            _correction_pass(  # c_s, e_s and f_s: its scratch (the centered products come later)
                seq_off,
                s0,
                s1,
                t0,
                d_s,
                w_s,
                a_s,
                roll,
                cfg,
                ln_low,
                want_hist,
                H_seqd[R],
                seq_flag,
                row,
                c_s,
                e_s,
                f_s,
            )
        if has_route:
            _route_pass(route, t0, m, ok_s, has_roll, d_s, w_s, row)
        if has_ver:
            _staleness_pass(ver, t0, m, ok_s, steps[R], row)
        btab = no_btab if has_stage else _bucket_table(m, ok_s, pos, t0, nb)
        if want_hist:
            _bins_pass(m, lr_s, True, bin_s)
        seq_L = np.zeros(s1 - s0)
        seq_len = np.zeros(s1 - s0)
        seq_A = np.zeros(s1 - s0)
        row[I_NSEQV], row[I_NMINP] = _scan_pass(
            seq_off,
            s0,
            s1,
            t0,
            ok_s,
            lr_s,
            a_s,
            rm1_s,
            bin_s,
            pos,
            stage,
            has_stage,
            btab,
            nb,
            want_hist,
            H_lr[R],
            H_min[R],
            BK[R],
            L_s,
            seq_L,
            seq_len,
            seq_A,
            seq_flag,
        )
        row[I_MCUM], row[I_CTPO] = _cum_pass(m, L_s, a_s, pos, t0, cfg[C_CTPO_A], cfg[C_CTPO_B])
        _sequence_pass(seq_L, seq_len, seq_A, lo_thr, hi_thr, row)
        _covariance_pass(m, ok_s, lp, t0, a_s, n, cfg[C_COV_BAND_LO], cfg[C_COV_BAND_HI], cfg[C_COV_TOP_FRAC], c_s, row)
        if want_cov:
            for j in range(m):
                cov_out[t0 + j] = c_s[j]


def config_array(cfg: RecorderConfig) -> np.ndarray:
    """The configuration values the kernel reads (:data:`rldiag.config.KERNEL_INPUTS`), in its order."""
    return np.array(cfg.kernel_values(), dtype=np.float64)


def affected_stats(changed: Iterable[str]) -> frozenset[str]:
    """The statistics whose values change when the :class:`RecorderConfig` fields ``changed`` change.

    >>> sorted(affected_stats({"eps_high"}))[:3]
    ['b_n', 'b_s', 'b_s2']
    >>> affected_stats({"logp_tolerance"}) == frozenset(STATS)
    True
    >>> affected_stats({"roll_steps"})
    frozenset()
    """
    changed = set(changed) & set(STAT_FIELDS)
    if changed & EVERY_STAT_FIELDS:
        return frozenset(STATS)
    if changed:
        return frozenset(name for name, d in STATS.items() if d.config_dependent)
    return frozenset()


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
    route_agree: np.ndarray | None = None
    """Per token: share of the token's MoE expert choices on which trainer and sampler agree."""
    teacher_logp: np.ndarray | None = None
    """Per token: the teacher's log-prob (distillation); only its non-finite values are counted here."""
    base_logp: np.ndarray | None = None
    """Per token: the base model's log-prob (extrapolation cliff); only its non-finite values are counted here."""

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


class _Scratch(threading.local):
    """The kernel's per-token scratch, kept by each thread for its next call and grown as records grow.

    Fresh scratch for a 524k-token record is 40 MB; the allocator hands memory that size back to the system
    when it is freed, and writing it again costs a page fault per 4 KiB page (about 1 us here): 70% of the
    kernel's time on such a record (``benchmarks/bench_kernel.py``: 18.5 ms with fresh scratch, 5.4 ms when the
    allocator kept its memory)."""

    def __init__(self) -> None:
        self.size = -1
        self.arrays: tuple[np.ndarray, ...] = ()

    def get(self, n: int) -> tuple[np.ndarray, ...]:
        """Scratch for records of up to ``n`` tokens: 8 float64 rows, then bool, int64 and uint8 arrays."""
        if n > self.size:
            size = max(n, int(1.25 * self.size))
            self.arrays = (
                np.empty((8, size)),
                np.empty(size, dtype=np.bool_),
                np.empty(size, dtype=np.int64),
                np.empty(size, dtype=np.uint8),
            )
            self.size = size
        return self.arrays


_SCRATCH = _Scratch()


def _longest_record(rec_off: np.ndarray, seq_off: np.ndarray) -> int:
    """Tokens of the longest record (0 without records)."""
    return int(np.max(np.diff(seq_off[rec_off]))) if rec_off.size > 1 else 0


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
    cov_out = np.full(n_tok if cov else 0, np.nan)
    seq_flag = np.zeros((n_seq, 4), dtype=np.uint8)
    present = {
        "entropy": batch.entropy is not None,
        "rollout": batch.rollout_logp is not None,
        "ref": batch.ref_logp is not None,
        "version": batch.version is not None,
        "stage": batch.stage is not None,
        "hists": hists,
        "cov": want_cov,
        "route": batch.route_agree is not None,
    }
    flags = np.array([present[f] for f in FLAGS], dtype=np.int64)
    rec_off = np.ascontiguousarray(batch.rec_off, dtype=np.int64)
    seq_off = np.ascontiguousarray(batch.seq_off, dtype=np.int64)
    _kernel(
        rec_off,
        seq_off,
        np.ascontiguousarray(batch.steps, dtype=np.int64),
        _f32(batch.logp),
        _f32(batch.old_logp),
        _f32(batch.adv),
        _f32(batch.entropy),
        _f32(batch.rollout_logp),
        _f32(batch.ref_logp),
        _EMPTY_I if batch.version is None else np.ascontiguousarray(batch.version, dtype=np.int64),
        _EMPTY_I if batch.stage is None else np.ascontiguousarray(batch.stage, dtype=np.int64),
        np.ascontiguousarray(batch.pos, dtype=np.int32),
        _f32(batch.route_agree),
        flags,
        config_array(cfg),
        S,
        H["h_lr"],
        H["h_ent"],
        H["h_absd"],
        H["h_minprefix"],
        H["h_d"],
        H["h_seq_absd"],
        BK,
        cov_out,
        seq_flag,
        *_SCRATCH.get(_longest_record(rec_off, seq_off)),
    )
    seq_rec = np.repeat(np.arange(n_rec), np.diff(batch.rec_off))
    for name, given in (
        ("entropy", batch.entropy),
        ("rollout_logp", batch.rollout_logp),
        ("ref_logp", batch.ref_logp),
        ("route_agree", batch.route_agree),
    ):
        if given is not None:
            S[:, _i(f"ng_{name}")] = S[:, _i("n_masked")]
    # teacher/base log-probs: no kernel pass reads them (the cliff reads the token rows), so only their
    # non-finite values are counted, per record, over its masked-in tokens
    tok_off = batch.seq_off[batch.rec_off]
    for name, given in (("teacher_logp", batch.teacher_logp), ("base_logp", batch.base_logp)):
        if given is not None:
            bad = np.concatenate([[0], np.cumsum(~np.isfinite(_f32(given)), dtype=np.int64)])
            S[:, _i(f"nf_{name}")] = np.diff(bad[tok_off])
            S[:, _i(f"ng_{name}")] = S[:, _i("n_masked")]
    # rewards: over sequences with at least one masked-in token
    if batch.reward is not None:
        rw = _f32(batch.reward).astype(np.float64)  # the precision of the token rows, as for every input
        ok = (seq_flag[:, 0] == 1) & np.isfinite(rw)
        S[:, _i("n_seq_reward")] = np.bincount(seq_rec[ok], minlength=n_rec)
        S[:, _i("s_reward")] = np.bincount(seq_rec[ok], weights=rw[ok], minlength=n_rec)
        S[:, _i("s_reward2")] = np.bincount(seq_rec[ok], weights=rw[ok] ** 2, minlength=n_rec)
        masked_in = seq_flag[:, 0] == 1
        S[:, _i("ng_reward")] = np.bincount(seq_rec[masked_in], minlength=n_rec)
        S[:, _i("nf_reward")] = np.bincount(seq_rec[masked_in & ~np.isfinite(rw)], minlength=n_rec)
        if batch.rollout_logp is not None:  # removal_pass / seq_mismatch_pass set the bits of column 3
            correct = ok & (rw >= cfg.correct_reward)
            for bit, c in enumerate(CORRECTIONS):
                hit = (seq_flag[:, 3] >> bit) & 1 == 1
                S[:, _i(f"n_rmseq_{c}")] = np.bincount(seq_rec[ok & hit], minlength=n_rec)
                S[:, _i(f"n_rmseq_{c}_ok")] = np.bincount(seq_rec[correct & hit], minlength=n_rec)
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
            cov_out[batch.seq_off[batch.rec_off[b]] : batch.seq_off[batch.rec_off[b + 1]]] = np.nan
    vectors = {"b_n": BK[:, 0], "b_s": BK[:, 1], "b_s2": BK[:, 2]}
    return BatchStats(scalars=S, hists=H, vectors=vectors, sets=sets, cov=cov_out)


def _split_unique(rec: np.ndarray, vals: np.ndarray, n_rec: int) -> list[np.ndarray]:
    """Each record's distinct values, ascending (``rec[i]``: the record of ``vals[i]``). A lexsort of the pairs
    and a neighbour test: the result of ``np.unique(pairs, axis=0)``, which was 18x slower on 4,200 pairs."""
    if rec.size == 0:
        return [_EMPTY_I] * n_rec
    order = np.lexsort((vals, rec))
    r, v = rec[order], vals[order]
    first = np.ones(r.size, dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (v[1:] != v[:-1])
    r, v = r[first], v[first]
    bounds = np.searchsorted(r, np.arange(n_rec + 1))
    return [v[bounds[i] : bounds[i + 1]].copy() for i in range(n_rec)]


def warmup() -> None:
    """Compile the kernel (cached on disk after the first process) on a tiny batch."""
    b = TokenBatch(
        rec_off=np.array([0, 1]),
        seq_off=np.array([0, 2]),
        steps=np.array([0]),
        logp=np.array([-1.0, -2.0]),
        old_logp=np.array([-1.0, -2.1]),
        adv=np.array([1.0, 1.0]),
        pos=np.array([0, 1]),
    )
    compute(b, RecorderConfig())
