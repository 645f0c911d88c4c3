"""Objective lens: how each policy-gradient objective of the literature would have treated a run's tokens.

docs/metrics.md, analyses. For every step and objective it reports, over the step's valid tokens:

``lens/<objective>/kept_frac``
    share of tokens whose gradient the objective keeps (not clipped, masked or dropped);
``lens/<objective>/weight_mean``
    mean effective weight ``w``: the coefficient of ``A * grad log pi(token)`` in the objective's gradient,
    0 for a dropped token (PPO: ``r`` when kept; CISPO: ``min(r, 1+eps_high)``; ...), averaged over all tokens;
``lens/<objective>/pos_share``
    positive share of the gradient mass, ``sum max(w*A, 0) / sum |w*A|`` (BAPO's balance, per objective);
``lens/<objective>/kept_adv_frac``
    share of the advantage mass ``sum |A|`` carried by kept tokens.

plus ``lens/bapo/clip_low``, ``lens/bapo/clip_high``, ``lens/bapo/saturated`` (the bounds BAPO would have
chosen and whether its target was out of reach), ``lens/ttb/ess`` and ``lens/ttb/reg_weight`` (Trust the Batch's
ESS cap and its off-policy regulariser weight 1 - ESS).

The token rows are read in chunks of whole steps (only the columns the lens needs) and reduced to per-step sums
by the compiled passes of :mod:`rldiag.stats.lens_kernel`; memory is bounded by the chunks in flight, not the
run (see ``benchmarks/bench_lens.py``)::

    >>> import polars as pl
    >>> from rldiag.analysis.lens import lens
    >>> tokens = pl.LazyFrame({"step": [0, 0], "seq": [0, 0], "pos": [0, 1], "logp": [-1.0, -0.5],
    ...                        "old_logp": [-1.0, -1.0], "adv": [1.0, 1.0]})
    >>> lens(tokens, objectives=["ppo"])["lens/ppo/kept_frac"].to_list()
    [0.5]
"""

from __future__ import annotations

import dataclasses
import math
import queue
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
from rldiag.analysis.recompute import step_between, stored_step_rows
from rldiag.config import RecorderConfig
from rldiag.metrics.registry import LENS_EXTRA, LENS_OBJECTIVES, LENS_QUANTITIES
from rldiag.stats import lens_kernel as K

_F64 = pl.Float64

# --- objective parameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipParams:
    """Sign-aware PPO clip: a token with A > 0 and r > 1+eps_high, or A < 0 and r < 1-eps_low, is dropped."""

    eps_low: float = 0.2
    """Lower clip range: the ratio bound is 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: the ratio bound is 1 + eps_high."""


@dataclass(frozen=True)
class DualClipParams:
    """Dual-clip PPO: the PPO clip, and a token with A < 0 and r > c is dropped too."""

    eps_low: float = 0.2
    """Lower clip range of the underlying PPO clip."""
    eps_high: float = 0.2
    """Upper clip range of the underlying PPO clip."""
    c: float = 3.0
    """Dual-clip constant (verl ``clip_ratio_c``)."""


@dataclass(frozen=True)
class DCPOParams:
    """DCPO dynamic bounds from the prior q = exp(old_logp) (spec section 3).

    lower = 0.5 + 0.5*sqrt(max(1 - 4*eps_low/q, 0)), upper = 0.5 + 0.5*sqrt(1 + 4*eps_high/q).
    """

    eps_low: float = 0.16
    """eps_low of the lower bound (DCPO's default)."""
    eps_high: float = 0.2
    """eps_high of the upper bound (DCPO's default)."""


@dataclass(frozen=True)
class CISPOParams:
    """CISPO: every token keeps the stop-gradient weight min(r, 1+eps_high); nothing is dropped."""

    eps_high: float = 0.2
    """Upper truncation; the spec gives no CISPO value, so this is the run's eps_high (0.2 by default)."""


@dataclass(frozen=True)
class SAPOParams:
    """SAPO soft gate 4*s*(1-s), s = sigmoid(tau*(r-1)), on grad r = r * grad log pi.

    The temperatures are **recalled** defaults (not read from the paper): tau_pos 1.0, tau_neg 1.05.
    """

    tau_pos: float = 1.0
    """Gate temperature for A > 0 (recalled default)."""
    tau_neg: float = 1.05
    """Gate temperature for A <= 0 (recalled default)."""


@dataclass(frozen=True)
class GSPOParams:
    """GSPO sequence clip on s_i = exp(mean_t lr_i,t) with the sequence's mean advantage A_i."""

    eps_low: float = 3e-4
    """Lower sequence clip range (GSPO's 3e-4)."""
    eps_high: float = 4e-4
    """Upper sequence clip range (GSPO's 4e-4)."""


@dataclass(frozen=True)
class CTPOParams:
    """CTPO: cumulative log-ratio L_t = sum_{j<=t} lr_j clipped to [-low*sqrt(t+1), high*sqrt(t+1)]."""

    low: float = 0.025
    """Coefficient of the lower log-space bound."""
    high: float = 0.05
    """Coefficient of the upper log-space bound."""


@dataclass(frozen=True)
class ISParams:
    """TIS/MIS: the rollout-mismatch weight w = exp(old_logp - rollout_logp) on top of the PPO clip.

    TIS multiplies the PPO weight by min(w, cap); MIS multiplies it by w and drops tokens with w outside
    [1/cap, cap]. Tokens without a finite ``rollout_logp`` are left out (the quantities are NaN without any).
    """

    cap: float = 2.0
    """The TIS cap C (run config ``tis_cap``)."""
    eps_low: float = 0.2
    """Lower clip range of the underlying PPO clip."""
    eps_high: float = 0.2
    """Upper clip range of the underlying PPO clip."""


@dataclass(frozen=True)
class BAPOParams:
    """BAPO adaptive bounds: raise the lower ratio bound, then the upper, until pos/neg >= target.

    The search path is (low_start, high_start) -> (low_max, high_start) -> (low_max, high_max) in steps of
    ``step``; the first point where the kept positive mass reaches ``target`` times the kept negative mass is
    chosen. When no point reaches it, the bounds saturate at (low_max, high_max).
    """

    low_start: float = 0.6
    """Initial lower ratio bound."""
    low_max: float = 0.8
    """Largest lower ratio bound."""
    high_start: float = 1.2
    """Initial upper ratio bound."""
    high_max: float = 2.0
    """Largest upper ratio bound."""
    step: float = 0.05
    """Increment of either bound."""
    target: float = 1.0
    """Target ratio pos/neg of the kept gradient mass."""


