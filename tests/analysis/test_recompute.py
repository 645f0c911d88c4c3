"""Recompute with another configuration, bucket tables, import of token rows, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.cli import main
from tests.metrics.reference import make_record


def _records(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    return [[make_record(rng, 8, 20, group_offset=10 * i) for i in range(2)] for _ in range(steps)]


def _record(path, recs, **kw):
    with rldiag.Recorder(path, **kw) as rec:
        for s, rs in enumerate(recs):
            for r in rs:
                rec.record(step=s, **r)


def _same(a: pl.DataFrame, b: pl.DataFrame, rel=1e-9) -> None:
    assert a.columns == b.columns
    for name in a.columns:
        for x, y in zip(a[name].to_list(), b[name].to_list()):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-12), name


def test_recompute_with_other_clip_equals_recording_with_it(tmp_path) -> None:
    recs = _records()
    _record(tmp_path / "a", recs, clip_high=0.2)
    _record(tmp_path / "b", recs, clip_high=0.28)
    a = rldiag.open_run(tmp_path / "a")
    want = rldiag.open_run(tmp_path / "b").step_metrics()
    got = a.step_metrics(config=a.config.replace(eps_high=0.28))
    _same(got, want)
    assert not got["clip/high"].equals(a.step_metrics()["clip/high"])


def test_every_statistic_from_token_rows_equals_the_stored_ones(tmp_path, capsys) -> None:
    recs = _records(steps=4)
    _record(tmp_path / "a", recs)
    run = rldiag.open_run(tmp_path / "a")
    _same(run.step_metrics(from_tokens=True), run.step_metrics())
    assert main(["summarize", str(tmp_path / "a"), "--from-tokens", "--metrics", "ratio/*", "--format", "json"]) == 0
    assert [r["ratio/mean"] for r in json.loads(capsys.readouterr().out)] == pytest.approx(
        run.step_metrics()["ratio/mean"].to_list(), rel=1e-9
    )


def test_teacher_and_base_nonfinite_counts_recompute_from_token_rows(tmp_path) -> None:
    """The teacher's and base model's NaN/Inf log-probs are counted when recorded and again from the token rows."""
    recs = _records(steps=2)
    rng = np.random.default_rng(3)
    for rs in recs:
        for r in rs:
            for arg in ("teacher_logprobs", "base_logprobs"):
                x = -rng.exponential(1.0, r["logprobs"].shape).astype(np.float32)
                x[rng.random(x.shape) < 0.1] = np.nan
                r[arg] = x
    _record(tmp_path / "a", recs)
    run = rldiag.open_run(tmp_path / "a")
    stored = run.step_metrics()
    for col, arg in (("teacher_logp", "teacher_logprobs"), ("base_logp", "base_logprobs")):
        want = [sum(int((r["mask"] & np.isnan(r[arg])).sum()) for r in rs) for rs in recs]
        assert stored[f"{col}/nonfinite"].to_list() == want and min(want) > 0
    _same(run.step_metrics(from_tokens=True), stored)


@pytest.mark.parametrize("group_rows", [1, 7, 37, 160])
def test_records_cut_by_row_groups_are_stitched(tmp_path, group_rows) -> None:
    """Token files with small row groups (records cut anywhere, even one row per group) recompute exactly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rldiag.analysis.recompute import iter_file_stats, row_groups
    from rldiag.record.writer import parquet_options

    _record(tmp_path / "a", _records(steps=5), clip_high=0.2)
    _record(tmp_path / "b", _records(steps=5), clip_high=0.28)
    run = rldiag.open_run(tmp_path / "a")
    cfg = run.config.replace(eps_high=0.28)
    before = run.step_metrics(config=cfg)
    for f in run.token_files():
        table = pq.read_table(f)
        pq.write_table(table, f, row_group_size=group_rows, **parquet_options(table, "lz4"))
    files = run.token_files()
    assert row_groups(files) > len(files)
    stored = run.step_stats()
    for threads in (1, 3):
        parts = list(iter_file_stats(files, cfg, threads=threads))
        assert len(parts) == row_groups(files)
        got = pl.from_arrow(pa.concat_tables(parts))
        # every record exactly once, whole
        assert got.height == stored.height == got.select(["step", "rank", "micro"]).unique().height
        order = ["step", "rank", "micro"]
        assert got.sort(order)["n"].to_list() == stored.sort(order)["n"].to_list()
    run2 = rldiag.open_run(tmp_path / "a")
    _same(run2.step_metrics(config=cfg), before)
    _same(run2.step_metrics(config=cfg), rldiag.open_run(tmp_path / "b").step_metrics())
    _same(run2.step_metrics(from_tokens=True), run2.step_metrics())
    _same(run2.step_metrics(config=cfg, steps=[1, 3]), before.filter(pl.col("step").is_in([1, 3])))


