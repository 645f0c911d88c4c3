"""The extrapolation cliff of on-policy distillation with reward extrapolation (docs/metrics.md, analyses).

"The Extrapolation Cliff in On-Policy Distillation of Near-Deterministic Structured Outputs" states a
closed-form, base-relative clip-safety threshold lambda*(p, b, c). Its equations were not available to us; the
formula here is rldiag's **derivation** from the paper's abstract, in its single-position Bernoulli reduction:

- with reward extrapolation lambda the fixed point is pi* proportional to base^(1-lambda) * teacher^lambda, so
  the modal mass is q(lambda) with logit q = logit b + lambda * (logit p - logit b);
- clip-safe means both base-relative ratios q/b and (1-q)/(1-b) lie in [1/c, c] (the eps form takes
  c = 1/(1-eps));
- lambda* is the lambda at which q(lambda) leaves [q_min, q_max], q_max = min(c b, 1 - (1-b)/c),
  q_min = max(b/c, 1 - c(1-b)); for a teacher sharper than the base with b >= 1/c the tail binds and
  lambda* = ln(1 + (c-1)/b) / (logit p - logit b).

:func:`lambda_star_kary` solves the same question for full teacher and base distributions at one position, and
:func:`simulate` trains a categorical policy to check what the threshold means (docs/cliff.md)::

    >>> round(lambda_star(0.96, 0.90, 2.0), 4)
    0.7618
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import numpy as np
import numpy.typing as npt
import polars as pl
from scipy.optimize import brentq
from scipy.special import logsumexp

from rldiag import schema

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

LAMBDA_STAR = "cliff/lambda_star"
"""Per step: lambda* of the pooled binding positions (mean teacher modal probability, mean base mass)."""
LAMBDA_STAR_MIN = "cliff/lambda_star_min"
"""Per step: the smallest per-position lambda* (the first structural position to leave the clip-safe region)."""
HEADROOM = "cliff/headroom"
"""Per step: lambda / lambda*; the cliff alert warns and is critical at the thresholds of the rule file."""


def headroom_thresholds(rules_toml: str | None = None) -> tuple[float, float]:
    r"""(warn, critical) thresholds of ``cliff/headroom``: those of the rules on that metric in the default rule
    file (``rldiag/alerts/default_rules.toml``, ``[rules.<name>]`` with ``metric = "cliff/headroom"`` and
    ``severity`` warn / critical), so ``cliff/severity`` and the alerts cannot disagree.

    >>> headroom_thresholds('[rules.a]\nmetric = "cliff/headroom"\nseverity = "warn"\nthreshold = 0.9\n'
    ...                     '[rules.b]\nmetric = "cliff/headroom"\nseverity = "critical"\nthreshold = 1.0\n')
    (0.9, 1.0)
    """
    import tomllib
    from importlib import resources

    if rules_toml is None:
        rules_toml = resources.files("rldiag.alerts").joinpath("default_rules.toml").read_text()
    found: dict[str, float] = {}
    for rule in tomllib.loads(rules_toml).get("rules", {}).values():
        if rule.get("metric") == HEADROOM and rule.get("severity") in ("warn", "critical"):
            found.setdefault(str(rule["severity"]), float(rule["threshold"]))
    if set(found) != {"warn", "critical"}:
        raise ValueError(f"the rule file has no warn and critical rule on {HEADROOM} (found {sorted(found)})")
    return found["warn"], found["critical"]


WARN_HEADROOM, CRITICAL_HEADROOM = headroom_thresholds()
"""Headroom at which the cliff alert warns, and at which it is critical (read from the rule file)."""


FloatArray: TypeAlias = "npt.NDArray[np.float64]"
"""A float64 array (0-d for scalar inputs)."""


# --- closed form -------------------------------------------------------------------------------------------------


def _logit(x: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore"):
        return np.log(x) - np.log1p(-x)


def c_from_eps(eps: float) -> float:
    """The eps form: a clip range [1-eps, 1+eps] is taken as ratio bound c = 1/(1-eps) (exact on the lower side,
    which is the side that binds when the teacher is sharper than the base)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return 1.0 / (1.0 - eps)


