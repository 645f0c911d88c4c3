"""``rldiag import tokens FILE RUN``: a run from token rows made anywhere (Parquet or CSV).

The file holds one row per token with rldiag's token-row columns (docs/run-format.md): ``step``, ``logp``,
``old_logp``, ``adv`` and ``seq`` or ``pos`` are required; ``rank``, ``micro``, ``group``, ``turn``,
``stage``, ``rollout_logp``, ``ref_logp``, ``teacher_logp``, ``base_logp``, ``entropy``, ``token_id``,
``reward``, ``version`` and ``route_agree`` are optional. The rows go through :class:`~rldiag.record.recorder.Recorder`
like live data, so the statistics come from the one kernel and the run is first-class.

Every value is checked before anything is written (see :mod:`rldiag.importers._core` for the error
policy): integers must be integral and in range, log-probabilities must not be positive, entropies not
negative, and no two rows may share (step, rank, seq, pos) (a multi-rank export without a ``rank`` column
does). Empty cells of a float column are missing values (NaN, counted as non-finite), not errors.

>>> report = import_token_file("rows.parquet", "runs/x", errors="lenient")  # doctest: +SKIP
>>> report.tokens == rldiag.open_run("runs/x").tokens().collect().height   # doctest: +SKIP
True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.importers._core import (
    MAX_CELLS,
    MAX_POS,
    MAX_RANK,
    MAX_STEP,
    ErrorPolicy,
    ImportInputError,
    ImportReport,
    Policy,
    import_config,
    import_target,
    one_line,
    short,
    staged_run,
)

__all__ = ["clean_token_rows", "import_token_file", "import_tokens", "read_token_file"]

_I64 = 2**63 - 1
INT_COLUMNS: dict[str, tuple[int, int]] = {
    schema.STEP: (0, MAX_STEP),
    schema.RANK: (0, MAX_RANK),
    schema.MICRO: (0, 2**31 - 1),
    schema.SEQ: (-_I64, _I64),
    schema.POS: (0, MAX_POS),
    schema.GROUP: (-_I64, _I64),
    schema.TURN: (0, 2**31 - 1),
    schema.STAGE: (0, 2**31 - 1),
    schema.TOKEN_ID: (0, 2**31 - 1),
    schema.VERSION: (0, MAX_STEP),
}
"""Integer columns and their accepted ranges."""
FLOAT_COLUMNS = (
    schema.LOGP,
    schema.OLD_LOGP,
    schema.ROLLOUT_LOGP,
    schema.REF_LOGP,
    schema.TEACHER_LOGP,
    schema.BASE_LOGP,
    schema.ADV,
    schema.ENTROPY,
    schema.REWARD,
    schema.ROUTE_AGREE,
)
LOGP_COLUMNS = (
    schema.LOGP,
    schema.OLD_LOGP,
    schema.ROLLOUT_LOGP,
    schema.REF_LOGP,
    schema.TEACHER_LOGP,
    schema.BASE_LOGP,
)
_ARG_OF = {
    schema.LOGP: "logprobs",
    schema.OLD_LOGP: "old_logprobs",
    schema.ADV: "advantages",
    schema.ENTROPY: "entropy",
    schema.ROLLOUT_LOGP: "rollout_logprobs",
    schema.REF_LOGP: "ref_logprobs",
    schema.TEACHER_LOGP: "teacher_logprobs",
    schema.BASE_LOGP: "base_logprobs",
    schema.TOKEN_ID: "token_ids",
    schema.VERSION: "versions",
    schema.TURN: "turns",
    schema.STAGE: "stages",
    schema.ROUTE_AGREE: "route_agree",
}
_PER_SEQ = {schema.GROUP: "group_ids", schema.REWARD: "rewards"}
_ROW = "_row"


def read_token_file(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a Parquet or CSV/TSV file of token rows (CSV cells as text: :func:`clean_token_rows` parses them)."""
    p = Path(path)
    if not p.exists():
        raise ImportInputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet" or p.is_dir():
            df = pl.read_parquet(p)
        elif suffix in (".csv", ".tsv"):
            df = pl.read_csv(
                p, separator="\t" if suffix == ".tsv" else ",", infer_schema=False, truncate_ragged_lines=False
            )
        else:
            raise ImportInputError(f"{p}: unknown file type {suffix!r}; give a .parquet, .csv or .tsv file")
    except ImportInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError, MemoryError) as exc:
        raise ImportInputError(f"{p}: could not be read as {suffix[1:] or 'parquet'}: {one_line(exc)}") from None
    missing = [c for c in (schema.STEP, schema.LOGP, schema.OLD_LOGP, schema.ADV) if c not in df.columns]
    if missing:
        raise ImportInputError(
            f"{p}: lacks the required column(s) {missing}; token rows need step, logp, old_logp, adv and "
            "optionally rank, micro, seq, pos and the other columns of docs/run-format.md"
        )
    if schema.SEQ not in df.columns and schema.POS not in df.columns:
        raise ImportInputError(
            f"{p}: needs a `seq` column (response id) or a `pos` column (position, 0 at each "
            "response start) to tell responses apart"
        )
    if df.height == 0:
        raise ImportInputError(f"{p}: holds no token rows")
    return df


