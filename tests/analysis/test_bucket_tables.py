"""Probability and routing bucket tables (metrics-spec section 5): Run.bucket_metrics(by="prob" / "route")
against an independent numpy reference over the token rows."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import rldiag
from tests.metrics.reference import make_record

PROB_EDGES = [1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0]


def _record_moe(path, steps=3, seed=0, route=True):
    rng = np.random.default_rng(seed)
    with rldiag.Recorder(path) as rec:
        for s in range(steps):
            for _ in range(2):
                r = make_record(rng, 8, 24, nan_frac=0.02)
                r.pop("rollout_logprobs", None)
                r.pop("route_agree", None)
                old = r["old_logprobs"].astype(np.float64)
                # sampler log-probs spread over every probability bucket, some far from the trainer's
                roll = np.minimum(old + rng.standard_t(2, old.shape) * 0.4, 0.0)
                low = rng.random(old.shape) < 0.1
                roll[low] = rng.uniform(-18, -5, low.sum())  # rare tokens: p down to 1e-8
                roll[0, :3] = np.nan
                kw = {}
                if route:
                    ra = rng.choice([1.0, 0.95, 0.8, 0.6, 0.2, 0.5, 0.9, 0.75], size=old.shape)
                    kw["route_agree"] = ra.astype(np.float32)
                rec.record(step=s, rollout_logprobs=roll.astype(np.float32), **r, **kw)
    return rldiag.open_run(path)


def _valid_tokens(run) -> pl.DataFrame:
    tol = run.config.logp_tolerance
    return (
        run.tokens()
        .collect()
        .filter(
            pl.col("logp").is_finite()
            & pl.col("old_logp").is_finite()
            & pl.col("adv").is_finite()
            & (pl.col("logp") <= tol)
            & (pl.col("old_logp") <= tol)
        )
    )


def _prob_bucket(p: np.ndarray) -> np.ndarray:
    b = np.searchsorted(np.array(PROB_EDGES), p, side="left")  # (e[k-1], e[k]] -> k; p <= 1e-6 -> 0
    return np.minimum(b, len(PROB_EDGES) - 1)


def _route_bucket(x: np.ndarray) -> np.ndarray:
    b = np.searchsorted(np.array([0.0, 0.5, 0.75, 0.9, 1.0]), x, side="right") - 1  # [e[k], e[k+1]) -> k
    return np.where(np.isfinite(x) & (x >= 0) & (x <= 1), b, -1)


def _close(x: float, y: float, rel: float = 1e-9) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-12)


def test_prob_buckets_equal_a_numpy_reference(tmp_path) -> None:
    run = _record_moe(tmp_path / "r")
    tab = run.bucket_metrics(by="prob")
    assert tab.columns == [
        "step",
        "bucket",
        "bucket_lo",
        "bucket_hi",
        "n",
        "mismatch/k1",
        "mismatch/k3",
        "mismatch/absd_mean",
        "mismatch/extreme_frac",
    ]
    tok = _valid_tokens(run).filter(pl.col("rollout_logp").is_finite())
    seen = 0
    for step in run.steps():
        t = tok.filter(pl.col("step") == step)
        roll = t["rollout_logp"].to_numpy().astype(np.float64)
        d = t["old_logp"].to_numpy().astype(np.float64) - roll
        b = _prob_bucket(np.exp(roll))
        for k in np.unique(b):
            sel = b == k
            row = tab.filter((pl.col("step") == step) & (pl.col("bucket") == int(k))).row(0, named=True)
            assert row["n"] == sel.sum()
            assert _close(row["mismatch/k1"], float(np.mean(-d[sel])))
            assert _close(row["mismatch/k3"], float(np.mean(np.exp(d[sel]) - 1 - d[sel])), rel=1e-7)
            assert _close(row["mismatch/absd_mean"], float(np.mean(np.abs(d[sel]))))
            assert _close(row["mismatch/extreme_frac"], float(np.mean(np.abs(d[sel]) > math.log(2))))
            assert row["bucket_hi"] == PROB_EDGES[k] and row["bucket_lo"] == (PROB_EDGES[k - 1] if k else 0.0)
            seen += 1
        assert tab.filter(pl.col("step") == step).height == np.unique(b).size
    assert seen >= 3 * 5  # the records spread over most buckets
    # the buckets partition the step's mismatch tokens: n sums to the step's token count with a finite d
    per_step = tab.group_by("step").agg(pl.col("n").sum()).sort("step")["n"].to_list()
    assert per_step == [tok.filter(pl.col("step") == s).height for s in run.steps()]


def test_route_buckets_equal_a_numpy_reference(tmp_path) -> None:
    run = _record_moe(tmp_path / "r")
    tab = run.bucket_metrics(by="route")
    assert tab.columns == ["step", "bucket", "bucket_lo", "bucket_hi", "n"] + [
        "ratio/mean",
        "ratio/std",
        "clip/region",
        "entropy/mean",
        "mismatch/k3",
    ]
    tok = _valid_tokens(run)
    for step in run.steps():
        t = tok.filter(pl.col("step") == step)
        b = _route_bucket(t["route_agree"].to_numpy().astype(np.float64))
        lr = t["logp"].to_numpy().astype(np.float64) - t["old_logp"].to_numpy()
        r = np.exp(lr)
        d = t["old_logp"].to_numpy().astype(np.float64) - t["rollout_logp"].to_numpy()
        assert set(np.unique(b[b >= 0]).tolist()) == set(tab.filter(pl.col("step") == step)["bucket"].to_list())
        for k in np.unique(b[b >= 0]):
            sel = b == k
            row = tab.filter((pl.col("step") == step) & (pl.col("bucket") == int(k))).row(0, named=True)
            assert row["n"] == sel.sum()
            assert _close(row["ratio/mean"], float(r[sel].mean()), rel=1e-7)
            assert _close(row["ratio/std"], float(r[sel].std()), rel=1e-6)
            fd = sel & np.isfinite(d)
            assert _close(row["mismatch/k3"], float(np.mean(np.exp(d[fd]) - 1 - d[fd])), rel=1e-7)
            assert row["bucket_lo"] == [0.0, 0.5, 0.75, 0.9, 1.0][k]
            assert row["bucket_hi"] == [0.5, 0.75, 0.9, 1.0, 1.0][k]
    assert 4 in tab["bucket"].to_list() and 0 in tab["bucket"].to_list()


def test_prob_and_route_tables_are_empty_without_their_column(tmp_path) -> None:
    run = _record_moe(tmp_path / "r", steps=2, route=False)
    route = run.bucket_metrics(by="route")
    assert route.height == 0 and "mismatch/k3" in route.columns and "bucket_lo" in route.columns
    assert run.bucket_metrics(by="prob", steps=[1])["step"].unique().to_list() == [1]
    with pytest.raises(ValueError, match="by must be one of"):
        run.bucket_metrics(by="probability")


@pytest.mark.parametrize("by", ["prob", "route"])
def test_steps_computed_in_separate_tasks_give_the_same_table(tmp_path, by) -> None:
    """What the Ray engine does (ray_engine.bucket_stats): each task computes the statistics rows of a run of
    whole steps with the local function; the rows, concatenated in step order, give the local table bit for
    bit."""
    from rldiag.analysis import ray_engine
    from rldiag.analysis.recompute import bucket_table

    run = _record_moe(tmp_path / "r", steps=4)
    source = ray_engine.TokenSource(tuple(run.token_files()), dict(run.token_limits()), run.config)
    parts = [ray_engine._bucket_task(source, chunk, by, 10, None) for chunk in ray_engine.step_chunks(run.steps(), 3)]
    import pyarrow as pa

    got = bucket_table(pa.concat_tables([p for p in parts if p.num_rows], promote_options="default"), by)
    assert got.equals(run.bucket_metrics(by=by))
    assert got.height > 4


@pytest.mark.parametrize(("by", "width"), [("pos", None), ("pos", 5), ("prob", None), ("route", None)])
def test_pieces_and_row_order_do_not_change_the_table(tmp_path, by, width) -> None:
    """Bucket tables stream pieces of whole steps and put rows in (step, bucket, record) order by a counting
    pass when they come in the recorder's order (a sort otherwise): any piece size and a shuffled row order
    give the same table, bit for bit."""
    from rldiag.analysis.recompute import bucket_stats, bucket_table

    run = _record_moe(tmp_path / "r", steps=5)
    lf = run.tokens()
    want = bucket_table(bucket_stats(lf, run.config, by, 4, width), by)
    assert want.height > 5
    for rows in (1, 300, 10**9):
        assert bucket_table(bucket_stats(lf, run.config, by, 4, width, chunk_rows=rows), by).equals(want)
    shuffled = lf.collect().sample(fraction=1.0, shuffle=True, seed=3).lazy()
    assert bucket_table(bucket_stats(shuffled, run.config, by, 4, width), by).equals(want)


def _token_frame(seed: int = 7, steps: int = 4) -> pl.DataFrame:
    """Token rows in the recorder's order, (step, rank, micro, seq, pos), with two ranks and two micro-batches
    per step, ragged sequences, stages and turns, invalid tokens (a NaN advantage, a log-prob above 0), NaN
    entropies and sampler log-probs, and route_agree values on and off the bucket edges."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "rank", "micro", "seq", "pos", "stage", "turn")}
    vals: dict[str, list[np.ndarray]] = {k: [] for k in ("logp", "old_logp", "adv", "entropy", "rollout_logp")}
    vals["route_agree"] = []
    for step in range(steps):
        for rank in range(2):
            for micro in range(2):
                for seq in range(int(rng.integers(2, 6))):
                    n = int(rng.integers(1, 90))
                    for k, v in (("step", step), ("rank", rank), ("micro", micro), ("seq", seq)):
                        cols[k].append(np.full(n, v))
                    cols["pos"].append(np.arange(n))
                    cols["stage"].append(np.minimum(np.arange(n) // 25, 3))
                    cols["turn"].append(np.arange(n) // 40)
                    old = -rng.exponential(1.0, n)
                    lp = np.minimum(old + rng.standard_t(2, n) * 0.2, 0.0)
                    lp[rng.random(n) < 0.03] = 0.5  # above the tolerance: invalid
                    adv = np.full(n, rng.normal())
                    adv[rng.random(n) < 0.03] = np.nan
                    roll = np.minimum(old + rng.standard_t(2, n) * 0.5, 0.0)
                    roll[rng.random(n) < 0.05] = np.nan
                    ent = rng.exponential(1.0, n)
                    ent[rng.random(n) < 0.05] = np.nan
                    route = rng.choice([1.0, 0.95, 0.9, 0.8, 0.75, 0.6, 0.5, 0.2, 0.0, np.nan], n)
                    for k, v in (("logp", lp), ("old_logp", old), ("adv", adv), ("entropy", ent)):
                        vals[k].append(v)
                    vals["rollout_logp"].append(roll)
                    vals["route_agree"].append(route)
    frame = {k: np.concatenate(v) for k, v in cols.items()}
    frame |= {k: np.concatenate(v).astype(np.float32) for k, v in vals.items()}
    return pl.DataFrame(frame).with_columns(
        pl.col("step", "seq").cast(pl.Int64), pl.col("rank", "micro", "pos", "stage", "turn").cast(pl.Int32)
    )


def _fingerprint(tab: pl.DataFrame) -> str:
    import hashlib

    data = tab.select(pl.all().cast(pl.Float64)).to_numpy()
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]


# the tables of _token_frame() as the kernel computed them before the in-place bucket accumulation
# (bucket_kernel.bucket_records) replaced the gather: any last-bit change of a table changes its fingerprint
_FINGERPRINTS = {
    ("pos", None): "c3cc7f96439bc5b3",
    ("pos", 16): "d759edd938937a69",
    ("stage", None): "3c69b298996f259e",
    ("turn", None): "3462be7785eae6b6",
    ("prob", None): "6ae967f260a114ad",
    ("route", None): "344e623cea22fada",
}


@pytest.mark.parametrize(("by", "width"), list(_FINGERPRINTS))
def test_in_place_accumulation_is_bit_identical_to_the_kernel(by, width) -> None:
    """Rows in the recorder's order go through bucket_kernel.bucket_records (no gather); shuffled rows through
    the sort and the kernel. Both give the same table bit for bit (several ranks and micro-batches per step,
    invalid tokens, NaN inputs), and the table is today's (a fingerprint of its values)."""
    from rldiag.analysis.recompute import bucket_stats, bucket_table
    from rldiag.config import RecorderConfig
    from rldiag.stats import bucket_kernel

    frame = _token_frame()
    cfg = RecorderConfig()
    calls = []
    original = bucket_kernel.bucket_records

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    bucket_kernel.bucket_records = counted
    try:
        fast = bucket_table(bucket_stats(frame.lazy(), cfg, by, 4, width), by)
    finally:
        bucket_kernel.bucket_records = original
    assert calls  # the in-place path ran
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=5).lazy()
    slow = bucket_table(bucket_stats(shuffled, cfg, by, 4, width), by)
    assert fast.height > 8
    assert fast.equals(slow)
    assert _fingerprint(fast) == _FINGERPRINTS[(by, width)]


def test_pieces_sized_from_wrong_step_counts_still_cover_every_step() -> None:
    """Stored per-step counts only size the pieces (step ranges open at both ends): counts that miss steps or
    miscount them give the same table as counting the rows."""
    from rldiag.analysis.recompute import bucket_stats, bucket_table
    from rldiag.config import RecorderConfig

    frame = _token_frame(steps=6)
    cfg = RecorderConfig()
    want = bucket_table(bucket_stats(frame.lazy(), cfg, "pos", 4, None), "pos")
    for counts in ((np.array([2]), np.array([10])), (np.array([0, 3, 5]), np.array([10**6, 1, 1]))):
        for chunk in (1, 500, 10**9):
            got = bucket_stats(frame.lazy(), cfg, "pos", 4, None, chunk_rows=chunk, step_rows=counts)
            assert bucket_table(got, "pos").equals(want)
    assert sorted(want["step"].unique().to_list()) == list(range(6))


def test_probability_buckets_on_and_around_every_edge_follow_the_definition() -> None:
    """Probability buckets compare log-probabilities with the edges' logs and use exp only within 1e-9 of an
    edge: the same buckets as the definition (p = exp(x) against the edges) on, just below and just above
    every edge's log, and on random log-probabilities."""
    from rldiag.stats import bucket_kernel

    def definition(x: float) -> int:
        if not math.isfinite(x):
            return -1
        p = math.exp(x)
        return min(sum(p > e for e in PROB_EDGES[:-1]), len(PROB_EDGES) - 1)

    logs = np.log(np.array(PROB_EDGES))
    near = [np.nextafter(v, d) for v in logs for d in (-np.inf, np.inf)] + list(logs)
    f32 = [np.float32(v) for v in near] + [np.nextafter(np.float32(v), np.float32(d)) for v in logs for d in (-1, 1)]
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array(f32, np.float32), rng.uniform(-30, 1, 20_000).astype(np.float32)])
    x = np.concatenate([x, np.array([0.0, -0.0, 1e-45, -1e-45, np.nan, np.inf, -np.inf], np.float32)])
    assert bucket_kernel.buckets("prob", x).tolist() == [definition(float(v)) for v in x]
    x64 = np.array(near)  # float64 values closer to the edges than float32 can be
    assert bucket_kernel.buckets("prob", x64).tolist() == [definition(float(v)) for v in x64]


