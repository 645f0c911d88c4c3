"""The engine: state machine, rule kinds, missing data, stalls, repeats, determinism, replay, no flapping."""

from __future__ import annotations

import math

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rldiag.alerts import Condition, Engine, Notification, Rule, RuleSet, State, advance, initial_state
from rldiag.alerts.rules import Settings

NAN = math.nan


def frame(metric: str, values: list[float], start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {"step": list(range(start, start + len(values))), metric: values}, schema={"step": pl.Int64, metric: pl.Float64}
    )


def one(rule: Rule, repeat: float = 3600.0) -> Engine:
    return Engine(RuleSet((rule,), Settings(repeat_interval=repeat)), run="t")


def events(eng: Engine, metric: str, values: list[float], start: int = 0) -> list[tuple[str, int]]:
    return [(n.event, n.step) for n in eng.update(frame(metric, values, start), now=0.0)]


def thr(op: str = ">", threshold: float = 1.0, resolve: float | None = None, **kw: object) -> Condition:
    return Condition("kl/k3", op=op, threshold=threshold, resolve=resolve, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- state machine basics


def test_for_count_pending_then_firing_then_resolved() -> None:
    eng = one(Rule("r", (thr(for_=3),)))
    assert events(eng, "kl/k3", [0, 2, 2]) == []
    assert eng.state("r").state == State.PENDING and eng.state("r").pending_since == 1
    assert events(eng, "kl/k3", [2], start=3) == [("firing", 3)]
    assert eng.state("r").state == State.FIRING and eng.state("r").start_step == 3
    assert events(eng, "kl/k3", [0], start=4) == [("resolved", 4)]
    assert eng.state("r").state == State.RESOLVED


def test_pending_falls_back_to_inactive_without_notifying() -> None:
    eng = one(Rule("r", (thr(for_=3),)))
    assert events(eng, "kl/k3", [2, 2, 0, 2, 2, 0]) == []
    assert eng.state("r").state == State.INACTIVE


def test_hysteresis_keeps_firing_between_thresholds() -> None:
    eng = one(Rule("r", (thr(threshold=1.0, resolve=0.5),)))
    assert events(eng, "kl/k3", [2, 0.9, 0.6, 0.8, 0.4]) == [("firing", 0), ("resolved", 4)]


def test_keep_firing_for() -> None:
    eng = one(Rule("r", (thr(),), keep_firing_for=2))
    assert events(eng, "kl/k3", [2, 0, 0, 2, 0, 0, 0]) == [("firing", 0), ("resolved", 6)]


def test_k_of_n_and_its_resolve_span() -> None:
    eng = one(Rule("r", (thr(),), for_=2, within=3))
    # alternating bad/good: fires at the second bad step and never flaps
    assert events(eng, "kl/k3", [2, 0, 2, 0, 2, 0, 2, 0]) == [("firing", 2)]
    # two clear steps in a row resolve it (n - k + 1 = 2)
    assert events(eng, "kl/k3", [0], start=8) == [("resolved", 8)]
    # a single outlier never fires
    eng2 = one(Rule("r", (thr(),), for_=2, within=3))
    assert events(eng2, "kl/k3", [0, 2, 0, 0, 2, 0, 0]) == []


@pytest.mark.parametrize(
    "op, values, expected",
    [
        (">", [1.0, 1.5], [("firing", 1)]),
        (">=", [0.5, 1.0], [("firing", 1)]),
        ("<", [1.0, 0.5], [("firing", 1)]),
        ("<=", [1.5, 1.0], [("firing", 1)]),
    ],
)
def test_operators(op: str, values: list[float], expected: list[tuple[str, int]]) -> None:
    assert events(one(Rule("r", (thr(op=op),))), "kl/k3", values) == expected


def test_missing_values_are_skipped_not_counted() -> None:
    eng = one(Rule("r", (thr(for_=3),)))
    # NaNs neither break nor extend the streak: three evaluated bad steps fire at the third
    assert events(eng, "kl/k3", [2, NAN, 2, NAN, NAN, 2]) == [("firing", 5)]
    # while firing, NaN does not resolve
    assert events(eng, "kl/k3", [NAN, NAN], start=6) == []
    assert eng.state("r").state == State.FIRING
    # a metric column that is absent is missing everywhere
    eng2 = one(Rule("r", (thr(),)))
    assert eng2.update(pl.DataFrame({"step": [0, 1], "other": [5.0, 5.0]}), now=0.0) == []
    # nulls are missing too
    f = pl.DataFrame({"step": [0, 1, 2], "kl/k3": [None, 3.0, None]}, schema={"step": pl.Int64, "kl/k3": pl.Float64})
    assert [(n.event, n.step) for n in one(Rule("r", (thr(),))).update(f, now=0.0)] == [("firing", 1)]


def test_infinity_is_a_value_for_thresholds() -> None:
    eng = one(Rule("r", (Condition("ratio/nonfinite", op=">", threshold=0),)))
    assert events(eng, "ratio/nonfinite", [0, math.inf, 0]) == [("firing", 1), ("resolved", 2)]


# ---------------------------------------------------------------- rule kinds


def test_baseline_uses_median_of_first_steps_and_waits_for_it() -> None:
    c = Condition("entropy/mean", kind="baseline", op="<", threshold=0.3, resolve=0.4, baseline_steps=5)
    eng = one(Rule("r", (c,)))
    # first 5 values set the baseline (median 2.0) and are not evaluated, even when tiny
    assert events(eng, "entropy/mean", [2.0, 0.1, 2.0, 3.0, 2.0]) == []
    assert eng.state("r").conditions[0].baseline == 2.0
    assert events(eng, "entropy/mean", [0.7, 0.59, 0.7, 0.81], start=5) == [("firing", 6), ("resolved", 8)]
    st_ = eng.status()["r"]
    assert st_.threshold == pytest.approx(0.6)


def test_rolling_median_excludes_current_and_respects_floor() -> None:
    c = Condition("clip/region", kind="rolling", op=">", threshold=3.0, resolve=2.0, window=4, floor=0.02)
    eng = one(Rule("r", (c,)))
    # needs 4 previous values; then 0.05 > 3 x median(0.01) and > floor
    assert events(eng, "clip/region", [0.01, 0.01, 0.01, 0.01, 0.05, 0.025, 0.015]) == [("firing", 4), ("resolved", 6)]
    # zero median: only the floor guards; below it nothing fires
    eng2 = one(Rule("r", (c,)))
    assert events(eng2, "clip/region", [0, 0, 0, 0, 0.01, 0.0, 0.03]) == [("firing", 6)]


def test_trend_monotone_net_min_change_and_floor() -> None:
    mono = Condition("mismatch/k3", kind="trend", direction="rising", mode="monotone", steps=3)
    assert events(one(Rule("r", (mono,))), "mismatch/k3", [1, 2, 3, 4, 3]) == [("firing", 3), ("resolved", 4)]
    assert events(one(Rule("r", (mono,))), "mismatch/k3", [1, 2, 2, 3, 4]) == []  # a tie breaks monotony
    net = Condition("entropy/mean", kind="trend", direction="falling", mode="net", steps=3, min_change=0.2)
    assert events(one(Rule("r", (net,))), "entropy/mean", [1.0, 1.2, 0.95, 0.85, 0.7]) == [("firing", 4)]
    floored = Condition("mismatch/k3", kind="trend", direction="rising", steps=2, floor=1e-4)
    assert events(one(Rule("r", (floored,))), "mismatch/k3", [1e-6, 2e-6, 4e-6, 5e-5, 2e-4]) == [("firing", 4)]


def test_compound_any_and_all() -> None:
    a = Condition("kl/k3", op=">", threshold=1.0)
    b = Condition("clip/region", op=">", threshold=0.5, for_=2)
    f = pl.DataFrame({"step": [0, 1, 2, 3, 4], "kl/k3": [0, 0, 2, 0, 0], "clip/region": [0.6, 0, 0.6, 0.6, 0]})
    any_ = one(Rule("r", (a, b), match="any"))
    assert [(n.event, n.step, n.metric) for n in any_.update(f, now=0)] == [
        ("firing", 2, "kl/k3"),
        ("resolved", 4, "kl/k3"),
    ]
    all_ = one(Rule("r", (a, b), match="all"))
    assert all_.update(f, now=0) == []
    f2 = f.with_columns(pl.Series("kl/k3", [0.0, 0, 2, 2, 0]))
    assert [(n.event, n.step) for n in one(Rule("r", (a, b), match="all")).update(f2, now=0)] == [
        ("firing", 3),
        ("resolved", 4),
    ]
    # all-of with one condition missing is not evaluated
    f3 = f2.with_columns(pl.Series("clip/region", [NAN] * 5))
    assert one(Rule("r", (a, b), match="all")).update(f3, now=0) == []


def test_advance_is_pure() -> None:
    rule = Rule("r", (thr(for_=2),))
    s0 = initial_state(rule)
    s1, t1 = advance(rule, s0, 0, {"kl/k3": 2.0})
    s1b, t1b = advance(rule, s0, 0, {"kl/k3": 2.0})
    assert (s1, t1) == (s1b, t1b) and s0 == initial_state(rule)
    s2, t2 = advance(rule, s1, 1, {"kl/k3": 2.0})
    assert t2 is not None and t2.event == "firing" and s2.state == State.FIRING and s1.state == State.PENDING


# ---------------------------------------------------------------- notifications, stall, repeats


def test_notification_fields() -> None:
    rule = Rule(
        "kl",
        (thr(threshold=0.015, resolve=0.01),),
        severity="critical",
        summary="k3 {value:.3f} > {threshold}",
        doc="why",
        source="where",
        group="kl",
        labels={"team": "rl"},
    )
    eng = one(rule)
    (n,) = eng.update(frame("kl/k3", [0.0, 0.02]), now=123.0)
    assert (n.event, n.status, n.rule, n.severity, n.step, n.start_step) == ("firing", "firing", "kl", "critical", 1, 1)
    assert (n.value, n.metric, n.threshold, n.starts_at, n.ends_at, n.time) == (
        0.02,
        "kl/k3",
        0.015,
        123.0,
        None,
        123.0,
    )
    assert n.summary == "k3 0.020 > 0.015"
    assert n.labels == {"alertname": "kl", "severity": "critical", "run": "t", "group": "kl", "team": "rl"}
    assert n.annotations["description"] == "why" and n.annotations["source"] == "where"
    assert len(n.fingerprint) == 16 and n.fingerprint == eng.fingerprint("kl")
    (r,) = eng.update(frame("kl/k3", [0.0], start=2), now=130.0)
    assert (r.event, r.status, r.starts_at, r.ends_at, r.start_step, r.step) == (
        "resolved",
        "resolved",
        123.0,
        130.0,
        1,
        2,
    )
    assert r.fingerprint == n.fingerprint and r.summary.startswith("resolved at step 2")
    assert Notification.from_json(r.to_json()) == r


def test_fingerprint_differs_by_run_and_rule() -> None:
    rs = RuleSet((Rule("a", (thr(),)), Rule("b", (thr(),))))
    e1, e2 = Engine(rs, run="x"), Engine(rs, run="y")
    assert len({e1.fingerprint("a"), e1.fingerprint("b"), e2.fingerprint("a")}) == 3
    assert Engine(rs, run="x").fingerprint("a") == e1.fingerprint("a")


def test_repeat_interval_while_firing() -> None:
    eng = one(Rule("r", (thr(),)), repeat=100.0)
    assert [n.event for n in eng.update(frame("kl/k3", [2.0]), now=0.0)] == ["firing"]
    assert eng.tick(99.0) == []
    (rep,) = eng.tick(100.0)
    assert (rep.event, rep.status, rep.starts_at, rep.step) == ("repeat", "firing", 0.0, 0)
    assert eng.tick(150.0) == [] and [n.event for n in eng.tick(200.0)] == ["repeat"]
    eng.update(frame("kl/k3", [0.0], start=1), now=210.0)
    assert eng.tick(10_000.0) == []


def test_stall_fires_nodata_and_resolves() -> None:
    rules = RuleSet(
        (
            Rule("r", (thr(),)),
            Rule("q", (Condition("clip/region", op=">", threshold=1.0),)),
            Rule("stalled", kind="stall", stall_after=600.0),
        )
    )
    eng = Engine(rules, run="t")
    assert eng.tick(0.0) == []  # no step yet: not stalled
    eng.update(pl.DataFrame({"step": [0, 1], "kl/k3": [0.0, 2.0], "clip/region": [0.0, 0.0]}), now=1000.0)
    assert eng.tick(1599.0) == []
    (s,) = eng.tick(1600.0)
    assert (s.rule, s.event, s.step, s.value) == ("stalled", "firing", 1, 600.0)
    status = eng.status()
    assert status["stalled"].state == State.FIRING and status["q"].state == State.NODATA
    assert status["r"].state == State.FIRING  # it was firing when data stopped: still shown as firing
    assert eng.tick(1700.0) == []  # no re-notification until repeat_interval
    evs = eng.update(frame("kl/k3", [2.0], start=2), now=1800.0)
    assert [(n.rule, n.event) for n in evs] == [("stalled", "resolved")]
    assert eng.status()["r"].state == State.FIRING


def test_closed_run_never_stalls_and_close_resolves_stall() -> None:
    rules = RuleSet((Rule("stalled", kind="stall", stall_after=10.0), Rule("r", (thr(),))))
    eng = Engine(rules)
    eng.update(frame("kl/k3", [0.0]), now=0.0)
    assert [n.event for n in eng.tick(20.0)] == ["firing"]
    assert [(n.rule, n.event) for n in eng.close(21.0)] == [("stalled", "resolved")]
    assert eng.tick(10_000.0) == []
    eng.reopen()
    assert [n.event for n in eng.tick(10_001.0)] == ["firing"]
    # new data that is not a complete step yet (touch) also ends a stall
    assert [n.event for n in eng.touch(now=10_002.0, data_time=10_002.0)] == ["resolved"]


# ---------------------------------------------------------------- determinism and replay

series_st = st.lists(st.one_of(st.floats(-1.0, 3.0), st.just(NAN)), min_size=1, max_size=80)
rule_st = st.builds(
    lambda f, extra, keep, res: Rule(
        "r", (thr(threshold=1.0, resolve=res),), for_=f, within=f + extra, keep_firing_for=keep
    ),
    st.integers(1, 4),
    st.integers(0, 2),
    st.integers(0, 3),
    st.sampled_from([None, 0.8, 0.5]),
)


def key(evs: list[Notification]) -> list[tuple[object, ...]]:
    return [(n.event, n.rule, n.step, n.start_step, n.value, n.fingerprint, n.summary) for n in evs]


@given(rule_st, series_st, st.lists(st.integers(1, 10), min_size=1, max_size=10))
@settings(max_examples=200, deadline=None)
def test_batching_and_reevaluation_do_not_change_events(rule: Rule, values: list[float], cuts: list[int]) -> None:
    whole = one(rule)
    expected = whole.update(frame("kl/k3", values), now=0.0)
    assert whole.update(frame("kl/k3", values), now=1.0) == []  # the same steps again: nothing new
    stepwise = one(rule)
    got = []
    i = 0
    for c in cuts * (len(values) // max(1, sum(cuts)) + 1):
        got += stepwise.update(frame("kl/k3", values[i : i + c], start=i), now=0.0)
        i += c
        if i >= len(values):
            break
    got += stepwise.update(frame("kl/k3", values[i:], start=i), now=0.0) if i < len(values) else []
    assert key(got) == key(expected)
    assert stepwise.state("r") == whole.state("r")


@given(rule_st, series_st, st.integers(0, 80))
@settings(max_examples=200, deadline=None)
def test_restart_from_history_resumes_without_renotifying(rule: Rule, values: list[float], cut: int) -> None:
    cut = min(cut, len(values))
    first = one(rule)
    before = first.update(frame("kl/k3", values[:cut]), now=10.0) if cut else []
    after = first.update(frame("kl/k3", values[cut:], start=cut), now=20.0) if cut < len(values) else []
    history = [n.to_json() for n in before]
    restarted = Engine(RuleSet((rule,), Settings(repeat_interval=3600.0)), run="t", history=history)
    replayed = restarted.update(frame("kl/k3", values), now=20.0)
    assert key(replayed) == key(after)
    assert restarted.state("r") == first.state("r")
    # a resolve after the restart carries the episode's original start time
    for n in replayed:
        if n.event == "resolved" and n.start_step < cut:
            assert n.starts_at == 10.0


def test_restart_keeps_repeat_schedule_and_stall() -> None:
    rules = RuleSet(
        (Rule("r", (thr(),)), Rule("stalled", kind="stall", stall_after=60.0)), Settings(repeat_interval=100.0)
    )
    a = Engine(rules, run="t")
    hist = a.update(frame("kl/k3", [2.0]), now=0.0) + a.tick(70.0) + a.tick(100.0)
    assert [(n.rule, n.event) for n in hist] == [("r", "firing"), ("stalled", "firing"), ("r", "repeat")]
    b = Engine(rules, run="t", history=[n.to_json() for n in hist])
    assert b.update(frame("kl/k3", [2.0]), now=150.0) == []
    assert b.stalled and b.tick(169.0) == []
    assert [(n.rule, n.event) for n in b.tick(170.0)] == [("stalled", "repeat")]  # stalled at 70
    assert b.tick(199.0) == [] and [(n.rule, n.event) for n in b.tick(200.0)] == [("r", "repeat")]
    evs = b.update(frame("kl/k3", [0.0], start=1), now=210.0)
    assert [(n.rule, n.event) for n in evs] == [("stalled", "resolved"), ("r", "resolved")]
    assert evs[1].starts_at == 0.0


def test_backfill_marks_finished_episodes_as_replay() -> None:
    eng = one(Rule("r", (thr(),)))
    evs = eng.update(frame("kl/k3", [2, 0, 0, 2]), now=0.0, backfill=True)
    assert [(n.event, n.step, n.replay) for n in evs] == [
        ("firing", 0, True),
        ("resolved", 1, True),
        ("firing", 3, False),
    ]


# ---------------------------------------------------------------- no flapping (property)

noisy_st = st.lists(st.floats(0.0, 2.0), min_size=5, max_size=120)


@given(rule_st, noisy_st)
@settings(max_examples=300, deadline=None)
def test_hysteresis_and_for_prevent_flapping(rule: Rule, values: list[float]) -> None:
    c = rule.conditions[0]
    fire, res = c.threshold, c.resolve_threshold
    evs = one(rule).update(frame("kl/k3", values), now=0.0)
    kinds = [n.event for n in evs]
    assert kinds == ["firing", "resolved"] * (len(kinds) // 2) + (["firing"] if len(kinds) % 2 else [])
    k, n = rule.for_, rule.n
    for ev in evs:
        t = ev.step
        if ev.event == "firing":  # at least `for` of the last `within` values were above the fire threshold
            assert sum(v > fire for v in values[max(0, t - n + 1) : t + 1]) >= k
        else:  # the last clear_steps values were all on the good side of the resolve threshold
            window = values[t - rule.clear_steps + 1 : t + 1]
            assert len(window) == rule.clear_steps and all(v <= res for v in window)
    # between a resolve and the next fire there are at least `for` steps
    for a, b in zip(evs, evs[1:]):
        if a.event == "resolved":
            assert b.step - a.step >= k
    # each episode needs a crossing below the resolve threshold to end: episodes <= crossings + 1
    crossings = sum(1 for x, y in zip(values, values[1:]) if x > res >= y)
    assert kinds.count("firing") <= crossings + 1


@given(st.floats(1.05, 1.5), st.lists(st.floats(-0.25, 0.25), min_size=10, max_size=200))
@settings(max_examples=200, deadline=None)
def test_noise_around_the_fire_threshold_fires_once(level: float, noise: list[float]) -> None:
    # fire at 1.2, resolve at 0.7: noise of +-0.25 around a level in (1.05, 1.5) never crosses 0.7
    rule = Rule("r", (thr(threshold=1.2, resolve=0.7),), for_=2)
    values = [level + e for e in noise]
    evs = one(rule).update(frame("kl/k3", values), now=0.0)
    assert [n.event for n in evs] in ([], ["firing"])
    two_in_a_row = any(x > 1.2 and y > 1.2 for x, y in zip(values, values[1:]))
    assert len(evs) == (1 if two_in_a_row else 0)


def oracle(values: list[float], fire: float, res: float, k: int, keep: int) -> list[tuple[str, int]]:
    """An independent reading of the rule (`for` consecutive steps, hysteresis, keep_firing_for)."""
    out, firing, run, clear = [], False, 0, 0
    for t, v in enumerate(values):
        if math.isnan(v):
            continue
        if not firing:
            run = run + 1 if v > fire else 0
            if run >= k:
                firing, clear = True, 0
                out.append(("firing", t))
        else:
            clear = 0 if v > res else clear + 1
            if clear > keep:
                firing, run = False, 0
                out.append(("resolved", t))
    return out


@given(st.integers(1, 4), st.integers(0, 3), st.sampled_from([1.0, 0.8, 0.3]), series_st)
@settings(max_examples=300, deadline=None)
def test_matches_independent_oracle(k: int, keep: int, res: float, values: list[float]) -> None:
    rule = Rule("r", (thr(threshold=1.0, resolve=res),), for_=k, keep_firing_for=keep)
    got = [(n.event, n.step) for n in one(rule).update(frame("kl/k3", values), now=0.0)]
    assert got == oracle(values, 1.0, res, k, keep)
