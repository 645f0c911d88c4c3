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
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
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
# compiled passes of rldiag.stats.lens_kernel to per-step sums: one pass for every token-level objective (PPO,
# DAPO, dual-clip, DCPO, CISPO, SAPO, TIS, MIS, the step's ESS and BAPO's table of sums per (sign of A, ratio
# bucket)), one for GSPO and CTPO (sequences; rows in the recorder's order are read as they are, others through
# their sorted order), and one for Trust the Batch once the step's ESS is known. Every quantity is then a ratio of
# those sums (_finalize); BAPO's search walks its path over the bucket table. Chunks are read and computed by a
# few threads (polars' reader and the compiled passes release the GIL), so memory is bounded by the chunks in
# flight, not the run.


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


def _thresholds(p: LensParams) -> np.ndarray:
    """The bounds the token pass compares with (slots ``TH_*`` of :mod:`rldiag.stats.lens_kernel`)."""
    th = np.zeros(K.N_TH)
    th[K.TH_PPO_LO], th[K.TH_PPO_HI] = _lo(p.ppo.eps_low), _hi(p.ppo.eps_high)
    th[K.TH_DAPO_LO], th[K.TH_DAPO_HI] = _lo(p.dapo.eps_low), _hi(p.dapo.eps_high)
    th[K.TH_DUAL_LO], th[K.TH_DUAL_HI], th[K.TH_DUAL_C] = (
        _lo(p.dual_clip.eps_low),
        _hi(p.dual_clip.eps_high),
        p.dual_clip.c,
    )
    th[K.TH_DCPO_EL4], th[K.TH_DCPO_EH4] = 4.0 * p.dcpo.eps_low, 4.0 * p.dcpo.eps_high
    th[K.TH_CISPO_C] = _hi(p.cispo.eps_high)
    th[K.TH_SAPO_POS], th[K.TH_SAPO_NEG] = p.sapo.tau_pos, p.sapo.tau_neg
    th[K.TH_TIS_LO], th[K.TH_TIS_HI], th[K.TH_TIS_CAP] = _lo(p.tis.eps_low), _hi(p.tis.eps_high), p.tis.cap
    th[K.TH_MIS_LO], th[K.TH_MIS_HI] = _lo(p.mis.eps_low), _hi(p.mis.eps_high)
    th[K.TH_MIS_LOW_W], th[K.TH_MIS_CAP] = 1.0 / p.mis.cap, p.mis.cap
    return th


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
    threads: int | None = None,
) -> pl.DataFrame:
    """Evaluate the objectives of docs/metrics.md, analyses on a run's token rows, per step.

    ``run_or_frame`` is a :class:`rldiag.analysis.io.Run` (its config sets the PPO, dual-clip, CISPO and TIS/MIS
    parameters, see :meth:`LensParams.from_config`), or token rows as a polars LazyFrame or DataFrame with the
    columns of :mod:`rldiag.schema`: ``step``, ``logp``, ``old_logp`` and ``adv`` are required, ``seq`` is needed
    for GSPO and CTPO, ``pos`` for CTPO and ``rollout_logp`` for TIS/MIS (their columns are NaN without).
    ``params`` is a :class:`LensParams` or a dict of overrides (``{"dapo": {"eps_high": 0.3}}``).

    The steps are processed in chunks of whole steps of at most ``chunk_rows`` token rows (a larger step is a
    chunk of its own): only the columns the lens needs (:func:`read_columns`) are read, with a step filter that
    reaches the Parquet scan, and reduced by the compiled passes of :mod:`rldiag.stats.lens_kernel`, by
    ``threads`` workers (default: one per core, at most 8), so memory is bounded by the chunks in flight, not the
    run. Returns ``step`` and :func:`columns`, one row per step.
    """
    objs = _check_objectives(objectives)
    lf, params, tol = _resolve(run_or_frame, params)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    shape = _columns_of(lf)
    if steps is not None:
        lf = lf.filter(pl.col(schema.STEP).is_in([int(s) for s in steps]))
    counts = lf.group_by(schema.STEP).agg(pl.len().cast(pl.Int64)).sort(schema.STEP).collect(**_STREAMING)
    chunks = _steps_in_chunks(counts, chunk_rows)
    cols = shape.read_columns(objs)

    def piece(chunk: list[int]) -> pl.DataFrame:
        frame = lf.filter(pl.col(schema.STEP).is_between(chunk[0], chunk[-1])).select(cols).collect()
        return _lens_rows(frame, np.array(chunk, dtype=np.int64), objs, params, shape, tol)

    from rldiag.analysis.recompute import default_threads

    workers = max(1, min(threads or default_threads(), len(chunks)))
    parts: list[pl.DataFrame] = []
    if workers == 1:
        parts = [piece(c) for c in chunks]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[pl.DataFrame]] = deque()
            for chunk in chunks:
                pending.append(pool.submit(piece, chunk))
                if len(pending) > workers:
                    parts.append(pending.popleft().result())
            parts.extend(f.result() for f in pending)
    parts = [p for p in parts if p.height]
    if not parts:
        return pl.DataFrame(schema={schema.STEP: pl.Int64, **{c: _F64 for c in columns(objs)}})
    return pl.concat(parts).sort(schema.STEP)


