"""Duplicate keys in a run folder are detected and reported, never summed (issue 16, docs/run-format.md).

A run of two ranks (two micro-batches per step, one-step segments) is recorded once. Each example copies it
and duplicates records the ways a folder gets them: a statistics file copied under another name (``x
(copy).parquet``, a name that sorts before or after the original, with or without its token file), rows
repeated inside a file (the same step, rank and micro-batch twice), in any order, some after the run was
first opened (a live reader's refresh). Every reader must give the metrics of the original run, name each
file that holds duplicates in ``info()['problems']`` and warn (``RunFormatWarning``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.analysis.io import RunFormatWarning
from tests.metrics.reference import make_record

N_STEPS, WORLD, MICRO = 4, 2, 2
EXAMPLES = 15
"""Hypothesis examples per CI run (docs/security.md quotes the count)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dup") / "run"
    for rank in range(WORLD):
        rng = np.random.default_rng(rank)
        with rldiag.Recorder(path, rank=rank, world_size=WORLD, roll_steps=1, handle_signals=False) as rec:
            for step in range(N_STEPS):
                for _ in range(MICRO):
                    rec.record(step=step, **make_record(rng, 4, 8))
    return path


def _copy(run: Path, name: str, new: str, tokens: bool) -> None:
    shutil.copyfile(run / "stats" / name, run / "stats" / new)
    if tokens and (run / "tokens" / name).exists():
        shutil.copyfile(run / "tokens" / name, run / "tokens" / new)


def _repeat_rows(run: Path, name: str, rows: list[int]) -> None:
    """Rewrite one statistics file with some of its rows appended again (metadata kept)."""
    path = run / "stats" / name
    table = pq.read_table(path)
    extra = table.take(pa.array([r % table.num_rows for r in rows]))
    pq.write_table(pa.concat_tables([table, extra]), path)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["copy", "copy_with_tokens", "repeat"]),
        st.integers(0, WORLD * N_STEPS - 1),  # which segment
        st.sampled_from(["a", "z", " (copy)"]),  # copy names that sort before and after the original
        st.lists(st.integers(0, 7), min_size=1, max_size=3),  # repeated rows
        st.booleans(),  # after the first open (a live reader refreshes)
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_duplicate_records_are_reported_and_counted_once(base: Path, tmp_path_factory, ops) -> None:
    want = rldiag.open_run(base)
    want_metrics, want_tokens = want.step_metrics(), want.tokens().collect().height
    run = tmp_path_factory.mktemp("ex") / "run"
    shutil.copytree(base, run)
    names = sorted(p.name for p in (run / "stats").glob("*.parquet"))
    damaged: set[str] = set()
    late = []
    for op, seg, suffix, rows, after in ops:
        name = names[seg]
        if op == "repeat":
            action = (_repeat_rows, (run, name, rows))
            damaged.add(name)
        else:
            new = ("a-" + name) if suffix == "a" else ("z-" + name) if suffix == "z" else name[:-8] + " (copy).parquet"
            action = (_copy, (run, name, new, op == "copy_with_tokens"))
            damaged.add(new if suffix != "a" else name)  # the copy that sorts first loses to the writer's own name
        if after:
            late.append(action)
        else:
            action[0](*action[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rldiag.open_run(run)
        for fn, args in late:
            fn(*args)
        got.refresh()
        fresh = rldiag.open_run(run)
    for r in (got, fresh):
        assert r.step_metrics().equals(want_metrics)
        assert r.step_metrics(by_rank=True).equals(want.step_metrics(by_rank=True))
        assert r.tokens().collect().height == want_tokens
        assert r.stats_table().num_rows == want.stats_table().num_rows
        assert r.info()["records"] == want.info()["records"]
    problems = " ".join(fresh.info()["problems"])
    warned = " ".join(str(w.message) for w in caught if issubclass(w.category, RunFormatWarning))
    for name in damaged:
        if (run / "stats" / name).exists():
            assert name in problems or any(name in p for p in fresh.info()["problems"]), (name, problems)
    assert "duplicate" in warned or "repeated" in warned


def test_which_copy_counts_is_decided_by_name_not_by_listing_order(base: Path, tmp_path: Path) -> None:
    """The file with its writer's own name counts; of two foreign names, the smaller one; whatever was read
    first (a reader that already merged a copy gives it up when the writer's own file comes back). The token
    file of a copy that counts nowhere is not read either (no token row twice)."""
    want = rldiag.open_run(base)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    first = sorted(p.name for p in (run / "stats").glob("*.parquet"))[0]
    for folder in ("stats", "tokens"):  # only foreign names now...
        (run / folder / first).rename(run / folder / "0-moved.parquet")
    _copy(run, "0-moved.parquet", "1-copy.parquet", tokens=True)
    with pytest.warns(RunFormatWarning, match="duplicates"):
        reader = rldiag.open_run(run)
    assert any("1-copy.parquet duplicates" in p and "0-moved.parquet" in p for p in reader.info()["problems"])
    assert reader.step_metrics().equals(want.step_metrics())
    assert reader.tokens().collect().height == want.tokens().collect().height
    _copy(run, "0-moved.parquet", first, tokens=True)  # ...and the writer's own name comes back
    with pytest.warns(RunFormatWarning, match="duplicates"):
        reader.refresh()
    for r in (reader, rldiag.open_run(run)):
        assert r.step_metrics().equals(want.step_metrics())
        assert r.tokens().collect().height == want.tokens().collect().height
        assert r.info()["records"] == want.info()["records"]
        msgs = r.info()["problems"]
        assert any("0-moved.parquet duplicates" in p and first in p for p in msgs), msgs


def test_duplicates_survive_the_run_index(tmp_path: Path) -> None:
    """A run large enough to keep an index (.rldiag-index): the copies left out are saved with it, so a reader
    that opens the run from the index counts them once and still names the copy."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    with rldiag.Recorder(run, roll_steps=1, handle_signals=False) as rec:
        for step in range(20):
            rec.record(step=step, **make_record(rng, 4, 8))
    want = rldiag.open_run(run)
    assert (run / ".rldiag-index" / "steps.arrow").exists()
    name = sorted(p.name for p in (run / "stats").glob("*.parquet"))[5]
    _copy(run, name, name[:-8] + " (copy).parquet", tokens=True)
    _repeat_rows(run, sorted(p.name for p in (run / "stats").glob("*.parquet"))[7], [0])
    for _ in range(3):  # a fresh read, then reads from the index written with the copies left out
        with pytest.warns(RunFormatWarning):
            got = rldiag.open_run(run)
        assert got.step_metrics().equals(want.step_metrics())
        assert got.stats_table().num_rows == want.stats_table().num_rows == got.info()["records"]
        assert got.tokens().collect().height == want.tokens().collect().height
        assert any("(copy).parquet duplicates" in p for p in got.info()["problems"])
        got.files._save_index()
