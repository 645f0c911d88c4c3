"""Crafted statistics files: values read from a file never index memory unchecked (issue 16, critical)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rldiag
from rldiag import schema
from rldiag.analysis.io import RunFormatWarning
from rldiag.stats import hist

SAMPLE = Path(__file__).resolve().parents[2] / "sample_logs" / "healthy"


def _copy_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(SAMPLE, run, ignore=shutil.ignore_patterns(".rldiag-index*"))
    for p in run.rglob("*index*.parquet"):
        p.unlink()
    return run


def _rewrite(path: Path, column: str, fn) -> None:
    """Rewrite one list column of a statistics file with ``fn(list of python lists) -> list``."""
    table = pq.read_table(path)
    col = table.column(column)
    new = pa.array(fn(col.to_pylist()), col.type)
    table = table.set_column(table.column_names.index(column), column, new)
    pq.write_table(table, path)


@pytest.mark.parametrize("bad_index", [hist.N_MAG + 3, 65535])  # 245: past the 242 entropy bins
def test_out_of_range_bin_index_skips_the_file_and_leaves_other_steps_exact(tmp_path, bad_index) -> None:
    run_dir = _copy_run(tmp_path)
    before = rldiag.open_run(SAMPLE).step_metrics()
    files = sorted((run_dir / schema.STATS_DIR).glob("*.parquet"))
    victim = files[0]

    def poison(rows):
        rows = [list(r) for r in rows]
        rows[0] = rows[0] + [bad_index] if rows[0] else [bad_index]
        return rows

    def grow_counts(rows):
        rows = [list(r) for r in rows]
        rows[0] = rows[0] + [1]
        return rows

    _rewrite(victim, "h_ent.idx", poison)
    _rewrite(victim, "h_ent.cnt", grow_counts)
    with pytest.warns(RunFormatWarning, match=victim.name):
        run = rldiag.open_run(run_dir)
        after = run.step_metrics()
    assert any(victim.name in p and "out of range" in p for p in run.info()["problems"])
    kept = pq.read_table(files[1]).column("step").to_numpy()
    b = before.filter(before["step"].is_in(kept.tolist())).sort("step")
    a = after.sort("step")
    assert a["step"].to_list() == sorted(set(kept.tolist()))
    for name in ("entropy/p10", "entropy/p50", "entropy/p90", "tokens/count"):
        np.testing.assert_array_equal(a[name].to_numpy(), b[name].to_numpy())


def test_index_and_count_lists_of_different_lengths_are_refused(tmp_path) -> None:
    run_dir = _copy_run(tmp_path)
    victim = sorted((run_dir / schema.STATS_DIR).glob("*.parquet"))[1]
    _rewrite(victim, "h_lr.cnt", lambda rows: [list(r)[:-1] if r else r for r in rows])
    with pytest.warns(RunFormatWarning, match="differ in length"):
        run = rldiag.open_run(run_dir)
        run.step_metrics()
    assert any(victim.name in p for p in run.info()["problems"])


def test_odd_config_metadata_skips_only_that_file(tmp_path) -> None:
    run_dir = _copy_run(tmp_path)
    victim = sorted((run_dir / schema.STATS_DIR).glob("*.parquet"))[0]
    table = pq.read_table(victim)
    meta = json.loads(table.schema.metadata[schema.PARQUET_META_KEY])
    meta["config"] = {"eps_low": "abc"}
    md = dict(table.schema.metadata)
    md[schema.PARQUET_META_KEY] = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata(md), victim)
    with pytest.warns(RunFormatWarning, match=victim.name):
        run = rldiag.open_run(run_dir)
    assert run.steps(), "the other file's steps are still read"


def test_densify_refuses_every_out_of_bounds_write() -> None:
    ok = hist.densify(np.array([0, 1]), 2, np.array([1, 2]), np.array([3, 4, 5]), np.array([1, 1, 1]), 10)
    assert ok.sum() == 3
    cases = [
        (np.array([0, 2]), 2, np.array([1, 2]), np.array([3, 4, 5]), np.array([1, 1, 1])),  # group
        (np.array([0, 1]), 2, np.array([1, 2]), np.array([3, 4, 10]), np.array([1, 1, 1])),  # bin
        (np.array([0, 1]), 2, np.array([1, 3]), np.array([3, 4, 5]), np.array([1, 1, 1])),  # lengths
        (np.array([0, 1]), 2, np.array([-1, 4]), np.array([3, 4, 5]), np.array([1, 1, 1])),  # negative
        (np.array([0, 1]), 2, np.array([1, 2]), np.array([3, 4, 5]), np.array([1, 1])),  # counts short
        (np.array([0]), 2, np.array([1, 2]), np.array([3, 4, 5]), np.array([1, 1, 1])),  # rows
        (np.array([0, 1]), 2, np.array([1, 2]), np.array([3, -4, 5]), np.array([1, 1, 1])),  # signed bin
    ]
    for case in cases:
        with pytest.raises(ValueError, match="damaged sparse histogram"):
            hist.densify(case[0], case[1], case[2], case[3], case[4], 10)


def test_cli_summarize_survives_a_crafted_bin_index(tmp_path) -> None:
    """Index 65535 segfaulted `rldiag summarize` before the reader checked it."""
    run_dir = _copy_run(tmp_path)
    victim = sorted((run_dir / schema.STATS_DIR).glob("*.parquet"))[0]
    _rewrite(victim, "h_ent.idx", lambda rows: [[65535] * len(r) for r in rows])
    out = subprocess.run(
        [sys.executable, "-m", "rldiag", "summarize", str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert victim.name in out.stderr
