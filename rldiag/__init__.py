"""rldiag: diagnostics and training-dynamics analysis for RL on language models.

Record per-token signals while training runs::

    import rldiag
    with rldiag.Recorder("runs/exp1", clip_low=0.2, clip_high=0.28) as rec:
        rec.record(step=s, logprobs=lp, old_logprobs=olp, advantages=adv, mask=m)

and analyze them without torch::

    run = rldiag.open_run("runs/exp1")
    run.step_metrics()          # polars DataFrame: step + one column per metric

Importing :mod:`rldiag` does not import torch; the recorder imports it when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Recorder",
    "RecorderConfig",
    "open_run",
    "Run",
    "entropy_from_logits",
    "gather_logprobs",
    "REGISTRY",
    "__version__",
]

_LAZY = {
    "Recorder": ("rldiag.record.recorder", "Recorder"),
    "RecorderConfig": ("rldiag.config", "RecorderConfig"),
    "open_run": ("rldiag.analysis.io", "open_run"),
    "Run": ("rldiag.analysis.io", "Run"),
    "entropy_from_logits": ("rldiag.record.tensors", "entropy_from_logits"),
    "gather_logprobs": ("rldiag.record.tensors", "gather_logprobs"),
    "REGISTRY": ("rldiag.metrics.registry", "REGISTRY"),
}

_SUBMODULES = frozenset(
    {
        *("alerts", "analysis", "config", "export", "importers", "metrics"),
        *("precompile", "record", "runformat", "schema", "stats", "storage"),
    }
)
"""Subpackages reachable as attributes after ``import rldiag`` (``rldiag.alerts.AlertConfig``), imported on
first use like the names above."""

if TYPE_CHECKING:  # pragma: no cover
    from rldiag.analysis.io import Run, open_run
    from rldiag.config import RecorderConfig
    from rldiag.metrics.registry import REGISTRY
    from rldiag.record.recorder import Recorder
    from rldiag.record.tensors import entropy_from_logits, gather_logprobs


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"rldiag.{name}")
    raise AttributeError(f"module 'rldiag' has no attribute {name!r}")
