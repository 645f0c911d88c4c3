"""Pure figure builders: frames and arrays in, ``plotly.graph_objects.Figure`` out.

No I/O, no Dash, no metric math: the numbers arrive finished (from :mod:`rldiag.analysis` through
:mod:`app.data`); these functions only choose how to draw them. That keeps every chart testable without a
server or a browser.

Line panels have a fixed trace layout that the live updates rely on: for each run (outer) and each metric
(inner) there are :data:`TRACES_PER_SERIES` traces, in the order of :data:`SERIES_TRACES` (the min/max
envelope as filled polygons, raw/bucket-mean, EMA); alert markers, on-policy marks and threshold legend
entries come after them. :func:`extend_payload` appends new steps to the raw and EMA traces through
``Graph.extendData``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl

from app.downsample import DEFAULT_BUCKETS, downsample_many, ema
from rldiag import runformat

SERIES_TRACES = ("band", "raw", "ema")
TRACES_PER_SERIES = len(SERIES_TRACES)

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
)
LENS_PALETTE = PALETTE + (
    "#0d2a63",
    "#fb00d1",
    "#00a08b",
    "#b68100",
    "#511cfb",
    "#862a16",
)
"""Colours of the objective lens: one per objective (the lens has more objectives than :data:`PALETTE` has
colours, and a repeated colour made two objectives look like one)."""
SEVERITY_COLORS = {"critical": "#d62728", "warn": "#ff7f0e", "info": "#1f77b4"}
NO_STEP_YET = "no step recorded yet"
"""A panel's note while none of its runs has a step (a live run still setting up), whatever the metric needs."""
RESTART_COLOR = "#6b7280"
"""Colour of the restart marks (a later attempt of a rank resumed at that step)."""
STEP_AXIS = "step"
_MARGIN = dict(l=55, r=15, t=36, b=20)
_AXIS = dict(
    automargin=True, gridcolor="#ebeef2", linecolor="#c9ced6", zerolinecolor="#c9ced6", ticks="", showline=False
)
_FONT = dict(family="system-ui, -apple-system, Segoe UI, sans-serif", size=12)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _arr(a: Any) -> np.ndarray:
    """Float64 array with NaN for every non-finite value: plotly sends it as a compact binary array and
    draws NaN as a gap (an Inf would break the axis layout)."""
    v = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(v), v, np.nan)


def _jlist(a: Any) -> list[float]:
    """A plain list (NaN for non-finite values, sent as JSON null) for traces that ``extendData`` grows:
    plotly.js cannot extend a trace that arrived as a binary array, which is what numpy input becomes."""
    return _arr(a).tolist()


def _finite_list(a: np.ndarray) -> list[float | None]:
    """JSON-friendly values: NaN/Inf become None, which plotly draws as a gap."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float64)]


def base_layout(title: str = "", *, height: int = 300, x_title: str = STEP_AXIS, **extra: Any) -> dict[str, Any]:
    """The layout every dashboard chart starts from (white, compact, legend on top)."""
    layout: dict[str, Any] = dict(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)),
        height=height,
        margin=_MARGIN,
        font=_FONT,
        # Explicit colours instead of template="plotly_white": expanding a named template deep-copies it
        # into every figure, which was two thirds of the Overview's server time.
        template={},
        paper_bgcolor="#ffffff",
        plot_bgcolor="#ffffff",
        colorway=list(PALETTE),
        hoverlabel=dict(bgcolor="#ffffff"),
        hovermode="x unified",
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0.0, font=dict(size=11)),
        xaxis=dict(_AXIS, title=dict(text=x_title, standoff=4), showspikes=True, spikemode="across", spikethickness=1),
        yaxis=dict(_AXIS),
        uirevision="keep",
    )
    layout.update(extra)
    return layout


def empty_figure(message: str, *, height: int = 260) -> go.Figure:
    """A blank chart that says why it is blank (no data, missing input column, unknown run)."""
    layout = base_layout(height=height)
    layout.update(
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
        annotations=[
            dict(
                text=message,
                showarrow=False,
                xref="paper",
                yref="paper",
                x=0.5,
                y=0.5,
                font=dict(size=13, color="#666"),
            )
        ],
    )
    return go.Figure(layout=layout)


# --- line panels ---------------------------------------------------------------------------------------
X_MODES: dict[str, str] = {"step": "step", "tokens": "tokens seen", "time": "wall time (s)"}
"""What a line panel's x axis can show (value -> axis title)."""
TIME_COLUMNS = ("time", "wall_time")
"""Step-metric columns holding a step's wall-clock time (Unix seconds): the run's statistics carry none, so
the x axis by wall time reads a custom scalar of one of these names (``rec.log(step, {"time": time.time()})``)."""
ONPOLICY_FAMILIES = frozenset({"ratio", "ess", "kl", "seq"})
"""Families whose panels mark on-policy steps (ratio exactly 1 by construction) and can hide them."""
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
"""Line styles of the metrics of one panel in compare mode, where the colour names the run."""
MAX_ONPOLICY_MARKS = 5_000
"""Beyond this many on-policy steps the markers are left out (the hide toggle still works)."""


