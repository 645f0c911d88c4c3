"""verl integration: a registered policy loss that records what verl's actor hands to its loss.

verl looks policy losses up by name (``get_policy_loss_fn(config.policy_loss.loss_mode)``). Importing this
module registers one more, ``"rldiag"``, which records its inputs and then calls the loss verl would have
used (``"vanilla"`` unless ``RLDIAG_VERL_DELEGATE`` names another registered mode), returning that loss and
its metrics unchanged. verl imports the module in every worker when it is named in
``VERL_USE_EXTERNAL_MODULES``::

    export VERL_USE_EXTERNAL_MODULES=rldiag.record.integrations.verl
    export RLDIAG_RUN_DIR=/shared/runs/exp1
    python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.actor.policy_loss.loss_mode=rldiag \\
        actor_rollout_ref.actor.calculate_entropy=True

What is recorded, per micro-batch and data-parallel rank:

- from the policy-loss call: ``log_prob`` (pi_theta at gradient time), ``old_log_prob``, ``advantages`` and
  ``response_mask``; clip settings come from verl's own actor config (``clip_ratio_low``/``high``/``c``), so
  ``clip/region`` and ``clip/dual`` are the quantities verl logs as ``actor/pg_clipfrac`` and
  ``actor/pg_clipfrac_lower``;
- from the micro-batch verl's engine workers pass to the loss function (0.9 ``engine_workers`` path):
  ``entropy`` (when the actor computes it: ``calculate_entropy=True`` or ``entropy_coeff != 0``),
  ``rollout_log_probs`` (the inference engine's log-probs, ``rollout.calculate_log_probs``), ``ref_log_prob``,
  the response token ids, the sequence score (sum of ``token_level_scores``) and the GRPO group (``uid``);
- the step is verl's ``global_steps``, which the trainer sends to every actor worker through
  ``update_weights(global_steps=...)`` once per step (the update of step s follows the weight sync of s-1).

The worker hooks are small wrappers around four methods of ``verl.workers.engine_workers``
(``TrainingWorker.train_mini_batch`` / ``infer_batch`` / ``set_loss_fn`` and
``ActorRolloutRefWorker.update_weights``); they only note context and call the original. When that module
cannot be imported, the registered loss still records
the four core tensors; the step then comes from :func:`set_step`, or counts loss calls (with a warning).

Recording never changes the loss, its gradient or verl's metrics. Settings are read from the environment
because Ray workers receive nothing else: ``RLDIAG_RUN_DIR`` (required), ``RLDIAG_VERL_DELEGATE``
(default ``vanilla``), ``RLDIAG_RECORDER_CONFIG`` (JSON of :class:`rldiag.RecorderConfig` fields, e.g.
``{"token_sample_rate": 0.1}``; clip fields default to verl's). In-process users may call :func:`configure`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    import torch
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn, register_policy_loss
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "rldiag.record.integrations.verl needs verl and torch in the training environment "
        "(pip install verl); rldiag itself does not depend on them"
    ) from exc

from rldiag.config import RecorderConfig

if TYPE_CHECKING:
    from rldiag.record.recorder import Recorder

__all__ = [
    "LOSS_NAME",
    "ENV_RUN_DIR",
    "ENV_DELEGATE",
    "ENV_RECORDER_CONFIG",
    "configure",
    "set_step",
    "policy_loss",
    "install_worker_hooks",
    "get_recorder",
    "close",
]

logger = logging.getLogger(__name__)

LOSS_NAME = "rldiag"
"""The ``policy_loss.loss_mode`` that turns recording on."""
ENV_RUN_DIR = "RLDIAG_RUN_DIR"
ENV_DELEGATE = "RLDIAG_VERL_DELEGATE"
ENV_RECORDER_CONFIG = "RLDIAG_RECORDER_CONFIG"


# ---- settings and the per-process recorder -------------------------------------------------------------
@dataclass
class _State:
    run_dir: str | None = None
    delegate: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    recorder: Recorder | None = None
    owns_recorder: bool = False
    explicit_step: int | None = None
    trainer_step: int | None = None  # last global_steps verl sent with update_weights
    worker_updates: dict[int, int] = field(default_factory=dict)  # id(TrainingWorker) -> train_mini_batch calls
    loss_calls: int = 0
    warned: set[str] = field(default_factory=set)


_state = _State()
_lock = threading.Lock()
_local = threading.local()  # .worker: TrainingWorker in train_mini_batch; .micro: (model_output, data) in
# its loss function; .inferring: inside infer_batch


def configure(
    run_dir: str | os.PathLike[str] | None = None,
    *,
    delegate: str | None = None,
    config: dict[str, Any] | None = None,
    recorder: Recorder | None = None,
) -> None:
    """Set the run directory, the delegate loss and recorder settings from Python (instead of the env).

    ``recorder`` hands over an existing :class:`rldiag.Recorder` (its run directory and configuration win);
    otherwise one is created at the first recorded call, with the clip settings of verl's actor config
    unless ``config`` (a dict of :class:`rldiag.RecorderConfig` fields) sets them.
    """
    if delegate is not None:
        _check_delegate(delegate)
    with _lock:
        if run_dir is not None:
            _state.run_dir = os.fspath(run_dir)
        if delegate is not None:
            _state.delegate = delegate
        if config is not None:
            _state.config_overrides = _checked_overrides(config)
        if recorder is not None:
            _state.recorder, _state.owns_recorder = recorder, False


def set_step(step: int | None) -> None:
    """Record the following calls under ``step`` (for trainers that do not run verl's ``update_weights``).

    ``None`` returns to the automatic step.
    """
    _state.explicit_step = None if step is None else int(step)


def get_recorder() -> Recorder | None:
    """The recorder of this process, or ``None`` before the first recorded call."""
    return _state.recorder


def close() -> None:
    """Flush and close this process's recorder (also runs at exit); recording restarts on the next call."""
    with _lock:
        rec, owns = _state.recorder, _state.owns_recorder
        _state.recorder, _state.owns_recorder = None, False
    if rec is not None and owns:
        rec.close()


def _reset_for_tests() -> None:
    close()
    global _state
    _state = _State()
    _local.__dict__.clear()


def _delegate_name() -> str:
    return _state.delegate or os.environ.get(ENV_DELEGATE) or "vanilla"


def _check_delegate(name: str) -> None:
    if name == LOSS_NAME:
        raise ValueError(f"the rldiag loss cannot delegate to itself; set {ENV_DELEGATE} to a verl loss mode")
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(
            f"unknown verl loss mode {name!r} for {ENV_DELEGATE}; registered: {sorted(POLICY_LOSS_REGISTRY)}"
        )


def _checked_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    RecorderConfig.from_dict(overrides)  # validates the values now rather than at the first step
    unknown = set(overrides) - {f for f in RecorderConfig.__dataclass_fields__}
    if unknown:
        raise ValueError(f"unknown RecorderConfig fields {sorted(unknown)} in {ENV_RECORDER_CONFIG}")
    return dict(overrides)


def _env_overrides() -> dict[str, Any]:
    raw = os.environ.get(ENV_RECORDER_CONFIG)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_RECORDER_CONFIG} is not valid JSON ({exc}): {raw!r}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_RECORDER_CONFIG} must be a JSON object of RecorderConfig fields, got {raw!r}")
    return _checked_overrides(data)