def _resolve_c(c: float | None, eps: float | None) -> float:
    if (c is None) == (eps is None):
        raise ValueError("give exactly one of c (ratio form) or eps (eps form, c = 1/(1-eps))")
    c = c_from_eps(eps) if eps is not None else float(c)  # type: ignore[arg-type]
    if not c >= 1.0:
        raise ValueError(f"the clip strength c must be >= 1, got {c}")
    return c


def clip_safe_band(b: npt.ArrayLike, c: float) -> tuple[FloatArray, FloatArray]:
    """(q_min, q_max): the modal masses whose base-relative ratios q/b and (1-q)/(1-b) both lie in [1/c, c]."""
    b = np.asarray(b, dtype=float)
    q_max = np.minimum(c * b, 1.0 - (1.0 - b) / c)
    q_min = np.maximum(b / c, 1.0 - c * (1.0 - b))
    return q_min, q_max


def q_of_lambda(p: npt.ArrayLike, b: npt.ArrayLike, lam: npt.ArrayLike) -> FloatArray:
    """Modal mass of the extrapolated fixed point: logit q = logit b + lam * (logit p - logit b)."""
    p, b, lam = (np.asarray(x, dtype=float) for x in (p, b, lam))
    z = _logit(b) + lam * (_logit(p) - _logit(b))
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


@overload
def lambda_star(p: float, b: float, c: float | None = None, *, eps: float | None = None) -> float: ...
@overload
def lambda_star(
    p: npt.ArrayLike, b: npt.ArrayLike, c: float | None = None, *, eps: float | None = None
) -> float | FloatArray: ...
def lambda_star(
    p: npt.ArrayLike, b: npt.ArrayLike, c: float | None = None, *, eps: float | None = None
) -> float | FloatArray:
    """Clip-safety threshold lambda*(p, b, c) in closed form (a derivation, see the module docstring).

    ``p``: teacher modal probability, ``b``: warm-start (base) mass on the same token, ``c``: IS clip strength
    (ratio form) or ``eps`` (eps form, c = 1/(1-eps)). Broadcasts over arrays. +inf where extrapolation never
    leaves the clip-safe region (p == b, or the bound is 0 or 1, as with c = inf).

    >>> round(lambda_star(0.999, 0.99, 5.0), 4), round(lambda_star(0.96, 0.90, eps=0.5), 4)
    (0.6997, 0.7618)
    """
    c = _resolve_c(c, eps)
    p_arr, b_arr = np.asarray(p, dtype=float), np.asarray(b, dtype=float)
    if np.any(~((p_arr >= 0) & (p_arr <= 1))) or np.any(~((b_arr > 0) & (b_arr < 1))):
        raise ValueError("need 0 <= p <= 1 and 0 < b < 1")
    q_min, q_max = clip_safe_band(b_arr, c)
    delta = _logit(p_arr) - _logit(b_arr)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = (_logit(q_max) - _logit(b_arr)) / delta
        down = (_logit(q_min) - _logit(b_arr)) / delta
    out = np.where(delta > 0, up, np.where(delta < 0, down, np.inf))
    out = np.where(np.isnan(out), np.inf, out)  # inf/inf: the bound is 0 or 1 and p is 0 or 1
    return float(out) if out.ndim == 0 else out


def _lambda_star_expr(p: pl.Expr, b: pl.Expr, c: float) -> pl.Expr:
    """:func:`lambda_star` as a polars expression (streams over token rows)."""

    def logit(x: pl.Expr) -> pl.Expr:
        return x.log() - (1.0 - x).log()

    q_max = pl.min_horizontal(c * b, 1.0 - (1.0 - b) / c)
    q_min = pl.max_horizontal(b / c, 1.0 - c * (1.0 - b))
    delta = logit(p) - logit(b)
    up = (logit(q_max) - logit(b)) / delta
    down = (logit(q_min) - logit(b)) / delta
    out = pl.when(delta > 0).then(up).when(delta < 0).then(down).otherwise(float("inf"))
    return pl.when(out.is_nan()).then(float("inf")).otherwise(out)


# --- K-ary ---------------------------------------------------------------------------------------------------------


