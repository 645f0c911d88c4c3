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

The whole computation is a handful of streaming polars passes over the token rows; nothing per token is ever
materialized, so a 50 M-row run is analysed in bounded memory (see ``benchmarks/bench_lens.py``)::

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.metrics.registry import LENS_EXTRA, LENS_OBJECTIVES, LENS_QUANTITIES
from rldiag.stats.definitions import batch_ess, ctpo_clipped, token_valid

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
# Pass 1 (one streaming group-by) reduces the tokens to an exact table of sums keyed by (step, sign of A,
# bucket of r among every ratio bound any objective uses, bucket of the mismatch weight w, DCPO's per-token
# verdict). Every clip-style objective (PPO, DAPO, dual-clip, DCPO, CISPO, TIS, MIS and each point of BAPO's
# search) is then a filtered sum over that small table. Pass 2 groups by sequence for GSPO and CTPO (CTPO's
# cumulative log-ratio comes from a segmented cumulative sum in row order). Pass 3 joins the step's ESS back for
# Trust the Batch. The passes run per chunk of whole steps, so memory is bounded by the chunk, not the run.

_R, _LR, _ADV, _AA, _W, _L = "_r", "_lr", "_adv", "_aa", "_w", "_L"
_START, _ORDER_OK = "_start", "_order_ok"
_F64 = pl.Float64
_SEQ_KEYS = (schema.STEP, schema.SEQ)  # the run format: seq is unique within a step
_ALL = pl.col("n").is_not_null()  # a per-row True (pl.lit(True) is one scalar inside a group)
_SIDE = pl.col(_ADV).sign().cast(pl.Int8).alias("side")
_POS_SIDE = pl.col("side") == 1


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


def _ratio_edges(p: LensParams, objs: Sequence[str]) -> list[float]:
    """Every ratio bound the requested objectives compare r with."""
    edges = {1.0}
    for o in ("ppo", "dapo", "dual_clip", "tis", "mis"):
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


def _w_edges(p: LensParams) -> list[float]:
    return sorted({1.0 / p.mis.cap, p.mis.cap, p.tis.cap})


def _bucket(x: pl.Expr, edges: Sequence[float]) -> pl.Expr:
    """2 * #(edges < x) + [x is an edge]: exact for both strict and non-strict comparisons (see :class:`_Cut`).

    Plain comparisons: ``search_sorted`` against a literal Series is not streamed (its memory grows with the
    run), and ``cut`` numbers categories through a string cache.
    """
    below = pl.sum_horizontal([(x > e).cast(pl.Int32) for e in edges])
    return 2 * below + x.is_in(list(edges)).cast(pl.Int32)


@dataclass(frozen=True)
class _Cut:
    """Comparisons of a token value with one of ``edges``, read from its :func:`_bucket` column."""

    column: str
    edges: tuple[float, ...]

    def le(self, e: float) -> pl.Expr:
        return pl.col(self.column) <= 2 * self.edges.index(e) + 1

    def ge(self, e: float) -> pl.Expr:
        return pl.col(self.column) >= 2 * self.edges.index(e) + 1


def _dcpo_kept(p: DCPOParams) -> pl.Expr:
    r, adv = pl.col(_R), pl.col(_ADV)
    q = pl.col(schema.OLD_LOGP).cast(_F64).exp()
    lo = 0.5 + 0.5 * (1.0 - 4.0 * p.eps_low / q).clip(lower_bound=0.0).sqrt()
    hi = 0.5 + 0.5 * (1.0 + 4.0 * p.eps_high / q).sqrt()
    return ~(((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo)))


def _sapo_weight(p: SAPOParams) -> pl.Expr:
    """4 s (1-s) gates grad r = r grad log pi, so the weight on A grad log pi is 4 s (1-s) r."""
    r = pl.col(_R)
    tau = pl.when(pl.col(_ADV) > 0).then(p.tau_pos).otherwise(p.tau_neg)
    s = 1.0 / (1.0 + (-tau * (r - 1.0)).exp())
    return 4.0 * s * (1.0 - s) * r


