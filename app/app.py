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
from typing import Any
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
                            html.Label("smoothing", htmlFor=ids.SMOOTHING, className="smooth-label"),
                            html.Div(
                                dcc.Slider(
                                    id=ids.SMOOTHING,
                                    min=0,
                                    max=0.99,
                                    step=0.01,
                                    value=0.6,
                                    marks=None,
                                    tooltip={"placement": "bottom"},
                                    persistence=True,
                                ),
                                className="smooth-slider",
                            ),
                        ],
                        className="controls",
                    ),
                ],
                className="header",
            ),
            dcc.Location(id=ids.REDIRECT, refresh="callback-nav"),
            dcc.Interval(id=ids.LIVE_INTERVAL, interval=int(poll_seconds * 1000), n_intervals=0),
            dcc.Store(id=ids.LIVE_STATE, data={}),
            dcc.Store(id=ids.PAGE_RUNS, data=[]),
            dcc.Store(id=ids.DATA_VERSION, data=0),
            html.Main(dash.page_container, className="main"),
        ]
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
def _register_shell_callbacks(app: dash.Dash) -> None:
    @app.callback(Output(ids.NAV, "children"), Input(PAGE_LOCATION, "pathname"), Input(PAGE_LOCATION, "search"))
    def _nav(pathname: str | None, search: str | None) -> list[Any]:
        return nav_links(pathname, search)

    @app.callback(Output(ids.PAGE_RUNS, "data"), Input(PAGE_LOCATION, "search"))
    def _page_runs(search: str | None) -> list[str]:
        return layout.resolve_runs(query_runs(search))[0]

    panel_match = {"type": ids.PANEL, "page": MATCH, "key": MATCH, "metrics": MATCH}
    zoom_match = {"type": ids.PANEL_ZOOM, "page": MATCH, "key": MATCH, "metrics": MATCH}
    # In the browser: turn plotly's relayout events into the zoom range the server must aggregate. Reading the
    # figure here costs nothing; sent to the server it would cost the whole figure on every event.
    app.clientside_callback(
        ZOOM_JS,
        Output(zoom_match, "data"),
        Input(panel_match, "relayoutData"),
        State(panel_match, "figure"),
        prevent_initial_call=True,
    )

    @app.callback(
        Output(panel_match, "figure"),
        Input(ids.PAGE_RUNS, "data"),
        Input(ids.SMOOTHING, "value"),
        Input(zoom_match, "data"),
        State(panel_match, "id"),
    )
    def _panel(
        runs: list[str] | None, smoothing: float | None, zoom: dict[str, Any] | None, panel_id: dict[str, str]
    ) -> Any:
        return render_panel(panel_id, runs or [], smoothing or 0.0, zoom_range(zoom))

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
        Input({"type": ids.PANEL, "page": ALL, "key": ALL, "metrics": ALL}, "clickData"),
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
        Output({"type": ids.PANEL, "page": ALL, "key": ALL, "metrics": ALL}, "extendData"),
        Output(ids.LIVE_STATE, "data"),
        Output(ids.DATA_VERSION, "data"),
        Output(ids.LIVE_BADGE, "children"),
        Output(ids.LIVE_BADGE, "className"),
        Input(ids.LIVE_INTERVAL, "n_intervals"),
        State(ids.PAGE_RUNS, "data"),
        State({"type": ids.PANEL, "page": ALL, "key": ALL, "metrics": ALL}, "id"),
        State(ids.SMOOTHING, "value"),
        State(ids.DATA_VERSION, "data"),
        State(ids.LIVE_TOGGLE, "value"),
        prevent_initial_call=True,
    )
    def _tick(
        _n: int,
        runs: list[str] | None,
        panel_ids: list[dict[str, str]],
        smoothing: float | None,
        version: int | None,
        live: list[str] | None,
    ) -> tuple[Any, ...]:
        return live_tick(runs or [], panel_ids, smoothing or 0.0, version or 0, paused="live" not in (live or []))


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


