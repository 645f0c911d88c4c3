"""Definitions that both the compiled kernel and the polars analyses apply, each written once.

Each function is plain arithmetic and comparisons, so the same source runs on numpy arrays, on scalars inside
the numba kernel (:mod:`rldiag.stats.kernel` compiles it with ``numba.njit(inline="always")``) and on polars
expressions (:mod:`rldiag.analysis.lens`). A second copy of any of these rules anywhere is a bug.

>>> import numpy as np
>>> token_valid(np.array([-1.0, 0.5, np.nan]), np.array([-1.0, -1.0, -1.0]), np.array([1.0, 1.0, 1.0]), 1e-4)
array([ True, False, False])
>>> float(batch_ess(np.float64(4.0), np.float64(4.0), np.float64(4.0)))
1.0
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def finite(x: Any) -> Any:
    """True where ``x`` is finite: ``x - x`` is 0 for a finite number, NaN for NaN and +-inf."""
    return x - x == 0


def token_valid(logp: Any, old_logp: Any, adv: Any, tol: Any) -> Any:
    """Whether a token counts anywhere (docs/run-format.md, token columns): its ``logp``, ``old_logp`` and ``adv`` are
    finite and neither log-prob is above ``tol`` (``RecorderConfig.logp_tolerance``: a log-probability cannot
    be positive beyond float rounding)."""
    # finite(x) spelled out: the kernel compiles this function on its own, without the module's globals
    return (logp - logp == 0) & (old_logp - old_logp == 0) & (adv - adv == 0) & (logp <= tol) & (old_logp <= tol)


def batch_ess(sum_w: T, sum_w2: T, n: T) -> T:
    """Normalized effective sample size of weights w: ``(sum w)^2 / (n * sum w^2)``, in (0, 1]; 1 when every
    weight is equal. The caller decides what an empty batch gives (``n * sum w^2 == 0``).

    Used for the importance ratios of a step (``ess/token``, Trust the Batch's cap ``lens/ttb/ess``) and for
    the mismatch weights (``mismatch/ess``). Source: Trust the Batch (P3O); Kish's effective sample size.
    """
    return sum_w * sum_w / (n * sum_w2)  # type: ignore[operator]


def ctpo_clipped(cum_lr: Any, adv: Any, root: Any, low: Any, high: Any) -> Any:
    """Whether CTPO's clip removes a token's gradient (``seq/ctpo_clip``, ``lens/ctpo/*``).

    CTPO (Rethinking Importance Sampling in LLM Policy Optimization: A Cumulative Token Perspective) clips the
    cumulative token log-ratio ``L_t = sum_{j<=t} lr_j`` to position-adaptive log-space bounds
    ``[-low * sqrt(t+1), high * sqrt(t+1)]`` (``root`` is ``sqrt(t+1)``, t the 0-based position). Read as PPO's
    pessimistic clip, which the paper's clipped objective builds on, a bound removes the gradient only on the
    side the advantage pushes: ``adv > 0`` and ``L_t`` above the upper bound, or ``adv < 0`` and ``L_t`` below
    the lower one (sign-aware, like ``clip/region``). **derived**: the abstract gives the bounds, not the
    min/clip form; rldiag reads it as PPO's.
    """
    return ((adv > 0) & (cum_lr > high * root)) | ((adv < 0) & (cum_lr < -low * root))