@dataclass(frozen=True)
class TtBParams:
    """Trust the Batch: weight clip(r, 0, ESS) with ESS = (sum r)^2 / (n sum r^2) of the step; no parameters."""


@dataclass(frozen=True)
class LensParams:
    """Parameters of every objective; defaults follow docs/metrics.md, analyses.

    ``LensParams.from_config(run.config)`` takes the run's eps_low/eps_high (PPO, CISPO, TIS/MIS), dual-clip c
    and TIS cap instead of the spec defaults; ``params.replace({"dapo": {"eps_high": 0.3}})`` overrides fields.
    """

    ppo: ClipParams = field(default_factory=ClipParams)
    """PPO/GRPO symmetric clip (the run's eps_low on both sides when read from a run)."""
    dapo: ClipParams = field(default_factory=lambda: ClipParams(eps_low=0.2, eps_high=0.28))
    """DAPO clip-higher (0.2 / 0.28)."""
    dual_clip: DualClipParams = field(default_factory=DualClipParams)
    """Dual-clip PPO (c = 3)."""
    dcpo: DCPOParams = field(default_factory=DCPOParams)
    """DCPO dynamic bounds."""
    cispo: CISPOParams = field(default_factory=CISPOParams)
    """CISPO truncated stop-gradient weight."""
    sapo: SAPOParams = field(default_factory=SAPOParams)
    """SAPO soft gate (recalled temperatures)."""
    gspo: GSPOParams = field(default_factory=GSPOParams)
    """GSPO sequence clip."""
    ctpo: CTPOParams = field(default_factory=CTPOParams)
    """CTPO cumulative-ratio clip."""
    tis: ISParams = field(default_factory=ISParams)
    """Truncated importance sampling over the PPO clip."""
    mis: ISParams = field(default_factory=ISParams)
    """Masked importance sampling over the PPO clip."""
    bapo: BAPOParams = field(default_factory=BAPOParams)
    """BAPO adaptive clipping."""
    ttb: TtBParams = field(default_factory=TtBParams)
    """Trust the Batch (no parameters)."""

    def __post_init__(self) -> None:
        problems = []
        for obj in OBJECTIVES:
            for f in dataclasses.fields(getattr(self, obj)):
                v = getattr(getattr(self, obj), f.name)
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    problems.append(f"{obj}.{f.name}={v!r} must be a finite number >= 0")
        for obj in ("ppo", "dapo", "dual_clip", "tis", "mis"):
            if not getattr(self, obj).eps_low < 1:
                problems.append(f"{obj}.eps_low must be < 1")
        if not self.dual_clip.c > 1:
            problems.append(f"dual_clip.c={self.dual_clip.c!r} must be > 1")
        for obj in ("tis", "mis"):
            if not getattr(self, obj).cap > 1:
                problems.append(f"{obj}.cap={getattr(self, obj).cap!r} must be > 1")
        b = self.bapo
        if not (b.step > 0 and b.low_start <= b.low_max and b.high_start <= b.high_max):
            problems.append("bapo needs step > 0, low_start <= low_max and high_start <= high_max")
        if problems:
            raise ValueError("invalid lens parameters: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Any) -> LensParams:
        """Defaults with the run's clip settings: PPO, dual-clip and TIS/MIS clip symmetrically at the run's
        eps_low, CISPO truncates at its eps_high, dual-clip c, TIS cap and CTPO bounds are the run's (a missing
        attribute keeps the spec default). DAPO, DCPO, SAPO, GSPO and BAPO keep their published values."""
        eps = float(getattr(config, "eps_low", 0.2))
        hi = float(getattr(config, "eps_high", 0.2))
        c = float(getattr(config, "dual_clip_c", 3.0))
        cap = float(getattr(config, "tis_cap", 2.0))
        ctpo_low, ctpo_high = getattr(config, "ctpo_bounds", (0.025, 0.05))
        return cls(
            ppo=ClipParams(eps, eps),
            dual_clip=DualClipParams(eps, eps, c),
            cispo=CISPOParams(hi),
            ctpo=CTPOParams(float(ctpo_low), float(ctpo_high)),
            tis=ISParams(cap, eps, eps),
            mis=ISParams(cap, eps, eps),
        )

    def replace(self, overrides: Mapping[str, Any]) -> LensParams:
        """A copy with objectives replaced: values are parameter objects or dicts of field overrides."""
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
            current = getattr(self, name)
            if isinstance(value, Mapping):
                try:
                    changes[name] = dataclasses.replace(current, **value)
                except TypeError as exc:
                    fields = ", ".join(f.name for f in dataclasses.fields(current)) or "none"
                    raise ValueError(f"bad parameters for {name!r}: {exc}; its fields are: {fields}") from None
            elif isinstance(value, type(current)):
                changes[name] = value
            else:
                raise ValueError(f"parameters for {name!r} must be a dict or {type(current).__name__}")
        return dataclasses.replace(self, **changes)


OBJECTIVES: tuple[str, ...] = LENS_OBJECTIVES
"""Objective names, in report order; ``lens/<name>/...`` columns (declared in the metric registry)."""

QUANTITIES: tuple[str, ...] = tuple(LENS_QUANTITIES)
"""Quantities reported for every objective (registry: ``LENS_QUANTITIES``)."""

EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {obj: tuple(cols) for obj, cols in LENS_EXTRA.items()}
"""Objective-specific columns besides :data:`QUANTITIES` (registry: ``LENS_EXTRA``)."""

NEEDS: dict[str, tuple[str, ...]] = {
    "gspo": (schema.SEQ,),
    "ctpo": (schema.SEQ, schema.POS),
    "tis": (schema.ROLLOUT_LOGP,),
    "mis": (schema.ROLLOUT_LOGP,),
}
"""Token columns an objective needs besides ``step``, ``logp``, ``old_logp`` and ``adv``; without them its
columns are NaN."""


def column(objective: str, quantity: str) -> str:
    """Public column name, e.g. ``column("dapo", "kept_frac") == "lens/dapo/kept_frac"``."""
    return f"lens/{objective}/{quantity}"


def columns(objectives: Iterable[str] | None = None) -> list[str]:
    """All output columns (after ``step``) for ``objectives`` (all by default), in order."""
    out: list[str] = []
    for obj in _check_objectives(objectives):
        out += [column(obj, q) for q in QUANTITIES + EXTRA_COLUMNS.get(obj, ())]
    return out


# --- how it is computed ----------------------------------------------------------------------------------------
#
# The rows of a chunk of whole steps are read as numpy arrays (only the columns the lens needs) and reduced by the
# compiled passes of rldiag.stats.lens_kernel to per-step sums: one fused pass for every objective (PPO, DAPO,
# dual-clip, DCPO, CISPO, SAPO, TIS, MIS, the step's ESS and BAPO's table of sums per (sign of A, ratio bucket),
# and GSPO and CTPO over sequences when the rows are in the recorder's order; rows that are not go through a
# sequence pass in their sorted order), then one for Trust the Batch once the step's ESS is known. Every quantity
# is then a ratio of those sums (_finalize); BAPO's search walks its path over the bucket table. Chunks are read
# and computed by a few threads (polars' reader and the compiled passes release the GIL), so memory is bounded by
# the chunks in flight, not the run.


def _lo(eps: float) -> float:
    return 1.0 - eps


def _hi(eps: float) -> float:
    return 1.0 + eps


def _bapo_grid(start: float, stop: float, step: float) -> list[float]:
    if not step > 0 or stop < start:
        raise ValueError(f"BAPO grid needs step > 0 and max >= start, got {start}..{stop} by {step}")
    n = int(math.floor((stop - start) / step + 1e-9))
    return [round(start + k * step, 10) for k in range(n + 1)]


def _bapo_path(p: BAPOParams) -> list[tuple[float, float]]:
    """BAPO's search path: raise the lower bound first, then the upper one."""
    lows, highs = _bapo_grid(p.low_start, p.low_max, p.step), _bapo_grid(p.high_start, p.high_max, p.step)
    return [(lo, highs[0]) for lo in lows] + [(lows[-1], hi) for hi in highs[1:]]


def _thresholds(p: LensParams, tol: float) -> np.ndarray:
    """DCPO's and SAPO's parameters for the lens pass (slots ``TH_*`` of :mod:`rldiag.stats.lens_kernel`)."""
    th = np.zeros(K.N_TH)
    th[K.TH_DCPO_EL4], th[K.TH_DCPO_EH4] = 4.0 * p.dcpo.eps_low, 4.0 * p.dcpo.eps_high
    th[K.TH_DCPO_LO_MAX], th[K.TH_DCPO_HI_MIN] = K.dcpo_shortcut(th[K.TH_DCPO_EL4], th[K.TH_DCPO_EH4], tol)
    th[K.TH_SAPO_POS], th[K.TH_SAPO_NEG] = p.sapo.tau_pos, p.sapo.tau_neg
    return th


_CLIPS = ("ppo", "dapo", "dual_clip", "tis", "mis")


def _ratio_edges(p: LensParams, objs: Sequence[str]) -> list[float]:
    """Every ratio bound the requested objectives compare r with."""
    edges = {1.0}
    for o in _CLIPS:
        if o in objs:
            cp = getattr(p, o)
            edges |= {_lo(cp.eps_low), _hi(cp.eps_high)}
    if "dual_clip" in objs:
        edges.add(p.dual_clip.c)
    if "cispo" in objs:
        edges.add(_hi(p.cispo.eps_high))
    if "bapo" in objs:
        for lo, hi in _bapo_path(p.bapo):
            edges |= {lo, hi}
    return sorted(edges)


def _w_edges(p: LensParams, objs: Sequence[str]) -> list[float]:
    """The bounds TIS and MIS compare the rollout weight with."""
    if "tis" not in objs and "mis" not in objs:
        return []
    return sorted({1.0 / p.mis.cap, p.mis.cap, p.tis.cap})


@dataclass(frozen=True)
class _Table:
    """The token pass's table ``[step, side + 1, r bucket, w bucket, TABLE_SUMS]`` and its edges; a comparison of
    r or w with one of its edges is a comparison of bucket numbers (:func:`rldiag.stats.lens_kernel._bucket`)."""

    sums: np.ndarray
    r_edges: tuple[float, ...]
    w_edges: tuple[float, ...]

    def r_at(self, e: float) -> int:
        return 2 * self.r_edges.index(e) + 1

    def w_at(self, e: float) -> int:
        return 2 * self.w_edges.index(e) + 1

    def clip_mask(self, lo: float, hi: float, c: float | None = None) -> np.ndarray:
        """[side + 1, r bucket]: sign-aware PPO clip; A > 0 keeps r <= hi, A < 0 keeps r >= lo (and r <= c)."""
        b = np.arange(self.sums.shape[2])
        neg = b >= self.r_at(lo)
        if c is not None:
            neg &= b <= self.r_at(c)
        return np.stack([neg, np.ones_like(neg), b <= self.r_at(hi)])

    def objective(self, mask: np.ndarray, w: int = 1, wa: int = 2) -> dict[str, np.ndarray]:
        """:data:`SUMS` of the tokens in ``mask`` ([side + 1, r bucket, w bucket]), weight sum ``w``, gradient mass
        ``wa`` (indices of :data:`TABLE_SUMS`)."""
        t = np.where(mask[None, :, :, :, None], self.sums, 0.0)
        return {
            "kept": t[..., 0].sum(axis=(1, 2, 3)),
            "w": t[..., w].sum(axis=(1, 2, 3)),
            "pos": t[:, 2, ..., wa].sum(axis=(1, 2)),
            "abs": t[..., wa].sum(axis=(1, 2, 3)),
            "kadv": t[..., 3].sum(axis=(1, 2, 3)),
        }


def _table_sums(table: _Table, p: LensParams, objs: Sequence[str]) -> dict[str, np.ndarray]:
    """Sums of the clip-style objectives (PPO, DAPO, dual-clip, CISPO, TIS, MIS) from the lens pass's table."""
    out: dict[str, np.ndarray] = {}
    n_w = table.sums.shape[3]
    all_w = np.ones(n_w, dtype=bool)

    def put(obj: str, sums: dict[str, np.ndarray]) -> None:
        out.update({f"{obj}.{q}": v for q, v in sums.items()})

    for o in ("ppo", "dapo"):
        if o in objs:
            cp: ClipParams = getattr(p, o)
            put(o, table.objective(table.clip_mask(_lo(cp.eps_low), _hi(cp.eps_high))[..., None] & all_w))
    if "dual_clip" in objs:
        d = p.dual_clip
        put("dual_clip", table.objective(table.clip_mask(_lo(d.eps_low), _hi(d.eps_high), d.c)[..., None] & all_w))
    if "cispo" in objs:
        C = _hi(p.cispo.eps_high)
        t = table.sums.sum(axis=3)  # [step, side, r bucket, sums]
        below = (np.arange(t.shape[2]) <= table.r_at(C))[None, None, :]
        w = np.where(below, t[..., 1], C * t[..., 0])
        wa = np.where(below, t[..., 2], C * t[..., 3])
        put(
            "cispo",
            {
                "kept": t[..., 0].sum(axis=(1, 2)),
                "w": w.sum(axis=(1, 2)),
                "pos": wa[:, 2].sum(axis=1),
                "abs": wa.sum(axis=(1, 2)),
                "kadv": t[..., 3].sum(axis=(1, 2)),
            },
        )
    valid = np.arange(n_w) < n_w - 1  # the last weight bucket: tokens without a rollout weight
    for o in ("tis", "mis"):
        if o not in objs:
            continue
        ip: ISParams = getattr(p, o)
        mask = table.clip_mask(_lo(ip.eps_low), _hi(ip.eps_high))[..., None] & valid
        wb = np.arange(n_w)
        if o == "tis":  # min(w, C) r: w r below the cap, C r above it
            t = table.sums
            below = (wb <= table.w_at(ip.cap))[None, None, None, :]
            capped = np.stack(
                [
                    t[..., 0],
                    np.where(below, t[..., 4], ip.cap * t[..., 1]),
                    np.where(below, t[..., 5], ip.cap * t[..., 2]),
                    t[..., 3],
                ],
                axis=-1,
            )
            sums = _Table(capped, table.r_edges, table.w_edges).objective(mask, w=1, wa=2)
        else:
            mask = mask & (wb >= table.w_at(1.0 / ip.cap)) & (wb <= table.w_at(ip.cap))
            sums = table.objective(mask, w=4, wa=5)
        inside = table.sums[:, :, :, valid]
        sums["n"], sums["aadv"] = inside[..., 0].sum(axis=(1, 2, 3)), inside[..., 3].sum(axis=(1, 2, 3))
        put(o, sums)
    return out


def _bapo_choose(table: np.ndarray, p: BAPOParams, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Walk BAPO's search path per step over its table ``[step, side + 1, bucket, (n, r, ra, a)]``; the chosen
    point's sums (``bapo.*``) and bounds. A > 0 keeps the buckets ``r <= hi``, A < 0 those with ``r >= lo``."""
    path = _bapo_path(p)
    index = {float(e): i for i, e in enumerate(edges)}
    below = np.cumsum(table[:, 2], axis=1)  # positive side, buckets 0..b
    above = np.cumsum(table[:, 0, ::-1], axis=1)[:, ::-1]  # negative side, buckets b..end
    zero = table[:, 1].sum(axis=1)
    k_hi = np.array([2 * index[hi] + 1 for _, hi in path])
    k_lo = np.array([2 * index[lo] + 1 for lo, _ in path])
    pos, neg = below[:, k_hi], above[:, k_lo]  # [step, point, sum]
    kept = pos + neg + zero[:, None, :]
    pos_mass, neg_mass = pos[:, :, 2], neg[:, :, 2]
    met = (neg_mass == 0.0) | (pos_mass >= p.target * neg_mass)
    saturated = ~met.any(axis=1)
    choice = np.where(saturated, len(path) - 1, met.argmax(axis=1))
    rows = np.arange(table.shape[0])
    chosen, chosen_pos = kept[rows, choice], pos_mass[rows, choice]
    return {
        "bapo.kept": chosen[:, 0],
        "bapo.w": chosen[:, 1],
        "bapo.pos": chosen_pos,
        "bapo.abs": chosen[:, 2],
        "bapo.kadv": chosen[:, 3],
        column("bapo", "clip_low"): np.array([path[c][0] for c in choice], dtype=float),
        column("bapo", "clip_high"): np.array([path[c][1] for c in choice], dtype=float),
        column("bapo", "saturated"): saturated.astype(float),
    }


# --- the edge ---------------------------------------------------------------------------------------------------


def _check_objectives(objectives: Iterable[str] | None) -> list[str]:
    if objectives is None:
        return list(OBJECTIVES)
    objs = [objectives] if isinstance(objectives, str) else list(objectives)
    bad = [o for o in objs if o not in OBJECTIVES]
    if bad:
        raise ValueError(f"unknown objective(s) {', '.join(map(repr, bad))}; choose from {', '.join(OBJECTIVES)}")
    return [o for o in OBJECTIVES if o in objs]


@dataclass(frozen=True)
class _Shape:
    """Which optional token columns the rows have."""

    seq: bool
    pos: bool
    rollout: bool

    def read_columns(self, objs: Sequence[str]) -> list[str]:
        """The token columns the lens reads for ``objs``."""
        cols = [schema.STEP, schema.LOGP, schema.OLD_LOGP, schema.ADV]
        if self.seq and ("gspo" in objs or "ctpo" in objs):
            cols.append(schema.SEQ)
            if self.pos and "ctpo" in objs:
                cols.append(schema.POS)
        if self.rollout and ("tis" in objs or "mis" in objs):
            cols.append(schema.ROLLOUT_LOGP)
        return cols


def _columns_of(lf: pl.LazyFrame) -> _Shape:
    """Checks the required columns; says which optional ones are there."""
    names = lf.collect_schema().names()
    missing = [c for c in (schema.STEP, schema.LOGP, schema.OLD_LOGP, schema.ADV) if c not in names]
    if missing:
        raise ValueError(f"token rows lack required column(s) {', '.join(missing)} (see rldiag.schema)")
    return _Shape(schema.SEQ in names, schema.POS in names, schema.ROLLOUT_LOGP in names)


def read_columns(run_or_frame: Any, objectives: Iterable[str] | None = None) -> list[str]:
    """The token columns :func:`lens` reads for ``objectives`` on these rows (what its cost is measured against)."""
    lf, _, _ = _resolve(run_or_frame, None)
    return _columns_of(lf).read_columns(_check_objectives(objectives))


def _finalize(obj: str, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Public quantities of one objective from its sums (and the step's ``n``/``aadv`` unless it has its own);
    NaN where a denominator is 0 (or NaN)."""
    n = sums.get(f"{obj}.n", sums["n"])
    aadv = sums.get(f"{obj}.aadv", sums["aadv"])

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out: np.ndarray = np.where(den > 0, num / den, np.nan)
        return out

    return {
        column(obj, "kept_frac"): ratio(sums[f"{obj}.kept"], n),
        column(obj, "weight_mean"): ratio(sums[f"{obj}.w"], n),
        column(obj, "pos_share"): ratio(sums[f"{obj}.pos"], sums[f"{obj}.abs"]),
        column(obj, "kept_adv_frac"): ratio(sums[f"{obj}.kadv"], aadv),
    }


def _stored_counts(source: Any, steps: Sequence[int] | None) -> pl.DataFrame | None:
    """Token rows per step as a run's statistics record them (``rows_written``; no pass over the token rows), or
    None for a frame. Only the sizes of the chunks depend on them: a step they miss or miscount is still read."""
    compact = getattr(source, "compact_table", None)
    got = None if compact is None else stored_step_rows(compact(), steps)
    if got is None:
        return None
    return pl.DataFrame({schema.STEP: got[0], "len": got[1]})


def _step_ranges(chunks: list[list[int]]) -> list[tuple[int | None, int | None]]:
    """Chunks of steps as step ranges ``(lo, hi]`` that together cover every step (the first is open below, the
    last above): a step the counts did not know lands in one of them."""
    if not chunks:
        return [(None, None)]
    bounds: list[int | None] = [None] + [c[-1] for c in chunks[:-1]] + [None]
    return list(zip(bounds[:-1], bounds[1:]))


_TABLE_BUDGET = 32 << 20
"""Bytes of the lens pass's tables (one per worker block) a chunk may hold: it bounds a chunk's steps."""


def _table_bytes(p: LensParams, objs: Sequence[str]) -> int:
    """Bytes per step of one block's table and sums (:func:`rldiag.stats.lens_kernel.lens_pass`)."""
    n_r, n_w = len(_ratio_edges(p, objs)), len(_w_edges(p, objs))
    return 8 * (3 * (2 * n_r + 1) * (2 * n_w + 2) * len(K.TABLE_SUMS) + len(K.ACC_SUMS))


def _steps_in_chunks(
    counts: pl.DataFrame, max_rows: int, max_steps: int | None = None, first_rows: int | None = None
) -> list[list[int]]:
    """Consecutive steps in chunks of at most ``max_rows`` rows (``first_rows`` for the first: nothing else runs
    while it is read) and ``max_steps`` steps; a larger step is a chunk of its own."""
    chunks: list[list[int]] = [[]]
    rows = 0
    for step, n in counts.iter_rows():
        limit = max_rows if first_rows is None or len(chunks) > 1 else first_rows
        if chunks[-1] and (rows + n > limit or (max_steps is not None and len(chunks[-1]) >= max_steps)):
            chunks.append([])
            rows = 0
        chunks[-1].append(int(step))
        rows += n
    return [c for c in chunks if c]


_STREAMING: dict[str, Any] = {"engine": "streaming"}

MIN_CHUNK_ROWS = 500_000
"""Smallest default chunk: the memory a call first touches (page faults) grows with the chunks in flight."""

MAX_CHUNK_ROWS = 2_000_000
"""Largest default chunk. A chunk's step filter reads whole Parquet row groups (the recorder's hold about 1 M
rows): a row group that two chunks share is read twice, so small chunks read a long run up to twice over."""

_LANES = 2
"""Chunks reduced at once (each by a thread that hands its pieces to the workers); one more is being read."""


def _resolve(
    run_or_frame: Any, params: LensParams | Mapping[str, Any] | None
) -> tuple[pl.LazyFrame, LensParams, float]:
    """(token rows, parameters, logp tolerance) from a Run (its config) or a frame (the defaults)."""
    tol = RecorderConfig().logp_tolerance
    base = LensParams()
    if isinstance(run_or_frame, pl.DataFrame):
        lf = run_or_frame.lazy()
    elif isinstance(run_or_frame, pl.LazyFrame):
        lf = run_or_frame
    elif hasattr(run_or_frame, "tokens"):
        lf = run_or_frame.tokens()
        config = getattr(run_or_frame, "config", None)
        base = LensParams.from_config(config)
        tol = float(getattr(config, "logp_tolerance", tol))
    else:
        raise TypeError(f"lens() takes a Run, a polars LazyFrame or DataFrame, not {type(run_or_frame).__name__}")
    if params is None:
        return lf, base, tol
    return lf, base.replace(params) if isinstance(params, Mapping) else params, tol


def lens(
    run_or_frame: Any,
    objectives: Iterable[str] | None = None,
    steps: Sequence[int] | None = None,
    params: LensParams | Mapping[str, Any] | None = None,
    *,
    chunk_rows: int | None = None,
    threads: int | None = None,
) -> pl.DataFrame:
    """Evaluate the objectives of docs/metrics.md, analyses on a run's token rows, per step.

    ``run_or_frame`` is a :class:`rldiag.analysis.io.Run` (its config sets the PPO, dual-clip, CISPO and TIS/MIS
    parameters, see :meth:`LensParams.from_config`), or token rows as a polars LazyFrame or DataFrame with the
    columns of :mod:`rldiag.schema`: ``step``, ``logp``, ``old_logp`` and ``adv`` are required, ``seq`` is needed
    for GSPO and CTPO, ``pos`` for CTPO and ``rollout_logp`` for TIS/MIS (their columns are NaN without).
    ``params`` is a :class:`LensParams` or a dict of overrides (``{"dapo": {"eps_high": 0.3}}``).

    The steps are processed in chunks of whole steps of at most ``chunk_rows`` token rows (default: a tenth of
    the rows to read, between :data:`MIN_CHUNK_ROWS` and :data:`MAX_CHUNK_ROWS`; a quarter of that for the first
    chunk, which nothing overlaps; a larger step is a chunk of its own; a run's per-step row counts come from
    its statistics, a frame's from a pass over ``step``): only the columns the lens needs (:func:`read_columns`)
    are read, with a step filter that reaches the Parquet scan, and reduced by the compiled passes of
    :mod:`rldiag.stats.lens_kernel`, by ``threads`` workers (default: one per core, at most 8), so memory is
    bounded by the chunks in flight (three), not the run. Returns ``step`` and :func:`columns`, one row per step.
    """
    objs = _check_objectives(objectives)
    lf, params, tol = _resolve(run_or_frame, params)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    shape = _columns_of(lf)
    wanted = None if steps is None else sorted({int(s) for s in steps})
    counts = _stored_counts(run_or_frame, wanted)
    if counts is None:  # token rows of a frame: one pass over the step column
        some = lf if wanted is None else lf.filter(pl.col(schema.STEP).is_in(wanted))
        counts = some.group_by(schema.STEP).agg(pl.len().cast(pl.Int64)).sort(schema.STEP).collect(**_STREAMING)
    from rldiag.analysis.recompute import default_threads

    workers = max(1, threads or default_threads())
    lanes = min(_LANES, workers)
    # each worker block of a chunk holds a dense table of sums per step: few steps per chunk when steps are small
    blocks = (2 * workers if workers > 1 else 1) * lanes
    max_steps = max(1, _TABLE_BUDGET // (_table_bytes(params, objs) * blocks))
    if chunk_rows is None:
        total = int(counts["len"].sum()) if counts.height else 0
        chunk_rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, total // 10))
    chunks = _steps_in_chunks(counts, chunk_rows, max_steps, first_rows=max(1, chunk_rows // 4))
    if wanted is None:
        filters = [step_between(lo, hi) for lo, hi in _step_ranges(chunks)]
    else:
        # chosen steps are read by value (a scan skips the row groups between them); any the counts missed too
        missing = sorted(set(wanted) - {s for c in chunks for s in c})
        chunks += [missing[i : i + max_steps] for i in range(0, len(missing), max_steps)]
        filters = [pl.col(schema.STEP).is_in(c) for c in chunks]
    cols = shape.read_columns(objs)
    plan = _plan(objs, params, shape, tol)

    def read(where: pl.Expr) -> pl.DataFrame:
        # polars' streaming engine: 7-12% less CPU than the default engine on a 50 M-row run, rows in order
        return lf.filter(where).select(cols).collect(**_STREAMING)

    # A chunk is read (polars' reader runs on its own threads) while the chunks before it are reduced. Each chunk
    # is reduced by a thread of its own that hands pieces of its rows to the workers, so that the Python work
    # around one chunk's passes (conversion, the tables' sums, the frame) overlaps the next chunk's passes. At
    # most two chunks are being reduced and one read: memory is bounded by three chunks.
    spare: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
    for _ in range(lanes):
        spare.put(_Buffers())

    def reduce(frame: pl.DataFrame) -> dict[str, np.ndarray]:
        buffers = spare.get()  # one set per chunk being reduced, reused by the chunks after it
        try:
            return _lens_rows(frame, plan, pool if workers > 1 else None, workers, buffers=buffers)
        finally:
            spare.put(buffers)

    jobs: list[Future[dict[str, np.ndarray]]] = []
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=lanes) as chunker,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        nxt = reader.submit(read, filters[0]) if filters else None
        for k in range(len(filters)):
            assert nxt is not None
            frame = nxt.result()
            jobs.append(chunker.submit(reduce, frame))
            del frame
            if k + 1 < len(filters):
                if k >= lanes:
                    jobs[k - lanes].result()
                nxt = reader.submit(read, filters[k + 1])
        parts = [p for p in (j.result() for j in jobs) if p and p[schema.STEP].size]
    if not parts:
        return pl.DataFrame(schema={schema.STEP: pl.Int64, **{c: _F64 for c in columns(objs)}})
    names = [schema.STEP, *columns(objs)]
    out = pl.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in names})
    return out.sort(schema.STEP) if len(parts) > 1 else out


class _Buffers:
    """Arrays that one chunk's reduction uses, kept for the next chunk: a fresh array of tens of MB costs a page
    fault per 4 KiB page the first time it is written (about 1 us each here), and the allocator gives such arrays
    back to the system when they are freed."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: Any) -> np.ndarray:
        """An array of ``n`` elements of ``dtype`` (contents undefined), reused while large enough."""
        have = self._arrays.get(name)
        if have is None or have.dtype != dtype or have.size < n:
            have = np.empty(max(n, int(1.25 * have.size) if have is not None else n), dtype=dtype)
            self._arrays[name] = have
        return have[:n]


def _numpy(col: pl.Series, name: str, buffers: _Buffers | None) -> np.ndarray:
    """A column without nulls as one contiguous numpy array: a view of a column of one chunk, else its chunks
    copied into ``buffers`` (a new array without them)."""
    if col.n_chunks() == 1 or buffers is None:
        return np.ascontiguousarray(col.to_numpy())
    parts = [c.to_numpy() for c in col.get_chunks()]
    out = buffers.get(name, len(col), parts[0].dtype)
    k = 0
    for a in parts:
        out[k : k + a.size] = a
        k += a.size
    return out


def _values(frame: pl.DataFrame, names: Sequence[str], buffers: _Buffers | None = None) -> list[np.ndarray]:
    """Float columns as numpy (nulls as NaN): float32 when all are float32 (the run format), else float64. A
    column of one chunk without nulls is not copied."""
    cols = [frame[c] for c in names]
    dtype = pl.Float32 if all(c.dtype == pl.Float32 for c in cols) else pl.Float64
    out = []
    for name, c in zip(names, cols):
        c = c.cast(dtype)
        if c.null_count():
            c = c.fill_null(float("nan"))
        out.append(_numpy(c, name, buffers))
    return out


def _int_column(frame: pl.DataFrame, name: str, buffers: _Buffers | None = None) -> np.ndarray:
    col = frame[name]
    if col.dtype not in (pl.Int32, pl.Int64):
        col = col.cast(pl.Int64)
    if col.null_count():
        col = col.fill_null(0)
    return _numpy(col, name, buffers)


_BLOCK_ROWS = 1 << 20
"""Rows per piece of a chunk that one worker reduces (the pieces' sums are added)."""


_MIN_BLOCK_ROWS = 1 << 16
"""A chunk is cut into two pieces per worker when each has at least this many rows (the workers stay busy to
the end of a chunk; a piece costs a table of sums per step)."""


def _blocks(n: int, workers: int) -> list[tuple[int, int]]:
    """Row ranges of a chunk of ``n`` rows for ``workers`` threads: about ``_BLOCK_ROWS`` rows each, and two per
    worker when they have at least ``_MIN_BLOCK_ROWS``."""
    k = max(1, min(max(-(-n // _BLOCK_ROWS), n // _MIN_BLOCK_ROWS), 2 * workers)) if workers > 1 else 1
    cuts = [n * j // k for j in range(k + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _sequence_blocks(blocks: list[tuple[int, int]], step: np.ndarray, seq: np.ndarray) -> list[tuple[int, int]]:
    """``blocks`` with each cut moved forward to the next row where (step, seq) changes: no sequence is split."""
    cuts = [0]
    for _, b in blocks[:-1]:
        cuts.append(max(cuts[-1], K.next_sequence_start(step, seq, b)))
    cuts.append(blocks[-1][1])
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _in_order_across(spans: list[np.ndarray]) -> bool:
    """Whether each step's sequences, as the blocks saw them in row order (``span[s]``: seen, first, last id),
    keep increasing from one block to the next."""
    last = np.zeros(spans[0].shape[0], dtype=np.int64)
    seen = np.zeros(spans[0].shape[0], dtype=bool)
    for span in spans:
        here = span[:, 0] == 1
        if np.any(here & seen & (span[:, 1] <= last)):
            return False
        last = np.where(here, span[:, 2], last)
        seen |= here
    return True


def _total(parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


@dataclass(frozen=True)
class _Plan:
    """What every piece's :func:`rldiag.stats.lens_kernel.lens_pass` takes that does not depend on its rows (one
    per :func:`lens` call)."""

    objs: tuple[str, ...]
    params: LensParams
    tol: float
    want: np.ndarray  # lens_kernel's flags for rows without rollout log-probs (W_ROLL off)
    want_roll: np.ndarray  # the same for rows with them: W_ROLL on when TIS or MIS is asked for
    r_edges: tuple[float, ...]
    w_edges: tuple[float, ...]
    re: np.ndarray
    we: np.ndarray
    lut: tuple[np.ndarray, np.ndarray, int, int]
    r_padded: np.ndarray
    th: np.ndarray
    seq_args: tuple[float, float, float, float]

    def table_shape(self, n_steps: int) -> tuple[int, ...]:
        return (n_steps, 3, 2 * self.re.size + 1, 2 * self.we.size + 2, len(K.TABLE_SUMS))


def _plan(objs: list[str], params: LensParams, shape: _Shape, tol: float) -> _Plan:
    want = np.zeros(K.N_WANT, dtype=np.bool_)
    want[K.W_DCPO], want[K.W_SAPO] = "dcpo" in objs, "sapo" in objs
    want[K.W_GSPO] = "gspo" in objs and shape.seq
    want[K.W_CTPO] = "ctpo" in objs and shape.seq and shape.pos
    r_edges, w_edges = _ratio_edges(params, objs), _w_edges(params, objs)
    re, we = np.array(r_edges, dtype=np.float64), np.array(w_edges, dtype=np.float64)
    lut = K.bucket_lut(re)
    want[K.W_LUT] = lut is not None
    want_roll = want.copy()
    want_roll[K.W_ROLL] = "tis" in objs or "mis" in objs
    g = params.gspo
    return _Plan(
        tuple(objs),
        params,
        tol,
        want,
        want_roll,
        tuple(r_edges),
        tuple(w_edges),
        re,
        we,
        lut if lut is not None else (np.zeros(1, np.int64), np.zeros(1), 0, 0),
        K.padded(re),
        _thresholds(params, tol),
        (_lo(g.eps_low), _hi(g.eps_high), params.ctpo.low, params.ctpo.high),
    )


_Pass = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]
"""One piece's :func:`rldiag.stats.lens_kernel.lens_pass` results: table, acc, gacc, cacc, span, in order."""


def _piece_pass(
    plan: _Plan,
    step: np.ndarray,
    steps: np.ndarray,
    lp: np.ndarray,
    olp: np.ndarray,
    adv: np.ndarray,
    roll: np.ndarray | None,
    seq: np.ndarray,
    pos: np.ndarray,
    r_out: np.ndarray,
) -> _Pass:
    """:func:`rldiag.stats.lens_kernel.lens_pass` over one piece of rows for the steps ``steps`` (sorted), with
    fresh sums; ``roll`` None when the rows have no rollout log-probs."""
    n_steps = steps.size
    table, acc = np.zeros(plan.table_shape(n_steps)), np.zeros((n_steps, len(K.ACC_SUMS)))
    gacc, cacc, span = np.zeros((n_steps, 6)), np.zeros((n_steps, 5)), np.zeros((n_steps, 3), np.int64)
    want = plan.want if roll is None else plan.want_roll
    if roll is None:
        roll = lp[:0]
    counts, edge, base, shift = plan.lut
    ok = K.lens_pass(
        step,
        steps,
        lp,
        olp,
        adv,
        roll,
        seq,
        pos,
        want,
        plan.tol,
        plan.th,
        counts,
        edge,
        base,
        shift,
        plan.r_padded,
        plan.re.size,
        plan.we,
        *plan.seq_args,
        table,
        acc,
        gacc,
        cacc,
        r_out,
        span,
    )
    return table, acc, gacc, cacc, span, bool(ok)


def _finish(
    plan: _Plan,
    steps: np.ndarray,
    table_sums: np.ndarray,
    acc: np.ndarray,
    gacc: np.ndarray,
    cacc: np.ndarray,
    ttb: Any,
) -> dict[str, np.ndarray]:
    """:func:`lens`'s columns (``step`` and :func:`columns`) of ``steps`` from their summed pass results;
    ``ttb(ess)`` gives Trust the Batch's sums ``[step, 5]`` once the steps' ESS is known (its pass over the rows)."""
    objs, params = plan.objs, plan.params
    want_gspo, want_ctpo = bool(plan.want[K.W_GSPO]), bool(plan.want[K.W_CTPO])
    table = _Table(table_sums, plan.r_edges, plan.w_edges)
    by_r = table.sums.sum(axis=3)  # [step, side + 1, r bucket, TABLE_SUMS]
    sums: dict[str, np.ndarray] = {
        schema.STEP: steps,
        "n": by_r[..., 0].sum(axis=(1, 2)),
        "aadv": by_r[..., 3].sum(axis=(1, 2)),
        "sr": by_r[..., 1].sum(axis=(1, 2)),
        "sr2": acc[:, 0],
    }
    present = sums["n"] > 0  # steps without a valid token have no row
    sums.update(_table_sums(table, params, objs))
    if "dcpo" in objs:
        sums.update({name: acc[:, j] for j, name in enumerate(K.ACC_SUMS) if name.startswith("dcpo.")})
    if "sapo" in objs:
        sums.update({name: acc[:, j] for j, name in enumerate(K.ACC_SUMS) if name.startswith("sapo.")})
        sums["sapo.kept"], sums["sapo.kadv"] = sums["n"], sums["aadv"]
    if "ttb" in objs:
        ess = K.ess_of(sums["sr"], sums["sr2"], sums["n"])
        tacc = ttb(ess)
        for j, q in enumerate(K.SUMS[:5]):
            sums[f"ttb.{q}"] = tacc[:, j]
        sums["ess"] = ess
    if want_gspo or want_ctpo:
        for j, q in enumerate(K.SUMS[:5]):
            sums[f"gspo.{q}"], sums[f"ctpo.{q}"] = gacc[:, j], cacc[:, j]
    if "bapo" in objs:
        sums.update(_bapo_choose(by_r[..., :4], params.bapo, plan.re))
    per_step = {name: v[present] for name, v in sums.items()}

    out: dict[str, np.ndarray] = {schema.STEP: per_step[schema.STEP].astype(np.int64)}
    for o in objs:
        if (o == "gspo" and not want_gspo) or (o == "ctpo" and not want_ctpo):
            out.update({column(o, q): np.full(out[schema.STEP].size, np.nan) for q in QUANTITIES})
        else:
            out.update(_finalize(o, per_step))
        if o == "bapo":
            out.update({column("bapo", q): per_step[column("bapo", q)] for q in EXTRA_COLUMNS["bapo"]})
        if o == "ttb":
            out[column("ttb", "ess")] = per_step["ess"]
            out[column("ttb", "reg_weight")] = 1.0 - per_step["ess"]
    return out


def _lens_rows(
    frame: pl.DataFrame,
    plan: _Plan,
    pool: ThreadPoolExecutor | None = None,
    workers: int = 1,
    buffers: _Buffers | None = None,
) -> dict[str, np.ndarray]:
    """:func:`lens`'s columns (``step`` and :func:`columns`, as numpy arrays; {} without rows) on the token rows of
    the whole steps in ``frame``. One fused pass per piece of the rows (:func:`_piece_pass`; pieces cut between
    sequences, run in ``pool``), then Trust the Batch's pass over the same pieces once the steps' ESS is known."""
    if frame.height == 0:
        return {}
    step = _int_column(frame, schema.STEP, buffers).astype(np.int64, copy=False)
    steps = np.unique(K.step_runs(step))
    n_steps = steps.size
    # a run that recorded no rollout log-probs has the column, all null: its weights would all be NaN
    has_roll = schema.ROLLOUT_LOGP in frame.columns and frame[schema.ROLLOUT_LOGP].null_count() < frame.height
    names = [schema.LOGP, schema.OLD_LOGP, schema.ADV] + ([schema.ROLLOUT_LOGP] if has_roll else [])
    vals = _values(frame, names, buffers)
    lp, olp, adv = vals[:3]
    roll = vals[3] if has_roll else None
    want_gspo, want_ctpo = bool(plan.want[K.W_GSPO]), bool(plan.want[K.W_CTPO])
    if want_gspo or want_ctpo:
        seq = _int_column(frame, schema.SEQ, buffers)
        pos = _int_column(frame, schema.POS, buffers) if want_ctpo else np.zeros(frame.height, dtype=np.int32)
    else:
        seq, pos = np.zeros(0, np.int64), np.zeros(0, np.int32)
    r = np.empty(frame.height) if buffers is None else buffers.get("r", frame.height, np.float64)
    blocks = _blocks(frame.height, workers if pool is not None else 1)
    if want_gspo or want_ctpo:
        blocks = _sequence_blocks(blocks, step, seq)

    def run(fn: Any, *args: Any) -> Future[Any]:
        if pool is None:
            done: Future[Any] = Future()
            done.set_result(fn(*args))
            return done
        return pool.submit(fn, *args)

    def block(a: int, b: int) -> _Pass:
        return _piece_pass(
            plan,
            step[a:b],
            steps,
            lp[a:b],
            olp[a:b],
            adv[a:b],
            None if roll is None else roll[a:b],
            seq[a:b] if seq.size else seq,
            pos[a:b] if pos.size else pos,
            r[a:b],
        )

    done = [j.result() for j in [run(block, a, b) for a, b in blocks]]
    acc = _total([d[1] for d in done])
    if want_gspo or want_ctpo:
        if all(d[5] for d in done) and _in_order_across([d[4] for d in done]):
            gacc, cacc = _total([d[2] for d in done]), _total([d[3] for d in done])
        else:  # not in the recorder's order (shuffled, sequences interleaved): by (step, seq, pos) instead
            order = np.lexsort((pos, seq, step))
            gacc, cacc = np.zeros((n_steps, 6)), np.zeros((n_steps, 5))
            K.sequence_pass(
                step, steps, seq, pos, lp, olp, adv, plan.tol, order, want_gspo, want_ctpo, *plan.seq_args, gacc, cacc
            )
    else:
        gacc, cacc = np.zeros((n_steps, 6)), np.zeros((n_steps, 5))

    def ttb(ess: np.ndarray) -> np.ndarray:
        def ttb_block(a: int, b: int) -> np.ndarray:
            tacc = np.zeros((n_steps, 5))
            K.ttb_pass(step[a:b], steps, adv[a:b], r[a:b], ess, tacc)
            return tacc

        return _total([j.result() for j in [run(ttb_block, a, b) for a, b in blocks]])

    return _finish(plan, steps, _total([d[0] for d in done]), acc, gacc, cacc, ttb)
