"""Entropy-performance law: recovery of known coefficients, R^2, ceiling, the mechanism check."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from rldiag.analysis.law import fit_law


def synthetic(a=0.35, b=0.9, n=80, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    H = 1.2 * np.exp(-np.arange(n) / 30) + 0.05 + rng.normal(0, 0.01, n)
    R = -a * np.exp(H) + b + rng.normal(0, noise, n)
    return pl.DataFrame({"step": np.arange(n), "entropy/mean": H, "reward/mean": R})


def test_recovers_known_coefficients_exactly_without_noise():
    fit = fit_law(synthetic())
    assert (fit.a, fit.b) == (pytest.approx(0.35, rel=1e-10), pytest.approx(0.9, rel=1e-10))
    assert fit.r2 == pytest.approx(1.0)
    assert fit.ceiling == pytest.approx(0.55)
    assert fit.n == 80


def test_recovers_coefficients_under_noise_and_matches_a_closed_form_regression():
    frame = synthetic(noise=0.01, seed=4)
    fit = fit_law(frame)
    x = -np.exp(frame["entropy/mean"].to_numpy())
    y = frame["reward/mean"].to_numpy()
    slope = np.cov(x, y, bias=True)[0, 1] / np.var(x)  # simple regression: a = slope, b = mean(y) - slope*mean(x)
    assert fit.a == pytest.approx(slope, rel=1e-9)
    assert fit.b == pytest.approx(y.mean() - slope * x.mean(), rel=1e-9)
    assert fit.a == pytest.approx(0.35, abs=0.03) and fit.b == pytest.approx(0.9, abs=0.05)
    assert fit.r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9)


def test_reached_and_gain():
    frame = synthetic()
    fit = fit_law(frame, window=1)
    R = frame["reward/mean"].to_numpy()
    assert fit.reached == pytest.approx(R[-1] / 0.55)
    assert fit.gain_reached == pytest.approx((R[-1] - R[0]) / (0.55 - R[0]))
    assert fit_law(frame).reached == pytest.approx(R[-5:].mean() / 0.55)
    assert fit.as_dict()["law/ceiling"] == pytest.approx(0.55)


def test_caveats_say_when_the_fit_is_not_the_papers_law():
    assert fit_law(synthetic()).caveats() == []
    rising = fit_law(synthetic(a=-0.2))  # reward rises with entropy: b - a is a floor, not a ceiling
    assert rising.a == pytest.approx(-0.2) and len(rising.caveats()) == 1
    assert rising.caveats()[0].startswith("a = -0.2 <= 0: reward/mean does not rise as entropy falls")
    weak = fit_law(synthetic(noise=0.3, seed=1))
    assert weak.a > 0 and weak.r2 < 0.5 and any(c.startswith(f"R^2 = {weak.r2:.2f}") for c in weak.caveats())
    frame = synthetic()
    above = frame.with_columns(pl.when(pl.col("step") >= 75).then(0.6).otherwise(pl.col("reward/mean")).alias("r"))
    fit = fit_law(above, metric="r")
    assert fit.a > 0 and fit.reached > 1 and "r now is above the predicted ceiling" in " ".join(fit.caveats())


def test_mechanism_sign_agreement():
    H = np.array([1.0, 0.9, 0.95, 0.8, 0.8, 0.7])
    cov = np.array([0.2, -0.1, 0.3, 0.1, 0.05, np.nan])  # predicted changes: -, +, -, -, -
    frame = pl.DataFrame(
        {"step": np.arange(6), "entropy/mean": H, "reward/mean": np.linspace(0, 1, 6), "entropy/cov": cov}
    )
    fit = fit_law(frame)
    # observed changes: -0.1, +0.05, -0.15, 0 (not counted), -0.1; all four counted agree
    assert (fit.n_sign, fit.sign_agreement) == (4, 1.0)
    flipped = frame.with_columns(-pl.col("entropy/cov"))
    assert fit_law(flipped).sign_agreement == 0.0
    assert fit.steps["law/agree"].to_list() == [True, True, True, None, True, None]
    assert math.isnan(fit_law(frame.drop("entropy/cov")).sign_agreement)


def test_steps_with_gaps_and_nan_are_skipped():
    frame = synthetic()
    holes = frame.with_columns(
        pl.when(pl.col("step") % 7 == 0).then(float("nan")).otherwise(pl.col("reward/mean")).alias("reward/mean")
    )
    fit = fit_law(holes.sample(fraction=1.0, shuffle=True, seed=1))  # order does not matter: sorted by step
    assert fit.a == pytest.approx(0.35, rel=1e-9) and fit.n == 80 - 12


def test_cannot_fit():
    with pytest.raises(ValueError, match="at least 3 steps"):
        fit_law(synthetic().head(2))
    flat = synthetic().with_columns(pl.lit(0.5).alias("entropy/mean"))
    with pytest.raises(ValueError, match="does not vary"):
        fit_law(flat)
    with pytest.raises(ValueError, match="no column.*accuracy"):
        fit_law(synthetic(), metric="accuracy")


def test_on_a_recorded_run(run_dir):
    import rldiag

    rng = np.random.default_rng(0)
    B, T = 8, 12
    with rldiag.Recorder(run_dir) as rec:
        for step in range(8):
            logp = -rng.exponential(0.5, (B, T)).astype(np.float32)
            ent = np.full((B, T), 1.0 - 0.1 * step, np.float32)
            rec.record(
                step=step,
                logprobs=logp,
                old_logprobs=logp,
                advantages=rng.normal(size=B).astype(np.float32),
                entropy=ent,
                rewards=(0.9 - 0.3 * np.exp(1.0 - 0.1 * step) + np.zeros(B)).astype(np.float32),
            )
    fit = fit_law(rldiag.open_run(run_dir))
    assert fit.a == pytest.approx(0.3, rel=1e-4) and fit.b == pytest.approx(0.9, rel=1e-4)
    assert fit.n == 8 and 0 <= fit.n_sign <= 7


def test_cli(run_dir, capsys):
    import json

    import rldiag
    from rldiag.cli import main

    rng = np.random.default_rng(3)
    with rldiag.Recorder(run_dir) as rec:
        for step in range(6):
            lp = -rng.exponential(0.5, (4, 8)).astype(np.float32)
            rec.record(
                step=step,
                logprobs=lp,
                old_logprobs=lp,
                advantages=rng.normal(size=4).astype(np.float32),
                entropy=np.full((4, 8), 1.0 - 0.1 * step, np.float32),
                rewards=np.full(4, 0.9 - 0.2 * np.exp(1.0 - 0.1 * step), np.float32),
            )
    assert main(["law", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "a = 0.2000, b = 0.9000" in out and "ceiling" in out and "mechanism" in out
    assert main(["law", str(run_dir), "--format", "json", "--per-step"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["law/ceiling"] == pytest.approx(0.7, rel=1e-5) and len(got["steps"]) == 6
    assert got["caveats"] == [] and "caution" not in out
    assert main(["law", str(run_dir), "--metric", "accuracy"]) == 2
    assert "not a metric of this run" in capsys.readouterr().err


def test_docs_quote_the_sample_runs_caveats():
    """docs/law.md says what `rldiag law` cautions on the bundled sample runs; regenerate the sentence when they
    change."""
    from pathlib import Path

    import rldiag

    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "law.md").read_text()
    healthy = fit_law(rldiag.open_run(root / "sample_logs" / "healthy"))
    collapse = fit_law(rldiag.open_run(root / "sample_logs" / "collapse"))
    assert healthy.caveats() == [] and f"`healthy` prints none (R^2 {healthy.r2:.2f})" in page
    assert [c.split(":")[0].split(" = ")[0] for c in collapse.caveats()] == [
        "R^2",
        "reward/mean now is above the predicted ceiling",
    ]
    assert f"(R^2 {collapse.r2:.2f}, R now {collapse.reached:.2f} of the ceiling)" in page
