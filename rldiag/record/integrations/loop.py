"""Plain PyTorch loops: record a policy-gradient micro-batch straight from the logits.

A hand-written loop already has everything rldiag needs; :class:`rldiag.Recorder` takes it directly (see
``docs/examples/cleanrl_style_ppo.py``). :func:`logprobs_and_record` saves the usual extra pass: it gathers
the log-probs the loss needs (differentiable), computes the entropy over the full vocabulary from the same
logits (no gradient), records both with the rest of the batch, and returns the log-probs::

    logp = logprobs_and_record(rec, step=step, logits=logits, tokens=actions,
                               old_logprobs=old_logp, advantages=adv, mask=mask)
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)[mask].mean()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rldiag.record.tensors import entropy_from_logits, gather_logprobs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from rldiag.record.recorder import Recorder

__all__ = ["logprobs_and_record"]


def logprobs_and_record(
    recorder: Recorder,
    *,
    step: int,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **extras: Any,
) -> torch.Tensor:
    """Log-probs of ``tokens`` under ``logits`` ([B, T, V] -> [B, T], differentiable), recorded with entropy.

    ``extras`` go to :meth:`rldiag.Recorder.record` unchanged (``rollout_logprobs``, ``group_ids``,
    ``rewards``, ...); ``token_ids`` defaults to ``tokens``.
    """
    if logits.dim() != tokens.dim() + 1 or logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits must be [..., V] over tokens' shape: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}"
        )
    logp = gather_logprobs(logits, tokens)
    extras.setdefault("token_ids", tokens)
    recorder.record(
        step=step,
        logprobs=logp.detach(),
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        entropy=entropy_from_logits(logits.detach()),
        **extras,
    )
    return logp
