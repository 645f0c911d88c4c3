"""Callback bodies and page layouts, called directly inside a request of a real app (no browser)."""

from __future__ import annotations

import base64
import importlib
import json
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest
from conftest import HOSTILE
from dash import dcc, html, no_update
from dash.exceptions import PreventUpdate
from synth import SPIKE_STEP, record_run

from app import app as shell
from app import figures, ids, panels

PAGES = ("runs", "overview", "ratios", "clipping", "entropy", "mismatch", "positions", "tokens", "cliff", "alerts")


@pytest.fixture
def ctx(make_app, tokenizer_dir):
    app = make_app(tokenizer=tokenizer_dir)
    with app.server.test_request_context():
        yield app


def page(name: str) -> Any:
    return importlib.import_module(f"app.pages.{name}")


def walk(component: Any):
    """Every component and string in a Dash component tree."""
    yield component
    children = getattr(component, "children", None)
    if children is None:
        return
    for child in children if isinstance(children, (list, tuple)) else [children]:
        yield from walk(child)


def texts(component: Any) -> list[str]:
    return [c for c in walk(component) if isinstance(c, str)]


def test_every_page_layout_renders_for_a_run(ctx):
    for name in PAGES:
        tree = page(name).layout(run="grpo_full")
        assert isinstance(tree, html.Div), name
        assert not any("Traceback" in t for t in texts(tree)), name


def test_layout_refuses_a_traversal_run_id_and_names_it_as_text(ctx):
    tree = page("overview").layout(run="../../etc")
    errors = [
        c for c in walk(tree) if isinstance(c, html.Div) and "notice-error" in (getattr(c, "className", None) or "")
    ]
    assert errors and "'../../etc'" in errors[0].children
    assert not [c for c in walk(tree) if isinstance(c, dcc.Graph)]
    assert shell.layout.resolve_runs(["../../etc"])[0] == []


def test_panels_follow_the_registry(ctx):
    registry = panels.registry()
    shown = {m for p in panels.overview_panels() for m in p.metrics}
    assert shown == {n for n, s in registry.items() if s.headline}
    for name in ("ratios", "clipping", "entropy", "mismatch"):
        for p in panels.page_panels(name):
            for m, help_item in zip(p.metrics, p.help):
                assert m in registry and help_item.doc == registry[m].doc
    # every metric of a page family is on that page, once
    on_page = [m for p in panels.page_panels("clipping") for m in p.metrics]
    assert sorted(on_page) == sorted(n for n, s in registry.items() if s.family in ("clip", "regime", "balance"))


def test_render_panel_draws_selected_runs_and_skips_unknown_ones(ctx):
    pid = ids.panel("overview", "ratio-x", ["ratio/max"])
    fig = go.Figure(shell.render_panel(pid, ["grpo_full", "../nope", "sweep/minimal"], 0.0, None))  # validates
    assert fig.layout.meta["runs"] == ["grpo_full", "sweep/minimal"]
    raw = fig.data[1]
    assert max(v for v in raw.y if v is not None) > 20  # the spike of grpo_full
    empty = go.Figure(shell.render_panel(pid, ["../nope"], 0.0, None))
    assert empty.data == ()


def test_zoom_store_gives_the_range_to_reaggregate():
    assert shell.zoom_range({"range": [2, 9]}) == (2.0, 9.0)
    assert shell.zoom_range({"range": None, "t": 1}) is None
    assert shell.zoom_range(None) is None
    assert shell.zoom_range({"range": ["a", 3]}) is None
    assert "xaxis.autorange" in shell.ZOOM_JS and "autosize" in shell.ZOOM_JS


