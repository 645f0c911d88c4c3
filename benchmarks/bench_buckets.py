"""Bucket-table throughput (``Run.bucket_metrics``) against a bare polars group-by-step sum of every column the
table reads, over the same files, in the same process.

    python benchmarks/bench_buckets.py --rows 20000000           # the lens benchmark's run shape
    python benchmarks/bench_buckets.py --dir /tmp/bk --by pos,prob

The run is ``bench_lens.make_run`` with entropies and routing agreement (responses of 64..2048 tokens, 100 steps,
token files of about 4 M rows). Baseline and table alternate ``--repeat`` times; the best of each is kept.
Prints ratios; never asserts.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
import rldiag  # noqa: E402
from bench_lens import make_run  # noqa: E402
from rldiag import schema  # noqa: E402
from rldiag.analysis.recompute import bucket_read_columns  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--by", default="pos,prob,route")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="generate the run here (reused if present)")
    args = ap.parse_args()
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rldiag-bench-buckets-"))
    path = tmp / "run"
    try:
        if not (path / schema.MANIFEST_NAME).exists():
            t = time.perf_counter()
            n = make_run(path, args.rows, args.steps, extras=True)
            print(f"generated {n:,} token rows ({args.steps} steps) in {time.perf_counter() - t:.1f} s")
        run = rldiag.open_run(path)
        files = [str(f) for f in run.token_files()]
        n = sum(pq.read_metadata(f).num_rows for f in files)
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
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