def _ratio_table(tok: pl.LazyFrame, p: LensParams, objs: Sequence[str]) -> pl.LazyFrame:
    """Pass 1: sums per (step, side, rb[, wb][, dk]); the columns every token-level objective reads."""
    r, aa = pl.col(_R), pl.col(_AA)
    keys: list[pl.Expr] = [pl.col(schema.STEP), _SIDE, _bucket(r, _ratio_edges(p, objs)).alias("rb")]
    aggs = [
        pl.len().cast(_F64).alias("n"),
        r.sum().alias("r"),
        (r * aa).sum().alias("ra"),
        aa.sum().alias("a"),
        (r * r).sum().alias("r2"),
    ]
    if "dcpo" in objs:
        keys.append(_dcpo_kept(p.dcpo).alias("dk"))
    if "tis" in objs or "mis" in objs:
        w = pl.col(_W)
        keys.append(pl.when(w.is_not_nan()).then(_bucket(w, _w_edges(p))).alias("wb"))
        aggs += [(r * w).sum().alias("rw"), (r * w * aa).sum().alias("rwa")]
    if "sapo" in objs:
        sw = _sapo_weight(p.sapo)
        aggs += [sw.sum().alias("sw"), (sw * aa).sum().alias("swa")]
    return tok.group_by(keys).agg(aggs)


def _sums(obj: str, kept: pl.Expr, w: pl.Expr, wa: pl.Expr, valid: pl.Expr | None = None) -> list[pl.Expr]:
    """An objective's sums over table rows (each row a group of tokens): kept count, weight, positive and total
    gradient mass, kept advantage mass; with ``valid``, its own token count and advantage mass too."""
    if valid is not None:
        kept = kept & valid
    out = [
        pl.col("n").filter(kept).sum().alias(f"{obj}.kept"),
        w.filter(kept).sum().alias(f"{obj}.w"),
        wa.filter(kept & _POS_SIDE).sum().alias(f"{obj}.pos"),
        wa.filter(kept).sum().alias(f"{obj}.abs"),
        pl.col("a").filter(kept).sum().alias(f"{obj}.kadv"),
    ]
    if valid is not None:
        out += [pl.col("n").filter(valid).sum().alias(f"{obj}.n"), pl.col("a").filter(valid).sum().alias(f"{obj}.aadv")]
    return out


def _clip_kept(R: _Cut, lo: float, hi: float, c: float | None = None) -> pl.Expr:
    """Sign-aware PPO clip on table rows: A > 0 keeps r <= hi, A < 0 keeps r >= lo (and r <= c: dual clip)."""
    side = pl.col("side")
    neg = R.ge(lo) if c is None else R.ge(lo) & R.le(c)
    return (side == 0) | ((side == 1) & R.le(hi)) | ((side == -1) & neg)


def _table_sums(obj: str, p: LensParams, R: _Cut, W: _Cut | None) -> list[pl.Expr]:
    """Sums of one token-level objective from the pass-1 table."""
    r, ra, n, a = pl.col("r"), pl.col("ra"), pl.col("n"), pl.col("a")
    if obj in ("ppo", "dapo"):
        cp: ClipParams = getattr(p, obj)
        return _sums(obj, _clip_kept(R, _lo(cp.eps_low), _hi(cp.eps_high)), r, ra)
    if obj == "dual_clip":
        d = p.dual_clip
        return _sums(obj, _clip_kept(R, _lo(d.eps_low), _hi(d.eps_high), d.c), r, ra)
    if obj == "dcpo":
        return _sums(obj, pl.col("dk"), r, ra)
    if obj == "cispo":
        C = _hi(p.cispo.eps_high)
        below = R.le(C)
        return _sums(obj, _ALL, pl.when(below).then(r).otherwise(C * n), pl.when(below).then(ra).otherwise(C * a))
    if obj == "sapo":
        return _sums(obj, _ALL, pl.col("sw"), pl.col("swa"))
    assert W is not None
    ip: ISParams = getattr(p, obj)
    kept, valid = _clip_kept(R, _lo(ip.eps_low), _hi(ip.eps_high)), pl.col("wb").is_not_null()
    if obj == "tis":
        below = W.le(ip.cap)  # min(w, C) r: w r below the cap, C r above it
        return _sums(
            obj,
            kept,
            pl.when(below).then(pl.col("rw")).otherwise(ip.cap * r),
            pl.when(below).then(pl.col("rwa")).otherwise(ip.cap * ra),
            valid,
        )
    if obj == "mis":
        kept = kept & W.ge(1.0 / ip.cap) & W.le(ip.cap)
        return _sums(obj, kept, pl.col("rw"), pl.col("rwa"), valid)
    raise AssertionError(obj)  # pragma: no cover


