"""The Dash app shell: header, navigation, live polling, click-to-tokens, and the safety switches.

``create_app(path)`` builds one app bound to one folder of runs (or one run). Pages live in
:mod:`app.pages` and register themselves with ``dash.register_page``; this module only holds what every page
shares. Run it with ``rldiag dashboard [PATH]`` or, for development::

    from app.app import create_app
    create_app("sample_logs").run(port=8050)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import threading
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

import dash
from dash import ALL, MATCH, Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from app import data, figures, ids, layout, panels
from app.layout import query_runs, run_query

PACKAGE_DIR = Path(__file__).resolve().parent
POLL_SECONDS = 2.0
"""Default polling interval of live runs."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
PAGE_LOCATION = "_pages_location"
"""Dash's own ``dcc.Location`` of the page router (public since Dash 2.5 as ``dash.page_container``)."""


# --- where the runs are -------------------------------------------------------------------------------
def sample_logs_path() -> Path | None:
    """The bundled sample runs: installed inside the package, or ``sample_logs/`` of a source checkout."""
    env = os.environ.get("RLDIAG_SAMPLE_LOGS")
    candidates = [Path(env)] if env else []
    try:
        from importlib.resources import files

        candidates.append(Path(str(files("rldiag") / "sample_logs")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - rldiag is always importable here
        pass
    candidates.append(PACKAGE_DIR.parent / "sample_logs")
    for c in candidates:
        if c.is_dir() and any(data.discover(c)):
            return c
    return None


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` -> (user, pass); None stays None. Raises ValueError with what to do."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD (both non-empty), e.g. --auth alice:s3cret")
    return user, password


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """A warning to print when the server listens beyond this machine (None on loopback)."""
    if host in LOOPBACK_HOSTS:
        return None
    msg = (
        f"warning: the dashboard listens on {host}, so anyone who can reach this machine's port can read "
        "these runs (token ids, decoded text, configs)."
    )
    if auth is None:
        msg += " Add --auth USER:PASSWORD, or bind to 127.0.0.1 and use an SSH tunnel."
    else:
        msg += " Basic auth is on, but the connection is plain HTTP: put it behind TLS (a reverse proxy)."
    return msg


def install_basic_auth(server: Any, user: str, password: str, realm: str = "rldiag") -> None:
    """Require HTTP basic authentication on every route of a Flask ``server`` (assets included)."""
    import flask

    expected = f"{user}:{password}".encode()

    def check() -> Any:
        header = flask.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
            if hmac.compare_digest(given, expected):
                return None
        return flask.Response(
            "authentication required\n", 401, {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'}
        )

    # Run before Dash's own hooks so nothing (not even the first-request setup) happens unauthenticated.
    server.before_request_funcs.setdefault(None, []).insert(0, check)


# --- the shell ------------------------------------------------------------------------------------------
NAV_PAGES = (
    ("Runs", "/"),
    ("Overview", "/overview"),
    ("Ratios & trust region", "/ratios"),
    ("Clipping & balance", "/clipping"),
    ("Entropy", "/entropy"),
    ("Mismatch & staleness", "/mismatch"),
    ("Positions & stages", "/positions"),
    ("Ranks", "/ranks"),
    ("Tokens", "/tokens"),
    ("Cliff calculator", "/cliff"),
    ("Alerts", "/alerts"),
)


def shell(poll_seconds: float) -> html.Div:
    return html.Div(
        [
            html.Header(
                [
                    html.Div(
                        [
                            html.Span("rldiag", className="brand"),
                            html.Span("RL training diagnostics", className="brand-sub"),
                        ],
                        className="brand-box",
                    ),
                    html.Nav(id=ids.NAV, className="nav"),
                    html.Div(
                        [
                            dcc.Checklist(
                                id=ids.LIVE_TOGGLE,
                                options=[{"label": " live", "value": "live"}],
                                value=["live"],
                                className="live-toggle",
                                persistence=True,
                            ),
                            html.Span(id=ids.LIVE_BADGE, className="badge"),
                        ],
                        className="controls",
                    ),
                    view_bar(),
                ],
                className="header",
            ),
            dcc.Location(id=ids.REDIRECT, refresh="callback-nav"),
            dcc.Interval(id=ids.LIVE_INTERVAL, interval=int(poll_seconds * 1000), n_intervals=0),
            dcc.Store(id=ids.PAGE_RUNS, data=[]),
            dcc.Store(id=ids.DATA_VERSION, data=0),
            dcc.Store(id=ids.LIVE_PAYLOAD, data=None),
            dcc.Download(id=ids.PANEL_DOWNLOAD),
            html.Main(dash.page_container, className="main"),
        ]
    )


def view_bar() -> html.Div:
    """How every line panel is drawn: smoothing (its value shown), x axis, on-policy steps, metric search."""
    return html.Div(
        [
            dcc.Input(
                id=ids.METRIC_SEARCH,
                type="search",
                placeholder="search metrics",
                debounce=False,
                className="metric-search",
                autoComplete="off",
            ),
            html.Span(id=ids.SEARCH_NOTE, className="search-note"),
            html.Label("x", htmlFor=ids.X_AXIS, className="smooth-label"),
            dcc.Dropdown(
                id=ids.X_AXIS,
                options=[{"label": label, "value": value} for value, label in figures.X_MODES.items()],
                value="step",
                clearable=False,
                searchable=False,
                className="x-axis",
                persistence=True,
            ),
            dcc.Checklist(
                id=ids.ONPOLICY,
                options=[{"label": " hide on-policy steps", "value": "hide"}],
                value=[],
                className="live-toggle",
                persistence=True,
            ),
            html.Label("smoothing", htmlFor=ids.SMOOTHING, className="smooth-label"),
            html.Div(
                dcc.Slider(
                    id=ids.SMOOTHING,
                    min=0,
                    max=0.99,
                    step=0.01,
                    value=0.6,
                    marks=None,
                    persistence=True,
                ),
                className="smooth-slider",
            ),
            html.Span(id=ids.SMOOTHING_VALUE, className="smooth-value"),
        ],
        className="view-bar",
    )


def nav_links(pathname: str | None, search: str | None) -> list[Any]:
    runs = query_runs(search)
    links = []
    for label, path in NAV_PAGES:
        href = path + (run_query(runs) if path not in ("/", "/cliff") else "")
        cls = "nav-link active" if (pathname or "/") == path else "nav-link"
        links.append(dcc.Link(label, href=href, className=cls))
    return links


# --- callbacks of the shell -------------------------------------------------------------------------------
def _all(kind: str) -> dict[str, Any]:
    return {"type": kind, "page": ALL, "key": ALL, "metrics": ALL}


def _match(kind: str) -> dict[str, Any]:
    return {"type": kind, "page": MATCH, "key": MATCH, "metrics": MATCH}


def _register_shell_callbacks(app: dash.Dash) -> None:
    @app.callback(Output(ids.NAV, "children"), Input(PAGE_LOCATION, "pathname"), Input(PAGE_LOCATION, "search"))
    def _nav(pathname: str | None, search: str | None) -> list[Any]:
        return nav_links(pathname, search)

    @app.callback(Output(ids.PAGE_RUNS, "data"), Input(PAGE_LOCATION, "search"))
    def _page_runs(search: str | None) -> list[str]:
        return layout.resolve_runs(query_runs(search))[0]

    # In the browser: turn plotly's relayout events into the zoom range the server must aggregate. Reading the
    # figure here costs nothing; sent to the server it would cost the whole figure on every event.
    app.clientside_callback(
        ZOOM_JS,
        Output(_match(ids.PANEL_ZOOM), "data"),
        Input(_match(ids.PANEL), "relayoutData"),
        State(_match(ids.PANEL), "figure"),
        prevent_initial_call=True,
    )
    app.clientside_callback(
        "function(v) { return v === undefined || v === null ? '' : Number(v).toFixed(2); }",
        Output(ids.SMOOTHING_VALUE, "children"),
        Input(ids.SMOOTHING, "value"),
    )
    app.clientside_callback(
        SEARCH_JS,
        Output(_all(ids.PANEL_CARD), "style"),
        Input(ids.METRIC_SEARCH, "value"),
        State(_all(ids.PANEL_CARD), "id"),
    )

    @app.callback(Output(ids.SEARCH_NOTE, "children"), Input(ids.METRIC_SEARCH, "value"))
    def _search_note(term: str | None) -> Any:
        return search_note(term)

    @app.callback(
        Output(_match(ids.PANEL), "figure"),
        Output(_match(ids.PANEL_SIG), "data"),
        Input(ids.PAGE_RUNS, "data"),
        Input(ids.SMOOTHING, "value"),
        Input(ids.X_AXIS, "value"),
        Input(ids.ONPOLICY, "value"),
        Input(_match(ids.PANEL_ZOOM), "data"),
        Input(_match(ids.PANEL_OPTS), "value"),
        State(_match(ids.PANEL), "id"),
    )
    def _panel(
        runs: list[str] | None,
        smoothing: float | None,
        x_mode: str | None,
        onpolicy: list[str] | None,
        zoom: dict[str, Any] | None,
        opts: list[str] | None,
        panel_id: dict[str, str],
    ) -> tuple[Any, Any]:
        spec = render_panel(
            panel_id,
            runs or [],
            smoothing or 0.0,
            zoom_range(zoom),
            x_mode=x_mode or "step",
            log_y="log" in (opts or []),
            hide_onpolicy="hide" in (onpolicy or []),
        )
        return spec, panel_sig(spec)

    @app.callback(
        Output(ids.PANEL_DOWNLOAD, "data"),
        Input(_all(ids.PANEL_CSV), "n_clicks"),
        State(ids.PAGE_RUNS, "data"),
        State(ids.X_AXIS, "value"),
        prevent_initial_call=True,
    )
    def _csv(clicks: list[int | None], runs: list[str] | None, x_mode: str | None) -> Any:
        if not ctx.triggered_id or not any(clicks):
            raise PreventUpdate
        return panel_download(ctx.triggered_id, runs or [])

    @app.callback(
        Output(ids.REDIRECT, "href", allow_duplicate=True),
        Input(ids.RUN_PICKER, "value"),
        State(PAGE_LOCATION, "pathname"),
        State(PAGE_LOCATION, "search"),
        prevent_initial_call=True,
    )
    def _pick_runs(value: list[str] | str | None, pathname: str | None, search: str | None) -> str:
        runs = [value] if isinstance(value, str) else list(value or [])
        if runs == query_runs(search) or not runs:
            raise PreventUpdate
        step = parse_qs((search or "").lstrip("?")).get("step", [None])[0]
        return (pathname or "/overview") + run_query(runs, step=step)

    @app.callback(
        Output(ids.REDIRECT, "href", allow_duplicate=True),
        Input(_all(ids.PANEL), "clickData"),
        Input({"type": ids.CLICKABLE, "key": ALL}, "clickData"),
        State(ids.PAGE_RUNS, "data"),
        prevent_initial_call=True,
    )
    def _click_to_tokens(_panels: list[Any], _others: list[Any], runs: list[str] | None) -> str:
        return click_target(ctx.triggered_id, ctx.triggered[0]["value"] if ctx.triggered else None, runs or [])

    @app.callback(Output(ids.LIVE_INTERVAL, "disabled"), Input(ids.LIVE_TOGGLE, "value"))
    def _pause(value: list[str] | None) -> bool:
        return "live" not in (value or [])

    @app.callback(
        Output(ids.LIVE_PAYLOAD, "data"),
        Output(ids.DATA_VERSION, "data"),
        Output(ids.LIVE_BADGE, "children"),
        Output(ids.LIVE_BADGE, "className"),
        Input(ids.LIVE_INTERVAL, "n_intervals"),
        State(ids.PAGE_RUNS, "data"),
        State(_all(ids.PANEL), "id"),
        State(_all(ids.PANEL_ZOOM), "data"),
        State(_all(ids.PANEL_OPTS), "value"),
        State(_all(ids.PANEL_SIG), "data"),
        State(ids.SMOOTHING, "value"),
        State(ids.X_AXIS, "value"),
        State(ids.ONPOLICY, "value"),
        State(ids.DATA_VERSION, "data"),
        State(ids.LIVE_TOGGLE, "value"),
        prevent_initial_call=True,
    )
    def _tick(
        _n: int,
        runs: list[str] | None,
        panel_ids: list[dict[str, str]],
        zooms: list[Any],
        opts: list[Any],
        sigs: list[Any],
        smoothing: float | None,
        x_mode: str | None,
        onpolicy: list[str] | None,
        version: int | None,
        live: list[str] | None,
    ) -> tuple[Any, ...]:
        # the four pattern lists follow the page's component order, one of each per card (layout.panel_card)
        extends, figs, new_sigs, new_version, badge, badge_class = live_tick(
            runs or [],
            panel_ids,
            smoothing or 0.0,
            version or 0,
            paused="live" not in (live or []),
            sigs=sigs,
            zooms=zooms,
            opts=opts,
            x_mode=x_mode or "step",
            hide_onpolicy="hide" in (onpolicy or []),
        )
        payload = live_payload(panel_ids, sigs, extends, figs, new_sigs)
        return (payload if payload else no_update), new_version, badge, badge_class

    # In the browser: apply a tick's answer to the panels. Two ticks can be in flight at once and answer out of
    # order, so an extension is applied only to a panel that still shows what the server extended (its store
    # holds the same data versions); a new figure always applies (a stale one is redrawn by the next tick).
    app.clientside_callback(
        APPLY_JS,
        Output(_all(ids.PANEL), "extendData"),
        Output(_all(ids.PANEL), "figure", allow_duplicate=True),
        Output(_all(ids.PANEL_SIG), "data", allow_duplicate=True),
        Input(ids.LIVE_PAYLOAD, "data"),
        State(_all(ids.PANEL), "id"),
        State(_all(ids.PANEL_SIG), "data"),
        prevent_initial_call=True,
    )


def panel_key(panel_id: dict[str, str]) -> str:
    """A line panel's id as one string (the key of a live payload)."""
    return f"{panel_id.get('page')}|{panel_id.get('key')}|{panel_id.get('metrics')}"


def live_payload(
    panel_ids: list[dict[str, str]], sigs: list[Any], extends: list[Any], figs: list[Any], new_sigs: list[Any]
) -> dict[str, Any]:
    """A tick's answer for :data:`APPLY_JS`: per panel key, ``ext`` (extendData, trace indices, the data
    versions it extends), ``fig`` (figure, sig) or ``sig`` (sig, the versions it replaces)."""
    out: dict[str, dict[str, Any]] = {"ext": {}, "fig": {}, "sig": {}}
    for i, pid in enumerate(panel_ids):
        k = panel_key(pid)
        base = (sigs[i] or {}).get("v") if i < len(sigs) and sigs[i] else None
        if figs[i] is not no_update:
            out["fig"][k] = [figs[i], new_sigs[i]]
        elif extends[i] is not no_update:
            out["ext"][k] = [extends[i][0], extends[i][1], base, new_sigs[i]]
        elif new_sigs[i] is not no_update:
            out["sig"][k] = [new_sigs[i], base]
    return out if any(out.values()) else {}


APPLY_JS = """
function(payload, ids, sigs) {
    const skip = window.dash_clientside.no_update;
    const ext = [], figs = [], out = [];
    const same = (a, b) => JSON.stringify(a || null) === JSON.stringify(b || null);
    ids.forEach((id, i) => {
        const k = id.page + "|" + id.key + "|" + id.metrics;
        const cur = (sigs[i] || {}).v;
        let e = skip, f = skip, s = skip;
        if (payload && payload.fig && payload.fig[k]) {
            f = payload.fig[k][0]; s = payload.fig[k][1];
        } else if (payload && payload.ext && payload.ext[k] && same(cur, payload.ext[k][2])) {
            e = [payload.ext[k][0], payload.ext[k][1]]; s = payload.ext[k][3];
        } else if (payload && payload.sig && payload.sig[k] && same(cur, payload.sig[k][1])) {
            s = payload.sig[k][0];
        }
        ext.push(e); figs.push(f); out.push(s);
    });
    return [ext, figs, out];
}
"""


ZOOM_JS = """
function(relayout, figure) {
    const skip = window.dash_clientside.no_update;
    if (!relayout) { return skip; }
    if (relayout["xaxis.autorange"]) { return {range: null}; }
    let r = null;
    if ("xaxis.range[0]" in relayout && "xaxis.range[1]" in relayout) {
        r = [relayout["xaxis.range[0]"], relayout["xaxis.range[1]"]];
    } else if (Array.isArray(relayout["xaxis.range"])) {
        r = relayout["xaxis.range"];
    }
    if (r) { return {range: r}; }
    // The first autosize of a graph can cancel its initial render (the renderer keeps the newest request
    // per output): ask again while the figure is still empty; later resizes keep the zoomed data.
    if (relayout.autosize && !(figure && figure.data && figure.data.length)) { return {range: null, t: Date.now()}; }
    return skip;
}
"""

SEARCH_JS = """
function(term, cards) {
    // Show the panels whose metric names contain every word of the search box (case-insensitive).
    const words = (term || "").toLowerCase().split(/\\s+/).filter(w => w.length > 0);
    return cards.map(id => {
        const names = (id.metrics || "").toLowerCase();
        return words.every(w => names.includes(w)) ? {} : {display: "none"};
    });
}
"""


def search_note(term: str | None, *, limit: int = 8) -> list[Any]:
    """Metrics of the registry matching the search box, each linked to the page that charts it (the search
    filters the panels on this page; a metric charted elsewhere is one click away)."""
    words = [w for w in (term or "").lower().split() if w]
    if not words:
        return []
    hits = [name for name in panels.registry() if all(w in name.lower() for w in words)]
    if not hits:
        return ["no metric matches"]
    links: list[Any] = []
    for name in hits[:limit]:
        page = panels.page_of(name)
        if page is not None:
            links.append(dcc.Link(name, href=f"/{page}", className="chip"))
    more = len(hits) - limit
    return [*links, f" +{more} more" if more > 0 else ""]


def zoom_range(zoom: dict[str, Any] | None) -> tuple[float, float] | None:
    """The x range held by a panel's zoom store (None: the whole run)."""
    if not zoom or not isinstance(zoom.get("range"), (list, tuple)) or len(zoom["range"]) != 2:
        return None
    try:
        lo, hi = (float(v) for v in zoom["range"])
    except (TypeError, ValueError):
        return None
    return (lo, hi) if lo == lo and hi == hi else None


def _panel_metrics(panel_id: dict[str, str]) -> list[str]:
    return [m for m in panel_id.get("metrics", "").split(",") if m]


def _frame_columns(metrics: list[str]) -> list[str]:
    """The step-metric columns a panel needs: its metrics, and ratio/min, ratio/max for on-policy steps."""
    extra = ["ratio/min", "ratio/max"] if figures.onpolicy_applies(metrics) else []
    return list(dict.fromkeys([*metrics, *extra]))


def _run_columns(st: data.RunState, metrics: list[str], x_mode: str) -> list[str]:
    """:func:`_frame_columns`, plus the run's wall-clock scalar (``rec.log(step, {"time": time.time()})``)
    when the x axis shows wall time."""
    cols = _frame_columns(metrics)
    if x_mode == "time":
        logged = set(st.run.custom.names())
        cols += [c for c in figures.TIME_COLUMNS if c in logged]
    return cols


def render_panel(
    panel_id: dict[str, str],
    runs: list[str],
    smoothing: float,
    x_range: tuple[float, float] | None,
    *,
    x_mode: str = "step",
    log_y: bool = False,
    hide_onpolicy: bool = False,
    firing: dict[str, list[dict[str, Any]]] | None = None,
    frames_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Figure spec of one registry line panel for the runs on screen (runs that do not resolve are skipped).

    ``layout.meta["live"]`` records, per run, the data version and the last step drawn: a live tick compares
    them with the run's state to decide between ``extendData`` and a new figure. ``firing``: the runs' firing
    events when the caller read them already (a tick reads them once for all panels); ``frames_out`` receives
    the frames drawn.
    """
    metrics = _panel_metrics(panel_id)
    cat = data.catalog()
    frames, alerts, versions, lasts = {}, {}, {}, {}
    restarts: dict[str, list[tuple[int, int]]] = {}
    gaps: dict[str, list[tuple[int, int]]] = {}
    for run_id in cat.valid_ids(runs):
        st = cat.state(run_id)
        restarts[run_id] = [(int(r["step"]), int(r["rank"])) for r in st.run.resume.restarts]
        gaps[run_id] = st.run.resume.gap_ranges()
        versions[run_id] = st.version  # before the frame: a step read in between makes the next tick redraw
        frame = st.metrics(_run_columns(st, metrics, x_mode))  # only these columns are finalized on first use
        frames[run_id] = frame
        lasts[run_id] = int(frame["step"].max()) if frame.height else None  # type: ignore[arg-type]
        if panel_id.get("page") == "overview":
            alerts[run_id] = firing[run_id] if firing and run_id in firing else data.firing_events(st.alerts())
    if frames_out is not None:
        frames_out.update(frames)
    if not frames:
        return cast(dict[str, Any], figures.empty_figure("no run selected").to_plotly_json())
    spec = panels.spec_of(metrics[0]) if metrics else None
    out = figures.metric_panel_spec(
        frames,
        metrics,
        title="",  # the card names the panel above the chart, clear of the toolbar and the data
        unit=getattr(spec, "unit", "") or None,
        smoothing=smoothing,
        x_range=x_range,
        alerts=alerts,
        hlines=panels.reference_lines(metrics),
        height=280,
        no_data=panels.no_data_note(metrics),
        x_mode=x_mode,
        log_y=log_y,
        onpolicy=("hide" if hide_onpolicy else "show") if figures.onpolicy_applies(metrics) else None,
        run_order=runs,
        restarts=restarts,
        gaps=gaps,
    )
    out["layout"]["meta"]["live"] = {"v": versions, "last": lasts}
    return out


def panel_sig(spec: dict[str, Any]) -> dict[str, Any] | None:
    """What a live tick needs to know about a drawn panel (kept in the panel's ``PANEL_SIG`` store)."""
    meta = (spec.get("layout") or {}).get("meta") or {}
    if "live" not in meta:
        return None
    return {**meta["live"], "key": meta.get("key"), "alerts": meta.get("alerts")}


def panel_download(panel_id: Any, runs: list[str]) -> dict[str, Any]:
    """``dcc.Download`` data of a panel's numbers: every step of every run on screen, full resolution."""
    from app import export

    if not isinstance(panel_id, dict):
        raise PreventUpdate
    metrics = _panel_metrics(panel_id)
    cat = data.catalog()
    frames = {r: cat.state(r).metrics(metrics) for r in cat.valid_ids(runs)}
    if not frames or not metrics:
        raise PreventUpdate
    name = export.csv_name(str(panel_id.get("key", "panel")), list(frames))
    return cast(dict[str, Any], dcc.send_string(export.panel_csv(frames, metrics), name))


def click_target(triggered: Any, click: dict[str, Any] | None, runs: list[str]) -> str:
    """Where a click on a chart point leads: the Tokens page of that run at that step."""
    if not click or not click.get("points") or not runs or not isinstance(triggered, dict):
        raise PreventUpdate
    point = click["points"][0]
    custom = point.get("customdata")
    run = runs[0]
    x = point.get("x")
    if isinstance(custom, (list, tuple)) and len(custom) == 2 and custom[0] in runs:
        run, x = custom  # an alert or on-policy marker knows its run and step
    elif triggered.get("type") == ids.PANEL:
        if isinstance(custom, (int, float)):
            x = custom  # the step of a point drawn over tokens seen or wall time
        per_run = max(len(_panel_metrics(triggered)), 1) * figures.TRACES_PER_SERIES
        index = int(point.get("curveNumber", 0)) // per_run
        run = runs[min(index, len(runs) - 1)]
    try:
        step = int(round(float(x)))
    except (TypeError, ValueError):
        raise PreventUpdate from None
    return "/tokens" + run_query([run], step=step)


def live_tick(
    runs: list[str],
    panel_ids: list[dict[str, str]],
    smoothing: float,
    version: int,
    *,
    paused: bool = False,
    sigs: list[Any] | None = None,
    zooms: list[Any] | None = None,
    opts: list[Any] | None = None,
    x_mode: str = "step",
    hide_onpolicy: bool = False,
) -> tuple[Any, ...]:
    """One poll: read new files of the runs on screen and bring every line panel up to date.

    A panel whose only change is steps appended after the last one it shows gets ``extendData``; a panel
    whose layout changed (y range, the no-data note, alert marks, on-policy marks, aggregation), whose older
    steps grew (a rank or micro-batch published later), or that missed an update gets a new figure.
    ``sigs`` are the panels' ``PANEL_SIG`` stores (None: trust that every panel shows the data as of the
    previous tick, as a benchmark does). Returns (extendData per panel, figure per panel, sig per panel, data
    version, badge text, badge class).
    """
    cat = data.catalog()
    before, after, fresh, statuses = {}, {}, {}, []
    for run_id in cat.valid_ids(runs):
        st = cat.state(run_id)
        before[run_id] = st.version
        fresh[run_id] = st.update()
        after[run_id] = st.version
        statuses.append(st.status())
    badge, badge_class = _badge(statuses, paused)
    got_new = any(f.height for f in fresh.values())
    n = len(panel_ids)
    firing = (
        {r: data.firing_events(cat.state(r).alerts()) for r in after}
        if any(p.get("page") == "overview" for p in panel_ids)
        else {}
    )
    extends: list[Any] = [no_update] * n
    figs: list[Any] = [no_update] * n
    new_sigs: list[Any] = [no_update] * n
    for i, pid in enumerate(panel_ids):
        sig = sigs[i] if sigs is not None and i < len(sigs) else None
        if sigs is not None and not sig:
            continue  # not drawn yet: its own callback draws the current data
        data_changed = any(after[r] != (sig["v"].get(r) if sig else before[r]) for r in after) or (
            sig is not None and set(sig["v"]) != set(after)
        )
        alerts_changed = False
        if sig is not None and pid.get("page") == "overview":
            alerts_changed = figures.alert_key(firing) != sig.get("alerts")
        if not data_changed and not alerts_changed:
            continue
        metrics = _panel_metrics(pid)
        full: dict[str, Any] = {}
        opt = (opts[i] if opts is not None and i < len(opts) else None) or []
        zoom = zoom_range(zooms[i] if zooms is not None and i < len(zooms) else None)
        spec = render_panel(
            pid,
            runs,
            smoothing,
            zoom,
            x_mode=x_mode,
            log_y="log" in opt,
            hide_onpolicy=hide_onpolicy,
            firing=firing,
            frames_out=full,
        )
        new_sigs[i] = panel_sig(spec)
        if not alerts_changed and _appended_only(sig, spec, before, after, fresh):
            grown = {r: f for r, f in fresh.items() if after[r] != before[r]}
            payload = figures.extend_payload(
                grown,
                full,
                list(after),
                metrics,
                smoothing=smoothing,
                x_mode=x_mode,
                hide_onpolicy=hide_onpolicy and figures.onpolicy_applies(metrics),
            )
            if payload is not None:
                extends[i] = [payload[0], payload[1]]
            continue
        figs[i] = spec
    return extends, figs, new_sigs, (version + 1 if got_new else no_update), badge, badge_class


def _appended_only(
    sig: dict[str, Any] | None,
    spec: dict[str, Any],
    before: dict[str, int],
    after: dict[str, int],
    fresh: dict[str, Any],
) -> bool:
    """Whether the panel drawn as ``sig`` becomes ``spec`` by appending this tick's new steps: it showed every
    run as of just before this tick, only steps after its last one arrived, and the layout is unchanged."""
    meta = spec["layout"].get("meta") or {}
    if meta.get("aggregated"):
        return False  # buckets move as the run grows: redraw
    if sig is None:
        return True  # trusted caller (no stores): the panel showed the previous tick's data
    if meta.get("key") != sig.get("key") or list(meta.get("runs", [])) != list(sig["v"]):
        return False
    for r in after:
        if after[r] == before[r]:
            continue
        if sig["v"].get(r) != before[r] or after[r] != before[r] + 1:
            return False  # the panel missed an update (another tab's tick read it), or two ticks raced
        last = sig["last"].get(r)
        steps = fresh[r]["step"]
        if fresh[r].height and last is not None and int(steps.min()) <= int(last):
            return False  # a step it shows grew (a rank or micro-batch published later)
    return True


def _badge(statuses: list[str], paused: bool) -> tuple[str, str]:
    if not statuses:
        return ("", "badge")
    if "stalled" in statuses:
        return ("stalled", "badge badge-stalled")
    if paused:
        return ("paused", "badge badge-paused")
    if "live" in statuses:
        return ("live", "badge badge-live")
    return ("finished", "badge badge-finished")


PRELOAD_MODULES = (
    "numpy",
    "pandas",
    "pyarrow",
    "polars",
    "PIL.Image",
    "rldiag.metrics.registry",
    "rldiag.alerts.rules",
)
"""Imported before the server answers: plotly's JSON encoder looks these up in ``sys.modules`` without importing
them (``get_module(..., should_load=False)``), so a module that the background preload is still importing
would be found half-initialized by a request thread (``partially initialized module 'pandas' has no attribute
'NaT'`` on the first page load)."""


def import_before_serving(modules: tuple[str, ...] = PRELOAD_MODULES) -> None:
    """Import ``modules`` completely, in this thread (absent optional ones are skipped)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def preload(cat: data.Catalog, *, max_runs: int = 20) -> threading.Thread:
    """Warm the server: the modules every request needs are imported now, in the caller's thread, before it
    serves (:func:`import_before_serving`); the registry, the alert thresholds and the step metrics of the
    first runs load in the background, so the first page a person opens does not pay for them (~2 s
    measured)."""
    import_before_serving()
    panels.registry()
    panels.reference_lines([])

    def work() -> None:
        try:
            for run_id in cat.run_ids()[:max_runs]:
                cat.state(run_id).metrics()
        except Exception:  # a broken run is reported when a page opens it; preloading stays silent
            pass

    t = threading.Thread(target=work, name="rldiag-preload", daemon=True)
    t.start()
    return t


# --- the factory ------------------------------------------------------------------------------------------
def create_app(
    path: str | os.PathLike[str] | None = None,
    *,
    auth: tuple[str, str] | str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    poll_seconds: float = POLL_SECONDS,
    stall_seconds: float = data.STALL_SECONDS,
) -> dash.Dash:
    """A Dash app serving the runs under ``path`` (a run or a folder of runs; default: the sample runs).

    ``auth`` ("user:pass" or a tuple) turns on HTTP basic authentication; ``tokenizer`` is a local folder
    that ``transformers.AutoTokenizer`` can load, used to decode token ids on the Tokens page.
    """
    if path is None:
        path = sample_logs_path()
        if path is None:
            raise FileNotFoundError(
                "no PATH given and no bundled sample runs found: run `rldiag demo` or pass a run folder"
            )
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer} does not exist")
    cat = data.Catalog(path, tokenizer=tokenizer, stall_seconds=stall_seconds)
    data.set_default(cat)
    app = dash.Dash(
        "app",
        use_pages=True,
        pages_folder="pages",
        assets_folder=str(PACKAGE_DIR / "assets"),
        title="rldiag",
        update_title="",  # no "Updating..." title while callbacks run
        suppress_callback_exceptions=True,
    )
    app.server.extensions["rldiag"] = cat
    app.layout = shell(poll_seconds)
    _register_shell_callbacks(app)
    if isinstance(auth, str):
        auth = parse_auth(auth)
    if auth is not None:
        install_basic_auth(app.server, *auth)
    from app import security  # bounded requests, quiet request log (docs/security.md)

    security.harden(app)
    return app
