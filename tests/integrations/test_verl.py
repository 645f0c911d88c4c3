"""The verl integration, against verl's own code (verl 0.9.1 installed with --no-deps; see .ci/run).

What runs for real: verl's policy-loss registry and losses, verl's ``ppo_loss`` (the worker's loss function),
its padding helpers, ``DataProto``/TensorDict batches as the trainer builds them, and -- when
``verl.workers.engine_workers`` imports (it needs fastapi and uvicorn) -- verl's ``TrainingWorker``
``train_mini_batch`` / ``infer_batch`` / ``set_loss_fn`` and ``ActorRolloutRefWorker.update_weights`` with the
rldiag hooks. Only the model engine is a stand-in: it splits mini-batches into micro-batches the way verl's
engines do without dynamic batch size and hands the loss function model outputs built from known tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl.trainer.ppo.core_algos")

import polars as pl  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

import rldiag  # noqa: E402
from rldiag.record.integrations import verl as rv  # noqa: E402

try:
    from verl.workers import engine_workers as ew
except Exception:  # pragma: no cover - needs fastapi + uvicorn
    ew = None
needs_engine_workers = pytest.mark.skipif(ew is None, reason="verl.workers.engine_workers needs fastapi, uvicorn")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    for var in (rv.ENV_RUN_DIR, rv.ENV_DELEGATE, rv.ENV_RECORDER_CONFIG):
        monkeypatch.delenv(var, raising=False)
    rv._reset_for_tests()
    yield
    rv._reset_for_tests()


def actor_config(loss_mode: str = rv.LOSS_NAME, **kw) -> ActorConfig:
    args = dict(
        strategy="fsdp",
        rollout_n=2,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    args.update(kw)
    return ActorConfig(**args)


def random_inputs(seed: int, b: int = 8, t: int = 16):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    lp = (old + 0.3 * torch.randn(b, t, generator=g)).clamp(max=0).requires_grad_(True)
    adv = torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return old, lp, adv, mask


def read_tokens(run_dir) -> pl.DataFrame:
    return rldiag.open_run(run_dir).tokens().collect().sort(["step", "micro", "seq", "pos"])


# ---- registration and delegation ------------------------------------------------------------------------
def test_loss_is_registered_under_rldiag():
    assert core_algos.get_policy_loss_fn("rldiag") is rv.policy_loss


def test_delegate_cannot_be_unknown_or_itself():
    with pytest.raises(ValueError, match="registered"):
        rv.configure(delegate="no-such-loss")
    with pytest.raises(ValueError, match="itself"):
        rv.configure(delegate="rldiag")


@pytest.mark.parametrize("delegate", ["vanilla", "gspo", "clip_cov", "cispo"])
def test_returns_the_delegate_loss_metrics_and_gradient_unchanged(tmp_path, delegate):
    rv.configure(tmp_path / "run", delegate=delegate)
    rv.set_step(1)
    cfg = actor_config()
    old, lp, adv, mask = random_inputs(0)
    lp2 = lp.detach().clone().requires_grad_(True)

    torch.manual_seed(0)  # clip_cov picks its tokens at random
    loss, metrics = rv.policy_loss(old, lp, adv, mask, "token-mean", cfg)
    torch.manual_seed(0)
    ref_loss, ref_metrics = core_algos.get_policy_loss_fn(delegate)(old, lp2, adv, mask, "token-mean", cfg)
    loss.backward()
    ref_loss.backward()

    assert torch.equal(loss.detach(), ref_loss.detach())
    assert metrics == ref_metrics
    assert torch.equal(lp.grad, lp2.grad)


def test_records_the_tensors_verl_passes(tmp_path):
    rv.configure(tmp_path / "run")
    rv.set_step(5)
    cfg = actor_config()
    old, lp, adv, mask = random_inputs(1)
    rv.policy_loss(old, lp, adv, mask, "token-mean", cfg)
    rec = rv.get_recorder()
    assert rec.config.eps_low == pytest.approx(0.2) and rec.config.eps_high == pytest.approx(0.28)
    rv.close()

    df = read_tokens(tmp_path / "run")
    m = mask.numpy()
    assert df["step"].unique().to_list() == [5]
    assert len(df) == int(m.sum())
    np.testing.assert_array_equal(df["logp"].to_numpy(), lp.detach().numpy()[m])
    np.testing.assert_array_equal(df["old_logp"].to_numpy(), old.numpy()[m])
    np.testing.assert_array_equal(df["adv"].to_numpy(), adv.numpy()[m])


def test_rollout_log_probs_passed_to_the_loss_are_recorded(tmp_path):
    """Older verl releases hand rollout_log_probs to the policy loss; they reach the delegate and the run."""
    rv.configure(tmp_path / "run")
    rv.set_step(1)
    seen = {}

    @core_algos.register_policy_loss("test_spy_rollout")
    def spy(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_log_probs=None,
        **kwargs,
    ):
        seen["rollout"] = rollout_log_probs
        return log_prob.sum(), {}

    rv.configure(delegate="test_spy_rollout")
    old, lp, adv, mask = random_inputs(6)
    rollout = old - 0.01
    rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config(), rollout_log_probs=rollout)
    rv.close()
    del core_algos.POLICY_LOSS_REGISTRY["test_spy_rollout"]
    assert seen["rollout"] is rollout
    df = read_tokens(tmp_path / "run")
    np.testing.assert_array_equal(df["rollout_logp"].to_numpy(), rollout.numpy()[mask.numpy()])


def test_run_dir_is_required_with_a_message(tmp_path):
    old, lp, adv, mask = random_inputs(2)
    with pytest.raises(RuntimeError, match=rv.ENV_RUN_DIR):
        rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config())


def test_settings_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(rv.ENV_RUN_DIR, str(tmp_path / "envrun"))
    monkeypatch.setenv(rv.ENV_DELEGATE, "gspo")
    monkeypatch.setenv(rv.ENV_RECORDER_CONFIG, '{"tis_cap": 4.0, "eps_high": 0.5}')
    rv.set_step(1)
    old, lp, adv, mask = random_inputs(3)
    cfg = actor_config()
    loss, _ = rv.policy_loss(old, lp, adv, mask, "token-mean", cfg)
    assert torch.equal(loss, core_algos.get_policy_loss_fn("gspo")(old, lp, adv, mask, "token-mean", cfg)[0])
    rec = rv.get_recorder()
    assert rec.run_dir == tmp_path / "envrun"
    assert (rec.config.tis_cap, rec.config.eps_high, rec.config.eps_low) == (4.0, 0.5, 0.2)


def test_bad_recorder_config_json_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(rv.ENV_RUN_DIR, str(tmp_path / "r"))
    monkeypatch.setenv(rv.ENV_RECORDER_CONFIG, '{"eps_hihg": 0.3}')
    old, lp, adv, mask = random_inputs(4)
    with pytest.raises(ValueError, match="eps_hihg"):
        rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config())


def test_without_a_known_step_each_call_is_a_step_with_a_warning(tmp_path):
    rv.configure(tmp_path / "run")
    old, lp, adv, mask = random_inputs(5)
    with pytest.warns(RuntimeWarning, match="set_step"):
        rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config())
    rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config())
    rv.close()
    assert rldiag.open_run(tmp_path / "run").steps() == [1, 2]


# ---- a verl batch, as the trainer builds it -------------------------------------------------------------
def verl_batch(seed: int, b: int = 8, p: int = 5, t: int = 7, rollout: bool = True):
    """A padded DataProto -> TensorDict in verl's no-padding layout, plus the tensors a model would produce."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, p + 1, (b,), generator=g)
    resp_lens = torch.randint(1, t + 1, (b,), generator=g)
    prompts = torch.zeros(b, p, dtype=torch.long)
    responses = torch.zeros(b, t, dtype=torch.long)
    attn = torch.zeros(b, p + t, dtype=torch.long)
    for i in range(b):
        pl_, rl_ = int(prompt_lens[i]), int(resp_lens[i])
        prompts[i, p - pl_ :] = torch.randint(1, 50, (pl_,), generator=g)
        responses[i, :rl_] = torch.randint(1, 50, (rl_,), generator=g)
        attn[i, p - pl_ : p + rl_] = 1
    response_mask = attn[:, p:].clone()
    old = -torch.rand(b, t, generator=g) * 2
    tensors = dict(
        input_ids=torch.cat([prompts, responses], 1),
        attention_mask=attn,
        position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
        prompts=prompts,
        responses=responses,
        response_mask=response_mask,
        old_log_probs=old,
        advantages=torch.randn(b, t, generator=g),
        token_level_scores=torch.zeros(b, t).scatter_(1, (resp_lens - 1)[:, None], torch.rand(b, 1, generator=g)),
        # what the stand-in engine's model returns for this batch (unknown keys are ignored by verl's loss)
        test_log_probs=(old + 0.2 * torch.randn(b, t, generator=g)).clamp(max=0),
        test_entropy=torch.rand(b, t, generator=g) * 3,
    )
    if rollout:
        tensors["rollout_log_probs"] = (old + 0.05 * torch.randn(b, t, generator=g)).clamp(max=0)
    uids = np.array([f"prompt-{i // 2}" for i in range(b)], dtype=object)
    td = left_right_2_no_padding(DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids}).to_tensordict())
    return td, tensors


