"""Property test: whatever a caller passes, record() either records or raises a clear error, and what was
already written stays intact and exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.record.writer import WriterError

ARGS = ("logprobs", "old_logprobs", "advantages", "mask", "entropy", "rollout_logprobs", "group_ids", "rewards")


@st.composite
def bad_calls(draw):
    B = draw(st.integers(0, 4))
    T = draw(st.integers(0, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    call = {
        "logprobs": -rng.exponential(1, (B, T)).astype(np.float32),
        "old_logprobs": -rng.exponential(1, (B, T)).astype(np.float32),
        "advantages": rng.normal(size=B).astype(np.float32),
    }
    for _ in range(draw(st.integers(0, 3))):
        arg = draw(st.sampled_from(ARGS))
        kind = draw(st.sampled_from(["shape", "dtype", "nan", "inf", "positive", "optional"]))
        base = call.get(arg, np.zeros((B, T), np.float32))
        if kind == "shape":
            call[arg] = np.zeros((B + draw(st.integers(1, 2)), T + draw(st.integers(0, 1))), np.float32)
        elif kind == "dtype" and arg in ("logprobs", "old_logprobs", "advantages"):
            call[arg] = np.zeros(np.shape(base), np.int64)
        elif kind in ("nan", "inf") and np.size(base):
            v = np.array(base, dtype=np.float32, copy=True)
            v.reshape(-1)[draw(st.integers(0, v.size - 1))] = np.nan if kind == "nan" else np.inf
            call[arg] = v
        elif kind == "positive" and arg in ("logprobs", "old_logprobs") and np.size(base):
            v = np.array(base, copy=True)
            v.reshape(-1)[0] = 3.0
            call[arg] = v
        elif kind == "optional":
            if arg in ("mask",):
                call[arg] = rng.random((B, T)) < 0.5
            elif arg in ("group_ids",):
                call[arg] = np.arange(B)
            elif arg in ("rewards",):
                call[arg] = rng.random(B).astype(np.float32)
            elif arg not in call:
                call[arg] = -rng.exponential(1, (B, T)).astype(np.float32)
    return call


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(bad_calls(), min_size=1, max_size=4), lenient=st.booleans())
def test_bad_input_never_damages_what_is_written(tmp_path_factory, calls, lenient) -> None:
    run_dir = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    good = dict(
        logprobs=-rng.exponential(1, (3, 5)).astype(np.float32),
        old_logprobs=-rng.exponential(1, (3, 5)).astype(np.float32),
        advantages=rng.normal(size=3).astype(np.float32),
    )
    rec = rldiag.Recorder(run_dir, errors="lenient" if lenient else "strict")
    rec.record(step=0, **good)
    rec.flush()
    before = rldiag.open_run(run_dir).step_metrics().row(0, named=True)
    for i, call in enumerate(calls, start=1):
        try:
            rec.record(step=i, **call)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            assert any(a in msg for a in ARGS) or "must be" in msg, msg
        except WriterError as exc:  # a previous record's positive log-probs (strict)
            assert "log-probs above" in str(exc)
    try:
        rec.close()
    except WriterError as exc:
        assert not lenient and "log-probs above" in str(exc)
    run = rldiag.open_run(run_dir)
    assert not run.problems
    after = run.step_metrics(steps=[0]).row(0, named=True)
    for k, v in before.items():
        assert (math.isnan(v) and math.isnan(after[k])) or after[k] == pytest.approx(v, rel=1e-12), k
    m = run.step_metrics()
    assert np.all(np.isfinite(m["tokens/count"].to_numpy()))
