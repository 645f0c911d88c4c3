"""``--follow``: a live dump folder is imported file by file while the trainer writes it."""

from __future__ import annotations

import threading
import time

import pytest

import rldiag
from rldiag.importers import ImportInputError
from rldiag.importers.follow import follow
from tests.importers.test_nemo_rl import write_step
from tests.integrations.test_prime_rl import write_exports


def _wait(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _steps(run_dir):
    try:
        return rldiag.open_run(run_dir).steps()
    except Exception:  # noqa: BLE001 - not a run yet
        return []


def test_follow_imports_each_new_file_and_stops(tmp_path):
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.update(report=follow("nemo-rl", logs, run_dir, poll=0.05, stop=stop)))
    t.start()
    try:
        write_step(logs, 1)
        assert _wait(lambda: _steps(run_dir) == [1])
        write_step(logs, 2)
        assert _wait(lambda: _steps(run_dir) == [1, 2])
    finally:
        stop.set()
        t.join(30)
    report = result["report"]
    assert report.files == 2 and report.tokens == rldiag.open_run(run_dir).tokens().collect().height


def test_follow_waits_for_prime_rl_stable_markers_and_stops_on_bad_input(tmp_path):
    write_exports(tmp_path / "out", steps=(1,), ranks=(0,), stable=True)
    write_exports(tmp_path / "tmp", steps=(2,), ranks=(0,))  # step 2 without STABLE: not complete yet
    (tmp_path / "tmp" / "token_exports" / "step_2").rename(tmp_path / "out" / "token_exports" / "step_2")
    report = follow("prime-rl", tmp_path / "out", tmp_path / "run", poll=0.05, idle_exit=0.5)
    assert report.steps == {1} and rldiag.open_run(tmp_path / "run").steps() == [1]
    # a bad file stops strict following; what was imported before stays whole
    write_exports(tmp_path / "o2", steps=(1, 2), ranks=(0,))
    (tmp_path / "o2" / "token_exports" / "step_2" / "rank_0.jsonl").write_text("{not json\n")
    with pytest.raises(ImportInputError, match="step_2/rank_0.jsonl:1: not valid JSON"):
        follow("prime-rl", tmp_path / "o2", tmp_path / "run2", poll=0.05, idle_exit=0.5)
    assert rldiag.open_run(tmp_path / "run2").steps() == [1]
    report = follow("prime-rl", tmp_path / "o2", tmp_path / "run3", poll=0.05, idle_exit=0.5, errors="lenient")
    assert report.skipped["bad record"] == 1


@pytest.mark.slow
def test_cli_follow_ends_on_sigterm_like_ctrl_c(tmp_path):
    """`rldiag import ... --follow` stopped by SIGTERM (a scheduler, a pod's shutdown) ends as Ctrl-C ends it:
    what it imported is published and its summary printed, exit status 0, instead of dying mid-file."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    write_step(logs, 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rldiag", "import", "nemo-rl", str(logs), str(run_dir), "--follow", "--poll", "0.1"],
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait(lambda: _steps(run_dir) == [1], timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "try `rldiag summarize" in out  # the summary after the loop: it ended, it was not killed
    assert rldiag.open_run(run_dir).steps() == [1]