def _values(frame: pl.DataFrame, names: Sequence[str]) -> list[np.ndarray]:
    """Float columns as numpy (nulls as NaN): float32 when all are float32 (the run format), else float64."""
    cols = [frame[c] for c in names]
    dtype = pl.Float32 if all(c.dtype == pl.Float32 for c in cols) else pl.Float64
    return [np.ascontiguousarray(c.cast(dtype).fill_null(float("nan")).to_numpy()) for c in cols]


def _int_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    col = frame[name]
    if col.dtype not in (pl.Int32, pl.Int64):
        col = col.cast(pl.Int64)
    return np.ascontiguousarray(col.fill_null(0).to_numpy())


def _lens_rows(
    frame: pl.DataFrame,
    steps: np.ndarray,
    objs: list[str],
    params: LensParams,
    shape: _Shape,
    tol: float,
) -> pl.DataFrame:
    """:func:`lens` on the token rows of the whole steps ``steps`` (sorted; ``frame`` may hold other steps
    too: they are skipped)."""
    n_steps = steps.size
    if frame.height == 0 or n_steps == 0:
        return pl.DataFrame()
    sidx = K.step_index(_int_column(frame, schema.STEP).astype(np.int64, copy=False), steps)
    has_roll = schema.ROLLOUT_LOGP in frame.columns
    names = [schema.LOGP, schema.OLD_LOGP, schema.ADV] + ([schema.ROLLOUT_LOGP] if has_roll else [])
    vals = _values(frame, names)
    lp, olp, adv = vals[:3]
    roll = vals[3] if has_roll else lp[:0]
    flags = np.array([o in objs for o in K.TOKEN_OBJECTIVES] + ["bapo" in objs], dtype=np.bool_)
    edges = np.array(sorted({e for pt in _bapo_path(params.bapo) for e in pt}), dtype=np.float64)
    acc = np.zeros((n_steps, K.N_STEP + K.N_SUMS * len(K.TOKEN_OBJECTIVES)))
    bapo = np.zeros((n_steps, 3, 2 * edges.size + 1, len(K.BAPO_SUMS)) if flags[-1] else (n_steps, 3, 1, 4))
    r = np.empty(frame.height)
    K.token_pass(sidx, lp, olp, adv, roll, has_roll, tol, flags, _thresholds(params), edges, acc, bapo, r)

    present = acc[:, 0] > 0  # steps without a valid token have no row, as before
    sums: dict[str, np.ndarray] = {schema.STEP: steps}
    for j, name in enumerate(K.STEP_SUMS):
        sums[name] = acc[:, j]
    for k, o in enumerate(K.TOKEN_OBJECTIVES):
        if o in objs:
            for j, q in enumerate(K.SUMS[: 7 if o in ("tis", "mis") else 5]):
                sums[f"{o}.{q}"] = acc[:, K.N_STEP + k * K.N_SUMS + j]
    want_gspo = "gspo" in objs and shape.seq
    want_ctpo = "ctpo" in objs and shape.seq and shape.pos
    if want_gspo or want_ctpo:
        seq = _int_column(frame, schema.SEQ)
        pos = _int_column(frame, schema.POS) if want_ctpo else np.zeros(frame.height, dtype=np.int32)
        gacc, cacc = np.zeros((n_steps, 6)), np.zeros((n_steps, 5))
        args = (
            want_gspo,
            want_ctpo,
            _lo(params.gspo.eps_low),
            _hi(params.gspo.eps_high),
            params.ctpo.low,
            params.ctpo.high,
        )
        if not K.sequence_pass(sidx, seq, pos, lp, olp, adv, tol, np.zeros(0, np.int64), *args, gacc, cacc):
            # not in the recorder's order (shuffled, sequences interleaved): by (step, seq, pos) instead
            order = np.lexsort((pos, seq, sidx))
            gacc[:], cacc[:] = 0.0, 0.0
            K.sequence_pass(sidx, seq, pos, lp, olp, adv, tol, order, *args, gacc, cacc)
        for j, q in enumerate(K.SUMS[:5]):
            sums[f"gspo.{q}"], sums[f"ctpo.{q}"] = gacc[:, j], cacc[:, j]
    if "ttb" in objs:
        ess = K.ess_of(acc)
        tacc = np.zeros((n_steps, 5))
        K.ttb_pass(sidx, adv, r, ess, tacc)
        for j, q in enumerate(K.SUMS[:5]):
            sums[f"ttb.{q}"] = tacc[:, j]
        sums["ess"] = ess
    if "bapo" in objs:
        sums.update(_bapo_choose(bapo, params.bapo, edges))
    table = pl.DataFrame(sums).filter(pl.Series(present))

    out: list[pl.Expr] = [pl.col(schema.STEP).cast(pl.Int64)]
    for o in objs:
        if (o == "gspo" and not want_gspo) or (o == "ctpo" and not want_ctpo):
            out += [pl.lit(float("nan")).alias(column(o, q)) for q in QUANTITIES]
        else:
            out += _finalize(o, table)
        if o == "bapo":
            out += [pl.col(column("bapo", q)) for q in EXTRA_COLUMNS["bapo"]]
        if o == "ttb":
            out += [pl.col("ess").alias(column("ttb", "ess")), (1.0 - pl.col("ess")).alias(column("ttb", "reg_weight"))]
    return table.select(out).with_columns(pl.col(_F64).fill_null(float("nan")))