def test_click_on_a_panel_point_links_to_that_runs_tokens():
    pid = ids.panel("overview", "k", ["ratio/max", "ratio/mean"])
    per_run = 2 * figures.TRACES_PER_SERIES
    click = {"points": [{"curveNumber": per_run + 3, "x": 6.6}]}
    assert shell.click_target(pid, click, ["a", "sweep/b"]) == "/tokens?run=sweep%2Fb&step=7"
    marker = {"points": [{"curveNumber": 2 * per_run + 1, "x": 4000.0, "customdata": ["sweep/b", 4]}]}
    assert shell.click_target(pid, marker, ["a", "sweep/b"]) == "/tokens?run=sweep%2Fb&step=4"
    by_tokens = {"points": [{"curveNumber": 1, "x": 12345.0, "customdata": 6}]}  # x is tokens seen
    assert shell.click_target(pid, by_tokens, ["a", "sweep/b"]) == "/tokens?run=a&step=6"
    heat = {"points": [{"curveNumber": 0, "x": 3, "y": 0.1}]}
    assert shell.click_target(ids.clickable("ratio-heatmap"), heat, ["a"]) == "/tokens?run=a&step=3"
    with pytest.raises(PreventUpdate):
        shell.click_target(pid, None, ["a"])
    with pytest.raises(PreventUpdate):
        shell.click_target(pid, {"points": [{"x": "n/a"}]}, ["a"])


def _draw(pids, runs, smoothing=0.5):
    """The figures and stores a browser holds after the panels' own callbacks ran."""
    specs = [shell.render_panel(p, runs, smoothing, None) for p in pids]
    return specs, [shell.panel_sig(s) for s in specs]


def test_live_tick_extends_panels_with_new_steps_only(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=3, close=False)
    app = shell.create_app(tmp_path)
    pids = [ids.panel("overview", "a", ["ratio/max"]), ids.panel("ratios", "b", ["ratio/mean", "kl/k3"])]
    with app.server.test_request_context():
        _, sigs = _draw(pids, ["r"])
        extends, figs, new_sigs, version, badge, _ = shell.live_tick(["r"], pids, 0.5, 0, sigs=sigs)
        assert extends == figs == new_sigs == [no_update, no_update] and version is no_update and badge == "live"
        record_run(tmp_path / "r", steps=2, start=3, close=False, rec=rec)
        extends, figs, new_sigs, version, badge, _ = shell.live_tick(["r"], pids, 0.5, 0, sigs=sigs)
        assert version == 1 and figs == [no_update, no_update]
        update, indices = extends[1]
        assert indices == [1, 2, 4, 5]  # raw and EMA of each metric
        assert update["x"][0] == [3.0, 4.0]
        assert new_sigs[1]["last"] == {"r": 4}
        extends, *_ = shell.live_tick(["r"], pids, 0.5, 1, sigs=new_sigs)
        assert extends == [no_update, no_update]
        _, _, _, _, badge, cls = shell.live_tick(["r"], pids, 0.5, 1, paused=True, sigs=new_sigs)
        assert badge == "paused" and "paused" in cls
    rec.close()


def test_live_tick_redraws_a_panel_that_missed_an_update_or_whose_layout_changed(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=0, close=False)  # opened before the first step
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "a", ["ratio/max"])
    with app.server.test_request_context():
        specs, sigs = _draw([pid], ["r"])
        assert specs[0]["layout"]["yaxis"]["range"] == [0, 1]  # the empty chart's axis
        record_run(tmp_path / "r", steps=2, close=False, rec=rec)
        extends, figs, new_sigs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        # the no-data note and the fixed range go: a whole figure, not an extension
        assert extends == [no_update] and figs[0] is not no_update
        assert "range" not in figs[0]["layout"]["yaxis"] and not figs[0]["layout"]["annotations"]
        # a browser still holding the first figure (another tab's tick read the new files) is redrawn too
        record_run(tmp_path / "r", steps=1, start=2, close=False, rec=rec)
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert figs[0] is not no_update and len(figs[0]["data"][1]["x"]) == 3
    rec.close()


def test_live_tick_draws_lines_once_a_run_has_a_second_step(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=1, close=False)
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "a", ["ratio/max"])
    with app.server.test_request_context():
        specs, sigs = _draw([pid], ["r"])
        assert specs[0]["data"][1]["mode"] == "lines+markers"  # the first step, visible
        record_run(tmp_path / "r", steps=1, start=1, close=False, rec=rec)
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert extends == [no_update] and figs[0]["data"][1]["mode"] == "lines"
    rec.close()


