"""OpenRLHF integration: record the arguments of OpenRLHF's ``PolicyLoss`` through a forward hook.

OpenRLHF's actor loss is an ``nn.Module`` (``openrlhf.models.loss.PolicyLoss``) called as
``actor_loss_fn(log_probs, old_log_probs, advantages, action_mask=..., rollout_log_probs=..., ...)``. A forward
hook (``with_kwargs=True``) hands those tensors to an :class:`rldiag.Recorder`; the module, its loss and its
gradient are untouched.

Where the step is. In OpenRLHF 0.11 the global step lives on the Ray driver: ``PPOTrainer.ppo_train(global_steps)``
calls ``PolicyModelActor.fit.remote(kl_ctl)`` on every actor worker, and the worker's
``ActorPPOTrainer.ppo_train(kl_ctl)`` (which owns ``actor_loss_fn`` and runs every micro-batch of that step)
receives no step at all; there is no ``trainer.global_step`` in the worker. So :func:`attach_actor` counts
``ppo_train`` calls in the worker: call *n* is step ``first_step + n - 1`` (pass the step a resumed run starts
from). Inside the actor worker, after its ``ActorPPOTrainer`` is built
(``PolicyModelActor.init_model_from_pretrained``)::

    from rldiag.record.integrations.openrlhf import attach_actor

    handle = attach_actor(self.trainer, "/shared/runs/exp1", rank=torch.distributed.get_rank(),
                          world_size=torch.distributed.get_world_size())

:func:`attach` hooks any module of that signature, with the step from ``step_fn`` or
:meth:`OpenRLHFRecorder.set_step`.

Tested against OpenRLHF's own ``PolicyLoss`` (``openrlhf==0.11.2`` installed with ``--no-deps``; its
``openrlhf.models.loss`` and ``openrlhf.models.utils`` loaded with ``deepspeed`` stubbed and the package's
``__init__``, which imports the flash-attn model code, bypassed).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rldiag.record.recorder import Recorder

__all__ = ["attach", "attach_actor", "OpenRLHFRecorder", "DEFAULT_ARGUMENTS"]

DEFAULT_ARGUMENTS: Mapping[str, str] = {
    "logprobs": "log_probs",
    "old_logprobs": "old_log_probs",
    "advantages": "advantages",
    "mask": "action_mask",
    "rollout_logprobs": "rollout_log_probs",
}
"""Recorder input -> name of the module's ``forward`` parameter that carries it (OpenRLHF's names)."""

_REQUIRED = ("logprobs", "old_logprobs", "advantages")


class OpenRLHFRecorder:
    """The handle :func:`attach` returns: owns the hook and, unless one was passed in, the recorder."""

    def __init__(
        self,
        module: torch.nn.Module,
        recorder: Recorder,
        *,
        owns_recorder: bool,
        step_fn: Callable[[], int] | None,
        extras_fn: Callable[[], Mapping[str, Any] | None] | None,
        arguments: Mapping[str, str],
    ) -> None:
        self.recorder = recorder
        self.step = 0
        """The step recorded when no ``step_fn`` was given; advance it with :meth:`set_step`."""
        self._owns = owns_recorder
        self._step_fn = step_fn
        self._extras_fn = extras_fn
        self._arguments = dict(arguments)
        self._signature = inspect.signature(module.forward)
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)
        self._closed = False

    def set_step(self, step: int) -> None:
        """Record the following calls under ``step`` (when no ``step_fn`` was given)."""
        self.step = int(step)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        inputs = {key: bound.get(name) for key, name in self._arguments.items()}
        if any(inputs[key] is None for key in _REQUIRED):
            missing = [self._arguments[k] for k in _REQUIRED if inputs[k] is None]
            raise TypeError(f"rldiag openrlhf hook: the policy loss was called without {missing}")
        mask = inputs.pop("mask")
        values = {k: (v.detach() if hasattr(v, "detach") else v) for k, v in inputs.items() if v is not None}
        if mask is None:
            import torch

            mask = torch.ones_like(values["logprobs"], dtype=torch.bool)
        if self._extras_fn is not None:
            for key, value in (self._extras_fn() or {}).items():
                if value is not None:
                    values[key] = value.detach() if hasattr(value, "detach") else value
        step = int(self._step_fn()) if self._step_fn is not None else self.step
        self.recorder.record(step=step, mask=mask.detach(), **values)

    def detach(self) -> None:
        """Remove the hook (the recorder stays open)."""
        self._handle.remove()

    def close(self) -> None:
        """Remove the hook and close the recorder if :func:`attach` created it; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self._owns:
            self.recorder.close()

    def __enter__(self) -> OpenRLHFRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def attach(
    policy_loss: torch.nn.Module,
    run: str | os.PathLike[str] | Recorder,
    *,
    step_fn: Callable[[], int] | None = None,
    extras_fn: Callable[[], Mapping[str, Any] | None] | None = None,
    arguments: Mapping[str, str] | None = None,
    **recorder_kwargs: Any,
) -> OpenRLHFRecorder:
    """Record every call of ``policy_loss`` (an ``nn.Module``) into ``run``.

    ``run`` is a run directory (a :class:`rldiag.Recorder` is created with ``recorder_kwargs``: ``clip_low``,
    ``clip_high``, ``config``, ``rank``, ``world_size``, ...) or an existing recorder. ``step_fn`` returns the
    trainer's global step at call time (otherwise use :meth:`OpenRLHFRecorder.set_step`). ``extras_fn``
    returns further recorder inputs for the current micro-batch, e.g. ``{"entropy": ..., "group_ids": ...}``
    (OpenRLHF computes entropy in the actor forward, not in the loss). ``arguments`` renames ``forward``
    parameters for a module whose names differ from :data:`DEFAULT_ARGUMENTS`.
    """
    if not hasattr(policy_loss, "register_forward_hook") or not hasattr(policy_loss, "forward"):
        raise TypeError(f"attach() needs the policy-loss nn.Module, got {type(policy_loss).__name__}")
    names = dict(DEFAULT_ARGUMENTS)
    if arguments:
        unknown = set(arguments) - set(DEFAULT_ARGUMENTS)
        if unknown:
            raise ValueError(f"unknown recorder inputs {sorted(unknown)}; known: {sorted(DEFAULT_ARGUMENTS)}")
        names.update(arguments)
    parameters = inspect.signature(policy_loss.forward).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [names[k] for k in _REQUIRED if names[k] not in parameters and not takes_var_kw]
    if missing:
        raise ValueError(
            f"{type(policy_loss).__name__}.forward{inspect.signature(policy_loss.forward)} has no parameter "
            f"{missing}; pass arguments={{'logprobs': ..., 'old_logprobs': ..., 'advantages': ...}}"
        )
    # optional inputs the module does not take are simply never recorded
    names = {k: v for k, v in names.items() if k in _REQUIRED or v in parameters or takes_var_kw}
    names.setdefault("mask", "action_mask")
    if step_fn is not None and not callable(step_fn):
        raise TypeError("step_fn must be a callable returning the trainer's global step")
    if isinstance(run, (str, os.PathLike)):
        from rldiag.record.recorder import Recorder

        recorder, owns = Recorder(run, **recorder_kwargs), True
    else:
        if recorder_kwargs:
            raise TypeError(f"recorder options {sorted(recorder_kwargs)} given with an existing recorder")
        recorder, owns = run, False
    return OpenRLHFRecorder(
        policy_loss, recorder, owns_recorder=owns, step_fn=step_fn, extras_fn=extras_fn, arguments=names
    )


