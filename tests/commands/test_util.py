"""The CLI commands' shared helpers: step ranges, run opening, engine options, table cells, strict JSON."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import polars as pl
import pytest

from rldiag.cli import CLIError
from rldiag.commands._util import (
    ReadTrouble,
    add_engine_args,
    clean_json,
    engine_kwargs,
    fmt,
    open_run_or_fail,
    parse_steps,
    print_table,
    steps_in,
    write_frame,
)

SAMPLES = Path(__file__).resolve().parents[2] / "rldiag" / "sample_logs"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3:9", slice(3, 9)), ("3:", slice(3, None)), (":9", slice(None, 9)), ("4", slice(4, 5)), ("", None)],
)
def test_parse_steps(text: str, expected: slice | None) -> None:
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["a:b", "1:2:3", "x"])
def test_parse_steps_names_the_bad_value(text: str) -> None:
    with pytest.raises(CLIError, match=f"--steps must look like .*{text!r}"):
        parse_steps(text)


@pytest.mark.parametrize("text", ["5:2", "3:3"])
def test_parse_steps_refuses_an_empty_range(text: str) -> None:
    with pytest.raises(CLIError, match=f"--steps {text} holds no step: .*B must be above A"):
        parse_steps(text)


def test_steps_in_filters_the_runs_steps() -> None:
    class FakeRun:  # only steps() is read
        def steps(self) -> list[int]:
            return [1, 2, 5, 8, 13]

    run = FakeRun()
    assert steps_in(run, "2:8") == [2, 5]  # type: ignore[arg-type]
    assert steps_in(run, "5") == [5]  # type: ignore[arg-type]
    assert steps_in(run, None) is None  # type: ignore[arg-type]


def test_open_run_or_fail_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CLIError) as err:
        open_run_or_fail(str(tmp_path / "missing"))
    assert "missing" in str(err.value) and "\n" not in str(err.value)


def test_open_run_or_fail_opens_a_sample_run() -> None:
    run_dir = next(p for p in sorted(SAMPLES.iterdir()) if p.is_dir())
    assert open_run_or_fail(str(run_dir)).steps()


def test_engine_kwargs() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args([])) == {"engine": "local", "ray_address": None}
    with pytest.raises(CLIError, match="--ray-address needs --engine ray"):
        engine_kwargs(parser.parse_args(["--ray-address", "127.0.0.1:6379"]))


def test_fmt() -> None:
    assert [fmt(v) for v in (None, 1.0, 2e-4, 3e6, math.inf, -math.inf, math.nan, "x", 7)] == [
        "-",
        "1.0000",
        "2.000e-04",
        "3.000e+06",
        "inf",
        "-inf",
        "nan",
        "x",
        "7",
    ]


def test_print_table_aligns_and_marks_missing(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([{"name": "a", "v": 1.5}, {"name": "long name"}], ["name", "v"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["name       v     ", "---------  ------", "a          1.5000", "long name  -     "]


def test_clean_json_and_write_frame_give_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert clean_json({"a": [math.nan, 1.0], "b": {"c": math.inf}}) == {"a": [None, 1.0], "b": {"c": None}}
    write_frame(pl.DataFrame({"step": [1, 2], "x": [0.5, math.nan]}), "json")
    assert json.loads(capsys.readouterr().out) == [{"step": 1, "x": 0.5}, {"step": 2, "x": None}]
    write_frame(pl.DataFrame({"step": [1], "x": [0.5]}), "csv")
    assert capsys.readouterr().out == "step,x\n1,0.5\n"


def test_stop_on_signals_sets_the_event_and_puts_the_handlers_back(capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal
    import threading

    from rldiag.commands._util import stop_on_signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        stop = threading.Event()
        with stop_on_signals(stop, "rldiag watch"):
            os.kill(os.getpid(), sig)  # without the handler SIGTERM would end the test process, SIGINT raise
            assert stop.wait(10)
        assert capsys.readouterr().err == (
            "rldiag watch: stopping after the work in progress (Ctrl-C again stops at once)\n"
        )
    # a second Ctrl-C does not wait for the pass in progress
    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt), stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(10)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # interrupted
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_follow_loop_says_once_that_a_run_cannot_be_read_and_once_that_it_can_again(capsys) -> None:
    trouble = ReadTrouble("rldiag watch", 2.0)
    for name, why in [("a", None), ("a", "Stale file handle"), ("b", None), ("a", "Stale file handle")]:
        trouble.update(name, why)
    trouble.update("a", "timed out")  # a new reason is news
    trouble.update("a", None)
    trouble.update("a", None)
    assert capsys.readouterr().err.splitlines() == [
        "rldiag watch: cannot read a (Stale file handle); trying again every 2 s",
        "rldiag watch: cannot read a (timed out); trying again every 2 s",
        "rldiag watch: reading a again",
    ]