def test_live_tick_marks_a_restart_that_happens_while_the_chart_is_open(tmp_path: Path):
    record_run(tmp_path / "r", steps=6)
    app = shell.create_app(tmp_path)
    pid = ids.panel("ratios", "a", ["ratio/max"])
    with app.server.test_request_context():
        specs, sigs = _draw([pid], ["r"])
        assert not any(t.get("name") == "restart" for t in specs[0]["data"])
        rec = record_run(tmp_path / "r", steps=3, start=4, close=False)  # preempted at 5, resumed from step 4
        rec.flush()
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert extends == [no_update] and figs[0] is not no_update  # a new figure, not an extension
        mark = next(t for t in figs[0]["data"] if t.get("name") == "restart")
        assert mark["customdata"] == [["r", 4]]
    rec.close()


def test_a_restart_whose_first_step_has_no_data_yet_is_marked_at_that_step(tmp_path: Path):
    """The resumed job's writer names its first step before it publishes it; meanwhile the earlier attempt's
    records from there on no longer count, so the chart ends a step before the restart. Its mark still stands at
    the restart's step (seen in a live dashboard: it stood at the last step drawn, and stayed there)."""
    import rldiag

    first = record_run(tmp_path / "r", steps=10, close=False)  # killed: never closed
    first.flush()
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "a", ["ratio/max"])
    with app.server.test_request_context():
        _, sigs = _draw([pid], ["r"])
        resumed = rldiag.Recorder(tmp_path / "r", clip_low=0.2, clip_high=0.28)
        resumed.log(5, {"lr": 1e-6})  # the resumed loop logs before its first record(): its first step is 5
        _, figs, sigs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert max(figs[0]["data"][1]["x"]) == 4  # steps 5.. of the first attempt count no more
        mark = next(t for t in figs[0]["data"] if t.get("name") == "restart")
        assert mark["x"] == [5.0] and mark["customdata"] == [["r", 5]]
        record_run(tmp_path / "r", steps=2, start=5, close=False, rec=resumed)
        resumed.flush()
        _, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 1, sigs=sigs)
        if figs[0] is not no_update:
            assert next(t for t in figs[0]["data"] if t.get("name") == "restart")["x"] == [5.0]
    resumed.close()
    first.close()


def test_live_tick_breaks_the_line_at_steps_a_restart_left_without_data(tmp_path: Path):
    """Killed after step 5 with its last checkpoint at step 8 (steps 6-7 never published): the resumed job's
    steps are not joined to the earlier ones by a line across steps that hold no data."""
    record_run(tmp_path / "r", steps=6)
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "a", ["ratio/max"])
    with app.server.test_request_context():
        _, sigs = _draw([pid], ["r"])
        rec = record_run(tmp_path / "r", steps=2, start=8, close=False)
        rec.flush()
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert extends == [no_update] and figs[0] is not no_update  # the new steps cannot simply extend the line
        raw = figs[0]["data"][1]
        gap = raw["x"].index(6.5)
        assert raw["x"][gap - 1 : gap + 2] == [5.0, 6.5, 8.0] and math.isnan(raw["y"][gap])
    rec.close()


def test_live_tick_shows_alerts_that_fire_while_the_chart_is_open(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=SPIKE_STEP, close=False, alerts=True)
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "a", ["kl/k3"])
    with app.server.test_request_context():
        specs, sigs = _draw([pid], ["r"])
        before = [s for s in specs[0]["layout"]["shapes"] if s["xref"] == "x"]
        # the spike fires alerts once the step after it shows the spike step complete
        record_run(tmp_path / "r", steps=2, start=SPIKE_STEP, close=False, rec=rec)
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.5, 0, sigs=sigs)
        assert figs[0] is not no_update
        after = [s["x0"] for s in figs[0]["layout"]["shapes"] if s["xref"] == "x"]
        assert len(after) > len(before) and float(SPIKE_STEP) in after
        marker = next(t for t in figs[0]["data"] if t.get("name") == "alerts")
        assert ["r", float(SPIKE_STEP)] in marker["customdata"]
    rec.close()


