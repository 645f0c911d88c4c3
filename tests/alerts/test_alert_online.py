"""Online evaluation: OnlineAlerts on its own and wired into a real rldiag.Recorder."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.alerts import (
    AlertConfig,
    Condition,
    JsonlSink,
    Notification,
    OnlineAlerts,
    Rule,
    RuleSet,
    Sink,
    StopTraining,
    WebhookSink,
    load_rules,
    make_online_alerts,
    online_from_arg,
    read_history,
)
from rldiag.alerts.rules import Settings
from tests.alerts.conftest import Clock, Receiver


class Collect(Sink):
    """A synchronous sink that keeps what it gets."""

    name = "collect"

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Notification] = []
        self.cond = threading.Condition()

    def deliver(self, n: Notification) -> None:
        with self.cond:
            self.got.append(n)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[list[Notification]], bool], timeout: float = 30.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.got), timeout)


KL = Rule("kl", (Condition("kl/k3", op=">", threshold=0.05, resolve=0.03),), severity="critical")
STALL = Rule("stalled", kind="stall", stall_after=600.0)


def test_observe_is_evaluated_in_the_background(tmp_path: Path, clock: Clock) -> None:
    col = Collect()
    alerts = OnlineAlerts(
        RuleSet((KL,)), [col, JsonlSink(tmp_path / "alerts.jsonl")], tmp_path, clock=clock, resume=False
    )
    for step, v in enumerate([0.0, 0.1, 0.1, 0.0]):
        alerts.observe(step, {"kl/k3": v, "unused": 1.0})
    assert alerts.flush(30.0)
    assert [(n.event, n.step) for n in col.got] == [("firing", 1), ("resolved", 3)]
    alerts.close()
    alerts.close()  # idempotent
    assert [e["event"] for e in read_history(tmp_path / "alerts.jsonl")] == ["firing", "resolved"]
    assert alerts.stats()["observed"] == 4 and alerts.stats()["errors"] == 0
    alerts.observe(9, {"kl/k3": 1.0})  # after close: ignored
    assert len(col.got) == 2


def test_stall_and_repeat_from_the_tick_thread(clock: Clock) -> None:
    col = Collect()
    alerts = OnlineAlerts(
        RuleSet((KL, STALL), Settings(repeat_interval=3600.0)), [col], clock=clock, tick_interval=0.01
    )
    alerts.observe(0, {"kl/k3": 0.1})
    assert col.wait_for(lambda g: len(g) == 1)
    clock.advance(600.0)
    assert col.wait_for(lambda g: any(n.rule == "stalled" for n in g))
    assert alerts.status()["kl"].state.value == "firing" and alerts.engine.stalled
    clock.advance(3000.0)
    assert col.wait_for(lambda g: any(n.event == "repeat" and n.rule == "kl" for n in g))
    alerts.observe(1, {"kl/k3": 0.1})
    assert col.wait_for(lambda g: any(n.rule == "stalled" and n.event == "resolved" for n in g))
    alerts.close()
    kinds = [(n.rule, n.event) for n in col.got]
    assert kinds.count(("stalled", "firing")) == 1 and kinds.count(("kl", "firing")) == 1


def test_close_resolves_a_stall_and_stops_stall_detection(clock: Clock) -> None:
    col = Collect()
    alerts = OnlineAlerts(RuleSet((STALL,)), [col], clock=clock, tick_interval=0.01)
    alerts.observe(0, {})
    assert alerts.flush(30.0)
    clock.advance(700.0)
    assert col.wait_for(lambda g: len(g) == 1)
    alerts.close()
    assert [(n.rule, n.event) for n in col.got] == [("stalled", "firing"), ("stalled", "resolved")]


def test_hanging_and_failing_webhooks_do_not_block_evaluation(tmp_path: Path, receiver: Receiver) -> None:
    from tests.alerts.conftest import Receiver as R

    failing = R()
    failing.mode = "500"
    receiver.mode = "hang"
    hang = WebhookSink(receiver.url, timeout=30.0)
    fail = WebhookSink(failing.url, max_retries=50, backoff=0.05)
    col = Collect()
    alerts = OnlineAlerts(RuleSet((KL,)), [hang, fail, col], tmp_path, resume=False)
    try:
        for step in range(200):
            alerts.observe(step, {"kl/k3": 0.1 if step % 20 < 10 else 0.0})
        # every step is evaluated and the local sink has every event while both webhooks are still stuck
        assert col.wait_for(lambda g: len(g) == 20)
        assert receiver.wait_requests(1) and failing.wait_requests(1)
        assert hang.pending > 0 and fail.pending > 0
        assert alerts.stats()["errors"] == 0
    finally:
        alerts.close(timeout=0.5)
        failing.close()
    sinks = alerts.stats()["sinks"]
    assert sinks["collect"]["sent"] == 20
    assert sinks["webhook"]["sent"] == 0 and sinks["webhook"]["dropped"] > 0
    assert sinks["webhook#2"]["retries"] > 0


def test_make_online_alerts_forms(tmp_path: Path) -> None:
    assert make_online_alerts(None, tmp_path) is None and make_online_alerts(False, tmp_path) is None
    a = make_online_alerts(True, tmp_path / "a")
    assert a is not None and {s.name for s in a.notifier.sinks} == {"console", "jsonl"} and len(a.rules) == 24
    a.close()
    rules = tmp_path / "r.toml"
    rules.write_text('include_defaults = false\n[rules.x]\nmetric = "kl/k3"\nthreshold = 1\n')
    b = make_online_alerts(str(rules), tmp_path / "b")
    assert b is not None and b.rules.names == ("x",)
    b.close()
    c = make_online_alerts(
        AlertConfig(rules=[KL], console=False, stop_on=("critical",), webhooks="http://127.0.0.1:9/x"), tmp_path / "c"
    )
    assert c is not None and [s.name for s in c.notifier.sinks] == ["jsonl", "webhook", "stop"]
    c.close(timeout=0.1)
    d = OnlineAlerts(RuleSet((KL,)), [])
    assert make_online_alerts(d, tmp_path) is d and online_from_arg(d, run_dir=tmp_path) is d
    d.close()
    assert online_from_arg(True, run_dir=tmp_path / "e", rank=1, world_size=2) is None
    with pytest.raises(TypeError, match="alerts="):
        make_online_alerts(42, tmp_path)


# ---------------------------------------------------------------- wired into a real Recorder


def record_steps(
    rec: rldiag.Recorder,
    steps: range,
    *,
    spike: set[int] = frozenset(),
    entropy: float = 1.5,
    seed: int = 0,
    micro: int = 2,
) -> None:
    rng = np.random.default_rng(seed)
    for s in steps:
        for _ in range(micro):
            old = np.log(rng.uniform(0.05, 0.95, (16, 24))).astype(np.float32)
            drift = 0.6 if s in spike else 0.01
            lp = np.minimum(old + rng.normal(0, drift, old.shape), 0).astype(np.float32)
            adv = rng.normal(0, 1, 16).astype(np.float32)
            ent = np.full(old.shape, entropy(s) if callable(entropy) else entropy, np.float32)
            rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=adv, entropy=ent)


def test_recorder_alerts_use_exact_step_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rules = load_rules().without("stalled_run")
    with rldiag.Recorder(run, alerts=AlertConfig(rules=rules, console=False)) as rec:
        assert isinstance(rec.alerts, OnlineAlerts)
        record_steps(rec, range(30), spike={20})
    events = read_history(run / "alerts.jsonl")
    kl = [e for e in events if e["rule"] == "kl_spike_critical"]
    assert [(e["event"], e["step"]) for e in kl] == [("firing", 20), ("resolved", 21)]
    metrics = rldiag.open_run(run).step_metrics()
    assert kl[0]["value"] == metrics.filter(metrics["step"] == 20)["kl/k3"].item()
    assert {e["run"] for e in events} == {"run"}


def test_recorder_stop_on_critical(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rec = rldiag.Recorder(run, alerts=AlertConfig(rules=[KL], console=False, stop_on=("critical",)))
    try:
        record_steps(rec, range(3), spike={1})
        rec.flush()  # the writer has handed every recorded step to the evaluator...
        assert rec.alerts is not None and rec.alerts.flush(30.0)  # ...which has evaluated them
        # step 1 is evaluated when step 2 begins; the evaluator then sets the flag
        deadline = time.monotonic() + 30
        while not rec.should_stop and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.should_stop
        with pytest.raises(StopTraining, match="kl"):
            rec.alerts.check()
    finally:
        rec.close()


def test_resumed_run_replays_disk_for_baselines_without_renotifying(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rules = load_rules().without("stalled_run")
    cfg = AlertConfig(rules=rules, console=False)
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(15), spike={5}, entropy=1.5)
    first = read_history(run / "alerts.jsonl")
    assert [(e["rule"], e["event"], e["step"]) for e in first if e["rule"] == "kl_spike"] == [
        ("kl_spike", "firing", 5),
        ("kl_spike", "resolved", 6),
    ]
    # the trainer restarts; entropy is now far below the run's own baseline (steps 0-9 of the first session)
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(15, 30), entropy=0.2, seed=1)
        rec.flush()  # the writer has handed every recorded step to the evaluator...
        assert rec.alerts is not None and rec.alerts.flush(30.0)  # ...which has evaluated them
        assert rec.alerts.stats()["replayed_steps"] == 15
    events = read_history(run / "alerts.jsonl")
    assert events[: len(first)] == first
    later = events[len(first) :]
    assert not [e for e in later if e["step"] < 15]  # nothing of the first session is sent again
    collapse = [(e["event"], e["step"]) for e in later if e["rule"] == "entropy_collapse"]
    assert collapse == [("firing", 17)]  # 3 steps below 30% of the first session's baseline


def test_two_ranks_rank0_evaluates_merged_statistics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = AlertConfig(rules=[KL], console=False)
    recs = [rldiag.Recorder(run, alerts=cfg, rank=r, world_size=2, roll_steps=1) for r in (0, 1)]
    assert recs[0].alerts is not None and recs[1].alerts is None
    assert recs[0].alerts.world_size == 2
    for s in range(12):
        record_steps(recs[0], range(s, s + 1), seed=s, micro=1)
        record_steps(recs[1], range(s, s + 1), spike={6}, seed=100 + s, micro=1)  # only rank 1 spikes
    recs[1].close()
    recs[0].close()
    events = read_history(run / "alerts.jsonl")
    assert [(e["event"], e["step"]) for e in events] == [("firing", 6), ("resolved", 7)]
    merged = rldiag.open_run(run).step_metrics()
    assert events[0]["value"] == merged.filter(merged["step"] == 6)["kl/k3"].item()
    rank0 = rldiag.open_run(run).step_metrics(ranks=[0])
    assert rank0.filter(rank0["step"] == 6)["kl/k3"].item() < 0.03  # rank 0 alone would not have fired


def test_restart_from_an_earlier_checkpoint_does_not_renotify(tmp_path: Path) -> None:
    """Steps 0-14 recorded (a KL spike at 12), then a restart from the checkpoint of step 10 records 10-19 with
    the same spike: the alert that fired before the restart is not notified again."""
    run = tmp_path / "run"
    rules = load_rules().without("stalled_run")
    seen: list[tuple[str, str, int]] = []
    cfg = AlertConfig(rules=rules, console=False, callbacks=(lambda n: seen.append((n.rule, n.event, n.step)),))
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(15), spike={12})
    assert ("kl_spike", "firing", 12) in seen
    first = read_history(run / "alerts.jsonl")
    seen.clear()
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(10, 20), spike={12})
        rec.flush()
        assert rec.alerts is not None and rec.alerts.flush(30.0)
    assert not [e for e in seen if e[0] == "kl_spike" and e[1] == "firing"], seen
    later = read_history(run / "alerts.jsonl")[len(first) :]
    again = [e for e in later if e["rule"] == "kl_spike" and e["event"] == "firing"]
    # recorded again, for the history only: the line before the restart was computed from replaced records
    assert [(e["step"], e["record_only"]) for e in again] == [(12, True)], later
    shown = [e for e in rldiag.open_run(run).alerts() if e["rule"] == "kl_spike" and e["event"] == "firing"]
    assert [(e["step"], e.get("record_only")) for e in shown] == [(12, True)]


def test_alerts_a_restart_replaced_count_nowhere_unless_the_resumed_records_fire_them_again(tmp_path: Path) -> None:
    """Steps 0-14 recorded with a KL spike at 12, then a restart from the checkpoint of step 10 whose steps 10-19
    have no spike: the run's alerts no longer show the spike's alert (rldiag's numbers at step 12 have none); its
    line stays in alerts.jsonl, and the alert that fired before the restart's step still counts."""
    run = tmp_path / "run"
    cfg = AlertConfig(rules=load_rules().without("stalled_run"), console=False)
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(15), spike={5, 12})
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(10, 20), spike=set())
        rec.flush()
        assert rec.alerts is not None and rec.alerts.flush(30.0)
    on_disk = [(e["event"], e["step"]) for e in read_history(run / "alerts.jsonl") if e["rule"] == "kl_spike"]
    assert ("firing", 12) in on_disk and ("firing", 5) in on_disk
    shown = [(e["event"], e["step"]) for e in rldiag.open_run(run).alerts() if e["rule"] == "kl_spike"]
    assert shown == [("firing", 5), ("resolved", 6)]


