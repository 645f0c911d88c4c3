"""A tiny real policy-gradient training (GRPO-style PPO on a GRU policy), recorded with rldiag.Recorder.

Used by the alert end-to-end tests and by the early-warning measurement of docs/alerts.md. Reads top to
bottom; every knob is a field of :class:`ToyConfig`.

The task: a prompt is one random token; the policy writes ``length`` tokens; the reward is the share of
tokens that belong to the prompt's ``targets`` rewarded tokens, each scoring with probability
``reward_prob`` (a noisy verifier). Any mix of those tokens is optimal, so a
healthy run (moderate learning rate, entropy bonus) learns the task and keeps spreading its probability
over them (entropy near ln(targets)); with a large learning rate, several PPO epochs and no entropy bonus
the policy locks onto single tokens and its entropy collapses to zero. Nothing is hand-written: every
metric comes from the recorder.

Run it as a module to record both runs for several seeds and print when each default rule fires::

    python -m tests.alerts.alerts_pg_toy /tmp/toy --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ToyConfig:
    vocab: int = 24
    """Tokens of the toy language (the prompt is one of them)."""
    length: int = 32
    """Response length in tokens."""
    targets: int = 4
    """Rewarded tokens per prompt (any of them scores)."""
    reward_prob: float = 0.7
    """A rewarded token scores with this probability (a noisy verifier: groups never all tie)."""
    prompts: int = 32
    """Prompts per step (GRPO groups)."""
    group: int = 8
    """Responses sampled per prompt."""
    hidden: int = 64
    """GRU width."""
    lr: float = 3e-3
    """Adam learning rate."""
    epochs: int = 2
    """PPO epochs over each batch (ratios leave 1 from the second minibatch on)."""
    minibatches: int = 2
    """Minibatches per epoch; each is one optimizer step and one rldiag record."""
    clip: float = 0.2
    """PPO clip epsilon."""
    entropy_coef: float = 0.0
    """Entropy bonus (a positive value keeps the policy exploring)."""
    steps: int = 120
    """Training iterations (rldiag steps)."""
    seed: int = 0


COLLAPSING = ToyConfig(lr=5e-3, epochs=2, entropy_coef=0.0, steps=200)
"""No entropy bonus and a larger step: the policy locks onto single tokens (entropy -> 0)."""
HEALTHY = ToyConfig(lr=3e-3, epochs=2, entropy_coef=0.1, steps=200)
"""An entropy bonus: the policy learns the task and keeps its probability spread over the rewarded tokens."""


def _policy(cfg: ToyConfig) -> Any:
    import torch
    from torch import nn

    class Policy(nn.Module):
        """pi(token | prompt, position): an MLP over prompt and position embeddings (cheap on a CPU)."""

        def __init__(self) -> None:
            super().__init__()
            self.prompt = nn.Embedding(cfg.vocab, cfg.hidden)
            self.pos = nn.Embedding(cfg.length, cfg.hidden)
            self.mlp = nn.Sequential(
                nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.vocab)
            )

        def forward(self, prompts: torch.Tensor) -> torch.Tensor:
            """Logits [B, length, vocab] of every response position for prompts [B]."""
            h = self.prompt(prompts)[:, None, :] + self.pos.weight[None, :, :]
            return self.mlp(h)

    return Policy()


def train(run_dir: str | Path, cfg: ToyConfig, *, alerts: Any = None) -> list[dict[str, float]]:
    """Train and record into ``run_dir``; returns per-step training logs (reward, entropy) for checks."""
    import torch

    import rldiag

    torch.manual_seed(cfg.seed)
    policy = _policy(cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    B = cfg.prompts * cfg.group
    log: list[dict[str, float]] = []
    with rldiag.Recorder(run_dir, clip_low=cfg.clip, clip_high=cfg.clip, alerts=alerts) as rec:
        for step in range(cfg.steps):
            # ---- rollout: sample responses from the current policy (the behaviour policy)
            prompts = torch.randint(0, cfg.vocab, (cfg.prompts,), generator=gen).repeat_interleave(cfg.group)
            # The "inference engine" samples from bfloat16 logits, as vLLM/SGLang kernels differ from the
            # trainer's: rollout_logp vs old_logp is a real training/inference mismatch.
            with torch.no_grad():
                logits = policy(prompts)
                roll_all = torch.log_softmax(logits.bfloat16().float(), -1)
                actions = torch.multinomial(roll_all.exp().view(-1, cfg.vocab), 1, generator=gen).view(B, -1)
                rollout_logp = roll_all.gather(-1, actions[..., None])[..., 0]
                old_logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
            offsets = torch.arange(1, cfg.targets + 1) * (cfg.vocab // cfg.targets)
            target = (prompts[:, None] + offsets[None, :]) % cfg.vocab  # [B, targets]
            hit = (actions[..., None] == target[:, None, :]).any(-1).float()
            lucky = (torch.rand(hit.shape, generator=gen) < cfg.reward_prob).float()
            rewards = (hit * lucky).mean(1)
            groups = torch.arange(cfg.prompts).repeat_interleave(cfg.group)
            r = rewards.view(cfg.prompts, cfg.group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
            # ---- PPO epochs; the last epoch's minibatches are recorded (logp at the time of the gradient)
            perm = torch.randperm(B, generator=gen)
            for epoch in range(cfg.epochs):
                for idx in perm.chunk(cfg.minibatches):
                    logp_all = torch.log_softmax(policy(prompts[idx]), -1)
                    logp = logp_all.gather(-1, actions[idx][..., None])[..., 0]
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
                    ratio = torch.exp(logp - old_logp[idx])
                    a = adv[idx][:, None]
                    surrogate = torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
                    loss = -(surrogate.mean() + cfg.entropy_coef * entropy.mean())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if epoch == cfg.epochs - 1:
                        rec.record(
                            step=step,
                            logprobs=logp.detach(),
                            old_logprobs=old_logp[idx],
                            advantages=adv[idx],
                            entropy=entropy.detach(),
                            group_ids=groups[idx],
                            rollout_logprobs=rollout_logp[idx],
                            rewards=rewards[idx],
                            token_ids=actions[idx],
                        )
            log.append({"step": step, "reward": float(rewards.mean()), "entropy": float(entropy.detach().mean())})
    return log


def collapse_step(entropy: list[float], *, frac: float = 0.1, baseline_steps: int = 10) -> int | None:
    """The first step index where entropy/mean is below ``frac`` of the median of its first steps."""
    import statistics

    base = statistics.median(entropy[:baseline_steps])
    return next((i for i, e in enumerate(entropy) if e < frac * base), None)


def measure(out: str | Path, seeds: int = 5, steps: int | None = None) -> dict[str, Any]:
    """Record (when missing) the collapsing and healthy runs of ``seeds`` seeds, evaluate the default rules.

    Returns, per run, the collapse step and every rule's firing steps, as ``rldiag watch`` would see them.
    """
    import rldiag
    from rldiag.alerts import Engine, load_rules

    rules = load_rules()
    result: dict[str, Any] = {}
    for name, base in (("collapsing", COLLAPSING), ("healthy", HEALTHY)):
        for seed in range(seeds):
            cfg = dataclasses.replace(base, seed=seed, **({"steps": steps} if steps else {}))
            run_dir = Path(out) / f"{name}-{seed}"
            if not (run_dir / "manifest.json").exists():
                train(run_dir, cfg)
            metrics = rldiag.open_run(run_dir).step_metrics()
            fires: dict[str, list[int]] = {}
            for n in Engine(rules, run=run_dir.name).update(metrics, now=0.0):
                if n.event == "firing":
                    fires.setdefault(n.rule, []).append(n.step)
            entropy = metrics["entropy/mean"].to_list()
            result[run_dir.name] = {
                "kind": name,
                "seed": seed,
                "steps": len(entropy),
                "collapse": collapse_step(entropy),
                "fires": fires,
                "final_entropy": entropy[-1],
                "first_entropy": entropy[0],
            }
    return result


def report(result: dict[str, Any]) -> str:
    """Markdown tables: lead time per rule on the collapsing runs, firing episodes on the healthy ones."""
    rules = sorted({r for v in result.values() for r in v["fires"]})
    lines = ["| run | collapse step | " + " | ".join(f"`{r}`" for r in rules) + " |", "|---|---|" + "---|" * len(rules)]
    for name, v in result.items():
        cells = []
        for r in rules:
            steps = v["fires"].get(r, [])
            if not steps:
                cells.append("-")
            elif v["collapse"] is not None:
                cells.append(f"{steps[0]} ({v['collapse'] - steps[0]:+d}; {len(steps)}x)")
            else:
                cells.append(f"{steps[0]} ({len(steps)}x)")
        coll = "none" if v["collapse"] is None else str(v["collapse"])
        lines.append(f"| {name} | {coll} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the runs (collapsing-<seed>/, healthy-<seed>/)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = p.parse_args(argv)
    result = measure(args.out, args.seeds, args.steps)
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