def test_live_tick_redraws_a_step_that_grew(tmp_path: Path):
    """A step published in parts (a rank or micro-batch later) is redrawn with its full numbers."""
    import numpy as np

    import rldiag

    rec = rldiag.Recorder(tmp_path / "r")
    rng = np.random.default_rng(0)

    def micro(step: int, n: int) -> None:
        old = -rng.gamma(1.0, 0.8, size=(n, 10)).astype(np.float32)
        logp = np.minimum(old + rng.normal(0, 0.05, size=old.shape), 0).astype(np.float32)
        rec.record(step=step, logprobs=logp, old_logprobs=old, advantages=rng.normal(size=n).astype(np.float32))
        rec.flush()

    micro(0, 4)
    app = shell.create_app(tmp_path)
    pid = ids.panel("overview", "t", ["tokens/count"])
    with app.server.test_request_context():
        specs, sigs = _draw([pid], ["r"], smoothing=0.0)
        assert specs[0]["data"][1]["y"] == [40.0]
        micro(0, 6)  # the same step, a second micro-batch published later
        extends, figs, new_sigs, *_ = shell.live_tick(["r"], [pid], 0.0, 0, sigs=sigs)
        assert extends == [no_update] and figs[0]["data"][1]["y"] == [100.0]
        micro(1, 2)  # a second value: the constant series' padded y range goes, a new figure again
        extends, figs, new_sigs, *_ = shell.live_tick(["r"], [pid], 0.0, 0, sigs=new_sigs)
        assert figs[0]["data"][1]["y"] == [100.0, 20.0]
        micro(2, 3)  # then a new step only: appended
        extends, figs, *_ = shell.live_tick(["r"], [pid], 0.0, 0, sigs=new_sigs)
        assert figs == [no_update] and extends[0][0]["y"] == [[30.0]]
    rec.close()


def test_live_payload_carries_what_each_extension_extends():
    pids = [ids.panel("overview", "a", ["m"]), ids.panel("overview", "b", ["m"])]
    sigs = [{"v": {"r": 1}, "last": {"r": 3}}, {"v": {"r": 1}, "last": {"r": 3}}]
    new = {"v": {"r": 2}, "last": {"r": 4}}
    payload = shell.live_payload(pids, sigs, [[{"x": [[4]]}, [1]], no_update], [no_update, {"data": []}], [new, new])
    assert payload["ext"]["overview|a|m"] == [{"x": [[4]]}, [1], {"r": 1}, new]
    assert payload["fig"]["overview|b|m"] == [{"data": []}, new]
    assert shell.live_payload(pids, sigs, [no_update] * 2, [no_update] * 2, [no_update] * 2) == {}
    assert "same(cur, payload.ext[k][2])" in shell.APPLY_JS  # the browser checks the versions before extending


def test_preload_imports_what_requests_look_up_before_it_returns():
    import subprocess
    import sys

    code = (
        "import sys; from app import app, data; cat = data.Catalog(sys.argv[1]); "
        "t = app.preload(cat); "
        "m = sys.modules.get('pandas'); assert m is not None and hasattr(m, 'NaT'), 'pandas not imported'; "
        "t.join(60)"
    )
    root = Path(__file__).parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code, str(root / "sample_logs")], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_csv_download_has_every_step_of_every_run(ctx):
    pid = ids.panel("overview", "ratio-x", ["ratio/max", "kl/k3"])
    sent = shell.panel_download(pid, ["grpo_full", "sweep/minimal"])
    assert sent["filename"].endswith(".csv") and "/" not in sent["filename"]
    lines = sent["content"].splitlines()
    assert lines[0] == "run,step,tokens_seen,ratio/max,kl/k3"
    assert len(lines) == 1 + 12 + 10
    assert lines[1].startswith("grpo_full,0,")