def _where(source: str, row: int, csv: bool) -> str:
    return f"{source}: row {row + 1} (line {row + 2})" if csv else f"{source}: row {row + 1}"


def _int_column(s: pl.Series, lo: int, hi: int) -> tuple[pl.Series, pl.Series, str]:
    """(values as Int64, bad mask, what a bad value is) for an integer column of any input dtype."""
    dt = s.dtype
    what = f"is not an integer in [{lo}, {hi}]"
    if dt.is_integer():
        vals = s.cast(pl.Int64, strict=False)
        bad = vals.is_null() | (vals < lo) | (vals > hi)
        return vals, bad.fill_null(True), what
    if dt == pl.String or dt.is_float():
        text = s.str.strip_chars() if dt == pl.String else s
        ints = text.cast(pl.Int64, strict=False) if dt == pl.String else pl.Series([None] * s.len(), dtype=pl.Int64)
        floats = text.cast(pl.Float64, strict=False)
        ok = (floats.is_finite() & (floats == floats.floor()) & (floats.abs() < 2.0**53)).fill_null(False)
        frame = pl.DataFrame({"i": ints, "f": floats, "ok": ok})
        vals = frame.select(
            pl.when(pl.col("i").is_not_null())
            .then(pl.col("i"))
            .when(pl.col("ok"))
            .then(pl.col("f").cast(pl.Int64, strict=False))
            .otherwise(None)
        ).to_series()
        bad = vals.is_null() | (vals < lo) | (vals > hi)
        return vals, bad.fill_null(True), what
    return pl.Series([None] * s.len(), dtype=pl.Int64), pl.Series([True] * s.len()), f"{what} (a {dt} column)"


def _all_empty(s: pl.Series) -> bool:
    if s.null_count() == s.len():
        return True
    return s.dtype == pl.String and bool((s.str.strip_chars().fill_null("") == "").all())


def _float_column(s: pl.Series) -> tuple[pl.Series, pl.Series, str]:
    """(values as Float64 with NaN for missing, bad mask, what a bad value is) for a float column."""
    dt = s.dtype
    if dt.is_numeric():
        vals = s.cast(pl.Float64, strict=False)
        return vals.fill_null(float("nan")), pl.Series([False] * s.len()), ""
    if dt == pl.String:
        text = s.str.strip_chars()
        vals = text.cast(pl.Float64, strict=False)
        empty = text.is_null() | (text == "")
        bad = vals.is_null() & ~empty
        return vals.fill_null(float("nan")), bad, "is not a number"
    return (pl.Series([float("nan")] * s.len()), pl.Series([True] * s.len()), f"is not a number (a {dt} column)")


