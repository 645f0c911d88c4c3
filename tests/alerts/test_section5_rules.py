"""The second-generation alert rules (the block at the end of rldiag/alerts/default_rules.toml): each fires on
data crafted to trip it, and none fires on healthy runs.

Healthy runs: a run recorded here through the Recorder with a bf16-level training/inference mismatch and
near-identical MoE routing (every second-generation metric defined), the bundled healthy sample run, and the
demo's healthy phase (the collapse sample run up to its change of regime). The sample runs are TRL runs without
sampler log-probs or routing, so their mismatch and moe metrics are NaN: the rules must stay in no-data there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.alerts import Engine, default_rules

SECTION5 = (
    "mismatch_error",
    "extreme_mismatch",
    "extreme_mismatch_critical",
    "hidden_widening_gap",
    "hidden_widening_gap_tis",
    "seq_is_breakdown",
    "routing_drift",
)
SAMPLES = Path(__file__).resolve().parents[2] / "sample_logs"


def fired(frame: pl.DataFrame) -> dict[str, list[int]]:
    """Section-5 rule -> steps at which it started firing, with the whole default pack evaluated."""
    out: dict[str, list[int]] = {}
    for n in Engine(default_rules(), run="t").update(frame, now=0.0):
        if n.event == "firing" and n.rule in SECTION5:
            out.setdefault(n.rule, []).append(n.step)
    return out


def test_the_block_holds_the_spec_rules() -> None:
    rules = default_rules()
    assert set(SECTION5) <= set(rules.names)
    assert rules["mismatch_error"].conditions[0].threshold == 1.05
    assert rules["mismatch_error"].for_ == 3
    assert (rules["extreme_mismatch"].severity, rules["extreme_mismatch_critical"].severity) == ("warn", "critical")
    assert rules["seq_is_breakdown"].conditions[0].threshold == 20


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """Step metrics of a real recorded run: a slowly improving policy, sampler log-probs within bf16-level noise
    of the trainer's (|d| about 0.01 nats, rare 0.1), and 95% of tokens routed identically."""
    path = tmp_path_factory.mktemp("s5") / "run"
    rng = np.random.default_rng(0)
    B, T = 16, 48
    with rldiag.Recorder(path, live_seconds=None) as rec:
        for step in range(150):
            old = -rng.exponential(0.8, (B, T))
            logp = np.minimum(old + rng.normal(0, 0.02, (B, T)), 0)
            d = rng.normal(0, 0.01, (B, T)) + rng.normal(0, 0.1, (B, T)) * (rng.random((B, T)) < 0.002)
            route = np.where(rng.random((B, T)) < 0.95, 1.0, rng.choice([0.75, 0.875], (B, T)))
            rec.record(
                step=step,
                logprobs=logp.astype(np.float32),
                old_logprobs=old.astype(np.float32),
                advantages=rng.normal(0, 1, B).astype(np.float32),
                entropy=rng.exponential(1.0, (B, T)).astype(np.float32),
                rollout_logprobs=np.minimum(old - d, 0).astype(np.float32),
                rewards=(rng.random(B) < 0.5).astype(np.float32),
                route_agree=route.astype(np.float32),
                mask=np.arange(T)[None, :] < rng.integers(T // 2, T + 1, B)[:, None],
            )
    return rldiag.open_run(path).step_metrics()


def test_healthy_recorded_run_is_quiet(healthy: pl.DataFrame) -> None:
    for rule in default_rules():
        if rule.name in SECTION5:
            for m in rule.metrics:  # every metric the rules read is defined: the check is not vacuous
                assert healthy[m].is_nan().sum() == 0, m
    assert fired(healthy) == {}


@pytest.mark.parametrize("run, last_step", [("healthy", None), ("collapse", 190)])
def test_sample_runs_and_the_demos_healthy_phase_are_quiet(run: str, last_step: int | None) -> None:
    r = rldiag.open_run(SAMPLES / run)
    frame = r.step_metrics()
    if last_step is not None:
        assert json.loads((SAMPLES / run / "demo.json").read_text())["regime_change_step"] == last_step
        frame = frame.filter(pl.col("step") <= last_step)
    assert frame.height > 100
    assert frame["mismatch/mult_err"].is_nan().all()  # no sampler log-probs in the demo: no data, no alert
    assert fired(frame) == {}


def with_values(frame: pl.DataFrame, metric: str, values: dict[int, float]) -> pl.DataFrame:
    col = frame[metric].to_numpy().copy()
    for step, v in values.items():
        col[step] = v
    return frame.with_columns(pl.Series(metric, col))


def test_mismatch_error_needs_three_steps(healthy: pl.DataFrame) -> None:
    assert fired(with_values(healthy, "mismatch/mult_err", {60: 1.06, 61: 1.07})) == {}
    assert fired(with_values(healthy, "mismatch/mult_err", {60: 1.06, 61: 1.07, 62: 1.06})) == {"mismatch_error": [62]}


def test_extreme_mismatch_two_levels(healthy: pl.DataFrame) -> None:
    assert fired(with_values(healthy, "mismatch/extreme_frac", {70: 0.002})) == {"extreme_mismatch": [70]}
    assert fired(with_values(healthy, "mismatch/extreme_frac", {70: 0.02})) == {
        "extreme_mismatch": [70],
        "extreme_mismatch_critical": [70],
    }


@pytest.mark.parametrize(
    "share, rule", [("mismatch/icepop_frac", "hidden_widening_gap"), ("mismatch/tis_frac", "hidden_widening_gap_tis")]
)
def test_hidden_widening_gap(healthy: pl.DataFrame, share: str, rule: str) -> None:
    """The correction's share falls (x0.93 a step) while k3 rises (x1.06 a step) from step 80: both net trends
    over 10 steps hold from step 90 on, for 3 steps at 92. Either trend alone is silent."""
    falling = {80 + i: 0.01 * 0.93**i for i in range(30)}
    rising = {80 + i: 2e-4 * 1.06**i for i in range(30)}
    both = with_values(with_values(healthy, share, falling), "mismatch/k3", rising)
    assert fired(both) == {rule: [92]}
    assert fired(with_values(healthy, share, falling)) == {}
    steady = {80 + i: 0.01 for i in range(30)}
    assert fired(with_values(with_values(healthy, share, steady), "mismatch/k3", rising)) == {}


def test_seq_is_breakdown(healthy: pl.DataFrame) -> None:
    assert fired(with_values(healthy, "mismatch/seq_logratio_absmax", {40: 18.0})) == {}
    assert fired(with_values(healthy, "mismatch/seq_logratio_absmax", {40: 25.0})) == {"seq_is_breakdown": [40]}


def test_routing_drift(healthy: pl.DataFrame) -> None:
    flat = {95 + i: 0.05 for i in range(6)}
    ten = flat | {100 + i: 0.05 + 0.01 * i for i in range(11)}  # ten rises in a row, the last at step 110
    nine = flat | {100 + i: 0.05 + 0.01 * i for i in range(10)} | {110: 0.05}
    assert fired(with_values(healthy, "moe/route_mismatch_frac", ten)) == {"routing_drift": [110]}
    assert fired(with_values(healthy, "moe/route_mismatch_frac", nine)) == {}
    assert fired(with_values(healthy, "moe/mismatch_k3_ratio", {60: 12.0})) == {}  # one noisy step
    assert fired(with_values(healthy, "moe/mismatch_k3_ratio", {60: 12.0, 61: 11.0})) == {"routing_drift": [61]}
    assert not math.isnan(healthy["moe/mismatch_k3_ratio"].max())
    assert healthy["moe/mismatch_k3_ratio"].max() < 10
