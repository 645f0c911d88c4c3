"""The lens's compiled passes (rldiag/stats/lens_kernel.py) against the numpy reference of test_lens.py, on the
inputs where a fast path could go wrong: runs of several ranks, micro-batches and files whose row groups cut
steps and sequences, rows out of the recorder's order, masked positions, non-finite values, rows split into
blocks for several workers, and stored row counts that do not match the token rows."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rldiag
from rldiag import schema
from rldiag.analysis import lens as L
from rldiag.analysis.recompute import stats_of_table
from rldiag.config import RecorderConfig
from rldiag.record.layout import create_run_dir
from rldiag.stats import lens_kernel as K
from tests.analysis.test_lens import assert_frames_close, random_tokens, reference


def ranked_tokens(seed: int, steps: int = 4, ranks: int = 2, micros: int = 2) -> pl.DataFrame:
    """Token rows of several ranks and micro-batches in the recorder's order per rank: (step, micro, seq, pos),
    sequence ids unique within a step ((rank << 32) + index, as the writer makes them); masked positions
    (holes in ``pos``), NaN/Inf in logp and adv, and rollout log-probs missing on some tokens."""
    rng = np.random.default_rng(seed)
    parts = []
    for rank in range(ranks):
        for step in range(steps):
            index = 0
            for micro in range(micros):
                for _ in range(int(rng.integers(2, 5))):
                    n = int(rng.integers(1, 30))
                    pos = np.sort(rng.choice(40, size=n, replace=False)).astype(np.int32)  # masked holes
                    old = np.log(rng.uniform(0.02, 1.0, n))
                    lp = np.minimum(old + rng.normal(0, 0.3, n), 0.0)
                    adv = np.full(n, rng.normal()) if index % 2 else rng.normal(size=n)
                    roll = old + rng.normal(0, 0.3, n)
                    roll[rng.random(n) < 0.2] = np.nan
                    lp[rng.random(n) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
                    adv[rng.random(n) < 0.03] = np.nan
                    parts.append(
                        pl.DataFrame(
                            {
                                "step": np.full(n, step, np.int64),
                                "rank": np.full(n, rank, np.int32),
                                "micro": np.full(n, micro, np.int32),
                                "seq": np.full(n, (rank << 32) + index, np.int64),
                                "pos": pos,
                                "logp": lp.astype(np.float32),
                                "old_logp": old.astype(np.float32),
                                "adv": adv.astype(np.float32),
                                "rollout_logp": roll.astype(np.float32),
                            }
                        )
                    )
                    index += 1
    return pl.concat(parts)


def write_run(path: Path, frame: pl.DataFrame, *, steps_per_file: int = 2, row_group: int = 37) -> None:
    """``frame`` as a run: one token file per (rank, group of steps), row groups of ``row_group`` rows (they cut
    steps and sequences), each with its segment's statistics file so that readers use it."""
    create_run_dir(path, RecorderConfig(), 1, "lens-kernel-test")
    full = frame.with_columns(pl.col(c).cast(pl.Float32) for c in ("logp", "old_logp", "adv", "rollout_logp"))
    for (rank,), part in full.group_by("rank", maintain_order=True):
        for first in range(0, int(part["step"].max()) + 1, steps_per_file):
            rows = part.filter(pl.col("step").is_between(first, first + steps_per_file - 1))
            if rows.height == 0:
                continue
            table = pa.table(
                {
                    k: rows[k].to_arrow().cast(t) if k in rows.columns else pa.nulls(rows.height, t)
                    for k, t in schema.TOKEN_DTYPES.items()
                }
            )
            name = f"r{rank:05d}-test-{first:06d}.parquet"
            pq.write_table(table, path / schema.TOKENS_DIR / name, row_group_size=row_group)
            pq.write_table(stats_of_table(table, RecorderConfig()), path / schema.STATS_DIR / name)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_of_several_ranks_files_and_row_groups_matches_the_reference(tmp_path, seed):
    frame = ranked_tokens(seed)
    write_run(tmp_path / "run", frame)
    run = rldiag.open_run(tmp_path / "run")
    assert len(run.token_files()) == 4
    assert any(pq.ParquetFile(f).metadata.num_row_groups > 2 for f in run.token_files())
    want = reference(frame, L.LensParams.from_config(run.config))
    assert_frames_close(L.lens(run), want)
    # one step per chunk, and rows cut into blocks of 5 for two workers: the same sums
    assert_frames_close(L.lens(run, chunk_rows=1, threads=2), want)