def test_every_firing_is_printed(tmp_path: Path) -> None:
    """The console gets each episode of a rule, not only its first firing."""
    import io

    from rldiag.alerts.sinks import ConsoleSink

    stream = io.StringIO()
    cfg = AlertConfig(rules=load_rules().without("stalled_run"), console=False, sinks=(ConsoleSink(stream),))
    with rldiag.Recorder(tmp_path / "run", alerts=cfg) as rec:
        record_steps(rec, range(30), spike={5, 12, 20})
    lines = [x for x in stream.getvalue().splitlines() if " kl_spike " in x]
    assert [x.split()[2] + "@" + x.split("step=")[1].split(":")[0] for x in lines] == [
        "FIRING@5",
        "RESOLVED@6",
        "FIRING@12",
        "RESOLVED@13",
        "FIRING@20",
        "RESOLVED@21",
    ]


def test_a_watcher_records_again_an_alert_the_resumed_records_reproduce(tmp_path: Path) -> None:
    """The first attempt's evaluator notified a KL spike at step 12; the job resumed from the checkpoint of step 10
    without alerts of its own, with the same spike. `rldiag watch` records it again for the history (it pages
    nobody twice), so the run still shows it once the replaced attempt's line no longer counts."""
    from rldiag.cli import main

    run = tmp_path / "run"
    cfg = AlertConfig(rules=load_rules().without("stalled_run"), console=False)
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(15), spike={12})
    with rldiag.Recorder(run) as rec:
        record_steps(rec, range(10, 20), spike={12})
    assert main(["watch", str(run), "--once", "-q"]) in (0, 1)
    again = [e for e in read_history(run / "alerts.jsonl") if e["rule"] == "kl_spike" and e["event"] == "firing"]
    assert [(e["step"], e["record_only"]) for e in again] == [(12, False), (12, True)]
    shown = [e["step"] for e in rldiag.open_run(run).alerts() if e["rule"] == "kl_spike" and e["event"] == "firing"]
    assert shown == [12]


