"""The default pack tuned on real runs: quiet on the healthy phases of sample_logs/, the collapse still caught
within a few steps, each alert once (no flapping), and messages that read as sentences with real thresholds.
The engine guards the tuning uses (skip_on_policy, min_tokens, a condition's own summary, the floor in the
reported threshold) are tested on small frames."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

import rldiag
from rldiag.alerts import Engine, default_rules
from rldiag.alerts.rules import RuleError, parse_rules

SAMPLES = Path(__file__).resolve().parents[2] / "sample_logs"
CHANGE = 190  # the demo's last healthy step (DemoConfig.change_step)
needs_samples = pytest.mark.skipif(not (SAMPLES / "collapse").is_dir(), reason="sample_logs/ not present")


def firings(run: str) -> list[tuple[int, str, str]]:
    """(step, rule, summary) of every firing of the default pack over a sample run, as `rldiag watch` sees it."""
    frame = rldiag.open_run(SAMPLES / run).step_metrics()
    assert frame.height == 240
    return [
        (n.step, n.rule, n.summary)
        for n in Engine(default_rules(), run=run).update(frame, now=0.0)
        if n.event == "firing"
    ]


@needs_samples
@pytest.mark.parametrize("run", ["healthy", "collapse"])
def test_the_healthy_phase_is_quiet(run: str) -> None:
    early = [(s, r) for s, r, _ in firings(run) if s <= CHANGE]
    assert early == []  # the old pack: entropy_collapse_early at 155 and 179 in both runs


@needs_samples
def test_the_healthy_run_raises_at_most_one_warning_per_rule_and_nothing_critical() -> None:
    got = firings("healthy")
    rules = default_rules()
    assert all(rules[r].severity != "critical" for _, r, _ in got)
    counts = Counter(r for _, r, _ in got)
    assert all(n == 1 for n in counts.values()), counts  # the old pack: entropy_collapse_early 4x
    assert "clip_spike" not in counts  # 4 clipped tokens of 128 at step 216, "threshold 0" in the old pack


@needs_samples
def test_the_collapse_is_caught_early_and_each_alert_fires_once() -> None:
    got = firings("collapse")
    first = {}
    for step, rule, _ in got:
        first.setdefault(rule, step)
    # the first off-policy update on the changed settings is step 192 (191 is on-policy)
    assert first["kl_spike_critical"] <= CHANGE + 2 and first["clip_spike"] <= CHANGE + 2
    assert first["ratio_tail"] <= CHANGE + 4
    assert first["entropy_collapse"] <= CHANGE + 7
    assert first["dead_groups_critical"] <= CHANGE + 20
    assert first["entropy_collapse_early"] < first["entropy_collapse"]
    counts = Counter(r for _, r, _ in got)
    for rule in ("kl_spike", "kl_spike_critical", "clip_spike", "ratio_tail", "entropy_collapse", "dead_groups"):
        assert counts[rule] == 1, (rule, counts)  # the old pack: kl_spike, clip_spike 3x (on-policy steps cleared)


@needs_samples
def test_messages_are_sentences_with_real_thresholds() -> None:
    for run in ("healthy", "collapse"):
        for step, _rule, summary in firings(run):
            assert f"step {step}" in summary, summary
            assert "threshold 0)" not in summary and "n/a" not in summary, summary
            assert not re.search(r"[a-z_]+/[a-z_0-9]+ = [-\d.e]+ \(threshold", summary), summary
    clip = next(s for _, r, s in firings("collapse") if r == "clip_spike")
    assert clip == "clip spike at step 192: 30.3% of tokens clipped, more than 20%"


# ---- the engine's guards -------------------------------------------------------------------------------
def _rules(**rule: object) -> object:
    return parse_rules({"include_defaults": False, "rules": {"r": rule}})


def _events(rules: object, frame: pl.DataFrame) -> list[tuple[str, int]]:
    return [(n.event, n.step) for n in Engine(rules, run="t").update(frame, now=0.0)]  # type: ignore[arg-type]


def test_skip_on_policy_steps_neither_fire_nor_clear() -> None:
    steps = list(range(1, 11))
    on = [s % 4 == 1 for s in steps]  # every 4th step is the first update on fresh rollouts
    frame = pl.DataFrame(
        {
            "step": steps,
            "kl/k3": [0.0 if o else (0.2 if s > 2 else 0.001) for s, o in zip(steps, on)],
            "ratio/min": [1.0 if o else 0.5 for o in on],
            "ratio/max": [1.0 if o else 2.0 for o in on],
        }
    )
    plain = dict(metric="kl/k3", op=">", threshold=0.015, resolve=0.01)
    assert _events(_rules(**plain), frame) == [
        ("firing", 3),
        ("resolved", 5),
        ("firing", 6),
        ("resolved", 9),
        ("firing", 10),
    ]
    assert _events(_rules(**plain, skip_on_policy=True), frame) == [("firing", 3)]
    with pytest.raises(RuleError, match="skip_on_policy.*true or false"):
        _rules(**plain, skip_on_policy="yes")


def test_min_tokens_needs_that_many_tokens_behind_a_share() -> None:
    frame = pl.DataFrame(
        {"step": [1, 2, 3, 4], "clip/region": [0.0, 0.03, 0.3, 0.3], "tokens/count": [128.0, 128.0, 20.0, math.nan]}
    )
    rules = _rules(metric="clip/region", op=">", threshold=0.02, min_tokens=8)
    # 0.03 x 128 = 4 tokens: no; 0.3 x 20 = 6: no; an unknown count leaves the test as it is
    assert _events(rules, frame) == [("firing", 4)]
    assert _events(_rules(metric="clip/region", op=">", threshold=0.02), frame)[0] == ("firing", 2)
    with pytest.raises(RuleError, match="min_tokens"):
        _rules(metric="clip/region", threshold=0.02, min_tokens=-1)


def test_a_condition_summary_and_the_floor_in_the_reported_threshold() -> None:
    rules = parse_rules(
        {
            "include_defaults": False,
            "rules": {
                "spike": {
                    "summary": "rule sentence {value}",
                    "conditions": [
                        {
                            "metric": "clip/region",
                            "threshold": 0.5,
                            "summary": "absolute: {value:.0%} > {threshold:.0%}",
                        },
                        {
                            "metric": "clip/region",
                            "kind": "rolling",
                            "threshold": 3.0,
                            "window": 3,
                            "floor": 0.02,
                            "summary": "relative: {value:.1%} > {threshold:.1%} (median {reference:.0%})",
                        },
                    ],
                }
            },
        }
    )
    frame = pl.DataFrame({"step": [1, 2, 3, 4, 5, 6], "clip/region": [0.0, 0.0, 0.0, 0.05, 0.0, 0.9]})
    notes = [n for n in Engine(rules, run="t").update(frame, now=0.0) if n.event == "firing"]
    assert [n.summary for n in notes] == ["relative: 5.0% > 2.0% (median 0%)", "absolute: 90% > 50%"]
    assert notes[0].threshold == 0.02  # max(3 x median 0, floor): never "threshold 0"
    with pytest.raises(RuleError, match="summary"):
        parse_rules({"rules": {"x": {"conditions": [{"metric": "kl/k3", "threshold": 1, "summary": "{value.real}"}]}}})
