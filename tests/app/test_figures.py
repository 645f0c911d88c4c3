"""Figure builders: trace layout, spikes, alerts, live extension, heatmaps (no server, no browser)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from app import figures
from app.downsample import ema
from rldiag import runformat


def _frame(n: int = 50, spike_at: int | None = None, offset: float = 0.0) -> pl.DataFrame:
    steps = np.arange(n)
    y = 1.0 + offset + 0.01 * np.sin(steps)
    if spike_at is not None:
        y[spike_at] = 30.0
    return pl.DataFrame({"step": steps, "ratio/max": y, "ratio/mean": np.full(n, 1.0) + 0.001 * steps})


def _ys(trace) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in trace.y], dtype=float)


def _as_list(values) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]


def test_panel_has_three_traces_per_run_and_metric_in_a_fixed_order():
    frames = {"a": _frame(), "b": _frame(offset=0.5)}
    fig = figures.metric_panel(frames, ["ratio/max", "ratio/mean"], title="t", smoothing=0.5, onpolicy=None)
    assert len(fig.data) == 2 * 2 * figures.TRACES_PER_SERIES
    names = [t.name for t in fig.data]
    assert names[:3] == ["a · ratio/max min-max", "a · ratio/max (raw)", "a · ratio/max"]
    assert names[9:12] == ["b · ratio/mean min-max", "b · ratio/mean (raw)", "b · ratio/mean"]
    assert fig.layout.meta["runs"] == ["a", "b"]


def test_in_compare_mode_a_run_has_one_colour_on_every_panel_and_metrics_differ_by_dash():
    frames = {"a": _frame(), "b": _frame(offset=0.5)}
    one = figures.metric_panel(frames, ["ratio/max", "ratio/mean"], title="t", run_order=["a", "b"])
    other = figures.metric_panel({"b": frames["b"]}, ["ratio/max"], title="t", run_order=["a", "b"])
    raw = {t.name: t.line for t in one.data if t.name.endswith("max") or t.name.endswith("mean")}
    assert raw["a · ratio/max"].color == raw["a · ratio/mean"].color != raw["b · ratio/max"].color
    assert raw["a · ratio/max"].dash != raw["a · ratio/mean"].dash
    # a panel that shows only run b draws it in b's colour, not the first colour of the palette
    assert other.data[1].line.color == raw["b · ratio/max"].color


def test_nan_gaps_stay_gaps_in_the_envelope_band():
    y = np.sin(np.arange(3000) / 50.0)
    y[1000:1600] = np.nan  # e.g. the Hill index in a healthy phase
    f = pl.DataFrame({"step": np.arange(3000), "m": y})
    fig = figures.metric_panel({"a": f}, ["m"], title="t", buckets=100)
    band = fig.data[0]
    assert band.fill == "toself" and fig.layout.meta["aggregated"]
    xs = [v for v in band.x]
    # one closed polygon per run of finite buckets, separated by a None: nothing is drawn over [1000, 1600)
    assert xs.count(None) == 1
    assert not any(v is not None and 1010 < v < 1590 for v in xs)
    # an exact series (one point per step) has no band at all
    exact = figures.metric_panel({"a": f.head(50)}, ["m"], title="t")
    assert len(exact.data[0].x) == 0


def test_raw_stays_visible_under_smoothing_and_ema_is_over_full_resolution():
    frame = _frame(n=40)
    fig = figures.metric_panel({"a": frame}, ["ratio/max"], title="t", smoothing=0.8)
    raw, sm = fig.data[1], fig.data[2]
    assert raw.visible is not False and sm.visible is not False
    np.testing.assert_allclose(_ys(raw), frame["ratio/max"].to_numpy())
    np.testing.assert_allclose(_ys(sm), ema(frame["ratio/max"].to_numpy(), 0.8))
    off = figures.metric_panel({"a": frame}, ["ratio/max"], title="t", smoothing=0.0)
    assert len(off.data[2].y) == 0 and off.data[1].showlegend


def test_spike_survives_in_the_envelope_of_a_long_downsampled_run():
    fig = figures.metric_panel({"a": _frame(n=20_000, spike_at=12_345)}, ["ratio/max"], title="t", buckets=100)
    band, raw = fig.data[0], fig.data[1]
    assert len(raw.x) <= 102 and fig.layout.meta["aggregated"]
    assert np.nanmax(_ys(band)) == 30.0
    assert band.fill == "toself"  # the band is a closed polygon: max forward, min back
    assert np.nanmax(_ys(raw)) < 30.0  # the bucket mean alone would have hidden it


def test_zoom_range_reaggregates_at_full_resolution():
    fig = figures.metric_panel(
        {"a": _frame(n=20_000, spike_at=12_345)}, ["ratio/max"], title="t", buckets=100, x_range=(12_300, 12_390)
    )
    assert not fig.layout.meta["aggregated"]
    assert list(fig.layout.xaxis.range) == [12_300, 12_390]
    assert 30.0 in _ys(fig.data[1])


def test_alerts_are_vertical_lines_at_their_steps():
    alerts = {"a": [{"step": 7, "severity": "critical", "rule": "x"}, {"step": None, "severity": "warn"}]}
    fig = figures.metric_panel({"a": _frame()}, ["ratio/max"], title="t", alerts=alerts)
    lines = [s for s in fig.layout.shapes if s.xref == "x"]
    assert [(s.x0, s.line.color) for s in lines] == [(7, figures.SEVERITY_COLORS["critical"])]
    marker = fig.data[-1]  # hoverable, after the series traces so live updates keep their indices
    assert len(fig.data) == figures.TRACES_PER_SERIES + 1
    assert list(marker.x) == [7] and "x (critical) fired at step 7" in marker.text[0] and marker.yaxis == "y2"
    assert [list(c) for c in marker.customdata] == [["a", 7.0]]  # a click opens run a at step 7
    assert fig.layout.meta["alerts"] == [["a", 7.0, "critical", "x"]]


def test_constant_and_missing_series_get_a_usable_axis():
    const = pl.DataFrame({"step": np.arange(5), "m": np.full(5, 16.0)})
    fig = figures.metric_panel({"a": const}, ["m"], title="t")
    lo, hi = fig.layout.yaxis.range
    assert lo < 16.0 < hi
    empty = pl.DataFrame({"step": np.arange(5), "m": np.full(5, np.nan)})
    fig = figures.metric_panel({"a": empty}, ["m"], title="t", no_data="record ref_logp")
    assert len(fig.data) == figures.TRACES_PER_SERIES  # live updates can still extend it
    assert any(a.text == "record ref_logp" for a in fig.layout.annotations)
    assert np.isnan(_ys(fig.data[1])).all()
    # the layout key changes when data arrives, which makes a live tick send a new figure (range, note)
    assert fig.layout.meta["key"] != figures.metric_panel({"a": const}, ["m"], title="t").layout.meta["key"]


def test_a_series_of_one_point_is_drawn_as_a_marker_until_it_has_two():
    """A line through one point draws nothing: a live run's first step would show bare axes."""
    one = pl.DataFrame({"step": [0, 1], "m": [float("nan"), 0.5]})
    fig = figures.metric_panel({"a": one}, ["m"], title="t", smoothing=0.5)
    raw, ema = fig.data[1], fig.data[2]
    assert raw.mode == ema.mode == "lines+markers" and raw.marker.color == raw.line.color
    two = pl.DataFrame({"step": [0, 1, 2], "m": [float("nan"), 0.5, 0.6]})
    fig2 = figures.metric_panel({"a": two}, ["m"], title="t", smoothing=0.5)
    assert fig2.data[1].mode == fig2.data[2].mode == "lines" and fig2.data[1].marker.size is None
    # the layout key differs, so a live tick sends the two-point figure whole instead of extending the markers
    assert fig.layout.meta["key"] != fig2.layout.meta["key"]


