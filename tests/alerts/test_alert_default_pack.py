"""Each default rule fires on data that should trip it, and the whole pack stays quiet on healthy runs."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from rldiag.alerts import Engine, default_rules
from tests.alerts.conftest import healthy_frame, with_values


def fired(frame: pl.DataFrame, now: float = 0.0) -> dict[str, list[int]]:
    """rule -> steps at which it started firing, with the default pack."""
    out: dict[str, list[int]] = {}
    for n in Engine(default_rules(), run="t").update(frame, now=now):
        if n.event == "firing":
            out.setdefault(n.rule, []).append(n.step)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_healthy_runs_are_quiet(seed: int) -> None:
    assert fired(healthy_frame(500, seed=seed)) == {}


def test_nonfinite_fires_at_once_and_resolves() -> None:
    f = with_values(healthy_frame(), "ratio/nonfinite", {50: 3.0})
    assert fired(f) == {"nonfinite": [50]}
    evs = Engine(default_rules()).update(f, now=0.0)
    assert [(n.event, n.step, n.severity) for n in evs] == [("firing", 50, "critical"), ("resolved", 51, "critical")]


def test_entropy_collapse_decay_warns_early_then_critical() -> None:
    f = healthy_frame(200)
    ent = f["entropy/mean"].to_numpy().copy()
    ent[60:] = ent[60:] * 0.93 ** np.arange(140)  # exponential collapse from step 60
    f = f.with_columns(pl.Series("entropy/mean", ent))
    got = fired(f)
    assert set(got) == {"entropy_collapse_early", "entropy_collapse"}
    below = next(s for s in range(200) if ent[s] < 0.3 * np.median(ent[:10]))
    assert got["entropy_collapse"] == [below + 2]  # below 30% of the baseline for 3 steps
    assert got["entropy_collapse_early"][0] < got["entropy_collapse"][0]


def test_entropy_collapse_low_frac_alone() -> None:
    f = with_values(healthy_frame(), "entropy/low_frac", {80: 0.95, 81: 0.85, 82: 0.7})
    evs = Engine(default_rules()).update(f, now=0.0)
    assert [(n.rule, n.event, n.step) for n in evs] == [
        ("entropy_collapse", "firing", 80),
        ("entropy_collapse", "resolved", 82),
    ]


def test_entropy_collapse_early_needs_positive_cov() -> None:
    f = healthy_frame(200)
    ent = f["entropy/mean"].to_numpy().copy()
    ent[60:] = ent[60:] * 0.97 ** np.arange(140)
    f = f.with_columns(pl.Series("entropy/mean", ent), pl.Series("entropy/cov", -np.abs(f["entropy/cov"].to_numpy())))
    assert "entropy_collapse_early" not in fired(f)


@pytest.mark.parametrize(
    "metric, bad", [("ratio/logabs_p999", math.log(10) + 0.5), ("ratio/tail_alpha", 1.5), ("ratio/m2", 0.2)]
)
def test_ratio_tail_two_of_three(metric: str, bad: float) -> None:
    assert fired(with_values(healthy_frame(), metric, {70: bad})) == {}  # one outlier step
    assert fired(with_values(healthy_frame(), metric, {70: bad, 72: bad})) == {"ratio_tail": [72]}


def test_ratio_tail_mixed_conditions_count_together() -> None:
    f = with_values(with_values(healthy_frame(), "ratio/m2", {70: 0.2}), "ratio/tail_alpha", {71: 1.8})
    assert fired(f) == {"ratio_tail": [71]}


def test_ess_two_levels() -> None:
    assert fired(with_values(healthy_frame(), "ess/token", {40: 0.85})) == {"ess_collapse": [40]}
    assert fired(with_values(healthy_frame(), "ess/token", {40: 0.4})) == {
        "ess_collapse": [40],
        "ess_collapse_critical": [40],
    }


def test_clip_spike_fixed_and_relative() -> None:
    assert fired(with_values(healthy_frame(), "clip/region", {90: 0.25})) == {"clip_spike": [90]}
    # 0.05 is under 0.2 but more than 3x the rolling median (~0.012)
    assert fired(with_values(healthy_frame(), "clip/region", {90: 0.05})) == {"clip_spike": [90]}
    # not during the first 20 steps (no rolling median yet)
    assert fired(with_values(healthy_frame(), "clip/region", {5: 0.05})) == {}


def test_kl_two_levels() -> None:
    assert fired(with_values(healthy_frame(), "kl/k3", {30: 0.02})) == {"kl_spike": [30]}
    assert fired(with_values(healthy_frame(), "kl/k3", {30: 0.06})) == {"kl_spike": [30], "kl_spike_critical": [30]}


def test_mismatch_drift() -> None:
    assert fired(with_values(healthy_frame(), "mismatch/tis_frac", {100: 0.02})) == {"mismatch_drift": [100]}
    flat = {95 + i: 2e-4 for i in range(5)}  # a level, then five rises in a row (x1.2 each: +149%)
    rising = flat | {100 + i: 2e-4 * 1.2**i for i in range(6)}
    assert fired(with_values(healthy_frame(), "mismatch/k3", rising)) == {"mismatch_drift": [105]}
    four = flat | {100 + i: 2e-4 * 1.2**i for i in range(5)}
    assert fired(with_values(healthy_frame(), "mismatch/k3", four)) == {}
    # the same relative rise at a negligible level is noise
    tiny = {95 + i: 2e-6 for i in range(5)} | {100 + i: 2e-6 * 1.2**i for i in range(6)}
    assert fired(with_values(healthy_frame(), "mismatch/k3", tiny)) == {}


def test_dead_groups_two_levels() -> None:
    assert fired(with_values(healthy_frame(), "group/nonzero_frac", {20: 0.45})) == {"dead_groups": [20]}
    assert fired(with_values(healthy_frame(), "group/nonzero_frac", {20: 0.2})) == {
        "dead_groups": [20],
        "dead_groups_critical": [20],
    }


def test_negative_dominance_warn_and_critical_for_3() -> None:
    assert fired(with_values(healthy_frame(), "balance/pos_share", {20: 0.35})) == {"negative_dominance": [20]}
    assert fired(with_values(healthy_frame(), "balance/pos_share", {20: 0.25, 21: 0.25})) == {
        "negative_dominance": [20]
    }
    assert fired(with_values(healthy_frame(), "balance/pos_share", {20: 0.25, 21: 0.25, 22: 0.25})) == {
        "negative_dominance": [20],
        "negative_dominance_critical": [22],
    }


def test_stalled_run() -> None:
    eng = Engine(default_rules(), run="t")
    eng.update(healthy_frame(30), now=1000.0)
    assert eng.tick(1000.0 + 599.0) == []
    (n,) = eng.tick(1000.0 + 600.0)
    assert (n.rule, n.event, n.step, n.severity) == ("stalled_run", "firing", 29, "warn")
    assert "600 s after step 29" in n.summary
    assert {s.state.value for name, s in eng.status().items() if name != "stalled_run"} == {"nodata"}
