"""SIGKILL at any moment: the run opens, no flushed step is lost, no temporary file is ever read (issue 16's
crash-safety counts, kept as a test; docs/security.md).

A recorder process publishes a segment per step (flush after every record) and prints each flushed step; it
is killed with SIGKILL at a random moment, often in the middle of a publication.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import rldiag

ROOT = Path(__file__).resolve().parents[2]
KILLS = 4
"""SIGKILLs per test run (docs/security.md quotes the count)."""

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    import rldiag
    from tests.metrics.reference import make_record

    rec = rldiag.Recorder(sys.argv[1], roll_steps=1)
    rng = np.random.default_rng(int(sys.argv[2]))
    for step in range(10_000):
        rec.record(step=step, **make_record(rng, 16, 64))
        rec.flush()
        print(step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_loses_no_flushed_step(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT)))
    rnd = random.Random(16)
    survived, lost = 0, 0
    for i in range(KILLS):
        run_dir = tmp_path / f"run{i}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(i)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        flushed: list[int] = []
        try:
            target = rnd.randint(2, 6)
            while len(flushed) < target:
                line = proc.stdout.readline()
                assert line, "the recorder process ended early"
                flushed.append(int(line))
            time.sleep(rnd.uniform(0.0, 0.03))  # often in the middle of the next publication
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped (half-written) file would warn
            run = rldiag.open_run(run_dir)
            steps = set(run.steps())
            run.step_metrics()
            run.tokens().collect()
        assert not run.problems, [p.message for p in run.problems]
        lost += len(set(flushed) - steps)
        survived += 1
    assert (survived, lost) == (KILLS, 0)