def lambda_star_kary(
    teacher: Sequence[float] | np.ndarray,
    base: Sequence[float] | np.ndarray,
    c: float | None = None,
    *,
    eps: float | None = None,
    lam_max: float = 1e6,
) -> float:
    """lambda* for full teacher and base distributions at one position (numeric).

    pi*_k(lambda) is proportional to base_k^(1-lambda) teacher_k^lambda; lambda* is the smallest lambda at which a
    base-relative ratio pi*_k/base_k leaves [1/c, c]. The largest log-ratio lambda*d_max - log Z(lambda)
    (d = log teacher - log base) grows and the smallest falls with lambda (their derivatives are
    d_max - E[d] >= 0 and d_min - E[d] <= 0), so the violation is monotone and brentq finds the root on a
    doubling bracket. +inf when teacher == base or c is infinite. For K = 2 it equals :func:`lambda_star`.
    """
    c = _resolve_c(c, eps)
    t = np.asarray(teacher, dtype=float)
    bs = np.asarray(base, dtype=float)
    if t.shape != bs.shape or t.ndim != 1 or t.size < 2:
        raise ValueError(f"teacher and base must be 1-D of the same length >= 2, got {t.shape} and {bs.shape}")
    if np.any(t < 0) or np.any(bs < 0) or not (abs(t.sum() - 1) < 1e-6 and abs(bs.sum() - 1) < 1e-6):
        raise ValueError("teacher and base must be probability distributions (non-negative, summing to 1)")
    if np.any((bs == 0) & (t > 0)):
        raise ValueError("the base gives zero mass to a token the teacher supports: its ratio is undefined")
    support = bs > 0
    t, bs = t[support] / t.sum(), bs[support] / bs.sum()
    log_c = math.log(c)
    if not math.isfinite(log_c):
        return math.inf
    if np.any(t == 0):
        return 0.0 if log_c > 0 else math.inf  # a token the teacher rules out leaves at once (ratio -> 0)
    d = np.log(t) - np.log(bs)
    if np.ptp(d) == 0:
        return math.inf
    log_b = np.log(bs)

    def violation(lam: float) -> float:
        log_ratio = lam * d - logsumexp(log_b + lam * d)
        return max(log_ratio.max() - log_c, -log_c - log_ratio.min())

    if violation(0.0) >= 0:
        return 0.0
    hi = 1.0
    while violation(hi) <= 0:
        hi *= 2.0
        if hi > lam_max:
            return math.inf
    return float(brentq(violation, 0.0, hi, xtol=1e-13, rtol=1e-13, maxiter=500))


# --- from a run --------------------------------------------------------------------------------------------------


def severity(headroom: float) -> str:
    """The cliff alert's verdict for lambda/lambda*: "critical" (>= :data:`CRITICAL_HEADROOM`), "warn"
    (>= :data:`WARN_HEADROOM`), "ok", or "unknown" (NaN: no binding position in the step)."""
    if math.isnan(headroom):
        return "unknown"
    if not math.isfinite(headroom):
        return "ok" if headroom < 0 else "critical"
    return "critical" if headroom >= CRITICAL_HEADROOM else "warn" if headroom >= WARN_HEADROOM else "ok"


