"""Every component id of the dashboard, in one place.

Pages and callbacks import these constants instead of spelling ids, so a renamed id is a one-line change and
a typo is an ``AttributeError`` at import time rather than a callback that silently never fires.
Pattern-matching ids are dicts built by the helpers at the bottom.
"""

from __future__ import annotations

from typing import Final

# --- shell (present on every page) ------------------------------------------------------------------
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
DATA_VERSION: Final = "data-version"
"""``dcc.Store``: bumped when new steps land, so non-line figures (heatmaps) re-render."""
LIVE_PAYLOAD: Final = "live-payload"
"""``dcc.Store``: a live tick's answer (extensions, new figures, panel stores), applied in the browser."""
LIVE_BADGE: Final = "live-badge"
"""Text in the header: live / paused / stalled / finished."""
PAGE_RUNS: Final = "page-runs"
"""``dcc.Store`` written by a run page's layout: the run ids it shows (already validated)."""
SMOOTHING_VALUE: Final = "smoothing-value"
"""Text beside the smoothing slider: its value."""
X_AXIS: Final = "x-axis"
"""Dropdown: what the x axis of every line panel counts (``figures.X_MODES``: step, tokens seen, wall time)."""
ONPOLICY: Final = "onpolicy"
"""Checklist with one option, ``hide``: leave on-policy steps (ratio exactly 1) out of ratio-like panels."""
METRIC_SEARCH: Final = "metric-search"
"""Search box: shows only the panels whose metric names contain the words typed."""
SEARCH_NOTE: Final = "search-note"
"""Beside the search box: matching registry metrics linked to the page that charts them."""
PANEL_DOWNLOAD: Final = "panel-download"
"""``dcc.Download`` that sends a panel's numbers as CSV."""

OVERVIEW_FIRING: Final = "overview-firing"
OVERVIEW_CUSTOM: Final = "overview-custom"
OVERVIEW_CUSTOM_NAMES: Final = "overview-custom-names"
"""The Overview's line of firing alerts (re-read when a live tick changed the panels)."""
OVERVIEW_RESTARTS: Final = "overview-restarts"
"""The Overview's line of restarts and the steps they left without data (re-read at live ticks too)."""
OVERVIEW_PROBLEMS: Final = "overview-problems"
"""The Overview's line of what is wrong with the runs' files (skipped files, records a writer never published)."""

# --- Runs page --------------------------------------------------------------------------------------
RUNS_FILTER: Final = "runs-filter"
RUNS_TABLE: Final = "runs-table"
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
PANEL_SIG: Final = "panel-sig"
"""Type of the ``dcc.Store`` beside each line panel: what it shows (data version and last step per run, layout
key, alert marks), so a live tick knows whether appending steps is enough."""
PANEL_OPTS: Final = "panel-opts"
"""Type of each line panel's own options (a checklist: ``log`` for a log-scale y axis)."""
PANEL_CSV: Final = "panel-csv"
"""Type of each line panel's *CSV* button."""
PANEL_CARD: Final = "panel-card"
"""Type of the card around each line panel (the metric search hides cards)."""
CLICKABLE: Final = "clickable"
"""Type of any other figure whose clicked x is a step: ``{"type": CLICKABLE, "key": ...}``."""


def panel(page: str, key: str, metrics: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Id of a line panel; the metric list travels in the id so live updates know the trace order."""
    return {"type": PANEL, "page": page, "key": key, "metrics": ",".join(metrics)}


def panel_zoom(page: str, key: str, metrics: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Id of the zoom store of the panel :func:`panel` ``(page, key, metrics)``."""
    return {**panel(page, key, metrics), "type": PANEL_ZOOM}


def panel_part(kind: str, page: str, key: str, metrics: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Id of one of a panel's companions (``PANEL_SIG``, ``PANEL_OPTS``, ``PANEL_CSV``, ``PANEL_CARD``)."""
    return {**panel(page, key, metrics), "type": kind}


def clickable(key: str) -> dict[str, str]:
    """Id of a figure whose points link to the Tokens page (heatmaps, stacked areas)."""
    return {"type": CLICKABLE, "key": key}