def test_search_note_links_metrics_to_their_page():
    from dash import dcc as _dcc

    with shell.create_app(Path(__file__).parents[2] / "sample_logs").server.test_request_context():
        note = shell.search_note("kl k3")
        links = [c for c in note if isinstance(c, _dcc.Link)]
        assert any(link.children == "kl/k3" and link.href == "/ratios" for link in links)
        assert shell.search_note("") == [] and shell.search_note("zzzz-nothing") == ["no metric matches"]
    assert "display" in shell.SEARCH_JS


def test_tokens_page_shows_worst_tokens_with_hostile_text_as_plain_text(ctx):
    body, line = page("tokens").token_body("grpo_full", SPIKE_STEP, "logratio", 10)
    assert f"step {SPIKE_STEP}" in line
    tables = [c for c in walk(body) if isinstance(c, html.Table)]
    assert len(tables) == 3
    first_row = tables[0].children[1].children[0]
    assert first_row.children[3].children == "4"  # the injected log-ratio spike is the worst token
    spans = [c for c in walk(body) if isinstance(c, html.Span) and c.children == HOSTILE]
    assert spans, "token id 7 decodes to the hostile string and is shown"
    # nothing in the tree could interpret it as markup
    assert not [c for c in walk(body) if isinstance(c, dcc.Markdown) or hasattr(c, "dangerously_allow_html")]


def test_token_tables_write_a_negative_zero_as_zero(ctx):
    fmt = page("tokens")._fmt
    assert (fmt(-0.0), fmt(-1e-20), fmt(0.25), fmt(float("nan"))) == ("0", "-1e-20", "0.25", "–")


def test_tokens_page_explains_a_step_without_rows(ctx):
    body, _ = page("tokens").token_body("grpo_full", 10_000, "logratio", 10)
    assert "No token rows for step 10000" in " ".join(texts(body))


def test_mismatch_page_says_what_to_record_when_data_is_missing(ctx):
    tree = page("mismatch").layout(run="sweep/minimal")
    joined = " ".join(texts(tree))
    assert "record rollout_logp" in joined and "record version" in joined


def test_alert_tables_link_steps_and_escape_nothing(ctx, runs_root: Path):
    events = [
        {
            "event": "firing",
            "rule": "kl_spike",
            "severity": "warn",
            "step": 5,
            "start_step": 5,
            "summary": HOSTILE,
            "time": 1.7e9,
        }
    ]
    states = page("alerts").states_table("grpo_full", events)
    links = [c for c in walk(states) if isinstance(c, dcc.Link)]
    assert links[0].href == "/tokens?run=grpo_full&step=5"
    assert HOSTILE in texts(states)


def test_cliff_page_reports_missing_module_or_lambda_star(ctx):
    fig, result = page("cliff").cliff_view(0.96, 0.90, 2.0, 0.5)
    joined = " ".join(texts(result))
    try:
        importlib.import_module("rldiag.analysis.cliff")
    except ImportError:
        assert "not available" in joined
    else:
        assert "λ* = 0.76" in joined and "safe" in joined
    _, bad = page("cliff").cliff_view(1.5, 0.9, 2.0, None)
    assert "0 < p < 1" in " ".join(texts(bad))


def test_runs_page_filters_by_glob_or_substring(ctx):
    runs = page("runs")
    assert runs.matches("sweep/minimal", "*min*") and runs.matches("sweep/minimal", "SWEEP")
    assert not runs.matches("grpo_full", "sweep*")
    table = runs.runs_table(["grpo_full", "sweep/minimal"], selected=["grpo_full"], pattern="grpo")
    rows = table.children[1].children
    assert len(rows) == 1
    assert runs.compare_link([["grpo_full"], ["sweep/minimal"]]) == "/overview?run=grpo_full&run=sweep%2Fminimal"