def test_recompute_by_rank_and_for_some_steps(tmp_path) -> None:
    """Per-rank recompute lines up each (step, rank) with the stored groups, a rank missing at a step included."""
    recs = _records(steps=4)
    for eps, name in ((0.2, "a"), (0.28, "b")):
        for rank in (0, 3):
            with rldiag.Recorder(tmp_path / name, clip_high=eps, rank=rank, world_size=4) as rec:
                for s, rs in enumerate(recs):
                    if rank == 3 and s == 1:
                        continue
                    for r in rs:
                        rec.record(step=s, **r)
    a = rldiag.open_run(tmp_path / "a")
    want = rldiag.open_run(tmp_path / "b").step_metrics(by_rank=True)
    got = a.step_metrics(config=a.config.replace(eps_high=0.28), by_rank=True)
    assert got.height == 7
    _same(got, want)
    _same(
        a.step_metrics(config=a.config.replace(eps_high=0.28), by_rank=True, ranks=[3]),
        want.filter(pl.col("rank") == 3),
    )


def test_damaged_token_row_group_is_skipped_with_a_warning(tmp_path) -> None:
    """A damaged page costs the records around it (NaN), never the recompute; the warning names the file."""
    import pyarrow.parquet as pq

    from rldiag.analysis.io import RunFormatWarning
    from rldiag.record.writer import parquet_options

    _record(tmp_path / "a", _records(steps=6), clip_high=0.2)
    _record(tmp_path / "b", _records(steps=6), clip_high=0.28)
    run = rldiag.open_run(tmp_path / "a")
    (f,) = run.token_files()
    table = pq.read_table(f)
    group_rows = table.num_rows // 6 + 1  # six row groups, records cut at their edges
    pq.write_table(table, f, row_group_size=group_rows, **parquet_options(table, "lz4"))
    meta = pq.read_metadata(f)
    assert meta.num_row_groups == 6
    bad = meta.row_group(2)
    start = min(bad.column(i).data_page_offset for i in range(bad.num_columns))
    size = sum(bad.column(i).total_compressed_size for i in range(bad.num_columns))
    data = bytearray(f.read_bytes())
    data[start : start + size // 2] = b"\xff" * (size // 2)
    f.write_bytes(bytes(data))
    cfg = run.config.replace(eps_high=0.28)
    with pytest.warns(RunFormatWarning, match="row group 2"):
        got = rldiag.open_run(tmp_path / "a").step_metrics(config=cfg)
    want = rldiag.open_run(tmp_path / "b").step_metrics()
    rows_per_step = table.num_rows / 6
    lost = {s for s in range(6) if s * rows_per_step < 3 * group_rows and (s + 1) * rows_per_step > 2 * group_rows}
    assert lost and got.height == 6
    for s in range(6):
        g, w = got.filter(pl.col("step") == s), want.filter(pl.col("step") == s)
        if s in lost:  # records in or cut by the damaged row group: NaN, never part of a step
            assert math.isnan(g["clip/high"].item())
        else:
            _same(g, w)


def test_recompute_of_no_steps_is_empty(tmp_path) -> None:
    _record(tmp_path / "a", _records(steps=2))
    run = rldiag.open_run(tmp_path / "a")
    cfg = run.config.replace(eps_high=0.28)
    for kw in ({"steps": []}, {"steps": slice(100, None)}, {"steps": [], "from_tokens": True}):
        df = run.step_metrics(config=cfg, **kw)
        assert df.height == 0 and df.columns == run.step_metrics().columns


def test_recompute_on_sampled_rows_warns(tmp_path) -> None:
    _record(tmp_path / "s", _records(), token_sample_rate=0.5)
    run = rldiag.open_run(tmp_path / "s")
    with pytest.warns(UserWarning, match="cover only part"):
        run.step_metrics(config=run.config.replace(eps_high=0.3))


def test_bucket_metrics_match_direct_computation(tmp_path) -> None:
    recs = _records(steps=2)
    _record(tmp_path / "r", recs)
    run = rldiag.open_run(tmp_path / "r")
    tab = run.bucket_metrics(by="pos", buckets=4)
    tok = run.tokens().collect().filter(pl.col("logp").is_not_nan())
    for step in (0, 1):
        t = tok.filter(pl.col("step") == step)
        longest = t["pos"].max() + 1
        b = (t["pos"] * 4) // longest
        r = np.exp(t["logp"].to_numpy().astype(np.float64) - t["old_logp"].to_numpy())
        for k in range(4):
            sel = (b == k).to_numpy()
            row = tab.filter((pl.col("step") == step) & (pl.col("bucket") == k)).row(0, named=True)
            assert row["n"] == sel.sum()
            assert row["ratio/mean"] == pytest.approx(r[sel].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="by must be"):
        run.bucket_metrics(by="nope")


def test_import_tokens_parquet_and_csv_round_trip(tmp_path) -> None:
    recs = _records()
    _record(tmp_path / "orig", recs)
    orig = rldiag.open_run(tmp_path / "orig")
    tok = orig.tokens().collect()
    tok.write_parquet(tmp_path / "t.parquet")
    tok.drop("cov", "rank", "micro").write_csv(tmp_path / "t.csv")
    assert main(["import", "tokens", str(tmp_path / "t.parquet"), str(tmp_path / "p")]) == 0
    assert main(["import", "tokens", str(tmp_path / "t.csv"), str(tmp_path / "c")]) == 0
    want = orig.step_metrics()
    _same(rldiag.open_run(tmp_path / "p").step_metrics(), want, rel=1e-6)
    # the CSV has no micro column: records merge per step, so record-local metrics may differ
    got = rldiag.open_run(tmp_path / "c").step_metrics()
    for name in ("ratio/mean", "clip/region", "kl/k3", "entropy/mean", "group/nonzero_frac", "ess/seq"):
        assert np.allclose(got[name].to_numpy(), want[name].to_numpy(), rtol=1e-6), name


def test_import_bad_input_is_clear(tmp_path, capsys) -> None:
    pl.DataFrame({"step": [0], "logp": [-1.0]}).write_csv(tmp_path / "bad.csv")
    assert main(["import", "tokens", str(tmp_path / "bad.csv"), str(tmp_path / "x")]) == 2
    assert "lacks the required column(s) ['old_logp', 'adv']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "keep").write_text("keep")
    good = pl.DataFrame(
        {"step": [0, 0], "seq": [0, 0], "logp": [-1.0, -2.0], "old_logp": [-1.0, -2.0], "adv": [1.0, 1.0]}
    )
    good.write_parquet(tmp_path / "g.parquet")
    assert main(["import", "tokens", str(tmp_path / "g.parquet"), str(tmp_path / "y")]) == 2
    assert (tmp_path / "y" / "keep").read_text() == "keep"


def test_cli_info_summarize_compare(tmp_path, capsys) -> None:
    _record(tmp_path / "a", _records(0))
    _record(tmp_path / "b", _records(1))
    assert main(["info", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "steps        3  (0 .. 2)" in out and "problems     none" in out
    assert main(["summarize", str(tmp_path / "a"), "--metrics", "clip/*", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and set(rows[0]) == {
        "step",
        "clip/low",
        "clip/high",
        "clip/region",
        "clip/symmetric",
        "clip/dual",
    }
    assert main(["summarize", str(tmp_path / "a"), "--steps", "1:3", "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert main(["summarize", str(tmp_path / "a"), "--metrics", "nothing*"]) == 2
    assert "no metric matches" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "diverge@" in out and "entropy/mean" in out
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path) -> None:
    _record(tmp_path / "a", _records(steps=1))
    out = subprocess.run(
        [sys.executable, "-m", "rldiag", "summarize", str(tmp_path / "a"), "--metrics", "ratio/mean"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ratio/mean" in out


def test_summarize_json_is_strict_json_with_nan_as_null(tmp_path, capsys) -> None:
    _record(tmp_path / "a", _records(steps=1))
    assert main(["summarize", str(tmp_path / "a"), "--metrics", "staleness/*", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"step": 0, "staleness/mean": None, "staleness/max": None}]


def test_run_methods_delegate_to_advanced_analytics(tmp_path) -> None:
    _record(tmp_path / "a", _records(steps=2))
    run = rldiag.open_run(tmp_path / "a")
    lens = run.lens()
    assert lens.height == 2 and "lens/ppo/kept_frac" in lens.columns
    assert np.allclose(
        1 - lens["lens/ppo/kept_frac"].to_numpy(),
        run.step_metrics(config=run.config.replace(eps_high=run.config.eps_low))["clip/region"].to_numpy(),
    )


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys) -> None:
    import sys

    import rldiag
    from rldiag.cli import main

    with rldiag.Recorder(tmp_path / "run") as rec:
        rec.record(step=0, **make_record(np.random.default_rng(0), 4, 8))
    run = rldiag.open_run(tmp_path / "run")
    with pytest.raises(ValueError, match="engine must be 'local' or 'ray'"):
        run.step_metrics(from_tokens=True, engine="spark")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    for call in (
        lambda: run.step_metrics(from_tokens=True, engine="ray"),
        lambda: run.lens(engine="ray"),
        lambda: run.bucket_metrics(engine="ray"),
    ):
        with pytest.raises(ImportError, match=r"pip install 'rldiag\[ray\]'"):
            call()
    assert main(["summarize", str(tmp_path / "run"), "--from-tokens", "--engine", "ray"]) == 2
    assert "pip install 'rldiag[ray]'" in capsys.readouterr().err
