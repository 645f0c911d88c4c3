"""The entropy-performance law R = -a exp(H) + b and the entropy mechanism check (docs/metrics.md, analyses).

"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" fits downstream performance R
against mean policy entropy H as R = -a exp(H) + b: performance is bought with entropy, and the ceiling at
entropy exhaustion (H = 0) is b - a. The same paper derives that the entropy change of a policy-gradient step is
driven by -Cov(log pi, A): :func:`fit_law` checks, step by step, whether the sign of -`entropy/cov` predicts the
sign of the next change of `entropy/mean`::

    >>> import numpy as np, polars as pl
    >>> H = np.linspace(1.0, 0.2, 20)
    >>> frame = pl.DataFrame({"step": range(20), "entropy/mean": H, "reward/mean": -0.1 * np.exp(H) + 0.8})
    >>> fit = fit_law(frame)
    >>> round(fit.a, 6), round(fit.b, 6), round(fit.ceiling, 6)
    (0.1, 0.8, 0.7)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

ENTROPY = "entropy/mean"
COV = "entropy/cov"
DEFAULT_METRIC = "reward/mean"
WEAK_R2 = 0.5
"""Below this R^2 the fit explains too little of R for its ceiling to be read as a forecast (:meth:`LawFit.caveats`)."""


@dataclass(frozen=True)
class LawFit:
    """Result of :func:`fit_law`; :meth:`as_dict` gives the ``law/*`` names."""

    metric: str
    """The performance series R that was fitted."""
    n: int
    """Steps with finite (H, R) used by the fit."""
    a: float
    """Coefficient of -exp(H)."""
    b: float
    """Intercept."""
    r2: float
    """Coefficient of determination of the fit (NaN when R is constant)."""
    ceiling: float
    """Predicted R at entropy exhaustion, b - a (``law/ceiling``)."""
    reached: float
    """R now (mean of the last ``window`` finite values) / ceiling; NaN unless the ceiling is positive."""
    gain_reached: float
    """(R now - R at the first step) / (ceiling - R at the first step): share of the run's possible gain made."""
    sign_agreement: float
    """Share of steps where sign(-entropy/cov) equals the sign of the next entropy change (NaN without cov)."""
    n_sign: int
    """Steps counted by :attr:`sign_agreement` (both signs nonzero and finite)."""
    steps: pl.DataFrame = field(repr=False)
    """Per step: step, H, R, the fitted R, the next entropy change, the predicted sign and whether it agreed."""

    def caveats(self) -> list[str]:
        """What keeps the fit from being read as the paper's law, in plain words (empty when nothing does): a
        coefficient ``a <= 0`` (R does not rise as entropy falls, so ``b - a`` is no ceiling), an R^2 below
        :data:`WEAK_R2`, an R now above the predicted ceiling. The CLI and the dashboard print these under the
        numbers."""
        out = []
        if not self.a > 0:
            out.append(
                f"a = {self.a:.4g} <= 0: {self.metric} does not rise as entropy falls in this run, so b - a is not a "
                "ceiling (the law does not describe this run)"
            )
        if math.isfinite(self.r2) and self.r2 < WEAK_R2:
            out.append(
                f"R^2 = {self.r2:.2f}: the fit explains little of {self.metric}'s variation; the ceiling is a weak "
                "forecast"
            )
        if self.a > 0 and math.isfinite(self.reached) and self.reached > 1:
            out.append(f"{self.metric} now is above the predicted ceiling: the fit under-predicts this run")
        return out

    def as_dict(self) -> dict[str, float]:
        """The public ``law/*`` quantities."""
        return {
            "law/a": self.a,
            "law/b": self.b,
            "law/r2": self.r2,
            "law/ceiling": self.ceiling,
            "law/reached": self.reached,
            "law/gain_reached": self.gain_reached,
            "law/sign_agreement": self.sign_agreement,
            "law/n": float(self.n),
            "law/n_sign": float(self.n_sign),
        }


def fit_law(
    frame: Any, metric: str = DEFAULT_METRIC, *, entropy: str = ENTROPY, cov: str = COV, window: int = 5
) -> LawFit:
    """Least-squares fit of R on [-exp(H), 1] over a run's steps, and the mechanism check.

    ``frame`` is a step-metrics DataFrame (``step``, ``entropy``, ``metric`` and optionally ``cov`` columns) or a
    Run (its :meth:`step_metrics`). ``metric`` is the performance series (validation reward or accuracy where
    logged; the training ``reward/mean`` by default). The mechanism check pairs each step's covariance with the
    entropy change to the next recorded step (the update made with that covariance). Raises ValueError when
    the series cannot be fitted (fewer than 3 steps, or no entropy variation).
    """
    if not isinstance(frame, pl.DataFrame):
        if not hasattr(frame, "step_metrics"):
            raise TypeError(f"fit_law() takes a step-metrics DataFrame or a Run, not {type(frame).__name__}")
        frame = frame.step_metrics()
    missing = [c for c in ("step", entropy, metric) if c not in frame.columns]
    if missing:
        have = ", ".join(frame.columns[:8])
        raise ValueError(f"no column(s) {', '.join(missing)} in the step metrics (have: {have}, ...)")
    cols = ["step", entropy, metric, *([cov] if cov in frame.columns else [])]
    df = frame.select(cols).sort("step").with_columns(pl.col(c).cast(pl.Float64) for c in cols[1:])
    H, R = df[entropy].to_numpy(), df[metric].to_numpy()
    ok = np.isfinite(H) & np.isfinite(R)
    n = int(ok.sum())
    if n < 3:
        raise ValueError(f"need at least 3 steps with finite {entropy} and {metric}, have {n}")
    X = np.column_stack([-np.exp(H[ok]), np.ones(n)])
    coef, _, rank, _ = np.linalg.lstsq(X, R[ok], rcond=None)
    if rank < 2:
        raise ValueError(f"{entropy} does not vary over the run: the law cannot be fitted")
    a, b = float(coef[0]), float(coef[1])
    fitted = -a * np.exp(H) + b
    ss_res = float(np.sum((R[ok] - fitted[ok]) ** 2))
    ss_tot = float(np.sum((R[ok] - R[ok].mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    ceiling = b - a
    r_now = float(R[ok][-max(1, window) :].mean())
    r_first = float(R[ok][0])
    reached = r_now / ceiling if ceiling > 0 else math.nan
    gain_reached = (r_now - r_first) / (ceiling - r_first) if ceiling != r_first else math.nan

    # mechanism: sign(-cov_t) against H_{t+1} - H_t, over steps with a finite entropy
    fin = np.isfinite(H)
    dH = np.full(len(H), np.nan)
    idx = np.flatnonzero(fin)
    dH[idx[:-1]] = H[idx[1:]] - H[idx[:-1]]
    pred = -df[cov].to_numpy() if cov in df.columns else np.full(len(H), np.nan)
    counted = np.isfinite(dH) & np.isfinite(pred) & (dH != 0) & (pred != 0)
    agree = np.sign(dH) == np.sign(pred)
    n_sign = int(counted.sum())
    sign_agreement = float(agree[counted].mean()) if n_sign else math.nan
    steps = df.select("step", entropy, metric).with_columns(
        pl.Series("law/fitted", fitted),
        pl.Series("entropy/delta_next", dH),
        pl.Series("law/predicted_sign", np.sign(pred)),
        pl.Series("law/agree", [bool(a) if c else None for a, c in zip(agree, counted)], dtype=pl.Boolean),
    )
    return LawFit(metric, n, a, b, r2, ceiling, reached, gain_reached, sign_agreement, n_sign, steps)
