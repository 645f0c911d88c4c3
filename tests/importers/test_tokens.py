"""``rldiag import tokens``: exact counts, one-line errors naming file/row/column, nothing left on failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.cli import main
from rldiag.importers import ImportInputError
from rldiag.importers.tokens import import_token_file


def rows(n_steps=3, n_seq=4, length=5, seed=0, rank=None) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(n_steps):
        for seq in range(n_seq):
            for pos in range(length):
                lp = -float(rng.exponential())
                out.append(
                    {
                        "step": step,
                        "seq": seq,
                        "pos": pos,
                        "logp": lp,
                        "old_logp": lp - float(rng.normal(0, 0.05)) - 0.01 * 0,
                        "adv": float(seq % 2 - 0.5),
                        "entropy": float(rng.uniform(0, 2)),
                        "group": seq // 2,
                    }
                )
    df = pl.DataFrame(out)
    df = df.with_columns(pl.min_horizontal(pl.col("old_logp"), pl.lit(-1e-3)).alias("old_logp"))
    if rank is not None:
        df = df.with_columns(pl.lit(rank).alias("rank"))
    return df


def listing(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


def test_counts_are_exact_and_stored(tmp_path):
    df = rows()
    df.write_parquet(tmp_path / "t.parquet")
    report = import_token_file(tmp_path / "t.parquet", tmp_path / "run")
    run = rldiag.open_run(tmp_path / "run")
    assert report.rows_read == df.height == report.tokens == run.tokens().collect().height
    assert report.sequences == 12 and report.steps == {0, 1, 2}
    assert run.step_metrics()["tokens/count"].sum() == df.height


def test_multi_rank_export_without_rank_column_is_refused_or_counted(tmp_path, capsys):
    both = pl.concat([rows(seed=0), rows(seed=1)])  # two ranks' rows, the rank column lost
    both.write_csv(tmp_path / "t.csv")
    assert main(["import", "tokens", str(tmp_path / "t.csv"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    where = f"{tmp_path / 't.csv'}: row 61 (line 62), columns step/rank/seq/pos"
    assert f"{where}: shares (step 0, rank 0, seq 0, pos 0) with row 1" in err and "rank" in err
    assert listing(tmp_path) == ["t.csv"]
    assert main(["import", "tokens", str(tmp_path / "t.csv"), str(tmp_path / "run"), "--errors", "lenient"]) == 0
    out = capsys.readouterr().out
    assert "imported 60 token rows" in out and "from 120 rows" in out and "skipped 60: duplicate" in out
    assert rldiag.open_run(tmp_path / "run").tokens().collect().height == 60
    # with its rank column the same rows are two ranks, all imported
    pl.concat([rows(seed=0, rank=0), rows(seed=1, rank=1)]).write_parquet(tmp_path / "r.parquet")
    report = import_token_file(tmp_path / "r.parquet", tmp_path / "run2")
    assert report.tokens == 120 and rldiag.open_run(tmp_path / "run2").ranks == [0, 1]


def test_one_slightly_positive_log_prob_among_many(tmp_path, capsys):
    df = rows(n_steps=30, n_seq=11, length=5)  # 1,650 rows
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 1000).then(1e-3).otherwise(pl.col("logp")).alias("logp"))
    df.write_csv(tmp_path / "t.csv")
    assert main(["import", "tokens", str(tmp_path / "t.csv"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"rldiag import: error: {tmp_path / 't.csv'}: row 1001 (line 1002), column logp: '0.001' is a "
        "positive log-probability\n"
    )
    assert listing(tmp_path) == ["t.csv"]  # no partial run
    assert main(["import", "tokens", str(tmp_path / "t.csv"), str(tmp_path / "run"), "--errors", "lenient"]) == 0
    out = capsys.readouterr().out
    assert "imported 1,649 token rows" in out and "skipped 1: column logp is a positive log-probability" in out
    run = rldiag.open_run(tmp_path / "run")
    assert run.steps() == list(range(30)) and run.tokens().collect().height == 1649


@pytest.mark.parametrize(
    "cell,column,message",
    [
        ("", "step", "is not an integer"),
        ("1e40", "step", "is not an integer"),
        ("123456789012345678901234567890", "seq", "is not an integer"),
        ("-3", "pos", "is not an integer"),
        ("2.5", "step", "is not an integer"),
        ("abc", "logp", "is not a number"),
        ("-1.0", "entropy", "is a negative entropy"),
        ("99999999999", "rank", "is not an integer"),
    ],
)
def test_bad_cells_name_file_row_and_column(tmp_path, cell, column, message):
    df = rows(n_steps=1, rank=0).with_columns(pl.all().cast(pl.String))
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(pl.lit(cell)).otherwise(pl.col(column)).alias(column)
    )
    df.write_csv(tmp_path / "t.csv")
    with pytest.raises(ImportInputError) as err:
        import_token_file(tmp_path / "t.csv", tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 't.csv'}: row 8 (line 9), column {column}: ")
    assert message in str(err.value)
    assert listing(tmp_path) == ["t.csv"]
    report = import_token_file(tmp_path / "t.csv", tmp_path / "run", errors="lenient")
    assert report.tokens == df.height - 1 == rldiag.open_run(tmp_path / "run").tokens().collect().height
    assert sum(report.skipped.values()) == 1


def test_empty_inputs_are_errors(tmp_path):
    rows().head(0).write_parquet(tmp_path / "e.parquet")
    with pytest.raises(ImportInputError, match="holds no token rows"):
        import_token_file(tmp_path / "e.parquet", tmp_path / "run")
    (tmp_path / "h.csv").write_text("step,seq,logp,old_logp,adv\n")
    with pytest.raises(ImportInputError, match="holds no token rows"):
        import_token_file(tmp_path / "h.csv", tmp_path / "run")
    (tmp_path / "z.csv").write_text("")
    with pytest.raises(ImportInputError, match="z.csv"):
        import_token_file(tmp_path / "z.csv", tmp_path / "run")
    df = rows(n_steps=1).with_columns(pl.lit(0.5).alias("logp"))
    df.write_parquet(tmp_path / "all_bad.parquet")
    with pytest.raises(ImportInputError, match="no valid token rows left"):
        import_token_file(tmp_path / "all_bad.parquet", tmp_path / "run", errors="lenient")
    assert not (tmp_path / "run").exists()


def test_wrong_column_types_in_parquet(tmp_path):
    df = rows(n_steps=1).with_columns(pl.col("adv").cast(pl.String) + "x", pl.lit(True).alias("rank"))
    df.write_parquet(tmp_path / "t.parquet")
    with pytest.raises(ImportInputError, match=r"row 1, column rank: True is not an integer"):
        import_token_file(tmp_path / "t.parquet", tmp_path / "run")
    df = rows(n_steps=1).with_columns(pl.col("logp").map_elements(lambda v: [v], return_dtype=pl.List(pl.Float64)))
    df.write_parquet(tmp_path / "l.parquet")
    with pytest.raises(ImportInputError, match=r"row 1, column logp: \[-0.6.*\] is not a number \(a List"):
        import_token_file(tmp_path / "l.parquet", tmp_path / "run")


def test_missing_float_values_are_nan_not_errors(tmp_path):
    df = rows(n_steps=1).with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("logp")).alias("logp")
    )
    df.write_csv(tmp_path / "t.csv")
    report = import_token_file(tmp_path / "t.csv", tmp_path / "run")
    row = rldiag.open_run(tmp_path / "run").step_metrics().row(0, named=True)
    assert row["ratio/nonfinite"] == 1 and report.tokens == df.height


def test_a_killed_import_leaves_a_staging_folder_that_the_retry_removes(tmp_path):
    rows().write_parquet(tmp_path / "t.parquet")
    stale = tmp_path / ".run.rldiag-import-999999999"
    (stale / "stats").mkdir(parents=True)
    import_token_file(tmp_path / "t.parquet", tmp_path / "run")
    assert listing(tmp_path) == ["run", "t.parquet"]


def test_existing_target_is_kept(tmp_path):
    rows().write_parquet(tmp_path / "t.parquet")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep").write_text("keep")
    with pytest.raises(ImportInputError, match="not empty"):
        import_token_file(tmp_path / "t.parquet", tmp_path / "run")
    assert (tmp_path / "run" / "keep").read_text() == "keep"


_CELLS = st.one_of(
    st.none(),
    st.just(""),
    st.just("nan"),
    st.just("inf"),
    st.just("-inf"),
    st.just("1e400"),
    st.text(max_size=6),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), errors=st.sampled_from(["strict", "lenient"]))
def test_random_bad_cells_never_give_anything_but_a_clear_error(data, errors):
    df = rows(n_steps=2, n_seq=2, length=3, rank=0).with_columns(pl.all().cast(pl.String))
    n_bad = data.draw(st.integers(1, 4))
    for _ in range(n_bad):
        col = data.draw(st.sampled_from(df.columns))
        i = data.draw(st.integers(0, df.height - 1))
        cell = data.draw(_CELLS)
        df = df.with_columns(
            pl.when(pl.int_range(pl.len()) == i).then(pl.lit(cell, dtype=pl.String)).otherwise(pl.col(col)).alias(col)
        )
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.csv")
        df.write_csv(src)
        try:
            report = import_token_file(src, os.path.join(tmp, "run"), errors=errors)
        except ImportInputError as exc:
            assert str(exc).startswith(src) and "\n" not in str(exc)
            assert sorted(os.listdir(tmp)) == ["t.csv"]
            return
        held = rldiag.open_run(os.path.join(tmp, "run")).tokens().collect().height
        assert held == report.tokens
        assert report.tokens + sum(report.skipped.values()) >= report.rows_read or report.skipped
