"""A scheduler's SIGTERM ends a training process: the steps it recorded last still page, and still reach its trackers.

The online evaluator evaluates a step once a record of a later step arrives (a step's micro-batches come one by
one), and a multi-rank evaluator reads the run directory every few seconds: without more, the last step before a
signal was never evaluated, and an alert that fired there never paged. Each test runs a real training-like process
(real recorders, a real webhook receiver on 127.0.0.1, a real TensorBoard log) and sends it a real signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rldiag
from rldiag.alerts import read_history
from tests.alerts.conftest import Receiver

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import time
    import rldiag
    from rldiag.alerts import AlertConfig
    from tests.alerts.test_alert_online import KL, record_steps

    run_dir, hook, tb, ranks, mine = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    cfg = AlertConfig(rules=[KL], console=False, webhooks=(hook,))
    # this process's ranks ("all", or one); nothing published before the signal (no segment for an hour, no
    # live tail); a signal may wait 20 s (rank 0 then waits up to 10 s for the other ranks to close)
    here = range(ranks) if mine == "all" else [int(mine)]
    recs = {{
        r: rldiag.Recorder(run_dir, rank=r, world_size=ranks, alerts=cfg, live_seconds=None, roll_seconds=3600,
                           signal_timeout=20, log_to=f"tensorboard:{{tb}}" if r == 0 else None)
        for r in here
    }}
    for s in range(20):
        for r, rec in recs.items():
            # one rank: the KL spike is at the last step; two ranks: rank 1 alone spikes, one step earlier
            spike = {{19}} if ranks == 1 else ({{18}} if r == 1 else set())
            record_steps(rec, range(s, s + 1), spike=spike, seed=100 * r + s)
    for rec in recs.values():
        rec._writer.barrier(publish=False)  # every record processed and handed over, nothing published
    if 0 in recs:
        assert recs[0].alerts.flush(30.0)  # the evaluator took in all it was handed
    print("ready", flush=True)
    time.sleep(60)
""")


def _start(tmp_path: Path, receiver: Receiver, ranks: int, mine: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    if not script.exists():  # written once: a second process may be reading it
        script.write_text(_CHILD.format(root=str(ROOT)))
    env = dict(os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache")))
    argv = [str(tmp_path / "run"), receiver.url, str(tmp_path / "tb"), str(ranks), mine]
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _signalled(receiver: Receiver, procs: list[subprocess.Popen[str]], gap: float = 0.0) -> list[tuple[int, str]]:
    """Wait until every process is ready, then SIGTERM them in turn, ``gap`` seconds apart; (status, stderr)."""
    try:
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout is not None else ""
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
        assert not receiver.received  # the spike's step was not evaluated before the signal
        for i, proc in enumerate(procs):
            if i:
                time.sleep(gap)
            proc.send_signal(signal.SIGTERM)
        return [(proc.wait(timeout=60), proc.stderr.read() if proc.stderr is not None else "") for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _signalled_run(tmp_path: Path, receiver: Receiver, ranks: int) -> tuple[int, Path, Path, str]:
    [(rc, err)] = _signalled(receiver, [_start(tmp_path, receiver, ranks, "all")])
    return rc, tmp_path / "run", tmp_path / "tb", err


def _tensorboard_steps(tb: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("kl/k3")]


def _pages(receiver: Receiver) -> list[tuple[str, str, int]]:
    out = []
    for r in receiver.received:
        for a in r["json"]["alerts"]:
            out.append((a["labels"]["alertname"], a["status"], int(a["annotations"]["step"])))
    return out


@pytest.mark.slow
def test_the_last_step_before_a_signal_pages_and_reaches_the_trackers(tmp_path: Path, receiver: Receiver) -> None:
    rc, run, tb, err = _signalled_run(tmp_path, receiver, ranks=1)
    assert rc == -signal.SIGTERM, err  # the process still ends as the signal's default action ends it
    assert _pages(receiver) == [("kl", "firing", 19)], err  # delivered before the process ended
    history = read_history(run / "alerts.jsonl")
    assert [(e["rule"], e["event"], e["step"]) for e in history] == [("kl", "firing", 19)]
    metrics = rldiag.open_run(run).step_metrics()
    assert history[0]["value"] == metrics.filter(metrics["step"] == 19)["kl/k3"].item()
    assert _tensorboard_steps(tb) == list(range(20))  # the last step too


@pytest.mark.slow
def test_a_signal_evaluates_the_steps_every_rank_published(tmp_path: Path, receiver: Receiver) -> None:
    """Two ranks in one process (both get the signal): rank 0's evaluator reads the run directory once more after
    both published and marked their writers closed, so rank 1's spike at step 18 pages before the process ends,
    and the return to normal at the last step resolves it."""
    rc, run, _, err = _signalled_run(tmp_path, receiver, ranks=2)
    assert rc == -signal.SIGTERM, err
    # both writers marked closed before the evaluator looked: the run ended, so its last step is complete too
    assert _pages(receiver) == [("kl", "firing", 18), ("kl", "resolved", 19)], err
    writers = [json.loads(p.read_text()) for p in (run / "writers").glob("*.json")]
    assert len(writers) == 2 and all(w.get("closed") is not None for w in writers)
    assert _tensorboard_steps(tmp_path / "tb") == list(range(20))  # merged, the last step too: all closed


@pytest.mark.slow
def test_rank0_waits_for_the_other_ranks_signalled_with_it(tmp_path: Path, receiver: Receiver) -> None:
    """One process per rank, as torchrun starts them, each stopped by its own SIGTERM; rank 1's comes 0.5 s after
    rank 0's. Rank 0's evaluator reads the run directory until rank 1's writer says closed (it had published
    nothing when rank 0 was signalled), so rank 1's spike at step 18 still pages before rank 0 ends."""
    procs = [_start(tmp_path, receiver, 2, str(r)) for r in (0, 1)]  # both record into one run
    results = _signalled(receiver, procs, gap=0.5)
    assert [rc for rc, _ in results] == [-signal.SIGTERM] * 2, results
    assert _pages(receiver) == [("kl", "firing", 18), ("kl", "resolved", 19)], results
    assert _tensorboard_steps(tmp_path / "tb") == list(range(20))  # rank 0's live export waited for rank 1 too


def test_after_a_drain_the_evaluator_goes_on_and_does_not_evaluate_the_drained_step_again(tmp_path: Path) -> None:
    """A trainer whose own handler says "stop after this step" records more after the signal: the drained step's
    late record is counted, not evaluated again, and later steps page as usual."""
    from rldiag.alerts import AlertConfig
    from tests.alerts.test_alert_online import KL, Collect, record_steps

    col = Collect()
    run = tmp_path / "run"
    with rldiag.Recorder(run, alerts=AlertConfig(rules=[KL], console=False, sinks=(col,))) as rec:
        assert rec.alerts is not None
        record_steps(rec, range(5), spike={4}, micro=1)
        rec.flush()
        assert rec.alerts.flush(30.0) and not col.got  # step 4 waits for a record of a later step
        assert rec.alerts.drain(30.0)
        assert [(n.event, n.step) for n in col.got] == [("firing", 4)]
        record_steps(rec, range(4, 5), spike={4}, seed=1, micro=1)  # one more micro-batch of the drained step
        record_steps(rec, range(5, 7), seed=2, micro=1)
        rec.flush()
        assert rec.alerts.flush(30.0)
        assert rec.alerts.stats()["late_records"] == 1
    assert [(n.event, n.step) for n in col.got] == [("firing", 4), ("resolved", 5)]
    assert rec.alerts.engine.steps_evaluated == 7
