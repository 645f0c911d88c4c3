"""A statistics file whose token counts are negative, NaN, infinite or null is skipped and named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rldiag
from rldiag.analysis.io import RunFormatWarning
from tests.analysis.test_io import _write


@pytest.mark.parametrize("column", ["n", "rows_written"])
@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf"), None])
def test_a_bad_count_skips_only_that_file(tmp_path: Path, column: str, value: float | None) -> None:
    run = tmp_path / "run"
    _write(run, 6)  # roll_steps=2: three files of two steps
    want = rldiag.open_run(run).step_metrics()
    victim = sorted((run / "stats").glob("*.parquet"))[1]
    table = pq.read_table(victim)
    values = table.column(column).to_pylist()
    values[0] = value
    i = table.column_names.index(column)
    table = table.set_column(i, column, pa.array(values, pa.float64()))
    pq.write_table(table, victim)
    with pytest.warns(RunFormatWarning, match=victim.name):
        run_ = rldiag.open_run(run)
    assert any(victim.name in p.path and "count" in p.message for p in run_.problems)
    got = run_.step_metrics()
    assert got["step"].to_list() == [0, 1, 4, 5]
    keep = want.filter(want["step"].is_in([0, 1, 4, 5]))
    assert got.equals(keep)
    assert np.isfinite(got["tokens/count"].to_numpy()).all()
