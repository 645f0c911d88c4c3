"""A panel's numbers as CSV, for the *CSV* button beside every line panel (pure: frames in, text out)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import polars as pl

from app import figures


def panel_csv(frames: Mapping[str, pl.DataFrame], metrics: Sequence[str]) -> str:
    """One row per (run, step): ``run, step, tokens_seen, [time,] <metrics...>`` at full resolution (no
    downsampling, every step; an empty cell where a metric has no value)."""
    parts = []
    for run_id, frame in frames.items():
        cols: dict[str, object] = {
            "run": [run_id] * frame.height,
            "step": frame["step"].to_list() if frame.height else [],
            "tokens_seen": figures.series_x(frame, "tokens") if "tokens/count" in frame.columns else None,
        }
        time_col = figures.time_column(frame)
        if time_col is not None:
            cols["time"] = frame[time_col].cast(pl.Float64)
        for m in metrics:
            cols[m] = frame[m].cast(pl.Float64) if m in frame.columns else pl.Series(m, [None] * frame.height)
        parts.append(pl.DataFrame({k: v for k, v in cols.items() if v is not None}, strict=False))
    if not parts:
        return ""
    table = pl.concat(parts, how="diagonal_relaxed")
    return table.with_columns(pl.selectors.float().fill_nan(None)).write_csv()


def csv_name(key: str, runs: Sequence[str]) -> str:
    """A file name for a panel's CSV: the panel key and the run ids, reduced to safe characters."""
    stem = "_".join([key, *runs])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:120].strip("-") + ".csv"