def test_a_restarted_run_says_where_on_the_runs_page_and_the_overview(make_app, tmp_path: Path):
    """A job preempted and resumed from an earlier checkpoint (step 4, after reaching step 7), then from a later
    one (step 12, after reaching 9): the Runs table lists the restart steps, the Overview says where each was and
    which steps hold no data."""
    record_run(tmp_path / "resumed", steps=8)
    record_run(tmp_path / "resumed", steps=6, start=4)
    record_run(tmp_path / "resumed", steps=3, start=12)
    record_run(tmp_path / "plain", steps=3)
    app = make_app(tmp_path)
    with app.server.test_request_context():
        table = page("runs").runs_table(["plain", "resumed"], selected=[])
        head = [th.children for th in table.children[0].children.children]
        col = head.index("restarts")
        cells = {texts(row.children[1])[0]: texts(row.children[col])[0] for row in table.children[1].children}
        assert cells == {"plain": "–", "resumed": "steps 4, 12; gap"}
        overview = page("overview")
        assert overview.restart_line(["plain"]) is None
        line = " ".join(texts(overview.restart_line(["resumed"])))
        assert "step 4 (rank 0)" in line and "step 12 (rank 0)" in line and "steps 10..11 hold no data (rank 0)" in line
        assert "resumed: step 4" in " ".join(texts(overview.restart_line(["plain", "resumed"])))


@pytest.mark.filterwarnings("ignore:skipped unreadable file")
def test_the_overview_names_records_a_writer_never_published(make_app, tmp_path: Path):
    """A writer that a signal stopped before it could publish (its writer file counts what it held) and a damaged
    file: the Overview's problems line names both, as `rldiag info` does; a sound run has no such line."""
    record_run(tmp_path / "cut", steps=3)
    record_run(tmp_path / "plain", steps=3)
    (writer,) = (tmp_path / "cut" / "writers").glob("*.json")
    info = json.loads(writer.read_text())
    info["counters"] = {**info.get("counters", {}), "unpublished_at_signal": 5}
    writer.write_text(json.dumps(info))
    (tmp_path / "cut" / "stats" / "r00009-x-1-0-000000.parquet").write_bytes(b"not parquet")
    app = make_app(tmp_path)
    with app.server.test_request_context():
        overview = page("overview")
        assert overview.problems_line(["plain"]) is None
        line = " ".join(texts(overview.problems_line(["cut"])))
        assert f"writer {writer.stem} was stopped by a signal before it published the 5 records it held" in line
        assert "r00009-x-1-0-000000.parquet" in line
        assert "cut: rank 0" in " ".join(texts(overview.problems_line(["plain", "cut"])))


