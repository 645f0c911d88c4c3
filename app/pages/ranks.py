"""Ranks: any metric per data-parallel rank, so one bad rank (a broken GPU, a stale weight copy) stands out.

The statistics are stored per rank (``run.step_metrics(by_rank=True)``); this page draws one line per rank and,
below it, each rank's robust deviation from the other ranks at every step: ``(value - median) / MAD`` across
ranks (the median absolute deviation, scaled to a standard deviation). A rank that differs shows as one bright
row, whatever the metric's scale. Long runs are aggregated into at most ``downsample.DEFAULT_BUCKETS`` step
buckets that keep each bucket's largest deviation, and re-aggregated when you zoom.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import dash
import numpy as np
import plotly.graph_objects as go
import polars as pl
from dash import MATCH, Input, Output, State, callback, dcc, html
from dash.exceptions import PreventUpdate
from plotly.subplots import make_subplots

from app import data, figures, ids, panels
from app import layout as ui
from app.downsample import DEFAULT_BUCKETS
from app.security import plot_text
from rldiag import runformat

dash.register_page(__name__, path="/ranks", name="Ranks", title="rldiag · Ranks", order=7)

METRIC: str = "ranks-metric"
GRAPHS: str = "ranks-graphs"
NOTE: str = "ranks-note"
GRAPH: str = "ranks-graph"
"""Type of the pattern id of each run's figure: ``{"type": GRAPH, "run": run_id}``."""
DEFAULT_METRIC = "ratio/logabs_p999"
MAD_SCALE = 1.4826
"""MAD x 1.4826 estimates the standard deviation of a normal sample."""


def metric_names(run_ids: list[str]) -> list[str]:
    """Registry metrics, in registry order (a metric without per-rank data says so on its figure: checking
    every metric first would finalize all of them, seconds on a long run)."""
    return list(panels.registry())


def layout(run: Any = None, metric: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Ranks",
            runs,
            error=error,
            intro="Each data-parallel rank's value of one metric, and how far each rank sits from the others at "
            "every step (robust z: (value − median) / (1.4826 · MAD) across ranks). One bad rank is one bright "
            "row. Drag to zoom; the steps are aggregated again at full resolution.",
        )
    ]
    if not runs:
        return html.Div(children)
    names = metric_names(runs)
    chosen = metric if isinstance(metric, str) and metric in names else None
    if chosen is None:
        chosen = DEFAULT_METRIC if DEFAULT_METRIC in names else (names[0] if names else None)
    children.append(
        html.Div(
            [
                html.Label("metric", htmlFor=METRIC, className="muted"),
                dcc.Dropdown(
                    id=METRIC,
                    options=[{"label": n, "value": n} for n in names],
                    value=chosen,
                    clearable=False,
                    searchable=True,
                    className="inline-dropdown",
                ),
                html.Div(id=NOTE, className="muted"),
            ],
            className="toolbar",
        )
    )
    children.append(
        html.Div(
            [
                html.Div(
                    dcc.Graph(
                        id={"type": GRAPH, "run": r},
                        config=cast(Any, ui.GRAPH_CONFIG),
                        style={"height": "520px"},
                        figure={"layout": {"height": 520}},
                    ),
                    className="card",
                )
                for r in runs
            ],
            id=GRAPHS,
        )
    )
    return html.Div(children)


# --- pure computation and figure ----------------------------------------------------------------------
def rank_matrix(frame: pl.DataFrame, metric: str) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(steps, ranks, values[ranks, steps]) of a ``step, rank, metric`` frame; missing cells are NaN."""
    if frame.height == 0 or metric not in frame.columns:
        return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0))
    steps, step_idx = np.unique(frame["step"].to_numpy(), return_inverse=True)
    ranks, rank_idx = np.unique(frame["rank"].to_numpy(), return_inverse=True)
    values = np.full((len(ranks), len(steps)), np.nan)
    values[rank_idx, step_idx] = data.to_numpy(frame, metric)
    return steps, [int(r) for r in ranks], values


def robust_z(values: np.ndarray) -> np.ndarray:
    """Per step (column): (value - median) / (1.4826 MAD) across ranks; 0 where the ranks agree exactly."""
    if values.size == 0:
        return values.copy()
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        med = np.nanmedian(values, axis=0, keepdims=True)
        dev = values - med
        mad = MAD_SCALE * np.nanmedian(np.abs(dev), axis=0, keepdims=True)
        # where most ranks agree exactly (MAD 0), scale by the mean absolute deviation instead, so a single
        # outlier among n identical ranks still gets a finite score (n - 1 of them: 7 with 8 ranks)
        mean_abs = np.nanmean(np.abs(dev), axis=0, keepdims=True)
        scale = np.where(mad > 0, mad, mean_abs)
        z = np.where(scale > 0, dev / scale, np.where(np.isnan(dev), np.nan, 0.0))
    return z


class _quiet_nan:
    """Silence numpy's 'All-NaN slice' and 'Mean of empty slice' warnings (a step no rank recorded)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def bucket_columns(
    steps: np.ndarray, x_range: tuple[float, float] | None = None, buckets: int = DEFAULT_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """(column indices kept in ``x_range``, bucket id of each) with at most ``buckets`` equal-width buckets."""
    keep = np.arange(len(steps))
    if x_range is not None and len(steps):
        lo, hi = sorted(x_range)
        keep = np.flatnonzero((steps >= lo) & (steps <= hi))
    if len(keep) <= buckets:
        return keep, np.arange(len(keep))
    s = steps[keep].astype(np.float64)
    width = (s[-1] - s[0]) / buckets or 1.0
    ids = np.minimum(((s - s[0]) / width).astype(np.int64), buckets - 1)
    return keep, ids


