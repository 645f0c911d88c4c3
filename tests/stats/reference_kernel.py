"""The statistics kernel: one record (a micro-batch at one step) -> its sufficient statistics.

This is the single implementation of every per-token statistic. The recorder runs it in its background
thread on host copies of the tensors; the analysis layer runs it again on token rows read back from Parquet
(``run.step_metrics(config=...)``, ``rldiag import``). Pure numpy, no I/O, no torch.

Every statistic is declared in :data:`STATS` with how it merges (sum, min, max, log-sum-exp, histogram counts,
vector sum, set union), so the statistics of micro-batches, ranks and files combine exactly
(metrics-spec "exactness rule"). Metric specs in :mod:`rldiag.metrics.registry` name the statistics they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from rldiag.config import RecorderConfig
from rldiag.stats import hist

MergeKind = Literal["sum", "min", "max", "lse", "hist_mag", "hist_signed", "vec_sum", "set"]


@dataclass(frozen=True)
class StatDecl:
    """A sufficient statistic: its name in the statistics table, how it merges, and what it is."""

    name: str
    merge: MergeKind
    doc: str
    config_dependent: bool = False
    """True when its value depends on the clip settings (recomputed from token rows for another config)."""


def _decls() -> dict[str, StatDecl]:
    d: list[StatDecl] = [
        StatDecl("n", "sum", "valid tokens (masked in, finite logp/old_logp/adv, logp <= tolerance)"),
        StatDecl("n_masked", "sum", "masked-in tokens before validity checks"),
        StatDecl("n_nonfinite", "sum", "masked-in tokens with a NaN/Inf logp, old_logp or adv"),
        StatDecl("n_invalid", "sum", "masked-in tokens rejected for a log-prob above 0 or a wrong dtype"),
        StatDecl("rows_written", "sum", "token rows written to Parquet for this record"),
        StatDecl("rows_dropped", "sum", "token rows dropped because the queue was full"),
        StatDecl("s_lr", "sum", "sum of lr = logp - old_logp"),
        StatDecl("s_lr2", "sum", "sum of lr^2"),
        StatDecl("s_rm1", "sum", "sum of r - 1 (expm1(lr), exact near r = 1)"),
        StatDecl("s_rm1sq", "sum", "sum of (r - 1)^2"),
        StatDecl("s_k3", "sum", "sum of r - 1 - lr"),
        StatDecl("min_r", "min", "smallest ratio"),
        StatDecl("max_r", "max", "largest ratio"),
        StatDecl("h_lr", "hist_signed", "histogram of lr (signed log-spaced bins)"),
        StatDecl("n_clip_low", "sum", "r < 1 - eps_low and adv < 0", True),
        StatDecl("n_clip_high", "sum", "r > 1 + eps_high and adv > 0", True),
        StatDecl("n_clip_sym", "sum", "r < 1 - eps_low or r > 1 + eps_high", True),
        StatDecl("n_dual", "sum", "adv < 0 and r > c (dual clip)", True),
        StatDecl("n_pos_up", "sum", "adv > 0 and r > 1"),
        StatDecl("n_pos_down", "sum", "adv > 0 and r < 1"),
        StatDecl("n_neg_up", "sum", "adv < 0 and r > 1"),
        StatDecl("n_neg_down", "sum", "adv < 0 and r < 1"),
        StatDecl("s_bal_pos", "sum", "sum max(eff*adv, 0), eff the clipped ratio (BAPO)", True),
        StatDecl("s_bal_neg", "sum", "sum max(-eff*adv, 0)", True),
        StatDecl("n_ent", "sum", "valid tokens with a finite entropy"),
        StatDecl("s_ent", "sum", "sum of entropy"),
        StatDecl("n_ent_low", "sum", "entropy < entropy_low", True),
        StatDecl("h_ent", "hist_mag", "histogram of entropy (log-spaced bins)"),
        StatDecl("s_logp", "sum", "sum of logp"),
        StatDecl("s_adv", "sum", "sum of adv"),
        StatDecl("s_adv2", "sum", "sum of adv^2"),
        StatDecl("s_logp_adv", "sum", "sum of logp*adv"),
        StatDecl("n_adv_pos", "sum", "adv > 0"),
        StatDecl("n_adv_zero", "sum", "adv == 0"),
        StatDecl("n_cov_band", "sum", "centered product (adv-mean)(logp-mean) within cov_band", True),
        StatDecl("s_cov_pos", "sum", "sum of the positive centered products"),
        StatDecl("s_cov_top", "sum", "positive centered-product mass of the record's top cov_top_frac tokens", True),
        StatDecl("groups_all", "set", "prompt groups with at least one response token"),
        StatDecl("groups_nonzero", "set", "prompt groups with a non-zero advantage"),
        StatDecl("n_seq", "sum", "sequences with at least one masked-in token"),
        StatDecl("n_seq_valid", "sum", "sequences with at least one valid token"),
        StatDecl("n_seq_reward", "sum", "sequences with a finite reward"),
        StatDecl("s_reward", "sum", "sum of sequence rewards"),
        StatDecl("s_reward2", "sum", "sum of squared sequence rewards"),
        StatDecl("lse_seq", "lse", "log sum_i exp(L_i), L_i = sum_t lr of sequence i"),
        StatDecl("lse_seq2", "lse", "log sum_i exp(2 L_i)"),
        StatDecl("s_gspo", "sum", "sum over sequences of s_i = exp(mean_t lr)"),
        StatDecl("max_gspo", "max", "largest s_i"),
        StatDecl("n_gspo_clip", "sum", "sequences clipped by the GSPO sequence clip", True),
        StatDecl("max_cum_abs", "max", "largest |L_t|, L_t the cumulative lr within a sequence"),
        StatDecl("n_ctpo_clip", "sum", "tokens with L_t outside the CTPO bounds", True),
        StatDecl("n_minprefix", "sum", "tokens with a previous valid token in their sequence"),
        StatDecl("h_minprefix", "hist_signed", "histogram of the exclusive prefix minimum of lr"),
        StatDecl("n_ref", "sum", "valid tokens with a finite ref_logp"),
        StatDecl("s_ref_k3", "sum", "sum of exp(ref-logp) - (ref-logp) - 1"),
        StatDecl("n_mm", "sum", "valid tokens with a finite rollout_logp"),
        StatDecl("s_mm_d", "sum", "sum of d = old_logp - rollout_logp"),
        StatDecl("s_mm_k3", "sum", "sum of w - 1 - d, w = exp(d)"),
        StatDecl("s_mm_wm1", "sum", "sum of w - 1"),
        StatDecl("s_mm_wm1sq", "sum", "sum of (w - 1)^2"),
        StatDecl("min_w", "min", "smallest mismatch weight w"),
        StatDecl("max_w", "max", "largest mismatch weight w"),
        StatDecl("n_tis", "sum", "w > C", True),
        StatDecl("n_mis", "sum", "w > C or w < 1/C", True),
        StatDecl("h_absd", "hist_mag", "histogram of |d|"),
        StatDecl("n_ver", "sum", "valid tokens with a policy version"),
        StatDecl("s_stale", "sum", "sum of step - version"),
        StatDecl("max_stale", "max", "largest step - version"),
        StatDecl("b_n", "vec_sum", "tokens per position/stage bucket", True),
        StatDecl("b_s", "vec_sum", "sum of r - 1 per bucket", True),
        StatDecl("b_s2", "vec_sum", "sum of (r - 1)^2 per bucket", True),
    ]
    return {s.name: s for s in d}


STATS: Final[dict[str, StatDecl]] = _decls()
"""Every sufficient statistic the kernel produces, by name."""

_FLOAT_KINDS = {"sum", "min", "max", "lse"}
_IDENTITY = {"sum": 0.0, "min": math.inf, "max": -math.inf, "lse": -math.inf}


@dataclass
class RecordInput:
    """Host arrays of one record, already shaped ``[B, T]`` (per-sequence inputs ``[B]``)."""

    logp: np.ndarray
    old_logp: np.ndarray
    adv: np.ndarray
    mask: np.ndarray
    step: int = 0
    entropy: np.ndarray | None = None
    rollout_logp: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    teacher_logp: np.ndarray | None = None
    base_logp: np.ndarray | None = None
    group: np.ndarray | None = None
    reward: np.ndarray | None = None
    token_id: np.ndarray | None = None
    version: np.ndarray | None = None
    turn: np.ndarray | None = None
    stage: np.ndarray | None = None
    pos: np.ndarray | None = None
    """Explicit positions ``[B, T]`` (token-row recompute); default: the column index."""
    invalid_record: bool = False
    """Lenient mode saw a wrong dtype: every masked-in token is counted invalid."""


def empty_stats(n_buckets: int) -> dict[str, Any]:
    """Statistics of a record with no valid token (identity of every merge)."""
    out: dict[str, Any] = {}
    for name, decl in STATS.items():
        if decl.merge in _FLOAT_KINDS:
            out[name] = _IDENTITY[decl.merge]
        elif decl.merge in ("hist_mag", "hist_signed"):
            out[name] = (np.zeros(0, np.uint16), np.zeros(0, np.uint32))
        elif decl.merge == "vec_sum":
            out[name] = np.zeros(n_buckets)
        else:
            out[name] = np.zeros(0, np.int64)
    return out


def _sum(x: np.ndarray) -> float:
    return float(np.add.reduce(x, dtype=np.float64)) if x.size else 0.0


def _take(a: np.ndarray | None, flat: np.ndarray) -> np.ndarray | None:
    return None if a is None else a.reshape(-1)[flat]


def _lse(x: np.ndarray) -> float:
    if x.size == 0:
        return -math.inf
    m = float(np.max(x))
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


def compute(rec: RecordInput, cfg: RecorderConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Sufficient statistics of one record.

    Returns ``(stats, flat, cov)``: the statistics (names of :data:`STATS`), the flat indices into ``[B, T]``
    of the masked-in tokens, and each such token's centered covariance product (NaN for invalid tokens),
    which the writer stores as the ``cov`` column.
    """
    mask = np.asarray(rec.mask, dtype=bool)
    B, T = mask.shape
    out = empty_stats(cfg.n_buckets)
    flat_all = np.flatnonzero(mask.reshape(-1))
    n_masked = flat_all.size
    out["n_masked"] = float(n_masked)
    cov_all = np.full(n_masked, np.nan, dtype=np.float32)
    if n_masked == 0:
        return out, flat_all, cov_all
    seq_any = mask.any(axis=1)
    out["n_seq"] = float(seq_any.sum())
    if rec.reward is not None:
        rw = np.asarray(rec.reward, dtype=np.float64).reshape(-1)[seq_any]
        rw = rw[np.isfinite(rw)]
        out["n_seq_reward"] = float(rw.size)
        out["s_reward"] = _sum(rw)
        out["s_reward2"] = _sum(rw * rw)
    if rec.invalid_record:
        out["n_invalid"] = float(n_masked)
        return out, flat_all, cov_all

    lp = rec.logp.reshape(-1)[flat_all].astype(np.float64)
    olp = rec.old_logp.reshape(-1)[flat_all].astype(np.float64)
    a = rec.adv.reshape(-1)[flat_all].astype(np.float64)
    finite = np.isfinite(lp) & np.isfinite(olp) & np.isfinite(a)
    bad = finite & ((lp > cfg.logp_tolerance) | (olp > cfg.logp_tolerance))
    keep = finite & ~bad
    out["n_nonfinite"] = float(n_masked - int(finite.sum()))
    out["n_invalid"] = float(bad.sum())
    if not keep.all():
        sel = np.flatnonzero(keep)
        flat = flat_all[sel]
        lp, olp, a = lp[sel], olp[sel], a[sel]
    else:
        sel = None
        flat = flat_all
    n = flat.size
    out["n"] = float(n)
    if n == 0:
        return out, flat_all, cov_all
    rows = flat // T
    cols = flat % T if rec.pos is None else rec.pos.reshape(-1)[flat].astype(np.int64)

    # ---- ratio, KL ---------------------------------------------------------------------------------
    lr = lp - olp
    with np.errstate(over="ignore", invalid="ignore"):
        rm1 = np.expm1(lr)
    r = rm1 + 1.0
    out["s_lr"] = _sum(lr)
    out["s_lr2"] = _sum(lr * lr)
    out["s_rm1"] = _sum(rm1)
    with np.errstate(over="ignore", invalid="ignore"):
        out["s_rm1sq"] = _sum(rm1 * rm1)
        out["s_k3"] = _sum(rm1 - lr)
    out["min_r"] = float(r.min())
    out["max_r"] = float(r.max())
    out["h_lr"] = hist.sparse(hist.signed_index(lr), hist.N_SIGNED)

    # ---- clipping, regimes, balance ----------------------------------------------------------------
    apos, aneg = a > 0, a < 0
    rup, rdown = r > 1.0, r < 1.0
    lo_c = r < 1.0 - cfg.eps_low
    hi_c = r > 1.0 + cfg.eps_high
    out["n_clip_low"] = float(np.count_nonzero(lo_c & aneg))
    out["n_clip_high"] = float(np.count_nonzero(hi_c & apos))
    out["n_clip_sym"] = float(np.count_nonzero(lo_c | hi_c))
    out["n_dual"] = float(np.count_nonzero(aneg & (r > cfg.dual_clip_c)))
    out["n_pos_up"] = float(np.count_nonzero(apos & rup))
    out["n_pos_down"] = float(np.count_nonzero(apos & rdown))
    out["n_neg_up"] = float(np.count_nonzero(aneg & rup))
    out["n_neg_down"] = float(np.count_nonzero(aneg & rdown))
    eff = np.where(a >= 0, np.minimum(r, 1.0 + cfg.eps_high), np.maximum(r, 1.0 - cfg.eps_low))
    with np.errstate(invalid="ignore"):
        prod = eff * a
    out["s_bal_pos"] = _sum(np.maximum(prod, 0.0))
    out["s_bal_neg"] = _sum(np.maximum(-prod, 0.0))

    # ---- entropy and the entropy-advantage covariance ----------------------------------------------
    if rec.entropy is not None:
        e = rec.entropy.reshape(-1)[flat].astype(np.float64)
        e = e[np.isfinite(e)]
        out["n_ent"] = float(e.size)
        out["s_ent"] = _sum(e)
        out["n_ent_low"] = float(np.count_nonzero(e < cfg.entropy_low))
        out["h_ent"] = hist.sparse(hist.mag_index(np.maximum(e, 0.0)), hist.N_MAG)
    out["s_logp"] = _sum(lp)
    out["s_adv"] = _sum(a)
    out["s_adv2"] = _sum(a * a)
    out["s_logp_adv"] = _sum(lp * a)
    out["n_adv_pos"] = float(np.count_nonzero(apos))
    out["n_adv_zero"] = float(np.count_nonzero(a == 0))
    cov = (a - out["s_adv"] / n) * (lp - out["s_logp"] / n)
    lo_b, hi_b = cfg.cov_band
    out["n_cov_band"] = float(np.count_nonzero((cov > lo_b) & (cov < hi_b)))
    out["s_cov_pos"] = _sum(np.maximum(cov, 0.0))
    k = max(1, math.ceil(cfg.cov_top_frac * n))
    top = np.partition(cov, n - k)[n - k :] if k < n else cov
    out["s_cov_top"] = _sum(np.maximum(top, 0.0))
    if sel is None:
        cov_all[:] = cov
    else:
        cov_all[sel] = cov

    # ---- groups and sequences ----------------------------------------------------------------------
    seq_len = np.bincount(rows, minlength=B).astype(np.float64)
    has = seq_len > 0
    out["n_seq_valid"] = float(has.sum())
    if rec.group is not None:
        g = np.asarray(rec.group).reshape(-1).astype(np.int64)
        nz = np.bincount(rows, weights=(a != 0).astype(np.float64), minlength=B) > 0
        out["groups_all"] = np.unique(g[seq_any])
        out["groups_nonzero"] = np.unique(g[has & nz])
    L = np.bincount(rows, weights=lr, minlength=B)[has]
    out["lse_seq"] = _lse(L)
    out["lse_seq2"] = _lse(2.0 * L)
    lens = seq_len[has]
    A_seq = np.bincount(rows, weights=a, minlength=B)[has] / lens
    with np.errstate(over="ignore"):
        s_i = np.exp(L / lens)
    out["s_gspo"] = _sum(s_i)
    out["max_gspo"] = float(s_i.max())
    out["n_gspo_clip"] = float(
        np.count_nonzero(((s_i > 1.0 + cfg.eps_high) & (A_seq > 0)) | ((s_i < 1.0 - cfg.eps_low) & (A_seq < 0)))
    )
    # cumulative and prefix-minimum log-ratios within each sequence, in [B, T] layout
    if rec.pos is None:
        grid = np.zeros(B * T)
        grid[flat] = lr
        cum = np.cumsum(grid.reshape(B, T), axis=1).reshape(-1)[flat]
        grid[:] = np.inf
        grid[flat] = lr
        pmin = np.minimum.accumulate(grid.reshape(B, T), axis=1)
        prev = np.concatenate([np.full((B, 1), np.inf), pmin[:, :-1]], axis=1).reshape(-1)[flat]
    else:  # token rows: order by (row, pos) and scan within rows
        order = np.lexsort((cols, rows))
        lr_o, rows_o = lr[order], rows[order]
        starts = np.r_[True, rows_o[1:] != rows_o[:-1]]
        seg = np.cumsum(starts) - 1
        cs = np.cumsum(lr_o)
        base = (cs - lr_o)[starts][seg]
        cum_o = cs - base
        prev_o = np.full(n, np.inf)
        for s0, s1 in zip(np.flatnonzero(starts), np.r_[np.flatnonzero(starts)[1:], n]):
            if s1 - s0 > 1:
                prev_o[s0 + 1 : s1] = np.minimum.accumulate(lr_o[s0 : s1 - 1])
        cum = np.empty(n)
        prev = np.empty(n)
        cum[order] = cum_o
        prev[order] = prev_o
    out["max_cum_abs"] = float(np.abs(cum).max())
    root = np.sqrt(cols + 1.0)
    ca, cb = cfg.ctpo_bounds
    out["n_ctpo_clip"] = float(np.count_nonzero((cum < -ca * root) | (cum > cb * root)))
    hp = np.isfinite(prev)
    out["n_minprefix"] = float(hp.sum())
    out["h_minprefix"] = hist.sparse(hist.signed_index(prev[hp]), hist.N_SIGNED)

    # ---- reference KL, mismatch, staleness ---------------------------------------------------------
    if rec.ref_logp is not None:
        x = rec.ref_logp.reshape(-1)[flat].astype(np.float64) - lp
        x = x[np.isfinite(x)]
        out["n_ref"] = float(x.size)
        with np.errstate(over="ignore"):
            out["s_ref_k3"] = _sum(np.expm1(x) - x)
    if rec.rollout_logp is not None:
        d = olp - rec.rollout_logp.reshape(-1)[flat].astype(np.float64)
        d = d[np.isfinite(d)]
        out["n_mm"] = float(d.size)
        if d.size:
            with np.errstate(over="ignore", invalid="ignore"):
                wm1 = np.expm1(d)
                out["s_mm_wm1sq"] = _sum(wm1 * wm1)
            w = wm1 + 1.0
            out["s_mm_d"] = _sum(d)
            out["s_mm_k3"] = _sum(wm1 - d)
            out["s_mm_wm1"] = _sum(wm1)
            out["min_w"] = float(w.min())
            out["max_w"] = float(w.max())
            C = cfg.tis_cap
            out["n_tis"] = float(np.count_nonzero(w > C))
            out["n_mis"] = float(np.count_nonzero((w > C) | (w < 1.0 / C)))
            out["h_absd"] = hist.sparse(hist.mag_index(d), hist.N_MAG)
    if rec.version is not None:
        v = np.asarray(rec.version)
        v = (np.broadcast_to(v.reshape(B, 1), (B, T)) if v.ndim == 1 else v).reshape(-1)[flat]
        stale = (rec.step - v.astype(np.float64))
        stale = stale[np.isfinite(stale)]
        out["n_ver"] = float(stale.size)
        out["s_stale"] = _sum(stale)
        out["max_stale"] = float(stale.max()) if stale.size else -math.inf

    # ---- position / stage buckets ------------------------------------------------------------------
    nb = cfg.n_buckets
    if rec.stage is not None:
        st = np.asarray(rec.stage)
        st = (np.broadcast_to(st.reshape(B, 1), (B, T)) if st.ndim == 1 else st).reshape(-1)[flat]
        bucket = np.clip(st.astype(np.int64), 0, nb - 1)
    else:
        longest = int(cols.max()) + 1
        bucket = np.minimum(cols * nb // longest, nb - 1)
    out["b_n"] = np.bincount(bucket, minlength=nb).astype(np.float64)
    out["b_s"] = np.bincount(bucket, weights=rm1, minlength=nb)
    with np.errstate(over="ignore", invalid="ignore"):
        out["b_s2"] = np.bincount(bucket, weights=rm1 * rm1, minlength=nb)
    return out, flat_all, cov_all