def _bapo_choose(table: pl.DataFrame, p: BAPOParams, R: _Cut) -> pl.DataFrame:
    """Walk BAPO's search path per step; returns step, the chosen point's sums (``bapo.*``) and its bounds."""
    path = _bapo_path(p)
    side, ra = pl.col("side"), pl.col("ra")
    aggs = []
    for k, (lo, hi) in enumerate(path):
        aggs += _sums(f"bapo{k}", _clip_kept(R, lo, hi), pl.col("r"), ra)
        aggs.append(ra.filter((side == -1) & R.ge(lo)).sum().alias(f"bapo{k}.neg"))
    per = table.group_by(schema.STEP).agg(aggs).sort(schema.STEP)
    pos = np.column_stack([per[f"bapo{k}.pos"].to_numpy() for k in range(len(path))])
    neg = np.column_stack([per[f"bapo{k}.neg"].to_numpy() for k in range(len(path))])
    met = (neg == 0.0) | (pos >= p.target * neg)
    saturated = ~met.any(axis=1)
    choice = np.where(saturated, len(path) - 1, met.argmax(axis=1))
    rows = np.arange(per.height)
    out: dict[str, Any] = {schema.STEP: per[schema.STEP]}
    for q in ("kept", "w", "pos", "abs", "kadv"):
        cols = np.column_stack([per[f"bapo{k}.{q}"].to_numpy() for k in range(len(path))])
        out[f"bapo.{q}"] = cols[rows, choice]
    out[column("bapo", "clip_low")] = np.array([path[c][0] for c in choice], dtype=float)
    out[column("bapo", "clip_high")] = np.array([path[c][1] for c in choice], dtype=float)
    out[column("bapo", "saturated")] = saturated.astype(float)
    return pl.DataFrame(out)


# --- pass 2: sequences (GSPO, CTPO) -----------------------------------------------------------------------------


def _with_ordered_cumsum(lf: pl.LazyFrame, seq_keys: list[str]) -> pl.LazyFrame:
    """CTPO's L_t by a segmented cumulative sum in row order: one streaming pass, no window or sort.

    Exact when the rows of each sequence are contiguous and in increasing ``pos`` (the recorder writes them
    so). ``_start`` marks segment starts and ``_order_ok`` is false on a row whose ``pos`` does not increase;
    :func:`lens` counts both per step and recomputes a step by window where the fast path was not exact.
    """
    changed = pl.lit(False)
    for k in seq_keys:
        changed = changed | (pl.col(k) != pl.col(k).shift(1)).fill_null(True)
    csum = pl.col(_LR).cum_sum()
    offset = pl.when(changed).then(csum - pl.col(_LR)).otherwise(None).forward_fill()
    pos = pl.col(schema.POS)
    order_ok = changed | (pos > pos.shift(1))
    return lf.with_columns((csum - offset).alias(_L), changed.alias(_START), order_ok.alias(_ORDER_OK))


def _with_window_cumsum(lf: pl.LazyFrame, seq_keys: list[str]) -> pl.LazyFrame:
    """L_t by a window per sequence sorted by ``pos`` (holds the rows of the steps it is given in memory)."""
    pos = pl.col(schema.POS)
    return lf.with_columns(
        pl.col(_LR).cum_sum().over(seq_keys, order_by=schema.POS).alias(_L),
        (pl.int_range(pl.len()).over(seq_keys) == 0).alias(_START),
        pos.is_not_null().alias(_ORDER_OK),
    )


def _sequence_table(tok: pl.LazyFrame, seq_keys: list[str], p: LensParams, ctpo: str | None) -> pl.LazyFrame:
    """Pass 2: sums per (sequence, side[, CTPO verdict]); ``ctpo`` is None, "ordered" or "window"."""
    aa = pl.col(_AA)
    keys: list[Any] = [*seq_keys, _SIDE]
    aggs = [pl.len().cast(_F64).alias("n"), aa.sum().alias("a"), pl.col(_LR).sum().alias("lr")]
    lf = tok
    if ctpo is not None:
        lf = _with_ordered_cumsum(tok, seq_keys) if ctpo == "ordered" else _with_window_cumsum(tok, seq_keys)
        adv, L = pl.col(_ADV), pl.col(_L)
        bound = (pl.col(schema.POS).cast(_F64) + 1.0).sqrt()
        kept = ~ctpo_clipped(L, adv, bound, p.ctpo.low, p.ctpo.high)
        keys.append(kept.alias("ck"))
        aggs += [
            L.exp().sum().alias("eL"),
            (L.exp() * aa).sum().alias("eLa"),
            pl.col(_START).sum().alias("starts"),
            (~pl.col(_ORDER_OK)).sum().alias("bad"),
        ]
    return lf.group_by(keys).agg(aggs)


