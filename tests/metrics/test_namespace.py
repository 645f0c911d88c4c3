"""One metric namespace: lens/*, cliff/* and law/* are registry entries, CTPO has one definition, the cliff
thresholds come from the rule file, and the shared definitions are the ones the analyses use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.analysis import cliff, law, lens
from rldiag.metrics.registry import ANALYSES, METRICS, REGISTRY, spec
from rldiag.stats import definitions, hist


def test_every_analysis_column_is_a_registry_entry() -> None:
    assert set(lens.columns()) == {n for n in ANALYSES if n.startswith("lens/")}
    fit = law.LawFit.__dataclass_fields__
    assert "a" in fit  # the dataclass the law/* names come from
    for name in (cliff.LAMBDA_STAR, cliff.LAMBDA_STAR_MIN, cliff.HEADROOM, "cliff/n_tokens", "cliff/p", "cliff/c"):
        assert name in ANALYSES and ANALYSES[name].computed_by.startswith("run.cliff")
    assert set(METRICS) == set(REGISTRY) | set(ANALYSES) and not set(REGISTRY) & set(ANALYSES)
    assert all(s.computed_by == "" for s in REGISTRY.values())
    with pytest.raises(TypeError, match="token rows"):
        ANALYSES["lens/ppo/kept_frac"].finalize({})
    with pytest.raises(KeyError, match="unknown metric"):
        spec("lens/nope")


def test_law_quantities_are_registered(tmp_path: Path) -> None:
    steps = np.arange(30)
    ent = np.linspace(1.0, 0.2, 30)
    frame = pl.DataFrame(
        {"step": steps, "entropy/mean": ent, "reward/mean": -0.5 * np.exp(ent) + 1.0, "entropy/cov": np.full(30, 0.01)}
    )
    assert set(law.fit_law(frame).as_dict()) <= set(ANALYSES)


def test_alert_rules_know_the_analysis_metrics() -> None:
    from rldiag.alerts.rules import known_metrics

    assert known_metrics() == frozenset(METRICS)


def test_cliff_thresholds_are_the_rule_files() -> None:
    from rldiag.alerts.rules import default_rules

    by_severity = {
        r.severity: r.conditions[0].threshold
        for r in default_rules().rules
        if r.conditions and r.conditions[0].metric == cliff.HEADROOM
    }
    assert (cliff.WARN_HEADROOM, cliff.CRITICAL_HEADROOM) == (by_severity["warn"], by_severity["critical"])
    warn, crit = cliff.headroom_thresholds(
        '[rules.w]\nmetric = "cliff/headroom"\nseverity = "warn"\nthreshold = 0.5\n'
        '[rules.c]\nmetric = "cliff/headroom"\nseverity = "critical"\nthreshold = 0.7\n'
    )
    assert (warn, crit) == (0.5, 0.7)
    with pytest.raises(ValueError, match="no warn and critical rule"):
        cliff.headroom_thresholds('[rules.w]\nmetric = "x"\nseverity = "warn"\nthreshold = 0.5\n')


def test_one_ctpo_definition_kernel_and_lens_agree(tmp_path: Path) -> None:
    """seq/ctpo_clip (kernel, stored statistics) == 1 - lens/ctpo/kept_frac (polars, token rows)."""
    rng = np.random.default_rng(3)
    with rldiag.Recorder(tmp_path / "run", roll_steps=2) as rec:
        for step in range(4):
            B, T = 8, 30
            lp = -rng.exponential(0.5, (B, T))
            olp = np.minimum(lp + rng.normal(0, 0.08, (B, T)), 0)
            rec.record(
                step=step,
                logprobs=lp,
                old_logprobs=olp,
                advantages=rng.normal(size=B),
                mask=np.arange(T)[None, :] < rng.integers(3, T, B)[:, None],
            )
    run = rldiag.open_run(tmp_path / "run")
    stored = run.step_metrics(metrics=["seq/ctpo_clip"])["seq/ctpo_clip"].to_numpy()
    kept = run.lens(objectives=["ctpo"])["lens/ctpo/kept_frac"].to_numpy()
    assert (stored > 0).all() and (stored < 1).all()  # the bounds bind on some tokens, not all
    np.testing.assert_allclose(stored, 1.0 - kept, rtol=1e-12)


def test_shared_definitions_on_hostile_values() -> None:
    x = np.array([-1.0, 0.0, 1e-5, 1e-3, np.nan, np.inf, -np.inf])
    one = np.full_like(x, -1.0)
    want = np.isfinite(x) & (x <= 1e-4)
    with np.errstate(invalid="ignore"):  # inf - inf
        assert np.array_equal(definitions.token_valid(x, one, one, 1e-4), want)
        assert np.array_equal(definitions.token_valid(one, x, one, 1e-4), want)
        assert np.array_equal(definitions.token_valid(one, one, x, 1e-4), np.isfinite(x))
    frame = pl.DataFrame({"x": x})
    got = frame.select(definitions.token_valid(pl.col("x"), pl.lit(-1.0), pl.lit(1.0), 1e-4))["x"].to_numpy()
    assert np.array_equal(got, want)
    # CTPO: the upper bound binds only with a positive advantage, the lower only with a negative one
    L, root = np.array([0.1, 0.1, -0.1, -0.1]), np.ones(4)
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    assert definitions.ctpo_clipped(L, adv, root, 0.025, 0.05).tolist() == [True, False, False, True]
    r = np.array([0.5, 1.0, 2.0])
    assert definitions.batch_ess(r.sum(), (r * r).sum(), 3.0) == pytest.approx(r.sum() ** 2 / (3 * (r * r).sum()))


def test_histogram_fold_is_the_one_the_registry_and_app_use() -> None:
    lr = np.array([-2.0, -0.01, 0.01, 0.5, 3.0])
    signed = np.zeros((1, hist.N_SIGNED))
    np.add.at(signed[0], hist.signed_index(lr), 1)
    mag = hist.fold(signed)
    expect = np.zeros((1, hist.N_MAG))
    np.add.at(expect[0], hist.mag_index(np.abs(lr)), 1)
    assert np.array_equal(mag, expect)
