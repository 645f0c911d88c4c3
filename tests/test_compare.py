"""rldiag compare: whole runs and windows, not last values; a divergence that handles zeros."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from rldiag.cli import main
from rldiag.commands.compare import divergence, on_policy_steps, summarize
from rldiag.metrics.registry import HEADLINE, METRICS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_logs"
needs_samples = pytest.mark.skipif(not (SAMPLES / "collapse").is_dir(), reason="sample_logs/ not present")


def _compare(capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    assert main(["compare", str(SAMPLES / "healthy"), str(SAMPLES / "collapse"), "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@needs_samples
def test_the_collapsed_run_does_not_look_healthier(capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["metric"]: r for r in _compare(capsys)}
    assert set(rows) == set(HEADLINE)
    checked = 0
    for name, r in rows.items():
        direction = METRICS[name].direction
        h, c = r["healthy worst"], r["collapse worst"]
        if h is None or c is None or direction == "neutral" or h == c:
            continue
        assert (c > h) if direction == "lower" else (c < h), (name, h, c)  # the collapse is worse
        checked += 1
    assert checked >= 8
    # the last step of the collapse run is on-policy (ratio exactly 1, KL 0): last values hid all of this
    assert (
        rows["ratio/max"]["collapse worst"] > 10
        and rows["kl/k3"]["collapse mean"] > 100 * rows["kl/k3"]["healthy mean"]
    )
    assert rows["kl/k3"]["diverge@ (collapse)"] > 190 and rows["kl/k3"]["gap (collapse)"] > 1


@needs_samples
def test_a_window_of_steps(capsys: pytest.CaptureFixture[str]) -> None:
    same = {r["metric"]: r for r in _compare(capsys, "--steps", "1:191", "--metrics", "kl/k3,entropy/mean")}
    for r in same.values():  # the two runs are the same run until step 190
        assert r["diverge@ (collapse)"] is None and r["gap (collapse)"] == 0.0
        assert r["healthy mean"] == r["collapse mean"]
    after = {r["metric"]: r for r in _compare(capsys, "--steps", "191:", "--metrics", "kl/k3")}
    assert after["kl/k3"]["collapse mean"] > after["kl/k3"]["healthy mean"]
    assert main(["compare", str(SAMPLES / "healthy"), str(SAMPLES / "collapse"), "--steps", "500:"]) == 2
    assert "no steps in steps 500:" in capsys.readouterr().err


def test_divergence_handles_zeros() -> None:
    steps = list(range(10))
    a = pl.DataFrame({"step": steps, "m": [0.0] * 10})
    b = pl.DataFrame({"step": steps, "m": [1e-9, 0.0, 2e-9, 0.0, 0.0, 0.5, 0.0, 1e-9, 0.0, 0.0]})
    step, gap = divergence(a, b, "m")
    # |a-b|/(|a|+|b|) was 1 at every step where b != 0 and picked step 0; the real divergence is at step 5
    assert step == 5 and math.isfinite(gap) and gap > 1
    assert divergence(a, a, "m") == (None, 0.0)
    assert divergence(a, pl.DataFrame({"step": steps, "m": [2.0] * 10}), "m") == (0, 1.0)  # both constant
    nan = pl.DataFrame({"step": steps, "m": [math.nan] * 10})
    step, gap = divergence(a, nan, "m")
    assert step is None and math.isnan(gap)


def test_summaries_leave_on_policy_steps_out_of_ratio_metrics() -> None:
    f = pl.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "ratio/min": [1.0, 0.5, 1.0, 0.8],
            "ratio/max": [1.0, 3.0, 1.0, 1.2],
            "kl/k3": [0.0, 0.3, 0.0, 0.1],
            "entropy/mean": [2.0, 1.0, 0.5, 1.5],
            "ratio/mean": [1.0, 1.4, 1.0, 1.0],
        }
    )
    assert on_policy_steps(f).tolist() == [True, False, True, False]
    assert summarize(f, "kl/k3", "lower") == {"mean": pytest.approx(0.2), "worst": 0.3}
    assert summarize(f, "entropy/mean", "higher") == {"mean": 1.25, "worst": 0.5}  # not a ratio metric: all steps
    assert summarize(f, "ratio/mean", "neutral")["worst"] == 1.4
    assert math.isnan(summarize(f.filter(pl.col("step") == 1), "kl/k3", "lower")["mean"])


def test_custom_scalars_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import rldiag
    from tests.analysis.test_io import _step_record

    for name, scale in (("a", 1.0), ("b", 2.0)):
        with rldiag.Recorder(tmp_path / name) as rec:
            for s in range(4):
                rec.record(step=s, **_step_record(s))
                rec.log(s, {"loss": scale * s})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metrics", "loss", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["metric"] == "loss" and row["a mean"] == 1.5 and row["b mean"] == 3.0 and row["diverge@ (b)"] == 3


@needs_samples
def test_a_metric_no_run_recorded_is_named_with_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    # the sample runs recorded no rollout log-probs: mismatch/k3 has no value in either
    assert main(["compare", str(SAMPLES / "healthy"), str(SAMPLES / "collapse"), "--metrics", "mismatch/k3,kl/k3"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("mismatch/k3"))
    assert line.split()[1:] == ["-"] * 6 and "nan" not in out
    assert out.rstrip().endswith("no value in any run ('-'): mismatch/k3 (needs rollout_logp recorded)")
