"""Synthetic runs for the dashboard tests, recorded through the real :class:`rldiag.Recorder`.

Random but structured inputs: the policy drifts away from the sampling policy over steps, entropy falls,
and one step (``SPIKE_STEP``) carries a few tokens with a huge log-ratio, so charts, downsampling and the
token explorer have something to find. Every optional input is recorded (rollout log-probs, versions,
groups, rewards, token ids, stages) unless ``full=False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPIKE_STEP = 7
SPIKE_LOGRATIO = 4.0
B, T = 8, 24
VOCAB = 50


def record_run(
    path: Path,
    *,
    steps: int = 12,
    start: int = 0,
    full: bool = True,
    seed: int = 0,
    close: bool = True,
    rec=None,
    token_ids_vocab: int = VOCAB,
    alerts: bool = False,
):
    """Record ``steps`` steps (two micro-batches each) into ``path``; returns the recorder if not closed.

    ``alerts=True`` runs rldiag's default rules online, so ``alerts.jsonl`` fills as on a real run.
    """
    import rldiag

    rng = np.random.default_rng(seed + start)
    if rec is None:
        rec = rldiag.Recorder(path, clip_low=0.2, clip_high=0.28, alerts=alerts or None)
    for step in range(start, start + steps):
        for micro in range(2):
            old = -rng.gamma(1.0, 0.8, size=(B, T)).astype(np.float32)
            drift = 0.02 + 0.01 * step
            logp = (old + rng.normal(0, drift, size=(B, T))).astype(np.float32)
            logp = np.minimum(logp, 0.0)
            if step == SPIKE_STEP and micro == 0:
                logp[1, 5] = max(old[1, 5] + SPIKE_LOGRATIO, old[1, 5])
                logp[1, 5] = min(logp[1, 5], 0.0)
                old[1, 5] = logp[1, 5] - SPIKE_LOGRATIO
            adv = rng.normal(0, 1, size=B).astype(np.float32)
            mask = np.ones((B, T), dtype=bool)
            mask[:, T - 1 - (np.arange(B) % 5)] = False
            kw = {}
            if full:
                kw = dict(
                    entropy=np.abs(rng.normal(2.0 / (1 + 0.1 * step), 0.5, size=(B, T))).astype(np.float32),
                    rollout_logprobs=np.minimum(old + rng.normal(0, 0.01, size=(B, T)), 0).astype(np.float32),
                    group_ids=np.repeat(np.arange(B // 4), 4) + 100 * micro,
                    rewards=rng.integers(0, 2, size=B).astype(np.float32),
                    token_ids=rng.integers(0, token_ids_vocab, size=(B, T)).astype(np.int64),
                    versions=np.full(B, max(step - 1, 0), dtype=np.int64),
                    stages=np.tile(np.arange(T) // 6, (B, 1)).astype(np.int64),
                )
            rec.record(step=step, logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, **kw)
    if close:
        rec.close()
        return None
    rec.flush()
    return rec