def clean_token_rows(
    df: pl.DataFrame, source: str, policy: Policy, *, tolerance: float = 1e-4, csv: bool = False
) -> pl.DataFrame:
    """Typed, checked token rows with ``seq``/``pos``/``rank``/``micro`` filled in, sorted for recording.

    Raises :class:`ImportInputError` for the first bad value (strict) or drops bad rows and counts them in
    the policy's report (lenient). Keeps a ``_row`` column (0-based input row).
    """
    df = df.with_row_index(_ROW)
    cols: dict[str, pl.Series] = {_ROW: df[_ROW]}
    bad_rows: list[tuple[np.ndarray, str, str]] = []  # (bad mask, column, message prefix / reason)

    def flag(mask: pl.Series | np.ndarray, column: str, reason: str) -> None:
        m = mask.to_numpy() if isinstance(mask, pl.Series) else mask
        m = np.asarray(m, dtype=bool)
        if m.any():
            bad_rows.append((m, column, reason))

    for col, (lo, hi) in INT_COLUMNS.items():
        if col in df.columns and col not in (schema.STEP, schema.SEQ, schema.POS) and _all_empty(df[col]):
            continue  # an optional column that is empty throughout (an export's unused column): absent
        if col in df.columns:
            vals, bad, what = _int_column(df[col], lo, hi)
            cols[col] = vals
            flag(bad, col, what)
    for col in FLOAT_COLUMNS:
        if col in df.columns:
            vals, bad, what = _float_column(df[col])
            cols[col] = vals
            flag(bad, col, what)
            flag(
                (vals.is_finite() & (vals.abs() > float(np.finfo(np.float32).max))).fill_null(False),
                col,
                "is outside the float32 range",
            )
            if col in LOGP_COLUMNS:
                # polars orders NaN above every number: test it apart
                flag(((vals > tolerance) & vals.is_not_nan()).fill_null(False), col, "is a positive log-probability")
            if col == schema.ENTROPY:
                flag((vals < 0).fill_null(False), col, "is a negative entropy")
    out = pl.DataFrame(cols)
    out = _drop_or_raise(out, df, bad_rows, source, policy, csv)

    if schema.POS not in out.columns:
        by = [c for c in (schema.RANK, schema.STEP, schema.SEQ) if c in out.columns]
        out = out.with_columns(pl.int_range(pl.len()).over(by).cast(pl.Int64).alias(schema.POS))
    if schema.SEQ not in out.columns:  # a new response starts wherever pos goes back to 0
        by = [c for c in (schema.RANK, schema.STEP) if c in out.columns]
        out = out.with_columns(((pl.col(schema.POS) == 0).cum_sum().over(by) - 1).cast(pl.Int64).alias(schema.SEQ))
    for col in (schema.RANK, schema.MICRO):
        if col not in out.columns:
            out = out.with_columns(pl.lit(0, dtype=pl.Int64).alias(col))

    key = [schema.STEP, schema.RANK, schema.SEQ, schema.POS]
    dup = out.select(pl.struct(key).is_duplicated()).to_series().to_numpy()
    if dup.any():
        first_of = out.filter(pl.Series(dup)).group_by(key).agg(pl.col(_ROW).min().alias("_first"))
        later = out.join(first_of, on=key, how="inner").filter(pl.col(_ROW) != pl.col("_first")).sort(_ROW)
        r = later.row(0, named=True)
        msg = (
            f"shares (step {r[schema.STEP]}, rank {r[schema.RANK]}, seq {r[schema.SEQ]}, pos {r[schema.POS]}) "
            f"with row {r['_first'] + 1}; rows must be unique per token (a multi-rank export needs a `rank` "
            f"column)"
        )
        policy.problem(
            f"{_where(source, r[_ROW], csv)}, columns step/rank/seq/pos",
            msg,
            "duplicate (step, rank, seq, pos)",
            later.height,
        )
        out = out.join(later.select(_ROW), on=_ROW, how="anti")

    rec_key = [schema.RANK, schema.STEP, schema.MICRO]
    size = out.group_by(rec_key).agg(
        pl.col(schema.SEQ).n_unique().alias("_b"),
        (pl.col(schema.POS).max() + 1).alias("_t"),
        pl.col(_ROW).min().alias("_r"),
    )
    size = size.filter(pl.col("_b") * pl.col("_t") > MAX_CELLS).sort("_r")
    if size.height:
        r = size.row(0, named=True)
        n = out.join(size.select(rec_key), on=rec_key, how="semi").height
        policy.problem(
            f"{_where(source, r['_r'], csv)}, column pos",
            f"the record (step {r[schema.STEP]}, rank {r[schema.RANK]}, micro {r[schema.MICRO]}) spans "
            f"{r['_b']} responses x {r['_t']} positions, too large to import in one piece; split it "
            "with a `micro` column or check `pos`",
            "record too large",
            n,
        )
        out = out.join(size.select(rec_key), on=rec_key, how="anti")
    return out.sort([schema.RANK, schema.STEP, schema.MICRO, schema.SEQ, schema.POS])


def _drop_or_raise(
    out: pl.DataFrame,
    raw: pl.DataFrame,
    bad_rows: list[tuple[np.ndarray, str, str]],
    source: str,
    policy: Policy,
    csv: bool,
) -> pl.DataFrame:
    if not bad_rows:
        return out
    any_bad = np.zeros(out.height, dtype=bool)
    for mask, _col, _what in bad_rows:
        any_bad |= mask
    if policy.strict:
        first = min(int(np.flatnonzero(m)[0]) for m, _, _ in bad_rows)
        for mask, col, what in bad_rows:
            if mask[first]:
                value = raw[col][first]
                raise ImportInputError(f"{_where(source, first, csv)}, column {col}: {short(value)} {what}")
    for mask, col, what in bad_rows:
        first = int(np.flatnonzero(mask)[0])
        reason = f"column {col} {what}"
        policy.report.skipped[reason] += int(mask.sum())
        policy.report.first.setdefault(reason, f"{_where(source, first, csv)}: {short(raw[col][first])}")
    return out.filter(pl.Series(~any_bad))


