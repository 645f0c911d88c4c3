"""TRL integration: record what ``trl.GRPOTrainer`` computes, at gradient time, without touching its loss.

Two ways in, same behaviour::

    from rldiag.record.integrations.trl import RLDiagGRPOTrainer, attach

    trainer = RLDiagGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...,
                                rldiag_run_dir="runs/exp1")          # a drop-in for trl.GRPOTrainer
    # or, for a trainer you already built (any GRPOTrainer subclass):
    recorder = attach(trainer, "runs/exp1", alerts=True)
    trainer.train()

For every micro-batch the loss sees, the recorder gets the per-token log-probs of the policy being trained
(``logp``), the behaviour log-probs TRL's ratio uses (``old_logp``: TRL's ``old_per_token_logps``, or
``logp.detach()`` when TRL skips that pass because ``num_iterations == 1``), the inference engine's sampling
log-probs (vLLM) and the reference log-probs (``beta != 0``) when TRL has them, the full-vocabulary entropies,
the advantages, the completion mask (times the tool mask), the completion token ids, and per sequence its
prompt group (the ``num_generations`` completions of one prompt share it), its reward (the weighted sum of the
reward functions, as TRL logs it) and the step that generated it (``version``, for staleness).

``step`` is the optimizer step the gradient belongs to, numbered as TRL numbers its logs: the value
``trainer.state.global_step`` takes once that update is done (1 for the first update). rldiag's step ``s``
and TRL's logged step ``s`` therefore describe the same update.

The headline metrics of the latest step are added to the trainer's own logs as ``rldiag/<metric>``, so
TensorBoard, W&B and ``trainer.state.log_history`` show them next to TRL's. When the recorder's alerts stop
training (``alerts=AlertConfig(stop_on=("critical",))``) the trainer stops at the end of the step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "rldiag.record.integrations.trl needs trl, transformers and torch: pip install 'rldiag[demo]'"
    ) from exc

from rldiag.record.recorder import Recorder

if TYPE_CHECKING:
    # The mixin only ever runs combined with a GRPOTrainer (RLDiagGRPOTrainer, attach()): type-check it as one,
    # so its uses of TRL's attributes and its super() calls are checked against trl's own annotations.
    _TrainerBase = GRPOTrainer
else:
    _TrainerBase = object

log = logging.getLogger("rldiag")

__all__ = ["DEFAULT_LOG_METRICS", "RLDiagGRPOTrainer", "attach", "detach_recorder"]

DEFAULT_LOG_METRICS: tuple[str, ...] = (
    "entropy/mean",
    "entropy/low_frac",
    "clip/region",
    "ratio/max",
    "ratio/logabs_p999",
    "ratio/m2",
    "ess/token",
    "kl/k3",
    "balance/pos_share",
    "group/nonzero_frac",
)
"""Metrics added to the trainer's logs as ``rldiag/<name>`` (NaN values are left out)."""

_GROUP_KEY = "rldiag_group_ids"
_REWARD_KEY = "rldiag_rewards"
_VERSION_KEY = "rldiag_versions"