def _recorder_config(verl_config: Any) -> RecorderConfig:
    """Clip settings from verl's actor config (the ones its loss uses), overridden by the user's."""
    values: dict[str, Any] = {"errors": "lenient"}  # a bad token must not stop a multi-day job
    if verl_config is not None:
        clip = _cfg_get(verl_config, "clip_ratio", None)
        low = _cfg_get(verl_config, "clip_ratio_low", None)
        high = _cfg_get(verl_config, "clip_ratio_high", None)
        low = clip if low is None else low
        high = clip if high is None else high
        if low is not None:
            values["eps_low"] = float(low)
        if high is not None:
            values["eps_high"] = float(high)
        values["dual_clip_c"] = float(_cfg_get(verl_config, "clip_ratio_c", 3.0))
    values.update(_env_overrides())
    values.update(_state.config_overrides)
    return RecorderConfig.from_dict(values)


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    getter = getattr(cfg, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(cfg, key, default)


def _dist_position() -> tuple[int, int, bool]:
    """(data-parallel rank, size, whether this process records) for the worker that runs the loss."""
    worker = getattr(_local, "worker", None)
    engine = getattr(worker, "engine", None)
    if engine is not None:
        try:
            return (
                int(engine.get_data_parallel_rank()),
                int(engine.get_data_parallel_size()),
                bool(engine.is_mp_src_rank_with_outputs()),
            )
        except Exception:  # engine without these methods: fall back to torch.distributed
            pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), True
    return 0, 1, True