def cliff_report(
    run: Any,
    lam: float | None = None,
    threshold: float = 0.9,
    *,
    c: float | None = None,
    eps: float | None = None,
    steps: Sequence[int] | None = None,
) -> pl.DataFrame:
    """Per step: p and b at the binding near-deterministic positions, lambda* and, given ``lam``, the headroom.

    Token rows carry only the sampled token's log-probs. A position binds when the teacher is near-deterministic
    there: its modal probability exceeds ``threshold`` (>= 0.5). When exp(teacher_logp) of the sampled token
    exceeds the threshold, that token *is* the teacher's mode (no other token can hold more than 1 - threshold),
    so p_i = exp(teacher_logp) and b_i = exp(base_logp) are the teacher's modal probability and the base's mass
    on the same token. (Positions where the student sampled a non-modal token are not seen; at near-deterministic
    positions they are rare.) Per step: ``cliff/n_tokens`` rows with both log-probs, ``cliff/n_positions`` binding
    ones, ``cliff/p`` and ``cliff/b`` are the means over those positions,
    ``cliff/lambda_star`` is lambda*(p, b, c) of the pooled Bernoulli reduction, ``cliff/lambda_star_min`` the
    smallest per-position lambda*(p_i, b_i, c), ``cliff/headroom`` = lam / lambda* and ``cliff/severity`` the
    alert's verdict. ``run`` is a Run (c defaults to the eps form of its ``eps_low``) or token rows (LazyFrame or
    DataFrame, eps 0.2 by default).
    """
    if not 0.5 <= threshold < 1.0:
        raise ValueError(
            f"threshold must be in [0.5, 1), got {threshold}: below 0.5 the sampled token need not "
            "be the teacher's mode"
        )
    if isinstance(run, pl.DataFrame):
        lf = run.lazy()
    elif isinstance(run, pl.LazyFrame):
        lf = run
    elif hasattr(run, "tokens"):
        lf = run.tokens()
        if c is None and eps is None:
            eps = float(getattr(getattr(run, "config", None), "eps_low", 0.2))
    else:
        raise TypeError(f"cliff_report() takes a Run, a polars LazyFrame or DataFrame, not {type(run).__name__}")
    if c is None and eps is None:
        eps = 0.2
    c = _resolve_c(c, eps)
    names = lf.collect_schema().names()
    missing = [n for n in (schema.STEP, schema.TEACHER_LOGP, schema.BASE_LOGP) if n not in names]
    if missing:
        raise ValueError(f"token rows lack {', '.join(missing)}: record teacher_logprobs and base_logprobs")
    if steps is not None:
        lf = lf.filter(pl.col(schema.STEP).is_in([int(s) for s in steps]))
    p = pl.col(schema.TEACHER_LOGP).cast(pl.Float64).exp()
    b = pl.col(schema.BASE_LOGP).cast(pl.Float64).exp()
    scored = p.is_finite() & b.is_finite()
    binding = (p > threshold) & (b > 0) & (b < 1) & scored
    out = (
        lf.group_by(schema.STEP)
        .agg(
            scored.sum().cast(pl.Int64).alias("cliff/n_tokens"),
            binding.sum().cast(pl.Int64).alias("cliff/n_positions"),
            p.filter(binding).mean().alias("cliff/p"),
            b.filter(binding).mean().alias("cliff/b"),
            _lambda_star_expr(p, b, c).filter(binding).min().alias(LAMBDA_STAR_MIN),
        )
        .sort(schema.STEP)
        .collect(engine="streaming")
    )
    if out.height and out["cliff/n_tokens"].sum() == 0:
        raise ValueError("no token row has both teacher_logp and base_logp: record teacher_logprobs and base_logprobs")
    pooled = [
        lambda_star(pi, bi, c) if pi is not None and bi is not None else math.nan
        for pi, bi in zip(out["cliff/p"].to_list(), out["cliff/b"].to_list())
    ]
    out = out.with_columns(pl.Series(LAMBDA_STAR, pooled, dtype=pl.Float64), pl.lit(c).alias("cliff/c"))
    if lam is not None:
        out = out.with_columns((float(lam) / pl.col(LAMBDA_STAR)).alias(HEADROOM))
        out = out.with_columns(pl.col(HEADROOM).map_elements(severity, return_dtype=pl.String).alias("cliff/severity"))
    cols = [
        schema.STEP,
        "cliff/n_tokens",
        "cliff/n_positions",
        "cliff/p",
        "cliff/b",
        "cliff/c",
        LAMBDA_STAR,
        LAMBDA_STAR_MIN,
    ]
    if lam is not None:
        cols += [HEADROOM, "cliff/severity"]
    return out.select(cols).with_columns(pl.col(pl.Float64).fill_null(float("nan")))


# --- figure ------------------------------------------------------------------------------------------------------


