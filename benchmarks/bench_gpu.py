"""record() on a GPU against one real training step of a small model on the same GPU (issue: cluster, GPUs).

    python benchmarks/bench_gpu.py [--layers 12 --hidden 1024 --batch 16 --seq 2048 --steps 20]

A Llama-architecture causal LM built from a config (random weights, bf16, SDPA attention) takes PPO steps on
random token ids: forward, per-token log-probs and entropy from the logits, the clipped surrogate, backward.
The baseline is that forward+backward, measured in the same run. Printed:

1. ``record()``'s foreground time (the caller's wall clock inside the call; it never waits for the GPU) as
   a share of the forward+backward step;
2. the step's wall clock (synchronised after the step) with and without ``record()``, interleaved, and the
   difference: what recording costs the training loop, the device-to-host copies included;
3. ``record()`` alone on larger batches already on the GPU (up to 256 x 2048 tokens);
4. that no call synchronised the GPU (``torch.cuda.set_sync_debug_mode("error")`` around every call), that
   no token row was dropped, and that the recorded token count matches the masks.

Needs a CUDA device; prints ratios, never asserts a time. ``--device cpu`` runs the same code on a tiny
model, to check the script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import rldiag


def _model(args: argparse.Namespace, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _ppo_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> dict:
    """Forward, log-probs and entropy of the next tokens, PPO's clipped surrogate, backward."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        old = logp + 0.05 * torch.randn_like(logp)  # a slightly stale behaviour policy
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    loss = -(surrogate * mask).sum() / mask.sum()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return {
        "logprobs": logp.detach(),
        "old_logprobs": old,
        "advantages": adv,
        "mask": mask,
        "entropy": entropy.to(torch.bfloat16),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _NoSync:
    """Any call that synchronises the GPU raises inside this block (CUDA only)."""

    def __init__(self, device: str) -> None:
        self.on = device == "cuda"

    def __enter__(self) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("default")


def _record_alone(rec: rldiag.Recorder, device: str, B: int, T: int, n: int, step0: int) -> float:
    g = torch.Generator(device=device).manual_seed(B * T)
    logp = -torch.rand(B, T, device=device, generator=g) * 3
    batch = {
        "logprobs": logp,
        "old_logprobs": (logp + 0.05 * torch.randn(B, T, device=device, generator=g)).clamp(max=0),
        "advantages": torch.randn(B, device=device, generator=g),
        "mask": torch.rand(B, T, device=device, generator=g) < 0.9,
        "entropy": (torch.rand(B, T, device=device, generator=g) * 3).to(torch.bfloat16),
    }
    _sync(device)
    times = []
    for i in range(n):
        rec._writer.barrier(publish=False)  # steady state: the writer finished the previous record
        with _NoSync(device):
            t = time.perf_counter()
            rec.record(step=step0 + i, **batch)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (or pass --device cpu to check the script)")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    model = _model(args, dev)
    n_params = sum(p.numel() for p in model.parameters())
    B, T = args.batch, args.seq
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, args.vocab, (B, T), device=dev, generator=g)
    mask = (torch.rand(B, T - 1, device=dev, generator=g) < 0.9).float()
    adv = torch.randn(B, device=dev, generator=g)
    try:
        for _ in range(3):  # warm-up: kernels, allocator, autotuning
            _ppo_step(model, ids, mask, adv)
    except torch.OutOfMemoryError:
        raise SystemExit(
            f"bench_gpu.py: a {B} x {T}-token step of this model does not fit in the GPU's memory "
            "(the fp32 log-softmax over the vocabulary is the largest tensor): lower --batch, --seq or --vocab"
        ) from None
    _sync(dev)

    tmp = Path(tempfile.mkdtemp(prefix="rldiag-bench-gpu-"))
    try:
        rec = rldiag.Recorder(tmp / "run")
        rec.record(step=0, **_ppo_step(model, ids, mask, adv))  # warm-up of the recorder's own path
        rec.flush()
        plain, recorded, fg = [], [], []
        for i in range(args.steps):  # interleaved: a clock or load change hits both loops alike
            _sync(dev)
            t = time.perf_counter()
            _ppo_step(model, ids, mask, adv)
            _sync(dev)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            batch = _ppo_step(model, ids, mask, adv)
            with _NoSync(dev):
                t_in = time.perf_counter()
                rec.record(step=1 + i, **batch)
                fg.append(time.perf_counter() - t_in)
            _sync(dev)
            recorded.append(time.perf_counter() - t)
        t_alone = {
            (b, s): _record_alone(rec, dev, b, s, max(5, args.steps // 2), 1000 * (k + 1))
            for k, (b, s) in enumerate([(16, 2048), (64, 2048), (256, 2048)])
        }
        rec.close()
        st = rec.stats
        run = rldiag.open_run(tmp / "run")
        counts = run.step_metrics()["tokens/count"].to_list()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    t_plain, t_rec, t_fg = (statistics.median(x) for x in (plain, recorded, fg))
    expect = int(mask.sum().item())
    out = {
        "device": name,
        "torch": torch.__version__,
        "model_params": n_params,
        "batch": [B, T],
        "fwd_bwd_ms": t_plain * 1e3,
        "step_with_record_ms": t_rec * 1e3,
        "record_foreground_ms": t_fg * 1e3,
        "record_share_of_step": t_fg / t_plain,
        "step_overhead": t_rec / t_plain - 1,
        "record_alone_ms": {f"{b}x{s}": v * 1e3 for (b, s), v in t_alone.items()},
        "rows_dropped": st["rows_dropped"],
        "failures": st["failures"],
        "token_counts_match": all(c == expect for c in counts[: args.steps + 1]),
    }
    print(f"{name}; torch {torch.__version__}; Llama {n_params / 1e6:.0f} M params, batch {B} x {T} tokens")
    print(f"forward+backward (PPO surrogate), baseline      : {t_plain * 1e3:8.2f} ms")
    print(f"the same step with record()                     : {t_rec * 1e3:8.2f} ms")
    print(f"record() foreground                             : {t_fg * 1e3:8.3f} ms")
    print(f"  record() / forward+backward                   : {t_fg / t_plain:8.4f}")
    print(f"  step with record() / without, minus 1         : {t_rec / t_plain - 1:+8.4f}")
    for (b, s), v in t_alone.items():
        print(f"record() alone, {b:>3} x {s} tokens on the GPU      : {v * 1e3:8.3f} ms")
    print(
        f"no GPU synchronisation in any record() call (sync debug mode 'error'); rows dropped "
        f"{st['rows_dropped']}, writer failures {st['failures']}, token counts match masks: "
        f"{out['token_counts_match']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