def series_label(run_id: str, metric: str, *, n_runs: int) -> str:
    return metric if n_runs <= 1 else f"{run_id} · {metric}"


def _unit_suffix(unit: str | None) -> str:
    return f" [{unit}]" if unit else ""


def onpolicy_applies(metrics: Sequence[str]) -> bool:
    """Whether a panel of ``metrics`` shows ratio-like metrics, which on-policy steps pin at their trivial value."""
    return any(m.split("/", 1)[0] in ONPOLICY_FAMILIES for m in metrics)


def onpolicy_mask(frame: pl.DataFrame) -> np.ndarray:
    """Steps whose ratio is exactly 1 for every token (``ratio/min == ratio/max == 1``): the first update on
    freshly sampled data, where logp == old_logp by construction. All False when the columns are absent."""
    if frame.height == 0 or "ratio/max" not in frame.columns or "ratio/min" not in frame.columns:
        return np.zeros(frame.height, dtype=bool)
    return (_column(frame, "ratio/max") == 1.0) & (_column(frame, "ratio/min") == 1.0)


def time_column(frame: pl.DataFrame) -> str | None:
    """The wall-clock column of a step-metrics frame, if the run records one."""
    return next((c for c in TIME_COLUMNS if c in frame.columns), None)


def series_x(frame: pl.DataFrame, x_mode: str = "step") -> np.ndarray:
    """The x value of every row of ``frame`` (sorted by step): the step, the tokens seen up to and including
    that step (cumulative ``tokens/count``), or the seconds since the run's first step. A mode the run lacks
    data for falls back to the step (:func:`x_title` says so)."""
    steps = frame["step"].to_numpy().astype(np.float64) if frame.height else np.empty(0)
    if x_mode == "tokens" and "tokens/count" in frame.columns:
        return np.cumsum(np.nan_to_num(_column(frame, "tokens/count"), nan=0.0))
    col = time_column(frame) if x_mode == "time" else None
    if col is not None:
        t = _column(frame, col)
        first = t[np.isfinite(t)]
        t0 = float(first[0]) if first.size else 0.0
        # a step without a time keeps the previous one: x must stay sorted for the downsampling
        return np.fmax.accumulate(np.nan_to_num(t - t0, nan=0.0)) if len(t) else t
    return steps


def x_title(frames: Mapping[str, pl.DataFrame], x_mode: str) -> str:
    """The x axis title: empty for steps (the legend sits right under the ticks), else what the axis counts."""
    if x_mode == "tokens":
        return X_MODES["tokens"]
    if x_mode == "time":
        if frames and all(time_column(f) is not None for f in frames.values()):
            return X_MODES["time"]
        return "step (wall time not recorded in this run)"
    return ""


