"""Independent numpy references of every core metric, straight from metrics-spec section 2.

They work on the raw records of one step (lists of [B, T] arrays), with no rldiag code except the histogram
quantile *bound* checks, which compare against exact numpy quantiles.
"""

from __future__ import annotations

import math

import numpy as np

EPS_LOW, EPS_HIGH, C_DUAL, C_TIS = 0.2, 0.28, 3.0, 2.0
ICEPOP, GEO, CORRECT, LOWPROB = (0.5, 5.0), (0.999, 1.002), 1.0, 0.1
"""The RecorderConfig defaults of the second-generation diagnostics (docs/metrics.md, mismatch/removed/moe)."""


def make_record(
    rng: np.random.Generator,
    B: int,
    T: int,
    *,
    heavy: bool = True,
    nan_frac: float = 0.0,
    groups: int | None = None,
    zero_group: bool = True,
    extras: bool = True,
    group_offset: int = 0,
    version_step: int | None = None,
    heavy_mismatch: bool = False,
) -> dict:
    """A random record with heavy-tailed ratios, ragged masks, optional NaNs, empty groups and extras."""
    logp = -rng.exponential(1.0, (B, T))
    noise = rng.standard_t(2, (B, T)) * 0.15 if heavy else rng.normal(0, 0.1, (B, T))
    old = np.minimum(logp - noise, 0.0)
    lengths = rng.integers(0, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    G = groups or max(1, B // 4)
    group = group_offset + (np.arange(B) * G // B)
    adv = rng.normal(0, 1, B)
    if zero_group:
        adv[group == group_offset] = 0.0  # a dead group
    rec = {
        "logprobs": logp.astype(np.float32),
        "old_logprobs": old.astype(np.float32),
        "advantages": adv.astype(np.float32),
        "mask": mask,
        "group_ids": group.astype(np.int64),
        "rewards": rng.random(B).astype(np.float32),
    }
    rec["rewards"][rec["rewards"] > 0.6] = 1.0  # some correct answers (reward >= CORRECT)
    if extras:
        rec["entropy"] = rng.exponential(0.5, (B, T)).astype(np.float32)
        rec["rollout_logprobs"] = np.minimum(
            old + rng.normal(0, 0.05, (B, T)) + rng.standard_t(3, (B, T)) * 0.02, 0
        ).astype(np.float32)
        rec["ref_logprobs"] = np.minimum(logp + rng.normal(0, 0.1, (B, T)), 0).astype(np.float32)
        # MoE routing agreement: most tokens route alike (1), some share a few slots; from a generator of its
        # own (seeded by the record's log-probs), so the main stream, and every other test's data, is unchanged
        g = np.random.default_rng(int(np.abs(logp).sum() * 1e6) % 2**32)
        if heavy_mismatch:  # sampler outliers both ways: TIS, MIS, IcePop and the extreme share all fire
            jump = np.where(g.random((B, T)) < 0.5, -1.0, 1.0) * g.exponential(1.2, (B, T)) * (g.random((B, T)) < 0.08)
            rec["rollout_logprobs"] = np.minimum(rec["rollout_logprobs"] + jump, 0).astype(np.float32)
            rec["rollout_logprobs"][g.random((B, T)) < 0.02] = np.nan  # tokens the sampler gave no log-prob
        rec["route_agree"] = np.where(g.random((B, T)) < 0.7, 1.0, g.choice([0.0, 0.5, 0.75], (B, T))).astype(
            np.float32
        )
        if version_step is not None:
            rec["versions"] = (version_step - rng.integers(0, 4, B)).astype(np.int64)
    if nan_frac:
        bad = rng.random((B, T)) < nan_frac
        rec["logprobs"] = rec["logprobs"].copy()
        rec["logprobs"][bad] = np.nan
    return rec


def _flat(records: list[dict]) -> dict:
    """Valid tokens of a step, flattened, with per-token record/sequence/position ids."""
    out: dict[str, list] = {
        k: [] for k in ("lp", "olp", "adv", "ent", "roll", "ref", "rec", "seq", "pos", "ver", "route")
    }
    seq_info = []  # (record, row, group, reward, any_masked)
    n_nonfinite = 0
    for ri, r in enumerate(records):
        lp, olp = r["logprobs"].astype(np.float64), r["old_logprobs"].astype(np.float64)
        B, T = lp.shape
        adv = np.broadcast_to(np.asarray(r["advantages"], np.float64).reshape(B, -1), (B, T))
        mask = r.get("mask", np.ones((B, T), bool))
        fin = np.isfinite(lp) & np.isfinite(olp) & np.isfinite(adv)
        n_nonfinite += int((mask & ~fin).sum())
        valid = mask & fin
        for b in range(B):
            seq_info.append(
                (
                    ri,
                    b,
                    None if "group_ids" not in r else int(r["group_ids"][b]),
                    None if "rewards" not in r else float(r["rewards"][b]),
                    bool(mask[b].any()),
                    bool((valid[b] & (adv[b] != 0)).any()),
                )
            )
            for t in range(T):
                if not valid[b, t]:
                    continue
                out["lp"].append(lp[b, t])
                out["olp"].append(olp[b, t])
                out["adv"].append(adv[b, t])
                out["ent"].append(r["entropy"][b, t] if "entropy" in r else np.nan)
                out["roll"].append(r["rollout_logprobs"][b, t] if "rollout_logprobs" in r else np.nan)
                out["ref"].append(r["ref_logprobs"][b, t] if "ref_logprobs" in r else np.nan)
                out["ver"].append(r["versions"][b] if "versions" in r else np.nan)
                out["route"].append(r["route_agree"][b, t] if "route_agree" in r else np.nan)
                out["rec"].append(ri)
                out["seq"].append(len(seq_info) - 1)
                out["pos"].append(t)
    res = {k: np.array(v, dtype=np.float64) for k, v in out.items()}
    res["seq_info"] = seq_info
    res["n_nonfinite"] = n_nonfinite
    res["nonfinite"] = _nonfinite_per_input(records)
    return res


NONFINITE_ARGS = {
    "logp": "logprobs",
    "old_logp": "old_logprobs",
    "adv": "advantages",
    "entropy": "entropy",
    "rollout_logp": "rollout_logprobs",
    "ref_logp": "ref_logprobs",
    "route_agree": "route_agree",
    "teacher_logp": "teacher_logprobs",
    "base_logp": "base_logprobs",
    "reward": "rewards",
}
"""``<input>/nonfinite`` metric input -> record() argument."""


def _nonfinite_per_input(records: list[dict]) -> dict[str, float]:
    """``<input>/nonfinite``: NaN/Inf values among masked-in tokens (rewards: among sequences with one), NaN for
    an optional input no record gave."""
    out: dict[str, float] = {}
    for col, arg in NONFINITE_ARGS.items():
        count, given = 0, col in ("logp", "old_logp", "adv")
        for r in records:
            B, T = r["logprobs"].shape
            mask = r.get("mask", np.ones((B, T), bool))
            if arg not in r:
                continue
            given = True
            x = np.asarray(r[arg], dtype=np.float64)
            if col == "reward":
                count += int((mask.any(axis=1) & ~np.isfinite(x)).sum())
            else:
                count += int((mask & ~np.isfinite(np.broadcast_to(x.reshape(B, -1), (B, T)))).sum())
        out[f"{col}/nonfinite"] = float(count) if given else float("nan")
    return out


def reference_metrics(records: list[dict], step: int = 0) -> dict[str, float]:
    """Every core metric of one step, computed directly."""
    f = _flat(records)
    lp, olp, a = f["lp"], f["olp"], f["adv"]
    n = lp.size
    lr = lp - olp
    r = np.exp(lr)
    m: dict[str, float] = {}
    nan = float("nan")
    m["tokens/count"] = float(n)
    m["ratio/nonfinite"] = float(f["n_nonfinite"])
    m["ratio/mean"] = r.mean() if n else nan
    m["ratio/std"] = r.std() if n else nan
    m["ratio/m2"] = np.mean((r - 1) ** 2) if n else nan
    m["ratio/min"] = r.min() if n else nan
    m["ratio/max"] = r.max() if n else nan
    m["ess/token"] = r.sum() ** 2 / (n * (r**2).sum()) if n else nan
    m["kl/k1"] = np.mean(-lr) if n else nan
    m["kl/k2"] = np.mean(lr**2 / 2) if n else nan
    m["kl/k3"] = np.mean(r - 1 - lr) if n else nan
    x = f["ref"] - lp
    ok = np.isfinite(x)
    m["kl/ref_k3"] = np.mean(np.exp(x[ok]) - x[ok] - 1) if ok.any() else nan
    low = (r < 1 - EPS_LOW) & (a < 0)
    high = (r > 1 + EPS_HIGH) & (a > 0)
    m["clip/low"] = low.mean() if n else nan
    m["clip/high"] = high.mean() if n else nan
    m["clip/region"] = (low | high).mean() if n else nan
    m["clip/symmetric"] = ((r < 1 - EPS_LOW) | (r > 1 + EPS_HIGH)).mean() if n else nan
    m["clip/dual"] = ((a < 0) & (r > C_DUAL)).mean() if n else nan
    m["regime/pos_up"] = ((a > 0) & (r > 1)).mean() if n else nan
    m["regime/pos_down"] = ((a > 0) & (r < 1)).mean() if n else nan
    m["regime/neg_up"] = ((a < 0) & (r > 1)).mean() if n else nan
    m["regime/neg_down"] = ((a < 0) & (r < 1)).mean() if n else nan
    eff = np.where(a >= 0, np.minimum(r, 1 + EPS_HIGH), np.maximum(r, 1 - EPS_LOW))
    m["balance/pos"] = np.maximum(eff * a, 0).sum()
    m["balance/neg"] = np.maximum(-eff * a, 0).sum()
    tot = m["balance/pos"] + m["balance/neg"]
    m["balance/pos_share"] = m["balance/pos"] / tot if tot > 0 else nan
    e = f["ent"][np.isfinite(f["ent"])]
    m["entropy/mean"] = e.mean() if e.size else nan
    m["entropy/low_frac"] = (e < 0.05).mean() if e.size else nan
    m["entropy/cov"] = np.mean(lp * a) - lp.mean() * a.mean() if n else nan
    # centered products with means over each record
    band = 0
    pos_mass = 0.0
    top_mass = 0.0
    for ri in np.unique(f["rec"]):
        sel = f["rec"] == ri
        c = (a[sel] - a[sel].mean()) * (lp[sel] - lp[sel].mean())
        band += int(((c > 1) & (c < 5)).sum())
        pos_mass += np.maximum(c, 0).sum()
        k = max(1, math.ceil(0.002 * c.size))
        top_mass += np.maximum(np.sort(c)[::-1][:k], 0).sum()
    m["entropy/cov_band_frac"] = band / n if n else nan
    m["entropy/cov_top_share"] = top_mass / pos_mass if pos_mass > 0 else nan
    m["adv/mean"] = a.mean() if n else nan
    m["adv/std"] = a.std() if n else nan
    m["adv/pos_frac"] = (a > 0).mean() if n else nan
    m["adv/zero_frac"] = (a == 0).mean() if n else nan
    info = f["seq_info"]
    groups_all = {g for (_, _, g, _, anym, _) in info if g is not None and anym}
    groups_nz = {g for (_, _, g, _, _, nz) in info if g is not None and nz}
    m["group/nonzero_frac"] = len(groups_nz) / len(groups_all) if groups_all else nan
    rw = np.array([rw for (_, _, _, rw, anym, _) in info if rw is not None and anym])
    m["reward/mean"] = rw.mean() if rw.size else nan
    m["reward/std"] = rw.std() if rw.size else nan
    seqs = np.unique(f["seq"]).astype(int)
    m["seq/count"] = float(sum(1 for s in info if s[4]))
    m["seq/len_mean"] = n / seqs.size if seqs.size else nan
    # sequence level
    L = np.array([lr[f["seq"] == s].sum() for s in seqs])
    lens = np.array([(f["seq"] == s).sum() for s in seqs])
    A = np.array([a[f["seq"] == s].mean() for s in seqs])
    if seqs.size:
        w = np.exp(L - L.max())
        m["ess/seq"] = w.sum() ** 2 / (seqs.size * (w**2).sum())
        s_i = np.exp(L / lens)
        m["seq/gspo_ratio_mean"] = s_i.mean()
        m["seq/gspo_ratio_max"] = s_i.max()
        m["seq/gspo_clip"] = np.mean(((s_i > 1 + EPS_HIGH) & (A > 0)) | ((s_i < 1 - EPS_LOW) & (A < 0)))
    else:
        for k in ("ess/seq", "seq/gspo_ratio_mean", "seq/gspo_ratio_max", "seq/gspo_clip"):
            m[k] = nan
    cum_abs, ctpo, prefix = [], 0, []
    for s in seqs:
        sel = f["seq"] == s
        lrs, ps, As = lr[sel], f["pos"][sel], f["adv"][sel]
        cs = np.cumsum(lrs)
        cum_abs.append(np.abs(cs).max())
        root = np.sqrt(ps + 1)
        # CTPO's clip, sign-aware like PPO's (rldiag.stats.definitions.ctpo_clipped)
        ctpo += int((((As < 0) & (cs < -0.025 * root)) | ((As > 0) & (cs > 0.05 * root))).sum())
        for t in range(1, lrs.size):
            prefix.append(np.exp(lrs[:t].min()))
    m["seq/cum_logratio_absmax"] = max(cum_abs) if cum_abs else nan
    m["seq/ctpo_clip"] = ctpo / n if n else nan
    # mismatch
    d = olp - f["roll"]
    ok = np.isfinite(d)
    if ok.any():
        d = d[ok]
        w = np.exp(d)
        m["mismatch/k1"] = np.mean(-d)
        m["mismatch/k3"] = np.mean(w - 1 - d)
        m["mismatch/is_min"], m["mismatch/is_max"] = w.min(), w.max()
        m["mismatch/tis_frac"] = np.mean(w > C_TIS)
        m["mismatch/mis_frac"] = np.mean((w > C_TIS) | (w < 1 / C_TIS))
        m["mismatch/ess"] = w.sum() ** 2 / (w.size * (w**2).sum())
    else:
        for k in ("k1", "k3", "is_min", "is_max", "tis_frac", "mis_frac", "ess"):
            m[f"mismatch/{k}"] = nan
    m.update(reference_second_generation(f))
    m.update(f["nonfinite"])
    v = f["ver"][np.isfinite(f["ver"])]
    m["staleness/mean"] = float(np.mean(step - v)) if v.size else nan
    m["staleness/max"] = float(np.max(step - v)) if v.size else nan
    # histogram-based: exact values for the bound checks
    m["_exact/ratio/logabs_p50"] = np.quantile(np.abs(lr), 0.5, method="inverted_cdf") if n else nan
    m["_exact/ratio/logabs_p99"] = np.quantile(np.abs(lr), 0.99, method="inverted_cdf") if n else nan
    m["_exact/ratio/logabs_p999"] = np.quantile(np.abs(lr), 0.999, method="inverted_cdf") if n else nan
    m["_exact/entropy/p10"] = np.quantile(e, 0.1, method="inverted_cdf") if e.size else nan
    m["_exact/entropy/p50"] = np.quantile(e, 0.5, method="inverted_cdf") if e.size else nan
    m["_exact/entropy/p90"] = np.quantile(e, 0.9, method="inverted_cdf") if e.size else nan
    m["_exact/mismatch/logabs_p99"] = np.quantile(np.abs(d), 0.99, method="inverted_cdf") if ok.any() else nan
    m["_exact/seq/minprefix_ratio_p5"] = np.quantile(prefix, 0.05, method="inverted_cdf") if prefix else nan
    tail = np.sort(lr[lr > 0])[::-1]
    if tail.size >= 20:
        k = int(np.clip(np.floor(np.sqrt(tail.size)), 10, tail.size - 1))
        m["_exact/ratio/tail_alpha"] = 1.0 / (tail[:k].mean() - tail[k])
    else:
        m["_exact/ratio/tail_alpha"] = nan
    # position buckets (deciles of the longest response of each record)
    bn, bs, bs2 = np.zeros(10), np.zeros(10), np.zeros(10)
    for ri in np.unique(f["rec"]):
        sel = f["rec"] == ri
        longest = f["pos"][sel].max() + 1
        b = np.minimum((f["pos"][sel] * 10) // longest, 9).astype(int)
        np.add.at(bn, b, 1)
        np.add.at(bs, b, r[sel])
        np.add.at(bs2, b, r[sel] ** 2)
    with np.errstate(all="ignore"):
        mean_b = np.where(bn > 0, bs / np.maximum(bn, 1), np.nan)
        sd_b = np.where(bn >= 2, np.sqrt(np.maximum(bs2 / np.maximum(bn, 1) - mean_b**2, 0)), np.nan)
    m["stage/ratio_mean_min"] = np.nanmin(mean_b) if np.isfinite(mean_b).any() else nan
    sdf = sd_b[np.isfinite(sd_b)]
    m["stage/ratio_std_spread"] = sdf.max() / sdf.min() if sdf.size >= 2 and sdf.min() > 0 else nan
    return {k: float(v) for k, v in m.items()}


def reference_second_generation(
    f: dict,
    *,
    cap: float = C_TIS,
    icepop: tuple[float, float] = ICEPOP,
    geo: tuple[float, float] = GEO,
    correct: float = CORRECT,
    lowprob: float = LOWPROB,
) -> dict[str, float]:
    """docs/metrics.md's second-generation diagnostics (mismatch, removed, moe) from the valid tokens ``f`` of
    one step (:func:`_flat`), straight from the formulas (defaults: RecorderConfig's bands and bounds)."""
    ICEPOP, GEO, CORRECT, LOWPROB, C_TIS = icepop, geo, correct, lowprob, cap  # noqa: N806
    m: dict[str, float] = {}
    nan = float("nan")
    a, seq = f["adv"], f["seq"].astype(int)
    d_all = f["olp"] - f["roll"]
    ok = np.isfinite(d_all)
    d = d_all[ok]
    w = np.exp(d)
    k3 = w - 1 - d
    names = ["extreme_frac", "mult_err", "kl_ent_ratio", "ratio_p01", "ratio_p99", "icepop_frac"]
    names += ["seq_logratio_absmax", "seq_logratio_p99", "geo_mask_frac", "seq_mult_err_max", "lowprob_k3_share"]
    removed = {c: np.zeros(a.size, bool) for c in ("tis", "mis", "icepop", "geo")}
    if d.size:
        e = f["ent"][np.isfinite(f["ent"])]
        m["mismatch/extreme_frac"] = np.mean(np.abs(d) > math.log(2))
        m["mismatch/mult_err"] = np.mean(np.exp(np.abs(d)))
        m["mismatch/kl_ent_ratio"] = k3.mean() / e.mean() if e.size and e.mean() > 0 else nan
        m["_exact/mismatch/ratio_p01"] = np.quantile(w, 0.01, method="inverted_cdf")
        m["_exact/mismatch/ratio_p99"] = np.quantile(w, 0.99, method="inverted_cdf")
        m["mismatch/icepop_frac"] = np.mean((w < ICEPOP[0]) | (w > ICEPOP[1]))
        sums, mults, geo_seqs = [], [], []
        for s_id in np.unique(seq[ok]):
            ds = d_all[ok & (seq == s_id)]
            sums.append(abs(ds.sum()))
            mults.append(np.exp(np.abs(ds)).mean())
            g = np.exp(ds.mean())
            if g < GEO[0] or g > GEO[1]:
                geo_seqs.append(s_id)
        m["mismatch/seq_logratio_absmax"] = max(sums)
        m["_exact/mismatch/seq_logratio_p99"] = np.quantile(sums, 0.99, method="inverted_cdf")
        m["mismatch/geo_mask_frac"] = len(geo_seqs) / len(sums)
        m["mismatch/seq_mult_err_max"] = max(mults)
        low = np.exp(f["roll"][ok]) < LOWPROB
        m["mismatch/lowprob_k3_share"] = k3[low].sum() / k3.sum() if k3.sum() > 0 else nan
        w_all = np.where(ok, np.exp(np.where(ok, d_all, 0.0)), 1.0)
        removed["tis"] = ok & (w_all > C_TIS)
        removed["mis"] = ok & ((w_all > C_TIS) | (w_all < 1 / C_TIS))
        removed["icepop"] = ok & ((w_all < ICEPOP[0]) | (w_all > ICEPOP[1]))
        removed["geo"] = np.isin(seq, geo_seqs)
    else:
        for k in names:
            m[f"mismatch/{k}"] = nan
        m["_exact/mismatch/ratio_p01"] = m["_exact/mismatch/ratio_p99"] = nan
        m["_exact/mismatch/seq_logratio_p99"] = nan
    total = np.abs(a).sum()
    info = f["seq_info"]
    for c, rm in removed.items():
        mass = np.abs(a[rm]).sum()
        m[f"removed/{c}/adv_mass"] = (mass / total if total > 0 else nan) if d.size else nan
        m[f"removed/{c}/pos_share"] = a[rm & (a > 0)].sum() / mass if mass > 0 else nan
        hit = [info[s_id][3] for s_id in np.unique(seq[rm]) if info[s_id][3] is not None]
        hit = [r for r in hit if math.isfinite(r)]
        m[f"removed/{c}/correct_frac"] = np.mean(np.array(hit) >= CORRECT) if hit else nan
    ra = f["route"]
    rok = np.isfinite(ra)
    m["moe/route_agree_mean"] = ra[rok].mean() if rok.any() else nan
    m["moe/route_mismatch_frac"] = np.mean(ra[rok] < 1) if rok.any() else nan
    k3_all = np.where(ok, np.exp(np.where(ok, d_all, 0.0)) - 1 - np.where(ok, d_all, 0.0), np.nan)
    dis, agr = rok & ok & (ra < 1), rok & ok & (ra == 1)
    num = k3_all[dis].mean() if dis.any() else nan
    den = k3_all[agr].mean() if agr.any() else nan
    m["moe/mismatch_k3_ratio"] = num / den if den > 0 else nan
    return m


SECOND_GEN_LNW = ("mismatch/ratio_p01", "mismatch/ratio_p99")
"""Histogram metrics whose bound holds on ln of the value (the histogram holds d = ln w)."""

HIST_METRICS = (
    "mismatch/ratio_p01",
    "mismatch/ratio_p99",
    "mismatch/seq_logratio_p99",
    "ratio/logabs_p50",
    "ratio/logabs_p99",
    "ratio/logabs_p999",
    "entropy/p10",
    "entropy/p50",
    "entropy/p90",
    "mismatch/logabs_p99",
    "seq/minprefix_ratio_p5",
)
