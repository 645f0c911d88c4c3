"""Recorder configuration: the clip settings every statistic depends on, and the capture policy.

The configuration is stored with the run (manifest, writer files and every Parquet file's metadata), so a run
is self-describing: the analysis layer knows which ``eps_high`` a stored clip fraction was computed with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, NamedTuple

ErrorMode = Literal["strict", "lenient"]


class KernelInput(NamedTuple):
    """One value of the configuration that the statistics kernel reads (a slot of its config array)."""

    slot: str
    """Name of the slot (``rldiag.stats.kernel.C_<SLOT>`` is its index in the config array)."""
    field: str
    """The :class:`RecorderConfig` field it comes from."""
    element: int | None = None
    """Element of a tuple-valued field, or None."""
    every_stat: bool = False
    """True when it decides which tokens count at all, so every statistic depends on it (not only the
    statistics declared ``config_dependent``)."""


KERNEL_INPUTS: Final[tuple[KernelInput, ...]] = (
    KernelInput("eps_low", "eps_low"),
    KernelInput("eps_high", "eps_high"),
    KernelInput("dual_clip_c", "dual_clip_c"),
    KernelInput("tis_cap", "tis_cap"),
    KernelInput("entropy_low", "entropy_low"),
    KernelInput("cov_band_lo", "cov_band", 0),
    KernelInput("cov_band_hi", "cov_band", 1),
    KernelInput("cov_top_frac", "cov_top_frac"),
    KernelInput("ctpo_a", "ctpo_bounds", 0),
    KernelInput("ctpo_b", "ctpo_bounds", 1),
    KernelInput("n_buckets", "n_buckets"),
    KernelInput("logp_tolerance", "logp_tolerance", every_stat=True),
    KernelInput("icepop_lo", "icepop_band", 0),
    KernelInput("icepop_hi", "icepop_band", 1),
    KernelInput("geo_lo", "geo_bounds", 0),
    KernelInput("geo_hi", "geo_bounds", 1),
    KernelInput("correct_reward", "correct_reward"),
    KernelInput("lowprob", "lowprob"),
)
"""Every configuration value the statistics kernel reads, in the order of its config array: the one
declaration from which :func:`rldiag.stats.kernel.config_array` and :attr:`RecorderConfig.STAT_FIELDS` (the
fields that change the statistics) are both built, so a recompute cannot skip a setting the kernel uses."""

STAT_FIELDS: Final[tuple[str, ...]] = tuple(dict.fromkeys(k.field for k in KERNEL_INPUTS))
"""The :class:`RecorderConfig` fields that change the statistics (not only how they are stored)."""
EVERY_STAT_FIELDS: Final[frozenset[str]] = frozenset(k.field for k in KERNEL_INPUTS if k.every_stat)
"""The fields that change every statistic (they decide which tokens are valid)."""


@dataclass(frozen=True)
class RecorderConfig:
    """Everything that decides what the recorder computes and writes.

    Example::

        cfg = RecorderConfig(eps_low=0.2, eps_high=0.28, token_sample_rate=0.1)
        rec = rldiag.Recorder("runs/exp1", config=cfg)
    """

    eps_low: float = 0.2
    """PPO lower clip: a token with adv < 0 and r < 1 - eps_low is clipped (`clip/low`)."""
    eps_high: float = 0.2
    """PPO upper clip: a token with adv > 0 and r > 1 + eps_high is clipped (`clip/high`); DAPO uses 0.28."""
    dual_clip_c: float = 3.0
    """Dual-clip constant c: a token with adv < 0 and r > c hits the dual clip (`clip/dual`)."""
    tis_cap: float = 2.0
    """Truncated-IS cap C for training-inference mismatch weights (`mismatch/tis_frac`, `mismatch/mis_frac`)."""
    entropy_low: float = 0.05
    """Entropy (nats) below which a token counts as near-deterministic (`entropy/low_frac`)."""
    cov_band: tuple[float, float] = (1.0, 5.0)
    """Open band of the centered covariance product counted by `entropy/cov_band_frac` (Clip-Cov)."""
    cov_top_frac: float = 0.002
    """Share of a record's tokens whose positive covariance mass `entropy/cov_top_share` reports."""
    ctpo_bounds: tuple[float, float] = (0.025, 0.05)
    """CTPO log-space bounds: L_t must stay in [-a*sqrt(t+1), b*sqrt(t+1)] (`seq/ctpo_clip`)."""
    n_buckets: int = 10
    """Position buckets (deciles of the record's longest response) for the stored stage/position statistics."""
    token_sample_rate: float = 1.0
    """Fraction of sequences whose token rows are written (statistics always cover every token)."""
    sample_seed: int = 0
    """Seed of the sequence sampler, so a sampled run is reproducible."""
    roll_steps: int = 200
    """A writer publishes its current files after this many distinct steps."""
    roll_rows: int = 4_000_000
    """... or after this many buffered token rows."""
    roll_seconds: float = 30.0
    """... or when the oldest unpublished data is this old (keeps live readers current)."""
    queue_max_bytes: int = 256 * 2**20
    """Upper bound of the memory held by queued records; past it token rows are dropped (counted)."""
    max_block_seconds: float = 0.0
    """How long ``record()`` may wait for queue space before it drops token rows (0: never wait)."""
    errors: ErrorMode = "strict"
    """``strict``: bad input and writer failures raise; ``lenient``: they are counted and reported once."""
    logp_tolerance: float = 1e-4
    """Log-probs above this are invalid (a log-probability cannot be positive beyond float rounding)."""
    compression: str = "lz4"
    """Parquet compression codec of the token files (lz4: fastest to write; zstd: about 10% smaller)."""
    icepop_band: tuple[float, float] = (0.5, 5.0)
    """IcePop band (alpha, beta): a token whose mismatch weight w leaves [alpha, beta] is dropped
    (`mismatch/icepop_frac`, `removed/icepop/*`). Default: verl's IcePop presets
    (``RolloutCorrectionConfig.decoupled_token_icepop`` / ``bypass_pg_token_icepop`` in
    verl/trainer/config/algorithm.py: threshold_lower 0.5, threshold 5.0)."""
    geo_bounds: tuple[float, float] = (0.999, 1.002)
    """Geo-MIS bounds (lo, hi): a sequence whose geometric-mean weight exp(mean d) leaves [lo, hi] is dropped
    (`mismatch/geo_mask_frac`, `removed/geo/*`); NeMo-RL's reference bounds."""
    correct_reward: float = 1.0
    """A sequence with reward >= this counts as correct (`removed/<c>/correct_frac`)."""
    lowprob: float = 0.1
    """Sampler probability exp(rollout_logp) below which a token counts as low-probability
    (`mismatch/lowprob_k3_share`)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            if not (0.0 <= v < 10.0) or not math.isfinite(v):
                problems.append(f"{name}={v!r} must be a finite number in [0, 10)")
        if not (self.dual_clip_c > 1.0):
            problems.append(f"dual_clip_c={self.dual_clip_c!r} must be > 1")
        if not (self.tis_cap > 1.0):
            problems.append(f"tis_cap={self.tis_cap!r} must be > 1")
        if not (0.0 < self.token_sample_rate <= 1.0):
            problems.append(f"token_sample_rate={self.token_sample_rate!r} must be in (0, 1]")
        if not (0.0 < self.cov_top_frac <= 1.0):
            problems.append(f"cov_top_frac={self.cov_top_frac!r} must be in (0, 1]")
        for name in ("icepop_band", "geo_bounds"):
            lo, hi = (tuple(getattr(self, name)) + (math.nan, math.nan))[:2]
            if not (0.0 < lo < hi < math.inf) or len(tuple(getattr(self, name))) != 2:
                problems.append(f"{name}={getattr(self, name)!r} must be two finite numbers 0 < lo < hi")
        if not math.isfinite(self.correct_reward):
            problems.append(f"correct_reward={self.correct_reward!r} must be a finite number")
        if not (0.0 < self.lowprob <= 1.0):
            problems.append(f"lowprob={self.lowprob!r} must be in (0, 1]")
        if self.errors not in ("strict", "lenient"):
            problems.append(f"errors={self.errors!r} must be 'strict' or 'lenient'")
        if not (1 <= self.n_buckets <= 64):
            problems.append(f"n_buckets={self.n_buckets!r} must be in [1, 64]")
        if self.roll_steps < 1 or self.roll_rows < 1 or self.roll_seconds <= 0:
            problems.append("roll_steps, roll_rows and roll_seconds must be positive")
        if self.queue_max_bytes < 2**20:
            problems.append(f"queue_max_bytes={self.queue_max_bytes!r} must be at least 1 MiB")
        if problems:
            raise ValueError("invalid RecorderConfig: " + "; ".join(problems))

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecorderConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from a newer rldiag) are ignored."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RecorderConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    STAT_FIELDS: ClassVar[tuple[str, ...]] = STAT_FIELDS
    """Fields that change the statistics (from :data:`KERNEL_INPUTS`)."""

    def stats_key(self) -> tuple[Any, ...]:
        """The values that decide the statistics: two configs with equal keys give equal statistics."""
        return tuple(getattr(self, f) for f in self.STAT_FIELDS)

    def stat_fields_changed(self, other: RecorderConfig) -> frozenset[str]:
        """The statistics-affecting fields whose values differ between ``self`` and ``other``.

        >>> RecorderConfig().stat_fields_changed(RecorderConfig(eps_high=0.28, roll_steps=5))
        frozenset({'eps_high'})
        """
        return frozenset(f for f in self.STAT_FIELDS if getattr(self, f) != getattr(other, f))

    def kernel_values(self) -> tuple[float, ...]:
        """The values of :data:`KERNEL_INPUTS`, in order (what the kernel's config array holds)."""
        out = []
        for k in KERNEL_INPUTS:
            v = getattr(self, k.field)
            out.append(float(v if k.element is None else v[k.element]))
        return tuple(out)