def _get_or_create_recorder(verl_config: Any, rank: int, world_size: int) -> Recorder:
    with _lock:
        if _state.recorder is not None:
            return _state.recorder
        run_dir = _state.run_dir or os.environ.get(ENV_RUN_DIR)
        if not run_dir:
            raise RuntimeError(
                f"policy_loss.loss_mode={LOSS_NAME!r} needs a run directory: set {ENV_RUN_DIR} (forward it to the "
                f"Ray workers, see docs/integrations.md) or call rldiag.record.integrations.verl.configure(run_dir)"
            )
        from rldiag.record.recorder import Recorder

        recorder = Recorder(run_dir, config=_recorder_config(verl_config), rank=rank, world_size=world_size)
        _state.recorder, _state.owns_recorder = recorder, True
        return recorder


def _warn_once(key: str, message: str) -> None:
    if key not in _state.warned:
        _state.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- step ----------------------------------------------------------------------------------------------
def _current_step() -> int:
    if _state.explicit_step is not None:
        return _state.explicit_step
    if _state.trainer_step is not None:
        # verl syncs weights with the step just finished (or the step it resumed from) before each update
        return _state.trainer_step + 1
    worker = getattr(_local, "worker", None)
    if worker is not None:
        return _state.worker_updates.get(id(worker), 1)
    _warn_once(
        "step",
        "rldiag: no training step is known to the verl policy loss (verl's update_weights was not seen and "
        "set_step() was not called); each loss call is recorded as its own step",
    )
    return _state.loss_calls


