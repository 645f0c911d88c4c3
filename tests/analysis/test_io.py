"""The reader: damaged files, newer formats, reading while a run is written, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.analysis.io import RunFormatWarning
from tests.metrics.reference import make_record


def _write(run_dir: Path, steps: int, seed: int = 0, **kw) -> None:
    rng = np.random.default_rng(seed)
    with rldiag.Recorder(run_dir, roll_steps=2, **kw) as rec:
        for s in range(steps):
            rec.record(step=s, **make_record(rng, 4, 8))


def test_corrupt_and_truncated_files_are_skipped_and_named(run_dir) -> None:
    _write(run_dir, 6)
    files = sorted((run_dir / "stats").glob("*.parquet"))
    assert len(files) == 3
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # truncated
    tok = sorted((run_dir / "tokens").glob("*.parquet"))[0]
    tok.write_bytes(b"garbage")
    with pytest.warns(RunFormatWarning, match=files[1].name):
        run = rldiag.open_run(run_dir)
    assert run.steps() == [0, 1, 4, 5]
    assert any(files[1].name in p for p in run.info()["problems"])
    assert any(tok.name in p.path for p in run.problems)
    assert run.tokens().collect().height > 0


def test_newer_format_is_refused_with_a_clear_message(run_dir) -> None:
    _write(run_dir, 1)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["schema_version"] = 99
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer than this rldiag"):
        rldiag.open_run(run_dir)


def test_missing_or_wrong_paths(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rldiag.open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an rldiag run"):
        rldiag.open_run(tmp_path / "empty")


def test_read_while_writing_sees_only_whole_files(run_dir) -> None:
    rng = np.random.default_rng(1)
    rec = rldiag.Recorder(run_dir, roll_steps=1)
    run = rldiag.open_run(run_dir)
    seen = []
    for s in range(5):
        rec.record(step=s, **make_record(rng, 4, 8))
        rec.flush()
        run.refresh()
        seen.append(run.steps()[-1])
        # a temporary file in the folders never breaks a reader
        (run_dir / "stats" / f".partial{s}.parquet.tmp").write_bytes(b"PAR1")
    rec.close()
    assert seen == [0, 1, 2, 3, 4]
    assert rldiag.open_run(run_dir).step_metrics().height == 5


CHILD = textwrap.dedent("""
    import sys, numpy as np, rldiag
    rng = np.random.default_rng(0)
    rec = rldiag.Recorder(sys.argv[1], roll_steps=1000, roll_seconds=3600)
    step = 0
    while True:
        B, T = 8, 64
        lp = -rng.exponential(1, (B, T)).astype(np.float32)
        rec.record(step=step, logprobs=lp, old_logprobs=lp - 0.01, advantages=rng.normal(size=B).astype(np.float32))
        if step % 3 == 2:
            rec.flush()
            print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_sigkill_mid_run_leaves_readable_files_and_every_flushed_step(run_dir, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    flushed = -1
    deadline = time.monotonic() + 120
    while flushed < 20 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            flushed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flushed >= 20
    run = rldiag.open_run(run_dir)
    assert not run.problems  # every visible file is whole
    steps = run.steps()
    assert set(range(flushed + 1)) <= set(steps)
    df = run.step_metrics()
    full = df.filter(df["step"] <= flushed)
    assert (full["tokens/count"] == 8 * 64).all()  # exact statistics of each flushed step
    expected_k1 = 0.01
    assert np.allclose(full["kl/k1"].to_numpy(), -expected_k1, atol=1e-6)


def test_run_index_is_used_extended_and_rebuilt(run_dir, monkeypatch) -> None:
    import rldiag.analysis.io as io

    monkeypatch.setattr(io, "INDEX_MIN_FILES", 3)
    _write(run_dir, 8)  # roll_steps=2: 4 segments
    first = rldiag.open_run(run_dir)
    want = first.step_metrics()
    index = run_dir / io.INDEX_DIR / "steps.parquet"
    assert index.exists()
    reads = []
    orig = io.Run._read_stats_file
    monkeypatch.setattr(io.Run, "_read_stats_file", lambda self, p, **kw: reads.append(p.name) or orig(self, p, **kw))
    again = rldiag.open_run(run_dir)
    assert reads == [] and again.step_metrics().equals(want)
    assert again.info()["records"] == 8 and again.info()["stats_files"] == 4
    # a new segment merges into the indexed steps (step 7 gets a second record)
    rng = np.random.default_rng(9)
    with rldiag.Recorder(run_dir) as rec:
        rec.record(step=7, **make_record(rng, 4, 8))
    n_new = again.refresh()
    assert len(n_new) == 1 and reads == n_new
    assert again.step_metrics()["tokens/count"][-1] > want["tokens/count"][-1]
    assert again.step_metrics(ranks=[0])["tokens/count"].to_list() == again.step_metrics()["tokens/count"].to_list()
    # an indexed file that changed invalidates the index: everything is read again
    victim = sorted((run_dir / "stats").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    reads.clear()
    with pytest.warns(RunFormatWarning):
        rebuilt = rldiag.open_run(run_dir)
    assert len(reads) == 5 and rebuilt.steps() == [2, 3, 4, 5, 6, 7]
