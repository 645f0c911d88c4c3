"""Runs written by an older rldiag keep opening: a run of the first run format (the healthy sample run as
committed before the section-5 statistics were added, ``tests/data/run_format_v1``) gives the same metrics it
gave then, and NaN for the metrics built on statistics it never recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

import rldiag
from rldiag import schema
from rldiag.stats.table import LATER_STATS_COLUMNS, STATS_SCHEMA

DATA = Path(__file__).parent / "data"
V1 = DATA / "run_format_v1"


def _v1_copy(tmp_path: Path) -> Path:
    run = tmp_path / "v1"
    shutil.copytree(V1, run)  # the run index is written into the run: keep the committed copy clean
    return run


def test_a_first_format_run_gives_the_metrics_it_gave_then(tmp_path: Path) -> None:
    run = rldiag.open_run(_v1_copy(tmp_path))
    assert not run.problems, [p.message for p in run.problems]
    got = run.step_metrics()
    want = pl.read_parquet(DATA / "run_format_v1_step_metrics.parquet")  # written by rldiag at commit 3b21d1c
    assert got["step"].to_list() == want["step"].to_list()
    differ = [c for c in want.columns if not np.array_equal(got[c].to_numpy(), want[c].to_numpy(), equal_nan=True)]
    assert differ == []
    new = [c for c in got.columns if c not in want.columns and c.startswith(("mismatch/", "removed/", "moe/"))]
    assert new and all(np.isnan(got[c].to_numpy()).all() for c in new), new


def test_a_first_format_run_reads_its_token_rows_and_recomputes(tmp_path: Path) -> None:
    run = rldiag.open_run(_v1_copy(tmp_path))
    tokens = run.tokens().collect()
    assert tokens.height > 0 and tokens[schema.ROUTE_AGREE].null_count() == tokens.height
    stored = run.step_metrics(metrics=["entropy/mean", "tokens/count"])
    again = run.step_metrics(metrics=["entropy/mean", "tokens/count"], from_tokens=True)
    assert np.allclose(stored["entropy/mean"].to_numpy(), again["entropy/mean"].to_numpy(), rtol=1e-9)
    assert run.bucket_metrics().height > 0 and run.lens().height == len(run.steps())


def test_every_statistics_column_is_of_the_first_format_or_listed_as_later() -> None:
    first = set(pq.read_schema(next((V1 / "stats").glob("*.parquet"))).names)
    unlisted = [f.name for f in STATS_SCHEMA if f.name not in first and f.name not in LATER_STATS_COLUMNS]
    assert unlisted == [], "add new statistics columns to rldiag.stats.table.LATER_STATS_COLUMNS"
    token_first = set(pq.read_schema(next((V1 / "tokens").glob("*.parquet"))).names)
    assert set(schema.TOKEN_DTYPES) - token_first <= schema.LATER_TOKEN_COLUMNS


def test_a_damaged_file_missing_a_first_format_column_is_still_skipped(tmp_path: Path) -> None:
    run_dir = _v1_copy(tmp_path)
    victim = sorted((run_dir / "stats").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    pq.write_table(table.drop_columns(["s_ent"]), victim)
    run = rldiag.open_run(run_dir)
    assert any(victim.name in p.message and "s_ent" in p.message for p in run.problems)