def test_a_watcher_running_through_a_restart_evaluates_the_replaced_steps_again(tmp_path: Path) -> None:
    """A watcher saw steps 0-14 with a KL spike at 12 and notified it; the job, killed, resumed from the checkpoint
    of step 10 with no spike at 12 but one at 11, a step the watcher had evaluated from the replaced records. The
    watcher evaluates the run again as it now stands: the spike at 12 counts no more, the one at 11 is notified,
    and nothing before step 10 is sent twice."""
    from rldiag.alerts.sinks import CallbackSink
    from rldiag.commands.watch import Watcher

    run = tmp_path / "run"
    seen: list[tuple[str, str, int]] = []
    first = rldiag.Recorder(run)  # killed after step 14: never closed
    record_steps(first, range(15), spike={5, 12})
    first.flush()
    rules = load_rules().without("stalled_run")
    sink = CallbackSink(lambda n: seen.append((n.rule, n.event, n.step)))
    watcher = Watcher(run, rules, [sink, JsonlSink(run / "alerts.jsonl")])
    watcher.poll()
    sink.flush(10.0)
    assert ("kl_spike", "firing", 12) in seen and ("kl_spike", "firing", 5) in seen
    seen.clear()
    with rldiag.Recorder(run) as rec:
        record_steps(rec, range(10, 20), spike={11})
    watcher.poll()
    sink.flush(10.0)
    first.close()
    spikes = [e for e in seen if e[0] == "kl_spike"]
    assert ("kl_spike", "firing", 11) in spikes and ("kl_spike", "firing", 5) not in spikes, seen
    shown = [(e["event"], e["step"]) for e in rldiag.open_run(run).alerts() if e["rule"] == "kl_spike"]
    assert ("firing", 12) not in shown and ("firing", 5) in shown and ("firing", 11) in shown, shown


