"""Recorder hot path and writer throughput (issue: foundation), measured against baselines in the same run.

    python benchmarks/bench_recorder.py [--batches 20]

On a 256 x 2048-token CPU batch with entropy:
1. foreground ``record()`` time vs (a) TensorBoard ``add_histogram`` of ratio and entropy plus ten
   ``add_scalar`` on the same tensors (what users do today) and (b) one elementwise ``exp(logp - old_logp)``;
2. writer throughput: token rows/s from record() to published Parquet, and drops at one batch per second;
3. queue memory: a producer that never waits; the largest queued bytes vs the bound.
Prints ratios; never asserts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rldiag


def _batch(seed: int = 0, B: int = 256, T: int = 2048) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.empty(B, T).exponential_(generator=g)
    old = (logp + 0.05 * torch.randn(B, T, generator=g)).clamp(max=0)
    return dict(
        logprobs=logp,
        old_logprobs=old,
        advantages=torch.randn(B, generator=g),
        mask=torch.rand(B, T, generator=g) < 0.9,
        entropy=torch.rand(B, T, generator=g) * 3,
    )


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    b = _batch()
    tmp = Path(tempfile.mkdtemp(prefix="rldiag-bench-"))
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(tmp / "tb"))
        k = [0]

        def tensorboard() -> None:
            ratio = torch.exp(b["logprobs"] - b["old_logprobs"])[b["mask"]]
            tb.add_histogram("ratio", ratio, k[0])
            tb.add_histogram("entropy", b["entropy"][b["mask"]], k[0])
            for i in range(10):
                tb.add_scalar(f"s{i}", float(ratio.mean()), k[0])
            k[0] += 1

        rec = rldiag.Recorder(tmp / "run", queue_max_bytes=8 * 2**30)  # large bound: measure the pure hot path
        rec.record(step=0, **b)
        rec.flush()
        s = [1]

        def record() -> None:
            rec.record(step=s[0], **b)
            s[0] += 1

        # Interleaved, so that a load change on the machine hits baselines and rldiag alike. Steady state of a
        # training loop: the writer has finished the previous step's record before the next record() call.
        times_rec, times_exp, times_tb = [], [], []
        for _ in range(args.batches):
            rec._writer.barrier(publish=False)
            times_exp.append(_median_time(lambda: torch.exp(b["logprobs"] - b["old_logprobs"]), 5))
            t = time.perf_counter()
            record()
            times_rec.append(time.perf_counter() - t)
            times_tb.append(_median_time(tensorboard, 1))
        tb.close()
        t_rec, t_exp, t_tb = (statistics.median(x) for x in (times_rec, times_exp, times_tb))
        t_burst = _median_time(record, args.batches)  # back to back: fresh buffers every call
        t0 = time.perf_counter()
        rec.flush()
        rec.close()
        # writer throughput: records enqueued back to back, until everything is published
        rec = rldiag.Recorder(tmp / "run2", queue_max_bytes=8 * 2**30)
        t0 = time.perf_counter()
        for i in range(args.batches):
            rec.record(step=i, **b)
        rec.flush()
        dt = time.perf_counter() - t0
        rows = rec.stats["rows_written"]
        rec.close()
        # one batch per second, default queue bound: any drop?
        rec = rldiag.Recorder(tmp / "run3")
        for i in range(8):
            t = time.perf_counter()
            rec.record(step=i, **b)
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t)))
        rec.close()
        drops_1hz = rec.stats["rows_dropped"]
        # memory bound: a producer that never waits, default 256 MiB bound
        rec = rldiag.Recorder(tmp / "run4")
        peak = 0
        for i in range(40):
            rec.record(step=i, **b)
            peak = max(peak, rec.stats["queued_bytes"])
        rec.close()
        dropped = rec.stats["rows_dropped"]
        bound = rec.config.queue_max_bytes

        print(f"batch 256 x 2048 tokens, entropy included; torch threads {torch.get_num_threads()}")
        print(f"TensorBoard add_histogram x2 + add_scalar x10 : {t_tb * 1e3:8.2f} ms")
        print(f"one exp(logp - old_logp) pass                  : {t_exp * 1e3:8.2f} ms")
        print(f"rldiag record() foreground                     : {t_rec * 1e3:8.2f} ms")
        print(f"rldiag record() back to back (no idle writer) : {t_burst * 1e3:8.2f} ms")
        print(f"  ratio to TensorBoard   : {t_rec / t_tb:6.3f}  (target <= 0.5, goal 0.25)")
        print(f"  ratio to one exp pass  : {t_rec / t_exp:6.2f}  (target <= 6)")
        print(
            f"writer throughput        : {rows / dt / 1e6:6.2f} M token rows/s end to end "
            f"({args.batches} batches, {rows:,} rows, {dt:.2f} s)"
        )
        print(f"drops at 1 batch/s       : {drops_1hz} token rows")
        print(
            f"flooding producer        : peak queued {peak / 2**20:.0f} MiB of a {bound / 2**20:.0f} MiB bound, "
            f"{dropped:,} token rows dropped (statistics kept)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
