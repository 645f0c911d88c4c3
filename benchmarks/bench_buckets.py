"""Bucket-table throughput (``Run.bucket_metrics``) against a bare polars group-by-step sum of every column the
table reads, over the same files, in the same process.

    python benchmarks/bench_buckets.py --rows 20000000           # the lens benchmark's run shape
    python benchmarks/bench_buckets.py --dir /tmp/bk --by pos,prob
    python benchmarks/bench_buckets.py --dir /tmp/big --shape analysis --rows 200000000 --by pos --fresh

Run shapes (``--shape``): ``lens`` (default) is ``bench_lens.make_run`` with entropies and routing agreement
(responses of 64..2048 tokens, 100 steps, token files of about 4 M rows); ``analysis`` is
``bench_analysis.make_token_run`` (10,000 tokens per step, no rollout log-probs: position buckets only);
``recorder`` is written by ``rldiag.Recorder``, one record of 128 x 1024 tokens per step, with rollout
log-probs and routing agreement. Baseline and table alternate ``--repeat`` times; the best of each is kept.
``--fresh``: each table once in a fresh process (start-up included), then the baseline in that process; prints
the time, the ratio and the table's peak RSS (VmHWM). ``--steps-on-screen 60``: also 60 consecutive steps (what a
dashboard heatmap asks for).
Prints ratios; never asserts.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from bench_lens import make_run  # noqa: E402

import rldiag  # noqa: E402
from rldiag import schema  # noqa: E402
from rldiag.analysis.recompute import bucket_read_columns  # noqa: E402


def make_recorder_run(path: Path, rows: int) -> int:
    """One record of 128 sequences x 1024 tokens per step, written by the recorder."""
    import numpy as np

    rng = np.random.default_rng(2)
    steps = max(1, rows // (128 * 1024))
    with rldiag.Recorder(path) as rec:
        for step in range(steps):
            old = -rng.exponential(0.8, (128, 1024)).astype(np.float32)
            rec.record(
                step=step,
                logprobs=np.minimum(old + rng.standard_t(3, old.shape).astype(np.float32) * 0.05, 0),
                old_logprobs=old,
                advantages=rng.normal(size=128).astype(np.float32),
                mask=np.arange(1024)[None, :] < rng.integers(64, 1025, 128)[:, None],
                entropy=rng.exponential(1.0, old.shape).astype(np.float32),
                rollout_logprobs=np.minimum(old + rng.normal(0, 0.03, old.shape).astype(np.float32), 0),
                route_agree=np.minimum(1.0, rng.uniform(0.3, 1.6, old.shape)).astype(np.float32),
            )
    return steps * 128 * 1024


def fresh(path: Path, files: list[str], n: int, kinds: list[str]) -> None:
    """Each table once in a fresh process (start-up included), its peak RSS, then the bare sum there."""
    for by in kinds:
        cols = [c for c in bucket_read_columns(by) if c != schema.STEP]
        code = (
            "import sys, time, rldiag, polars as pl; sys.path.insert(0, 'benchmarks'); "
            "from bench_analysis import peak_rss_kib; "
            f"r = rldiag.open_run({str(path)!r}); t = time.perf_counter(); out = r.bucket_metrics(by={by!r}); "
            "t = time.perf_counter() - t; rss = peak_rss_kib(); "
            f"b = time.perf_counter(); pl.scan_parquet({files!r}).group_by('step')"
            f".agg(pl.col(c).sum() for c in {cols!r}).collect(); b = time.perf_counter() - b; "
            "print(f'{t:.2f} {rss} {b:.2f} {out.height}')"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
        ).stdout.split()
        t, rss, b = float(out[0]), int(out[1]), float(out[2])
        print(
            f"by={by:5s} fresh process: table {t:.2f} s ({n / t / 1e6:.1f} M rows/s, {out[3]} rows), bare sum of "
            f"{len(cols) + 1} columns {b:.2f} s, ratio {t / b:.2f}x; peak RSS of the table {rss / 2**20:.2f} GiB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--by", default="pos,prob,route")
    ap.add_argument("--shape", choices=("lens", "analysis", "recorder"), default="lens")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="generate the run here (reused if present)")
    ap.add_argument("--fresh", action="store_true", help="each table in a fresh process: time, ratio, peak RSS")
    ap.add_argument("--steps-on-screen", type=int, default=0, help="also time this many consecutive steps")
    args = ap.parse_args()
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rldiag-bench-buckets-"))
    path = tmp / "run"
    try:
        if not (path / schema.MANIFEST_NAME).exists():
            t = time.perf_counter()
            if args.shape == "lens":
                n = make_run(path, args.rows, args.steps, extras=True)
            elif args.shape == "analysis":
                from bench_analysis import make_token_run

                make_token_run(path, args.rows)
                n = args.rows
            else:
                n = make_recorder_run(path, args.rows)
            print(f"generated {n:,} token positions ({args.shape} shape) in {time.perf_counter() - t:.1f} s")
        run = rldiag.open_run(path)
        files = [str(f) for f in run.token_files()]
        n = sum(pq.read_metadata(f).num_rows for f in files)
        if args.fresh:
            fresh(path, files, n, args.by.split(","))
            return
        run.bucket_metrics(by="pos", steps=run.steps()[:1])  # loads the compiled passes; not counted
        print(f"{n:,} token rows in {len(files)} files; best of {args.repeat}")
        for by in args.by.split(","):
            cols = [c for c in bucket_read_columns(by) if c != schema.STEP]
            bare, table = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                pl.scan_parquet(files).group_by("step").agg(pl.col(c).sum() for c in cols).collect()
                bare.append(time.perf_counter() - t)
                t = time.perf_counter()
                out = run.bucket_metrics(by=by)
                table.append(time.perf_counter() - t)
            tb, tt = min(bare), min(table)
            print(
                f"by={by:5s} bare sum of {len(cols) + 1} columns {tb:6.2f} s ({n / tb / 1e6:6.1f} M rows/s) | "
                f"table {tt:6.2f} s ({n / tt / 1e6:6.1f} M rows/s, {out.height} rows) | ratio {tt / tb:.2f}x"
            )
        if args.steps_on_screen:
            steps = run.steps()
            chosen = steps[len(steps) // 3 : len(steps) // 3 + args.steps_on_screen]
            for by in args.by.split(","):
                t = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    run.bucket_metrics(by=by, steps=chosen)
                    t.append(time.perf_counter() - t0)
                print(
                    f"by={by:5s} {len(chosen)} steps on screen: {min(t):.3f} s (best of {args.repeat}; target < 0.3 s)"
                )
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
