"""The OpenRLHF adaptor: against a module with the signature of OpenRLHF's ``PolicyLoss`` and, when
``openrlhf==0.11.2`` is installed (``--no-deps``), against OpenRLHF's own ``PolicyLoss`` (see the fixture).
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

    def forward(
        self,
        log_probs,
        old_log_probs,
        advantages,
        action_mask=None,
        rollout_log_probs=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
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
    assert df.group_by("step").len().sort("step")["len"].to_list() == [int(mask.sum() + mask2.sum()), int(mask2.sum())]
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
    with attach(
        module,
        tmp_path / "run",
        step_fn=lambda: 2,
        arguments={"logprobs": "new_lp", "old_logprobs": "behaviour_lp", "advantages": "adv", "mask": "mask"},
    ):
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


# --------------------------------------------------------------------------------------------------
# OpenRLHF's own PolicyLoss (openrlhf 0.11.2 installed with --no-deps)


@pytest.fixture
def openrlhf_loss(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``openrlhf.models.loss`` as OpenRLHF ships it: ``deepspeed`` stubbed, and the ``openrlhf.models`` package
    ``__init__`` (which imports the flash-attn model code) bypassed; loss.py and utils.py run unchanged."""
    import importlib
    import importlib.machinery
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed (pip install openrlhf==0.11.2 --no-deps)")
    models_dir = list(spec.submodule_search_locations)[0] + "/models"
    ds = types.ModuleType("deepspeed")
    ds.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    pkg = types.ModuleType("openrlhf.models")
    pkg.__path__ = [models_dir]  # type: ignore[attr-defined]
    pkg.__spec__ = importlib.machinery.ModuleSpec("openrlhf.models", None, is_package=True)
    monkeypatch.setitem(sys.modules, "openrlhf.models", pkg)
    for name in ("openrlhf.models.loss", "openrlhf.models.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("openrlhf.models.loss")


def test_real_policy_loss_metrics_equal_openrlhf_and_loss_unchanged(tmp_path, openrlhf_loss) -> None:
    loss_fn = openrlhf_loss.PolicyLoss(
        clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level="token", is_correction_threshold=(0.0, 100.0)
    )
    lp, old, adv, mask, rollout = inputs(1)
    rollout = rollout.clamp(max=0)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref = loss_fn(lp2, old, adv, action_mask=mask, rollout_log_probs=rollout)
    run = tmp_path / "run"
    with attach(loss_fn, run, clip_low=0.2, clip_high=0.28) as handle:
        handle.set_step(1)
        out = loss_fn(lp, old, adv, action_mask=mask, rollout_log_probs=rollout)
    out[0].backward()
    ref[0].backward()
    assert torch.equal(out[0].detach(), ref[0].detach()) and torch.equal(lp.grad, lp2.grad)
    _, clip_ratio, ppo_kl, vllm_kl, _ = ref
    m = rldiag.open_run(run).step_metrics().row(0, named=True)
    assert clip_ratio.item() > 0.05  # the comparison can fail: clipping happened
    assert m["clip/region"] == pytest.approx(clip_ratio.item(), abs=1e-6)
    assert m["kl/k1"] == pytest.approx(ppo_kl.item(), rel=1e-5)
    assert m["mismatch/k1"] == pytest.approx(vllm_kl.item(), rel=1e-4)


def test_attach_actor_counts_worker_steps(tmp_path, openrlhf_loss) -> None:
    """In OpenRLHF the worker's ppo_train(kl_ctl) runs once per global step and gets no step: count calls."""
    from rldiag.record.integrations.openrlhf import attach_actor

    class ActorPPOTrainerLike:  # the worker-side shape: actor_loss_fn, and ppo_train running micro-batches
        def __init__(self) -> None:
            self.actor_loss_fn = openrlhf_loss.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
            self.seed = 0

        def ppo_train(self, kl_ctl: float) -> dict:
            for _ in range(3):  # micro-batches of one step
                lp, old, adv, mask, _ = inputs(self.seed)
                self.seed += 1
                self.actor_loss_fn(lp, old, adv, action_mask=mask)
            return {"kl_ctl": kl_ctl}

    trainer = ActorPPOTrainerLike()
    handle = attach_actor(trainer, tmp_path / "run", first_step=5)  # a run resumed at step 5
    for _ in range(3):
        assert trainer.ppo_train(0.0) == {"kl_ctl": 0.0}
    handle.close()
    run = rldiag.open_run(tmp_path / "run")
    assert run.steps() == [5, 6, 7]
    assert run.tokens().collect().group_by("step").agg(pl.col("micro").n_unique())["micro"].to_list() == [3, 3, 3]
