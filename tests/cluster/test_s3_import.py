"""Importers write runs on object storage: staged locally, uploaded when the import succeeded (manifest last)."""

from __future__ import annotations

import numpy as np
import polars as pl

import rldiag
from rldiag import storage
from rldiag.cli import main


def _rows(n_steps: int = 3, seqs: int = 4, t: int = 8, bad_at: int | None = None) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    n = n_steps * seqs * t
    logp = np.log(rng.uniform(0.2, 0.99, n))
    if bad_at is not None:
        logp[bad_at] = 0.5  # a positive log-probability: bad input
    return pl.DataFrame(
        {
            "step": np.repeat(np.arange(n_steps), seqs * t),
            "seq": np.tile(np.repeat(np.arange(seqs), t), n_steps),
            "pos": np.tile(np.arange(t), n_steps * seqs),
            "logp": logp,
            "old_logp": logp + rng.normal(0, 0.05, n).clip(-0.1, 0.0),
            "adv": np.repeat(rng.normal(0, 1, n_steps * seqs), t),
        }
    )


def test_import_tokens_into_an_s3_run(s3_run, tmp_path, capsys) -> None:
    src = tmp_path / "rows.parquet"
    _rows().write_parquet(src)
    assert main(["import", "tokens", str(src), s3_run]) == 0
    run = rldiag.open_run(s3_run)
    assert run.steps() == [0, 1, 2]
    assert run.step_metrics()["tokens/count"].to_list() == [32.0, 32.0, 32.0]
    # a second import into the same run is refused, and the run is unchanged
    capsys.readouterr()
    assert main(["import", "tokens", str(src), s3_run]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_failed_import_leaves_nothing_on_s3(s3_run, tmp_path, capsys) -> None:
    src = tmp_path / "rows.parquet"
    _rows(bad_at=40).write_parquet(src)
    assert main(["import", "tokens", str(src), s3_run, "--errors", "strict"]) == 2
    assert "row" in capsys.readouterr().err
    assert not storage.location(s3_run).exists()
