"""Recorder configuration: the clip settings every statistic depends on, and the capture policy.

The configuration is stored with the run (manifest, writer files and every Parquet file's metadata), so a run
is self-describing: the analysis layer knows which ``eps_high`` a stored clip fraction was computed with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

ErrorMode = Literal["strict", "lenient"]


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
    def from_dict(cls, data: dict[str, Any]) -> "RecorderConfig":
        """Inverse of :meth:`to_dict`; unknown keys (from a newer rldiag) are ignored."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "RecorderConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # Fields that change the statistics (not only how they are stored).
    STAT_FIELDS = (
        "eps_low", "eps_high", "dual_clip_c", "tis_cap", "entropy_low", "cov_band", "cov_top_frac",
        "ctpo_bounds", "n_buckets",
    )

    def stats_key(self) -> tuple[Any, ...]:
        """The values that decide the statistics: two configs with equal keys give equal statistics."""
        return tuple(getattr(self, f) for f in self.STAT_FIELDS)


def _field_docs() -> dict[str, str]:
    """Field docstrings, for ``rldiag info`` and the docs (read from the source)."""
    import inspect

    src = inspect.getsource(RecorderConfig).splitlines()
    docs: dict[str, str] = {}
    last = None
    for line in src:
        s = line.strip()
        if ":" in s and not s.startswith(('"', "#", "def", "@", "class")) and "=" in s:
            last = s.split(":", 1)[0].strip()
        elif s.startswith('"""') and last is not None:
            docs[last] = s.strip('"').strip()
            last = None
    return docs

