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


def _record_moe(path: Path, steps: int = 6) -> None:
    """A run with rollout log-probs and routing agreement (a mixture-of-experts run's optional inputs)."""
    import rldiag

    rng = np.random.default_rng(3)
    rec = rldiag.Recorder(path, clip_low=0.2, clip_high=0.28)
    for step in range(steps):
        old = -rng.gamma(1.0, 0.8, size=(4, 16)).astype(np.float32)
        logp = np.minimum(old + rng.normal(0, 0.05, size=old.shape), 0).astype(np.float32)
        rollout = np.minimum(old + rng.normal(0, 0.02, size=old.shape), 0).astype(np.float32)
        rec.record(
            step=step,
            logprobs=logp,
            old_logprobs=old,
            advantages=rng.normal(size=4).astype(np.float32),
            rollout_logprobs=rollout,
            route_agree=rng.uniform(0.5, 1.0, size=old.shape).astype(np.float32),
        )
    rec.close()


def test_mismatch_page_has_prob_and_route_tables_or_says_why_not(tmp_path: Path, make_app, buckets):
    _record_moe(tmp_path / "runs" / "moe")
    app = make_app(tmp_path / "runs")
    with app.server.test_request_context():
        mismatch = importlib.import_module("app.pages.mismatch")
        assert "mm-buckets-by" in str(mismatch.layout(run="moe"))
        run = app.server.extensions["rldiag"].state("moe").run
        assert "route_agree" in run.tokens().collect_schema().names()
        for by in ("prob", "route"):
            options, value, note = buckets.MISMATCH.options(["moe"], by, None)
            try:
                expected = run.bucket_metrics(by=by, steps=run.steps())
            except ValueError:  # Run.bucket_metrics does not take this kind yet: the page says so
                assert options == [] and f"{by} buckets are not available" in note
                fig = buckets.MISMATCH.figure("moe", by, None, None, zoomed=False)
                assert "no " + by + " buckets" in fig.layout.annotations[0].text
                continue
            assert expected.height > 0 and value is not None and note == ""
            fig = buckets.MISMATCH.figure("moe", by, value, None, zoomed=False)
            assert fig.data[0].type == "heatmap" and set(fig.data[0].x) == set(run.steps())
            if "bucket_lo" in expected.columns:  # value buckets are named by their range
                assert len(fig.layout.yaxis.ticktext) == expected["bucket"].n_unique()
                assert all("–" in t for t in fig.layout.yaxis.ticktext)


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