def zoom_range(zoom: dict[str, Any] | None) -> tuple[float, float] | None:
    """The x range held by a panel's zoom store (None: the whole run)."""
    if not zoom or not isinstance(zoom.get("range"), (list, tuple)) or len(zoom["range"]) != 2:
        return None
    try:
        lo, hi = (float(v) for v in zoom["range"])
    except (TypeError, ValueError):
        return None
    return (lo, hi) if lo == lo and hi == hi else None


def render_panel(
    panel_id: dict[str, str], runs: list[str], smoothing: float, x_range: tuple[float, float] | None
) -> dict[str, Any]:
    """Figure spec of one registry line panel for the runs on screen (runs that do not resolve are skipped)."""
    metrics = [m for m in panel_id.get("metrics", "").split(",") if m]
    cat = data.catalog()
    frames, alerts = {}, {}
    for run_id in cat.valid_ids(runs):
        st = cat.state(run_id)
        frames[run_id] = st.metrics(metrics)  # only this panel's columns are finalized on first use
        if panel_id.get("page") == "overview":
            alerts[run_id] = data.firing_events(st.alerts())
    if not frames:
        return figures.empty_figure("no run selected").to_plotly_json()
    spec = panels.spec_of(metrics[0]) if metrics else None
    return figures.metric_panel_spec(
        frames,
        metrics,
        title=panels.panel_title(metrics),
        unit=getattr(spec, "unit", "") or None,
        smoothing=smoothing,
        x_range=x_range,
        alerts=alerts,
        hlines=panels.reference_lines(metrics),
        height=280,
        no_data=panels.no_data_note(metrics),
    )


def click_target(triggered: Any, click: dict[str, Any] | None, runs: list[str]) -> str:
    """Where a click on a chart point leads: the Tokens page of that run at that step."""
    if not click or not click.get("points") or not runs or not isinstance(triggered, dict):
        raise PreventUpdate
    point = click["points"][0]
    x = point.get("x")
    try:
        step = int(round(float(x)))
    except (TypeError, ValueError):
        raise PreventUpdate from None
    run = runs[0]
    if isinstance(point.get("customdata"), str) and point["customdata"] in runs:
        run = point["customdata"]  # an alert marker knows its run
    elif triggered.get("type") == ids.PANEL:
        metrics = [m for m in str(triggered.get("metrics", "")).split(",") if m]
        per_run = max(len(metrics), 1) * figures.TRACES_PER_SERIES
        index = int(point.get("curveNumber", 0)) // per_run
        run = runs[min(index, len(runs) - 1)]
    return "/tokens" + run_query([run], step=step)


def live_tick(
    runs: list[str], panel_ids: list[dict[str, str]], smoothing: float, version: int, *, paused: bool = False
) -> tuple[Any, ...]:
    """One poll: read new files of the runs on screen and extend every line panel with the new steps."""
    cat = data.catalog()
    fresh, full, statuses = {}, {}, []
    for run_id in runs:
        try:
            st = cat.state(run_id)
        except data.UnknownRun:
            continue
        fresh[run_id] = st.update()
        full[run_id] = st.metrics(m for pid in panel_ids for m in pid.get("metrics", "").split(",") if m)
        statuses.append(st.status())
    badge, badge_class = _badge(statuses, paused)
    got_new = any(f.height for f in fresh.values())
    if not got_new:
        return [no_update] * len(panel_ids), no_update, no_update, badge, badge_class
    extends: list[Any] = []
    for pid in panel_ids:
        metrics = [m for m in pid.get("metrics", "").split(",") if m]
        payload = figures.extend_payload(fresh, full, runs, metrics, smoothing=smoothing)
        extends.append(no_update if payload is None else [payload[0], payload[1]])
    last = {r: (int(full[r]["step"].max()) if full[r].height else None) for r in full}
    return extends, last, version + 1, badge, badge_class


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


def preload(cat: data.Catalog, *, max_runs: int = 20) -> threading.Thread:
    """Warm the server in the background: imports, the registry, the alert thresholds, and the step
    metrics of the first runs, so the first page a person opens does not pay for them (~2 s measured)."""

    def work() -> None:
        try:
            panels.registry()
            panels.reference_lines([])
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
        update_title=None,
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
