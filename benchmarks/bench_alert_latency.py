"""How long after its records a step's alert pages, online, on one rank and on several.

    python benchmarks/bench_alert_latency.py                   # step every 0.5 s, spike at step 10
    python benchmarks/bench_alert_latency.py --interval 1.0 --ranks 4

Real recorders in this process (one per rank, ``world_size`` ranks of one run in a temporary folder) record a
step every ``--interval`` seconds with a KL spike at ``--spike`` on the last rank only; a callback sink notes
when the firing arrives. Measured from the moment every rank recorded the spike step. Three cases:

- one rank (the baseline): the evaluator gets the statistics from the writer and evaluates a step when the next
  step's first record arrives, so it pages about one ``--interval`` after the spike;
- several ranks, live tails on (the default ``live_seconds=1``): rank 0 reads the run directory every 5 s and a
  step is complete once every rank has a later step in its segments or its live tail;
- several ranks without live tails (``live_seconds=None``, as on object storage): the step waits for every
  rank's segment (``roll_seconds``, 30 s by default: ``--roll-seconds``).

Prints each case's latency and its ratio to the baseline measured in this run; never asserts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import rldiag
from rldiag.alerts import AlertConfig, Condition, Rule

KL = Rule("kl", (Condition("kl/k3", op=">", threshold=0.05, resolve=0.03),), severity="critical")


def _record(rec: rldiag.Recorder, step: int, spike: bool, rng: np.random.Generator) -> None:
    old = np.log(rng.uniform(0.05, 0.95, (16, 24))).astype(np.float32)
    lp = np.minimum(old + rng.normal(0, 0.6 if spike else 0.01, old.shape), 0).astype(np.float32)
    rec.record(step=step, logprobs=lp, old_logprobs=old, advantages=rng.normal(0, 1, 16).astype(np.float32))


def latency(ranks: int, interval: float, spike: int, live: float | None, roll_seconds: float, limit: float) -> float:
    """Seconds from the spike step's last record to its page (NaN if none within ``limit`` seconds)."""
    paged: list[float] = []
    cfg = AlertConfig(rules=[KL], console=False, callbacks=(lambda n: paged.append(time.monotonic()),))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        kw: dict[str, Any] = {"live_seconds": live, "roll_seconds": roll_seconds}
        recs = [rldiag.Recorder(run, rank=r, world_size=ranks, alerts=cfg, **kw) for r in range(ranks)]
        rngs = [np.random.default_rng(r) for r in range(ranks)]
        t_spike = None
        try:
            step = 0
            while True:
                for r, rec in enumerate(recs):
                    _record(rec, step, step == spike and r == ranks - 1, rngs[r])
                if step == spike:
                    t_spike = time.monotonic()
                if paged or (t_spike is not None and time.monotonic() - t_spike > limit):
                    break
                time.sleep(interval)
                step += 1
        finally:
            for rec in recs:
                rec.close()
    return paged[0] - t_spike if paged and t_spike is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between steps")
    ap.add_argument("--spike", type=int, default=10, help="the step whose KL spikes (on the last rank)")
    ap.add_argument("--roll-seconds", type=float, default=30.0, help="the writers' segment interval")
    ap.add_argument("--limit", type=float, default=90.0, help="give up on a page after this many seconds")
    args = ap.parse_args()
    common = {"interval": args.interval, "spike": args.spike, "roll_seconds": args.roll_seconds, "limit": args.limit}
    base = latency(1, live=1.0, **common)
    print(f"one rank (baseline): paged {base:.2f} s after the spike step's records (a step every {args.interval} s)")
    out = {"interval": args.interval, "ranks": args.ranks, "one_rank_s": base}
    for name, live in (("live_tails", 1.0), ("segments_only", None)):
        t = latency(args.ranks, live=live, **common)
        what = "live tails (live_seconds=1)" if live else f"segments only (roll_seconds={args.roll_seconds:g})"
        print(f"{args.ranks} ranks, {what}: {t:.2f} s = {t / base:.1f}x the baseline")
        out[f"{name}_s"] = t
    print(json.dumps(out))


if __name__ == "__main__":
    main()
