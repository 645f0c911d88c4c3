"""The Ranks page: one metric per rank, and one bad rank standing out (a recorded 4-rank run)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

BAD_RANK = 2


def record_ranks(path: Path, *, steps: int = 30, bad_from: int = 10, world: int = 4) -> None:
    """``world`` ranks recording the same kind of batch; rank BAD_RANK's policy drifts far more from ``bad_from``."""
    import rldiag

    for rank in range(world):
        rng = np.random.default_rng(rank)
        rec = rldiag.Recorder(path, clip_low=0.2, clip_high=0.28, rank=rank, world_size=world)
        for step in range(steps):
            old = -rng.gamma(1.0, 0.8, size=(4, 16)).astype(np.float32)
            drift = 0.02 if (rank != BAD_RANK or step < bad_from) else 0.5
            logp = np.minimum(old + rng.normal(0, drift, size=old.shape), 0).astype(np.float32)
            adv = rng.normal(0, 1, size=4).astype(np.float32)
            rec.record(step=step, logprobs=logp, old_logprobs=old, advantages=adv, mask=np.ones(old.shape, bool))
        rec.close()


@pytest.fixture(scope="module")
def ranks(rank_run: Path):
    """The page module (pages register themselves, so an app must exist before the import)."""
    from app.app import create_app

    create_app(rank_run)
    return importlib.import_module("app.pages.ranks")


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    record_ranks(root / "four_ranks")
    return root


def test_robust_z_singles_out_one_rank_among_agreeing_ones(ranks):
    values = np.ones((8, 3))
    values[2, 1] = 5.0
    values[3, 1] = 1.1
    values[4, 2] = np.nan
    z = ranks.robust_z(values)
    assert z[2, 1] > 3 and np.all(np.abs(np.delete(z[:, 1], 2)) < 1)
    assert np.all(z[:, 0] == 0) and np.isnan(z[4, 2])
    assert ranks.worst_rank(np.array([10, 11, 12]), list(range(8)), z)[:2] == (2, 11)


def test_aggregation_keeps_a_one_step_outlier_at_every_zoom(ranks):
    steps = np.arange(100_000)
    values = np.ones((8, steps.size))
    values[1, 77_777] = 9.0
    z = ranks.robust_z(values)
    xs, vs, zs = ranks.aggregate(steps, values, z)
    assert len(xs) <= 600 and vs[1].max() == 9.0 and zs[1].max() > 3
    xs, vs, zs = ranks.aggregate(steps, values, z, (77_000.0, 78_000.0))
    assert xs[0] >= 77_000 and xs[-1] <= 78_000 and len(xs) <= 600 and vs[1].max() == 9.0


def test_the_bad_rank_stands_out_in_a_recorded_run(ranks, make_app, rank_run: Path):
    app = make_app(rank_run)
    with app.server.test_request_context():
        page = ranks.layout(run="four_ranks")
        fig = ranks.run_figure("four_ranks", "ratio/logabs_p999")
        # one line per rank and the deviation heatmap
        lines = [t for t in fig.data if t.type == "scatter"]
        assert [t.name for t in lines] == [f"rank {r}" for r in range(4)]
        heat = next(t for t in fig.data if t.type == "heatmap")
        z = np.asarray(heat.z, dtype=float)
        worst_row = int(np.nanargmax(np.nanmax(np.abs(z), axis=1)))
        assert heat.y[worst_row] == str(BAD_RANK)
        assert f"rank {BAD_RANK} deviates most" in fig.layout.title.text
        assert "ranks-metric" in str(page)
        assert "4 rank(s)" in ranks.rank_note(["four_ranks"])


def test_a_run_of_one_step_shows_each_rank_as_a_point(ranks, make_app, tmp_path: Path):
    record_ranks(tmp_path / "one_step", steps=1, world=2)
    app = make_app(tmp_path)
    with app.server.test_request_context():
        fig = ranks.run_figure("one_step", "ratio/max")
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.mode for t in lines] == ["lines+markers"] * 2  # a line through one point draws nothing


def test_a_restarted_rank_is_marked_on_the_per_rank_view(ranks, make_app, tmp_path: Path):
    import rldiag

    record_ranks(tmp_path / "rank_restart", steps=8, world=2)
    rng = np.random.default_rng(9)
    with rldiag.Recorder(tmp_path / "rank_restart", rank=1, world_size=2) as rec:  # rank 1 alone resumed at 4
        for step in range(4, 8):
            old = -rng.gamma(1.0, 0.8, size=(4, 16)).astype(np.float32)
            logp = np.minimum(old + rng.normal(0, 0.02, size=old.shape), 0).astype(np.float32)
            rec.record(step=step, logprobs=logp, old_logprobs=old, advantages=rng.normal(size=4).astype(np.float32))
    app = make_app(tmp_path)
    with app.server.test_request_context():
        fig = ranks.run_figure("rank_restart", "ratio/max")
    marks = [sh for sh in fig.layout.shapes if sh.line.dash == "dot"]
    assert marks and {sh.x0 for sh in marks} == {4}  # across the lines and the heatmap
    assert [a.text for a in fig.layout.annotations if "restart" in a.text] == ["restart: rank 1"]


def test_steps_a_restart_left_without_data_break_every_rank_line(ranks):
    import polars as pl

    frame = pl.DataFrame({"step": [0, 0, 1, 1, 4, 4], "rank": [0, 1] * 3, "ratio/max": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]})
    fig = ranks.rank_figure(frame, "ratio/max", title="t", gaps=[(2, 3)])
    lines = [t for t in fig.data if t.type == "scatter"]
    for t in lines:
        assert list(t.x) == [0, 1, 2.5, 4] and np.isnan(t.y[2]) and np.isfinite(np.delete(t.y, 2)).all()
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert list(heat.x) == [0, 1, 2.5, 4] and np.isnan(np.asarray(heat.z, dtype=float)[:, 2]).all()
    joined = ranks.rank_figure(frame, "ratio/max", title="t")
    assert list(next(t for t in joined.data if t.type == "scatter").x) == [0, 1, 4]


def test_zoom_events_are_read_from_either_axis(ranks):
    assert ranks.zoom_of({"xaxis.range[0]": 3, "xaxis.range[1]": 9.5}) == (3.0, 9.5)
    assert ranks.zoom_of({"xaxis2.range": [1, 2]}) == (1.0, 2.0)
    assert ranks.zoom_of({"xaxis.autorange": True}) is None
    assert ranks.zoom_of({"xaxis.range[0]": "nan", "xaxis.range[1]": 1}) is None
