"""The TRL integration against a real ``trl.GRPOTrainer`` training a tiny Llama built from a config.

TRL's own logged metrics are the independent reference: ``clip_ratio/low_mean``, ``high_mean``,
``region_mean`` and ``entropy`` are token means over the micro-batch that TRL computes from the same tensors
rldiag records. With one micro-batch per optimizer step and ``logging_steps=1`` they must equal rldiag's
``clip/low``, ``clip/high``, ``clip/region`` and ``entropy/mean`` of the same step. With gradient
accumulation TRL logs the mean of its per-micro-batch means; rldiag's step metric is the exact token mean,
and the mean of rldiag's per-micro-batch metrics is what equals TRL's number.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import polars as pl  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

import rldiag  # noqa: E402
from rldiag.analysis.aggregate import metrics_of  # noqa: E402
from rldiag.demo.model import build_model, build_tokenizer  # noqa: E402
from rldiag.record.integrations.trl import RLDiagGRPOTrainer, attach, detach_recorder  # noqa: E402

pytestmark = pytest.mark.slow

ALPHABET = "abcd"
PAIRS = [
    ("clip/low", "clip_ratio/low_mean"),
    ("clip/high", "clip_ratio/high_mean"),
    ("clip/region", "clip_ratio/region_mean"),
    ("entropy/mean", "entropy"),
]


def _reward(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """Copy the 3 letters before '=': one third per letter in place."""
    return [sum(a == b for a, b in zip(c, p[:-1])) / 3 for p, c in zip(prompts, completions)]


def _trainer(
    tmp_path: Path,
    *,
    cls: type = trl.GRPOTrainer,
    max_steps: int = 6,
    num_iterations: int = 3,
    grad_accum: int = 1,
    lr: float = 5e-2,
    beta: float = 0.0,
    config: dict | None = None,
    **kwargs: object,
) -> trl.GRPOTrainer:
    tok = build_tokenizer(ALPHABET + "=")
    rng = random.Random(0)
    prompts = ["".join(rng.choice(ALPHABET) for _ in range(3)) + "=" for _ in range(64)]
    settings: dict[str, object] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=max_steps,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        beta=beta,
        num_iterations=num_iterations,
        learning_rate=lr,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="constant",
    )
    args = trl.GRPOConfig(**{**settings, **(config or {})})
    model = build_model(tok, seed=0)
    if beta != 0.0:  # TRL loads the reference model from the policy's path: give it a local one
        model.save_pretrained(tmp_path / "base")
        model = type(model).from_pretrained(tmp_path / "base")
    trainer = cls(
        model=model,
        reward_funcs=_reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        **kwargs,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def _logged(trainer: trl.GRPOTrainer) -> dict[int, dict[str, float]]:
    return {int(h["step"]): h for h in trainer.state.log_history if "entropy" in h}


@pytest.mark.parametrize("how", ["subclass", "attach"])
def test_step_metrics_equal_trl_logged_metrics(tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    if how == "subclass":
        trainer = _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir)
    else:
        trainer = _trainer(tmp_path)
        attach(trainer, run_dir)
    trainer.train()
    logged = _logged(trainer)
    m = rldiag.open_run(run_dir).step_metrics()
    assert m["step"].to_list() == sorted(logged) == list(range(1, 7))  # rldiag step s == TRL logged step s
    for row in m.iter_rows(named=True):
        h = logged[row["step"]]
        for ours, theirs in PAIRS:
            assert row[ours] == pytest.approx(h[theirs], abs=1e-5), (row["step"], ours, theirs)
    # The comparison must be able to fail: clipping happened (num_iterations=3, lr 5e-2), both signs.
    assert m["clip/region"].max() > 0.05
    assert m["clip/low"].max() > 0 and m["clip/high"].max() > 0
    # Steps that reuse a rollout (staleness > 0) are off-policy; the first use of a rollout is on-policy.
    fresh = m.filter(pl.col("staleness/mean") == 0)
    assert fresh.height == 2 and (fresh["ratio/max"] - 1).abs().max() < 1e-5
    # Rewards, groups: as TRL logged them at the generation steps.
    for row in fresh.iter_rows(named=True):
        h = logged[row["step"]]
        assert row["reward/mean"] == pytest.approx(h["reward"], abs=1e-6)
        assert 1 - row["group/nonzero_frac"] == pytest.approx(h["frac_reward_zero_std"], abs=1e-6)
    # The headline metrics went into TRL's own logs (what TensorBoard / W&B receive).
    for row in m.iter_rows(named=True):
        h = logged[row["step"]]
        assert h["rldiag/clip/region"] == pytest.approx(row["clip/region"], abs=1e-9)
        assert h["rldiag/entropy/mean"] == pytest.approx(row["entropy/mean"], abs=1e-9)


def test_gradient_accumulation_trl_averages_micro_batch_means(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir, grad_accum=2, max_steps=6)
    trainer.train()
    logged = _logged(trainer)
    run = rldiag.open_run(run_dir)
    per_micro = metrics_of(run.stats_table(), by=("step", "micro"), names=[a for a, _ in PAIRS])
    assert per_micro.group_by("step").len()["len"].to_list() == [2] * 6
    mean_of_means = per_micro.group_by("step").agg(pl.col(a for a, _ in PAIRS).mean()).sort("step")
    for row in mean_of_means.iter_rows(named=True):
        h = logged[row["step"]]
        for ours, theirs in PAIRS:
            assert row[ours] == pytest.approx(h[theirs], abs=1e-5), (row["step"], ours)
    # rldiag's step metric is the exact token mean over both micro-batches, which is not TRL's mean of means
    # when the micro-batches hold different numbers of tokens.
    exact = run.step_metrics().sort("step")
    diff = (exact["entropy/mean"] - mean_of_means["entropy/mean"]).abs().max()
    assert diff > 1e-5
    tokens = run.tokens().group_by("step").agg(pl.col("entropy").mean()).sort("step").collect()
    np.testing.assert_allclose(exact["entropy/mean"].to_numpy(), tokens["entropy"].to_numpy(), rtol=1e-5)


def test_groups_rewards_and_advantages_stay_aligned(tmp_path: Path) -> None:
    """TRL shuffles the rollout batch; each sequence's group and reward must still give its advantage."""
    run_dir = tmp_path / "run"
    trainer = _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir, max_steps=3, num_iterations=1)
    trainer.train()
    seqs = (
        rldiag.open_run(run_dir)
        .tokens()
        .group_by("step", "micro", "seq")
        .agg(
            pl.col("group").first(),
            pl.col("reward").first(),
            pl.col("adv").first(),
            pl.col("version").first(),
            pl.col("logp").len().alias("n"),
        )
        .collect()
    )
    assert seqs.height == 3 * 8
    sizes = seqs.group_by("step", "group").len()
    assert sizes["len"].to_list() == [4] * sizes.height  # num_generations completions per prompt group
    assert seqs["group"].n_unique() == 3 * 2  # unique over the run
    g = seqs.with_columns(
        mean=pl.col("reward").mean().over("step", "group"), std=pl.col("reward").std().over("step", "group")
    )
    expected = ((g["reward"] - g["mean"]) / (g["std"] + 1e-4)).to_numpy()
    np.testing.assert_allclose(g["adv"].to_numpy(), expected, atol=1e-4)
    assert (seqs["version"] == seqs["step"]).all()  # num_iterations=1: every rollout is fresh


