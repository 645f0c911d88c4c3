"""Merge and finalize: kept importable here; they live beside the registry they serve,
:mod:`rldiag.metrics.aggregate`."""

from __future__ import annotations

from rldiag.metrics.aggregate import Merged, compact, finalize, merge, metrics_of

__all__ = ["Merged", "compact", "finalize", "merge", "metrics_of"]
