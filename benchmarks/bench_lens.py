"""Objective-lens throughput and memory, against a bare polars group-by-step sum measured in the same run.

    python benchmarks/bench_lens.py                      # 50 M token rows, every objective
    python benchmarks/bench_lens.py --rows 5000000 --objectives ppo,dapo,bapo
    python benchmarks/bench_lens.py --dir /tmp/lensrun   # keep the generated run there and reuse it
    python benchmarks/bench_lens.py --rows 20000000 --steps 40 --ranks 8 --dir /tmp/lens8   # 8 ranks' files
    python benchmarks/bench_lens.py --dir /tmp/lensrun --page   # the dashboard's lens call on that run

The run is written in the recorder's layout (token files of about 4 M rows with the recorder's Parquet options,
sequences contiguous and in position order) and opened with ``rldiag.open_run``. Each measurement runs in a fresh
process, so its peak RSS (``VmHWM``; not ``ru_maxrss``, which Linux carries over from a parent that generated the
run) is its own: the baseline is a bare polars ``group_by("step")`` sum of every column the lens reads
(``rldiag.analysis.lens.read_columns``: step, seq, pos, logp, old_logp, adv, rollout_logp for every objective) over
the same files on the streaming engine, the lens is ``rldiag.analysis.lens.lens(run)``, timed after a first call
on one step (which loads the compiled passes from numba's cache; its time is printed too, as a command-line
call pays it once). Prints ratios; never asserts.

``--page`` measures what the dashboard's Clipping page computes instead: ``RunState.lens()`` (app/data.py), the
lens on the steps ``RunState.analysis_steps()`` picks (20 evenly spaced steps of a long run), in one warm process
(the compiled passes loaded by a call on one step), alternating with a bare polars ``group_by("step")`` sum of the
same columns over the same steps (read by value, as the lens reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rldiag import schema
from rldiag.analysis.io import open_run
from rldiag.analysis.lens import read_columns
from rldiag.analysis.recompute import stats_of_table
from rldiag.config import RecorderConfig
from rldiag.record.layout import create_run_dir
from rldiag.record.writer import parquet_options


def make_run(
    path: Path,
    rows: int,
    steps: int,
    file_rows: int = 4_000_000,
    seed: int = 0,
    extras: bool = False,
    ranks: int = 1,
) -> int:
    """Token rows of ``steps`` steps, responses of 64..2048 tokens, GRPO advantages, a rollout engine's log-probs
    (``extras``: also entropies and MoE routing agreement, for the bucket tables). ``ranks`` writers share each
    step's rows, each writing files of about ``file_rows`` rows with the recorder's Parquet options
    (:func:`rldiag.record.writer.parquet_options`; row groups of pyarrow's default 1 M rows), as a
    data-parallel run does: a row group of one rank then holds several steps."""
    config = RecorderConfig()
    create_run_dir(path, config, ranks, "bench-lens")
    rng = np.random.default_rng(seed)
    per_step = rows // steps // ranks
    buf: list[list[pa.Table]] = [[] for _ in range(ranks)]
    buffered = [0] * ranks
    part = [0] * ranks
    written = 0
    for step in range(steps):
        for rank in range(ranks):
            lengths: list[int] = []
            while sum(lengths) < per_step:
                lengths.append(int(rng.integers(64, 2049)))
            lengths[-1] -= sum(lengths) - per_step
            lengths = [n for n in lengths if n > 0]
            n = sum(lengths)
            seq = np.repeat(np.arange(len(lengths)), lengths)
            pos = np.concatenate([np.arange(k) for k in lengths])
            old = -rng.exponential(0.8, n)
            cols = {
                schema.STEP: np.full(n, step, np.int64),
                schema.RANK: np.full(n, rank, np.int32),
                schema.MICRO: (seq // 64).astype(np.int32),
                schema.SEQ: ((rank << 32) + seq).astype(np.int64),
                schema.POS: pos.astype(np.int32),
                schema.LOGP: np.minimum(old + rng.standard_t(3, n) * 0.05, 0).astype(np.float32),
                schema.OLD_LOGP: old.astype(np.float32),
                schema.ROLLOUT_LOGP: np.minimum(old + rng.normal(0, 0.03, n), 0).astype(np.float32),
                schema.ADV: np.repeat(rng.normal(size=len(lengths)), lengths).astype(np.float32),
            }
            if extras:
                cols[schema.ENTROPY] = rng.exponential(1.0, n).astype(np.float32)
                cols[schema.ROUTE_AGREE] = np.minimum(1.0, rng.uniform(0.3, 1.6, n)).astype(np.float32)
            buf[rank].append(
                pa.table(
                    {
                        k: pa.array(cols[k], type=t) if k in cols else pa.nulls(n, t)
                        for k, t in schema.TOKEN_DTYPES.items()
                    }
                )
            )
            buffered[rank] += n
            if buffered[rank] >= file_rows or step == steps - 1:
                table = pa.concat_tables(buf[rank])
                name = f"r{rank:05d}-bench-{part[rank]:06d}.parquet"
                # laid out as the recorder writes its token files (codec, dictionary on the key columns only)
                pq.write_table(table, path / schema.TOKENS_DIR / name, **parquet_options(table, config.compression))
                # the segment's statistics file: a token file without one is an orphan that readers leave out
                pq.write_table(stats_of_table(table, config, sort=False), path / schema.STATS_DIR / name)
                written += buffered[rank]
                buf[rank], buffered[rank], part[rank] = [], 0, part[rank] + 1
    return written


BENCH_DIR = str(Path(__file__).resolve().parent)

_WATCH = """
import sys, threading, time
sys.path.insert(0, {bench_dir!r})
from bench_analysis import peak_rss_kib  # VmHWM: ru_maxrss would be the parent's when it generated the run
import resource
page = resource.getpagesize()
def rss(): return int(open("/proc/self/statm").read().split()[1]) * page
class Watch:
    def __enter__(self):
        self.before, self.peak, self.done = rss(), 0, threading.Event()
        threading.Thread(target=self.loop, daemon=True).start()
        self.t = time.perf_counter()
        return self
    def loop(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss()); time.sleep(0.005)
    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t
        self.done.set()
        self.growth = max(self.peak, rss()) - self.before
"""

_BASELINE = (
    _WATCH
    + """
import polars as pl, rldiag
from rldiag.analysis.lens import read_columns
run = rldiag.open_run({run!r})
files = [str(f) for f in run.token_files()]
cols = [c for c in read_columns(run, {objectives!r}) if c != "step"]
with Watch() as w:
    pl.scan_parquet(files).group_by("step").agg(pl.col(c).sum() for c in cols).collect(engine="streaming")
print(w.elapsed, peak_rss_kib(), w.growth)
"""
)

_LENS = (
    _WATCH
    + """
import rldiag
from rldiag.analysis.lens import lens
run = rldiag.open_run({run!r})
t = time.perf_counter()
lens(run, objectives={objectives!r}, steps=run.steps()[:1])  # loads the compiled passes (numba's disk cache)
warm = time.perf_counter() - t
with Watch() as w:
    df = lens(run, objectives={objectives!r})
print(w.elapsed, peak_rss_kib(), w.growth, df.height, df.width, warm)
"""
)

_PAGE = """
import os, time, polars as pl
from app.data import RunState
from rldiag import storage
from rldiag.analysis.lens import lens, read_columns
st = RunState("bench", storage.location({run!r}))
steps = st.analysis_steps()
run = st.run
files = [str(f) for f in run.token_files()]
cols = [c for c in read_columns(run) if c != "step"]
lens(run, steps=steps[:1])  # loads the compiled passes
def bare():
    scan = pl.scan_parquet(files).filter(pl.col("step").is_in(steps))
    scan.group_by("step").agg(pl.col(c).sum() for c in cols).collect(engine="streaming")
rows = pl.scan_parquet(files).filter(pl.col("step").is_in(steps)).select(pl.len()).collect().item()
out = [len(steps), rows]
for _ in range({repeat}):
    for f in (bare, st.lens):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
out.append(os.getloadavg()[0])
print(*out)
"""

_IMPORTS = """
import sys, polars, rldiag, rldiag.analysis.io, rldiag.analysis.lens
sys.path.insert(0, {bench_dir!r})
from bench_analysis import peak_rss_kib
print(0, peak_rss_kib())
"""


def measure(code: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return [float(v) for v in out]


def page(run: Path, repeat: int) -> None:
    """The dashboard's lens call against a bare sum over the same steps, alternating in one warm process."""
    got = measure(_PAGE.format(run=str(run), repeat=repeat))
    n_steps, rows, times, load = int(got[0]), int(got[1]), got[2:-1], got[-1]
    bare, page_s = times[0::2], times[1::2]
    print(f"RunState.lens() on {n_steps} steps ({rows:,} token rows), load average {load:.1f}")
    print(f"bare group-by-step sum over those steps: {', '.join(f'{t:.2f}' for t in bare)} s")
    print(f"RunState.lens()                        : {', '.join(f'{t:.2f}' for t in page_s)} s")
    print(f"ratio per pair                         : {', '.join(f'{p / b:.1f}x' for p, b in zip(page_s, bare))}")
    print(json.dumps({"steps": n_steps, "rows": rows, "bare_s": bare, "page_s": page_s, "load_avg_1min": load}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=1, help="writers sharing each step's rows, a file series each")
    ap.add_argument("--objectives", help="comma-separated subset (default: all)")
    ap.add_argument("--repeat", type=int, default=2, help="alternate baseline and lens this many times; best kept")
    ap.add_argument("--dir", help="generate the run here (reused if present)")
    ap.add_argument("--page", action="store_true", help="the dashboard's lens call (RunState.lens) instead")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rldiag-bench-lens-"))
    run = tmp / "run"
    try:
        if not (run / schema.MANIFEST_NAME).exists():
            t = time.perf_counter()
            n = make_run(run, args.rows, args.steps, ranks=args.ranks)
            took = time.perf_counter() - t
            print(f"generated {n:,} token rows ({args.steps} steps, {args.ranks} ranks) in {took:.1f} s")
        files = sorted((run / schema.TOKENS_DIR).glob("*.parquet"))
        n = sum(pq.read_metadata(f).num_rows for f in files)
        size = sum(f.stat().st_size for f in files)
        objectives = args.objectives.split(",") if args.objectives else None
        if args.page:
            page(run, args.repeat)
            return
        read_cols = read_columns(open_run(run), objectives)
        base_t, base_rss, base_growth, lens_t, lens_rss, lens_growth = [], [], [], [], [], []
        lens_warmup: list[float] = []
        for _ in range(args.repeat):
            t, rss, growth = measure(_BASELINE.format(run=str(run), objectives=objectives, bench_dir=BENCH_DIR))
            base_t.append(t)
            base_rss.append(rss)
            base_growth.append(growth)
            t, rss, growth, height, width, warm = measure(
                _LENS.format(run=str(run), objectives=objectives, bench_dir=BENCH_DIR)
            )
            lens_warmup.append(warm)
            lens_t.append(t)
            lens_rss.append(rss)
            lens_growth.append(growth)
        _, imports = measure(_IMPORTS.format(bench_dir=BENCH_DIR))
        tb, tl = min(base_t), min(lens_t)
        gib = 2**20  # ru_maxrss is in KiB on Linux
        result = {
            "rows": n,
            "files": len(files),
            "bytes": size,
            "cpus": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "baseline_s": base_t,
            "lens_s": lens_t,
            "lens_first_call_s": lens_warmup,
            "baseline_rows_per_s": n / tb,
            "lens_rows_per_s": n / tl,
            "time_ratio": tl / tb,
            "baseline_peak_rss_gib": max(base_rss) / gib,
            "lens_peak_rss_gib": max(lens_rss) / gib,
            "import_rss_gib": imports / gib,
            "baseline_rss_growth_gib": max(base_growth) / 2**30,
            "lens_rss_growth_gib": max(lens_growth) / 2**30,
            "output": [int(height), int(width)],
            "baseline_columns": read_cols,
        }
        print(
            f"{n:,} token rows in {len(files)} files ({size / 2**30:.2f} GiB), {os.cpu_count()} CPUs, "
            f"load average {result['load_avg_1min']:.1f}"
        )
        bg, lg = max(base_growth) / 2**30, max(lens_growth) / 2**30
        print(
            f"bare group-by-step sum ({len(read_cols) - 1} cols): {tb:7.2f} s  {n / tb / 1e6:7.1f} M rows/s  "
            f"peak RSS {max(base_rss) / gib:.2f} GiB (the call added {bg:.2f} GiB)"
        )
        print(
            f"lens, {'all' if objectives is None else len(objectives)} objectives  : {tl:7.2f} s  "
            f"{n / tl / 1e6:7.1f} M rows/s  peak RSS {max(lens_rss) / gib:.2f} GiB (the call added {lg:.2f} GiB); "
            f"a first call on one step before it (loading the compiled passes): {min(lens_warmup):.2f} s"
        )
        print(
            f"ratio lens / bare             : {tl / tb:7.1f}x time, {max(lens_rss) / max(base_rss):.2f}x peak RSS, "
            f"{lg / bg if bg > 0 else float('nan'):.2f}x RSS added (imports alone peak at {imports / gib:.2f} GiB)"
        )
        print(json.dumps(result))
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
