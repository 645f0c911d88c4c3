"""Custom scalars (Recorder.log): the cost of a log() call against a record() call in the same run, and reading
them back. Prints ratios against the baseline measured in this run; no absolute thresholds.

    python benchmarks/bench_scalars.py --steps 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import rldiag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="log() calls of 3 scalars (default 100000)")
    p.add_argument("--records", type=int, default=2000, help="record() calls of an 8 x 256 batch (baseline)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    lp, adv = -rng.random((8, 256)), rng.standard_normal(8)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "run"
        with rldiag.Recorder(d, roll_steps=10**9, roll_seconds=3600, live_seconds=None) as rec:
            t = time.perf_counter()
            for s in range(args.steps):
                rec.log(s, {"loss": 0.1 * s, "lr": 3e-4, "eval/acc": 0.5})
            per_log = (time.perf_counter() - t) / args.steps
            t = time.perf_counter()
            rec.flush()  # only scalars are pending: this is their publication
            publish = time.perf_counter() - t
            t = time.perf_counter()
            for s in range(args.records):
                rec.record(s, lp, lp, adv)
            per_record = (time.perf_counter() - t) / args.records
        run = rldiag.open_run(d)
        t = time.perf_counter()
        frame = run.custom_metrics()
        first = time.perf_counter() - t
        t = time.perf_counter()
        run.custom_metrics()
        again = time.perf_counter() - t
        t = time.perf_counter()
        run.step_metrics(metrics=["kl/k3"])
        base_read = time.perf_counter() - t
    print(f"record() of an 8 x 256 batch (baseline): {per_record * 1e6:.0f} us per call")
    print(f"log() of 3 scalars: {per_log * 1e6:.1f} us per call = {per_log / per_record:.3f} x record()")
    print(f"flush() publishing {3 * args.steps} scalars (one file): {publish:.2f} s")
    print(
        f"custom_metrics() of {frame.height} steps x 3: {first:.3f} s first, {again:.3f} s again; "
        f"step_metrics(['kl/k3']) of {args.records} steps (baseline): {base_read:.3f} s"
    )


if __name__ == "__main__":
    main()