def model_output_for(data) -> dict:
    """Nested full-sequence outputs whose response slice (verl's no_padding_2_padding) is test_log_probs."""
    attn = data["attention_mask"]
    p = data["prompts"].shape[1]
    values = {"log_probs": [], "entropy": []}
    for i in range(attn.shape[0]):
        seq_len = int(attn[i].sum())
        resp_len = int(attn[i, p:].sum())
        for key, src in (("log_probs", "test_log_probs"), ("entropy", "test_entropy")):
            full = torch.zeros(seq_len)
            full[seq_len - resp_len - 1 : seq_len - 1] = data[src][i, :resp_len]  # logits at j predict token j+1
            values[key].append(full)
    return {k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in values.items()}


def with_batch_info(td):
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return td


def test_model_output_helper_matches_verl_padding():
    td, tensors = verl_batch(0)
    out = model_output_for(td)
    mask = tensors["response_mask"].bool()
    torch.testing.assert_close(no_padding_2_padding(out["log_probs"], td)[mask], tensors["test_log_probs"][mask])


def test_ppo_loss_micro_batch_extras_are_recorded(tmp_path):
    """verl's real ppo_loss, wrapped as set_loss_fn wraps it: entropy, rollout log-probs, ids, groups."""
    rv.configure(tmp_path / "run")
    rv.set_step(3)
    td, tensors = verl_batch(1)
    cfg = actor_config()
    loss_fn = rv._expose_micro_batch(lambda model_output, data, dp_group=None: ppo_loss(cfg, model_output, data))
    loss, metrics = loss_fn(model_output=model_output_for(td), data=with_batch_info(td))
    ref_loss, _ = ppo_loss(actor_config("vanilla"), model_output_for(td), td)
    assert torch.equal(loss, ref_loss)
    rv.close()

    df = read_tokens(tmp_path / "run")
    m = tensors["response_mask"].bool().numpy()
    assert len(df) == int(m.sum())
    for col, key in (
        ("logp", "test_log_probs"),
        ("old_logp", "old_log_probs"),
        ("adv", "advantages"),
        ("entropy", "test_entropy"),
        ("rollout_logp", "rollout_log_probs"),
    ):
        np.testing.assert_allclose(df[col].to_numpy(), tensors[key].numpy()[m], rtol=0, atol=0, err_msg=col)
    np.testing.assert_array_equal(df["token_id"].to_numpy(), tensors["responses"].numpy()[m])
    seq_reward = tensors["token_level_scores"].sum(-1).numpy()
    np.testing.assert_allclose(df["reward"].to_numpy(), np.repeat(seq_reward, m.sum(1)), rtol=1e-7)
    groups = df.group_by("seq").agg(pl.col("group").first()).sort("seq")["group"].to_list()
    assert groups[0] == groups[1] != groups[2] == groups[3]  # uid prompt-0, prompt-0, prompt-1, ...
    assert groups[0] == rv._stable_id("prompt-0")
    assert df["ref_logp"].null_count() == len(df)  # no reference policy in this batch


