"""Analysis-layer speed and memory (issue: metric registry), against baselines measured in the same run.

    python benchmarks/bench_analysis.py stats      # 10,000 steps x 8 ranks x 4 micro-batches
    python benchmarks/bench_analysis.py recompute --rows 20000000 [--shape recorder]
    python benchmarks/bench_analysis.py memory --rows 200000000   # peak RSS of a streaming recompute

stats:     open_run + step_metrics from stored statistics vs a bare read of the statistics files.
recompute: step_metrics(config=...) and step_metrics(from_tokens=True) from token rows (tokens/s), each vs a
           bare polars group-by-step sum of every column it reads (the run's non-null ones among
           recompute.token_read_columns), over the same files, interleaved in the same process. Run shapes
           (--shape): "analysis", 10,000 tokens per step in the recorder's file layout; "recorder", written by
           rldiag.Recorder, one record of 128 x 1024 positions per step (bench_buckets.make_recorder_run).
memory:    peak RSS (VmHWM) of the recompute over a large run, in a fresh process.
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

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import rldiag
from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.record.layout import create_run_dir
from rldiag.record.writer import parquet_options, summary_metadata, write_parquet
from rldiag.stats import kernel
from rldiag.stats.table import to_table


def make_stats_run(
    path: Path, steps: int, ranks: int, micros: int, tokens_per_record: int = 256, summaries: bool = True
) -> None:
    """A run whose statistics come from the kernel on synthetic records (one file per rank per 500 steps)."""
    cfg = RecorderConfig()
    create_run_dir(path, cfg, ranks, "bench")
    rng = np.random.default_rng(0)
    seqlen = 64
    per_rec = tokens_per_record // seqlen
    chunk = 500
    for rank in range(ranks):
        for s0 in range(0, steps, chunk):
            n_rec = min(chunk, steps - s0) * micros
            n_seq = n_rec * per_rec
            N = n_seq * seqlen
            lp = -rng.exponential(1, N)
            tb = kernel.TokenBatch(
                rec_off=np.arange(0, n_seq + 1, per_rec),
                seq_off=np.arange(0, N + 1, seqlen),
                steps=np.repeat(np.arange(s0, s0 + n_rec // micros), micros),
                logp=lp,
                old_logp=np.minimum(lp + rng.normal(0, 0.05, N), 0),
                adv=np.repeat(rng.normal(size=n_seq), seqlen),
                pos=np.tile(np.arange(seqlen), n_seq),
                entropy=rng.exponential(1, N),
                group=np.arange(n_seq) // 4,
                reward=rng.random(n_seq),
            )
            st = kernel.compute(tb, cfg)
            table = to_table(st, tb.steps, np.full(n_rec, rank), np.tile(np.arange(micros), n_rec // micros))
            # as the recorder's writer publishes a statistics segment (zstd, dictionary only on the key columns,
            # the write-time summary in the footer; ``summaries=False``: as an older rldiag wrote it)
            footer = summary_metadata(table) if summaries else None
            write_parquet(table, path / "stats" / f"r{rank:05d}-bench-{s0:08d}.parquet", "zstd", footer)


def make_token_run(path: Path, rows: int, steps: int = 2000, file_rows: int = 4_000_000) -> None:
    """Token rows in the recorder's file layout (and their statistics, so the run opens)."""
    from rldiag.analysis.recompute import stats_of_table

    cfg = RecorderConfig()
    create_run_dir(path, cfg, 1, "bench")
    rng = np.random.default_rng(1)
    per_step = max(rows // steps, 256)
    seqlen = 256
    step = 0
    written = 0
    i = 0
    while written < rows:
        n_steps = max(1, file_rows // per_step)
        n = n_steps * per_step
        n_seq = n // seqlen
        n = n_seq * seqlen
        lp = (-rng.exponential(1, n)).astype(np.float32)
        cols = {
            "step": np.repeat(np.arange(step, step + n_steps), n // n_steps + 1)[:n].astype(np.int64),
            "rank": np.zeros(n, np.int32),
            "micro": np.zeros(n, np.int32),
            "seq": np.repeat(np.arange(n_seq), seqlen).astype(np.int64),
            "group": np.repeat(np.arange(n_seq) // 8, seqlen).astype(np.int64),
            "pos": np.tile(np.arange(seqlen), n_seq).astype(np.int32),
            "logp": lp,
            "old_logp": np.minimum(lp + rng.normal(0, 0.05, n).astype(np.float32), 0),
            "adv": np.repeat(rng.normal(size=n_seq), seqlen).astype(np.float32),
            "entropy": rng.exponential(1, n).astype(np.float32),
        }
        # keep sequences whole within a step
        cols["step"] = (step + (cols["seq"] * n_steps) // n_seq).astype(np.int64)
        table = pa.table(
            {k: pa.array(cols.get(k), type=t) if k in cols else pa.nulls(n, t) for k, t in schema.TOKEN_DTYPES.items()}
        )
        name = f"r00000-bench-{i:06d}.parquet"
        pq.write_table(table, path / "tokens" / name, **parquet_options(table, cfg.compression))
        pq.write_table(stats_of_table(table, cfg, sort=False), path / "stats" / name)
        written += n
        step += n_steps
        i += 1


def token_run(args: argparse.Namespace) -> Path:
    """The folder holding ``run/``: ``--dir`` (reused when it already has a run) or a new temporary one."""
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rldiag-bench-"))
    if not (tmp / "run" / "manifest.json").exists():
        t = time.perf_counter()
        if args.shape == "recorder":
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_buckets import make_recorder_run

            n = make_recorder_run(tmp / "run", args.rows)
            print(f"generated {n:,} token positions (recorder shape) in {time.perf_counter() - t:.1f} s")
        else:
            make_token_run(tmp / "run", args.rows)
            print(f"generated {args.rows:,} token rows in {time.perf_counter() - t:.1f} s")
    return tmp


def read_columns(files: list[str], config_only: bool) -> list[str]:
    """The columns a recompute decodes from ``files``: those it asks for that hold a value somewhere (all-null
    columns are skipped by their statistics, as the recompute does)."""
    from rldiag.analysis.recompute import token_read_columns

    out = []
    for name in token_read_columns(config_only=config_only):
        for f in files:
            md = pq.read_metadata(f)
            i = md.schema.to_arrow_schema().get_field_index(name)
            groups = (md.row_group(g) for g in range(md.num_row_groups))
            if i >= 0 and any(rg.column(i).statistics.null_count < rg.num_rows for rg in groups):
                out.append(name)
                break
    return out


def bare_sum(files: list[str], columns: list[str]) -> float:
    """Seconds of a bare polars ``group_by("step")`` sum of ``columns`` over ``files``."""
    t = time.perf_counter()
    pl.scan_parquet(files).group_by("step").agg(pl.col(c).sum() for c in columns if c != "step").collect()
    return time.perf_counter() - t


_FRESH_OPEN = """
import sys, time
t = time.perf_counter()
import rldiag, rldiag.analysis.io
t_import = time.perf_counter() - t
t = time.perf_counter()
run = rldiag.open_run(sys.argv[1])
run.step_metrics()
print(t_import, time.perf_counter() - t)
"""


def bench_stats(args: argparse.Namespace) -> None:
    """First open of a run without an index (fresh process and in this one), then with the index, against a bare
    pyarrow read of every statistics file of the run as an older rldiag wrote it (the same records, no summaries),
    measured in the same run; for a run written by this rldiag (segment summaries in the footers) and for the
    older run."""
    tmp = Path(tempfile.mkdtemp(prefix="rldiag-bench-"))
    try:
        t = time.perf_counter()
        for summaries in (True, False):
            path = tmp / ("run" if summaries else "old")
            make_stats_run(path, args.steps, args.ranks, args.micros, summaries=summaries)
        print(
            f"generated {args.steps} steps x {args.ranks} ranks x {args.micros} micro-batches twice, with and without "
            f"write-time summaries, in {time.perf_counter() - t:.1f} s"
        )
        files = sorted((tmp / "old" / "stats").glob("*.parquet"))
        t_bare = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            bare = pa.concat_tables([pq.read_table(f) for f in files])
            t_bare = min(t_bare, time.perf_counter() - t)
        print(f"bare read of the records (no summaries): {t_bare:6.3f} s ({bare.num_rows:,} rows, {len(files)} files)")
        del bare
        results = {}
        for kind, summaries in (("with write-time summaries (this rldiag's writer)", True), ("older run", False)):
            print(f"\n== {kind}")
            results[summaries] = _bench_first_open(tmp / ("run" if summaries else "old"), args.repeat, t_bare)
        a, b = results[True], results[False]
        worst = 0.0
        for col in a.columns[1:]:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            assert np.array_equal(np.isnan(x), np.isnan(y)), col
            ok = np.isfinite(x) & np.isfinite(y) & (y != 0)
            if ok.any():
                worst = max(worst, float(np.max(np.abs(x[ok] / y[ok] - 1))))
        print(f"\nstep metrics with summaries vs without: largest relative difference {worst:.1e} (rounding)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_first_open(path: Path, repeat: int, t_bare: float) -> pl.DataFrame:
    from rldiag.analysis.scan import INDEX_DIR

    fresh = []
    for _ in range(max(1, min(repeat, 3))):
        shutil.rmtree(path / INDEX_DIR, ignore_errors=True)
        out = subprocess.run(
            [sys.executable, "-c", _FRESH_OPEN, str(path)], capture_output=True, text=True, check=True
        ).stdout.split()
        fresh.append((float(out[0]), float(out[1])))
    t_import, t_fresh = min(fresh, key=lambda x: x[1])
    print(
        f"fresh process: import {t_import:.3f} s, then open_run + step_metrics (no index; loads the compiled "
        f"kernels from numba's cache): {t_fresh:6.3f} s best of {len(fresh)} (target < 1 s); ratio to bare read "
        f"{t_fresh / t_bare:.2f}"
    )
    best = float("inf")
    for _ in range(max(1, min(repeat, 3))):
        shutil.rmtree(path / INDEX_DIR, ignore_errors=True)
        t = time.perf_counter()
        run = rldiag.open_run(path)
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        df = run.step_metrics()
        t_metrics = time.perf_counter() - t
        best = min(best, t_open + t_metrics)
        print(
            f"this process, no index: open_run {t_open:6.3f} s (reads, validates, compacts, writes the index) + "
            f"step_metrics ({df.width - 1} metrics, {df.height} steps) {t_metrics:6.3f} s = {t_open + t_metrics:6.3f} s"
        )
    print(f"  best: {best:6.3f} s; ratio to bare read {best / t_bare:.2f}")
    t = time.perf_counter()
    warm = rldiag.open_run(path)
    df2 = warm.step_metrics()
    t_warm = time.perf_counter() - t
    assert df2.equals(df)
    print(
        f"open + step_metrics, run index    : {t_warm:6.3f} s  (target < 1 s); ratio to bare read {t_warm / t_bare:.3f}"
    )
    return df


def bench_recompute(args: argparse.Namespace) -> None:
    tmp = token_run(args)
    try:
        run = rldiag.open_run(tmp / "run")
        files = [str(f) for f in run.token_files()]
        n = sum(pq.read_metadata(f).num_rows for f in files)
        t = time.perf_counter()
        run.step_metrics(steps=[0], config=run.config.replace(eps_high=0.28), from_tokens=True)
        print(
            f"first call in the process (loads the compiled kernels from numba's cache): "
            f"{time.perf_counter() - t:.2f} s, not counted below"
        )
        cfg = run.config.replace(eps_high=0.28)
        conf_cols, full_cols = read_columns(files, True), read_columns(files, False)
        bare3, bare_conf, conf, bare_full, full = [], [], [], [], []
        for _ in range(args.repeat):
            bare3.append(bare_sum(files, ["logp", "old_logp", "adv"]))
            bare_conf.append(bare_sum(files, conf_cols))
            t = time.perf_counter()
            df = run.step_metrics(config=cfg)
            conf.append(time.perf_counter() - t)
            bare_full.append(bare_sum(files, full_cols))
            t = time.perf_counter()
            df_full = run.step_metrics(config=cfg, from_tokens=True)
            full.append(time.perf_counter() - t)
        assert df.width == df_full.width
        med = {
            k: float(np.median(v))
            for k, v in (("b3", bare3), ("bc", bare_conf), ("c", conf), ("bf", bare_full), ("f", full))
        }
        pairs = {k: np.array(a) / np.array(b) for k, a, b in (("c", conf, bare_conf), ("f", full, bare_full))}
        print(f"{n:,} token rows, {len(files)} files; median of {args.repeat} interleaved repeats")
        print(f"bare sum of logp, old_logp, adv (the earlier baseline): {med['b3']:6.2f} s")
        for key, label, cols in (
            ("c", "config recompute", conf_cols),
            ("f", "every statistic from token rows", full_cols),
        ):
            b, t_ = med["b" + key], med[key]
            print(f"{label}: reads {len(cols)} columns ({', '.join(cols)})")
            print(f"  bare polars group-by-step sum of them: {b:6.2f} s ({n / b / 1e6:6.1f} M rows/s)")
            print(
                f"  {label:<37}: {t_:6.2f} s ({n / t_ / 1e6:6.1f} M tokens/s); ratio to its bare sum "
                f"{t_ / b:.2f}x (per repeat {pairs[key].min():.2f}-{pairs[key].max():.2f}x; target 1.5x)"
            )
        print(f"  (both give all {df.width - 1} metrics)")
        print(
            f"peak RSS of this process               : "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        )
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_kib() -> int:
    """Peak RSS of this process in KiB (``VmHWM``). Not ``ru_maxrss``: Linux keeps that across ``exec``, so a
    child of a process that generated a large run reported the parent's peak (1.17 GiB at 200 M rows)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - not Linux


def bench_memory(args: argparse.Namespace) -> None:
    tmp = token_run(args)
    try:
        base = subprocess.run(
            [
                sys.executable,
                "-c",
                "import rldiag, rldiag.analysis.io, numba, sys; sys.path.insert(0, 'benchmarks'); "
                "from bench_analysis import peak_rss_kib; print(peak_rss_kib())",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        ).stdout.split()
        files = [str(f) for f in rldiag.open_run(tmp / "run").token_files()]
        n = sum(pq.read_metadata(f).num_rows for f in files)
        for label, call, config_only in (
            ("config recompute", "config=r.config.replace(eps_high=0.28)", True),
            ("every statistic from token rows", "config=r.config.replace(eps_high=0.28), from_tokens=True", False),
        ):
            # the recompute first (its peak RSS), then the bare sum of the columns it reads, in the same process
            code = (
                "import resource, sys, time, rldiag; sys.path.insert(0, 'benchmarks'); "
                "from bench_analysis import bare_sum; "
                f"r = rldiag.open_run({str(tmp / 'run')!r}); t = time.perf_counter(); "
                f"df = r.step_metrics({call}); t = time.perf_counter() - t; "
                "from bench_analysis import peak_rss_kib; rss = peak_rss_kib(); "
                f"b = bare_sum({files!r}, {read_columns(files, config_only)!r}); "
                "print(f'{t:.2f} {rss} {b:.2f}')"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).parent.parent,
            ).stdout.split()
            t, rss, b = float(out[0]), int(out[1]), float(out[2])
            print(
                f"{label} of {n:,} token rows, fresh process: {t:.1f} s ({n / t / 1e6:.1f} M tokens/s), "
                f"{t / b:.2f}x the bare sum of its columns ({b:.1f} s, after it); peak RSS {rss / 2**20:.2f} GiB "
                f"(import baseline {int(base[0]) / 2**20:.2f} GiB; target < 2 GB)"
            )
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("stats", "recompute", "memory"))
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--micros", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--dir", help="reuse a generated run in this folder")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shape", choices=("analysis", "recorder"), default="analysis", help="recompute/memory run shape")
    args = ap.parse_args()
    {"stats": bench_stats, "recompute": bench_recompute, "memory": bench_memory}[args.what](args)


if __name__ == "__main__":
    main()