# ---- the registered loss -------------------------------------------------------------------------------
@register_policy_loss(LOSS_NAME)
def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str | None = None,
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"rldiag"``: record the inputs, then return the delegate loss's result unchanged.

    ``loss_agg_mode`` is passed on only when given: without it the delegate's own default applies (gspo's
    ``seq-mean-token-mean``, not ``token-mean``)."""
    delegate = _delegate_name()
    _check_delegate(delegate)
    _state.loss_calls += 1
    if _should_record():
        # verl releases before the rollout-correction rework passed rollout_log_probs to the loss itself
        _record(old_log_prob, log_prob, advantages, response_mask, config, kwargs.get("rollout_log_probs"))
    if loss_agg_mode is not None:
        kwargs["loss_agg_mode"] = loss_agg_mode
    return get_policy_loss_fn(delegate)(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        config=config,
        rollout_is_weights=rollout_is_weights,
        **kwargs,
    )


def _should_record() -> bool:
    # verl's infer_batch runs the worker's loss function too (evaluation); only training passes are recorded.
    return not getattr(_local, "inferring", False)


def _record(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any,
    rollout_log_probs: torch.Tensor | None,
) -> None:
    rank, world_size, records = _dist_position()
    if not records:  # a sequence/tensor-parallel peer that sees the same tokens as its source rank
        return
    rec = _get_or_create_recorder(config, rank, world_size)
    extras = _micro_batch_extras(tuple(log_prob.shape))
    if "rollout_logprobs" not in extras and isinstance(rollout_log_probs, torch.Tensor):
        if tuple(rollout_log_probs.shape) == tuple(log_prob.shape):
            extras["rollout_logprobs"] = rollout_log_probs.detach()
    rec.record(
        step=_current_step(),
        logprobs=log_prob.detach(),
        old_logprobs=old_log_prob.detach(),
        advantages=advantages.detach(),
        mask=response_mask.detach(),
        **extras,
    )


def _micro_batch_extras(shape: tuple[int, ...]) -> dict[str, Any]:
    """Entropy, rollout/ref log-probs, token ids, scores and groups of the micro-batch, when verl has them."""
    micro = getattr(_local, "micro", None)
    if micro is None:
        return {}
    model_output, data = micro
    out: dict[str, Any] = {}
    try:
        entropy = model_output.get("entropy") if hasattr(model_output, "get") else None
        if entropy is not None:
            from verl.workers.utils.padding import no_padding_2_padding

            out["entropy"] = no_padding_2_padding(entropy, data).detach()
        padded = _padded(data, ("rollout_log_probs", "ref_log_prob", "responses", "token_level_scores"))
        if "rollout_log_probs" in padded:
            out["rollout_logprobs"] = padded["rollout_log_probs"].detach()
        if "ref_log_prob" in padded:
            out["ref_logprobs"] = padded["ref_log_prob"].detach()
        if "responses" in padded:
            out["token_ids"] = padded["responses"]
        if "token_level_scores" in padded and padded["token_level_scores"].dim() == 2:
            out["rewards"] = padded["token_level_scores"].detach().sum(dim=-1)
        uids = _non_tensor_list(data, "uid")
        if uids is not None and len(uids) == shape[0]:
            out["group_ids"] = torch.tensor([_stable_id(u) for u in uids], dtype=torch.int64)
    except Exception as exc:  # never let an unexpected verl layout stop training
        _warn_once(
            "extras",
            f"rldiag: could not read extra columns from verl's micro-batch ({exc!r}); "
            "recording log-probs, advantages and mask only",
        )
        return {}
    for key in [k for k, v in out.items() if k not in ("rewards", "group_ids") and tuple(v.shape) != shape]:
        _warn_once(
            f"shape-{key}",
            f"rldiag: verl's {key} has shape {tuple(out[key].shape)}, log_prob {shape}; {key} is not recorded",
        )
        del out[key]
    for key in [k for k in ("rewards", "group_ids") if k in out and out[k].shape[0] != shape[0]]:
        del out[key]
    return out


def _padded(data: Any, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        if key not in data.keys():
            continue
        value = data.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_nested:
            value = value.to_padded_tensor(0)
        out[key] = value
    return out


def _non_tensor_list(data: Any, key: str) -> list[Any] | None:
    if key not in data.keys():
        return None
    from verl.utils import tensordict_utils as tu

    value = tu.get(data, key)
    return list(value) if isinstance(value, (list, tuple)) else None


def _stable_id(value: Any) -> int:
    """A group id that is the same on every rank and in every process (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# ---- hooks into verl's engine workers -------------------------------------------------------------------
_hooks_installed = False


def install_worker_hooks() -> bool:
    """Wrap verl's engine-worker methods that carry the step and the micro-batch; idempotent.

    Returns whether the hooks are in place (``False`` when ``verl.workers.engine_workers`` cannot be imported,
    e.g. without verl's serving dependencies; the loss then records the core tensors only).
    """
    global _hooks_installed
    if _hooks_installed:
        return True
    try:
        from verl.workers import engine_workers as ew
    except Exception as exc:  # ImportError, or a version whose import fails on this machine
        missing = getattr(exc, "name", None)
        what = f"the module {missing!r} is missing" if missing else f"{type(exc).__name__}: {exc}"
        _warn_once(
            "hooks",
            f"rldiag: verl's worker hooks are inactive: verl.workers.engine_workers cannot be "
            f"imported ({what}); the policy loss records log-probs, advantages and mask only, "
            "without entropy, rollout log-probs, groups or verl's global step (install the "
            "missing module, or call rldiag.record.integrations.verl.set_step)",
        )
        return False
    _wrap(ew.TrainingWorker, "train_mini_batch", _train_mini_batch_wrapper)
    _wrap(ew.TrainingWorker, "infer_batch", _infer_batch_wrapper)
    _wrap(ew.TrainingWorker, "set_loss_fn", _set_loss_fn_wrapper)
    _wrap(ew.ActorRolloutRefWorker, "update_weights", _update_weights_wrapper)
    _hooks_installed = True
    return True


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "__rldiag_wrapped__", False):
        return
    wrapper = functools.wraps(original)(make(original))  # keeps verl's @register dispatch attributes
    wrapper.__rldiag_wrapped__ = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def _train_mini_batch_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    # One call is one optimizer step's update (all mini-batches and epochs of it).
    def train_mini_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        _state.worker_updates[id(self)] = _state.worker_updates.get(id(self), 0) + 1
        previous = getattr(_local, "worker", None)
        _local.worker = self
        try:
            out = original(self, *args, **kwargs)
        finally:
            _local.worker = previous
        return _with_headline_metrics(out)

    return train_mini_batch


