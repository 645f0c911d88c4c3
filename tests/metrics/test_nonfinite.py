"""``<input>/nonfinite`` (issue 16): NaN/Inf values counted per input in a metric of their own, against a numpy
reference, the recorder's own counters, and exact over micro-batch splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

import rldiag
from rldiag.metrics import aggregate
from rldiag.metrics.registry import REGISTRY
from rldiag.stats.kernel import NONFINITE_INPUTS
from tests.metrics.reference import NONFINITE_ARGS, _nonfinite_per_input, make_record
from tests.metrics.test_registry import CFG, _stats_table

NAMES = [f"{c}/nonfinite" for c in NONFINITE_INPUTS]


def _with_teacher_base(rng: np.random.Generator, r: dict) -> dict:
    """``r`` with a teacher's and a base model's log-probs (on-policy distillation, the extrapolation cliff)."""
    B, T = r["logprobs"].shape
    r["teacher_logprobs"] = -rng.exponential(0.5, (B, T)).astype(np.float32)
    r["base_logprobs"] = -rng.exponential(1.5, (B, T)).astype(np.float32)
    return r


def _poisoned(rng: np.random.Generator, B: int = 10, T: int = 24) -> dict:
    """A record with NaN and Inf in every float input (masked-in and masked-out), every sequence with a token."""
    r = _with_teacher_base(rng, make_record(rng, B, T))
    r["mask"] = np.arange(T)[None, :] < rng.integers(1, T + 1, B)[:, None]
    for arg in (
        "logprobs",
        "old_logprobs",
        "entropy",
        "rollout_logprobs",
        "ref_logprobs",
        "route_agree",
        "teacher_logprobs",
        "base_logprobs",
    ):
        x = r[arg].copy()
        x[rng.random((B, T)) < 0.05] = np.nan
        x[rng.random((B, T)) < 0.02] = np.inf if arg in ("entropy", "route_agree") else -np.inf
        r[arg] = x
    r["advantages"] = r["advantages"].copy()
    r["advantages"][0] = np.nan
    r["rewards"] = r["rewards"].copy()
    r["rewards"][[1, 2]] = [np.nan, np.inf]
    return r


def test_every_input_has_its_metric() -> None:
    assert set(NAMES) <= set(REGISTRY) and "ratio/nonfinite" in REGISTRY
    assert set(NONFINITE_ARGS) == set(NONFINITE_INPUTS)


def test_counts_match_numpy_and_the_recorders_counters(tmp_path) -> None:
    rng = np.random.default_rng(4)
    records = [_poisoned(rng) for _ in range(3)]
    # a record whose tokens are all invalid (logp NaN): the optional inputs' NaNs are still counted
    dead = _poisoned(rng)
    dead["logprobs"] = np.full_like(dead["logprobs"], np.nan)
    records.append(dead)
    with pytest.warns(RuntimeWarning, match="route_agree"):  # non-finite route_agree is refused, then counted
        with rldiag.Recorder(tmp_path / "run", config=CFG.replace(errors="lenient")) as rec:
            for r in records:
                rec.record(step=0, **r)
    counters = rec.stats["nonfinite"]  # after close: every record processed
    row = rldiag.open_run(tmp_path / "run").step_metrics().row(0, named=True)
    want = _nonfinite_per_input(records)
    for name in NAMES:
        assert row[name] == want[name] > 0, name
    for col, arg in NONFINITE_ARGS.items():  # the same numbers as Recorder.stats["nonfinite"]
        assert row[f"{col}/nonfinite"] == counters[arg], arg


def test_absent_inputs_are_nan_and_clean_inputs_zero(tmp_path) -> None:
    rng = np.random.default_rng(0)
    with rldiag.Recorder(tmp_path / "run", config=CFG) as rec:
        rec.record(step=0, **make_record(rng, 6, 10, extras=False))
        rec.record(step=1, **_with_teacher_base(rng, make_record(rng, 6, 10)))
    df = rldiag.open_run(tmp_path / "run").step_metrics()
    first, second = df.row(0, named=True), df.row(1, named=True)
    for col in NONFINITE_INPUTS:
        name = f"{col}/nonfinite"
        assert second[name] == 0, name
        if col in ("logp", "old_logp", "adv", "reward"):
            assert first[name] == 0, name
        else:
            assert math.isnan(first[name]), name


def test_split_over_micro_batches_is_exact() -> None:
    rng = np.random.default_rng(9)
    r = _poisoned(rng, B=16)
    r["route_agree"] = np.where(np.isfinite(r["route_agree"]), r["route_agree"], 1.0)  # strict: only finite
    want = aggregate.finalize(aggregate.merge(_stats_table([r], 0))).row(0, named=True)
    pieces = [{k: v[a:b] for k, v in r.items()} for a, b in ((0, 3), (3, 11), (11, 16))]
    got = aggregate.finalize(aggregate.merge(_stats_table(pieces, 0))).row(0, named=True)
    ref = _nonfinite_per_input([r])
    for name in NAMES:
        assert got[name] == want[name] == ref[name], name
