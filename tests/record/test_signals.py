"""SIGTERM and SIGHUP (how schedulers stop a job) and fork(): nothing recorded is lost silently.

Each test runs a real training-like process, sends it a real signal and reads the run afterwards.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.record import recorder as recorder_module
from tests.metrics.reference import make_record

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    import rldiag
    from tests.metrics.reference import make_record

    mode, run_dir, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    stop = []
    if mode in ("chain", "continue"):
        def previous(signum, frame):  # the trainer's own handler, installed before the recorder
            with open(marker, "a") as f:
                f.write(f"previous {{signum}}\\n")
            if mode == "chain":
                sys.exit(3)
            stop.append(signum)  # "finish the step, then stop"
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous)
    rec = rldiag.Recorder(run_dir, handle_signals=(mode != "off"))  # default roll policy: 200 steps / 30 s
    rng = np.random.default_rng(0)
    for step in range(20):
        rec.record(step=step, **make_record(rng, 4, 8, extras=False))
    rec._writer.barrier(publish=False)  # processed, not published
    print("ready", flush=True)
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.01)
    if stop:  # went on after the signal: one more step, then a normal close
        rec.record(step=20, **make_record(rng, 4, 8, extras=False))
        rec.close()
        sys.exit(0)
""")


def _run_and_signal(tmp_path: Path, mode: str, sig: int) -> tuple[int, Path, Path]:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT)))
    env = dict(os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache")))
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(run_dir), str(marker)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
        assert not list((run_dir / "stats").glob("*.parquet"))  # nothing published before the signal
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, run_dir, marker


def _writer_closed(run_dir: Path) -> list[bool]:
    return [json.loads(p.read_text()).get("closed") is not None for p in (run_dir / "writers").glob("*.json")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_publishes_marks_closed_and_keeps_default_exit_status(tmp_path, sig) -> None:
    rc, run_dir, _ = _run_and_signal(tmp_path, "default", sig)
    assert rc == -sig  # died of the signal, as without rldiag
    run = rldiag.open_run(run_dir)
    assert run.steps() == list(range(20))  # everything recorded before the signal
    assert list((run_dir / "stats").glob("*.parquet")) and not list((run_dir / "live").glob("*.parquet"))
    assert _writer_closed(run_dir) == [True]
    assert not run.problems and not run.info()["problems"]  # nothing held back when the signal came


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_chains_to_the_previous_handler(tmp_path, sig) -> None:
    rc, run_dir, marker = _run_and_signal(tmp_path, "chain", sig)
    assert rc == 3  # the previous handler ran (and exited with its own status)
    assert marker.read_text() == f"previous {int(sig)}\n"
    assert rldiag.open_run(run_dir).steps() == list(range(20))
    assert _writer_closed(run_dir) == [True]


@pytest.mark.slow
def test_recording_after_a_signal_goes_on(tmp_path) -> None:
    """A trainer whose handler says "stop after this step" records once more: the writer reopens."""
    rc, run_dir, marker = _run_and_signal(tmp_path, "continue", signal.SIGTERM)
    assert rc == 0 and marker.read_text() == f"previous {int(signal.SIGTERM)}\n"
    assert rldiag.open_run(run_dir).steps() == list(range(21))
    assert _writer_closed(run_dir) == [True]


@pytest.mark.slow
def test_opt_out_leaves_signals_alone(tmp_path) -> None:
    rc, run_dir, _ = _run_and_signal(tmp_path, "off", signal.SIGTERM)
    assert rc == -signal.SIGTERM
    assert not list((run_dir / "stats").glob("*.parquet"))  # no segment: what handle_signals=True protects against
    assert _writer_closed(run_dir) == [False]


def test_handlers_are_installed_and_given_back(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    # a recorder another test of this process left open may hold the handlers already: compare with rldiag's
    with rldiag.Recorder(tmp_path / "a"), rldiag.Recorder(tmp_path / "b"):
        assert signal.getsignal(signal.SIGTERM) is recorder_module._on_signal
        assert signal.getsignal(signal.SIGHUP) is recorder_module._on_signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    with rldiag.Recorder(tmp_path / "c", handle_signals=False):
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_ignored_signal_stays_ignored(tmp_path) -> None:
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        with rldiag.Recorder(tmp_path / "a"):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


# ---- fork ------------------------------------------------------------------------------------------------
def _use_in_child(rec: rldiag.Recorder, conn) -> None:
    rng = np.random.default_rng(1)
    out = []
    for call in ("record", "flush"):
        try:
            if call == "record":
                rec.record(step=5, **make_record(rng, 4, 8, extras=False))
            else:
                rec.flush()
            out.append("silent")
        except RuntimeError as exc:
            out.append(str(exc))
    rec.close()  # a no-op in the child: never publishes the parent's buffer
    conn.send(out)
    conn.close()


def test_recorder_used_in_a_forked_child_raises_at_first_call(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    rng = np.random.default_rng(0)
    rec = rldiag.Recorder(tmp_path / "run")
    rec.record(step=0, **make_record(rng, 4, 8, extras=False))
    parent_end, child_end = ctx.Pipe()
    p = ctx.Process(target=_use_in_child, args=(rec, child_end))
    p.start()
    out = parent_end.recv()
    p.join(30)
    assert p.exitcode == 0
    assert all("forked" in m and "Create a Recorder in the child" in m for m in out), out
    rec.record(step=1, **make_record(rng, 4, 8, extras=False))  # the parent goes on unharmed
    rec.close()
    run = rldiag.open_run(tmp_path / "run")
    assert run.steps() == [0, 1]
    assert len(list((tmp_path / "run" / "writers").glob("*.json"))) == 1


def test_os_fork_child_record_raises(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rec = rldiag.Recorder(tmp_path / "run")
    rec.record(step=0, **make_record(rng, 4, 8, extras=False))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            rec.record(step=1, **make_record(rng, 4, 8, extras=False))
        except RuntimeError as exc:
            code = 0 if "forked" in str(exc) else 2
        os.write(w, bytes([code]))
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    rec.close()
    assert got == b"\x00"
    assert rldiag.open_run(tmp_path / "run").steps() == [0]


def test_signal_timeout_is_validated(tmp_path) -> None:
    with pytest.raises(ValueError, match="signal_timeout"):
        rldiag.Recorder(tmp_path / "run", signal_timeout=-1)


def test_a_signal_while_the_kernel_compiles_says_why_and_what_to_do(tmp_path: Path) -> None:
    """A job preempted in its first seconds on a fresh container: the writer is still compiling its kernel (an
    empty numba cache), so nothing can be published within ``signal_timeout``. The warning says so and names
    ``rldiag precompile``. The compile is stood in for by a kernel load that takes 60 s."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        import rldiag
        from rldiag.stats import kernel
        from tests.metrics.reference import make_record

        kernel.warmup = lambda: time.sleep(60)
        rec = rldiag.Recorder(sys.argv[1], signal_timeout=0.5)
        rec.record(step=0, **make_record(np.random.default_rng(0), 4, 8, extras=False))
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert "did not publish within 0.5 s of signal 15; the 1 records it held may be lost" in err, err
    assert "still compiling its statistics kernel" in err and "rldiag precompile" in err, err
    # the writer file says closed, and how many records went with the process: `rldiag info` names them
    run = rldiag.open_run(tmp_path / "run")
    (writer,) = run.files.writer_infos
    assert writer.closed is not None and writer.records_not_published() == (0, 1)
    assert run.steps() == []
    problems = [p for p in run.info()["problems"] if "stopped by a signal" in p]
    assert problems == [
        f"rank 0: writer {writer.writer} was stopped by a signal before it published the 1 records it held (lost; "
        "its warning on stderr says why)"
    ]