def aggregate(
    steps: np.ndarray, values: np.ndarray, z: np.ndarray, x_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, values and z reduced to step buckets: each bucket keeps, per rank, the step whose |z| is
    largest (so a one-step outlier survives any zoom level) and is drawn at that bucket's first step."""
    keep, ids = bucket_columns(steps, x_range)
    if len(keep) == 0:
        return steps[:0], values[:, :0], z[:, :0]
    if len(ids) and ids[-1] == len(ids) - 1:  # one column per bucket: nothing to merge
        return steps[keep], values[:, keep], z[:, keep]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    zz = np.abs(np.nan_to_num(z[:, keep], nan=-1.0))
    out_v = np.empty((values.shape[0], len(starts)))
    out_z = np.empty_like(out_v)
    bounds = np.r_[starts, len(keep)]
    for j in range(len(starts)):
        a, b = bounds[j], bounds[j + 1]
        pick = a + np.argmax(zz[:, a:b], axis=1)
        cols = keep[pick]
        out_v[:, j] = values[np.arange(values.shape[0]), cols]
        out_z[:, j] = z[np.arange(values.shape[0]), cols]
    return steps[keep][starts], out_v, out_z


def worst_rank(steps: np.ndarray, ranks: list[int], z: np.ndarray) -> tuple[int, int, float] | None:
    """(rank, step, |z|) of the largest deviation, or None when no rank differs."""
    if z.size == 0 or not np.isfinite(z).any():
        return None
    flat = np.nanargmax(np.abs(np.nan_to_num(z, nan=0.0)))
    i, j = np.unravel_index(flat, z.shape)
    score = float(abs(z[i, j]))
    return (ranks[i], int(steps[j]), score) if score > 0 else None


def rank_figure(
    frame: pl.DataFrame,
    metric: str,
    *,
    title: str,
    x_range: tuple[float, float] | None = None,
    height: int = 520,
    restarts: Mapping[int, Sequence[int]] | None = None,
    gaps: Sequence[tuple[int, int]] = (),
) -> go.Figure:
    """One line per rank (top) and the rank x step heatmap of robust z (bottom), sharing the step axis;
    ``restarts`` (step -> the ranks restarted there: ``Resume.restarted_ranks``) as grey dotted lines across
    both, each naming its ranks; ``gaps`` ((first, last) step of each range a restart left without data:
    ``Resume.gaps``) break the lines and leave an empty column in the heatmap."""
    steps, ranks, values = rank_matrix(frame, metric)
    if not ranks or not np.isfinite(values).any():
        return figures.empty_figure(f"no per-rank values of {metric} in this run", height=height)
    z = robust_z(values)
    worst = worst_rank(steps, ranks, z)
    xs, vs, zs = aggregate(steps, values, z, x_range)
    cut = np.asarray(runformat.gap_breaks(np.asarray(xs).tolist(), gaps), dtype=np.int64)
    if cut.size:  # a NaN column halfway between the steps on either side of each gap
        xs = np.insert(np.asarray(xs, dtype=np.float64), cut + 1, (xs[cut] + xs[cut + 1]) / 2)
        vs, zs = (np.insert(np.asarray(a, dtype=np.float64), cut + 1, np.nan, axis=1) for a in (vs, zs))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.6, 0.4])
    for i, r in enumerate(ranks):
        is_worst = worst is not None and r == worst[0] and worst[2] >= 3.0
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=vs[i],
                mode=figures.line_mode(vs[i]),
                name=f"rank {r}",
                line=dict(
                    color=figures.PALETTE[i % len(figures.PALETTE)] if len(ranks) <= 10 or is_worst else "#9aa4b1",
                    width=2.2 if is_worst else 1.0,
                ),
                opacity=1.0 if is_worst or len(ranks) <= 10 else 0.6,
                hovertemplate=f"rank {r}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    limit = float(np.nanmax(np.abs(zs))) if np.isfinite(zs).any() else 1.0
    limit = max(min(limit, 10.0), 3.0)
    fig.add_trace(
        go.Heatmap(
            x=xs,
            y=[str(r) for r in ranks],
            z=zs.astype(np.float32),
            zmin=-limit,
            zmax=limit,
            zmid=0.0,
            colorscale="RdBu_r",
            colorbar=dict(title=dict(text="robust z"), thickness=12, len=0.4, y=0.2),
            hovertemplate="rank %{y}<br>step %{x}<br>robust z %{z:.2f}<extra></extra>",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    verdict = f"rank {worst[0]} deviates most: |z| {worst[2]:.1f} at step {worst[1]}" if worst else "all ranks agree"
    fig.update_layout(
        title=dict(text=f"{title} — {verdict}", x=0.01, font=dict(size=13)),
        height=height,
        margin=dict(l=55, r=15, t=40, b=20),
        paper_bgcolor="white",
        plot_bgcolor="white",
        hovermode="closest",
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
    )
    fig.update_yaxes(title_text=metric, row=1, col=1, gridcolor="#ebeef2")
    fig.update_yaxes(title_text="rank", type="category", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1, gridcolor="#ebeef2")
    for step, who in list((restarts or {}).items())[:200]:
        label = "restart: rank " + ", ".join(map(str, who[:4])) + (" …" if len(who) > 4 else "")
        fig.add_vline(x=step, line=dict(color=figures.RESTART_COLOR, width=1, dash="dot"))  # both subplots
        fig.add_annotation(
            x=step,
            y=1.0,
            xref="x",
            yref="paper",
            text=label,
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            font=dict(size=10, color=figures.RESTART_COLOR),
        )
    return fig


def zoom_of(relayout: dict[str, Any] | None) -> tuple[float, float] | None:
    """The x range of a plotly relayout event (either subplot's axis); None on reset or anything else."""
    if not isinstance(relayout, dict):
        return None
    for axis in ("xaxis", "xaxis2"):
        pair = (relayout.get(f"{axis}.range[0]"), relayout.get(f"{axis}.range[1]"))
        if pair[0] is None:
            rng = relayout.get(f"{axis}.range")
            pair = tuple(rng) if isinstance(rng, list) and len(rng) == 2 else (None, None)
        try:
            lo, hi = float(pair[0]), float(pair[1])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if np.isfinite(lo) and np.isfinite(hi):
            return (lo, hi)
    return None


def run_figure(run_id: str, metric: str | None, x_range: tuple[float, float] | None = None) -> Any:
    if not metric:
        return figures.empty_figure("no metric with data in this run")
    st = data.catalog().state(run_id)
    try:
        frame = st.rank_metrics(metric)
    except ValueError as exc:
        return figures.empty_figure(str(exc))
    title = f"{metric} per rank — {plot_text(run_id)}"
    return rank_figure(
        frame,
        metric,
        title=title,
        x_range=x_range,
        restarts=st.run.resume.restarted_ranks(),
        gaps=st.run.resume.gap_ranges(),
    )


@callback(
    Output({"type": GRAPH, "run": MATCH}, "figure"),
    Input(METRIC, "value"),
    Input({"type": GRAPH, "run": MATCH}, "relayoutData"),
    Input(ids.DATA_VERSION, "data"),
    State({"type": GRAPH, "run": MATCH}, "id"),
)
def update_rank_figure(metric: str | None, relayout: Any, _version: int, graph_id: dict[str, str]) -> Any:
    x_range = None
    if isinstance(dash.ctx.triggered_id, dict):  # this graph's relayout: a zoom, a reset, or nothing to redo
        x_range = zoom_of(relayout)
        redraw = isinstance(relayout, dict) and any(k.endswith("autorange") or k == "autosize" for k in relayout)
        if x_range is None and not redraw:
            raise PreventUpdate
    good = data.catalog().valid_ids([graph_id.get("run", "")])
    if not good:
        return figures.empty_figure("unknown run")
    return run_figure(good[0], metric, x_range)


@callback(Output(NOTE, "children"), Input(ids.PAGE_RUNS, "data"))
def rank_note(runs: list[str] | None) -> str:
    cat = data.catalog()
    parts = []
    for r in cat.valid_ids(runs or []):
        parts.append(f"{r}: {len(cat.state(r).run.ranks)} rank(s)")
    return " · ".join(parts)
