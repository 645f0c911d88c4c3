"""Hostile run folders: damaged statistics and token files never crash a reader; what cannot be used is skipped
and named, and the other files' steps stay exact (issue 16, docs/security.md).

A run of four one-step segments is recorded once; every example copies it, damages one file of one segment
(bin indexes, counts, list lengths, key values, metadata types and nesting, schemas, bytes), and reads it
through the library (``open_run``: steps, step metrics, info, token rows). A fixed set of the same damages goes
through the CLI (``python -m rldiag summarize`` and ``info``) in a subprocess: no traceback, no signal death.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag import schema
from tests.metrics.reference import make_record

ROOT = Path(__file__).resolve().parents[2]
N_STEPS = 4
EXAMPLES = 60
"""Hypothesis examples of the library test (docs/security.md quotes the count)."""

HIST_COLS = ("h_lr", "h_ent", "h_absd", "h_minprefix")
LIST_COLS = ("b_n", "b_s", "b_s2", "groups_all", "groups_nonzero")
SCALAR_COLS = ("n", "n_masked", "n_nonfinite", "n_invalid", "rows_written", "rows_dropped")
TOKEN_COLS = ("step", "seq", "pos", "logp", "group", "token_id")

STATS_DAMAGES = (
    "bin_index",
    "bin_negative",
    "count_list_length",
    "count_value",
    "vector_length",
    "set_values",
    "scalar_value",
    "key_value",
    "null_key",
    "meta_json",
    "meta_type",
    "meta_deep",
    "meta_config",
    "drop_column",
    "column_type",
    "extra_column",
    "truncate",
    "random_bytes",
    "empty",
)
TOKEN_DAMAGES = (
    "drop_column",
    "column_type",
    "key_value",
    "meta_json",
    "truncate",
    "random_bytes",
    "empty",
    "rename_column",
)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("good") / "run"
    rng = np.random.default_rng(0)
    with rldiag.Recorder(run_dir, roll_steps=1, handle_signals=False) as rec:
        for step in range(N_STEPS):
            r = make_record(rng, 8, 16)
            r["token_ids"] = rng.integers(0, 100, (8, 16))
            rec.record(step=step, **r)
    return run_dir


def _segments(run_dir: Path, folder: str) -> list[Path]:
    return sorted((run_dir / folder).glob("*.parquet"))


def _set(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, values.type), values)


def _damage(path: Path, kind: str, draw: dict) -> None:
    """Damage one Parquet file in place (what a crafted or corrupted file looks like)."""
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: draw["cut"] % max(len(data), 1)])
        return
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(draw["seed"]).bytes(draw["cut"] % 4096 + 1))
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    t = pq.read_table(path)
    meta = dict(t.schema.metadata or {})
    n = t.num_rows
    big = draw["big"]
    if kind == "bin_index":
        col = f"{draw['hist']}.idx"
        t = _set(
            t,
            col,
            pa.array(
                [[big % 2**16] * len(x) if x else [big % 2**16] for x in t[col].to_pylist()],
                type=t.schema.field(col).type,
            ),
        )
        cnt = f"{draw['hist']}.cnt"
        t = _set(t, cnt, pa.array([[1] * max(len(x), 1) for x in t[cnt].to_pylist()], type=t.schema.field(cnt).type))
    elif kind == "bin_negative":
        col = f"{draw['hist']}.idx"
        typ = t.schema.field(col).type
        lo = -1 if pa.types.is_signed_integer(typ.value_type) else 0
        t = _set(t, col, pa.array([[lo] * len(x) for x in t[col].to_pylist()], type=typ))
    elif kind == "count_list_length":
        col = f"{draw['hist']}.cnt"
        t = _set(t, col, pa.array([x + [1, 2, 3] for x in t[col].to_pylist()], type=t.schema.field(col).type))
    elif kind == "count_value":
        col = f"{draw['hist']}.cnt"
        typ = t.schema.field(col).type
        v = -big if pa.types.is_signed_integer(typ.value_type) or pa.types.is_floating(typ.value_type) else big
        t = _set(
            t,
            col,
            pa.array(
                [
                    [v % 2**31 if not pa.types.is_floating(typ.value_type) and v > 0 else v] * len(x)
                    for x in t[col].to_pylist()
                ],
                type=typ,
            ),
        )
    elif kind == "vector_length":
        col = draw["list"]
        typ = t.schema.field(col).type
        t = _set(t, col, pa.array([(x or [])[: draw["cut"] % 3] for x in t[col].to_pylist()], type=typ))
    elif kind == "set_values":
        col = draw["list"]
        typ = t.schema.field(col).type
        vals = [[int(big)] * (draw["cut"] % 5) for _ in range(n)]
        try:
            t = _set(t, col, pa.array(vals, type=typ))
        except (pa.ArrowInvalid, OverflowError):
            t = _set(t, col, pa.array([[0] * 1000] * n, type=typ))
    elif kind == "scalar_value":
        col = draw["scalar"]
        t = _set(t, col, pa.array([draw["float"]] * n, type=t.schema.field(col).type))
    elif kind == "key_value":
        col = draw["key"] if draw["key"] in t.column_names else "step"
        typ = t.schema.field(col).type
        v = -big if draw["cut"] % 2 else big
        info = np.iinfo(typ.to_pandas_dtype()) if pa.types.is_integer(typ) else None
        v = int(np.clip(v, info.min, info.max)) if info is not None else float(v)
        t = _set(t, col, pa.array([v] * n, type=typ))
    elif kind == "null_key":
        t = _set(t, "step", pa.nulls(n, type=pa.int64()))
    elif kind == "meta_json":
        meta[schema.PARQUET_META_KEY] = draw["junk"]
    elif kind == "meta_type":
        meta[schema.PARQUET_META_KEY] = json.dumps(draw["json"]).encode()
    elif kind == "meta_deep":
        meta[schema.PARQUET_META_KEY] = ("[" * 100_000 + "]" * 100_000).encode()
    elif kind == "meta_config":
        old = json.loads(meta.get(schema.PARQUET_META_KEY, b"{}"))
        old["config"] = draw["json"]
        meta[schema.PARQUET_META_KEY] = json.dumps(old).encode()
    elif kind == "drop_column":
        t = t.drop_columns([t.column_names[draw["cut"] % t.num_columns]])
    elif kind == "rename_column":
        names = list(t.column_names)
        names[draw["cut"] % len(names)] = "zz_renamed"
        t = t.rename_columns(names)
    elif kind == "column_type":
        i = draw["cut"] % t.num_columns
        t = t.set_column(i, pa.field(t.column_names[i], pa.string()), pa.array(["x"] * n, type=pa.string()))
    elif kind == "extra_column":
        t = t.append_column("zz_extra", pa.array([1.0] * n))
    t = t.replace_schema_metadata(meta)
    pq.write_table(t, path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["eps_low", "n_buckets", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def damages(draw):
    folder = draw(st.sampled_from([schema.STATS_DIR, schema.TOKENS_DIR]))
    kind = draw(st.sampled_from(STATS_DAMAGES if folder == schema.STATS_DIR else TOKEN_DAMAGES))
    return (
        folder,
        kind,
        {
            "segment": draw(st.integers(0, N_STEPS - 1)),
            "hist": draw(st.sampled_from(HIST_COLS)),
            "list": draw(st.sampled_from(LIST_COLS)),
            "scalar": draw(st.sampled_from(SCALAR_COLS)),
            "key": draw(st.sampled_from(TOKEN_COLS if folder == schema.TOKENS_DIR else ("step", "rank", "micro"))),
            "big": draw(st.sampled_from([242, 245, 65535, 2**31 - 1, 2**40, 2**62])),
            "float": draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 1e300, -1e300])),
            "cut": draw(st.integers(0, 10**6)),
            "seed": draw(st.integers(0, 2**16)),
            "junk": draw(st.binary(max_size=40)),
            "json": draw(json_values),
        },
    )


def _read_everything(run_dir: Path) -> tuple[rldiag.analysis.io.Run, list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = rldiag.open_run(run_dir)
        steps = run.steps()
        run.step_metrics()
        run.info()
        run.tokens().collect()
    return run, steps


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damages())
def test_a_damaged_file_is_skipped_and_named_never_a_crash(good_run, tmp_path_factory, damage) -> None:
    folder, kind, draw = damage
    run_dir = tmp_path_factory.mktemp("bad") / "run"
    shutil.copytree(good_run, run_dir, ignore=shutil.ignore_patterns(".rldiag-index*"))
    victim = _segments(run_dir, folder)[draw["segment"]]
    _damage(victim, kind, draw)
    run, steps = _read_everything(run_dir)
    named = any(victim.name in p.message or victim.name in str(getattr(p, "path", "")) for p in run.problems)
    # the other segments' steps are all there; the damaged one is either used or skipped and named
    others = set(range(N_STEPS)) - {draw["segment"]}
    assert others <= set(steps), (kind, steps, [p.message for p in run.problems])
    if folder == schema.STATS_DIR and draw["segment"] not in steps:
        # a step rewritten to another legal step is data, not damage: its rows are read under that step
        moved = -draw["big"] if draw["cut"] % 2 else draw["big"]
        relabelled = kind == "key_value" and draw["key"] == "step" and moved in steps
        assert named or relabelled, (kind, [p.message for p in run.problems])


CLI_CASES = [
    (schema.STATS_DIR, "bin_index", {"big": 65535}),
    (schema.STATS_DIR, "meta_deep", {}),
    (schema.TOKENS_DIR, "column_type", {"cut": 3}),
]
"""The CLI cases (a subprocess each: about 4 s): the segfault of issue 16, deep JSON metadata, a token file of
another schema."""


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "kind", "extra"), CLI_CASES, ids=[f"{f}-{k}" for f, k, _ in CLI_CASES])
def test_cli_survives_damaged_files(good_run, tmp_path, folder, kind, extra) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(good_run, run_dir, ignore=shutil.ignore_patterns(".rldiag-index*"))
    draw = {
        "segment": 1,
        "hist": "h_lr",
        "list": "b_n",
        "scalar": "n",
        "key": "step",
        "big": 245,
        "float": float("nan"),
        "cut": 7,
        "seed": 1,
        "junk": b"\xff",
        "json": None,
        **extra,
    }
    victim = _segments(run_dir, folder)[1]
    _damage(victim, kind, draw)
    for cmd in (["summarize", str(run_dir)], ["info", str(run_dir)]):
        res = subprocess.run(
            [sys.executable, "-m", "rldiag", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert res.returncode in (0, 1), (cmd, res.returncode, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (cmd, res.stderr[-2000:])
        if folder == schema.STATS_DIR and cmd[0] == "info":
            assert victim.name in res.stdout + res.stderr  # named as a problem
