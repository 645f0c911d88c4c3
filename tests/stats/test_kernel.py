"""The kernel's named inputs: one declaration (rldiag.config.KERNEL_INPUTS) builds the config array and the
set of statistics-affecting fields, so a recompute with another config never returns stale statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.config import KERNEL_INPUTS, STAT_FIELDS, RecorderConfig
from rldiag.stats import kernel

CHANGED: dict[str, Any] = {
    "eps_low": 0.1,
    "eps_high": 0.28,
    "dual_clip_c": 1.5,
    "tis_cap": 1.2,
    "entropy_low": 0.8,
    "cov_band": (0.01, 0.5),
    "cov_top_frac": 0.2,
    "ctpo_bounds": (0.01, 0.02),
    "n_buckets": 4,
    "token_sample_rate": 0.5,
    "sample_seed": 3,
    "roll_steps": 7,
    "roll_rows": 1000,
    "roll_seconds": 5.0,
    "queue_max_bytes": 2**21,
    "max_block_seconds": 1.0,
    "errors": "strict",
    "logp_tolerance": 0.3,
    "compression": "zstd",
    "icepop_band": (0.8, 1.25),
    "geo_bounds": (0.9, 1.1),
    "correct_reward": 0.5,
    "lowprob": 0.5,
}
"""A different value for every RecorderConfig field (the test fails when a field is added without one)."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with every optional input, some log-probs between 0 and 0.3 (valid only under a looser
    tolerance) and full token rows."""
    path = tmp_path_factory.mktemp("kernel") / "run"
    rng = np.random.default_rng(0)
    with rldiag.Recorder(path, errors="lenient", roll_steps=3) as rec:
        for step in range(6):
            for _ in range(2):
                B, T = 6, 40
                lp = -rng.exponential(0.7, (B, T)).astype(np.float32)
                lp[rng.random((B, T)) < 0.05] = 0.2  # above the default tolerance, below 0.3
                olp = np.minimum(lp + rng.normal(0, 0.3, (B, T)), 0).astype(np.float32)
                mask = np.arange(T)[None, :] < rng.integers(5, T, B)[:, None]
                rec.record(
                    step=step,
                    logprobs=lp,
                    old_logprobs=olp,
                    advantages=rng.normal(size=B),
                    mask=mask,
                    entropy=rng.exponential(1.0, (B, T)),
                    rollout_logprobs=olp + rng.normal(0, 0.3, (B, T)),
                    ref_logprobs=lp + rng.normal(0, 0.2, (B, T)),
                    group_ids=np.arange(B) // 3,
                    rewards=np.where(rng.random(B) < 0.4, 1.0, rng.random(B)),
                    versions=np.full(B, max(step - 1, 0)),
                    route_agree=np.where(rng.random((B, T)) < 0.6, 1.0, rng.random((B, T))),
                )
    return path


def test_every_config_field_has_a_changed_value_and_stat_fields_come_from_the_declaration() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(RecorderConfig)}
    assert RecorderConfig.STAT_FIELDS == STAT_FIELDS == tuple(dict.fromkeys(k.field for k in KERNEL_INPUTS))
    assert "logp_tolerance" in STAT_FIELDS
    cfg = RecorderConfig(**{k: v for k, v in CHANGED.items() if k in ("eps_high", "cov_band", "logp_tolerance")})
    arr = kernel.config_array(cfg)
    assert arr[kernel.C_EPS_HIGH] == 0.28 and arr[kernel.C_LOGP_TOLERANCE] == 0.3
    assert (arr[kernel.C_COV_BAND_LO], arr[kernel.C_COV_BAND_HI]) == (0.01, 0.5)
    assert arr.size == len(KERNEL_INPUTS)


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_config_recompute_equals_from_tokens_recompute_for_each_field(run_dir: Path, field: str) -> None:
    """Changing any one setting: the fast config recompute (stored statistics where they cannot change,
    token rows for the others) equals recomputing every statistic from the token rows."""
    run = rldiag.open_run(run_dir)
    assert not run.token_rows_sampled
    cfg = run.config.replace(**{field: CHANGED[field]})
    if cfg == run.config:  # errors="strict" is the default value: flip it the other way
        cfg = run.config.replace(errors="lenient")
    fast = run.step_metrics(config=cfg)
    full = run.step_metrics(config=cfg, from_tokens=True)
    assert fast.columns == full.columns
    for name in fast.columns:
        np.testing.assert_allclose(
            fast[name].to_numpy(), full[name].to_numpy(), rtol=1e-12, atol=0, equal_nan=True, err_msg=f"{field}: {name}"
        )
    stored = run.step_metrics()
    if field in STAT_FIELDS:
        assert not _frames_equal(stored, full), f"changing {field} changed no metric: pick another value"
    else:
        assert _frames_equal(stored, fast)


def test_logp_tolerance_counts_the_tokens_it_admits(run_dir: Path) -> None:
    """The reported bug: a looser tolerance admits the log-probs between 1e-4 and 0.3."""
    run = rldiag.open_run(run_dir)
    base = run.step_metrics(metrics=["tokens/count"])["tokens/count"].sum()
    looser = run.step_metrics(config=run.config.replace(logp_tolerance=0.3), metrics=["tokens/count"])
    assert looser["tokens/count"].sum() > base


def test_affected_stats() -> None:
    assert kernel.affected_stats({"roll_steps", "compression"}) == frozenset()
    clip = kernel.affected_stats({"eps_high"})
    assert clip == {n for n, d in kernel.STATS.items() if d.config_dependent} and "n" not in clip
    assert kernel.affected_stats({"logp_tolerance", "eps_high"}) == frozenset(kernel.STATS)


def _frames_equal(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    return all(np.allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-12, atol=0, equal_nan=True) for c in a.columns)


def _lane_sum(x: np.ndarray) -> float:
    """The kernel's summation order: token j adds to lane j % W, each lane from 0.0 in token order, then the
    lanes in order (np.cumsum adds one after the other)."""
    total = 0.0
    for lane in range(kernel.W):
        total += float(np.cumsum(np.concatenate([[0.0], x[lane :: kernel.W]]))[-1])
    return total


def test_lane_sums_follow_token_order_across_tails_and_chunks() -> None:
    """Records whose lengths end inside a block of W tokens and span several of the kernel's chunks: every
    lane sum has the bits of the documented order (the vector loops, their tails and chunk edges keep it)."""
    rng = np.random.default_rng(5)
    lengths = [1, 7, 8, 9, 2047, 2049, 4100, 70]
    n = sum(lengths)
    lp = -rng.exponential(1.0, n).astype(np.float32)
    lp[rng.random(n) < 0.03] = np.nan
    olp = np.minimum(lp + rng.normal(0, 0.3, n), 0).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    ent = rng.exponential(1.0, n).astype(np.float32)
    roll = (olp + rng.normal(0, 0.2, n)).astype(np.float32)
    roll[rng.random(n) < 0.02] = np.inf
    seq_off = np.concatenate([[0], np.cumsum(lengths)])
    tb = kernel.TokenBatch(
        rec_off=np.arange(len(lengths) + 1),
        seq_off=seq_off,
        steps=np.zeros(len(lengths), np.int64),
        logp=lp,
        old_logp=olp,
        adv=adv,
        pos=np.concatenate([np.arange(k) for k in lengths]),
        entropy=ent,
        rollout_logp=roll,
    )
    cfg = RecorderConfig()
    got = kernel.compute(tb, cfg)
    col = {name: j for j, name in enumerate(kernel.SCALARS)}
    expm1 = np.vectorize(kernel._expm1)
    for r, (t0, t1) in enumerate(zip(seq_off[:-1], seq_off[1:])):
        x_lp, x_olp = lp[t0:t1].astype(np.float64), olp[t0:t1].astype(np.float64)
        ok = np.isfinite(x_lp) & np.isfinite(x_olp)
        lr = np.where(ok, x_lp - x_olp, 0.0)
        xl = np.where(ok, x_lp, 0.0)
        a = np.where(ok, adv[t0:t1].astype(np.float64), 0.0)
        rr = expm1(lr) + 1.0
        e = ent[t0:t1].astype(np.float64)
        d = x_olp - roll[t0:t1].astype(np.float64)
        d_ok = ok & np.isfinite(d)
        n = ok.sum()
        c = (a - _lane_sum(a) / n) * (x_lp - _lane_sum(xl) / n)
        want = {
            "s_lr": lr,
            "s_lr2": lr * lr,
            "s_logp": xl,
            "s_adv2": a * a,
            "s_logp_adv": xl * a,
            "s_absadv": np.abs(a),
            "s_bal_pos": np.maximum(np.minimum(rr, 1.0 + cfg.eps_high) * a, 0.0),
            "s_ent": np.where(ok, e, 0.0),
            "s_mm_d": np.where(d_ok, d, 0.0),
            "s_cov_pos": np.where(ok, np.maximum(np.where(ok, c, 0.0), 0.0), 0.0),
        }
        for name, terms in want.items():
            assert got.scalars[r, col[name]] == _lane_sum(terms), (lengths[r], name)


def _stats_bytes(stats: kernel.BatchStats) -> list[bytes]:
    return (
        [stats.scalars.tobytes(), stats.cov.tobytes()]
        + [stats.hists[k].tobytes() for k in sorted(stats.hists)]
        + [stats.vectors[k].tobytes() for k in sorted(stats.vectors)]
        + [b"".join(x.tobytes() for x in stats.sets[k]) for k in sorted(stats.sets)]
    )


def test_scratch_kept_between_calls_changes_no_bit() -> None:
    """Each thread keeps the kernel's scratch for its next call: what an earlier, larger call left there (here
    poisoned with NaN, 1e300 and all-ones bytes) changes no bit of a later call's statistics."""
    import threading

    rng = np.random.default_rng(11)

    def batch(lengths: list[int]) -> kernel.TokenBatch:
        n = sum(lengths)
        lp = -rng.exponential(1.0, n).astype(np.float32)
        lp[rng.random(n) < 0.03] = np.nan
        olp = np.minimum(lp + rng.normal(0, 0.3, n), 0).astype(np.float32)
        return kernel.TokenBatch(
            rec_off=np.arange(len(lengths) + 1),
            seq_off=np.concatenate([[0], np.cumsum(lengths)]),
            steps=np.zeros(len(lengths), np.int64),
            logp=lp,
            old_logp=olp,
            adv=rng.normal(size=n).astype(np.float32),
            pos=np.concatenate([np.arange(k) for k in lengths]),
            entropy=rng.exponential(1.0, n).astype(np.float32),
            rollout_logp=(olp + rng.normal(0, 0.2, n)).astype(np.float32),
            route_agree=rng.random(n).astype(np.float32),
        )

    small, big = batch([5, 300, 2049]), batch([9000, 40])
    cfg = RecorderConfig()
    results = []

    def run(poison: float | None) -> None:
        kernel.compute(big, cfg)  # this thread's scratch now holds a larger call's values
        if poison is not None:
            for a in kernel._SCRATCH.get(0):
                a.view(np.uint8)[...] = 0xFF if np.isnan(poison) else 0
                if a.dtype == np.float64 and not np.isnan(poison):
                    a[...] = poison
        results.append(_stats_bytes(kernel.compute(small, cfg)))

    for poison in (None, float("nan"), 1e300):
        t = threading.Thread(target=run, args=(poison,))
        t.start()
        t.join()
    assert results[0] == results[1] == results[2]