def metric_panel_spec(
    frames: Mapping[str, pl.DataFrame],
    metrics: Sequence[str],
    *,
    title: str,
    unit: str | None = None,
    smoothing: float = 0.0,
    x_range: tuple[float, float] | None = None,
    buckets: int = DEFAULT_BUCKETS,
    alerts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    hlines: Sequence[tuple[float, str]] = (),
    height: int = 300,
    no_data: str = "no data",
    x_mode: str = "step",
    log_y: bool = False,
    onpolicy: str | None = None,
    run_order: Sequence[str] | None = None,
    restarts: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    gaps: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> dict[str, Any]:
    """The figure of :func:`metric_panel` as a plain plotly spec (``{"data": [...], "layout": {...}}``).

    This is what the server sends: plotly's per-element validation of a ``go.Figure`` costs ~10 ms per 1,000
    points of list data, and the traces must be lists (``extendData`` cannot grow binary arrays). Tests
    validate the same spec through :func:`metric_panel`.

    Lines of ``metrics`` for each run in ``frames`` (run id -> step-metrics frame), over ``x_mode``
    (:data:`X_MODES`). Long series are downsampled with a min/max envelope (spikes stay visible; a NaN gap
    stays a gap, never a filled band); ``smoothing`` draws an EMA over the full-resolution series on top of
    the raw one. ``alerts`` marks firing alerts (``step``, ``severity``, ``rule``) as vertical lines;
    ``hlines`` draws reference values (value, label), named in the legend. ``restarts`` (run id -> (step, rank) of
    each restart: a later attempt of a rank resumed at that step) draws a grey dotted line at each, with a
    hoverable mark at the foot of the chart; ``gaps`` (run id -> (first, last) step of each range a restart left
    without data: ``Resume.gaps``) breaks that run's lines across each range instead of joining the steps on
    either side. ``onpolicy`` is ``"show"`` (mark
    on-policy steps at the bottom), ``"hide"`` (leave them out of the lines) or None (a panel they do not
    concern). In compare mode each run has one colour on every panel: its place in ``run_order`` (default: the
    order of ``frames``); metrics differ by line style. When no value is finite the traces stay (live updates
    extend them) and ``no_data`` is written on the chart.

    ``layout.meta`` carries ``key``: what the layout depends on besides the traces (a fixed y range, the
    no-data note, aggregation, on-policy marks) and ``alerts``; a live update compares them to decide between
    ``extendData`` and a new figure.
    """
    data: list[dict[str, Any]] = []
    n_runs = len(frames)
    order = list(run_order or frames)
    aggregated = False
    y_lo, y_hi = math.inf, -math.inf
    onpolicy_marks: list[tuple[str, float, float]] = []
    lone = 0  # traces of a single finite point, drawn as a marker
    breaks: list[list[Any]] = []  # [run, step before the gap] where a line is broken
    axes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run_id, frame in frames.items():
        run_color = PALETTE[(order.index(run_id) if run_id in order else len(order)) % len(PALETTE)]
        x_all = series_x(frame, x_mode)
        steps_all = frame["step"].to_numpy().astype(np.float64) if frame.height else np.empty(0)
        axes[run_id] = (steps_all, x_all)
        keep = np.ones(frame.height, dtype=bool)
        if onpolicy is not None:
            on = onpolicy_mask(frame)
            if onpolicy == "hide":
                keep = ~on
            else:
                onpolicy_marks.extend((run_id, float(s), float(x)) for s, x in zip(steps_all[on], x_all[on]))
        x, steps = x_all[keep], steps_all[keep]
        ys = [_column(frame, metric)[keep] for metric in metrics]
        run_gaps = (gaps or {}).get(run_id, ())
        cut = np.asarray(runformat.gap_breaks(steps.tolist(), run_gaps) if run_gaps else [], dtype=np.int64)
        if cut.size:  # a NaN point halfway between the steps on either side: plotly breaks the line there
            breaks.extend([run_id, float(steps[i])] for i in cut.tolist())
            x = np.insert(x, cut + 1, (x[cut] + x[cut + 1]) / 2)
            steps = np.insert(steps, cut + 1, (steps[cut] + steps[cut + 1]) / 2)
            ys = [np.insert(y.astype(np.float64), cut + 1, np.nan) for y in ys]
        series = [steps, *ys, *([ema(y, smoothing) for y in ys] if smoothing else [])]
        envs = downsample_many(x, series, buckets=buckets, x_range=x_range)  # the buckets found once per run
        step_env = envs[0]
        for m, metric in enumerate(metrics):
            if len(order) > 1:
                color, dash = run_color, DASHES[m % len(DASHES)]
            else:
                color, dash = PALETTE[m % len(PALETTE)], "solid"
            y = ys[m]
            env = envs[1 + m]
            smooth = envs[1 + len(metrics) + m] if smoothing else None
            aggregated |= not env.exact
            finite = y[np.isfinite(y)]
            if log_y:
                finite = finite[finite > 0]
            if finite.size:
                y_lo, y_hi = min(y_lo, float(finite.min())), max(y_hi, float(finite.max()))
            label = series_label(run_id, metric, n_runs=n_runs)
            group = f"{run_id}|{metric}"
            traces = _series_traces(env, smooth, step_env.mean, label, group, color, dash, unit)
            lone += sum(t["mode"] != "lines" for t in traces)
            data.extend(traces)
    layout = base_layout(title, height=height, x_title=x_title(frames, x_mode))
    layout["yaxis"] = dict(_AXIS, title=dict(text=unit or ""), zeroline=False)
    if log_y:
        layout["yaxis"]["type"] = "log"
    fixed: list[float] | None = None
    if y_lo == y_hi and not log_y:
        # A constant series: plotly's autorange degenerates (and misplaces the axis title); pad it.
        pad = abs(y_lo) * 0.05 or 1.0
        fixed = [y_lo - pad, y_hi + pad]
    if x_range is not None:
        layout["xaxis"]["range"] = list(x_range)
    points = _alert_points(alerts or {}, axes)
    shapes = _alert_marks(points)
    annotations: list[dict[str, Any]] = []
    marker = _alert_marker_trace(points, multi_run=n_runs > 1)
    if marker is not None:  # after every series trace: live updates address series by index from 0
        data.append(marker)
    resumed = _restart_points(restarts or {}, axes)
    if resumed:
        shapes.extend(_restart_marks(resumed))
        data.append(_restart_trace(resumed, multi_run=n_runs > 1))
    shown_marks = onpolicy_marks if len(onpolicy_marks) <= MAX_ONPOLICY_MARKS else []
    if shown_marks:
        data.append(_onpolicy_trace(shown_marks, multi_run=n_runs > 1))
    if marker is not None or shown_marks or resumed:
        layout["yaxis2"] = dict(overlaying="y", range=[0, 1], visible=False, fixedrange=True)
    for value, label in hlines:
        if log_y and value <= 0:
            continue
        shapes.append(
            dict(
                type="line",
                xref="paper",
                x0=0,
                x1=1,
                yref="y",
                y0=value,
                y1=value,
                line=dict(color="#888", width=1, dash="dot"),
            )
        )
        # named in the legend, not written over the data or under the toolbar
        data.append(
            dict(
                type="scatter",
                mode="lines",
                x=[None],
                y=[None],
                name=f"{label}: {value:.4g}",
                line=dict(color="#888", width=1, dash="dot"),
                hoverinfo="skip",
            )
        )
    if y_lo == math.inf:
        annotations.append(
            dict(
                # a live run that has not published a step yet has no data for any metric: say that instead
                text=NO_STEP_YET if all(f.height == 0 for f in frames.values()) else no_data,
                showarrow=False,
                xref="paper",
                yref="paper",
                x=0.5,
                y=0.5,
                font=dict(size=13, color="#666"),
            )
        )
        fixed = None if log_y else [0, 1]
    if fixed is not None:
        layout["yaxis"]["range"] = fixed
    layout["shapes"], layout["annotations"] = shapes, annotations
    layout["meta"] = {
        "aggregated": aggregated,
        "metrics": list(metrics),
        "runs": list(frames),
        "key": [
            fixed,
            y_lo == math.inf,
            aggregated,
            len(shown_marks),
            len(onpolicy_marks),
            lone,
            [[run, step, rank, x] for run, step, rank, x in resumed],  # x moves once that step's data lands
            breaks,  # a gap's break appears once steps on both sides of it are drawn
        ],
        "alerts": alert_key(alerts or {}),
    }
    n_legend = len(frames) * len(metrics) + len(hlines) + (1 if shown_marks else 0)
    layout["showlegend"] = n_legend > 1  # one series: the title already names it
    if layout["showlegend"]:
        # anchored to the bottom of the figure, not of the plot area, with room for the rows under the ticks
        names = [series_label(r, m, n_runs=n_runs) for r in frames for m in metrics] + [lab for _, lab in hlines]
        rows = 1 + min(sum(len(n) + 12 for n in names) // 70, 2)
        layout["margin"] = dict(_MARGIN, b=30 + 20 * rows + (16 if layout["xaxis"]["title"]["text"] else 0))
        layout["legend"] = dict(layout["legend"], yref="container", y=0.0, yanchor="bottom")
    return {"data": data, "layout": layout}


def alert_key(alerts: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    """What the alert marks of a panel depend on, as a JSON-able list (compared by live updates)."""
    out = []
    for run_id, events in alerts.items():
        for ev in events:
            step = ev.get("step")
            if isinstance(step, (int, float)) and math.isfinite(step):
                out.append([run_id, float(step), str(ev.get("severity", "warn")), str(ev.get("rule", ""))])
    return out


def metric_panel(frames: Mapping[str, pl.DataFrame], metrics: Sequence[str], **kwargs: Any) -> go.Figure:
    """Lines of ``metrics`` over steps for each run (see :func:`metric_panel_spec` for the arguments), as a
    validated ``go.Figure``."""
    return go.Figure(metric_panel_spec(frames, metrics, **kwargs))


def _column(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    col = frame.get_column(name)
    if col.dtype != pl.Float64:
        col = col.cast(pl.Float64)
    # a Float64 column's nulls come out as NaN; no expression (a fill_null runs a query: ms per call)
    return col.to_numpy()


def band_polygon(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """The min/max envelope as closed polygons, one per run of finite buckets, separated by None.

    Drawn with ``fill="toself"`` each segment is filled on its own, so a NaN gap stays empty (a ``tonexty``
    fill between two gapped traces bridges the gap with a shaded area that has no line).
    """
    ok = np.isfinite(x) & np.isfinite(lo) & np.isfinite(hi)
    xs: list[float | None] = []
    ys: list[float | None] = []
    edges = np.flatnonzero(np.diff(np.r_[0, ok.astype(np.int8), 0]))
    for start, stop in zip(edges[::2], edges[1::2]):
        if xs:
            xs.append(None)
            ys.append(None)
        seg = slice(int(start), int(stop))
        xs.extend(np.r_[x[seg], x[seg][::-1]].tolist())
        ys.extend(np.r_[hi[seg], lo[seg][::-1]].tolist())
    return xs, ys


def _series_traces(
    env: Any, smooth: Any, steps: np.ndarray, label: str, group: str, color: str, dash: str, unit: str | None
) -> list[dict]:
    hover = f"{label}: %{{y:.4g}}{_unit_suffix(unit)}<extra></extra>"
    x = _jlist(env.x)
    step_list = _jlist(steps)
    bx, by = band_polygon(env.x, env.lo, env.hi) if not env.exact else ([], [])
    band = dict(
        type="scatter",
        mode="lines",
        x=bx,
        y=by,
        name=f"{label} min-max",
        legendgroup=group,
        showlegend=False,
        hoverinfo="skip",
        fill="toself",
        fillcolor=_rgba(color, 0.18),
        line=dict(width=0, color=color),
    )
    has_smooth = smooth is not None
    raw: dict[str, Any] = dict(
        type="scatter",
        mode="lines",
        name=label if not has_smooth else f"{label} (raw)",
        x=x,
        y=_jlist(env.mean),
        customdata=step_list,
        legendgroup=group,
        showlegend=not has_smooth,
        line=dict(width=1.2, color=_rgba(color, 1.0 if not has_smooth else 0.45), dash=dash),
        hovertemplate=hover,
    )
    sm: dict[str, Any] = dict(
        type="scatter",
        mode="lines",
        name=label if has_smooth else f"{label} (EMA)",
        x=_jlist(smooth.x) if has_smooth else [],
        y=_jlist(smooth.mean) if has_smooth else [],
        customdata=step_list if has_smooth else [],
        legendgroup=group,
        showlegend=has_smooth,
        line=dict(width=2, color=color, dash=dash),
    )
    if has_smooth:
        sm["hovertemplate"] = f"{label} (EMA): %{{y:.4g}}{_unit_suffix(unit)}<extra></extra>"
    else:
        sm["hoverinfo"] = "skip"
    # the count of traces drawn with a marker is part of the layout key, so a live update rebuilds the figure as
    # lines once a second point lands
    for trace, values in ((raw, env.mean), (sm, smooth.mean if has_smooth else None)):
        if values is not None and line_mode(values) != "lines":
            trace["mode"] = line_mode(values)
            trace["marker"] = dict(size=6, color=trace["line"]["color"])
    return [band, raw, sm]


def line_mode(values: np.ndarray) -> str:
    """A scatter trace's mode for a line of ``values``: ``"lines"``, or ``"lines+markers"`` when only one value is
    finite, which a line alone does not draw (a live run's first step would show bare axes)."""
    return "lines+markers" if np.count_nonzero(np.isfinite(np.asarray(values, dtype=np.float64))) == 1 else "lines"


def _alert_points(
    alerts: Mapping[str, Sequence[Mapping[str, Any]]], axes: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> list[tuple[str, float, float, str, str]]:
    """(run, step, x, severity, rule) of every alert event with a finite step, x on the panel's axis (exact for
    a recorded step, interpolated between steps)."""
    out: list[tuple[str, float, float, str, str]] = []
    for run_id, events in alerts.items():
        kept = [ev for ev in events if isinstance(ev.get("step"), (int, float)) and math.isfinite(float(ev["step"]))]
        if not kept:
            continue
        steps = np.array([float(ev["step"]) for ev in kept])
        at = _x_at(axes, run_id, steps)
        for ev, step, x in zip(kept, steps.tolist(), at.tolist()):
            out.append((run_id, step, x, str(ev.get("severity", "warn")), str(ev.get("rule", "alert"))))
    return out


def _x_at(axes: Mapping[str, tuple[np.ndarray, np.ndarray]], run_id: str, steps: np.ndarray) -> np.ndarray:
    """The x of ``steps`` of a run on the panel's axis: exact for a recorded step, interpolated between steps
    (the steps themselves for a run not drawn)."""
    run_steps, xs = axes.get(run_id, (np.empty(0), np.empty(0)))
    if not len(run_steps) or np.array_equal(run_steps, xs):
        return steps  # x is the step (a step not drawn yet too: a restart whose first step has no data yet)
    return np.interp(steps, run_steps, xs)


def _vline(x: float, color: str, dash: str, opacity: float = 1.0) -> dict:
    """A vertical line across the plot at ``x``."""
    return dict(
        type="line",
        xref="x",
        x0=x,
        x1=x,
        yref="paper",
        y0=0,
        y1=1,
        line=dict(color=color, width=1, dash=dash),
        opacity=opacity,
    )


def _marks_trace(
    x: list[float], y: float, texts: list[str], customdata: list[list[Any]], marker: dict, name: str, legend: bool
) -> dict:
    """Hoverable marks on the hidden axis ``y2`` (0 bottom, 1 top) at height ``y``; ``customdata`` ``[run id,
    step]``, so a click opens that run's tokens at that step."""
    return dict(
        type="scatter",
        mode="markers",
        x=x,
        y=[y] * len(x),
        yaxis="y2",
        text=texts,
        customdata=customdata,
        marker=marker,
        name=name,
        showlegend=legend,
        hovertemplate="%{text}<extra></extra>",
    )


def _alert_marker_trace(points: Sequence[tuple[str, float, float, str, str]], *, multi_run: bool) -> dict | None:
    """Hoverable markers at the top of the chart naming each alert that started firing (``[run id, step]`` in
    customdata, so a click opens that run's tokens at that step)."""
    if not points:
        return None
    texts = [
        f"{run_id + ': ' if multi_run else ''}{rule} ({sev}) fired at step {int(step)}"
        for run_id, step, _x, sev, rule in points
    ]
    marker = dict(symbol="triangle-down", size=9, color=[SEVERITY_COLORS.get(p[3], "#999") for p in points])
    return _marks_trace([p[2] for p in points], 0.97, texts, [[p[0], p[1]] for p in points], marker, "alerts", False)


def _restart_points(
    restarts: Mapping[str, Sequence[tuple[int, int]]], axes: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> list[tuple[str, int, int, float]]:
    """(run, step, rank, x) of each restart of the runs drawn, x on the panel's axis (as for alerts)."""
    out: list[tuple[str, int, int, float]] = []
    for run_id, points in restarts.items():
        if run_id not in axes or not points:
            continue
        at = _x_at(axes, run_id, np.array([float(step) for step, _rank in points]))
        out.extend((run_id, int(step), int(rank), float(x)) for (step, rank), x in zip(points, at.tolist()))
    return out


def _restart_marks(points: Sequence[tuple[str, int, int, float]]) -> list[dict]:
    """Grey dotted vertical lines at the restarts (one per x, at most 200)."""
    return [_vline(x, RESTART_COLOR, "dot") for x in sorted({x for *_, x in points})[:200]]


def _restart_trace(points: Sequence[tuple[str, int, int, float]], *, multi_run: bool) -> dict:
    """Hoverable marks at the foot of the chart naming each restart (``[run id, step]`` in customdata, like the
    alert marks)."""
    texts = [
        f"{run + ': ' if multi_run else ''}restart at step {step} (rank {rank}): a later attempt resumed here, "
        "replacing what earlier attempts had recorded from this step on"
        for run, step, rank, _x in points
    ]
    marker = dict(symbol="diamond", size=8, color=RESTART_COLOR)
    return _marks_trace([p[3] for p in points], 0.08, texts, [[p[0], p[1]] for p in points], marker, "restart", False)


def _onpolicy_trace(marks: Sequence[tuple[str, float, float]], *, multi_run: bool) -> dict:
    """Ticks at the bottom of the chart at each on-policy step (ratio = 1 by construction), in the legend so a
    click there hides them."""
    texts = [
        f"{run + ': ' if multi_run else ''}step {int(step)} on-policy (ratio = 1 by construction)"
        for run, step, _ in marks
    ]
    marker = dict(symbol="line-ns-open", size=7, color="#98a2b3", line=dict(width=1))
    name = "on-policy step (ratio ≡ 1)"
    return _marks_trace([m[2] for m in marks], 0.03, texts, [[m[0], m[1]] for m in marks], marker, name, True)


def _alert_marks(points: Sequence[tuple[str, float, float, str, str]]) -> list[dict]:
    """Vertical lines at the x of the steps where an alert started firing (at most 200, most severe first)."""
    rank = {"critical": 0, "warn": 1, "info": 2}
    marks = sorted((rank.get(sev, 3), x, sev) for _run, _step, x, sev, _rule in points)
    return [_vline(x, SEVERITY_COLORS.get(sev, "#999"), "dash", opacity=0.7) for _, x, sev in marks[:200]]


def extend_payload(
    fresh: Mapping[str, pl.DataFrame],
    full: Mapping[str, pl.DataFrame],
    runs: Sequence[str],
    metrics: Sequence[str],
    *,
    smoothing: float = 0.0,
    x_mode: str = "step",
    hide_onpolicy: bool = False,
) -> tuple[dict[str, list[list[Any]]], list[int]] | None:
    """``extendData`` for a :func:`metric_panel` built for ``runs`` x ``metrics`` (raw and EMA traces; the
    envelope band of an exact series is empty and stays so).

    ``fresh`` holds each run's appended rows only, ``full`` the whole series (new rows included), which the
    EMA, the tokens-seen axis and the on-policy filter need. Returns ``(update, trace_indices)`` or None when
    nothing is new.
    """
    xs: list[list[Any]] = []
    ys: list[list[Any]] = []
    cds: list[list[Any]] = []
    indices: list[int] = []
    for r, run_id in enumerate(runs):
        new = fresh.get(run_id)
        if new is None or new.height == 0:
            continue
        whole = full[run_id]
        is_new = np.isin(whole["step"].to_numpy(), new["step"].to_numpy())
        keep = ~onpolicy_mask(whole) if hide_onpolicy else np.ones(whole.height, dtype=bool)
        x_new = _finite_list(series_x(whole, x_mode)[is_new & keep])
        if not x_new:
            continue
        steps_new = _finite_list(whole["step"].to_numpy()[is_new & keep])
        for m, metric in enumerate(metrics):
            base = (r * len(metrics) + m) * TRACES_PER_SERIES
            y_all = _column(whole, metric)
            xs.append(x_new)
            ys.append(_finite_list(y_all[is_new & keep]))
            cds.append(steps_new)
            indices.append(base + 1)
            if smoothing:
                xs.append(x_new)
                ys.append(_finite_list(ema(y_all[keep], smoothing)[is_new[keep]]))
                cds.append(steps_new)
                indices.append(base + 2)
    if not indices:
        return None
    return {"x": xs, "y": ys, "customdata": cds}, indices


# --- ratio distribution -----------------------------------------------------------------------------
def ratio_heatmap(
    steps: np.ndarray,
    centers: np.ndarray,
    counts: np.ndarray,
    *,
    bands: Mapping[str, np.ndarray] | None = None,
    band_steps: np.ndarray | None = None,
    title: str = "distribution of |log-ratio| per step",
    height: int = 400,
    max_rows: int = 96,
) -> go.Figure:
    """Heatmap of the share of tokens per |log-ratio| bin (rows, log axis) and step (columns).

    ``counts`` has shape (len(centers), len(steps)); empty rows at both ends are trimmed. ``bands`` maps a
    label to a per-step quantile of |log-ratio| (``ratio/logabs_p50``...) drawn over the heatmap at
    ``band_steps`` (default ``steps``), so the tails read against the bulk. More than ``max_rows`` bins are
    merged pairwise (coarser bins, same totals).
    """
    counts = np.asarray(counts, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    if counts.size == 0 or not np.any(counts > 0):
        return empty_figure("no log-ratio histogram in this run")
    used = np.flatnonzero(counts.sum(axis=1) > 0)
    rows = slice(used[0], used[-1] + 1)
    counts, centers = counts[rows], centers[rows]
    while len(centers) > max_rows:  # merge neighbouring bins (histograms add) until the payload is small
        n = len(centers) // 2 * 2
        merged = counts[:n:2] + counts[1:n:2]
        mids = np.sqrt(centers[:n:2] * centers[1:n:2])
        if n < len(centers):
            merged, mids = np.vstack([merged, counts[n:]]), np.r_[mids, centers[n:]]
        counts, centers = merged, mids
    totals = counts.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, counts / totals, np.nan)
        z = np.where(share > 0, np.log10(share), np.nan)
    # float32 and no per-cell customdata: the figure of a 2,000-step run stays a few hundred kB
    data: list[dict[str, Any]] = [
        dict(
            type="heatmap",
            x=_arr(steps),
            y=_arr(np.log10(centers)),
            z=_arr(z).astype(np.float32),
            colorscale="Viridis",
            zmin=-6,
            zmax=0,
            colorbar=dict(title=dict(text="log10 share"), thickness=12),
            hovertemplate="step %{x}<br>log10 |log-ratio| ≈ %{y:.2f}<br>log10 share %{z:.2f}<extra></extra>",
        )
    ]
    colors = ("#111111", "#ff851b", "#ff4136", "#b10dc9")
    dashes = ("dot", "solid", "solid", "dash")
    bx = _arr(steps if band_steps is None else band_steps)
    for i, (label, values) in enumerate((bands or {}).items()):
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logv = np.where(v > 0, np.log10(v), np.nan)
        data.append(
            dict(
                type="scatter",
                mode="lines",
                x=bx,
                y=_arr(logv),
                customdata=_arr(v),
                name=label,
                line=dict(color=colors[i % len(colors)], width=1.5, dash=dashes[i % 4]),
                hovertemplate=f"{label}: %{{customdata:.3g}}<extra></extra>",
            )
        )
    lo, hi = int(np.floor(np.log10(centers[0]))), int(np.ceil(np.log10(centers[-1])))
    ticks = list(range(lo, hi + 1))
    layout = base_layout(title, height=height)
    layout["yaxis"] = dict(
        _AXIS,
        title=dict(text="|logp - old_logp| (nats, log scale)"),
        tickvals=ticks,
        ticktext=[f"1e{t}" if t not in (0, 1) else str(10**t) for t in ticks],
    )
    layout["hovermode"] = "closest"
    return go.Figure(data=data, layout=layout)


# --- stacked shares ---------------------------------------------------------------------------------
def stacked_shares(
    frame: pl.DataFrame,
    metrics: Sequence[str],
    *,
    title: str,
    height: int = 300,
    labels: Mapping[str, str] | None = None,
) -> go.Figure:
    """Stacked area of share metrics over steps (e.g. the four DISPO regimes, which sum to about 1)."""
    present = [m for m in metrics if m in frame.columns and frame[m].is_not_null().any()]
    if frame.height == 0 or not present:
        return empty_figure("no data for " + ", ".join(metrics))
    x = _arr(frame["step"].to_numpy())
    data = []
    for i, m in enumerate(present):
        data.append(
            dict(
                type="scatter",
                mode="lines",
                x=x,
                y=_arr(_column(frame, m)),
                stackgroup="one",
                name=(labels or {}).get(m, m),
                line=dict(width=0.5, color=PALETTE[i % len(PALETTE)]),
                hovertemplate=f"{m}: %{{y:.3f}}<extra></extra>",
            )
        )
    layout = base_layout(title, height=height)
    layout["yaxis"] = dict(_AXIS, title=dict(text="share of tokens"), range=[0, 1])
    return go.Figure(data=data, layout=layout)


# --- objective lens -----------------------------------------------------------------------------------
def lens_objectives(frame: pl.DataFrame, quantity: str) -> list[str]:
    """Objectives that have ``lens/<objective>/<quantity>`` columns, in column order."""
    out = []
    for col in frame.columns:
        parts = col.split("/")
        if len(parts) == 3 and parts[0] == "lens" and parts[2] == quantity:
            out.append(parts[1])
    return out


def lens_lines(frame: pl.DataFrame, quantity: str, *, height: int = 340) -> go.Figure:
    """One line per objective of the counterfactual lens over steps."""
    objectives = lens_objectives(frame, quantity)
    if not objectives:
        return empty_figure(f"the lens has no {quantity!r} columns")
    x = _arr(frame["step"].to_numpy())
    data = [
        dict(
            type="scatter",
            mode="lines",
            x=x,
            y=_arr(_column(frame, f"lens/{o}/{quantity}")),
            name=o,
            line=dict(
                width=1.5,
                color=LENS_PALETTE[i % len(LENS_PALETTE)],
                dash=DASHES[(i // len(LENS_PALETTE)) % len(DASHES)],
            ),
            hovertemplate=f"{o}: %{{y:.4g}}<extra></extra>",
        )
        for i, o in enumerate(objectives)
    ]
    return go.Figure(data=data, layout=base_layout(f"objective lens: {quantity} per step", height=height))


def lens_bars(frame: pl.DataFrame, quantity: str, *, height: int = 340) -> go.Figure:
    """Run mean (and last step) of ``quantity`` per objective, side by side."""
    objectives = lens_objectives(frame, quantity)
    if not objectives or frame.height == 0:
        return empty_figure(f"the lens has no {quantity!r} columns")
    cols = [_column(frame, f"lens/{o}/{quantity}") for o in objectives]
    means = [float(np.nanmean(c)) if np.isfinite(c).any() else float("nan") for c in cols]  # all NaN: no warning
    last = [float(_column(frame, f"lens/{o}/{quantity}")[-1]) for o in objectives]
    data = [
        dict(type="bar", x=objectives, y=_arr(np.array(means)), name="mean over steps", marker=dict(color="#1f77b4")),
        dict(type="bar", x=objectives, y=_arr(np.array(last)), name="last step", marker=dict(color="#ff7f0e")),
    ]
    layout = base_layout(f"objective lens: {quantity} by objective", height=height, x_title="objective")
    layout.update(barmode="group", hovermode="closest")
    return go.Figure(data=data, layout=layout)


# --- entropy-performance law ----------------------------------------------------------------------------
def law_figure(
    entropy: np.ndarray, reward: np.ndarray, *, a: float, b: float, r2: float, reward_name: str, height: int = 340
) -> go.Figure:
    """Observed (H, R) points and the fitted R = -a*exp(H) + b with its ceiling b - a (at H = 0)."""
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    ok = np.isfinite(h) & np.isfinite(r)
    if not ok.any():
        return empty_figure("no (entropy, reward) pairs to fit")
    grid = np.linspace(0.0, max(float(np.nanmax(h[ok])) * 1.05, 1e-3), 200)
    ceiling = b - a
    data = [
        dict(
            type="scatter",
            mode="markers",
            x=_arr(h[ok]),
            y=_arr(r[ok]),
            name="steps",
            marker=dict(size=5, color="#1f77b4", opacity=0.6),
            hovertemplate="H %{x:.3f}<br>R %{y:.3f}<extra></extra>",
        ),
        dict(
            type="scatter",
            mode="lines",
            x=_arr(grid),
            y=_arr(-a * np.exp(grid) + b),
            name=f"fit R = -{a:.3g}·exp(H) + {b:.3g} (R² {r2:.2f})",
            line=dict(color="#d62728", width=2),
        ),
    ]
    layout = base_layout("entropy-performance law", height=height, x_title="entropy/mean (nats)")
    layout["yaxis"] = dict(_AXIS, title=dict(text=reward_name))
    layout["hovermode"] = "closest"
    layout["shapes"] = [
        dict(
            type="line",
            xref="paper",
            x0=0,
            x1=1,
            yref="y",
            y0=ceiling,
            y1=ceiling,
            line=dict(color="#2ca02c", dash="dash", width=1.5),
        )
    ]
    layout["annotations"] = [
        dict(
            text=f"ceiling at H→0: {ceiling:.4g}",
            xref="paper",
            x=1,
            xanchor="right",
            yref="y",
            y=ceiling,
            yanchor="bottom",
            showarrow=False,
            font=dict(color="#2ca02c", size=11),
        )
    ]
    return go.Figure(data=data, layout=layout)


# --- positions and stages ---------------------------------------------------------------------------
def bucket_heatmap(frame: pl.DataFrame, quantity: str, *, by: str, height: int = 380) -> go.Figure:
    """Step x bucket heatmap of one quantity of ``run.bucket_metrics`` (columns step, bucket, quantity)."""
    if frame.height == 0 or quantity not in frame.columns:
        return empty_figure(f"no {by} buckets with {quantity!r} in this run")
    bucket_col = "bucket" if "bucket" in frame.columns else by
    wide = (
        frame.select("step", bucket_col, quantity)
        .pivot(on=bucket_col, index="step", values=quantity, aggregate_function="first")
        .sort("step")
    )
    buckets = sorted((c for c in wide.columns if c != "step"), key=_bucket_key)
    z = np.column_stack([_column(wide, c) for c in buckets]).T if buckets else np.empty((0, 0))
    diverging = quantity.startswith("ratio_mean") or quantity == "ratio/mean"
    data = [
        dict(
            type="heatmap",
            x=_arr(wide["step"].to_numpy()),
            y=[str(b) for b in buckets],
            z=_arr(z),
            colorscale="RdBu_r" if diverging else "Viridis",
            zmid=1.0 if diverging else None,
            colorbar=dict(title=dict(text=quantity), thickness=12),
            hovertemplate=f"step %{{x}}<br>{by} bucket %{{y}}<br>{quantity} %{{z:.4g}}<extra></extra>",
        )
    ]
    layout = base_layout(f"{quantity} by {by} bucket", height=height)
    layout["yaxis"] = dict(_AXIS, title=dict(text=f"{by} bucket"), type="category")
    layout["hovermode"] = "closest"
    return go.Figure(data=data, layout=layout)


def _bucket_key(v: Any) -> tuple[int, float | str]:
    try:
        return (0, float(v))
    except (TypeError, ValueError):
        return (1, str(v))


# --- extrapolation cliff ------------------------------------------------------------------------------
def annotate_result(fig: go.Figure, text: str) -> go.Figure:
    """Add a one-line note at the top left of ``fig`` (used for lambda* on the cliff figure)."""
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0, y=1.08, xanchor="left", showarrow=False)
    return fig