def _with_headline_metrics(output: Any) -> Any:
    """Add ``rldiag/<metric>`` of the step just trained to the metrics verl's worker returns to its trainer.

    verl's trainer reduces the workers' metric lists (a mean over data-parallel ranks) and logs them with its
    own trackers, so W&B / TensorBoard / the console show rldiag's headline metrics beside ``actor/*``. The
    values are this rank's exact statistics of the step (waiting once per step for the recorder's writer).
    """
    rec = _state.recorder
    if output is None or rec is None:
        return output
    try:
        from verl.utils import tensordict_utils as tu

        from rldiag.metrics.registry import HEADLINE

        metrics = tu.get(output, "metrics")
        if not isinstance(metrics, dict):
            return output
        local = rec.local_metrics(wait=True)
        extra = {
            f"rldiag/{name}": [float(local[name])]
            for name in HEADLINE
            if name in local and local[name] == local[name] and abs(local[name]) != float("inf")
        }
        tu.assign_non_tensor(output, metrics={**metrics, **extra})
    except Exception as exc:  # never break verl's update over a log line
        _warn_once("headline", f"rldiag: could not add rldiag/* metrics to verl's metrics ({exc!r})")
    return output


def _infer_batch_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def infer_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        previous = getattr(_local, "inferring", False)
        _local.inferring = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.inferring = previous

    return infer_batch


def _set_loss_fn_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def set_loss_fn(self: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, _expose_micro_batch(loss_fn) if loss_fn is not None else None, *args, **kwargs)

    return set_loss_fn


def _expose_micro_batch(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """The worker's loss function, made to publish its micro-batch to the policy loss it calls."""
    if getattr(loss_fn, "__rldiag_wrapped__", False):
        return loss_fn

    def loss_function(*args: Any, **kwargs: Any) -> Any:
        # verl's engines call loss_function(model_output=..., data=..., dp_group=...); accept positions too
        positional = args[-2:] if len(args) >= 2 else (None, None)
        model_output = kwargs.get("model_output", positional[0])
        data = kwargs.get("data", positional[1])
        previous = getattr(_local, "micro", None)
        _local.micro = (model_output, data) if model_output is not None and data is not None else None
        try:
            return loss_fn(*args, **kwargs)
        finally:
            _local.micro = previous

    loss_function.__rldiag_wrapped__ = True  # type: ignore[attr-defined]
    return loss_function


def _update_weights_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    async def update_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
        global_steps = kwargs.get("global_steps", args[0] if args else None)
        if global_steps is not None:
            _state.trainer_step = int(global_steps)
        return await original(self, *args, **kwargs)

    return update_weights


install_worker_hooks()