def test_the_alerts_page_leaves_out_alerts_a_restart_replaced_and_says_so(make_app, tmp_path: Path):
    """An alert notified at step 6 by the attempt a restart at step 4 replaced counts no more; the page says one
    event is left out, and the line is still in alerts.jsonl."""
    record_run(tmp_path / "resumed", steps=8)
    record_run(tmp_path / "resumed", steps=6, start=4)
    base = {"severity": "warn", "metric": "kl/k3", "summary": "spike", "fingerprint": "f"}
    lines = [
        {**base, "event": "firing", "rule": "kl_spike", "step": 2, "start_step": 2, "time": 1.0},
        {**base, "event": "firing", "rule": "kl_spike_critical", "step": 6, "start_step": 6, "time": 2.0},
    ]
    (tmp_path / "resumed" / "alerts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    app = make_app(tmp_path)
    with app.server.test_request_context():
        states, history = page("alerts").update_alerts(["resumed"], 0)
        shown = " ".join(texts(history))
        assert "1 event(s) computed from records a restart replaced are not shown" in shown
        assert "kl_spike_critical" not in shown + " ".join(texts(states)) and "kl_spike" in shown
    assert "kl_spike_critical" in (tmp_path / "resumed" / "alerts.jsonl").read_text()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_guards_every_route(make_app):
    app = make_app(auth="alice:s3cret")
    client = app.server.test_client()
    for path in ("/", "/_dash-layout", "/_dash-dependencies", "/assets/style.css"):
        r = client.get(path)
        assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"], path
        assert client.get(path, headers=_basic("alice", "wrong")).status_code == 401
    assert client.get("/", headers=_basic("alice", "s3cret")).status_code == 200
    assert client.get("/_dash-layout", headers=_basic("alice", "s3cret")).status_code == 200
    assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_without_auth_the_app_is_open_and_auth_strings_are_validated(make_app):
    assert make_app().server.test_client().get("/").status_code == 200
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            shell.parse_auth(bad)
    assert shell.parse_auth("a:b:c") == ("a", "b:c")


def test_exposure_warning_only_off_loopback():
    assert shell.exposure_warning("127.0.0.1", None) is None
    assert shell.exposure_warning("::1", None) is None
    assert "--auth" in shell.exposure_warning("0.0.0.0", None)
    assert "TLS" in shell.exposure_warning("0.0.0.0", ("a", "b"))


def test_default_path_opens_the_bundled_sample_runs(monkeypatch, runs_root: Path):
    monkeypatch.setenv("RLDIAG_SAMPLE_LOGS", str(runs_root))
    assert shell.sample_logs_path() == runs_root
    app = shell.create_app()
    assert app.server.extensions["rldiag"].root == runs_root.resolve()


def test_dependencies_are_json_and_every_page_is_registered(make_app):
    import dash

    app = make_app()
    deps = app.server.test_client().get("/_dash-dependencies").json
    assert any("extendData" in d["output"] for d in deps)
    paths = {p["path"] for p in dash.page_registry.values()}
    assert {
        "/",
        "/overview",
        "/ratios",
        "/clipping",
        "/entropy",
        "/mismatch",
        "/positions",
        "/tokens",
        "/cliff",
        "/alerts",
    } <= paths
    json.dumps(deps)


def test_a_runs_own_tokenizer_folder_decodes_its_tokens(make_app, tokenizer_dir, runs_root):
    """Without --tokenizer, a run that saved `tokenizer/` (as `rldiag demo` does) is decoded with it."""
    import shutil

    own = runs_root / "grpo_full" / "tokenizer"
    shutil.copytree(tokenizer_dir, own)
    try:
        app = make_app()  # no tokenizer given
        with app.server.test_request_context():
            body, line = page("tokens").token_body("grpo_full", SPIKE_STEP, "logratio", 10)
            assert "token ids shown" not in line
            assert [c for c in walk(body) if isinstance(c, html.Span) and c.children == HOSTILE]
            body, line = page("tokens").token_body("sweep/minimal", SPIKE_STEP, "logratio", 10)
            assert "token ids shown" in line or "No token rows" in " ".join(texts(body))
    finally:
        shutil.rmtree(own)


def test_custom_scalars_get_a_custom_panel_group_on_the_overview(tmp_path: Path):
    import numpy as np

    import rldiag

    rec = rldiag.Recorder(tmp_path / "c")
    rng = np.random.default_rng(0)
    for s in range(5):
        old = -rng.gamma(1.0, 0.8, size=(4, 10)).astype(np.float32)
        rec.record(step=s, logprobs=old, old_logprobs=old, advantages=rng.normal(size=4).astype(np.float32))
        rec.log(s, {"loss": 1.0 / (s + 1), "eval/acc": 0.1 * s, "time": 1000.0 + 2.0 * s})
    rec.close()
    app = shell.create_app(tmp_path)
    with app.server.test_request_context():
        tree = page("overview").layout(run="c")
        assert "Custom" in texts(tree)
        graphs = [c.id for c in walk(tree) if isinstance(c, dcc.Graph)]
        custom = [g for g in graphs if g["key"].startswith("custom-")]
        assert sorted(g["metrics"] for g in custom) == ["eval/acc", "loss"]
        spec = shell.render_panel(next(g for g in custom if g["metrics"] == "loss"), ["c"], 0.0, None)
        assert spec["data"][1]["y"] == [1.0, 0.5, 1 / 3, 0.25, 0.2]  # exact, per step
        # the logged wall clock is the x axis by wall time (seconds since the first step), not a panel
        pid = ids.panel("overview", "k", ["kl/k3"])
        timed = shell.render_panel(pid, ["c"], 0.0, None, x_mode="time")
        assert timed["data"][1]["x"] == [0.0, 2.0, 4.0, 6.0, 8.0] and timed["data"][1]["customdata"][1] == 1.0
        assert timed["layout"]["xaxis"]["title"]["text"] == "wall time (s)"
        # a run without custom scalars has no such section
        assert "Custom" not in texts(page("overview").layout(run="../nope"))


def test_a_scalar_first_logged_while_the_page_is_open_gets_its_panel(tmp_path: Path):
    import numpy as np

    import rldiag
    from app import data as app_data

    rec = rldiag.Recorder(tmp_path / "c")
    rng = np.random.default_rng(0)

    def step(s: int, scalars: dict[str, float]) -> None:
        old = -rng.gamma(1.0, 0.8, size=(4, 10)).astype(np.float32)
        rec.record(step=s, logprobs=old, old_logprobs=old, advantages=rng.normal(size=4).astype(np.float32))
        rec.log(s, scalars)
        rec.flush()

    step(0, {"loss": 1.0})
    app = shell.create_app(tmp_path)
    overview = page("overview")
    try:
        with app.server.test_request_context():
            tree = overview.layout(run="c")
            store = next(c for c in walk(tree) if isinstance(c, dcc.Store) and c.id == ids.OVERVIEW_CUSTOM_NAMES)
            assert store.data == ["loss"]
            assert overview.refresh_custom({}, ["c"], store.data) == (no_update, no_update)
            step(1, {"loss": 0.5, "eval/acc": 0.3})  # a new name while the page is open
            app_data.catalog().state("c").update()  # what the live tick does
            section, names = overview.refresh_custom({}, ["c"], store.data)
            assert names == ["eval/acc", "loss"]
            graphs = [c.id for c in walk(html.Div(section)) if isinstance(c, dcc.Graph)]
            assert sorted(g["metrics"] for g in graphs) == ["eval/acc", "loss"]
    finally:
        rec.close()


def test_regimes_leave_out_on_policy_steps(tmp_path: Path):
    """An on-policy step (r = 1 for every token) is in no regime: drawn, the stack fell to 0 at every such
    step of the bundled collapse run (a sawtooth). They are left out, and the title says how many."""
    import shutil

    import numpy as np

    from app import data
    from app.app import create_app

    shutil.copytree(Path(__file__).parents[2] / "sample_logs" / "collapse", tmp_path / "collapse")
    app = create_app(tmp_path, poll_seconds=30)
    with app.server.test_request_context():
        fig = page("clipping").update_regimes(["collapse"], 0)
        frame = data.catalog().state("collapse").metrics()
    on = figures.onpolicy_mask(frame)
    assert 0 < on.sum() < frame.height
    steps = np.asarray(fig.data[0].x, dtype=float)
    assert len(steps) == frame.height - on.sum() and not set(steps) & set(frame["step"].to_numpy()[on])
    assert f"on-policy steps left out: {int(on.sum())}" in fig.layout.title.text


def test_regimes_of_a_run_that_is_on_policy_at_every_step_say_so(tmp_path: Path):
    import numpy as np

    import rldiag
    from app.app import create_app

    old = np.log(np.linspace(0.1, 0.9, 32)).reshape(4, 8).astype(np.float32)
    with rldiag.Recorder(tmp_path / "onpolicy") as rec:
        for s in range(3):
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.array([1, -1, 1, -1], np.float32))
    app = create_app(tmp_path, poll_seconds=30)
    with app.server.test_request_context():
        fig = page("clipping").update_regimes(["onpolicy"], 0)
    assert not fig.data  # an empty stack drawn as axes alone said nothing
    assert "every step is on-policy" in fig.layout.annotations[0].text