def test_shuffled_rows_of_a_run_take_the_sorted_path(tmp_path):
    frame = ranked_tokens(2)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3)
    write_run(tmp_path / "run", shuffled, steps_per_file=4)
    run = rldiag.open_run(tmp_path / "run")
    assert_frames_close(L.lens(run), reference(frame, L.LensParams.from_config(run.config)))


def test_sequences_interleaved_but_positions_increasing_are_detected():
    # each sequence's rows in position order, but two sequences alternate: the order check must see it
    frame = random_tokens(9, steps=2, seqs=4, max_len=12)
    alternating = frame.with_columns((pl.col("pos") * 10 + pl.col("seq") % 2).alias("_k")).sort("step", "_k").drop("_k")
    assert alternating["seq"].to_list()[:4] != sorted(alternating["seq"].to_list()[:4])
    assert_frames_close(L.lens(alternating), reference(frame, L.LensParams()))
    # a sequence id that comes back later in its step (not only out of order inside one sequence)
    back = pl.concat([frame.filter(pl.col("seq") != 0), frame.filter(pl.col("seq") == 0)])
    assert_frames_close(L.lens(back), reference(frame, L.LensParams()))


@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_blocks_for_several_workers_give_the_same_sums(monkeypatch, block_rows):
    frame = ranked_tokens(4, steps=3)
    want = reference(frame, L.LensParams())
    monkeypatch.setattr(L, "_BLOCK_ROWS", block_rows)
    assert len(L._blocks(frame.height, 2)) > 1
    assert_frames_close(L.lens(frame, threads=2), want)
    assert_frames_close(L.lens(frame.lazy(), threads=3, chunk_rows=50), want)


def test_stored_counts_only_size_the_chunks():
    """A run's statistics give the chunk sizes; steps they miss or miscount are still read whole."""
    frame = ranked_tokens(5, steps=5)
    wrong = pa.table({"step": pa.array([1, 3], pa.int64()), "rows_written": pa.array([1.0, 10_000.0])})
    source = SimpleNamespace(tokens=lambda: frame.lazy(), config=RecorderConfig(), compact_table=lambda: wrong)
    want = reference(frame, L.LensParams.from_config(RecorderConfig()))
    for chunk_rows in (1, 5, 10**9):
        assert_frames_close(L.lens(source, chunk_rows=chunk_rows), want)
    assert_frames_close(L.lens(source, steps=[0, 3, 4], chunk_rows=1), want.filter(pl.col("step").is_in([0, 3, 4])))


def test_float64_rows_and_int64_positions():
    frame = ranked_tokens(6).with_columns(pl.col("logp", "old_logp", "adv", "rollout_logp").cast(pl.Float64))
    frame = frame.with_columns(pl.col("pos").cast(pl.Int64))
    assert_frames_close(L.lens(frame), reference(frame, L.LensParams()))


def on_value(e: float) -> tuple[float, float] | None:
    """(logp, old_logp) with ``math.exp(logp - old_logp) == e`` exactly (the compiled passes use the same exp);
    old log-probs of several magnitudes, so the differences fall on grids of several spacings."""
    for old_logp in np.concatenate([np.linspace(-0.999, -0.5, 100), np.linspace(-1.999, -1.0, 100), [-4.0, -5.0]]):
        lp = math.log(e) + old_logp
        for _ in range(16):
            if lp > 0.0:
                break
            got = math.exp(lp - old_logp)
            if got == e:
                return lp, float(old_logp)
            lp = math.nextafter(lp, -math.inf if got > e else math.inf)
    return None