def attach_actor(
    trainer: Any,  # OpenRLHF's ActorPPOTrainer (untyped; only actor_loss_fn and ppo_train are used)
    run: str | os.PathLike[str] | Recorder,
    *,
    first_step: int = 1,
    extras_fn: Callable[[], Mapping[str, Any] | None] | None = None,
    **recorder_kwargs: Any,
) -> OpenRLHFRecorder:
    """Record OpenRLHF's actor worker: hook ``trainer.actor_loss_fn`` and count steps in ``trainer.ppo_train``.

    ``trainer`` is the worker's ``ActorPPOTrainer`` (it has ``actor_loss_fn`` and ``ppo_train``). Every call of
    ``ppo_train`` is one global step of the driver (``PolicyModelActor.fit`` runs it once per step): the loss
    calls inside the *n*-th are recorded under ``first_step + n - 1``. ``clip_low`` / ``clip_high`` default to
    the loss module's ``clip_eps_low`` / ``clip_eps_high``. Other arguments as in :func:`attach`.
    """
    loss_fn = getattr(trainer, "actor_loss_fn", None)
    ppo_train = getattr(trainer, "ppo_train", None)
    if loss_fn is None or not callable(ppo_train):
        raise TypeError(
            f"attach_actor() needs OpenRLHF's ActorPPOTrainer (actor_loss_fn and ppo_train), "
            f"got {type(trainer).__name__}"
        )
    if isinstance(run, (str, os.PathLike)):
        recorder_kwargs.setdefault("clip_low", float(getattr(loss_fn, "clip_eps_low", 0.2)))
        recorder_kwargs.setdefault("clip_high", float(getattr(loss_fn, "clip_eps_high", 0.2)))
    handle = attach(loss_fn, run, extras_fn=extras_fn, **recorder_kwargs)
    calls = [0]

    def counted_ppo_train(*args: Any, **kwargs: Any) -> Any:
        handle.set_step(int(first_step) + calls[0])
        calls[0] += 1
        return ppo_train(*args, **kwargs)

    trainer.ppo_train = counted_ppo_train  # an instance attribute: the class is untouched
    return handle