def _gspo_sums(table: pl.DataFrame, seq_keys: list[str], p: GSPOParams) -> pl.DataFrame:
    """GSPO per step from the sequence table: s_i = exp(mean lr), A_i = mean adv, all tokens of a clipped
    sequence dropped; s_i > 0, so max(s_i A_t, 0) = s_i max(A_t, 0)."""
    a, side = pl.col("a"), pl.col("side")
    per_seq = table.group_by(seq_keys).agg(
        pl.col("n").sum(),
        pl.col("lr").sum(),
        (side.cast(_F64) * a).sum().alias("sadv"),
        a.filter(side == 1).sum().alias("padv"),
        a.sum(),
    )
    s = (pl.col("lr") / pl.col("n")).exp()
    a_mean = pl.col("sadv") / pl.col("n")
    kept = ~(((s > _hi(p.eps_high)) & (a_mean > 0)) | ((s < _lo(p.eps_low)) & (a_mean < 0)))
    k = kept.cast(_F64)
    return per_seq.group_by(schema.STEP).agg(
        (k * pl.col("n")).sum().alias("gspo.kept"),
        (k * pl.col("n") * s).sum().alias("gspo.w"),
        (k * s * pl.col("padv")).sum().alias("gspo.pos"),
        (k * s * a).sum().alias("gspo.abs"),
        (k * a).sum().alias("gspo.kadv"),
        pl.len().alias("n_seqs"),
    )


def _ctpo_sums(table: pl.DataFrame) -> pl.DataFrame:
    aggs = _sums("ctpo", pl.col("ck"), pl.col("eL"), pl.col("eLa"))
    aggs += [pl.col("starts").sum().alias("ctpo.starts"), pl.col("bad").sum().alias("ctpo.bad")]
    return table.group_by(schema.STEP).agg(aggs)


# --- pass 3: Trust the Batch ------------------------------------------------------------------------------------


def _ttb_sums(tok: pl.LazyFrame, ess: pl.DataFrame) -> pl.LazyFrame:
    """Trust the Batch: weight min(r, ESS_step) on every token (the ESS comes from pass 1)."""
    tw = pl.col(_R).clip(upper_bound=pl.col("_ess"))
    per_side = (
        tok.join(ess.lazy().select(schema.STEP, pl.col("ess").alias("_ess")), on=schema.STEP, how="inner")
        .group_by(schema.STEP, _SIDE)
        .agg(
            pl.len().cast(_F64).alias("n"),
            tw.sum().alias("w"),
            (tw * pl.col(_AA)).sum().alias("wa"),
            pl.col(_AA).sum().alias("a"),
        )
    )
    return per_side.group_by(schema.STEP).agg(_sums("ttb", _ALL, pl.col("w"), pl.col("wa")))


# --- the edge ---------------------------------------------------------------------------------------------------


def _check_objectives(objectives: Iterable[str] | None) -> list[str]:
    if objectives is None:
        return list(OBJECTIVES)
    objs = [objectives] if isinstance(objectives, str) else list(objectives)
    bad = [o for o in objs if o not in OBJECTIVES]
    if bad:
        raise ValueError(f"unknown objective(s) {', '.join(map(repr, bad))}; choose from {', '.join(OBJECTIVES)}")
    return [o for o in OBJECTIVES if o in objs]


def _columns_of(lf: pl.LazyFrame) -> tuple[list[str], bool, bool]:
    """Checks the required columns; returns (sequence keys present, has ``pos``, has ``rollout_logp``)."""
    names = lf.collect_schema().names()
    missing = [c for c in (schema.STEP, schema.LOGP, schema.OLD_LOGP, schema.ADV) if c not in names]
    if missing:
        raise ValueError(f"token rows lack required column(s) {', '.join(missing)} (see rldiag.schema)")
    seq_keys = [k for k in _SEQ_KEYS if k in names] if schema.SEQ in names else []
    return seq_keys, schema.POS in names, schema.ROLLOUT_LOGP in names