def test_tokens_exactly_on_every_ratio_bound_keep_their_gradient():
    """Ratios exactly on a bound (a bucket edge of the token pass's table) are kept, as in PPO's clip; ratios an
    ulp beyond are dropped."""
    p = L.LensParams()
    rows = []
    hit = set()
    for e in L._ratio_edges(p, L.OBJECTIVES):
        for target in (e, math.nextafter(e, math.inf), math.nextafter(e, -math.inf)):
            found = on_value(target)
            if found is not None:
                hit.add(target)
                rows += [(*found, 1.0), (*found, -1.0), (*found, 0.0)]
    assert {0.8, 1.0, 1.2, 1.28} <= hit and len(hit) > 50
    lp, olp, adv = (np.array([row[k] for row in rows]) for k in range(3))
    r = np.array([math.exp(x - y) for x, y in zip(lp, olp)])
    assert set(r) == hit
    frame = pl.DataFrame({"step": np.zeros(len(rows), np.int64), "logp": lp, "old_logp": olp, "adv": adv})
    got = L.lens(frame, objectives=["ppo", "dapo", "dual_clip", "cispo"]).row(0, named=True)
    for obj, lo, hi in (("ppo", 0.8, 1.2), ("dapo", 0.8, 1.28), ("dual_clip", 0.8, 1.2)):
        kept = ~(((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo)))
        if obj == "dual_clip":
            kept &= ~((adv < 0) & (r > 3.0))
        assert got[f"lens/{obj}/kept_frac"] == pytest.approx(kept.mean(), rel=1e-12), obj
        assert got[f"lens/{obj}/weight_mean"] == pytest.approx(np.where(kept, r, 0).mean(), rel=1e-12), obj
    assert got["lens/cispo/weight_mean"] == pytest.approx(np.minimum(r, 1.2).mean(), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    el=st.floats(0.0, 0.9),
    eh=st.floats(0.0, 5.0),
    tol=st.sampled_from([0.0, 1e-4, 1e-2]),
    old_logp=st.floats(-30.0, 0.0),
)
def test_dcpo_shortcut_never_skips_a_token_its_bounds_would_drop(el, eh, tol, old_logp):
    lo_max, hi_min = K.dcpo_shortcut(4.0 * el, 4.0 * eh, tol)
    y = min(old_logp, tol)
    q = math.exp(y)
    v = 1.0 - 4.0 * el / q
    lo = 0.5 + 0.5 * math.sqrt(v if v > 0.0 else 0.0)
    hi = 0.5 + 0.5 * math.sqrt(1.0 + 4.0 * eh / q)
    assert lo <= lo_max and hi >= hi_min


def test_step_runs_finds_every_step():
    step = np.array([3, 3, 1, 1, 3, 7, 7, 1], dtype=np.int64)
    assert np.unique(K.step_runs(step)).tolist() == [1, 3, 7]
    assert K.step_runs(np.zeros(0, np.int64)).size == 0


@numba.njit
def _both_buckets(edges, padded, xs):  # pragma: no cover - compiled
    out = np.empty((xs.size, 2), np.int64)
    for i in range(xs.size):
        out[i, 0] = K._bucket(edges, xs[i])
        out[i, 1] = K._search_bucket(padded, edges.size, xs[i])
    return out


@pytest.mark.parametrize("n_edges", [0, 1, 2, 3, 7, 8, 25, 31, 32])
def test_the_branch_free_search_finds_the_counted_bucket(n_edges):
    rng = np.random.default_rng(n_edges)
    edges = np.sort(rng.uniform(0, 3, n_edges))
    near = [edges, np.nextafter(edges, 9), np.nextafter(edges, -9)]
    xs = np.concatenate([*near, rng.uniform(-1, 4, 1000), [np.inf, -np.inf, 0.0, np.nan]])
    got = _both_buckets(edges, K.padded(edges), xs)
    np.testing.assert_array_equal(got[:, 1], got[:, 0])
    below = (edges[None, :] < xs[:-1, None]).sum(axis=1)
    on = (edges[None, :] == xs[:-1, None]).sum(axis=1)
    np.testing.assert_array_equal(got[:-1, 0], 2 * below + on)


def test_small_steps_are_chunked_by_the_table_budget(monkeypatch):
    """Each worker block holds a dense table per step of its chunk, so a chunk's steps are bounded too (a run of
    tiny steps must not allocate a table for hundreds of thousands of steps at once)."""
    frame = ranked_tokens(7, steps=6)
    want = reference(frame, L.LensParams())
    seen: list[int] = []
    rows = L._lens_rows

    def counted(chunk, *args, **kw):
        seen.append(chunk["step"].n_unique())
        return rows(chunk, *args, **kw)

    monkeypatch.setattr(L, "_lens_rows", counted)
    monkeypatch.setattr(L, "_TABLE_BUDGET", 2 * L._table_bytes(L.LensParams(), L.OBJECTIVES))
    assert_frames_close(L.lens(frame, threads=1), want)
    assert seen == [2, 2, 2]
    seen.clear()
    assert_frames_close(L.lens(frame, steps=[0, 2, 3, 5], threads=1), want.filter(pl.col("step").is_in([0, 2, 3, 5])))
    assert seen == [2, 2]
    assert L._steps_in_chunks(pl.DataFrame({"step": [1, 2, 3], "len": [1, 1, 1]}), 100, 2) == [[1, 2], [3]]