def test_restarts_are_marked_where_a_later_attempt_resumed():
    frame = _frame()
    fig = figures.metric_panel({"a": frame}, ["ratio/max"], title="t", restarts={"a": [(7, 0), (7, 1)]})
    lines = [sh for sh in fig.layout.shapes if sh.line.color == figures.RESTART_COLOR]
    assert [(sh.x0, sh.line.dash) for sh in lines] == [(7, "dot")]  # one line per step, whatever the ranks
    mark = next(t for t in fig.data if t.name == "restart")
    assert list(mark.x) == [7, 7] and "restart at step 7 (rank 1)" in mark.text[1] and mark.yaxis == "y2"
    assert [list(c) for c in mark.customdata] == [["a", 7], ["a", 7]]  # a click opens the tokens of that step
    plain = figures.metric_panel({"a": frame}, ["ratio/max"], title="t")
    assert plain.layout.meta["key"] != fig.layout.meta["key"]  # a new restart redraws a live panel
    assert not any(t.name == "restart" for t in plain.data)


def test_a_gap_a_restart_left_breaks_the_line_instead_of_joining_its_ends():
    frame = pl.DataFrame({"step": [0, 1, 2, 3, 6, 7], "m": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    fig = figures.metric_panel({"a": frame}, ["m"], title="t", gaps={"a": [(4, 5)]}, smoothing=0.5)
    raw, ema = fig.data[1], fig.data[2]
    assert list(raw.x) == [0, 1, 2, 3, 4.5, 6, 7]  # a point between 3 and 6 without a value: plotly breaks there
    assert _as_list(raw.y) == [1.0, 2.0, 3.0, 4.0, None, 5.0, 6.0]
    assert _as_list(ema.y)[4] is None and None not in _as_list(ema.y)[:4] + _as_list(ema.y)[5:]
    assert fig.layout.meta["key"] != figures.metric_panel({"a": frame}, ["m"], title="t").layout.meta["key"]
    # a gap of one rank that other ranks' steps fill, or one outside the drawn steps, breaks nothing
    for gaps in ([(2, 2)], [(1, 3)], [(8, 9)], []):
        assert None not in _as_list(figures.metric_panel({"a": frame}, ["m"], title="t", gaps={"a": gaps}).data[1].y)
    assert runformat.gap_breaks([0.0, 1.0, 10.0, 20.0], [(5, 30)]) == [1, 2]
    assert runformat.gap_breaks([0, 2, 3, 5], [(1, 4)]) == [0, 2]  # steps 2, 3 of other ranks inside the gap


def test_a_run_without_any_step_yet_says_so_rather_than_what_to_record():
    none = pl.DataFrame({"step": np.array([], np.int64), "m": np.array([], np.float64)})
    fig = figures.metric_panel({"a": none}, ["m"], title="t", no_data="no data in this run: record ref_logp")
    assert [a.text for a in fig.layout.annotations] == [figures.NO_STEP_YET]
    some = pl.DataFrame({"step": [0], "m": [np.nan]})  # a step, without this metric: what to record
    fig = figures.metric_panel({"a": some}, ["m"], title="t", no_data="no data in this run: record ref_logp")
    assert [a.text for a in fig.layout.annotations] == ["no data in this run: record ref_logp"]


def test_nan_and_inf_are_sent_as_gaps():
    f = pl.DataFrame({"step": [0, 1, 2], "m": [1.0, float("inf"), float("nan")]})
    fig = figures.metric_panel({"a": f}, ["m"], title="t")
    assert _as_list(fig.data[1].y) == [1.0, None, None]  # Inf is a gap too, never sent as Infinity
    json.loads(fig.to_json())  # strict JSON


def test_extend_payload_targets_the_right_traces_and_continues_the_ema():
    full_a, full_b = _frame(n=10), _frame(n=12, offset=1.0)
    fresh = {"a": full_a.tail(2), "b": full_b.tail(3)}
    update, idx = figures.extend_payload(
        fresh, {"a": full_a, "b": full_b}, ["a", "b"], ["ratio/max", "ratio/mean"], smoothing=0.6
    )
    per = figures.TRACES_PER_SERIES
    # run b, metric ratio/mean is series 3: its raw and EMA traces are 3 * 3 + 1 and + 2
    assert idx[-2:] == [3 * per + 1, 3 * per + 2]
    assert idx[:2] == [1, 2]
    assert update["x"][0] == [8.0, 9.0] and update["customdata"][0] == [8.0, 9.0]
    np.testing.assert_allclose(update["y"][-1], ema(full_b["ratio/mean"].to_numpy(), 0.6)[-3:])
    assert len(update["x"]) == len(update["y"]) == len(idx)


def test_extend_payload_without_smoothing_skips_the_ema_trace_and_none_when_nothing_is_new():
    full = _frame(n=5)
    update, idx = figures.extend_payload({"a": full.tail(1)}, {"a": full}, ["a"], ["ratio/max"])
    assert idx == [1]
    assert figures.extend_payload({"a": full.clear()}, {"a": full}, ["a"], ["ratio/max"]) is None


def test_ratio_heatmap_trims_empty_bins_and_normalises_per_step():
    centers = 2.0 ** np.arange(-10, 3, dtype=float)
    counts = np.zeros((len(centers), 4))
    counts[3:6] = [[1, 2, 0, 4], [3, 2, 0, 4], [0, 4, 0, 0]]
    fig = figures.ratio_heatmap(np.arange(4), centers, counts, bands={"p99": np.array([0.1, 0.2, 0.3, 0.4])})
    heat = fig.data[0]
    assert len(heat.y) == 3
    np.testing.assert_allclose(heat.y, np.log10(centers[3:6]))
    z = np.asarray(heat.z, dtype=float)
    share = np.nansum(10**z, axis=0)
    np.testing.assert_allclose(share[[0, 1, 3]], 1.0)
    assert math.isnan(share[2]) or share[2] == 0  # a step with no tokens has no colour
    assert fig.data[1].name == "p99"
    assert figures.ratio_heatmap(np.arange(2), centers, np.zeros((len(centers), 2))).layout.annotations


def test_bucket_heatmap_pivots_steps_by_buckets():
    f = pl.DataFrame({"step": [0, 0, 1, 1], "bucket": [0, 1, 0, 1], "ratio/mean": [1.0, 0.9, 1.1, 0.8]})
    fig = figures.bucket_heatmap(f, "ratio/mean", by="pos")
    heat = fig.data[0]
    assert list(heat.x) == [0, 1] and list(heat.y) == ["0", "1"]
    np.testing.assert_allclose(np.asarray(heat.z), [[1.0, 1.1], [0.9, 0.8]])
    assert heat.zmid == 1.0
    assert figures.bucket_heatmap(f, "missing", by="pos").layout.annotations


def test_lens_figures_read_objectives_from_column_names():
    f = pl.DataFrame(
        {
            "step": [0, 1],
            "lens/ppo/kept_frac": [0.9, 0.8],
            "lens/cispo/kept_frac": [1.0, 1.0],
            "lens/ppo/weight_mean": [1.0, 1.0],
        }
    )
    assert figures.lens_objectives(f, "kept_frac") == ["ppo", "cispo"]
    lines = figures.lens_lines(f, "kept_frac")
    assert [t.name for t in lines.data] == ["ppo", "cispo"]
    bars = figures.lens_bars(f, "kept_frac")
    assert list(bars.data[0].y) == pytest.approx([0.85, 1.0])
    assert list(bars.data[1].y) == pytest.approx([0.8, 1.0])


def test_stacked_shares_and_law_figure():
    f = pl.DataFrame({"step": [0, 1], "a": [0.25, 0.5], "b": [0.75, 0.5]})
    fig = figures.stacked_shares(f, ["a", "b", "absent"], title="t")
    assert [t.name for t in fig.data] == ["a", "b"] and fig.data[0].stackgroup == "one"
    law = figures.law_figure(np.array([1.0, 0.5]), np.array([0.2, 0.4]), a=0.3, b=1.0, r2=0.9, reward_name="r")
    assert law.layout.shapes[0].y0 == pytest.approx(0.7)  # ceiling b - a


def test_line_panel_traces_are_sent_as_plain_lists_so_extenddata_can_grow_them():
    """plotly encodes numpy arrays as base64 typed-array specs, which Plotly.extendTraces cannot extend."""
    fig = figures.metric_panel({"a": _frame(n=30)}, ["ratio/max"], title="t", smoothing=0.5)
    sent = json.loads(fig.to_json())["data"]
    for trace in sent[: figures.TRACES_PER_SERIES]:
        assert isinstance(trace["x"], list) and isinstance(trace["y"], list)


def test_the_spec_the_server_sends_is_strict_json_with_gaps_as_null():
    from plotly.io.json import to_json_plotly  # the encoder Dash uses for callback outputs

    f = pl.DataFrame({"step": [0, 1, 2], "m": [1.0, float("inf"), float("nan")]})
    spec = figures.metric_panel_spec({"a": f}, ["m"], title="t")
    sent = json.loads(to_json_plotly(spec))
    assert sent["data"][1]["y"] == [1.0, None, None]
    assert go_figure_equal(spec, figures.metric_panel({"a": f}, ["m"], title="t"))


def go_figure_equal(spec, fig) -> bool:
    import plotly.graph_objects as go
    from plotly.io.json import to_json_plotly

    return to_json_plotly(go.Figure(spec)) == to_json_plotly(fig)  # JSON: NaN == NaN as null


def _onpolicy_frame() -> pl.DataFrame:
    """Every other step on-policy (ratio exactly 1), as a run with two updates per batch records it."""
    n = 20
    on = np.arange(n) % 2 == 0
    rmax = np.where(on, 1.0, 1.2 + 0.01 * np.arange(n))
    rmin = np.where(on, 1.0, 0.8)
    return pl.DataFrame({"step": np.arange(n), "ratio/max": rmax, "ratio/min": rmin, "tokens/count": np.full(n, 100.0)})


def test_onpolicy_steps_are_marked_or_hidden_on_ratio_panels():
    f = _onpolicy_frame()
    assert figures.onpolicy_mask(f).sum() == 10
    shown = figures.metric_panel({"a": f}, ["ratio/max"], title="t", onpolicy="show")
    marks = [t for t in shown.data if t.name and t.name.startswith("on-policy")]
    assert len(marks) == 1 and list(marks[0].x) == list(range(0, 20, 2))
    assert len(shown.data[1].x) == 20  # the comb is still drawn, with its teeth marked
    hidden = figures.metric_panel({"a": f}, ["ratio/max"], title="t", onpolicy="hide")
    assert list(hidden.data[1].x) == list(range(1, 20, 2)) and min(_ys(hidden.data[1])) > 1.1
    assert not [t for t in hidden.data if t.name and t.name.startswith("on-policy")]
    # extending a hidden panel leaves new on-policy steps out too
    update, idx = figures.extend_payload({"a": f.tail(2)}, {"a": f}, ["a"], ["ratio/max"], hide_onpolicy=True)
    assert update["x"] == [[19.0]]
    assert figures.onpolicy_applies(["kl/k3"]) and not figures.onpolicy_applies(["entropy/mean"])


def test_x_axis_by_tokens_seen_keeps_the_step_for_clicks():
    f = _onpolicy_frame()
    fig = figures.metric_panel({"a": f}, ["ratio/max"], title="t", x_mode="tokens")
    raw = fig.data[1]
    assert list(raw.x)[:3] == [100.0, 200.0, 300.0] and list(raw.customdata)[:3] == [0.0, 1.0, 2.0]
    assert fig.layout.xaxis.title.text == "tokens seen"
    timed = figures.metric_panel({"a": f}, ["ratio/max"], title="t", x_mode="time")
    assert "not recorded" in timed.layout.xaxis.title.text  # falls back to steps and says so
    with_time = f.with_columns(time=1000.0 + 2.0 * pl.col("step"))
    assert list(figures.series_x(with_time, "time"))[:3] == [0.0, 2.0, 4.0]


def test_log_scale_and_threshold_lines_named_in_the_legend_not_over_the_data():
    f = _frame()
    fig = figures.metric_panel({"a": f}, ["ratio/max"], title="t", log_y=True, hlines=[(5.0, "ratio_spike (warn)")])
    assert fig.layout.yaxis.type == "log"
    assert not [a for a in fig.layout.annotations if "ratio_spike" in (a.text or "")]
    legend = [t for t in fig.data if t.name and "ratio_spike" in t.name]
    assert legend and legend[0].name == "ratio_spike (warn): 5" and fig.layout.showlegend
    assert [s.y0 for s in fig.layout.shapes if s.xref == "paper"] == [5.0]


def test_lens_colours_are_distinct_for_every_objective():
    from rldiag.analysis.lens import OBJECTIVES

    f = pl.DataFrame({"step": [0, 1], **{f"lens/{o}/kept_frac": [0.5, 0.6] for o in OBJECTIVES}})
    colours = [t.line.color for t in figures.lens_lines(f, "kept_frac").data]
    assert len(colours) == len(OBJECTIVES) == len(set(colours))
