"""Runs as rows with attributes, filters and groups over them, and the group band (app/groups.py)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from synth import record_run

from app import groups


def test_attributes_flatten_config_and_tags():
    manifest = {
        "world_size": 8,
        "config": {"eps_high": 0.28, "cov_band": [1.0, 5.0], "odd": {"deep": 1}},
        "tags": {"seed": 3, "lr": 3e-6},
    }
    a = groups.attributes(manifest)
    assert a["world_size"] == 8 and a["config.eps_high"] == 0.28 and a["config.cov_band"] == "1.0,5.0"
    assert a["tags.seed"] == 3 and a["tags.lr"] == 3e-6 and isinstance(a["config.odd"], str)
    assert groups.attributes({"tags": ["b", "a"]}) == {"tags": "a,b"}
    assert groups.attributes({"config": "not a dict", "tags": None}) == {}


def test_filters_combine_name_globs_and_attribute_terms():
    a = {"config.eps_high": 0.28, "tags.seed": 3, "tags.algo": "grpo"}
    assert groups.matches("sweep/lr3e-6_seed3", a, "lr3e-6 eps_high=0.28")
    assert groups.matches("x", a, "seed=3 algo=gr*")
    assert not groups.matches("x", a, "seed!=3")
    assert not groups.matches("x", a, "eps_high=0.2")
    assert not groups.matches("x", a, "nosuchkey=1")
    assert groups.matches("x", a, "nosuchkey!=1")
    assert groups.matches("SWEEP/a", {}, "sweep*") and not groups.matches("a", {}, "b*")


def test_groups_by_attribute_or_by_name_without_seed():
    runs = ["lr1_seed1", "lr1_seed2", "lr2-s1", "lr2-s2", "base"]
    by_name = groups.group_runs(runs, {}, groups.NAME_GROUP)
    assert by_name == {"lr1": ["lr1_seed1", "lr1_seed2"], "lr2": ["lr2-s1", "lr2-s2"], "base": ["base"]}
    attrs = {r: {"tags.lr": 1 if r.startswith("lr1") else 2} for r in runs}
    assert list(groups.group_runs(runs, attrs, "tags.lr")) == ["tags.lr=1", "tags.lr=2"]
    assert groups.group_runs(runs, attrs, None) == {"": runs}


def test_band_is_mean_min_max_over_runs_aligned_on_step():
    rng = np.random.default_rng(0)
    frames, full = {}, np.full((3, 50), np.nan)
    for i in range(3):
        steps = np.arange(i * 5, 50)  # runs of different lengths
        y = rng.normal(size=steps.size)
        y[7] = np.nan
        frames[f"r{i}"] = pl.DataFrame({"step": steps, "m": y})
        full[i, steps] = y
    x, mean, lo, hi, n = groups.band(frames, "m")
    assert np.array_equal(x, np.arange(50))
    np.testing.assert_allclose(mean, np.nanmean(full, axis=0))
    np.testing.assert_allclose(lo, np.nanmin(full, axis=0))
    np.testing.assert_allclose(hi, np.nanmax(full, axis=0))
    np.testing.assert_array_equal(n, np.isfinite(full).sum(axis=0))


def test_a_long_bands_buckets_keep_every_runs_spike():
    steps = np.arange(100_000)
    a = np.zeros(steps.size)
    b = np.ones(steps.size)
    b[65_432] = 50.0
    x, mean, lo, hi, _ = groups.band(
        {"a": pl.DataFrame({"step": steps, "m": a}), "b": pl.DataFrame({"step": steps, "m": b})}, "m"
    )
    assert len(x) <= 600 and hi.max() == 50.0 and lo.min() == 0.0
    np.testing.assert_allclose(np.nanmean(mean), 0.5, atol=1e-3)


@pytest.fixture
def seeds_root(tmp_path: Path) -> Path:
    root = tmp_path / "seeds"
    for lr in ("lr1", "lr2"):
        for seed in (1, 2):
            run = root / f"{lr}_seed{seed}"
            record_run(run, steps=6, full=False, seed=seed)
            m = json.loads((run / "manifest.json").read_text())
            m["tags"] = {"lr": lr, "seed": seed}
            (run / "manifest.json").write_text(json.dumps(m))
    return root


def test_runs_page_columns_groups_and_band(seeds_root: Path, make_app):
    app = make_app(seeds_root)
    with app.server.test_request_context():
        runs = importlib.import_module("app.pages.runs")
        page = str(runs.layout())
        assert "tags.lr" in page and "tags.seed" in page
        table, fill_off = runs.refresh_table("seed1", 0, 0, [], ["tags.lr", "tags.seed"], "tags.lr")
        assert fill_off
        body = table.children[1].children
        group_rows = [r for r in body if getattr(r, "className", "") == "group-row"]
        assert [r.children.children for r in group_rows] == ["tags.lr=lr1 · 1 run(s)", "tags.lr=lr2 · 1 run(s)"]
        assert "'lr1'" in str(body) and "'1'" in str(body)
        fig, note = runs.update_band(None, groups.NAME_GROUP, "ratio/mean", 0)
        assert note == "2 group(s) of 4 run(s)"
        means = [t for t in fig.data if t.name]
        assert [t.name for t in means] == ["lr1 (2 runs)", "lr2 (2 runs)"]
        st = [app.server.extensions["rldiag"].state(f"lr1_seed{s}").metrics() for s in (1, 2)]
        expected = (st[0]["ratio/mean"].to_numpy() + st[1]["ratio/mean"].to_numpy()) / 2
        np.testing.assert_allclose(np.asarray(means[0].y, dtype=float), expected)
        empty, _ = runs.update_band(None, None, "ratio/mean", 0)
        assert "choose a group-by" in str(empty.layout.annotations[0].text)


def test_runs_not_loaded_in_time_fill_in_from_the_background(seeds_root: Path, make_app, monkeypatch):
    import time

    app = make_app(seeds_root)
    with app.server.test_request_context():
        runs = importlib.import_module("app.pages.runs")
        cat = app.server.extensions["rldiag"]
        cat._states.clear()
        monkeypatch.setattr(runs, "LOAD_BUDGET_SECONDS", -1.0)  # no time at all: everything loads behind
        table, fill_off = runs.refresh_table(None, 0, 0, [], [], None)
        assert "4 run(s) still loading" in str(table.children[2].children) and not fill_off
        assert str(table).count("badge-loading") == 4
        deadline = time.time() + 60
        while time.time() < deadline and not all(cat.state(r).loaded for r in cat.run_ids()):
            time.sleep(0.1)
        table, fill_off = runs.refresh_table(None, 0, 1, [], [], None)
        assert "badge-loading" not in str(table) and len(table.children) == 2 and fill_off
        assert str(table).count("badge-finished") == 4


def test_finished_runs_are_not_relisted_on_every_poll(seeds_root: Path, make_app):
    app = make_app(seeds_root)
    with app.server.test_request_context():
        runs = importlib.import_module("app.pages.runs")
        cat = app.server.extensions["rldiag"]
        runs.runs_table(cat.run_ids(), selected=[])
        updates = []
        for rid in cat.run_ids():
            st = cat.state(rid)
            real = st.update
            st.update = lambda real=real, rid=rid: (updates.append(rid), real())[1]
        runs.runs_table(cat.run_ids(), selected=[])  # a poll: every run is finished, none is read again
        assert updates == []
        runs.runs_table(cat.run_ids(), selected=[], force=True)  # the refresh button
        assert sorted(updates) == sorted(cat.run_ids())
