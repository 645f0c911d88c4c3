"""Extrapolation cliff: closed form, K-ary solver, simulation, estimation from token rows, figure."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import polars as pl
import pytest

from rldiag.analysis import cliff as C


def logit(x):
    return math.log(x / (1 - x))


@pytest.mark.parametrize(
    ("p", "b", "c", "want"), [(0.96, 0.90, 2, 0.7618), (0.999, 0.99, 5, 0.6997), (0.96, 0.90, 5, 1.7277)]
)
def test_spec_sanity_values(p, b, c, want):
    assert round(C.lambda_star(p, b, c), 4) == want
    assert C.lambda_star_kary([p, 1 - p], [b, 1 - b], c) == pytest.approx(C.lambda_star(p, b, c), abs=1e-6)


def test_tail_binding_form_and_eps_form():
    for p, b, c in [(0.96, 0.9, 2.0), (0.99, 0.7, 1.5), (0.9999, 0.95, 10.0)]:
        assert b >= 1 / c
        tail = math.log(1 + (c - 1) / b) / (logit(p) - logit(b))
        assert C.lambda_star(p, b, c) == pytest.approx(tail, rel=1e-12)
    assert C.lambda_star(0.96, 0.9, eps=0.2) == pytest.approx(C.lambda_star(0.96, 0.9, 1.25), rel=1e-15)
    # the eps form is exact where the lower side 1 - eps binds: the tail ratio at lambda* is 1 - eps
    lam = C.lambda_star(0.96, 0.9, eps=0.2)
    q = C.q_of_lambda(0.96, 0.9, lam)
    assert (1 - q) / (1 - 0.9) == pytest.approx(0.8, rel=1e-12)


def test_general_case_both_signs_and_infinities():
    rng = np.random.default_rng(0)
    p, b = rng.uniform(0.01, 0.99, 300), rng.uniform(0.01, 0.99, 300)
    c = 1.7
    lam = C.lambda_star(p, b, c)
    q_min, q_max = C.clip_safe_band(b, c)
    q = C.q_of_lambda(p, b, lam)
    edge = np.where(p > b, q_max, q_min)
    np.testing.assert_allclose(q, edge, rtol=1e-9)  # q(lambda*) sits on the binding edge of the band
    inside = C.q_of_lambda(p, b, 0.999 * lam)
    assert np.all((inside >= q_min - 1e-12) & (inside <= q_max + 1e-12))
    # teacher flatter than the base: extrapolation pushes the mode down, the lower bound binds
    q_min = max(0.9 / 2, 1 - 2 * (1 - 0.9))
    assert C.lambda_star(0.6, 0.9, 2.0) == pytest.approx((logit(q_min) - logit(0.9)) / (logit(0.6) - logit(0.9)))
    assert C.lambda_star(0.9, 0.9, 2.0) == math.inf  # p == b: never leaves
    assert C.lambda_star(0.96, 0.9, math.inf) == math.inf  # bound 1: the clip never binds
    assert C.lambda_star(1.0, 0.9, 2.0) == 0.0  # a deterministic teacher leaves at once
    with pytest.raises(ValueError, match="exactly one of c"):
        C.lambda_star(0.9, 0.5)
    with pytest.raises(ValueError, match="0 < b < 1"):
        C.lambda_star(0.9, 1.0, 2.0)


def test_kary_solver_matches_closed_form_for_two_tokens():
    rng = np.random.default_rng(1)
    for _ in range(200):
        p, b = rng.uniform(0.05, 0.999, 2)
        c = rng.uniform(1.05, 8.0)
        want = C.lambda_star(p, b, c)
        got = C.lambda_star_kary([p, 1 - p], [b, 1 - b], c)
        assert got == pytest.approx(want, abs=1e-6, rel=1e-9)


def test_kary_solver_on_a_structured_position():
    t = np.array([0.97, 0.01, 0.01, 0.005, 0.003, 0.002])
    b = np.array([0.9, 0.04, 0.03, 0.015, 0.01, 0.005])
    lam = C.lambda_star_kary(t, b, 2.0)
    star = b ** (1 - lam) * t**lam
    ratio = star / star.sum() / b
    assert min(ratio.min() - 0.5, 2.0 - ratio.max()) == pytest.approx(0.0, abs=1e-9)  # on the boundary
    # the tail token whose teacher/base ratio is smallest binds before the pooled tail of the Bernoulli reduction
    assert lam < C.lambda_star(0.97, 0.9, 2.0)
    assert C.lambda_star_kary(t, t, 2.0) == math.inf
    with pytest.raises(ValueError, match="zero mass to a token the teacher supports"):
        C.lambda_star_kary([0.5, 0.5], [1.0, 0.0], 2.0)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_simulation_leaves_the_clip_safe_region_exactly_past_lambda_star(mode):
    teacher, base, c = [0.96, 0.04], [0.90, 0.10], 2.0
    star = C.lambda_star(0.96, 0.90, c)
    below = C.simulate(teacher, base, 0.98 * star, c, mode=mode, seed=3)
    above = C.simulate(teacher, base, 1.02 * star, c, mode=mode, seed=3)
    assert below.inside and not above.inside
    assert below.ratio_min > 1 / c > above.ratio_min  # the tail ratio crosses 1/c
    assert above.policy[0] == pytest.approx(C.q_of_lambda(0.96, 0.90, 1.02 * star), abs=1e-4)


def test_simulated_boundary_equals_the_solver():
    t = [0.97, 0.01, 0.01, 0.005, 0.003, 0.002]
    b = [0.9, 0.04, 0.03, 0.015, 0.01, 0.005]
    star = C.lambda_star_kary(t, b, 2.0)
    assert C.simulated_boundary(t, b, 2.0, 0.9 * star, 1.1 * star, tol=1e-7) == pytest.approx(star, abs=1e-6)


# --- from token rows -------------------------------------------------------------------------------------------


def opd_tokens(rng, steps=3, n=400):
    parts = []
    for s in range(steps):
        p = np.where(rng.random(n) < 0.6, rng.uniform(0.92, 0.999, n), rng.uniform(0.05, 0.8, n))
        b = np.clip(p - rng.uniform(0.01, 0.05, n), 0.01, 0.99)
        parts.append(
            pl.DataFrame(
                {
                    "step": np.full(n, s, np.int64),
                    "teacher_logp": np.log(p).astype(np.float32),
                    "base_logp": np.log(b).astype(np.float32),
                }
            )
        )
    return pl.concat(parts)


def test_report_estimates_p_and_b_at_binding_positions():
    frame = opd_tokens(np.random.default_rng(0))
    rep = C.cliff_report(frame, lam=0.5, threshold=0.9, c=2.0)
    assert rep.columns == [
        "step",
        "cliff/n_tokens",
        "cliff/n_positions",
        "cliff/p",
        "cliff/b",
        "cliff/c",
        "cliff/lambda_star",
        "cliff/lambda_star_min",
        "cliff/headroom",
        "cliff/severity",
    ]
    for row, (_, part) in zip(rep.iter_rows(named=True), frame.group_by("step", maintain_order=True)):
        p = np.exp(part["teacher_logp"].cast(pl.Float64).to_numpy())
        b = np.exp(part["base_logp"].cast(pl.Float64).to_numpy())
        sel = p > 0.9
        assert row["cliff/n_positions"] == sel.sum()
        assert row["cliff/p"] == pytest.approx(p[sel].mean()) and row["cliff/b"] == pytest.approx(b[sel].mean())
        assert row["cliff/lambda_star"] == pytest.approx(C.lambda_star(p[sel].mean(), b[sel].mean(), 2.0))
        assert row["cliff/lambda_star_min"] == pytest.approx(C.lambda_star(p[sel], b[sel], 2.0).min(), rel=1e-9)
        assert row["cliff/headroom"] == pytest.approx(0.5 / row["cliff/lambda_star"])
        assert row["cliff/severity"] == C.severity(row["cliff/headroom"])


def test_severity_thresholds():
    assert [C.severity(h) for h in (0.5, 0.95, 0.999, 1.0, 3.0, math.inf, math.nan)] == [
        "ok",
        "warn",
        "warn",
        "critical",
        "critical",
        "critical",
        "unknown",
    ]


def test_report_errors():
    frame = opd_tokens(np.random.default_rng(0))
    with pytest.raises(ValueError, match="threshold"):
        C.cliff_report(frame, threshold=0.3)
    with pytest.raises(ValueError, match="record teacher_logprobs and base_logprobs"):
        C.cliff_report(frame.drop("base_logp"))
    with pytest.raises(ValueError, match="no token row has both"):
        C.cliff_report(frame.with_columns(pl.lit(None, pl.Float32).alias("base_logp")))
    rep = C.cliff_report(frame.with_columns(pl.lit(-1.0).alias("teacher_logp")), lam=1.0)  # nothing binds
    assert (rep["cliff/n_positions"] == 0).all() and rep["cliff/lambda_star"].is_nan().all()


def test_report_on_a_recorded_run(run_dir):
    import rldiag

    rng = np.random.default_rng(2)
    B, T = 4, 16
    with rldiag.Recorder(run_dir, clip_low=0.2, clip_high=0.2) as rec:
        for step in range(3):
            teacher = np.log(np.where(rng.random((B, T)) < 0.7, 0.97, 0.3))
            base = teacher - rng.uniform(0.02, 0.06, (B, T))
            logp = base + rng.normal(0, 0.01, (B, T))
            rec.record(
                step=step,
                logprobs=np.minimum(logp, 0).astype(np.float32),
                old_logprobs=np.minimum(logp, 0).astype(np.float32),
                advantages=rng.normal(size=B).astype(np.float32),
                teacher_logprobs=teacher.astype(np.float32),
                base_logprobs=base.astype(np.float32),
            )
    run = rldiag.open_run(run_dir)
    rep = C.cliff_report(run, lam=1.5)
    assert rep["step"].to_list() == [0, 1, 2]
    assert rep["cliff/c"].to_list() == pytest.approx([1.25] * 3)  # eps form of the run's eps_low
    assert np.allclose(rep["cliff/p"].to_numpy(), 0.97, rtol=1e-6)
    assert (rep["cliff/lambda_star_min"] <= rep["cliff/lambda_star"] + 1e-12).all()


# --- figure ----------------------------------------------------------------------------------------------------


def test_figure_marks_the_band_and_lambda_star():
    fig = C.cliff_figure(0.96, 0.9, 2.0, lam=1.0)
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert "q(λ), clip-safe" in names and "q(λ), outside" in names
    safe = next(t for t in fig.data if t.name == "q(λ), clip-safe")
    x = np.asarray(safe.x)
    y = np.asarray(safe.y, dtype=float)
    assert np.isfinite(y[x < 0.76]).all() and np.isnan(y[x > 0.77]).all()
    rect = [s for s in fig.layout.shapes if s.type == "rect"][0]
    q_min, q_max = C.clip_safe_band(0.9, 2.0)
    assert (rect.y0, rect.y1) == pytest.approx((q_min, q_max))
    texts = [a.text for a in fig.layout.annotations]
    assert any("λ* = 0.7618" in t for t in texts) and any("λ = 1" in t for t in texts)


# --- command line ----------------------------------------------------------------------------------------------


def test_cli_numbers(capsys):
    from rldiag.cli import main

    assert main(["cliff", "--p", "0.96", "--b", "0.90", "--c", "2", "--eps", "0.2", "--lam", "0.74"]) == 0
    out = capsys.readouterr().out
    assert "ratio form (c = 2): lambda* = 0.7618; lambda/lambda* = 0.9714 (warn)" in out
    assert "eps form (c = 1.25)" in out and "derivation" in out
    assert main(["cliff", "--teacher", "0.96,0.04", "--base", "0.9,0.1", "--c", "2", "--format", "json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)[0]["lambda_star"] == pytest.approx(0.761819, abs=1e-6)
    assert main(["cliff", "--p", "0.96", "--b", "0.9"]) == 2
    assert "--c (ratio form) or --eps" in capsys.readouterr().err
    assert main(["cliff", "--p", "0.96", "--b", "1.5", "--c", "2"]) == 2
    assert "0 < b < 1" in capsys.readouterr().err


def test_cli_run(run_dir, capsys):
    import rldiag
    from rldiag.cli import main

    rng = np.random.default_rng(5)
    with rldiag.Recorder(run_dir) as rec:
        for step in range(2):
            teacher = np.log(np.full((2, 6), 0.97))
            lp = np.full((2, 6), -0.1, np.float32)
            rec.record(
                step=step,
                logprobs=lp,
                old_logprobs=lp,
                advantages=rng.normal(size=2).astype(np.float32),
                teacher_logprobs=teacher.astype(np.float32),
                base_logprobs=(teacher - 0.05).astype(np.float32),
            )
    assert main(["cliff", str(run_dir), "--lam", "0.1", "--c", "2"]) == 0
    out = capsys.readouterr().out
    assert "cliff/lambda_star" in out and "worst: ok" in out
    assert main(["cliff", str(run_dir), "--lam", "5", "--format", "json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["cliff/severity"] for r in rows] == ["critical", "critical"]