@pytest.mark.parametrize("again", [False, True])
def test_an_alert_left_firing_by_a_replaced_attempt_is_resolved_unless_the_resumed_records_fire_it(
    tmp_path: Path, again: bool
) -> None:
    """The job was killed while a KL spike at step 12 was firing (never resolved), then resumed from the checkpoint
    of step 10. Without the spike, the resumed evaluator resolves it when it reaches step 12 (a webhook or Slack
    would otherwise show it firing for ever); with it, the episode goes on and resolves as the records say."""
    run = tmp_path / "run"
    seen: list[tuple[str, str, int]] = []
    rules = load_rules().without("stalled_run")
    cfg = AlertConfig(rules=rules, console=False, callbacks=(lambda n: seen.append((n.rule, n.event, n.step)),))
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(13), spike={12})
    assert ("kl_spike", "firing", 12) in seen and ("kl_spike", "resolved", 13) not in seen
    seen.clear()
    with rldiag.Recorder(run, alerts=cfg) as rec:
        record_steps(rec, range(10, 20), spike={12} if again else set())
        rec.flush()
        assert rec.alerts is not None and rec.alerts.flush(30.0)
    spikes = [e for e in seen if e[0] == "kl_spike"]
    assert spikes == ([("kl_spike", "resolved", 13)] if again else [("kl_spike", "resolved", 12)]), seen


