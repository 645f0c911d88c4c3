"""Bucket heatmaps (app/buckets.py): every selected run, re-aggregated on zoom, prob/route when available."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from dash.exceptions import PreventUpdate
from synth import record_run


@pytest.fixture
def ctx(make_app):
    app = make_app()
    with app.server.test_request_context():
        yield app


@pytest.fixture
def buckets():
    return importlib.import_module("app.buckets")


def test_positions_show_every_selected_run(ctx, buckets):
    positions = importlib.import_module("app.pages.positions")
    page = str(positions.layout(run=["grpo_full", "sweep/minimal"]))
    assert "'run': 'grpo_full'" in page and "'run': 'sweep/minimal'" in page
    view = buckets.POSITIONS
    options, value, note = view.options(["grpo_full", "sweep/minimal"], "pos", None)
    assert value == "ratio/mean" and {o["value"] for o in options} >= {"ratio/mean", "n"}
    for run in ("grpo_full", "sweep/minimal"):
        fig = view.figure(run, "pos", "ratio/mean", None, zoomed=False)
        assert fig.data[0].type == "heatmap" and run in fig.layout.title.text
    # stages were recorded by one run only: the other says what to record
    options, value, note = view.options(["grpo_full", "sweep/minimal"], "stage", None)
    assert value is not None and "sweep/minimal: no stage data" in note


def test_zoom_recomputes_the_table_on_the_range(tmp_path: Path, make_app, buckets, monkeypatch):
    from app import data

    record_run(tmp_path / "runs" / "long", steps=40, full=False)
    app = make_app(tmp_path / "runs")
    with app.server.test_request_context():
        monkeypatch.setattr(data, "MAX_TOKEN_STEPS", 10)
        monkeypatch.setattr(data, "MIN_TOKEN_STEPS", 10)
        view = buckets.POSITIONS
        whole = view.figure("long", "pos", "n", None, zoomed=False)
        assert "10 of 40 steps, evenly spaced" in whole.layout.title.text
        zoom = view.figure("long", "pos", "n", {"xaxis.range[0]": 20, "xaxis.range[1]": 27.5}, zoomed=True)
        assert list(zoom.data[0].x) == list(range(20, 28))
        assert "all 8 steps in the zoomed range" in zoom.layout.title.text
        reset = view.figure("long", "pos", "n", {"xaxis.autorange": True}, zoomed=True)
        assert list(reset.data[0].x) == list(whole.data[0].x)
        with pytest.raises(PreventUpdate):  # a hover or drag-mode change is not a zoom
            view.figure("long", "pos", "n", {"dragmode": "pan"}, zoomed=True)


def test_a_click_opens_the_clicked_runs_tokens(ctx, buckets):
    href = buckets.click_href({"type": "pos-buckets-graph", "run": "sweep/minimal"}, {"points": [{"x": 3, "y": "2"}]})
    assert href == "/tokens?run=sweep%2Fminimal&step=3"
    with pytest.raises(PreventUpdate):
        buckets.click_href({"type": "pos-buckets-graph", "run": "../etc"}, {"points": [{"x": 3}]})


def test_mismatch_page_has_prob_and_route_tables_or_says_why_not(ctx, buckets):
    mismatch = importlib.import_module("app.pages.mismatch")
    assert "mm-buckets-by" in str(mismatch.layout(run="grpo_full"))
    run = ctx.server.extensions["rldiag"].state("grpo_full").run
    for by in ("prob", "route"):
        options, value, note = buckets.MISMATCH.options(["grpo_full"], by, None)
        try:
            expected = run.bucket_metrics(by=by, steps=run.steps())
        except ValueError:
            assert options == [] and f"{by} buckets are not available" in note
            continue
        if expected.height == 0:
            assert "no " + by in note
        else:
            assert value is not None
            fig = buckets.MISMATCH.figure("grpo_full", by, value, None, zoomed=False)
            assert fig.data[0].type == "heatmap"


def test_ratio_heatmap_and_lens_for_every_selected_run(ctx):
    ratios = importlib.import_module("app.pages.ratios")
    clipping = importlib.import_module("app.pages.clipping")
    perrun = importlib.import_module("app.perrun")
    both = ["grpo_full", "sweep/minimal"]
    for module, graph_type in ((ratios, perrun.RATIO_GRAPH), (clipping, perrun.LENS_LINES)):
        page = str(module.layout(run=both))
        assert all(f"'type': '{graph_type}', 'run': '{r}'" in page for r in both), module.__name__
    for run in both:
        fig = perrun.ratio_figure(run)
        assert fig.data[0].type == "heatmap" and run in fig.layout.title.text
        lines, bars = perrun.lens_figures(run, "kept_frac")
        assert len(lines.data) > 3 and bars.data[0].type == "bar" and run in lines.layout.title.text


def test_ratio_heatmap_zoom_merges_the_ranges_histograms_again(tmp_path: Path, make_app):
    perrun = importlib.import_module("app.perrun")
    record_run(tmp_path / "runs" / "long", steps=30, full=False)
    app = make_app(tmp_path / "runs")
    with app.server.test_request_context():
        st = app.server.extensions["rldiag"].state("long")
        steps, _, counts = st.lr_histogram()
        whole = perrun.ratio_figure("long")
        zoom = perrun.ratio_figure("long", (10.0, 19.0))
        assert list(whole.data[0].x) == list(steps)
        assert list(zoom.data[0].x) == list(range(10, 20)) and list(zoom.layout.xaxis.range) == [10.0, 19.0]
        # every token of the zoomed steps is in the figure: the shares of each column sum to one
        share = 10 ** np.nan_to_num(np.asarray(zoom.data[0].z, dtype=float), nan=-np.inf)
        np.testing.assert_allclose(share.sum(axis=0), 1.0, rtol=1e-5)
        assert counts[:, 10:20].sum() > 0
