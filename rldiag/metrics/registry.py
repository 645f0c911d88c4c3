"""The metric registry: one :class:`MetricSpec` per public metric name.

:data:`REGISTRY` holds the core metrics of docs/metrics.md: each names the sufficient statistics it needs
(declared in :data:`rldiag.stats.kernel.STATS`) and how to finalize them into one value per step
(``run.step_metrics()``). :data:`ANALYSES` holds the metrics of docs/metrics.md, analyses that are computed from
token rows on demand (``lens/*``, ``cliff/*``, ``law/*``: ``run.lens()``, ``run.cliff()``, ``run.law()``);
:data:`METRICS` is both. The analysis layer, the CLI, the alerts, the dashboard and the generated
docs/metrics.md all read this registry; a formula is written here and nowhere else.

``finalize`` receives merged statistics as numpy arrays, one entry per step: scalars ``[n]``, histograms
``[n, bins]``, bucket vectors ``[n, buckets]``, and for set statistics the size of the union.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from rldiag.stats import hist
from rldiag.stats.definitions import batch_ess
from rldiag.stats.kernel import CORRECTIONS, NONFINITE_INPUTS, STATS

Direction = Literal["lower", "higher", "neutral"]
Stats = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class MetricSpec:
    """A metric: public name, the statistics it needs, how it is finalized, and how to read it."""

    name: str
    """Public name, e.g. ``ratio/mean``."""
    needs: tuple[str, ...]
    """Sufficient statistics (``rldiag.stats.kernel.STATS`` names) the finalizer reads."""
    finalize: Callable[[Stats], np.ndarray]
    """Merged statistics -> one float per step (NaN where undefined)."""
    formula: str
    """The formula as docs/metrics.md states it."""
    doc: str
    """One line: what it tells a person debugging a run."""
    unit: str = ""
    direction: Direction = "neutral"
    """Which way is better: ``lower``, ``higher`` or ``neutral``."""
    bounds: tuple[float | None, float | None] = (None, None)
    source: str = ""
    derived: bool = False
    """True where docs/metrics.md marks the formula as a derivation rather than a paper's own."""
    inputs: tuple[str, ...] = ("logp", "old_logp", "adv")
    """Token-row columns it needs (optional ones make it NaN when absent)."""
    headline: bool = False
    """Shown in trainer logs and the dashboard's overview by default."""
    error_bound: str = ""
    """For histogram-based estimates: the documented error bound."""
    computed_by: str = ""
    """Empty for a core metric (finalized from stored statistics by ``run.step_metrics()``); else the call that
    computes it from token rows, e.g. ``run.lens()`` (:data:`ANALYSES`)."""

    @property
    def family(self) -> str:
        """The part before the slash: ``ratio``, ``clip``, ``entropy``..."""
        return self.name.split("/", 1)[0]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _finite_or_nan(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """min/max statistics: NaN where no token contributed."""
    return np.where(np.asarray(n) > 0, x, np.nan)


def _hq(
    name: str, q: float, count: str, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[Stats], np.ndarray]:
    def f(s: Stats) -> np.ndarray:
        v = hist.quantiles(s[name], q)
        if transform is not None:
            v = transform(v)
        return np.where(np.asarray(s[count]) > 0, v, np.nan)

    return f


def _abs_quantile(name: str, q: float) -> Callable[[Stats], np.ndarray]:
    """Quantile of |x| from a signed histogram: fold the two halves."""

    def f(s: Stats) -> np.ndarray:
        key = f"{name}|abs"
        mag = s.get(key) if isinstance(s, dict) else None
        if mag is None:
            mag = hist.fold(s[name])
            if isinstance(s, dict):
                s[key] = mag  # the other quantiles of |lr| reuse the fold (and its cumulative sums)
        return np.where(np.asarray(s["n"]) > 0, hist.quantiles(mag, q), np.nan)

    return f


def _ess_seq(s: Stats) -> np.ndarray:
    n = np.asarray(s["n_seq_valid"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.exp(2.0 * s["lse_seq"] - np.log(n) - s["lse_seq2"])
    return np.where(n > 0, v, np.nan)


def _ess(sum_w: np.ndarray, sum_w2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """:func:`rldiag.stats.definitions.batch_ess`, NaN for an empty batch."""
    n = np.asarray(n, dtype=np.float64)
    sum_w2 = np.asarray(sum_w2, dtype=np.float64)
    ok = n * sum_w2 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            ok, batch_ess(np.asarray(sum_w, dtype=np.float64), np.where(ok, sum_w2, 1.0), np.where(ok, n, 1.0)), np.nan
        )


def _std(sum_: np.ndarray, sq: np.ndarray, n: np.ndarray) -> np.ndarray:
    m = _div(sum_, n)
    return np.sqrt(np.maximum(_div(sq, n) - m * m, 0.0))


def _bucket_mean_min(s: Stats) -> np.ndarray:
    bn, bs = np.asarray(s["b_n"]), np.asarray(s["b_s"])
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(bn > 0, 1.0 + bs / np.where(bn > 0, bn, 1.0), np.nan)
    out = np.full(bn.shape[0], np.nan)
    ok = (bn > 0).any(axis=1)
    if ok.any():  # (bucket-less statistics, e.g. a recompute over no token rows, have zero columns)
        out[ok] = np.nanmin(m[ok], axis=1)
    return out


def _bucket_std_spread(s: Stats) -> np.ndarray:
    bn, bs, bs2 = np.asarray(s["b_n"]), np.asarray(s["b_s"]), np.asarray(s["b_s2"])
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(bn > 0, bn, 1.0)
        mean = bs / safe
        sd = np.sqrt(np.maximum(bs2 / safe - mean * mean, 0.0))
        sd = np.where(bn >= 2, sd, np.nan)
    ok = np.isfinite(sd)
    count = ok.sum(axis=1)
    hi = np.where(ok, sd, -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(ok, sd, np.inf).min(axis=1, initial=np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((count >= 2) & (lo > 0), hi / np.where(lo > 0, lo, 1.0), np.nan)


def _m(
    name: str, needs: tuple[str, ...], finalize: Callable[[Stats], np.ndarray], formula: str, doc: str, **kw: Any
) -> MetricSpec:
    return MetricSpec(name=name, needs=needs, finalize=finalize, formula=formula, doc=doc, **kw)


_R = ("logp", "old_logp", "adv")
_HQ_BOUND = (
    f"histogram quantile: within a factor 2**(1/16) (+-{hist.RELATIVE_ERROR:.1%}) of the exact inverted-CDF "
    "quantile for magnitudes in [2**-20, 2**10]; absolute error < 1e-6 below"
)

_RO = _R + ("rollout_logp",)
_LNW_BOUND = (
    "the histogram holds d = ln w: ln of the estimate is within a factor 2**(1/16) (+-"
    f"{hist.RELATIVE_ERROR:.1%}) of ln of the exact inverted-CDF quantile for |ln w| in [2**-20, 2**10] (so w "
    "is within a factor exp(0.044 |ln w|): 0.4% at w = 1.1); |ln w| < 1e-6 below"
)
_CORRECTION_TEXT: Final[dict[str, tuple[str, str]]] = {
    "tis": ("tokens with w > C (TIS truncates them to C)", "TIS"),
    "mis": ("tokens with w outside [1/C, C] (MIS drops them)", "MIS"),
    "icepop": ("tokens with w outside icepop_band (IcePop drops them)", "IcePop"),
    "geo": ("the valid tokens of sequences with exp(mean d) outside geo_bounds (Geo-MIS drops them)", "Geo-MIS"),
}


def _removed_specs() -> list[MetricSpec]:
    """``removed/<c>/adv_mass``, ``pos_share`` and ``correct_frac`` for each correction (kernel.CORRECTIONS)."""
    out = []
    for c in CORRECTIONS:
        what, label = _CORRECTION_TEXT[c]
        count = "n_seq_mm" if c == "geo" else "n_mm"
        a, p, n, ok = f"s_rm_{c}_abs", f"s_rm_{c}_pos", f"n_rmseq_{c}", f"n_rmseq_{c}_ok"

        def adv_mass(s: Stats, a: str = a, count: str = count) -> np.ndarray:
            return np.where(np.asarray(s[count]) > 0, _div(s[a], s["s_absadv"]), np.nan)

        def pos_share(s: Stats, a: str = a, p: str = p) -> np.ndarray:
            return _div(s[p], s[a])

        def correct_frac(s: Stats, n: str = n, ok: str = ok) -> np.ndarray:
            return _div(s[ok], s[n])

        seqs = "the sequences it drops" if c == "geo" else "sequences with a token it removes"
        out += [
            _m(
                f"removed/{c}/adv_mass",
                (a, "s_absadv", count),
                adv_mass,
                f"sum of |A| over {what} / sum of |A| over valid tokens",
                f"Share of the advantage mass (the learning signal) that {label} removes or truncates.",
                source="NeMo-RL masked_correct_pct; prime-rl masked_advantage_{positive,negative}",
                derived=True,
                direction="lower",
                bounds=(0.0, 1.0),
                inputs=_RO,
            ),
            _m(
                f"removed/{c}/pos_share",
                (p, a),
                pos_share,
                f"share of the |A| mass {label} removes that has A > 0",
                f"Whether {label} removes mostly positive or negative advantages.",
                source="Ant Group's IcePop follow-up: the mask rate falls while the gap widens",
                bounds=(0.0, 1.0),
                inputs=_RO,
            ),
            _m(
                f"removed/{c}/correct_frac",
                (ok, n),
                correct_frac,
                f"among {seqs} (with a finite reward), share with reward >= correct_reward (default 1.0)",
                f"Whether {label} removes tokens of correct answers.",
                source="NeMo-RL masked_correct_pct (nemo_rl/algorithms/grpo.py, "
                "compute_and_apply_seq_logprob_error_masking)",
                bounds=(0.0, 1.0),
                inputs=_RO + ("reward",),
            ),
        ]
    return out


_SPECS: tuple[MetricSpec, ...] = (
    # ---- ratio and trust region ------------------------------------------------------------------
    _m(
        "ratio/mean",
        ("s_rm1", "n"),
        lambda s: 1.0 + _div(s["s_rm1"], s["n"]),
        "mean(r), r = exp(logp - old_logp)",
        "Average importance ratio; drifts from 1 when the policy moves between rollout and gradient.",
        source="PPO",
        headline=True,
        bounds=(0.0, None),
    ),
    _m(
        "ratio/std",
        ("s_rm1", "s_rm1sq", "n"),
        lambda s: _std(s["s_rm1"], s["s_rm1sq"], s["n"]),
        "population std of r",
        "Spread of the importance ratios.",
        source="PPO",
        direction="lower",
        bounds=(0.0, None),
    ),
    _m(
        "ratio/m2",
        ("s_rm1sq", "n"),
        lambda s: _div(s["s_rm1sq"], s["n"]),
        "mean((r-1)^2), the chi-square divergence estimate",
        "Ratio variance around 1 (chi-square estimate); the R^2VPO constraint target.",
        source="R^2VPO (Ratio-Variance Regularized Policy Optimization)",
        derived=True,
        direction="lower",
        bounds=(0.0, None),
    ),
    _m(
        "ratio/min",
        ("min_r", "n"),
        lambda s: _finite_or_nan(s["min_r"], s["n"]),
        "min over tokens of r",
        "Smallest ratio: the low tail starves tokens of gradient.",
        bounds=(0.0, None),
    ),
    _m(
        "ratio/max",
        ("max_r", "n"),
        lambda s: _finite_or_nan(s["max_r"], s["n"]),
        "max over tokens of r",
        "Largest ratio: one runaway token can dominate the update.",
        direction="lower",
        headline=True,
        bounds=(0.0, None),
    ),
    _m(
        "ratio/logabs_p50",
        ("h_lr", "n"),
        _abs_quantile("h_lr", 0.50),
        "median of |lr|",
        "Typical size of the log-ratio.",
        direction="lower",
        bounds=(0.0, None),
        error_bound=_HQ_BOUND,
    ),
    _m(
        "ratio/logabs_p99",
        ("h_lr", "n"),
        _abs_quantile("h_lr", 0.99),
        "p99 of |lr|",
        "Tail of the log-ratio that no trainer reports.",
        direction="lower",
        bounds=(0.0, None),
        error_bound=_HQ_BOUND,
    ),
    _m(
        "ratio/logabs_p999",
        ("h_lr", "n"),
        _abs_quantile("h_lr", 0.999),
        "p99.9 of |lr|",
        "Extreme tail of the log-ratio; above ln 10 the update is far off-policy.",
        direction="lower",
        bounds=(0.0, None),
        error_bound=_HQ_BOUND,
        headline=True,
    ),
    _m(
        "ratio/tail_alpha",
        ("h_lr",),
        lambda s: hist.hill_alpha(s["h_lr"]),
        "Hill tail index of r: xi = mean(ln X_i, i<=k) - ln X_(k+1), alpha = 1/xi, k = floor(sqrt(n_tail)) "
        "clamped to [10, n-1]; NaN when fewer than 20 tokens have r > 1",
        "Heaviness of the ratio's upper tail; alpha <= 2 means infinite variance.",
        direction="higher",
        source="extreme-value statistics (Hill estimator)",
        bounds=(0.0, None),
        error_bound="order statistics read from the lr histogram with values spread evenly within a bin "
        "(bins span a factor 2**(1/8)); within 5% of the exact Hill estimate in the tests",
    ),
    _m(
        "ratio/nonfinite",
        ("n_nonfinite",),
        lambda s: np.asarray(s["n_nonfinite"], dtype=np.float64),
        "count of tokens whose logp, old_logp or adv is NaN/Inf (excluded from every other metric)",
        "Non-finite inputs: any is a bug upstream (fp16 overflow, a -inf log-prob).",
        direction="lower",
        bounds=(0.0, None),
        unit="tokens",
        headline=True,
    ),
    # ---- effective sample size ----------------------------------------------------------------------
    _m(
        "ess/token",
        ("n", "s_rm1", "s_rm1sq"),
        lambda s: _ess(s["n"] + s["s_rm1"], s["n"] + 2.0 * s["s_rm1"] + s["s_rm1sq"], s["n"]),
        "(sum r)^2 / (n * sum r^2), in (0, 1]",
        "Normalized effective sample size of the batch: 1 is on-policy, small means few tokens carry the update.",
        source="Trust the Batch (P3O)",
        direction="higher",
        bounds=(0.0, 1.0),
        headline=True,
    ),
    _m(
        "ess/seq",
        ("lse_seq", "lse_seq2", "n_seq_valid"),
        _ess_seq,
        "ESS over sequence ratios R_i = exp(sum_t lr_i,t), in log space",
        "Untruncated sequence-level ESS: how many responses effectively carry the update.",
        direction="higher",
        bounds=(0.0, 1.0),
    ),
    # ---- KL estimators ---------------------------------------------------------------------------
    _m(
        "kl/k1",
        ("s_lr", "n"),
        lambda s: -_div(s["s_lr"], s["n"]),
        "mean(-lr)",
        "KL(old || current), k1 estimator; = verl actor/ppo_kl, OpenRLHF ppo_kl.",
        source='Schulman, "Approximating KL Divergence"',
        direction="lower",
    ),
    _m(
        "kl/k2",
        ("s_lr2", "n"),
        lambda s: 0.5 * _div(s["s_lr2"], s["n"]),
        "mean(lr^2 / 2)",
        "KL estimator k2 (low variance, biased).",
        source='Schulman, "Approximating KL Divergence"',
        direction="lower",
        bounds=(0.0, None),
    ),
    _m(
        "kl/k3",
        ("s_k3", "n"),
        lambda s: _div(s["s_k3"], s["n"]),
        "mean(r - 1 - lr)",
        "KL estimator k3 (unbiased, non-negative); = CleanRL/SB3 approx_kl.",
        source='Schulman, "Approximating KL Divergence"',
        direction="lower",
        bounds=(0.0, None),
        headline=True,
    ),
    _m(
        "kl/ref_k3",
        ("s_ref_k3", "n_ref"),
        lambda s: _div(s["s_ref_k3"], s["n_ref"]),
        "mean(exp(ref_logp - logp) - (ref_logp - logp) - 1)",
        "KL to the reference model; = TRL kl, verl low_var_kl.",
        source="TRL, verl",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("ref_logp",),
    ),
    # ---- clipping ----------------------------------------------------------------------------------
    _m(
        "clip/low",
        ("n_clip_low", "n"),
        lambda s: _div(s["n_clip_low"], s["n"]),
        "mean(r < 1-eps_low and adv < 0)",
        "Negative-advantage tokens whose gradient the lower clip removes; = TRL clip_ratio/low_mean.",
        source="PPO; TRL",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "clip/high",
        ("n_clip_high", "n"),
        lambda s: _div(s["n_clip_high"], s["n"]),
        "mean(r > 1+eps_high and adv > 0)",
        "Positive-advantage tokens whose gradient the upper clip removes; = TRL clip_ratio/high_mean.",
        source="PPO; TRL",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "clip/region",
        ("n_clip_low", "n_clip_high", "n"),
        lambda s: _div(s["n_clip_low"] + s["n_clip_high"], s["n"]),
        "mean(low or high)",
        "Tokens whose gradient the clip removes; = TRL clip_ratio/region_mean, verl pg_clipfrac, OpenRLHF "
        "ppo_clip_ratio.",
        source="PPO; TRL; verl; OpenRLHF",
        direction="lower",
        bounds=(0.0, 1.0),
        headline=True,
    ),
    _m(
        "clip/symmetric",
        ("n_clip_sym", "n"),
        lambda s: _div(s["n_clip_sym"], s["n"]),
        "mean(r < 1-eps_low or r > 1+eps_high), sign-agnostic",
        "Sign-agnostic clip fraction; = CleanRL clipfrac, SB3 clip_fraction.",
        source="CleanRL; SB3",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "clip/dual",
        ("n_dual", "n"),
        lambda s: _div(s["n_dual"], s["n"]),
        "mean(adv < 0 and r > c)",
        "Dual-clip activations; = verl pg_clipfrac_lower.",
        source="Dual-clip PPO; verl",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "regime/pos_up",
        ("n_pos_up", "n"),
        lambda s: _div(s["n_pos_up"], s["n"]),
        "share with adv > 0 and r > 1",
        "Positive tokens already pushed up.",
        source="DISPO",
        bounds=(0.0, 1.0),
    ),
    _m(
        "regime/pos_down",
        ("n_pos_down", "n"),
        lambda s: _div(s["n_pos_down"], s["n"]),
        "share with adv > 0 and r < 1",
        "Positive tokens the policy moved away from.",
        source="DISPO",
        bounds=(0.0, 1.0),
    ),
    _m(
        "regime/neg_up",
        ("n_neg_up", "n"),
        lambda s: _div(s["n_neg_up"], s["n"]),
        "share with adv < 0 and r > 1",
        "Negative tokens the policy moved towards.",
        source="DISPO",
        bounds=(0.0, 1.0),
    ),
    _m(
        "regime/neg_down",
        ("n_neg_down", "n"),
        lambda s: _div(s["n_neg_down"], s["n"]),
        "share with adv < 0 and r < 1",
        "Negative tokens already pushed down.",
        source="DISPO",
        bounds=(0.0, 1.0),
    ),
    # ---- balance -------------------------------------------------------------------------------------
    _m(
        "balance/pos",
        ("s_bal_pos",),
        lambda s: np.asarray(s["s_bal_pos"], dtype=np.float64),
        "sum max(eff*adv, 0), eff = min(r, 1+eps_high) if adv >= 0 else max(r, 1-eps_low)",
        "Gradient mass of positive-advantage tokens after clipping.",
        source="BAPO",
        bounds=(0.0, None),
    ),
    _m(
        "balance/neg",
        ("s_bal_neg",),
        lambda s: np.asarray(s["s_bal_neg"], dtype=np.float64),
        "sum max(-eff*adv, 0)",
        "Gradient mass of negative-advantage tokens after clipping.",
        source="BAPO",
        bounds=(0.0, None),
    ),
    _m(
        "balance/pos_share",
        ("s_bal_pos", "s_bal_neg"),
        lambda s: _div(s["s_bal_pos"], s["s_bal_pos"] + s["s_bal_neg"]),
        "pos / (pos + neg)",
        "Share of the gradient pushing up; below 0.4 negatives dominate and entropy tends to collapse.",
        source="BAPO",
        direction="higher",
        bounds=(0.0, 1.0),
        headline=True,
    ),
    # ---- entropy -------------------------------------------------------------------------------------
    _m(
        "entropy/mean",
        ("s_ent", "n_ent"),
        lambda s: _div(s["s_ent"], s["n_ent"]),
        "mean(entropy)",
        "Mean policy entropy (nats) over valid tokens; = TRL entropy.",
        unit="nats",
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + ("entropy",),
        headline=True,
    ),
    _m(
        "entropy/p10",
        ("h_ent", "n_ent"),
        _hq("h_ent", 0.10, "n_ent"),
        "p10 of entropy",
        "Low tail of the entropy.",
        unit="nats",
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + ("entropy",),
        error_bound=_HQ_BOUND,
    ),
    _m(
        "entropy/p50",
        ("h_ent", "n_ent"),
        _hq("h_ent", 0.50, "n_ent"),
        "median of entropy",
        "Median entropy.",
        unit="nats",
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + ("entropy",),
        error_bound=_HQ_BOUND,
    ),
    _m(
        "entropy/p90",
        ("h_ent", "n_ent"),
        _hq("h_ent", 0.90, "n_ent"),
        "p90 of entropy",
        "High tail of the entropy (the forking tokens).",
        unit="nats",
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + ("entropy",),
        error_bound=_HQ_BOUND,
    ),
    _m(
        "entropy/low_frac",
        ("n_ent_low", "n_ent"),
        lambda s: _div(s["n_ent_low"], s["n_ent"]),
        "mean(entropy < 0.05 nats)",
        "Near-deterministic share: the early signal of entropy collapse.",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_R + ("entropy",),
    ),
    _m(
        "entropy/cov",
        ("s_logp_adv", "s_logp", "s_adv", "n"),
        lambda s: _div(s["s_logp_adv"], s["n"]) - _div(s["s_logp"], s["n"]) * _div(s["s_adv"], s["n"]),
        "mean(logp*adv) - mean(logp)*mean(adv)",
        "Entropy-advantage covariance: entropy changes like -Cov(log pi, A); positive means entropy falls.",
        source="The Entropy Mechanism of RL for Reasoning LMs",
        direction="neutral",
        headline=True,
    ),
    _m(
        "entropy/cov_band_frac",
        ("n_cov_band", "n"),
        lambda s: _div(s["n_cov_band"], s["n"]),
        "share of tokens whose centered product (adv - mean adv)(logp - mean logp), record means, lies in (1, 5)",
        "Tokens in Clip-Cov's band: those Clip-Cov would detach.",
        source="The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov)",
        bounds=(0.0, 1.0),
    ),
    _m(
        "entropy/cov_top_share",
        ("s_cov_top", "s_cov_pos"),
        lambda s: _div(s["s_cov_top"], s["s_cov_pos"]),
        "share of the positive centered-product mass carried by the top 0.2% tokens of the record",
        "Concentration of the covariance: a tiny set of tokens drives the entropy change.",
        source="The Entropy Mechanism of RL for Reasoning LMs",
        bounds=(0.0, 1.0),
    ),
    # ---- advantages and groups ---------------------------------------------------------------------
    _m(
        "adv/mean",
        ("s_adv", "n"),
        lambda s: _div(s["s_adv"], s["n"]),
        "mean(adv) over tokens",
        "Token-weighted mean advantage (non-zero under length imbalance).",
    ),
    _m(
        "adv/std",
        ("s_adv", "s_adv2", "n"),
        lambda s: _std(s["s_adv"], s["s_adv2"], s["n"]),
        "population std of adv over tokens",
        "Spread of the advantages.",
        bounds=(0.0, None),
    ),
    _m(
        "adv/pos_frac",
        ("n_adv_pos", "n"),
        lambda s: _div(s["n_adv_pos"], s["n"]),
        "mean(adv > 0)",
        "Share of tokens with a positive advantage.",
        bounds=(0.0, 1.0),
    ),
    _m(
        "adv/zero_frac",
        ("n_adv_zero", "n"),
        lambda s: _div(s["n_adv_zero"], s["n"]),
        "mean(adv == 0)",
        "Share of tokens carrying no gradient signal.",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "group/nonzero_frac",
        ("groups_nonzero", "groups_all"),
        lambda s: _div(s["groups_nonzero"], s["groups_all"]),
        "share of prompt groups whose advantages are not all zero",
        "Live prompt groups; TRL frac_reward_zero_std = 1 - this.",
        source="Knapsack RL; DAPO dynamic sampling; TRL",
        direction="higher",
        bounds=(0.0, 1.0),
        inputs=_R + ("group",),
        headline=True,
    ),
    _m(
        "reward/mean",
        ("s_reward", "n_seq_reward"),
        lambda s: _div(s["s_reward"], s["n_seq_reward"]),
        "mean of sequence rewards",
        "Average reward.",
        direction="higher",
        inputs=_R + ("reward",),
        headline=True,
    ),
    _m(
        "reward/std",
        ("s_reward", "s_reward2", "n_seq_reward"),
        lambda s: _std(s["s_reward"], s["s_reward2"], s["n_seq_reward"]),
        "population std of sequence rewards",
        "Reward spread.",
        bounds=(0.0, None),
        inputs=_R + ("reward",),
    ),
    _m(
        "seq/len_mean",
        ("n", "n_seq_valid"),
        lambda s: _div(s["n"], s["n_seq_valid"]),
        "valid tokens per sequence",
        "Mean response length.",
        unit="tokens",
        bounds=(0.0, None),
    ),
    _m(
        "seq/count",
        ("n_seq",),
        lambda s: np.asarray(s["n_seq"], dtype=np.float64),
        "sequences",
        "Responses in the step.",
        unit="sequences",
        bounds=(0.0, None),
    ),
    _m(
        "tokens/count",
        ("n",),
        lambda s: np.asarray(s["n"], dtype=np.float64),
        "valid tokens",
        "Valid tokens in the step (all ranks, all micro-batches).",
        unit="tokens",
        bounds=(0.0, None),
    ),
    # ---- mismatch and staleness --------------------------------------------------------------------
    _m(
        "mismatch/k1",
        ("s_mm_d", "n_mm"),
        lambda s: -_div(s["s_mm_d"], s["n_mm"]),
        "mean(rollout_logp - old_logp)",
        "Training-inference KL (k1); = verl rollout_corr/kl.",
        source="verl",
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/k3",
        ("s_mm_k3", "n_mm"),
        lambda s: _div(s["s_mm_k3"], s["n_mm"]),
        "mean(w - 1 - d)",
        "Training-inference KL (k3); = verl rollout_corr/k3_kl.",
        source="verl",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("rollout_logp",),
        headline=True,
    ),
    _m(
        "mismatch/is_min",
        ("min_w", "n_mm"),
        lambda s: _finite_or_nan(s["min_w"], s["n_mm"]),
        "min over tokens of w",
        "Smallest mismatch weight before truncation; = verl rollout_is_min.",
        source="verl",
        bounds=(0.0, None),
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/is_max",
        ("max_w", "n_mm"),
        lambda s: _finite_or_nan(s["max_w"], s["n_mm"]),
        "max over tokens of w",
        "Largest mismatch weight before truncation; = verl rollout_is_max.",
        source="verl",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/tis_frac",
        ("n_tis", "n_mm"),
        lambda s: _div(s["n_tis"], s["n_mm"]),
        "mean(w > C)",
        "Tokens truncated by TIS; = verl rollout_is_ratio_fraction_high.",
        source="verl; TIS",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/mis_frac",
        ("n_mis", "n_mm"),
        lambda s: _div(s["n_mis"], s["n_mm"]),
        "mean(w > C or w < 1/C)",
        "Tokens masked by MIS.",
        source="MIS",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/ess",
        ("n_mm", "s_mm_wm1", "s_mm_wm1sq"),
        lambda s: _ess(s["n_mm"] + s["s_mm_wm1"], s["n_mm"] + 2.0 * s["s_mm_wm1"] + s["s_mm_wm1sq"], s["n_mm"]),
        "ESS of w, untruncated",
        "Effective sample size of the mismatch weights; = verl rollout_is_eff_sample_size when no weight is clamped.",
        source="verl",
        direction="higher",
        bounds=(0.0, 1.0),
        inputs=_R + ("rollout_logp",),
    ),
    _m(
        "mismatch/logabs_p99",
        ("h_absd", "n_mm"),
        _hq("h_absd", 0.99, "n_mm"),
        "p99 of |d|",
        "Tail of the training-inference log-prob gap.",
        source="verl-omni #280",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("rollout_logp",),
        error_bound=_HQ_BOUND,
    ),
    # ---- second-generation mismatch (docs/metrics.md: d = old_logp - rollout_logp, w = exp(d)) ---------
    _m(
        "mismatch/extreme_frac",
        ("n_mm_extreme", "n_mm"),
        lambda s: _div(s["n_mm_extreme"], s["n_mm"]),
        "mean(|d| > ln 2): tokens whose trainer/sampler probability ratio leaves [1/2, 2]",
        "Share of tokens on which trainer and sampler disagree by more than a factor 2.",
        source="AReaL R3 (PR #1207) rollout_train_extreme_frac_tau2",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_RO,
    ),
    _m(
        "mismatch/mult_err",
        ("s_mm_multm1", "n_mm"),
        lambda s: 1.0 + _div(s["s_mm_multm1"], s["n_mm"]),
        "mean(exp(|d|))",
        "Multiplicative probability error of the sampler: about 1 is healthy, above 1.05 suspect.",
        source="NeMo-RL token_mult_prob_error (nemo_rl/algorithms/loss_functions.py, ClippedPGLossFn.__call__)",
        direction="lower",
        bounds=(1.0, None),
        inputs=_RO,
    ),
    _m(
        "mismatch/kl_ent_ratio",
        ("s_mm_k3", "n_mm", "s_ent", "n_ent"),
        lambda s: _div(_div(s["s_mm_k3"], s["n_mm"]), _div(s["s_ent"], s["n_ent"])),
        "mismatch/k3 / entropy/mean",
        "Training-inference KL relative to the policy's entropy: mismatch that matters more as entropy falls.",
        source="prime-rl kl_ent_ratio/mean (src/prime_rl/trainer/rl/train.py, train: mismatch_kl mean / entropy mean)",
        direction="lower",
        bounds=(0.0, None),
        inputs=_RO + ("entropy",),
    ),
    _m(
        "mismatch/ratio_p01",
        ("h_d", "n_mm"),
        _hq("h_d", 0.01, "n_mm", np.exp),
        "p1 of w (histogram of d = ln w)",
        "Low tail of the mismatch weights: the sampler far more confident than the trainer.",
        source="distributions asked for in TRL #5231, prime-rl #648",
        direction="higher",
        bounds=(0.0, None),
        inputs=_RO,
        error_bound=_LNW_BOUND,
    ),
    _m(
        "mismatch/ratio_p99",
        ("h_d", "n_mm"),
        _hq("h_d", 0.99, "n_mm", np.exp),
        "p99 of w (histogram of d = ln w)",
        "High tail of the mismatch weights: the trainer far more confident than the sampler.",
        source="distributions asked for in TRL #5231, prime-rl #648",
        direction="lower",
        bounds=(0.0, None),
        inputs=_RO,
        error_bound=_LNW_BOUND,
    ),
    _m(
        "mismatch/icepop_frac",
        ("n_icepop", "n_mm"),
        lambda s: _div(s["n_icepop"], s["n_mm"]),
        "mean(w < alpha or w > beta), (alpha, beta) = icepop_band (default (0.5, 5.0))",
        "Tokens IcePop would drop; = verl rollout_is_oob_ratio with rollout_is_threshold 'alpha_beta'.",
        source="IcePop (Ring-1T, arXiv 2510.18855); verl rollout_corr_helper.compute_rollout_correction_weights "
        "(rollout_is_oob_ratio); default band: verl RolloutCorrectionConfig.decoupled_token_icepop "
        "(verl/trainer/config/algorithm.py)",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_RO,
    ),
    _m(
        "mismatch/seq_logratio_absmax",
        ("max_seq_absd", "n_seq_mm"),
        lambda s: _finite_or_nan(s["max_seq_absd"], s["n_seq_mm"]),
        "max over sequences of |sum over T_i of d|",
        "Largest sequence-level log importance weight: above 20 sequence IS breaks down (verl clamps there).",
        source="verl rollout_corr_helper (SAFETY_BOUND = 20); FP16-vs-BF16 (arXiv 2510.26788)",
        direction="lower",
        bounds=(0.0, None),
        inputs=_RO,
    ),
    _m(
        "mismatch/seq_logratio_p99",
        ("h_seq_absd", "n_seq_mm"),
        _hq("h_seq_absd", 0.99, "n_seq_mm"),
        "p99 over sequences of |sum over T_i of d|",
        "Tail of the sequence-level log importance weights.",
        source="FP16-vs-BF16 (arXiv 2510.26788)",
        direction="lower",
        bounds=(0.0, None),
        inputs=_RO,
        error_bound=_HQ_BOUND,
    ),
    _m(
        "mismatch/geo_mask_frac",
        ("n_geo", "n_seq_mm"),
        lambda s: _div(s["n_geo"], s["n_seq_mm"]),
        "share of sequences with g_i = exp(mean over T_i of d) outside geo_bounds (default (0.999, 1.002))",
        "Sequences Geo-MIS would drop; = verl rollout_rs_seq_masked_fraction of rollout_rs 'seq_mean_k1' with "
        "threshold '1/hi_1/lo'.",
        source='Geo-MIS, "When Speed Kills Stability"; NeMo-RL reference bounds; verl '
        "rollout_corr_helper.compute_rollout_rejection_mask",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_RO,
    ),
    _m(
        "mismatch/seq_mult_err_max",
        ("max_seq_mult", "n_seq_mm"),
        lambda s: _finite_or_nan(s["max_seq_mult"], s["n_seq_mm"]),
        "max over sequences of mean over T_i of exp(|d|)",
        "Worst sequence's multiplicative probability error.",
        source="NeMo-RL seq_mult_prob_error (nemo_rl/algorithms/grpo.py, compute_and_apply_seq_logprob_error_masking)",
        direction="lower",
        bounds=(1.0, None),
        inputs=_RO,
    ),
    _m(
        "mismatch/lowprob_k3_share",
        ("s_mm_k3_low", "s_mm_k3", "n_mm"),
        lambda s: np.where(np.asarray(s["n_mm"]) > 0, _div(s["s_mm_k3_low"], s["s_mm_k3"]), np.nan),
        "share of the step's sum of (w - 1 - d) carried by tokens with exp(rollout_logp) < lowprob (default 0.1)",
        "How much of the mismatch sits in low-probability tokens.",
        source='"Taming the Tail" (arXiv 2512.23087)',
        derived=True,
        bounds=(0.0, 1.0),
        inputs=_RO,
    ),
    *_removed_specs(),
    # ---- MoE routing consistency --------------------------------------------------------------------
    _m(
        "moe/route_agree_mean",
        ("s_route", "n_route"),
        lambda s: _div(s["s_route"], s["n_route"]),
        "mean(route_agree)",
        "Share of expert choices on which trainer and sampler route alike (1 = identical routing).",
        source="R3 routing replay (AReaL #1207); NeMo-RL fallback fraction and prime-rl replace rate are special cases",
        direction="higher",
        bounds=(0.0, 1.0),
        inputs=_R + ("route_agree",),
    ),
    _m(
        "moe/route_mismatch_frac",
        ("n_route_mis", "n_route"),
        lambda s: _div(s["n_route_mis"], s["n_route"]),
        "mean(route_agree < 1)",
        "Share of tokens routed differently by trainer and sampler in at least one slot.",
        source="R3 routing replay (AReaL #1207)",
        direction="lower",
        bounds=(0.0, 1.0),
        inputs=_R + ("route_agree",),
    ),
    _m(
        "moe/mismatch_k3_ratio",
        ("s_mm_k3_rmis", "n_mm_rmis", "s_mm_k3_ragree", "n_mm_ragree"),
        lambda s: _div(_div(s["s_mm_k3_rmis"], s["n_mm_rmis"]), _div(s["s_mm_k3_ragree"], s["n_mm_ragree"])),
        "mismatch k3 over tokens with route_agree < 1 / mismatch k3 over tokens with route_agree = 1",
        "How much more trainer/sampler mismatch the differently routed tokens carry.",
        source="the join of routing with ratio tails Megatron-LM #4168 asks for",
        derived=True,
        direction="lower",
        bounds=(0.0, None),
        inputs=_RO + ("route_agree",),
    ),
    _m(
        "staleness/mean",
        ("s_stale", "n_ver"),
        lambda s: _div(s["s_stale"], s["n_ver"]),
        "mean(step - version)",
        "Average policy lag of the tokens.",
        source="AReaL",
        unit="steps",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("version",),
    ),
    _m(
        "staleness/max",
        ("max_stale", "n_ver"),
        lambda s: _finite_or_nan(s["max_stale"], s["n_ver"]),
        "max(step - version)",
        "Oldest token's policy lag.",
        source="AReaL",
        unit="steps",
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + ("version",),
    ),
    # ---- sequence level ------------------------------------------------------------------------------
    _m(
        "seq/gspo_ratio_mean",
        ("s_gspo", "n_seq_valid"),
        lambda s: _div(s["s_gspo"], s["n_seq_valid"]),
        "mean over sequences of s_i = exp(mean_t lr_i,t)",
        "GSPO's sequence ratio, averaged.",
        source="GSPO",
        bounds=(0.0, None),
    ),
    _m(
        "seq/gspo_ratio_max",
        ("max_gspo", "n_seq_valid"),
        lambda s: _finite_or_nan(s["max_gspo"], s["n_seq_valid"]),
        "max over sequences of s_i",
        "Largest GSPO sequence ratio.",
        source="GSPO",
        direction="lower",
        bounds=(0.0, None),
    ),
    _m(
        "seq/gspo_clip",
        ("n_gspo_clip", "n_seq_valid"),
        lambda s: _div(s["n_gspo_clip"], s["n_seq_valid"]),
        "share of sequences with (s_i > 1+eps_high and A_i > 0) or (s_i < 1-eps_low and A_i < 0)",
        "Sequences GSPO's clip would drop at the run's eps.",
        source="GSPO",
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "seq/cum_logratio_absmax",
        ("max_cum_abs", "n"),
        lambda s: _finite_or_nan(s["max_cum_abs"], s["n"]),
        "max over tokens of |L_t|, L_t = sum_{j<=t} lr_j within a sequence",
        "Largest cumulative token log-ratio (CTPO).",
        source="CTPO",
        direction="lower",
        bounds=(0.0, None),
    ),
    _m(
        "seq/ctpo_clip",
        ("n_ctpo_clip", "n"),
        lambda s: _div(s["n_ctpo_clip"], s["n"]),
        "share of tokens whose gradient CTPO's clip removes: adv > 0 and L_t > 0.05*sqrt(t+1), or adv < 0 and "
        "L_t < -0.025*sqrt(t+1) (sign-aware, like PPO's clip; the one CTPO definition, "
        "rldiag.stats.definitions.ctpo_clipped, shared with lens/ctpo/*)",
        "Tokens CTPO's position-adaptive bounds would clip; = 1 - lens/ctpo/kept_frac. Runs recorded before this "
        "definition stored the sign-agnostic count; `run.step_metrics(from_tokens=True)` recomputes it.",
        source="CTPO",
        derived=True,
        direction="lower",
        bounds=(0.0, 1.0),
    ),
    _m(
        "seq/minprefix_ratio_p5",
        ("h_minprefix", "n_minprefix"),
        _hq("h_minprefix", 0.05, "n_minprefix", np.exp),
        "5th percentile over tokens of min_{j<t} r_j (prefix minimum)",
        "How far earlier tokens of the same response fell: MinPRO's surrogate.",
        source="A Step Back (MinPRO)",
        derived=True,
        direction="higher",
        bounds=(0.0, None),
        error_bound="the histogram holds ln of the prefix minimum: " + _HQ_BOUND + ", on ln r",
    ),
    # ---- position / stage ----------------------------------------------------------------------------
    _m(
        "stage/ratio_mean_min",
        ("b_n", "b_s"),
        _bucket_mean_min,
        "smallest bucket mean of r (position deciles, or stage buckets when stages are given)",
        "GRPO-Guard's left shift of the ratio below 1 in some buckets.",
        source="GRPO-Guard",
        direction="higher",
        bounds=(0.0, None),
    ),
    _m(
        "stage/ratio_std_spread",
        ("b_n", "b_s", "b_s2"),
        _bucket_std_spread,
        "max/min of the bucket std of r",
        "GRPO-Guard's per-timestep variance inconsistency.",
        source="GRPO-Guard",
        direction="lower",
        bounds=(1.0, None),
    ),
)


def _nonfinite_specs() -> list[MetricSpec]:
    """``<input>/nonfinite``: NaN/Inf values of each input among the masked-in tokens (sequences, for rewards)
    that record() saw; NaN where no record gave that input (kernel.NONFINITE_INPUTS)."""
    out = []
    for col in NONFINITE_INPUTS:
        nf = f"nf_{col}"
        always = col in ("logp", "old_logp", "adv")

        def fin(s: Stats, nf: str = nf, col: str = col, always: bool = always) -> np.ndarray:
            v = np.asarray(s[nf], dtype=np.float64)
            return v if always else np.where(np.asarray(s[f"ng_{col}"]) > 0, v, np.nan)

        per = "sequences with a masked-in token" if col == "reward" else "masked-in tokens"
        out.append(
            _m(
                f"{col}/nonfinite",
                (nf,) if always else (nf, f"ng_{col}"),
                fin,
                f"count of {per} whose {col} is NaN or Inf",
                f"Non-finite {col} values record() received (left out of every metric that reads {col}); "
                "values a lenient recorder refused are blanked to NaN and counted here too.",
                unit="sequences" if col == "reward" else "tokens",
                direction="lower",
                bounds=(0.0, None),
                inputs=_R if always else _R + (col,),
            )
        )
    return out


# Log-probability differences are in nats; metrics with one unit share a dashboard panel.
_NATS = (
    "ratio/logabs_p50",
    "ratio/logabs_p99",
    "ratio/logabs_p999",
    "kl/k1",
    "kl/k2",
    "kl/k3",
    "kl/ref_k3",
    "mismatch/k1",
    "mismatch/k3",
    "mismatch/logabs_p99",
    "mismatch/seq_logratio_absmax",
    "mismatch/seq_logratio_p99",
    "seq/cum_logratio_absmax",
)
_SPECS = tuple(dataclasses.replace(s, unit="nats") if s.name in _NATS and not s.unit else s for s in _SPECS)
_SPECS = _SPECS + tuple(_nonfinite_specs())

REGISTRY: Final[dict[str, MetricSpec]] = {spec.name: spec for spec in _SPECS}
"""Every core metric, by public name, in the order of docs/metrics.md."""

HEADLINE: Final[tuple[str, ...]] = tuple(s.name for s in _SPECS if s.headline)
"""Metrics shown first: in trainer logs, the CLI summary and the dashboard overview."""

FAMILY_ORDER: Final[tuple[str, ...]] = tuple(dict.fromkeys(s.family for s in _SPECS))


# ---- metrics computed from token rows on demand (docs/metrics.md, analyses) ---------------------------------------
def _from_token_rows(s: Stats) -> np.ndarray:
    raise TypeError(
        "this metric is computed from token rows by its analysis (MetricSpec.computed_by), "
        "not finalized from statistics"
    )


BUCKET_KINDS: Final[tuple[str, ...]] = ("pos", "stage", "turn", "prob", "route")
"""What :meth:`rldiag.analysis.io.Run.bucket_metrics` buckets by (docs/metrics.md, bucket tables)."""

BUCKET_METRICS: Final[tuple[str, ...]] = ("ratio/mean", "ratio/std", "clip/region", "entropy/mean", "mismatch/k3")
"""The metrics of the position, stage, turn and routing bucket tables."""

PROB_BUCKET_METRICS: Final[tuple[str, ...]] = (
    "mismatch/k1",
    "mismatch/k3",
    "mismatch/absd_mean",
    "mismatch/extreme_frac",
)
"""The metrics of the probability bucket table (``by="prob"``); ``mismatch/absd_mean`` is mean(|d|)."""

LENS_OBJECTIVES: Final[tuple[str, ...]] = (
    "ppo",
    "dapo",
    "dual_clip",
    "dcpo",
    "cispo",
    "sapo",
    "gspo",
    "ctpo",
    "tis",
    "mis",
    "bapo",
    "ttb",
)
"""Objectives of the objective lens, in report order (``lens/<objective>/...``)."""
LENS_QUANTITIES: Final[dict[str, tuple[str, str, Direction]]] = {
    "kept_frac": (
        "share of valid tokens whose gradient the objective keeps (not clipped, masked or dropped)",
        "Share of tokens the objective would train on.",
        "higher",
    ),
    "weight_mean": (
        "mean effective weight w (the coefficient of A grad log pi; 0 for a dropped token)",
        "Average weight the objective puts on a token's gradient.",
        "neutral",
    ),
    "pos_share": (
        "sum max(w*A, 0) / sum |w*A|",
        "Positive share of the objective's gradient mass (BAPO's balance).",
        "higher",
    ),
    "kept_adv_frac": (
        "share of the advantage mass sum |A| carried by kept tokens",
        "How much of the learning signal the objective keeps.",
        "higher",
    ),
}
"""Quantities reported for every objective: (formula, doc, direction)."""
LENS_EXTRA: Final[dict[str, dict[str, tuple[str, str, Direction]]]] = {
    "bapo": {
        "clip_low": ("lower ratio bound BAPO's search chose", "BAPO's adaptive lower bound.", "neutral"),
        "clip_high": ("upper ratio bound BAPO's search chose", "BAPO's adaptive upper bound.", "neutral"),
        "saturated": (
            "1 when no point of the search reached the target balance",
            "BAPO could not balance the gradient within its bounds.",
            "lower",
        ),
    },
    "ttb": {
        "ess": (
            "(sum r)^2 / (n sum r^2) of the step (rldiag.stats.definitions.batch_ess)",
            "Trust the Batch's ratio cap: the step's ESS.",
            "higher",
        ),
        "reg_weight": ("1 - ess", "Trust the Batch's off-policy regulariser weight.", "lower"),
    },
}
"""Objective-specific columns besides :data:`LENS_QUANTITIES`."""
_LENS_SOURCES = {
    "ppo": "PPO",
    "dapo": "DAPO",
    "dual_clip": "Dual-clip PPO",
    "dcpo": "DCPO",
    "cispo": "CISPO",
    "sapo": "SAPO",
    "gspo": "GSPO",
    "ctpo": "CTPO",
    "tis": "TIS",
    "mis": "MIS",
    "bapo": "BAPO",
    "ttb": "Trust the Batch (P3O)",
}


def _a(name: str, formula: str, doc: str, computed_by: str, **kw: Any) -> MetricSpec:
    return MetricSpec(
        name=name, needs=(), finalize=_from_token_rows, formula=formula, doc=doc, computed_by=computed_by, **kw
    )


def _lens_specs() -> list[MetricSpec]:
    out = []
    for obj in LENS_OBJECTIVES:
        columns = dict(LENS_QUANTITIES) | LENS_EXTRA.get(obj, {})
        for q, (formula, doc, direction) in columns.items():
            bounds = (
                (0.0, 1.0)
                if q in ("kept_frac", "pos_share", "kept_adv_frac", "ess", "reg_weight", "saturated")
                else (None, None)
            )
            out.append(
                _a(
                    f"lens/{obj}/{q}",
                    formula,
                    doc,
                    "run.lens()",
                    direction=direction,
                    bounds=bounds,
                    source=_LENS_SOURCES[obj],
                    derived=obj == "ctpo",
                    inputs=_R + ("seq", "pos"),
                )
            )
    return out


_TC = ("teacher_logp", "base_logp")
_ANALYSIS_SPECS: tuple[MetricSpec, ...] = (
    *_lens_specs(),
    _a(
        "cliff/lambda_star",
        "lambda* of the step's pooled binding positions (mean teacher modal probability p, mean base mass b)",
        "Largest extrapolation lambda at which the binding positions stay inside the IS clip.",
        "run.cliff()",
        derived=True,
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + _TC,
        source="Extrapolation Cliff (rldiag's derivation)",
    ),
    _a(
        "cliff/lambda_star_min",
        "smallest per-position lambda* of the step",
        "The first structural position to leave the clip-safe region.",
        "run.cliff()",
        derived=True,
        direction="higher",
        bounds=(0.0, None),
        inputs=_R + _TC,
        source="Extrapolation Cliff (rldiag's derivation)",
    ),
    _a(
        "cliff/headroom",
        "lambda / lambda*",
        "How close the run's lambda is to the cliff; the alert thresholds are "
        "those of the extrapolation_cliff rules of the rule file.",
        "run.cliff(lam=...)",
        derived=True,
        direction="lower",
        bounds=(0.0, None),
        inputs=_R + _TC,
        source="Extrapolation Cliff (rldiag's derivation)",
    ),
    _a(
        "cliff/n_tokens",
        "token rows with finite teacher and base log-probs",
        "Tokens the cliff analysis saw.",
        "run.cliff()",
        unit="tokens",
        bounds=(0.0, None),
        inputs=_R + _TC,
    ),
    _a(
        "cliff/n_positions",
        "binding positions: exp(teacher_logp) > threshold",
        "Near-deterministic positions the cliff is computed from.",
        "run.cliff()",
        unit="tokens",
        bounds=(0.0, None),
        inputs=_R + _TC,
    ),
    _a(
        "cliff/p",
        "mean teacher modal probability at the binding positions",
        "Teacher sharpness where it binds.",
        "run.cliff()",
        bounds=(0.0, 1.0),
        inputs=_R + _TC,
    ),
    _a(
        "cliff/b",
        "mean base mass on the teacher's mode at the binding positions",
        "Base support where it binds.",
        "run.cliff()",
        bounds=(0.0, 1.0),
        inputs=_R + _TC,
    ),
    _a(
        "cliff/c",
        "ratio bound c = 1/(1-eps) of the run's IS clip",
        "The clip the cliff is computed against.",
        "run.cliff()",
        bounds=(1.0, None),
        inputs=_R + _TC,
    ),
    _a(
        "law/a",
        "a of the least-squares fit R = -a exp(H) + b over the run's steps",
        "Entropy-performance law: how much reward each nat of entropy buys.",
        "run.law()",
        source="The Entropy Mechanism of RL for Reasoning LMs",
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/b",
        "b of the fit R = -a exp(H) + b",
        "Intercept of the entropy-performance law.",
        "run.law()",
        source="The Entropy Mechanism of RL for Reasoning LMs",
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/r2",
        "coefficient of determination of the fit",
        "How well the law describes the run.",
        "run.law()",
        direction="higher",
        bounds=(None, 1.0),
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/ceiling",
        "b - a: predicted R at entropy exhaustion",
        "The reward the run can reach by spending its entropy.",
        "run.law()",
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/reached",
        "R now (mean of the last window steps) / ceiling",
        "Share of the ceiling reached.",
        "run.law()",
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/gain_reached",
        "(R now - R first) / (ceiling - R first)",
        "Share of the possible gain made.",
        "run.law()",
        inputs=_R + ("entropy", "reward"),
    ),
    _a(
        "law/sign_agreement",
        "share of steps where sign(-entropy/cov) equals the sign of the next entropy change",
        "Whether entropy moves as the covariance mechanism predicts.",
        "run.law()",
        direction="higher",
        bounds=(0.0, 1.0),
        source="The Entropy Mechanism of RL for Reasoning LMs",
        inputs=_R + ("entropy",),
    ),
    _a("law/n", "steps in the fit", "Steps the law was fitted on.", "run.law()", unit="steps", bounds=(0.0, None)),
    _a(
        "law/n_sign",
        "steps counted by law/sign_agreement",
        "Steps the mechanism check used.",
        "run.law()",
        unit="steps",
        bounds=(0.0, None),
    ),
)

ANALYSES: Final[dict[str, MetricSpec]] = {spec.name: spec for spec in _ANALYSIS_SPECS}
"""Metrics computed from token rows on demand (``lens/*``, ``cliff/*``, ``law/*``), by public name."""

METRICS: Final[dict[str, MetricSpec]] = {**REGISTRY, **ANALYSES}
"""Every public metric name: :data:`REGISTRY` and :data:`ANALYSES`."""


def spec(name: str) -> MetricSpec:
    """The spec of a public metric name (core or analysis); a clear error for an unknown one."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; `rldiag summarize --list` shows the names") from None


def needed_stats(names: list[str] | tuple[str, ...] | None = None) -> set[str]:
    """Union of the statistics the given metrics (default: all) need."""
    specs = REGISTRY.values() if names is None else [REGISTRY[n] for n in names]
    return {st for spec in specs for st in spec.needs}


def _check() -> None:
    unknown = needed_stats() - set(STATS)
    if unknown:  # pragma: no cover - a programming error caught at import
        raise RuntimeError(f"metric specs need undeclared statistics: {sorted(unknown)}")


_check()
