"""rldiag's metrics equal verl's own, on the same tensors (issue 3: agreement with the trainers).

verl's functions are imported, never copied: ``compute_policy_loss_vanilla`` (``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower``, ``actor/ppo_kl``), ``kl_penalty(..., "low_var_kl")`` aggregated the way verl's
actor aggregates its KL loss (``agg_loss`` token-mean), and
``rollout_corr_helper.compute_rollout_correction_and_rejection_mask`` (``rollout_corr/kl``,
``rollout_corr/k3_kl`` and the IS-weight diagnostics).

Scope of "equal": verl computes each metric over the tensors of one call (a micro-batch) and its trainer
logs the mean of those per-micro-batch values; rldiag's step metric pools every token of the step. The
two agree exactly when verl is given the whole step in one call, which is what is compared here -- with the
step recorded by rldiag as one record and as four (two ranks x two micro-batches), so the comparison also
covers rldiag's merge. verl clamps log-ratios to [-20, 20] and ``low_var_kl`` per token to [-10, 10]; the
inputs stay inside those bounds (asserted), where both are the plain estimators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import (  # noqa: E402
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_correction_weights,
    compute_rollout_rejection_mask,
)
from verl.utils.torch_functional import masked_mean  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import rldiag  # noqa: E402

EPS_LOW, EPS_HIGH, DUAL_C, TIS_CAP = 0.2, 0.28, 3.0, 2.0
B, T = 48, 96


def batch(seed: int, *, mismatch_outliers: bool = True) -> dict[str, torch.Tensor]:
    """Heavy-tailed policy moves (some ratios above the dual-clip c), a reference policy within 2.5 nats and
    a small train/inference mismatch (with a few IS weights above the cap), over responses of random length."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 4 - 0.01
    move = 0.15 * torch.distributions.StudentT(3.0).sample((B, T))
    move = move + (torch.rand(B, T, generator=g) < 0.02) * 1.3  # a few tokens with r around e^1.3 > c
    logp = (old + move.clamp(-2.5, 2.5)).clamp(max=-1e-4)
    ref = (logp + (torch.rand(B, T, generator=g) * 5 - 2.5)).clamp(max=0)  # log-probs: the recorder refuses > 0
    rollout = (old + 0.08 * torch.randn(B, T, generator=g)).clamp(max=0)
    if mismatch_outliers:
        rollout = rollout - (torch.rand(B, T, generator=g) < 0.01) * 1.0  # w = exp(old - rollout) ~ e > 2
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    adv[torch.rand(B, T, generator=g) < 0.05] = 0.0
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    return dict(logp=logp, old=old, ref=ref, rollout=rollout, adv=adv, mask=mask)


def verl_metrics(x: dict[str, torch.Tensor]) -> dict[str, float]:
    """The numbers verl logs for this batch, from verl's own functions."""
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=EPS_LOW,
        clip_ratio_low=EPS_LOW,
        clip_ratio_high=EPS_HIGH,
        clip_ratio_c=DUAL_C,
    )
    _, pg = compute_policy_loss_vanilla(x["old"], x["logp"], x["adv"], x["mask"], "token-mean", cfg)
    kld = kl_penalty(x["logp"], x["ref"], "low_var_kl")
    assert kld[x["mask"]].abs().max() < 10, "inputs must stay inside verl's [-10, 10] clamp"
    _, _, corr = compute_rollout_correction_and_rejection_mask(
        old_log_prob=x["old"],
        rollout_log_prob=x["rollout"],
        response_mask=x["mask"].float(),
        rollout_is="token",
        rollout_is_threshold=TIS_CAP,
    )
    return {
        "pg_clipfrac": pg["actor/pg_clipfrac"],
        "pg_clipfrac_lower": pg["actor/pg_clipfrac_lower"],
        "ppo_kl": pg["actor/ppo_kl"],
        "low_var_kl": float(agg_loss(kld, x["mask"], "token-mean")),  # actor kl_loss, use_kl_loss=True
        "low_var_kl_masked_mean": float(masked_mean(kld, x["mask"])),
        "rollout_corr/kl": corr["rollout_corr/kl"],
        "rollout_corr/k3_kl": corr["rollout_corr/k3_kl"],
        "rollout_corr/rollout_is_ratio_fraction_high": corr["rollout_corr/rollout_is_ratio_fraction_high"],
        "rollout_corr/rollout_is_eff_sample_size": corr["rollout_corr/rollout_is_eff_sample_size"],
        "rollout_corr/rollout_is_max": corr["rollout_corr/rollout_is_max"],
    }