class _StopOnAlert(TrainerCallback):
    """Stops training at the end of a step once the recorder's alerts asked for it."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.stopped_at: int | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.recorder.should_stop and self.stopped_at is None:
            self.stopped_at = int(state.global_step)
            log.warning("rldiag: a critical alert asked to stop training; stopping after step %d", state.global_step)
            control.should_training_stop = True
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # Publish what was recorded so a dashboard or `rldiag summarize` sees the whole run; the recorder stays
        # open in case train() is called again (it closes at exit).
        if not getattr(self.recorder, "_closed", False):
            self.recorder.flush()
        return control


class _RLDiagMixin(_TrainerBase):
    """The recording hooks; combined with a GRPOTrainer class (see :class:`RLDiagGRPOTrainer`)."""

    rldiag_recorder: Recorder | None = None
    rldiag_log_metrics: tuple[str, ...] = DEFAULT_LOG_METRICS
    _rldiag_capture: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] | None = None
    _rldiag_rewards_per_func: torch.Tensor | None = None
    _rldiag_generations: int = 0

    def _rldiag_setup(self, recorder: Recorder, log_metrics: Sequence[str] | None) -> None:
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"):
            log.warning("rldiag: unknown TRL loss_type %r; recording anyway", self.loss_type)
        self.rldiag_recorder = recorder
        # the alert evaluator runs in the background and may fire between two micro-batches of a step; TRL
        # cannot stop inside a step, so the stop comes from _StopOnAlert at the step's end and record() must
        # not raise in the middle of the loss
        recorder.raise_on_stop = False
        self.rldiag_log_metrics = tuple(DEFAULT_LOG_METRICS if log_metrics is None else log_metrics)
        self._rldiag_capture = None
        self._rldiag_rewards_per_func = None
        self._rldiag_stop = _StopOnAlert(recorder)
        self.add_callback(self._rldiag_stop)

    # ---- rollout side: remember per-sequence reward, group and version -----------------------------
    def _calculate_rewards(
        self,
        inputs: list[dict[str, Any]],
        prompts: list[Any],
        completions: list[Any],
        completion_ids_list: list[list[int]],
    ) -> torch.Tensor:
        rewards_per_func: torch.Tensor = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rldiag_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(
        self, inputs: list[dict[str, torch.Tensor | Any]]
    ) -> dict[str, torch.Tensor | Any]:
        self._rldiag_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        if self.rldiag_recorder is None or not self._rldiag_training():
            return output
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        device = output["completion_ids"].device
        # TRL's sampler repeats each prompt num_generations times consecutively across all processes, and its
        # advantages are computed over rewards.view(-1, num_generations): global row i belongs to prompt group
        # i // num_generations. Groups are numbered uniquely over the run by counting generation batches (every
        # rank generates in lockstep, so the count agrees across ranks).
        n_global = n_local * self.accelerator.num_processes
        num_generations = self.num_generations
        if num_generations is None:  # GRPOConfig defaults it to 8; None cannot group completions by prompt
            raise ValueError("rldiag needs the trainer's num_generations to group completions by prompt; it is None")
        groups_per_batch = max(n_global // num_generations, 1)
        version = int(self.state.global_step) + 1  # the first update this rollout feeds (staleness 0 there)
        rows = torch.arange(start, start + n_local, device=device)
        output[_GROUP_KEY] = rows // num_generations + self._rldiag_generations * groups_per_batch
        self._rldiag_generations += 1
        output[_VERSION_KEY] = torch.full((n_local,), version, dtype=torch.long, device=device)
        rpf = self._rldiag_rewards_per_func
        if rpf is not None and rpf.dim() == 2 and rpf.size(0) == n_global:
            weights = self.reward_weights.to(rpf.device).unsqueeze(0)
            rewards = (rpf * weights).nansum(dim=1)
            rewards[torch.isnan(rpf).all(dim=1)] = float("nan")  # unscorable: as TRL excludes them
            output[_REWARD_KEY] = rewards[start : start + n_local].to(device=device, dtype=torch.float32)
        self._rldiag_rewards_per_func = None
        return output

    # ---- gradient side -----------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        # Inside _compute_loss the one call with compute_entropy=True is the policy forward of the loss.
        if self._rldiag_capture is not None and kwargs.get("compute_entropy"):
            self._rldiag_capture.append(result)
        return result

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor | Any]) -> torch.Tensor:
        if self.rldiag_recorder is None or not self._rldiag_training():
            loss: torch.Tensor = super()._compute_loss(model, inputs)
            return loss
        captured: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        self._rldiag_capture = captured
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._rldiag_capture = None
        if captured:
            logps, entropies, _ = captured[-1]
            self._rldiag_record(inputs, logps, entropies)
        return loss

    def _rldiag_record(
        self, inputs: dict[str, torch.Tensor | Any], logps: torch.Tensor, entropies: torch.Tensor | None
    ) -> None:
        logps = logps.detach()
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        # TRL skips the old-policy pass when num_iterations == 1 (and generation aligns with the optimizer step)
        # and uses logp.detach() as pi_old: the ratio is then exactly 1, and so it is here.
        old = logps if old is None else old.detach()
        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.size(1) == 1:
            advantages = advantages.squeeze(1)
        assert self.rldiag_recorder is not None
        self.rldiag_recorder.record(
            step=int(self.state.global_step) + 1,
            logprobs=logps,
            old_logprobs=old,
            advantages=advantages.detach(),
            mask=mask.bool(),
            entropy=None if entropies is None else entropies.detach(),
            rollout_logprobs=inputs.get("sampling_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps"),
            group_ids=inputs.get(_GROUP_KEY),
            rewards=inputs.get(_REWARD_KEY),
            token_ids=inputs["completion_ids"],
            versions=inputs.get(_VERSION_KEY),
        )

    # ---- logging -----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        rec = self.rldiag_recorder
        if rec is not None and self._rldiag_training() and self.rldiag_log_metrics and "loss" in logs:
            # The step just finished is global_step (rldiag numbers steps as TRL logs them).
            metrics = rec.local_metrics(int(self.state.global_step), wait=True)
            for name in self.rldiag_log_metrics:
                value = metrics.get(name)
                if value is not None and math.isfinite(value):
                    logs[f"rldiag/{name}"] = value
        super().log(logs, start_time)

    def _rldiag_training(self) -> bool:
        """Whether the model is in training mode (TRL's own test for a training step, not evaluation)."""
        model = self.model
        return model is not None and model.training


class RLDiagGRPOTrainer(_RLDiagMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` that records rldiag diagnostics; its loss and training are unchanged.

    Takes every ``GRPOTrainer`` argument, plus:

    Args:
        rldiag_run_dir: run directory (default ``<args.output_dir>/rldiag``).
        rldiag_recorder: an existing :class:`~rldiag.Recorder` to use instead of creating one.
        rldiag_log_metrics: metric names added to the trainer's logs (default :data:`DEFAULT_LOG_METRICS`).
        rldiag_options: keyword arguments of :class:`~rldiag.Recorder` (``alerts=``, ``token_sample_rate=``...);
            ``clip_low`` / ``clip_high`` default to the trainer's ``epsilon`` / ``epsilon_high``.

    Example::

        trainer = RLDiagGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                                    train_dataset=ds, rldiag_run_dir="runs/exp1",
                                    rldiag_options={"alerts": True})
        trainer.train()
        rldiag.open_run("runs/exp1").step_metrics()
    """

    def __init__(
        self,
        *args: Any,
        rldiag_run_dir: str | os.PathLike[str] | None = None,
        rldiag_recorder: Recorder | None = None,
        rldiag_log_metrics: Sequence[str] | None = None,
        rldiag_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rldiag_recorder is None:
            run_dir = rldiag_run_dir if rldiag_run_dir is not None else _default_run_dir(self)
            rldiag_recorder = _make_recorder(self, run_dir, dict(rldiag_options or {}))
        elif rldiag_run_dir is not None or rldiag_options:
            raise TypeError("give either rldiag_recorder or rldiag_run_dir/rldiag_options, not both")
        self._rldiag_setup(rldiag_recorder, rldiag_log_metrics)


def _default_run_dir(trainer: GRPOTrainer) -> Path:
    """``<args.output_dir>/rldiag`` (TrainingArguments sets ``output_dir`` when it is left out)."""
    output_dir = trainer.args.output_dir
    if output_dir is None:
        raise ValueError("no rldiag run directory given and the trainer's args.output_dir is None; pass one")
    return Path(output_dir) / "rldiag"


def _make_recorder(trainer: GRPOTrainer, run_dir: str | os.PathLike[str], options: dict[str, Any]) -> Recorder:
    options.setdefault("clip_low", float(trainer.epsilon_low))
    options.setdefault("clip_high", float(trainer.epsilon_high))
    if trainer.loss_type == "cispo" or trainer.importance_sampling_level != "token":
        log.info(
            "rldiag: TRL loss_type=%s importance_sampling_level=%s: rldiag's clip/* are the token-level "
            "PPO clip fractions, not this loss's",
            trainer.loss_type,
            trainer.importance_sampling_level,
        )
    return Recorder(run_dir, **options)


_SUBCLASSES: dict[type, type] = {}


def attach(
    trainer: GRPOTrainer,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    recorder: Recorder | None = None,
    log_metrics: Sequence[str] | None = None,
    **recorder_kwargs: Any,
) -> Recorder:
    """Make an existing ``GRPOTrainer`` (or subclass) record into ``run_dir``; returns the recorder.

    ``recorder_kwargs`` go to :class:`~rldiag.Recorder` (``alerts=True``, ``token_sample_rate=0.1``...);
    ``clip_low`` / ``clip_high`` default to the trainer's. The trainer's class is swapped for a subclass that
    adds the recording hooks and keeps the class's name, so TRL's metric names (profiling included:
    ``GRPOTrainer.*``) do not change; nothing else about it changes.

    Example::

        trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
        rec = attach(trainer, "runs/exp1", alerts=True)
        trainer.train()
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"attach() needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    if isinstance(trainer, _RLDiagMixin) and trainer.rldiag_recorder is not None:
        raise ValueError("this trainer already records with rldiag (its rldiag_recorder is set)")
    if recorder is None:
        if run_dir is None:
            run_dir = _default_run_dir(trainer)
        recorder = _make_recorder(trainer, run_dir, dict(recorder_kwargs))
    elif run_dir is not None or recorder_kwargs:
        raise TypeError("give either recorder= or run_dir/recorder keyword arguments, not both")
    cls = type(trainer)
    if not issubclass(cls, _RLDiagMixin):
        sub = _SUBCLASSES.get(cls)
        if sub is None:
            # Same name, qualname and module as the trainer's class: TRL names its profiling metrics and log
            # lines after type(trainer).__name__ ("GRPOTrainer.compute_loss"), which must not change.
            sub = type(
                cls.__name__, (_RLDiagMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            )
            _SUBCLASSES[cls] = sub
        trainer.__class__ = sub
    assert isinstance(trainer, _RLDiagMixin)  # the class swap above made it one
    trainer._rldiag_setup(recorder, log_metrics)
    return recorder


def detach_recorder(trainer: GRPOTrainer) -> Recorder | None:
    """Stop recording (the trainer keeps working); returns the recorder, which the caller may close."""
    if not isinstance(trainer, _RLDiagMixin) or trainer.rldiag_recorder is None:
        return None
    rec = trainer.rldiag_recorder
    trainer.rldiag_recorder = None
    cb = getattr(trainer, "_rldiag_stop", None)
    if cb is not None:
        trainer.remove_callback(cb)
    return rec