def test_extras_with_a_shape_verl_did_not_promise_are_dropped(tmp_path):
    rv.configure(tmp_path / "run")
    rv.set_step(1)
    td, _ = verl_batch(2)
    rv._local.micro = ({"entropy": torch.zeros(3)}, td)  # an entropy verl cannot pad to the response
    try:
        old, lp, adv, mask = (
            torch.zeros(8, 7),
            torch.zeros(8, 7),
            torch.zeros(8, 7),
            torch.ones(8, 7, dtype=torch.bool),
        )
        with pytest.warns(RuntimeWarning, match="could not read"):
            rv.policy_loss(old, lp, adv, mask, "token-mean", actor_config())
    finally:
        rv._local.micro = None
    rv.close()
    assert read_tokens(tmp_path / "run")["entropy"].null_count() == 8 * 7


# ---- verl's engine workers with the hooks ---------------------------------------------------------------
class StandInEngine:
    """The part of verl's FSDP engine train_mini_batch/train_batch/infer_batch touch, without a model."""

    def __init__(self, micro_batch_size: int):
        self.micro_batch_size = micro_batch_size
        self.loss_calls = []

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_size(self):
        return 1

    def get_data_parallel_group(self):
        return None

    def is_mp_src_rank_with_outputs(self):
        return True

    def lr_scheduler_step(self):
        return 1e-6

    def train_mode(self, **kw):
        return contextlib.nullcontext()

    eval_mode = train_mode

    def _run(self, data, loss_function):
        outputs = []
        for micro in tu.chunk_tensordict(data, len(data) // self.micro_batch_size):
            tu.assign_non_tensor(micro, dp_size=1, batch_num_tokens=None, global_batch_size=None)
            loss, metrics = loss_function(model_output=model_output_for(micro), data=micro, dp_group=None)
            self.loss_calls.append(float(loss))
            outputs.append(metrics)
        return {"loss": self.loss_calls[-len(outputs) :], "model_output": {}, "metrics": {}}

    def train_batch(self, data, loss_function):
        return self._run(data, loss_function)

    def infer_batch(self, data, loss_function):
        return self._run(data, loss_function) if loss_function is not None else {}


def stand_in_worker(cfg, micro_batch_size=2):
    worker = types.SimpleNamespace(
        engine=StandInEngine(micro_batch_size),
        engine_config=types.SimpleNamespace(
            forward_only=False,
            use_dynamic_bsz=False,
            max_token_len_per_gpu=None,
            micro_batch_size_per_gpu=micro_batch_size,
            use_fused_kernels=False,
            infer_max_token_len_per_gpu=None,
            infer_micro_batch_size_per_gpu=micro_batch_size,
        ),
        model_config={},
        profiler=types.SimpleNamespace(
            step=lambda: None,
            rank=0,
            check_enable=lambda: False,
            check_this_step=lambda: False,
            check_this_rank=lambda: False,
        ),
        loss_fn=None,
        _postprocess_output=lambda output, **kw: tu.get_tensordict({}, {"metrics": output["metrics"]}),
    )
    # verl's real methods, bound to the stand-in (the class attributes carry the rldiag hooks)
    for name in ("train_batch", "train_mini_batch", "infer_batch", "set_loss_fn"):
        setattr(worker, name, types.MethodType(getattr(ew.TrainingWorker, name), worker))
    worker.set_loss_fn(lambda model_output, data, dp_group=None: ppo_loss(cfg, model_output, data))
    return worker


def update_batch(seed, mini_batch_size=4, epochs=2):
    td, tensors = verl_batch(seed)
    del td["input_ids"]  # the mini-batch loop would all-gather token counts over a process group
    tu.assign_non_tensor(
        td, mini_batch_size=mini_batch_size, epochs=epochs, seed=1, dataloader_kwargs={"shuffle": False}
    )
    return td, tensors


@needs_engine_workers
def test_hooks_are_installed_on_verl_workers_and_keep_dispatch_attributes():
    from verl.single_controller.base.decorator import MAGIC_ATTR

    assert rv.install_worker_hooks()
    for cls, name in (
        (ew.TrainingWorker, "train_mini_batch"),
        (ew.TrainingWorker, "infer_batch"),
        (ew.TrainingWorker, "set_loss_fn"),
        (ew.ActorRolloutRefWorker, "update_weights"),
    ):
        method = getattr(cls, name)
        assert method.__rldiag_wrapped__
        assert getattr(method, MAGIC_ATTR)["dispatch_mode"] is not None
    assert asyncio.iscoroutinefunction(ew.ActorRolloutRefWorker.update_weights)


@needs_engine_workers
def test_update_actor_through_verl_worker_records_every_micro_batch_under_the_trainer_step(tmp_path):
    rv.configure(tmp_path / "run")
    cfg = actor_config()
    worker = stand_in_worker(cfg)

    class Stop(Exception):
        pass

    class NoConfig:
        def __getattr__(self, name):
            raise Stop(name)

    # the trainer syncs weights with global_steps=6 after step 6; the next update is step 7
    with pytest.raises(Stop):
        asyncio.run(ew.ActorRolloutRefWorker.update_weights(NoConfig(), global_steps=6))
    td, tensors = update_batch(3)
    worker.train_mini_batch(td)
    rv.close()

    df = read_tokens(tmp_path / "run")
    m = tensors["response_mask"].bool().numpy()
    assert df["step"].unique().to_list() == [7]
    # 8 sequences, mini-batches of 4, 2 epochs, micro-batches of 2: 8 loss calls, every token twice
    assert df["micro"].n_unique() == 8 == len(worker.engine.loss_calls)
    assert len(df) == 2 * int(m.sum())
    once = df.filter(pl.col("micro") < 4).sort(["micro", "seq", "pos"])
    np.testing.assert_array_equal(once["entropy"].to_numpy(), tensors["test_entropy"].numpy()[m])
    np.testing.assert_array_equal(once["rollout_logp"].to_numpy(), tensors["rollout_log_probs"].numpy()[m])


@needs_engine_workers
def test_without_update_weights_steps_count_updates(tmp_path):
    rv.configure(tmp_path / "run")
    worker = stand_in_worker(actor_config())
    for seed in (4, 5, 6):
        worker.train_mini_batch(update_batch(seed, epochs=1)[0])
    rv.close()
    assert rldiag.open_run(tmp_path / "run").steps() == [1, 2, 3]


@needs_engine_workers
def test_evaluation_passes_are_not_recorded(tmp_path):
    rv.configure(tmp_path / "run")
    rv.set_step(1)
    worker = stand_in_worker(actor_config())
    td, _ = verl_batch(7)
    worker.infer_batch(td)
    assert worker.engine.loss_calls, "the stand-in engine ran the loss function"
    assert rv.get_recorder() is None


@pytest.mark.slow
@needs_engine_workers
def test_loading_through_verl_use_external_modules(tmp_path):
    """The documented switch: a fresh interpreter with VERL_USE_EXTERNAL_MODULES registers and hooks."""
    import os
    import subprocess
    import sys

    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "from verl.workers import engine_workers as ew\n"
        "assert 'rldiag' in POLICY_LOSS_REGISTRY\n"
        "assert ew.TrainingWorker.train_mini_batch.__rldiag_wrapped__\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rldiag.record.integrations.verl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ---- the launch lines of docs/integrations.md ---------------------------------------------------------------
DOCUMENTED_OVERRIDES = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=rldiag",
    "actor_rollout_ref.actor.calculate_entropy=True",
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=rldiag.record.integrations.verl",
    "+ray_kwargs.ray_init.runtime_env.env_vars.RLDIAG_RUN_DIR=/shared/runs/exp1",
]