def cliff_figure(p: float, b: float, c: float, lam: float | None = None) -> go.Figure:
    """q(lambda) with the clip-safe band [q_min, q_max] and lambda* marked (and ``lam`` if given). Pure."""
    import plotly.graph_objects as go

    star = lambda_star(p, b, c)
    q_min, q_max = (float(v) for v in clip_safe_band(b, c))
    right = max(v for v in (1.5 * star if math.isfinite(star) else 0.0, 1.5 * (lam or 0.0), 2.0) if v > 0)
    grid = np.linspace(0.0, right, 400)
    q = q_of_lambda(p, b, grid)
    safe = (q >= q_min) & (q <= q_max)
    fig = go.Figure()
    fig.add_hrect(
        y0=q_min,
        y1=q_max,
        fillcolor="rgba(44,160,44,0.12)",
        line_width=0,
        annotation_text="clip-safe: q/b and (1-q)/(1-b) in [1/c, c]",
        annotation_position="top left",
    )
    fig.add_trace(
        go.Scatter(
            x=grid,
            y=np.where(safe, q, np.nan),
            mode="lines",
            name="q(λ), clip-safe",
            line=dict(color="#1f77b4", width=2.5),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=grid,
            y=np.where(safe, np.nan, q),
            mode="lines",
            name="q(λ), outside",
            line=dict(color="#d62728", width=2.5),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[0.0, 1.0], y=[b, p], mode="markers", name="base (λ=0), teacher (λ=1)", marker=dict(size=8, color="#444")
        )
    )
    if math.isfinite(star):
        fig.add_vline(
            x=star,
            line=dict(color="#d62728", dash="dash"),
            annotation_text=f"λ* = {star:.4f}",
            annotation_position="bottom right",
        )
    if lam is not None:
        color = {"critical": "#d62728", "warn": "#ff7f0e", "ok": "#2ca02c"}[severity(lam / star if star else math.inf)]
        fig.add_vline(
            x=lam, line=dict(color=color, width=2), annotation_text=f"λ = {lam:g}", annotation_position="top right"
        )
    lo = min(float(np.nanmin(q)), q_min, b, p)
    hi = max(float(np.nanmax(q)), q_max, b, p)
    pad = 0.05 * max(hi - lo, 1e-3)
    fig.update_layout(
        title=f"extrapolation cliff: p = {p:g}, b = {b:g}, c = {c:g} (rldiag's derivation)",
        xaxis_title="reward-extrapolation coefficient λ",
        yaxis_title="modal mass q of the fixed point",
        yaxis_range=[max(lo - pad, 0.0), min(hi + pad, 1.0)],
        template="plotly_white",
        hovermode="x",
        legend=dict(orientation="h", y=-0.2),
        margin=dict(l=60, r=20, t=50, b=40),
    )
    return fig


# --- simulation --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate`: the trained policy and its base-relative ratios."""

    lam: float
    policy: np.ndarray
    """Final policy (averaged over the last quarter of the iterations for sampled updates)."""
    ratio_min: float
    """Smallest base-relative ratio pi_k / base_k (the tail's, when the teacher is sharper)."""
    ratio_max: float
    """Largest base-relative ratio."""
    inside: bool
    """Whether every ratio lies in [1/c, c]: the trained policy stayed clip-safe."""