def record(run_dir, x: dict[str, torch.Tensor], *, ranks: int, micro: int, step: int = 1) -> dict[str, float]:
    """Record the batch split over ``ranks`` x ``micro`` records and read the step's metrics back."""
    cfg = rldiag.RecorderConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=DUAL_C, tis_cap=TIS_CAP)
    rows = torch.arange(B).chunk(ranks * micro)
    for r in range(ranks):
        with rldiag.Recorder(run_dir, config=cfg, rank=r, world_size=ranks) as rec:
            for idx in rows[r * micro : (r + 1) * micro]:
                rec.record(
                    step=step,
                    logprobs=x["logp"][idx],
                    old_logprobs=x["old"][idx],
                    advantages=x["adv"][idx],
                    mask=x["mask"][idx],
                    ref_logprobs=x["ref"][idx],
                    rollout_logprobs=x["rollout"][idx],
                )
    df = rldiag.open_run(run_dir).step_metrics()
    assert df["step"].to_list() == [step]
    return df.row(0, named=True)


PAIRS = [  # rldiag metric, verl metric, what verl calls it
    ("clip/region", "pg_clipfrac"),
    ("clip/dual", "pg_clipfrac_lower"),
    ("kl/k1", "ppo_kl"),
    ("kl/ref_k3", "low_var_kl"),
    ("kl/ref_k3", "low_var_kl_masked_mean"),
    ("mismatch/k1", "rollout_corr/kl"),
    ("mismatch/k3", "rollout_corr/k3_kl"),
    ("mismatch/tis_frac", "rollout_corr/rollout_is_ratio_fraction_high"),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ranks,micro", [(1, 1), (2, 2)])
def test_metrics_equal_verls(tmp_path, seed, ranks, micro):
    x = batch(seed)
    ours = record(tmp_path / "run", x, ranks=ranks, micro=micro)
    theirs = verl_metrics(x)
    n = int(x["mask"].sum())
    # the batch must exercise every branch, or equality would prove little
    assert theirs["pg_clipfrac"] > 0.05 and theirs["pg_clipfrac_lower"] > 0.001
    assert theirs["pg_clipfrac"] != pytest.approx(ours["clip/symmetric"], abs=1 / n)  # sign-aware != symmetric
    assert theirs["rollout_corr/kl"] != 0 and theirs["rollout_corr/k3_kl"] > 0
    assert theirs["rollout_corr/rollout_is_ratio_fraction_high"] > 0.002
    for mine, verls in PAIRS:
        fraction = mine.startswith(("clip/", "mismatch/tis"))
        # counts are exact; verl's float32 mean over n tokens (plus its 1e-8 in the denominator) is not
        tol = dict(rel=2e-6, abs=1e-7) if fraction else dict(rel=2e-5, abs=2e-7)
        assert ours[mine] == pytest.approx(theirs[verls], **tol), f"{mine} vs verl {verls}"
    # clip fractions are multiples of 1/n: equality means the same token count
    assert round(ours["clip/region"] * n) == round(theirs["pg_clipfrac"] * n)


def test_is_weight_diagnostics_equal_verls_when_nothing_is_truncated(tmp_path):
    x = batch(3, mismatch_outliers=False)
    w = torch.exp(x["old"] - x["rollout"])[x["mask"]]
    assert w.max() < TIS_CAP  # verl's max and ESS are of truncated weights; rldiag's are untruncated
    ours = record(tmp_path / "run", x, ranks=1, micro=1)
    theirs = verl_metrics(x)
    assert ours["mismatch/ess"] == pytest.approx(theirs["rollout_corr/rollout_is_eff_sample_size"], rel=1e-5)
    assert ours["mismatch/is_max"] == pytest.approx(theirs["rollout_corr/rollout_is_max"], rel=1e-6)


def test_the_comparison_detects_a_wrong_setting(tmp_path):
    """Recorded with eps_high = eps_low (a plausible mistake), clip/region no longer matches verl's."""
    x = batch(0)
    theirs = verl_metrics(x)
    cfg = rldiag.RecorderConfig(eps_low=EPS_LOW, eps_high=EPS_LOW, dual_clip_c=DUAL_C, tis_cap=TIS_CAP)
    with rldiag.Recorder(tmp_path / "wrong", config=cfg) as rec:
        rec.record(step=1, logprobs=x["logp"], old_logprobs=x["old"], advantages=x["adv"], mask=x["mask"])
    wrong = rldiag.open_run(tmp_path / "wrong").step_metrics().row(0, named=True)
    n = int(x["mask"].sum())
    assert abs(wrong["clip/region"] - theirs["pg_clipfrac"]) * n >= 1
    assert not math.isclose(wrong["clip/region"], theirs["pg_clipfrac"], rel_tol=1e-3)
    assert np.isfinite(wrong["kl/k1"])


# ---- second-generation diagnostics (docs/metrics.md: mismatch/*, removed/*) against verl's rollout correction --
GEO = (0.98, 1.02)
"""Wider than the default Geo-MIS bounds, so that about half of these sequences are dropped (not all)."""


def wide_batch(seed: int) -> dict[str, torch.Tensor]:
    """:func:`batch` with sampler outliers both ways: some IS weights above IcePop's 5, some below 1/2, and
    a binary reward per response."""
    x = batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    u = torch.rand(B, T, generator=g)
    d = (x["old"] - x["rollout"]) + 2.2 * (u < 0.01) - 1.2 * ((u >= 0.01) & (u < 0.02))
    x["rollout"] = (x["old"] - d).clamp(max=0)
    x["reward"] = (torch.rand(B, generator=g) < 0.5).float()
    return x


def verl_second_generation(x: dict[str, torch.Tensor]) -> dict[str, float]:
    """verl's own masks and metrics for the same batch; rldiag's removed/* quantities computed from the tokens
    verl's functions truncate or drop."""
    valid = x["mask"].float()
    lr = x["old"] - x["rollout"]  # verl's log_ratio: log(pi_train / pi_rollout)
    out: dict[str, float] = {}
    tis_w, _ = compute_rollout_correction_weights(lr, valid, rollout_is="token", rollout_is_threshold=TIS_CAP)
    ice_w, ice = compute_rollout_correction_weights(lr, valid, rollout_is="token", rollout_is_threshold="0.5_5.0")
    rs_mask, rs = compute_rollout_rejection_mask(
        lr,
        valid,
        rollout_rs="token_k1,seq_sum_k1",
        rollout_rs_threshold=f"{1 / TIS_CAP}_{TIS_CAP},0.0001_10000",
    )
    geo_mask, geo = compute_rollout_rejection_mask(
        lr, valid, rollout_rs="seq_mean_k1", rollout_rs_threshold=f"{1 / GEO[1]}_{1 / GEO[0]}"
    )
    out["mismatch/icepop_frac"] = ice["rollout_is_oob_ratio"]
    out["mismatch/extreme_frac"] = rs["rollout_rs_token_k1_masked_fraction"]  # |d| > ln 2 is MIS at C = 2
    out["mismatch/seq_logratio_absmax"] = max(
        abs(rs["rollout_rs_seq_sum_k1_max"]), abs(rs["rollout_rs_seq_sum_k1_min"])
    )
    out["mismatch/geo_mask_frac"] = geo["rollout_rs_seq_mean_k1_seq_masked_fraction"]
    v = x["mask"]
    removed = {
        "tis": v & (tis_w < torch.exp(lr) * valid),  # truncated to the cap by verl's TIS
        "mis": v & (rs_mask == 0),  # verl's token_k1 rejection with bounds [1/C, C] (this call's only token option)
        "icepop": v & (ice_w == 0),
        "geo": v & (geo_mask == 0),
    }
    a = x["adv"].double()
    total = a.abs()[v].sum()
    for c, rm in removed.items():
        mass = a.abs()[rm].sum()
        out[f"removed/{c}/adv_mass"] = float(mass / total)
        out[f"removed/{c}/pos_share"] = float(a[rm & (a > 0)].sum() / mass)
        rows = rm.any(dim=1)
        out[f"removed/{c}/correct_frac"] = float((x["reward"][rows] >= 1.0).double().mean())
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ranks,micro", [(1, 1), (2, 2)])
def test_second_generation_equals_verls_rollout_correction(tmp_path, seed, ranks, micro):
    x = wide_batch(seed)
    cfg = rldiag.RecorderConfig(
        eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=DUAL_C, tis_cap=TIS_CAP, icepop_band=(0.5, 5.0), geo_bounds=GEO
    )
    rows = torch.arange(B).chunk(ranks * micro)
    for r in range(ranks):
        with rldiag.Recorder(tmp_path / "run", config=cfg, rank=r, world_size=ranks) as rec:
            for idx in rows[r * micro : (r + 1) * micro]:
                rec.record(
                    step=1,
                    logprobs=x["logp"][idx],
                    old_logprobs=x["old"][idx],
                    advantages=x["adv"][idx],
                    mask=x["mask"][idx],
                    rollout_logprobs=x["rollout"][idx],
                    rewards=x["reward"][idx],
                )
    ours = rldiag.open_run(tmp_path / "run").step_metrics().row(0, named=True)
    theirs = verl_second_generation(x)
    # every quantity is exercised: something is removed by each correction, not everything
    for c in ("tis", "mis", "icepop", "geo"):
        assert 0.0 < theirs[f"removed/{c}/adv_mass"] < 0.9, c
    assert 0.05 < theirs["mismatch/geo_mask_frac"] < 0.95 and theirs["mismatch/icepop_frac"] > 0.002
    assert abs(theirs["mismatch/seq_logratio_absmax"]) < 20  # inside verl's clamp, where both are the plain sum
    for name, want in theirs.items():
        assert ours[name] == pytest.approx(want, rel=2e-5, abs=1e-7), name