def test_num_iterations_one_uses_logp_as_old(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir, max_steps=2, num_iterations=1)
    trainer.train()
    t = rldiag.open_run(run_dir).tokens().collect()
    assert t.height > 0 and (t["logp"] == t["old_logp"]).all()
    m = rldiag.open_run(run_dir).step_metrics()
    assert (m["clip/region"] == 0).all() and (m["kl/k3"].abs() < 1e-12).all()


def test_recording_does_not_change_training(tmp_path: Path) -> None:
    plain = _trainer(tmp_path / "a", max_steps=4)
    plain.train()
    recorded = _trainer(tmp_path / "b", cls=RLDiagGRPOTrainer, rldiag_run_dir=tmp_path / "run", max_steps=4)
    recorded.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, recorded)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for p, q in zip(plain.model.parameters(), recorded.model.parameters()):
        assert torch.equal(p, q)


def test_a_job_resumed_from_a_checkpoint_supersedes_the_steps_after_it(tmp_path: Path) -> None:
    """Preempted after step 4 with its last checkpoint at step 3, the job resumes from it with TRL's
    ``resume_from_checkpoint``: rldiag numbers the resumed steps as TRL does, marks the restart, and counts step 4
    once, from the resumed attempt (the first attempt's step 4 stays on disk, superseded)."""
    run_dir = tmp_path / "run"
    saving = {"save_strategy": "steps", "save_steps": 3}
    _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir, max_steps=4, config=saving).train()
    assert rldiag.open_run(run_dir).steps() == [1, 2, 3, 4]
    resumed = _trainer(tmp_path, cls=RLDiagGRPOTrainer, rldiag_run_dir=run_dir, max_steps=6, config=saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    run = rldiag.open_run(run_dir)
    assert run.steps() == [1, 2, 3, 4, 5, 6] and run.resume.problems == [] and run.resume.gaps == []
    assert [r["step"] for r in run.resume.restarts] == [4]
    assert [(s["from_step"], s["to_step"]) for s in run.resume.superseded] == [(4, 4)]
    tokens = run.tokens().collect()
    assert tokens.height == tokens.unique(["step", "micro", "seq", "pos"]).height  # step 4 once, not both attempts'
    assert tokens.filter(pl.col("step") == 4)["seq"].n_unique() == 8
    logged = _logged(resumed)
    m = run.step_metrics()
    for row in m.filter(pl.col("step") >= 4).iter_rows(named=True):  # the resumed attempt's numbers
        for ours, theirs in PAIRS:
            assert row[ours] == pytest.approx(logged[row["step"]][theirs], abs=1e-5), (row["step"], ours)


def test_critical_alert_stops_training(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'include_defaults = false\n[rules.always]\nseverity = "critical"\nmetric = "tokens/count"\n'
        'op = ">"\nthreshold = 0\nsummary = "test rule fired at step {step}"\n'
    )
    from rldiag.alerts import AlertConfig

    trainer = _trainer(
        tmp_path,
        cls=RLDiagGRPOTrainer,
        rldiag_run_dir=tmp_path / "run",
        max_steps=40,
        rldiag_options={"alerts": AlertConfig(rules=str(rules), console=False, stop_on=("critical",))},
    )
    trainer.train()
    assert trainer.rldiag_recorder.should_stop
    assert trainer.state.global_step < 40
    assert (tmp_path / "run" / "alerts.jsonl").read_text().count("always") >= 1


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="GRPOTrainer"):
        attach(object(), tmp_path / "run")  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_steps=1)
    attach(trainer, tmp_path / "run")
    with pytest.raises(ValueError, match="already records"):
        attach(trainer, tmp_path / "run2")
    rec = detach_recorder(trainer)
    assert rec is not None
    trainer.train()  # still trains, records nothing more
    rec.close()
    assert rldiag.open_run(tmp_path / "run").steps() == []