def simulate(
    teacher: Sequence[float],
    base: Sequence[float],
    lam: float,
    c: float,
    *,
    mode: Literal["exact", "sampled"] = "exact",
    iters: int | None = None,
    lr: float = 0.5,
    batch: int = 2048,
    epochs: int = 4,
    seed: int = 0,
) -> SimResult:
    """Train a categorical policy by on-policy distillation with reward extrapolation ``lam``.

    The per-token reward is s_k - log pi_k with s = lam log teacher + (1 - lam) log base, whose maximiser is
    pi* proportional to base^(1-lam) teacher^lam. The policy starts at the base (warm start).

    ``exact``: natural policy-gradient steps on the expected objective, theta += lr * A(theta) with
    A_k = s_k - log pi_k - E_pi[s - log pi] (softmax NPG; converges geometrically).
    ``sampled``: each iteration draws ``batch`` tokens from pi_old, advantages are rewards minus their batch mean,
    and ``epochs`` gradient steps ascend the PPO surrogate mean(min(rho A, clip(rho, 1/c, c) A)),
    rho = pi/pi_old: the IS clip at c.
    """
    if mode not in ("exact", "sampled"):
        raise ValueError(f"mode must be 'exact' or 'sampled', got {mode!r}")
    iters = iters if iters is not None else (300 if mode == "exact" else 3000)
    t = np.asarray(teacher, dtype=float)
    bs = np.asarray(base, dtype=float)
    s = lam * np.log(t) + (1.0 - lam) * np.log(bs)
    theta = np.log(bs).copy()
    rng = np.random.default_rng(seed)
    tail: list[np.ndarray] = []

    def softmax(x: np.ndarray) -> np.ndarray:
        z = np.exp(x - x.max())
        return z / z.sum()

    for it in range(iters):
        pi = softmax(theta)
        if mode == "exact":
            reward = s - np.log(pi)
            theta = theta + lr * (reward - pi @ reward)
            continue
        counts = np.bincount(rng.choice(len(pi), size=batch, p=pi), minlength=len(pi)).astype(float)
        reward = s - np.log(pi)
        adv = reward - counts @ reward / batch
        old = pi
        for _ in range(epochs):
            cur = softmax(theta)
            rho = cur / old
            clipped = ((adv > 0) & (rho > c)) | ((adv < 0) & (rho < 1.0 / c))
            coef = np.where(clipped, 0.0, counts * rho * adv) / batch  # d/dtheta of rho_k A_k = rho_k A_k (e_k - pi)
            theta = theta + lr * (coef - cur * coef.sum())
        if it >= iters * 3 // 4:
            tail.append(softmax(theta))
    policy = softmax(theta) if mode == "exact" else np.mean(tail, axis=0)
    ratio = policy / bs
    return SimResult(
        lam, policy, float(ratio.min()), float(ratio.max()), bool(ratio.min() >= 1.0 / c and ratio.max() <= c)
    )


def simulated_boundary(
    teacher: Sequence[float], base: Sequence[float], c: float, lo: float, hi: float, *, tol: float = 1e-6, **sim: Any
) -> float:
    """Bisection on lambda in [lo, hi] for where the trained policy (:func:`simulate`) leaves the clip-safe
    region; ``lo`` must stay inside and ``hi`` must leave."""
    if not simulate(teacher, base, lo, c, **sim).inside or simulate(teacher, base, hi, c, **sim).inside:
        raise ValueError(f"the boundary is not bracketed by [{lo}, {hi}]")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if simulate(teacher, base, mid, c, **sim).inside:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def simulation_table() -> str:
    """The simulation table of docs/cliff.md (``python -m rldiag.analysis.cliff``; about a minute)."""
    tail6 = ([0.97, 0.01, 0.01, 0.005, 0.003, 0.002], [0.9, 0.04, 0.03, 0.015, 0.01, 0.005])
    cases = [
        ([0.96, 0.04], [0.90, 0.10], 2.0),
        ([0.999, 0.001], [0.99, 0.01], 5.0),
        ([0.96, 0.04], [0.90, 0.10], 5.0),
        ([0.96, 0.04], [0.90, 0.10], c_from_eps(0.2)),
        (*tail6, 1.25),
        (*tail6, 2.0),
        (*tail6, 5.0),
    ]
    lines = [
        "| K | p | b | c | closed form | K-ary solver | simulated, exact | simulated, sampled | "
        "inside at 0.99 λ* / outside at 1.01 λ* (exact; sampled) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t, b, c in cases:
        star = lambda_star_kary(t, b, c)
        closed = lambda_star(t[0], b[0], c)
        exact = simulated_boundary(t, b, c, 0.9 * star, 1.1 * star, tol=1e-8)
        sampled = simulated_boundary(t, b, c, 0.9 * star, 1.1 * star, tol=1e-5, mode="sampled", seed=0)
        flags = []
        for mode in ("exact", "sampled"):
            below = simulate(t, b, 0.99 * star, c, mode=mode, seed=1).inside
            above = simulate(t, b, 1.01 * star, c, mode=mode, seed=1).inside
            flags.append(f"{'yes' if below else 'NO'} / {'yes' if not above else 'NO'}")
        closed_text = f"{closed:.6f}" if len(t) == 2 else f"{closed:.4f} (pooled Bernoulli)"
        lines.append(
            f"| {len(t)} | {t[0]:g} | {b[0]:g} | {c:g} | {closed_text} | {star:.6f} | {exact:.6f} | "
            f"{sampled:.5f} | {'; '.join(flags)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(simulation_table())