def test_documented_overrides_reach_the_ray_workers_environment():
    """verl's own Hydra config accepts the documented overrides and main_ppo's runtime env carries them."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None
    ):
        cfg = compose(config_name="ppo_trainer", overrides=DOCUMENTED_OVERRIDES)
    # what verl.trainer.main_ppo.run_ppo passes to ray.init
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.ray_init.runtime_env)
    env_vars = OmegaConf.to_container(runtime_env)["env_vars"]
    assert env_vars["VERL_USE_EXTERNAL_MODULES"] == "rldiag.record.integrations.verl"
    assert env_vars["RLDIAG_RUN_DIR"] == "/shared/runs/exp1"
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == "rldiag" and actor.calculate_entropy is True
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True  # rollout log-probs are on by default


def test_without_loss_agg_mode_the_delegate_default_applies(tmp_path):
    """verl's gspo aggregates seq-mean-token-mean by default; the rldiag loss must not force token-mean."""
    rv.configure(tmp_path / "run", delegate="gspo")
    rv.set_step(1)
    cfg = actor_config()
    old, lp, adv, mask = random_inputs(3)
    loss, _ = rv.policy_loss(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, config=cfg)
    gspo = core_algos.get_policy_loss_fn("gspo")
    ref, _ = gspo(old_log_prob=old, log_prob=lp.detach(), advantages=adv, response_mask=mask, config=cfg)
    token_mean, _ = gspo(old, lp.detach(), adv, mask, "token-mean", cfg)
    assert torch.equal(loss.detach(), ref) and not torch.allclose(ref, token_mean)


