"""Build an rldiag run from token rows that came without statistics (Parquet or CSV from elsewhere).

The rows go through :class:`~rldiag.record.recorder.Recorder` like live data, so the statistics come from
the one kernel and the run is first-class: every metric, the dashboard, the alerts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
from rldiag.config import RecorderConfig

_ARG_OF = {
    schema.LOGP: "logprobs", schema.OLD_LOGP: "old_logprobs", schema.ADV: "advantages",
    schema.ENTROPY: "entropy", schema.ROLLOUT_LOGP: "rollout_logprobs", schema.REF_LOGP: "ref_logprobs",
    schema.TEACHER_LOGP: "teacher_logprobs", schema.BASE_LOGP: "base_logprobs", schema.TOKEN_ID: "token_ids",
    schema.VERSION: "versions", schema.TURN: "turns", schema.STAGE: "stages",
}
_PER_SEQ = {schema.GROUP: "group_ids", schema.REWARD: "rewards"}


def read_token_file(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a Parquet or CSV file of token rows and check it has the required columns."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet" or p.is_dir():
            df = pl.read_parquet(p)
        elif suffix in (".csv", ".tsv"):
            df = pl.read_csv(p, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=10000)
        else:
            raise ValueError(f"{p}: unknown file type {suffix!r}; give a .parquet or .csv file")
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise ValueError(f"{p} could not be read as {suffix[1:]}: {exc}") from None
    missing = [c for c in (schema.STEP, schema.LOGP, schema.OLD_LOGP, schema.ADV) if c not in df.columns]
    if missing:
        raise ValueError(
            f"{p} lacks the required column(s) {missing}; token rows need step, logp, old_logp, adv and "
            "optionally rank, micro, seq, pos and the other columns of docs/run-format.md"
        )
    if schema.SEQ not in df.columns and schema.POS not in df.columns:
        raise ValueError(f"{p} needs a `seq` column (response id) or a `pos` column (position, 0 at each "
                         "response start) to tell responses apart")
    return df


def import_tokens(df: pl.DataFrame, run_dir: str | os.PathLike[str], *, config: RecorderConfig | None = None,
                  name: str | None = None) -> Path:
    """Record the token rows of ``df`` into a new run at ``run_dir`` and return its path."""
    from rldiag.record.recorder import Recorder

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} already exists and is not empty; import into a new directory")
    df = df.with_row_index("_row")
    if schema.POS not in df.columns:
        df = df.with_columns((pl.int_range(pl.len()).over(schema.STEP, schema.SEQ)).alias(schema.POS))
    if schema.SEQ not in df.columns:  # a new response starts wherever pos goes back to 0
        df = df.with_columns((pl.col(schema.POS) == 0).cum_sum().over(schema.STEP).alias(schema.SEQ))
    for col, default in ((schema.RANK, 0), (schema.MICRO, 0)):
        if col not in df.columns:
            df = df.with_columns(pl.lit(default).alias(col))
    df = df.sort([schema.RANK, schema.STEP, schema.MICRO, schema.SEQ, schema.POS])
    ranks = df[schema.RANK].unique().sort().to_list()
    world = max(ranks) + 1 if ranks else 1
    for rank in ranks:
        part = df.filter(pl.col(schema.RANK) == rank)
        with Recorder(run_dir, config=config, rank=int(rank), world_size=world, name=name) as rec:
            for (step, _micro), rec_df in part.group_by([schema.STEP, schema.MICRO], maintain_order=True):
                rec.record(step=int(step), **_grid(rec_df))
    return run_dir


def _grid(df: pl.DataFrame) -> dict[str, Any]:
    seq_codes, seq_idx = np.unique(df[schema.SEQ].to_numpy(), return_inverse=True)
    pos = df[schema.POS].to_numpy().astype(np.int64)
    if (pos < 0).any():
        raise ValueError("token rows have negative `pos` values")
    B, T = seq_codes.size, int(pos.max()) + 1
    if B * T > 50_000_000:
        raise ValueError(f"a record of {B} responses x {T} positions is too large to import in one piece; "
                         "split it with a `micro` column")
    mask = np.zeros((B, T), dtype=bool)
    mask[seq_idx, pos] = True
    out: dict[str, Any] = {"mask": mask}
    for col, arg in _ARG_OF.items():
        if col not in df.columns or df[col].null_count() == len(df):
            continue
        values = df[col].to_numpy()
        kind = np.int64 if col in (schema.TOKEN_ID, schema.VERSION, schema.TURN, schema.STAGE) else np.float32
        grid = np.zeros((B, T), dtype=kind) if kind is np.int64 else np.full((B, T), np.nan, dtype=kind)
        if kind is np.float32 and col in (schema.LOGP, schema.OLD_LOGP):
            grid[:] = 0.0
        grid[seq_idx, pos] = values.astype(kind) if values.dtype != object else values
        out[arg] = grid
    for col, arg in _PER_SEQ.items():
        if col not in df.columns or df[col].null_count() == len(df):
            continue
        first = np.full(B, len(df), dtype=np.int64)
        np.minimum.at(first, seq_idx, np.arange(len(df)))
        vals = df[col].to_numpy()[first]
        out[arg] = vals.astype(np.int64 if col == schema.GROUP else np.float32)
    return out