def test_too_many_buckets_for_in_place_accumulation_fall_back_to_the_kernel() -> None:
    """A step with more (bucket, rank/micro) combinations than bucket_records accumulates at once (stages up to
    40,000 here, x 4 rank/micro runs) is gathered and computed by the kernel: the same table as shuffled rows."""
    from rldiag.analysis.recompute import bucket_stats, bucket_table
    from rldiag.config import RecorderConfig
    from rldiag.stats import bucket_kernel

    frame = _token_frame(steps=2).with_columns((pl.col("stage") * 13_333).cast(pl.Int32))
    cfg = RecorderConfig()
    assert (
        bucket_kernel.bucket_records(
            *(frame[c].to_numpy() for c in ("step", "rank", "micro", "stage", "logp", "old_logp", "adv")),
            None,
            None,
            cfg,
        )
        is None
    )
    fast = bucket_table(bucket_stats(frame.lazy(), cfg, "stage", 4, None), "stage")
    slow = bucket_table(
        bucket_stats(frame.sample(fraction=1.0, shuffle=True, seed=1).lazy(), cfg, "stage", 4, None), "stage"
    )
    assert fast.height > 4 and fast.equals(slow)


def _write_token_files(frame: pl.DataFrame, folder, *, split_ranks: bool, row_group: int) -> list:
    """``frame``'s rows as token files with small row groups (boundaries inside steps): one file, or one per
    rank (each step's rows then in both files)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    parts = [frame.filter(pl.col("rank") == r) for r in (0, 1)] if split_ranks else [frame]
    files = []
    for i, part in enumerate(parts):
        f = folder / f"t{i}.parquet"
        pq.write_table(part.to_arrow(), f, row_group_size=row_group)
        files.append(f)
    return files


@pytest.mark.parametrize("split_ranks", [False, True])
@pytest.mark.parametrize(("by", "width"), list(_FINGERPRINTS))
def test_row_groups_read_once_give_the_piece_paths_table(tmp_path, monkeypatch, split_ranks, by, width) -> None:
    """Bucket tables read straight from the token files (each row group once, the steps a row-group boundary
    cuts joined; files=...) equal the piece path's bit for bit: one file or one per rank (a step's rows in both:
    position deciles of the longest response over both), row groups of 37 and 1,000 rows, a restart limit, a
    step selection, and rows out of order (then the piece path computes them)."""
    from rldiag.analysis import recompute
    from rldiag.analysis.recompute import bucket_stats, bucket_table, scan_tokens
    from rldiag.config import RecorderConfig

    direct = []
    original = recompute._bucket_stats_files

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        direct.append(out is not None)
        return out

    monkeypatch.setattr(recompute, "_bucket_stats_files", counted)
    frame = _token_frame()  # the fingerprinted rows
    cfg = RecorderConfig()
    for row_group in (37, 1000):
        files = _write_token_files(frame, tmp_path / f"g{row_group}", split_ranks=split_ranks, row_group=row_group)
        for limits, steps in (({}, None), ({files[0]: 3}, None), ({}, [1, 3])):
            lf = scan_tokens(files, limits)
            if steps is not None:
                lf = lf.filter(pl.col("step").is_in(steps))
            want = bucket_table(bucket_stats(lf, cfg, by, 4, width), by)
            got = bucket_table(bucket_stats(lf, cfg, by, 4, width, files=files, limits=limits, steps=steps), by)
            assert direct.pop() is True
            assert got.height > 3 or by in ("prob", "route") and got.height > 0
            assert got.equals(want), (row_group, limits, steps)
            if not split_ranks and not limits and steps is None:
                assert _fingerprint(got) == _FINGERPRINTS[(by, width)]
    shuffled = _write_token_files(
        frame.sample(fraction=1.0, shuffle=True, seed=2), tmp_path / "s", split_ranks=False, row_group=50
    )
    got = bucket_table(bucket_stats(scan_tokens(shuffled), cfg, by, 4, width, files=shuffled), by)
    assert direct.pop() is False  # not in the recorder's order: the piece path
    assert _fingerprint(got) == _FINGERPRINTS[(by, width)]