def test_reference_kl_equals_trl_kl(tmp_path: Path) -> None:
    """With beta != 0 TRL scores a reference model; rldiag's kl/ref_k3 is TRL's logged `kl`.

    TRL 1.x multiplies each token's k3 by its ratio r by default (``use_bias_correction_kl=True``), which is
    then a different number on reused rollouts; with the correction off the two are the same estimator.
    """
    run_dir = tmp_path / "run"
    trainer = _trainer(
        tmp_path,
        cls=RLDiagGRPOTrainer,
        rldiag_run_dir=run_dir,
        max_steps=4,
        beta=0.04,
        config={"use_bias_correction_kl": False},
    )
    trainer.train()
    logged = _logged(trainer)
    m = rldiag.open_run(run_dir).step_metrics()
    assert m.height == 4
    for row in m.iter_rows(named=True):
        assert row["kl/ref_k3"] == pytest.approx(logged[row["step"]]["kl"], abs=1e-6)
    assert m["kl/ref_k3"].max() > 1e-4  # the policy moved away from the reference


def test_attach_keeps_trl_metric_names(tmp_path: Path) -> None:
    """TRL names profiling metrics after type(trainer).__name__: attach() must leave them GRPOTrainer.*"""
    from trl.extras.profiling import profiling_context

    trainer = _trainer(tmp_path, max_steps=1)
    attach(trainer, tmp_path / "run")
    assert type(trainer).__name__ == "GRPOTrainer" and type(trainer).__qualname__ == "GRPOTrainer"
    assert profiling_context(trainer, "compute_loss").name == "GRPOTrainer.compute_loss"

    class MyTrainer(trl.GRPOTrainer):
        pass

    mine = _trainer(tmp_path / "b", cls=MyTrainer, max_steps=1)
    attach(mine, tmp_path / "run2")
    assert profiling_context(mine, "x").name == "MyTrainer.x" and isinstance(mine, MyTrainer)
    trainer.rldiag_recorder.close()  # type: ignore[attr-defined]
    mine.rldiag_recorder.close()  # type: ignore[attr-defined]