def test_rank0_evaluator_evaluates_again_the_steps_another_ranks_restart_replaced(tmp_path: Path) -> None:
    """Two ranks; rank 0's evaluator follows the run (merged statistics). Rank 1 spiked at step 6 (notified), then
    was restarted from the checkpoint of step 5 while rank 0 went on: its resumed records spike at step 7
    instead, a step the evaluator had evaluated from the replaced ones. The evaluator evaluates the run again as
    it now stands and notifies the spike at 7; the one at 6 counts no more."""
    run = tmp_path / "run"
    col = Collect()
    ranks = [rldiag.Recorder(run, rank=r, world_size=2, roll_steps=1) for r in (0, 1)]
    for s in range(9):
        record_steps(ranks[0], range(s, s + 1), seed=s, micro=1)
        record_steps(ranks[1], range(s, s + 1), spike={6}, seed=100 + s, micro=1)
    for rec in ranks:
        rec.flush()
    alerts = OnlineAlerts(RuleSet((KL,)), [col, JsonlSink(run / "alerts.jsonl")], run, world_size=2, tick_interval=0.05)
    alerts.observe(0, {})  # a heartbeat: the evaluator starts following the run

    def wait_for(event: tuple[str, int]) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if event in [(n.event, n.step) for n in col.got]:
                return True
            time.sleep(0.05)
        return False

    resumed = None
    try:
        assert wait_for(("resolved", 7))  # steps 0-7 evaluated: the spike at 6 fired and resolved
        ranks[1].close()  # killed; its job resumes from the checkpoint of step 5
        resumed = rldiag.Recorder(run, rank=1, world_size=2, roll_steps=1)
        for s in range(5, 11):
            record_steps(resumed, range(s, s + 1), spike={7}, seed=200 + s, micro=1)
        record_steps(ranks[0], range(9, 11), seed=9, micro=1)
        resumed.flush()
        ranks[0].flush()
        assert wait_for(("firing", 7)), [(n.event, n.step) for n in col.got]
    finally:
        alerts.close()
        for rec in (resumed, *ranks):
            if rec is not None:
                rec.close()
    shown = [(e["event"], e["step"]) for e in rldiag.open_run(run).alerts()]
    assert ("firing", 7) in shown and ("firing", 6) not in shown, shown


def test_two_ranks_rank0_evaluates_from_the_live_tails_before_any_segment_is_published(tmp_path: Path) -> None:
    """A step is complete once every rank has a later step in its segments or in its live tail (a rank writes its
    steps in order): rank 0 need not wait for the writers to publish a segment (every 30 s by default) to page."""
    run = tmp_path / "run"
    col = Collect()
    ranks = [
        rldiag.Recorder(run, rank=r, world_size=2, live_seconds=0.1, roll_seconds=3600.0, roll_steps=10**6)
        for r in (0, 1)
    ]
    alerts = OnlineAlerts(RuleSet((KL,)), [col], run, world_size=2, tick_interval=0.05)
    try:
        alerts.observe(0, {})  # a heartbeat: the evaluator starts following the (still empty) run
        for s in range(8):
            record_steps(ranks[0], range(s, s + 1), seed=s, micro=1)
            record_steps(ranks[1], range(s, s + 1), spike={5}, seed=100 + s, micro=1)
        assert col.wait_for(lambda got: [(n.event, n.step) for n in got] == [("firing", 5), ("resolved", 6)])
        assert not list((run / "stats").glob("*.parquet"))  # from the live tails alone
        assert alerts.engine.last_step == 6  # step 7 is the newest of both ranks: not complete yet
    finally:
        alerts.close()
        for rec in ranks:
            rec.close()
