"""Plain PyTorch loops: the ``logprobs_and_record`` helper and the CleanRL-style example in docs/examples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")

import rldiag  # noqa: E402
from rldiag.record.integrations.loop import logprobs_and_record  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "cleanrl_style_ppo.py"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the example pins one thread for determinism
    yield
    torch.set_num_threads(threads)


def load_example():
    spec = importlib.util.spec_from_file_location("cleanrl_style_ppo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_logprobs_and_record_returns_differentiable_logprobs_and_records_entropy(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    tokens = torch.randint(11, (3, 5), generator=g)
    old = torch.log_softmax(logits.detach() + 0.1, -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    with rldiag.Recorder(tmp_path / "run") as rec:
        logp = logprobs_and_record(
            rec,
            step=2,
            logits=logits,
            tokens=tokens,
            old_logprobs=old,
            advantages=adv,
            mask=mask,
            group_ids=torch.tensor([0, 0, 1]),
        )
    logp.sum().backward()
    assert logits.grad is not None
    p = torch.softmax(logits.detach().double(), -1)
    want_entropy = -(p * p.log()).sum(-1)
    want_logp = torch.log_softmax(logits.detach().double(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp.detach().double(), want_logp, rtol=1e-6, atol=1e-6)

    df = rldiag.open_run(tmp_path / "run").tokens().collect().sort(["seq", "pos"])
    m = mask.numpy()
    np.testing.assert_allclose(df["entropy"].to_numpy(), want_entropy.numpy()[m], rtol=1e-5)
    np.testing.assert_allclose(df["logp"].to_numpy(), want_logp.numpy()[m], rtol=1e-5)
    np.testing.assert_array_equal(df["token_id"].to_numpy(), tokens.numpy()[m])
    assert df["group"].to_list() == [0] * 3 + [0] * 5 + [1] * 5


def test_logprobs_and_record_checks_shapes(tmp_path):
    with rldiag.Recorder(tmp_path / "run") as rec, pytest.raises(ValueError, match="tokens"):
        logprobs_and_record(
            rec,
            step=0,
            logits=torch.zeros(2, 4, 7),
            tokens=torch.zeros(2, 5, dtype=torch.long),
            old_logprobs=torch.zeros(2, 4),
            advantages=torch.zeros(2),
            mask=None,
        )


def test_cleanrl_style_example_trains_and_records(tmp_path):
    example = load_example()
    cfg = example.Config(run_dir=str(tmp_path / "run"), steps=6)
    run = rldiag.open_run(example.main(cfg))
    metrics = run.step_metrics()
    assert run.steps() == list(range(1, 7))
    # every minibatch of every epoch is recorded: epochs x all tokens per step
    per_step = run.tokens().group_by("step").len().collect().sort("step")["len"].to_list()
    assert per_step == [cfg.update_epochs * cfg.prompts * cfg.group_size * cfg.seq_len] * 6
    # reusing each batch for several epochs moves the ratio: the clip engages, as in real PPO
    assert (metrics["clip/region"] > 0).all()
    assert (metrics["kl/k3"] > 0).all()
    assert metrics["group/nonzero_frac"].min() > 0
    # rewards recorded are the task's: fraction of tokens equal to the prompt, in [0, 1]
    assert metrics["reward/mean"].is_between(0, 1).all()


def test_cleanrl_style_example_is_deterministic(tmp_path):
    example = load_example()
    a = rldiag.open_run(example.main(example.Config(run_dir=str(tmp_path / "a"), steps=3))).step_metrics()
    b = rldiag.open_run(example.main(example.Config(run_dir=str(tmp_path / "b"), steps=3))).step_metrics()
    assert a.equals(b)
    c = rldiag.open_run(example.main(example.Config(run_dir=str(tmp_path / "c"), steps=3, seed=2))).step_metrics()
    assert not a.select(pl.col("ratio/mean")).equals(c.select(pl.col("ratio/mean")))
