"""The OpenRLHF adaptor, against a module with the signature of OpenRLHF's ``PolicyLoss``.

OpenRLHF does not install here (it needs flash-attn), so ``PolicyLossLike`` below stands in for
``openrlhf.models.loss.PolicyLoss``: same ``forward`` parameters (recent releases), a PPO clipped loss.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import rldiag  # noqa: E402
from rldiag.record.integrations.openrlhf import attach  # noqa: E402


class PolicyLossLike(nn.Module):
    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.28) -> None:
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        ratio = (log_probs - old_log_probs).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        loss = -torch.min(surr1, surr2)
        mask = action_mask.float() if action_mask is not None else torch.ones_like(loss)
        clip_ratio = ((surr2 < surr1).float() * mask).sum() / mask.sum()
        return (loss * mask).sum() / mask.sum(), clip_ratio


def inputs(seed: int, b: int = 6, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    lp = (old + 0.4 * torch.randn(b, t, generator=g)).clamp(max=0).requires_grad_(True)
    adv = torch.randn(b, 1, generator=g).expand(b, t)
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (b, 1), generator=g)
    rollout = old + 0.05 * torch.randn(b, t, generator=g)
    return lp, old, adv, mask, rollout


def tokens(run_dir) -> pl.DataFrame:
    return rldiag.open_run(run_dir).tokens().collect().sort(["step", "micro", "seq", "pos"])


def test_records_positional_and_keyword_calls_and_leaves_the_loss_alone(tmp_path):
    loss_fn = PolicyLossLike()
    steps = iter([3, 3, 4])
    with attach(loss_fn, tmp_path / "run", step_fn=lambda: next(steps), clip_low=0.2, clip_high=0.28):
        lp, old, adv, mask, rollout = inputs(0)
        ref_loss, ref_clip = PolicyLossLike()(lp, old, adv, mask, rollout)
        loss, clip = loss_fn(lp, old, adv, mask, rollout)  # positional, as OpenRLHF's actor calls it
        assert torch.equal(loss, ref_loss) and torch.equal(clip, ref_clip)
        loss.backward()
        lp2, old2, adv2, mask2, _ = inputs(1)
        loss_fn(lp2, old2, adv2, action_mask=mask2)  # keywords, no rollout log-probs
        loss_fn(log_probs=lp2, old_log_probs=old2, advantages=adv2, action_mask=mask2)
    df = tokens(tmp_path / "run")
    assert df.group_by("step").len().sort("step")["len"].to_list() == [int(mask.sum() + mask2.sum()),
                                                                       int(mask2.sum())]
    first = df.filter((pl.col("step") == 3) & (pl.col("micro") == 0))
    m = mask.numpy()
    np.testing.assert_array_equal(first["logp"].to_numpy(), lp.detach().numpy()[m])
    np.testing.assert_array_equal(first["old_logp"].to_numpy(), old.numpy()[m])
    np.testing.assert_array_equal(first["adv"].to_numpy(), adv.numpy()[m])
    np.testing.assert_array_equal(first["rollout_logp"].to_numpy(), rollout.numpy()[m])
    assert df.filter(pl.col("micro") == 1)["rollout_logp"].null_count() == int(mask2.sum())


def test_clip_fraction_equals_the_modules_own(tmp_path):
    """The module's clip_ratio (sign-aware, like OpenRLHF's ppo_clip_ratio) is rldiag's clip/region."""
    loss_fn = PolicyLossLike(0.2, 0.28)
    lp, old, adv, mask, _ = inputs(2, b=32, t=64)
    with attach(loss_fn, tmp_path / "run", step_fn=lambda: 1, clip_low=0.2, clip_high=0.28):
        _, clip = loss_fn(lp, old, adv, mask)
    region = rldiag.open_run(tmp_path / "run").step_metrics()["clip/region"][0]
    assert clip > 0.05
    assert region == pytest.approx(float(clip), rel=1e-6)


def test_set_step_extras_and_an_existing_recorder(tmp_path):
    loss_fn = PolicyLossLike()
    lp, old, adv, mask, _ = inputs(3)
    entropy = torch.rand(lp.shape)
    with rldiag.Recorder(tmp_path / "run") as rec:
        handle = attach(loss_fn, rec, extras_fn=lambda: {"entropy": entropy, "group_ids": torch.arange(6) // 2})
        handle.set_step(9)
        loss_fn(lp, old, adv, mask)
        handle.close()
        loss_fn(lp, old, adv, mask)  # detached: not recorded
        rec.record(step=10, logprobs=lp.detach(), old_logprobs=old, advantages=adv, mask=mask)  # still open
    df = tokens(tmp_path / "run")
    assert df["step"].unique().sort().to_list() == [9, 10]
    step9 = df.filter(pl.col("step") == 9)
    np.testing.assert_array_equal(step9["entropy"].to_numpy(), entropy.numpy()[mask.numpy()])
    assert step9["group"].n_unique() == 3


def test_missing_mask_means_every_token(tmp_path):
    loss_fn = PolicyLossLike()
    lp, old, adv, _, _ = inputs(4)
    with attach(loss_fn, tmp_path / "run", step_fn=lambda: 0):
        loss_fn(lp, old, adv)
    assert len(tokens(tmp_path / "run")) == lp.numel()


def test_a_module_with_other_names_needs_a_mapping(tmp_path):
    class Renamed(nn.Module):
        def forward(self, new_lp, behaviour_lp, adv, mask=None):
            return (new_lp - behaviour_lp).mean()

    with pytest.raises(ValueError, match="arguments="):
        attach(Renamed(), tmp_path / "bad")
    lp, old, adv, mask, _ = inputs(5)
    module = Renamed()
    with attach(module, tmp_path / "run", step_fn=lambda: 2, arguments={
        "logprobs": "new_lp", "old_logprobs": "behaviour_lp", "advantages": "adv", "mask": "mask"}):
        module(lp, old, adv, mask)
        Renamed()(lp, old, adv, mask)  # another instance: not hooked
    df = tokens(tmp_path / "run")
    assert len(df) == int(mask.sum())
    np.testing.assert_array_equal(df["old_logp"].to_numpy(), old.numpy()[mask.numpy()])


def test_argument_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        attach(lambda x: x, "unused")
    with pytest.raises(ValueError, match="unknown recorder inputs"):
        attach(PolicyLossLike(), "unused", arguments={"logp": "log_probs"})
    with pytest.raises(TypeError, match="existing recorder"):
        attach(PolicyLossLike(), object(), clip_high=0.3)
