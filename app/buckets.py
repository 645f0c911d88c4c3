"""Step x bucket heatmaps of ``Run.bucket_metrics`` for every selected run, re-aggregated on zoom.

A :class:`BucketView` is the toolbar (bucket kind, quantity) and one heatmap per selected run, side by side in
the page grid. Each heatmap covers the steps :meth:`app.data.RunState.analysis_steps` chooses: all steps of a
short run, evenly spaced ones of a long run; dragging over a heatmap computes the table again on the steps of
that range (more of them, down to every step), double click resets. A click on a cell opens that run's tokens
at that step. The Positions page shows position/stage/turn buckets, the Mismatch page probability and routing
buckets (``by="prob"``, ``by="route"``), each through one view defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import polars as pl
from dash import ALL, MATCH, Input, Output, State, callback, ctx, dcc, html
from dash.exceptions import PreventUpdate

from app import data, figures, ids
from app import layout as ui
from app.security import plot_text

KEYS = {"step", "bucket", "pos", "stage", "turn", "prob", "route", "bucket_lo", "bucket_hi", "lo", "hi"}
"""Key columns of a bucket table (everything else numeric is a quantity)."""
NEEDS = {
    "prob": "rollout_logp (the inference engine's log-probs)",
    "route": "route_agree (the share of a token's experts the trainer and the engine routed alike)",
    "stage": "stages",
    "turn": "turns",
}


def quantities(frame: pl.DataFrame) -> list[str]:
    """Numeric value columns of a bucket table (everything but the keys), the token count ``n`` last."""
    names = [c for c, t in frame.schema.items() if c not in KEYS and t.is_numeric()]
    return sorted(names, key=lambda c: c == "n")


def zoom_of(relayout: Any) -> tuple[float, float] | None:
    """The x range of a plotly relayout event; None for a reset or anything else."""
    if not isinstance(relayout, dict):
        return None
    pair: Any = (relayout.get("xaxis.range[0]"), relayout.get("xaxis.range[1]"))
    if pair[0] is None and isinstance(relayout.get("xaxis.range"), list):
        pair = relayout["xaxis.range"]
    try:
        lo, hi = float(pair[0]), float(pair[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def table(run_id: str, by: str, x_range: tuple[float, float] | None = None) -> pl.DataFrame:
    """The bucket table of one run (cached per data version and step selection)."""
    return data.catalog().state(run_id).bucket_metrics(by, x_range)


def bucket_labels(frame: pl.DataFrame) -> dict[str, str]:
    """``{bucket id: "lo–hi"}`` for tables whose buckets are value ranges (``bucket_lo``/``bucket_hi``)."""
    if not {"bucket", "bucket_lo", "bucket_hi"} <= set(frame.columns):
        return {}
    rows = frame.select("bucket", "bucket_lo", "bucket_hi").unique(subset="bucket").sort("bucket")
    out = {}
    for b, lo, hi in rows.iter_rows():
        out[str(b)] = f"{_num(lo)}–{_num(hi)}"
    return out


def _num(v: Any) -> str:
    return "?" if v is None else f"{float(v):.3g}"


def coverage(run_id: str, frame: pl.DataFrame, x_range: tuple[float, float] | None) -> str:
    """Which steps a table covers: all, or how many of the run's (or of the zoomed range's)."""
    st = data.catalog().state(run_id)
    steps = st.metrics(data.ALWAYS)["step"]
    if x_range is not None:
        lo, hi = sorted(x_range)
        steps = steps.filter((steps >= lo) & (steps <= hi))
    used, total = frame["step"].n_unique() if frame.height else 0, steps.len()
    where = " in the zoomed range" if x_range is not None else ""
    return f"{used} of {total} steps{where}, evenly spaced" if used < total else f"all {total} steps{where}"


@dataclass(frozen=True)
class BucketView:
    """A bucket-heatmap section: ``prefix`` makes its component ids unique; ``choices`` are (label, by)."""

    prefix: str
    choices: tuple[tuple[str, str], ...]

    @property
    def by_id(self) -> str:
        return f"{self.prefix}-by"

    @property
    def quantity_id(self) -> str:
        return f"{self.prefix}-quantity"

    @property
    def note_id(self) -> str:
        return f"{self.prefix}-note"

    @property
    def graph_type(self) -> str:
        return f"{self.prefix}-graph"

    def graph_id(self, run_id: str) -> dict[str, str]:
        return {"type": self.graph_type, "run": run_id}

    def layout(self, runs: list[str], *, height: int = 380) -> html.Div:
        """The toolbar and one heatmap card per run (a grid: side by side when the page is wide)."""
        cards = [
            html.Div(
                dcc.Loading(
                    dcc.Graph(
                        id=self.graph_id(r),
                        config=cast(Any, ui.GRAPH_CONFIG),
                        style={"height": f"{height}px"},
                        figure={"layout": {"height": height}},
                    ),
                    type="dot",
                ),
                className="card",
            )
            for r in runs
        ]
        return html.Div(
            [
                html.Div(
                    [
                        dcc.RadioItems(
                            id=self.by_id,
                            options=[{"label": label, "value": v} for label, v in self.choices],
                            value=self.choices[0][1],
                            inline=True,
                            className="radio",
                        ),
                        dcc.Dropdown(
                            id=self.quantity_id, options=[], value=None, clearable=False, className="inline-dropdown"
                        ),
                        html.Div(id=self.note_id, className="muted"),
                    ],
                    className="toolbar",
                ),
                html.Div(cards, className="grid" if len(runs) > 1 else ""),
            ]
        )

    # -- callback bodies (registered by :func:`register`) -----------------------------------------------
    def options(self, runs: list[str] | None, by: str, current: str | None) -> tuple[list[dict], str | None, str]:
        """Quantities of the first run that has a table, the chosen one, and a note on the others."""
        good = data.catalog().valid_ids(runs or [])
        names: list[str] = []
        notes = []
        for r in good:
            try:
                frame = table(r, by)
            except ValueError as exc:  # this rldiag cannot build such a table (yet): say so, once
                return [], None, f"{by} buckets are not available: {exc}"
            if frame.height == 0:
                notes.append(f"{r}: no {by} data" + (f": record {NEEDS[by]}" if by in NEEDS else ""))
            elif not names:
                names = quantities(frame)
        value = current if current in names else (names[0] if names else None)
        return [{"label": n, "value": n} for n in names], value, " · ".join(notes)

    def figure(self, run_id: str, by: str, quantity: str | None, relayout: Any, *, zoomed: bool) -> Any:
        """The heatmap of one run: the whole run, or the zoomed range aggregated again."""
        x_range = zoom_of(relayout) if zoomed else None
        if (
            zoomed
            and x_range is None
            and not (isinstance(relayout, dict) and any(k.endswith("autorange") or k == "autosize" for k in relayout))
        ):
            raise PreventUpdate  # a relayout that is neither a zoom nor a reset
        try:
            frame = table(run_id, by, x_range)
        except ValueError as exc:
            return figures.empty_figure(f"no {by} buckets: {exc}")
        if frame.height == 0:
            hint = f": record {NEEDS[by]}" if by in NEEDS else ""
            return figures.empty_figure(f"{run_id}: no {by} data{hint}")
        if not quantity or quantity not in frame.columns:
            names = quantities(frame)
            quantity = names[0] if names else None
        if quantity is None:
            return figures.empty_figure("no quantities")
        fig = figures.bucket_heatmap(frame, quantity, by=by)
        labels = bucket_labels(frame)
        if labels:  # value buckets (probability, routing agreement): name each by its range, not its index
            fig.update_yaxes(tickvals=list(labels), ticktext=list(labels.values()))
        fig.update_layout(
            title=dict(
                text=f"{plot_text(run_id)}<br><span style='font-size:11px'>{plot_text(quantity)} by {by} · "
                f"{coverage(run_id, frame, x_range)}</span>",
                y=0.97,
            ),
            margin=dict(t=52),
        )
        return fig


def register(view: BucketView) -> None:
    """Register the callbacks of ``view``: called at the top of the page module that shows it (Dash executes
    page modules once per app, and each app takes the callbacks registered since the previous one)."""
    graph = {"type": view.graph_type, "run": MATCH}

    @callback(
        Output(view.quantity_id, "options"),
        Output(view.quantity_id, "value"),
        Output(view.note_id, "children"),
        Input(ids.PAGE_RUNS, "data"),
        Input(view.by_id, "value"),
        State(view.quantity_id, "value"),
    )
    def _options(runs: list[str] | None, by: str, current: str | None) -> tuple[Any, ...]:
        return view.options(runs, by, current)

    @callback(
        Output(graph, "figure"),
        Input(view.by_id, "value"),
        Input(view.quantity_id, "value"),
        Input(ids.DATA_VERSION, "data"),
        Input(graph, "relayoutData"),
        State(graph, "id"),
    )
    def _figure(by: str, quantity: str | None, _version: int, relayout: Any, graph_id: dict[str, str]) -> Any:
        good = data.catalog().valid_ids([str(graph_id.get("run", ""))])
        if not good:
            return figures.empty_figure("unknown run")
        return view.figure(good[0], by, quantity, relayout, zoomed=isinstance(ctx.triggered_id, dict))

    @callback(
        Output(ids.REDIRECT, "href", allow_duplicate=True),
        Input({"type": view.graph_type, "run": ALL}, "clickData"),
        prevent_initial_call=True,
    )
    def _click(_clicks: list[Any]) -> str:
        trigger, click = ctx.triggered_id, (ctx.triggered[0]["value"] if ctx.triggered else None)
        return click_href(trigger, click)


def click_href(trigger: Any, click: Any) -> str:
    """Tokens page of the clicked heatmap's run at the clicked step."""
    if not isinstance(trigger, dict) or not isinstance(click, dict) or not click.get("points"):
        raise PreventUpdate
    run_id = str(trigger.get("run", ""))
    try:
        step = int(round(float(click["points"][0].get("x"))))
    except (TypeError, ValueError, OverflowError):
        raise PreventUpdate from None
    if not data.catalog().valid_ids([run_id]):
        raise PreventUpdate
    return "/tokens" + ui.run_query([run_id], step=step)


POSITIONS = BucketView("pos-buckets", (("position", "pos"), ("stage", "stage"), ("turn", "turn")))
MISMATCH = BucketView("mm-buckets", (("rollout probability", "prob"), ("routing agreement", "route")))
