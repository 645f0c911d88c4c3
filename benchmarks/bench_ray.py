"""Recompute from token rows: the local engine against Ray with 1, 2 and 4 workers, on this machine.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/bench_ray.py --rows 8000000 --file-rows 250000

What it measures, all on the same run (token files written with the recorder's Parquet options, one row group
per file, as a recorder's segments are):

* local: ``run.step_metrics(from_tokens=True)`` on this process's threads (one per core, the baseline);
* ray-k: the same call with ``engine="ray"`` on a local Ray started with ``num_cpus=k`` (k = 1, 2, 4), Ray's
  start-up excluded, after one warm-up call (workers started, functions exported);
* the overhead per row group: (ray-k time - local time at the same parallelism) / row groups, and the
  per-token cost of one worker (ray-1 time / rows), which the capacity plan in docs/cluster.md scales;
* bytes per token row stored, from a run the Recorder wrote with every optional column.

Median of ``--repeats`` runs; prints ratios against the local engine measured in the same run; never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray node on 127.0.0.1

from bench_analysis import make_token_run  # noqa: E402

import rldiag  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bytes_per_token(tmp: Path) -> tuple[float, float]:
    """(token-file bytes, statistics-file bytes) per token row of a run the Recorder wrote with every column."""
    rng = np.random.default_rng(0)
    B, T, steps = 64, 512, 8
    path = tmp / "recorded"
    with rldiag.Recorder(path, roll_steps=4) as rec:
        for step in range(steps):
            logp = -rng.exponential(1, (B, T)).astype(np.float32)
            old = np.minimum(logp + rng.normal(0, 0.05, (B, T)), 0).astype(np.float32)
            rec.record(
                step=step,
                logprobs=logp,
                old_logprobs=old,
                advantages=rng.normal(size=B).astype(np.float32),
                mask=np.arange(T)[None, :] < rng.integers(64, T + 1, B)[:, None],
                entropy=rng.exponential(1, (B, T)).astype(np.float32),
                rollout_logprobs=np.minimum(old + rng.normal(0, 0.02, (B, T)), 0).astype(np.float32),
                ref_logprobs=np.minimum(logp + rng.normal(0, 0.1, (B, T)), 0).astype(np.float32),
                group_ids=np.arange(B) // 8,
                rewards=rng.random(B).astype(np.float32),
                token_ids=rng.integers(0, 150_000, (B, T)),
            )
    run = rldiag.open_run(path)
    rows = run.info()["token_rows_written"]
    tok = sum(f.stat().st_size for f in (path / "tokens").glob("*.parquet"))
    sta = sum(f.stat().st_size for f in (path / "stats").glob("*.parquet"))
    return tok / rows, sta / rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--file-rows", type=int, default=250_000, help="token rows per file (one row group each)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rldiag-bench-ray-"))
    t = time.perf_counter()
    make_token_run(tmp / "run", args.rows, steps=max(1, args.rows // 20_000), file_rows=args.file_rows)
    run = rldiag.open_run(tmp / "run")
    from rldiag.analysis.recompute import row_groups

    n_rg = row_groups(run.token_files())
    rows = run.tokens().select("step").collect().height
    print(
        f"run: {rows:,} token rows, {len(run.steps())} steps, {len(run.token_files())} files, {n_rg} row groups "
        f"(generated in {time.perf_counter() - t:.1f} s); {os.cpu_count()} cores"
    )

    t_local, want = timed(lambda: run.step_metrics(from_tokens=True), args.repeats)
    print(f"local engine        {t_local:7.3f} s  {rows / t_local / 1e6:6.1f} M tokens/s  1.00x")
    results = {}
    for k in [int(x) for x in args.workers.split(",")]:
        t = time.perf_counter()
        ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter() - t
        run.step_metrics(from_tokens=True, engine="ray")  # warm-up: workers started, functions exported
        t_ray, got = timed(lambda: run.step_metrics(from_tokens=True, engine="ray"), args.repeats)
        ray.shutdown()
        same = got.equals(want)
        results[k] = t_ray
        print(
            f"ray, {k} worker(s)    {t_ray:7.3f} s  {rows / t_ray / 1e6:6.1f} M tokens/s  {t_ray / t_local:4.2f}x "
            f"the local engine  (Ray start {start:.1f} s; result {'bit-identical' if same else 'DIFFERENT'})"
        )
    if 1 in results:
        per_token = results[1] / rows
        print(f"one Ray worker: {per_token * 1e9:.0f} ns per token row (read + kernel + transfer)")
    cores = os.cpu_count() or 1
    for k, t_ray in results.items():
        par = min(k, cores)
        print(
            f"overhead per row group, {k} worker(s): {(t_ray - t_local * min(cores, 8) / par) / n_rg * 1e3:+.1f} ms "
            f"(ray time minus the local engine's scaled to {par} core(s), over {n_rg} row groups)"
        )
    tok, sta = bytes_per_token(tmp)
    print(
        f"stored: {tok:.2f} bytes per token row in token files, {sta:.3f} in statistics files "
        "(Recorder, every optional column, default compression)"
    )


if __name__ == "__main__":
    main()