def import_token_file(
    path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    errors: ErrorPolicy = "strict",
    name: str | None = None,
) -> ImportReport:
    """Import a Parquet/CSV file of token rows into the new run ``run_dir``; returns the report.

    ``report.tokens`` is the number of token rows the run holds. ``run_dir`` must not exist or be empty; the
    run is built beside it and renamed into place at the end, so a failure leaves nothing behind.
    """
    p = Path(path)
    report = ImportReport(trainer="tokens", source=str(p), errors=errors, files=1)
    df = read_token_file(p)
    report.rows_read = df.height
    _import_frame(df, run_dir, report, config=config, errors=errors, name=name, csv=p.suffix.lower() != ".parquet")
    return report


def import_tokens(
    df: pl.DataFrame,
    run_dir: str | os.PathLike[str],
    *,
    config: RecorderConfig | None = None,
    name: str | None = None,
    errors: ErrorPolicy = "strict",
) -> Path:
    """Record the token rows of ``df`` into the new run ``run_dir`` and return its path."""
    report = ImportReport(trainer="tokens", source="<frame>", errors=errors, rows_read=df.height)
    if df.height == 0:
        raise ImportInputError("<frame>: holds no token rows")
    _import_frame(df, run_dir, report, config=config, errors=errors, name=name, csv=False)
    return Path(run_dir)


def _import_frame(
    df: pl.DataFrame,
    run_dir: str | os.PathLike[str],
    report: ImportReport,
    *,
    config: RecorderConfig | None,
    errors: ErrorPolicy,
    name: str | None,
    csv: bool,
) -> None:
    from rldiag.record.recorder import Recorder

    cfg = import_config(config or RecorderConfig())
    policy = Policy(errors, report)
    rows = clean_token_rows(df, report.source, policy, tolerance=cfg.logp_tolerance, csv=csv)
    if rows.height == 0:
        raise ImportInputError(
            f"{report.source}: no valid token rows left to import ({report.rows_read:,} read, "
            f"all skipped: {dict(report.skipped)})"
        )
    target = import_target(run_dir)
    with staged_run(target, report) as staging:
        ranks = rows[schema.RANK].unique().sort().to_list()
        world = int(max(ranks)) + 1
        for rank in ranks:
            part = rows.filter(pl.col(schema.RANK) == rank)
            with Recorder(staging, config=cfg, rank=int(rank), world_size=world, name=name or target.name) as rec:
                for (step, _micro), rec_df in part.group_by([schema.STEP, schema.MICRO], maintain_order=True):
                    args = _grid(rec_df)
                    rec.record(step=int(step), **args)
                    report.tokens += rec_df.height
                    report.sequences += int(args["mask"].shape[0])
                    report.steps.add(int(step))
            if rec.stats["rows_dropped"]:
                raise RuntimeError(
                    f"the recorder dropped {rec.stats['rows_dropped']:,} token rows; the import is incomplete"
                )
            report.ranks.add(int(rank))


def _grid(df: pl.DataFrame) -> dict[str, Any]:
    seq_codes, seq_idx = np.unique(df[schema.SEQ].to_numpy(), return_inverse=True)
    pos = df[schema.POS].to_numpy().astype(np.int64)
    B, T = seq_codes.size, int(pos.max()) + 1
    mask = np.zeros((B, T), dtype=bool)
    mask[seq_idx, pos] = True
    out: dict[str, Any] = {"mask": mask}
    for col, arg in _ARG_OF.items():
        if col not in df.columns:
            continue
        s = df[col]
        if col in (schema.TOKEN_ID, schema.VERSION, schema.TURN, schema.STAGE):
            if s.null_count() == len(s):
                continue
            grid = np.zeros((B, T), dtype=np.int32 if col in (schema.TURN, schema.STAGE, schema.TOKEN_ID) else np.int64)
            grid[seq_idx, pos] = s.fill_null(0).to_numpy()
        else:
            values = s.to_numpy().astype(np.float32)
            if col not in (schema.LOGP, schema.OLD_LOGP, schema.ADV) and np.isnan(values).all():
                continue
            grid = np.zeros((B, T), dtype=np.float32)
            grid[seq_idx, pos] = values
        out[arg] = grid
    for col, arg in _PER_SEQ.items():
        if col not in df.columns:
            continue
        first = np.full(B, len(df), dtype=np.int64)
        np.minimum.at(first, seq_idx, np.arange(len(df)))
        vals = df[col].to_numpy()[first]
        if col == schema.GROUP:
            if df[col].null_count():
                continue
            out[arg] = vals.astype(np.int64)
        else:
            if np.isnan(vals.astype(np.float64)).all():
                continue
            out[arg] = vals.astype(np.float32)
    return out
