"""Statistics kernel cost of the optional inputs, against the kernel on the required inputs in the same run.

    python benchmarks/bench_kernel.py [--repeat 15]

One 256 x 2048-token record (entropy and rewards included), computed by ``rldiag.stats.kernel.compute`` as the
recorder's writer thread and the recompute workers do:
1. baseline: logp, old_logp, adv, entropy, rewards;
2. + rollout_logp (training-inference mismatch: section 2's mismatch statistics and the second-generation
   mismatch/removed statistics);
3. + rollout_logp and route_agree (MoE routing statistics).
Prints the minimum and median time of each and the ratios to the baseline; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from rldiag.config import RecorderConfig
from rldiag.stats import kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    B, T = 256, 2048
    n = B * T
    lp = -rng.exponential(1, n).astype(np.float32)
    olp = (lp + rng.normal(0, 0.05, n)).clip(max=0).astype(np.float32)
    base = dict(
        rec_off=np.array([0, B]),
        seq_off=np.arange(B + 1) * T,
        steps=np.array([0]),
        logp=lp,
        old_logp=olp,
        adv=np.repeat(rng.normal(size=B), T).astype(np.float32),
        pos=np.tile(np.arange(T), B),
        entropy=(rng.random(n) * 3).astype(np.float32),
        reward=(rng.random(B) < 0.5).astype(np.float32),
    )
    roll = (olp + rng.normal(0, 0.02, n)).clip(max=0).astype(np.float32)
    route = np.where(rng.random(n) < 0.9, 1.0, 0.5).astype(np.float32)
    cases = {
        "required + entropy (baseline)": {},
        "+ rollout_logp": {"rollout_logp": roll},
        "+ rollout_logp + route_agree": {"rollout_logp": roll, "route_agree": route},
    }
    cfg = RecorderConfig()
    print(f"one record of {B} x {T} tokens, {args.repeat} runs each (compile excluded)")
    times: dict[str, list[float]] = {}
    for _ in range(2):  # interleaved rounds: a load spike hits every case alike
        for name, extra in cases.items():
            batch = kernel.TokenBatch(**base, **extra)
            kernel.compute(batch, cfg)
            for _ in range(args.repeat):
                t = time.perf_counter()
                kernel.compute(batch, cfg)
                times.setdefault(name, []).append(time.perf_counter() - t)
    ref = min(times["required + entropy (baseline)"])
    for name, ts in times.items():
        print(
            f"{name:32s} min {min(ts) * 1e3:7.2f} ms  median {statistics.median(ts) * 1e3:7.2f} ms  "
            f"{n / min(ts) / 1e6:5.1f} M tokens/s  ratio to baseline {min(ts) / ref:5.2f}"
        )


if __name__ == "__main__":
    main()