def _prepare(lf: pl.LazyFrame, seq_keys: list[str], has_pos: bool, has_rollout: bool, tol: float) -> pl.LazyFrame:
    """Valid tokens with the derived columns every pass uses (float64 throughout).

    Like the recorder's statistics, tokens with a non-finite logp, old_logp or adv, or a log-prob above ``tol``
    (the run's ``logp_tolerance``), are left out.
    """
    if not has_rollout:
        lf = lf.with_columns(pl.lit(None, dtype=pl.Float32).alias(schema.ROLLOUT_LOGP))
    keep = list(
        dict.fromkeys(
            [
                *seq_keys,
                schema.STEP,
                *([schema.POS] if has_pos else []),
                schema.LOGP,
                schema.OLD_LOGP,
                schema.ADV,
                schema.ROLLOUT_LOGP,
            ]
        )
    )
    lp, olp = pl.col(schema.LOGP).cast(_F64), pl.col(schema.OLD_LOGP).cast(_F64)
    adv = pl.col(schema.ADV).cast(_F64)
    return (
        lf.select(keep)
        .filter(token_valid(lp, olp, adv, tol))
        .with_columns(
            (lp - olp).alias(_LR),
            adv.alias(_ADV),
            adv.abs().alias(_AA),
            (olp - pl.col(schema.ROLLOUT_LOGP).cast(_F64)).exp().alias(_W),
        )
        .with_columns(pl.col(_LR).exp().alias(_R))
    )


def _finalize(obj: str, frame: pl.DataFrame) -> list[pl.Expr]:
    """Public quantities of one objective from its sums (and the step's ``n``/``aadv`` unless it has its own);
    NaN where a denominator is 0."""
    n = pl.col(f"{obj}.n") if f"{obj}.n" in frame.columns else pl.col("n")
    aadv = pl.col(f"{obj}.aadv") if f"{obj}.aadv" in frame.columns else pl.col("aadv")

    def ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
        return pl.when(den > 0).then(num / den).otherwise(float("nan"))

    return [
        ratio(pl.col(f"{obj}.kept"), n).alias(column(obj, "kept_frac")),
        ratio(pl.col(f"{obj}.w"), n).alias(column(obj, "weight_mean")),
        ratio(pl.col(f"{obj}.pos"), pl.col(f"{obj}.abs")).alias(column(obj, "pos_share")),
        ratio(pl.col(f"{obj}.kadv"), aadv).alias(column(obj, "kept_adv_frac")),
    ]


def _steps_in_chunks(counts: pl.DataFrame, max_rows: int) -> list[list[int]]:
    chunks: list[list[int]] = [[]]
    rows = 0
    for step, n in counts.iter_rows():
        if chunks[-1] and rows + n > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(int(step))
        rows += n
    return [c for c in chunks if c]


_STREAMING: dict[str, Any] = {"engine": "streaming"}
_TOKEN_LEVEL = ("ppo", "dapo", "dual_clip", "dcpo", "cispo", "sapo", "tis", "mis")


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
    chunk_rows: int = 4_000_000,
) -> pl.DataFrame:
    """Evaluate the objectives of docs/metrics.md, analyses on a run's token rows, per step.

    ``run_or_frame`` is a :class:`rldiag.analysis.io.Run` (its config sets the PPO, dual-clip, CISPO and TIS/MIS
    parameters, see :meth:`LensParams.from_config`), or token rows as a polars LazyFrame or DataFrame with the
    columns of :mod:`rldiag.schema`: ``step``, ``logp``, ``old_logp`` and ``adv`` are required, ``seq`` is needed
    for GSPO and CTPO, ``pos`` for CTPO and ``rollout_logp`` for TIS/MIS (their columns are NaN without).
    ``params`` is a :class:`LensParams` or a dict of overrides (``{"dapo": {"eps_high": 0.3}}``).

    The steps are processed in chunks of whole steps of at most ``chunk_rows`` token rows (a larger step is a
    chunk of its own); each chunk is a few streaming queries whose step filter reaches the Parquet scan, so
    memory is bounded by the chunk, not the run. Returns ``step`` and :func:`columns`, one row per step.
    """
    objs = _check_objectives(objectives)
    lf, params, tol = _resolve(run_or_frame, params)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    shape = _columns_of(lf)
    if steps is not None:
        lf = lf.filter(pl.col(schema.STEP).is_in([int(s) for s in steps]))
    counts = lf.group_by(schema.STEP).agg(pl.len().cast(pl.Int64)).sort(schema.STEP).collect(**_STREAMING)
    parts = [
        _lens_chunk(lf.filter(pl.col(schema.STEP).is_in(chunk)), objs, params, shape, tol)
        for chunk in _steps_in_chunks(counts, chunk_rows)
    ]
    parts = [p for p in parts if p.height]
    if not parts:
        return pl.DataFrame(schema={schema.STEP: pl.Int64, **{c: _F64 for c in columns(objs)}})
    return pl.concat(parts).sort(schema.STEP)


