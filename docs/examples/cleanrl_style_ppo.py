"""A CleanRL-style, single-file PPO/GRPO loop on a toy sequence task, recorded with rldiag.

Read it top to bottom: a config dataclass, a tiny autoregressive policy, rollouts, group-normalised
advantages, a clipped surrogate over several epochs of minibatches, and one ``rec.record(...)`` call per
minibatch with the tensors the loss already has. Runs on a CPU in a few seconds::

    python docs/examples/cleanrl_style_ppo.py --steps 30 --run-dir runs/toy-ppo
    rldiag summarize runs/toy-ppo

The task: each prompt is a target token k; the policy writes ``seq_len`` tokens and is rewarded with the
fraction of them equal to k (a verifiable reward). ``update_epochs > 1`` reuses each batch, so the ratio
leaves 1 and the clip engages: the numbers rldiag reports are real training dynamics, not written in.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import rldiag


@dataclass
class Config:
    run_dir: str = "runs/cleanrl-style-ppo"
    """where rldiag writes the run"""
    seed: int = 1
    """seed of torch's generator (the run is deterministic: it uses one thread)"""
    steps: int = 30
    """training iterations; each samples one batch and is one rldiag step"""
    vocab: int = 8
    """number of tokens the policy can write (and of prompts)"""
    seq_len: int = 12
    """tokens per response"""
    prompts: int = 16
    """prompts per batch"""
    group_size: int = 4
    """responses per prompt (GRPO group)"""
    hidden: int = 32
    """width of the policy's hidden layer"""
    lr: float = 3e-2
    """Adam learning rate (large on purpose: the ratio must move for clipping to show)"""
    update_epochs: int = 4
    """passes over each batch (PPO epochs)"""
    minibatches: int = 2
    """minibatches per epoch"""
    clip_eps: float = 0.2
    """PPO clip epsilon (both sides); also given to the recorder"""
    ent_coef: float = 0.0
    """entropy bonus"""


class Policy(nn.Module):
    """Logits from the prompt token, the previous token and the position: a tiny autoregressive policy."""

    def __init__(self, vocab: int, hidden: int, seq_len: int) -> None:
        super().__init__()
        self.prompt = nn.Embedding(vocab, hidden)
        self.prev = nn.Embedding(vocab + 1, hidden)  # id ``vocab`` is the start token
        self.pos = nn.Embedding(seq_len, hidden)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, vocab))
        self.start = vocab

    def forward(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for ``tokens`` [B, T] after ``prompts`` [B]."""
        prev = torch.cat([torch.full_like(tokens[:, :1], self.start), tokens[:, :-1]], dim=1)
        positions = torch.arange(tokens.shape[1])
        return self.head(self.prompt(prompts)[:, None] + self.prev(prev) + self.pos(positions)[None])

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.full((prompts.shape[0], seq_len), self.start, dtype=torch.long)
        for t in range(seq_len):
            logits = self.forward(prompts, tokens[:, : t + 1])[:, t]
            tokens[:, t] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
        return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) [B, T] (differentiable) and the full-vocabulary entropy [B, T] (no gradient)."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp, entropy


def main(cfg: Config) -> Path:
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and make results thread-dependent)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    policy = Policy(cfg.vocab, cfg.hidden, cfg.seq_len)
    optim = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    rec = rldiag.Recorder(cfg.run_dir, config=rldiag.RecorderConfig(eps_low=cfg.clip_eps, eps_high=cfg.clip_eps))
    n = cfg.prompts * cfg.group_size
    start = time.time()
    with rec:
        for step in range(1, cfg.steps + 1):
            # ---- rollout: G responses per prompt, log-probs of the sampling policy -----------------------
            prompts = torch.randint(cfg.vocab, (cfg.prompts,), generator=gen).repeat_interleave(cfg.group_size)
            tokens = policy.sample(prompts, cfg.seq_len, gen)
            with torch.no_grad():
                old_logp, _ = token_logprobs(policy(prompts, tokens), tokens)
            rewards = (tokens == prompts[:, None]).float().mean(dim=1)
            # ---- GRPO advantages: reward standardised within each prompt's group ------------------------
            grouped = rewards.view(cfg.prompts, cfg.group_size)
            adv_seq = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(n)
            advantages = adv_seq[:, None].expand(n, cfg.seq_len)
            mask = torch.ones(n, cfg.seq_len, dtype=torch.bool)
            groups = torch.arange(cfg.prompts).repeat_interleave(cfg.group_size)
            # ---- PPO update: several epochs of minibatches over the same batch ---------------------------
            for _ in range(cfg.update_epochs):
                for idx in torch.randperm(n, generator=gen).chunk(cfg.minibatches):
                    logp, entropy = token_logprobs(policy(prompts[idx], tokens[idx]), tokens[idx])
                    rec.record(
                        step=step,
                        logprobs=logp.detach(),
                        old_logprobs=old_logp[idx],
                        advantages=advantages[idx],
                        mask=mask[idx],
                        entropy=entropy,
                        group_ids=groups[idx],
                        rewards=rewards[idx],
                        token_ids=tokens[idx],
                    )
                    ratio = torch.exp(logp - old_logp[idx])
                    adv = advantages[idx]
                    surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
                    loss = -surrogate[mask[idx]].mean() - cfg.ent_coef * entropy[mask[idx]].mean()
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
            if step % 10 == 0 or step == cfg.steps:
                print(f"step {step:4d}  reward {rewards.mean():.3f}  ({time.time() - start:.1f}s)")
    return Path(cfg.run_dir)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