def test_hooks_that_cannot_load_warn_once_naming_the_module():
    """verl's engine workers need uvicorn: without it (in a fresh process) the hooks warn once, naming it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, warnings\n"
        "sys.modules['uvicorn'] = None  # an import of uvicorn fails as if it were not installed\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from rldiag.record.integrations import verl as rv\n"
        "    assert rv.install_worker_hooks() is False\n"
        "mine = [str(x.message) for x in w if 'rldiag' in str(x.message)]\n"
        "print(len(mine)); print(mine[0] if mine else '')\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    count, message = out.stdout.strip().splitlines()[-2:]
    assert count == "1"
    assert "worker hooks are inactive" in message and "'uvicorn'" in message


@needs_engine_workers
def test_headline_metrics_reach_verls_metric_dict(tmp_path):
    """train_mini_batch's output carries rldiag/* (what verl's trainer reduces and hands to its trackers)."""
    from rldiag.metrics.registry import HEADLINE

    rv.configure(tmp_path / "run")
    worker = stand_in_worker(actor_config())
    out = worker.train_mini_batch(update_batch(4, epochs=1)[0])
    rv.close()
    metrics = tu.get(out, "metrics")
    ours = {k[len("rldiag/") :]: v for k, v in metrics.items() if k.startswith("rldiag/")}
    row = rldiag.open_run(tmp_path / "run").step_metrics().row(0, named=True)
    assert "clip/region" in ours and "kl/k3" in ours and set(ours) <= set(HEADLINE)
    for name, value in ours.items():
        assert value == [pytest.approx(row[name], rel=1e-12, abs=1e-15)], name