def _lens_chunk(
    lf: pl.LazyFrame, objs: list[str], params: LensParams, shape: tuple[list[str], bool, bool], tol: float
) -> pl.DataFrame:
    """:func:`lens` on the token rows of some whole steps."""
    seq_keys, has_pos, has_rollout = shape
    tok = _prepare(lf, seq_keys, has_pos, has_rollout, tol)
    want_gspo = "gspo" in objs and bool(seq_keys)
    want_ctpo = "ctpo" in objs and bool(seq_keys) and has_pos

    table = _ratio_table(tok, params, objs).collect(**_STREAMING)
    R = _Cut("rb", tuple(_ratio_edges(params, objs)))
    W = _Cut("wb", tuple(_w_edges(params)))
    aggs = [
        pl.col("n").sum(),
        pl.col("a").sum().alias("aadv"),
        pl.col("r").sum().alias("sr"),
        pl.col("r2").sum().alias("sr2"),
    ]
    for o in objs:
        if o in _TOKEN_LEVEL:
            aggs += _table_sums(o, params, R, W)
    frame = table.group_by(schema.STEP).agg(aggs).sort(schema.STEP)
    if frame.height == 0:
        return frame

    if want_gspo or want_ctpo:
        seq = _sequence_table(tok, seq_keys, params, "ordered" if want_ctpo else None).collect(**_STREAMING)
        frame = frame.join(_gspo_sums(seq, seq_keys, params.gspo), on=schema.STEP, how="left")
    if want_ctpo:
        frame = frame.join(_ctpo_sums(seq), on=schema.STEP, how="left")
        frame = _repair_ctpo(frame, tok, seq_keys, params)
    if "ttb" in objs:
        ess_expr = batch_ess(pl.col("sr"), pl.col("sr2"), pl.col("n"))
        ess = frame.select(schema.STEP, pl.when(pl.col("sr2") > 0).then(ess_expr).otherwise(float("nan")).alias("ess"))
        frame = frame.join(ess, on=schema.STEP).join(
            _ttb_sums(tok, ess).collect(**_STREAMING), on=schema.STEP, how="left"
        )
    if "bapo" in objs:
        frame = frame.join(_bapo_choose(table, params.bapo, R), on=schema.STEP, how="left")

    out: list[pl.Expr] = [pl.col(schema.STEP).cast(pl.Int64)]
    for o in objs:
        if (o == "gspo" and not want_gspo) or (o == "ctpo" and not want_ctpo):
            out += [pl.lit(float("nan")).alias(column(o, q)) for q in QUANTITIES]
        else:
            out += _finalize(o, frame)
        if o == "bapo":
            out += [pl.col(column("bapo", q)) for q in EXTRA_COLUMNS["bapo"]]
        if o == "ttb":
            out += [pl.col("ess").alias(column("ttb", "ess")), (1.0 - pl.col("ess")).alias(column("ttb", "reg_weight"))]
    return frame.select(out).with_columns(pl.col(_F64).fill_null(float("nan")))


def _repair_ctpo(frame: pl.DataFrame, tok: pl.LazyFrame, seq_keys: list[str], p: LensParams) -> pl.DataFrame:
    """Keep the ordered-cumsum CTPO sums of steps where they were exact; recompute the others by window (in
    memory, but only the rows of this chunk's out-of-order steps)."""
    exact = (pl.col("ctpo.bad") == 0) & (pl.col("ctpo.starts") == pl.col("n_seqs"))
    redo = frame.filter(~exact)[schema.STEP].to_list()
    if not redo:
        return frame
    seq = _sequence_table(tok.filter(pl.col(schema.STEP).is_in(redo)), seq_keys, p, "window").collect()
    return frame.update(_ctpo_sums(seq).drop("ctpo.starts", "ctpo.bad"), on=schema.STEP)
