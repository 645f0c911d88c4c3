"""Every component id of the dashboard, in one place.

Pages and callbacks import these constants instead of spelling ids, so a renamed id is a one-line change and
a typo is an ``AttributeError`` at import time rather than a callback that silently never fires.
Pattern-matching ids are dicts built by the helpers at the bottom.
"""

from __future__ import annotations

from typing import Final

# --- shell (present on every page) ------------------------------------------------------------------
URL: Final = "url"
"""``dcc.Location`` of the app; pages read ``?run=...&step=...`` from it."""
REDIRECT: Final = "redirect"
"""A second ``dcc.Location`` that only callbacks write to (click a point -> Tokens page)."""
NAV: Final = "nav"
RUN_PICKER: Final = "run-picker"
"""Multi-select of the runs shown by the run pages (mirrors ``?run=`` in the URL)."""
SMOOTHING: Final = "smoothing"
"""EMA weight in [0, 0.99] applied to every line panel; the raw trace stays visible."""
LIVE_TOGGLE: Final = "live-toggle"
"""Checklist with one option, ``live``: unchecked pauses polling."""
LIVE_INTERVAL: Final = "live-interval"
LIVE_STATE: Final = "live-state"
"""``dcc.Store``: ``{run_id: last step shown}`` for the runs on screen."""
DATA_VERSION: Final = "data-version"
"""``dcc.Store``: bumped when new steps land, so non-line figures (heatmaps) re-render."""
LIVE_BADGE: Final = "live-badge"
"""Text in the header: live / paused / stalled / finished."""
PAGE_RUNS: Final = "page-runs"
"""``dcc.Store`` written by a run page's layout: the run ids it shows (already validated)."""
PAGE_MESSAGE: Final = "page-message"

# --- Runs page --------------------------------------------------------------------------------------
RUNS_FILTER: Final = "runs-filter"
RUNS_TABLE: Final = "runs-table"
RUNS_SELECT: Final = "runs-select"
RUNS_COMPARE: Final = "runs-compare"
RUNS_REFRESH: Final = "runs-refresh"

# --- metric pages -----------------------------------------------------------------------------------
RATIO_HEATMAP: Final = "ratio-heatmap"
REGIME_STACK: Final = "regime-stack"
LENS_QUANTITY: Final = "lens-quantity"
LENS_LINES: Final = "lens-lines"
LENS_BARS: Final = "lens-bars"
LENS_NOTE: Final = "lens-note"
LAW_REWARD: Final = "law-reward"
LAW_FIGURE: Final = "law-figure"
LAW_NOTE: Final = "law-note"
BUCKET_BY: Final = "bucket-by"
BUCKET_QUANTITY: Final = "bucket-quantity"
BUCKET_HEATMAP: Final = "bucket-heatmap"
BUCKET_NOTE: Final = "bucket-note"

# --- Tokens page ------------------------------------------------------------------------------------
TOKENS_STEP: Final = "tokens-step"
TOKENS_COLOR: Final = "tokens-color"
TOKENS_K: Final = "tokens-k"
TOKENS_BODY: Final = "tokens-body"
TOKENS_SUMMARY: Final = "tokens-summary"

# --- Cliff calculator -------------------------------------------------------------------------------
CLIFF_P: Final = "cliff-p"
CLIFF_B: Final = "cliff-b"
CLIFF_C: Final = "cliff-c"
CLIFF_LAM: Final = "cliff-lam"
CLIFF_FIGURE: Final = "cliff-figure"
CLIFF_RESULT: Final = "cliff-result"

# --- Alerts page ------------------------------------------------------------------------------------
ALERTS_STATES: Final = "alerts-states"
ALERTS_HISTORY: Final = "alerts-history"

# --- pattern-matching ids ---------------------------------------------------------------------------
PANEL: Final = "panel"
"""Type of a registry-driven line panel: ``{"type": PANEL, "page": ..., "key": ..., "metrics": "a,b"}``."""
PANEL_ZOOM: Final = "panel-zoom"
"""Type of the ``dcc.Store`` beside each line panel holding its zoomed x range (same keys as the panel)."""
CLICKABLE: Final = "clickable"
"""Type of any other figure whose clicked x is a step: ``{"type": CLICKABLE, "key": ...}``."""


def panel(page: str, key: str, metrics: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Id of a line panel; the metric list travels in the id so live updates know the trace order."""
    return {"type": PANEL, "page": page, "key": key, "metrics": ",".join(metrics)}


def panel_zoom(page: str, key: str, metrics: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Id of the zoom store of the panel :func:`panel` ``(page, key, metrics)``."""
    return {**panel(page, key, metrics), "type": PANEL_ZOOM}


def clickable(key: str) -> dict[str, str]:
    """Id of a figure whose points link to the Tokens page (heatmaps, stacked areas)."""
    return {"type": CLICKABLE, "key": key}
