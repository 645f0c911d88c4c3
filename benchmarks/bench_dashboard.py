"""Dashboard server-side cost on a big run, against a bare read of the statistics table in the same run.

    python benchmarks/bench_dashboard.py                      # 2,000 steps x 25,000 tokens = 50 M token rows
    python benchmarks/bench_dashboard.py --steps 200          # a quick look
    python benchmarks/bench_dashboard.py --workdir /data/b --keep   # reuse a generated run

The run is written in the recorder's format without going through ``record()``: per segment of steps the
synthetic tokens pass once through the statistics kernel (the same code the recorder's writer runs), and the
token rows and statistics go to ``tokens/`` and ``stats/`` as the writer lays them out (one segment per
``roll_rows`` rows, zstd, rldiag metadata). Two processes generate segments in parallel.

Measured, server-side (no browser): what a callback does, plus the JSON encoding Dash applies.

* baseline: read every statistics file (``pyarrow.parquet.read_table``), nothing else;
* overview cold: open the run, finalize all metrics, build and encode every Overview panel;
* overview warm: the same with the run's metrics cached (the next visitor, a smoothing change);
* live tick: one new step lands (a real ``rldiag.Recorder`` appends it), then one poll: rescan, metrics of
  the new step, ``extendData`` for every Overview panel; and a poll with nothing new;
* tokens page: the worst tokens of one step (scan, three rankings, context, rendering).

Prints seconds and ratios to the baseline; never asserts. Issue 7's targets: Overview < 1 s, tick < 100 ms,
Tokens page < 2 s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rldiag import __version__, schema
from rldiag.config import RecorderConfig
from rldiag.record.layout import create_run_dir, segment_name, write_writer_file
from rldiag.record.writer import summary_metadata, write_parquet
from rldiag.stats import kernel
from rldiag.stats.table import to_table


@dataclass(frozen=True)
class Config:
    steps: int = 2_000
    """Optimizer steps of the run."""
    tokens_per_step: int = 25_000
    """Token rows per step: 2,000 x 25,000 = 50 M."""
    micros: int = 4
    """Records (micro-batches) per step."""
    seq_len: int = 250
    """Tokens per response."""
    roll_rows: int = 4_000_000
    """Rows per segment file, as ``RecorderConfig.roll_rows``."""
    repeats: int = 5
    """Timed repetitions of each warm measurement (the median is printed)."""


WRITER = "r00000-bench-1-0"


def _segment(args: tuple[Path, Config, int, int, int]) -> int:
    """Write one segment (steps s0..s1) of token rows and their statistics; returns rows written."""
    path, cfg, seg, s0, s1 = args
    rng = np.random.default_rng(seg)
    rcfg = RecorderConfig()
    per_rec = cfg.tokens_per_step // cfg.micros
    seqs_per_rec = max(per_rec // cfg.seq_len, 1)
    n_rec = (s1 - s0) * cfg.micros
    n_seq = n_rec * seqs_per_rec
    N = n_seq * cfg.seq_len
    steps_rec = np.repeat(np.arange(s0, s1), cfg.micros)
    step_frac = np.repeat(steps_rec, seqs_per_rec * cfg.seq_len) / max(cfg.steps, 1)

    old = -rng.exponential(1.0, N).astype(np.float32)
    logp = np.minimum(old + rng.normal(0, 0.02 + 0.1 * step_frac).astype(np.float32), 0.0).astype(np.float32)
    spikes = rng.random(N) < 2e-6  # a handful of tokens with a huge ratio
    logp[spikes] = np.minimum(old[spikes] + 5.0, 0.0)
    old[spikes] = logp[spikes] - 5.0
    adv_seq = rng.normal(0, 1, n_seq).astype(np.float32)
    reward = (rng.random(n_seq) < 0.5).astype(np.float32)
    group = np.arange(n_seq) // 8
    entropy = rng.exponential(1.5 * (1 - 0.5 * step_frac)).astype(np.float32)
    rollout = (old + rng.normal(0, 0.01, N)).astype(np.float32)
    version = np.repeat(np.maximum(steps_rec - 1, 0), seqs_per_rec)
    pos = np.tile(np.arange(cfg.seq_len, dtype=np.int32), n_seq)
    seq_in_rec = np.tile(np.repeat(np.arange(seqs_per_rec), cfg.seq_len), n_rec)
    micro_tok = np.repeat(np.tile(np.arange(cfg.micros), s1 - s0), seqs_per_rec * cfg.seq_len)
    rep = np.repeat(np.arange(n_seq), cfg.seq_len)

    tb = kernel.TokenBatch(
        rec_off=np.arange(0, n_seq + 1, seqs_per_rec),
        seq_off=np.arange(0, N + 1, cfg.seq_len),
        steps=steps_rec,
        logp=logp,
        old_logp=old,
        adv=adv_seq[rep],
        pos=pos,
        entropy=entropy,
        rollout_logp=rollout,
        version=version[rep],
        group=group,
        reward=reward,
    )
    st = kernel.compute(tb, rcfg)
    stats = to_table(st, steps_rec, np.zeros(n_rec), np.tile(np.arange(cfg.micros), s1 - s0))
    cols = {
        schema.STEP: np.repeat(steps_rec, seqs_per_rec * cfg.seq_len).astype(np.int64),
        schema.RANK: np.zeros(N, np.int32),
        schema.MICRO: micro_tok.astype(np.int32),
        schema.SEQ: (micro_tok * seqs_per_rec + seq_in_rec).astype(np.int64),
        schema.GROUP: group[rep].astype(np.int64),
        schema.POS: pos,
        schema.LOGP: logp,
        schema.OLD_LOGP: old,
        schema.ROLLOUT_LOGP: rollout,
        schema.ADV: adv_seq[rep],
        schema.ENTROPY: entropy,
        schema.TOKEN_ID: rng.integers(0, 32_000, N).astype(np.int32),
        schema.REWARD: reward[rep],
        schema.VERSION: version[rep].astype(np.int64),
        schema.COV: st.cov.astype(np.float32),
    }
    tokens = pa.table(
        {
            name: (pa.array(cols[name], type=dt) if name in cols else pa.nulls(N, type=dt))
            for name, dt in schema.TOKEN_DTYPES.items()
        }
    )
    meta = {
        schema.PARQUET_META_KEY: json.dumps(
            {
                "schema_version": schema.SCHEMA_VERSION,
                "rldiag_version": __version__,
                "writer": WRITER,
                "rank": 0,
                "config": rcfg.to_dict(),
            }
        ).encode()
    }
    name = segment_name(WRITER, seg)
    pq.write_table(tokens.replace_schema_metadata(meta), path / schema.TOKENS_DIR / name, compression=rcfg.compression)
    # as the writer publishes statistics (its options, the write-time summary where a step has several records)
    write_parquet(stats.replace_schema_metadata(meta), path / schema.STATS_DIR / name, "zstd", summary_metadata(stats))
    return N


def generate(path: Path, cfg: Config) -> float:
    """Write the run; returns seconds taken."""
    t0 = time.perf_counter()
    create_run_dir(path, RecorderConfig(), 1, "bench-dashboard")
    write_writer_file(
        path,
        WRITER,
        {
            "writer": WRITER,
            "rank": 0,
            "world_size": 1,
            "host": "bench",
            "pid": 1,
            "started": time.time(),
            "first_step": 0,
            "closed": True,
        },
    )
    steps_per_seg = max(cfg.roll_rows // cfg.tokens_per_step, 1)
    jobs = [
        (path, cfg, i, s0, min(s0 + steps_per_seg, cfg.steps))
        for i, s0 in enumerate(range(0, cfg.steps, steps_per_seg))
    ]
    with mp.get_context("spawn").Pool(2) as pool:
        rows = sum(pool.imap_unordered(_segment, jobs))
    print(f"generated {rows:,} token rows, {cfg.steps} steps, {len(jobs)} segments in {time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    samples: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _encode(component: object) -> int:
    """Bytes of a layout or figure as Dash sends it."""
    from plotly.io.json import to_json_plotly

    return len(to_json_plotly(component))


def _wait_warm(cat: object, timeout: float = 600.0) -> None:
    """Until the catalog's background loader has opened every run it was given."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        thread = getattr(cat, "_warm_thread", None)
        if thread is None or not thread.is_alive():
            return
        time.sleep(0.02)


def scale(work: Path, *, long_steps: int, runs: int, repeats: int) -> None:
    """Issue 15's scale targets: a run of ``long_steps`` steps and a folder of ``runs`` runs.

    Baselines, in the same process: a bare read of the long run's statistics files, and a bare read of every
    statistics file of the folder (one ``read_table`` per run). Measured: the Runs page over the folder (layout
    built and encoded, nothing cached: a fresh catalog), the same page's refresh (cached), the Overview of the
    long run uncached and cached, and a live tick on it with one new step.
    """
    import importlib
    import warnings

    import rldiag
    from app import data, ids, panels
    from app.app import create_app, live_tick, render_panel

    warnings.simplefilter("ignore")  # the copies' configs and skipped files are not what is measured
    long_dir = work / "scale-long" / "long"
    if not (long_dir / schema.MANIFEST_NAME).exists():
        # 1 M rows per segment: 20 segments, as a recorder rolling by rows would leave (the reader then keeps a
        # run index, .rldiag-index/, from the first open on)
        generate(long_dir, Config(steps=long_steps, tokens_per_step=200, micros=1, seq_len=100, roll_rows=1_000_000))
    folder = work / "scale-folder"
    if not (folder / f"run{runs - 1:03d}" / schema.MANIFEST_NAME).exists():
        shutil.rmtree(folder, ignore_errors=True)
        generate(folder / "run000", Config(steps=100, tokens_per_step=1_000, micros=2, seq_len=100))
        for i in range(1, runs):
            shutil.copytree(folder / "run000", folder / f"run{i:03d}")
            manifest = folder / f"run{i:03d}" / schema.MANIFEST_NAME
            m = json.loads(manifest.read_text())
            m["name"], m["tags"] = f"run{i:03d}", {"lr": [1e-6, 3e-6][i % 2], "seed": i // 2}
            manifest.write_text(json.dumps(m))

    long_files = sorted((long_dir / schema.STATS_DIR).glob("*.parquet"))
    base_long = timed(lambda: pq.read_table(long_files), repeats)
    folder_files = [sorted((d / schema.STATS_DIR).glob("*.parquet")) for d in sorted(folder.iterdir())]
    base_folder = timed(lambda: [pq.read_table(f) for f in folder_files], 1)
    print(
        f"baselines: bare read of the {long_steps:,}-step run's statistics {base_long * 1e3:.0f} ms; of the "
        f"{runs} runs' statistics {base_folder * 1e3:.0f} ms"
    )

    app = create_app(folder)
    with app.server.test_request_context():
        runs_page = importlib.import_module("app.pages.runs")
        first = timed(lambda: _encode(runs_page.layout()))
        cat = data.catalog()
        _wait_warm(cat)
        cat._states.clear()  # forget every run: the next render opens them again
        cat._scanned_at = 0.0
        t0 = time.perf_counter()
        table, _ = runs_page.refresh_table(None, 0, 0, [], None, None)
        cold = time.perf_counter() - t0
        _encode(table)
        ready = sum(1 for r in cat.run_ids() if cat.state(r).loaded)
        _wait_warm(cat)
        filled = time.perf_counter() - t0
        warm = timed(lambda: _encode(runs_page.refresh_table(None, 0, 1, [], None, None)), repeats)
        print(
            f"runs page, {runs} runs, nothing cached: {cold * 1e3:.0f} ms ({cold / base_folder:.2f}x the folder's "
            f"bare read) with {ready} runs complete, all {runs} filled in from the background after "
            f"{filled:.1f} s ({filled / base_folder:.1f}x); first render after start {first * 1e3:.0f} ms; "
            f"refresh, cached {warm * 1e3:.0f} ms ({warm / base_folder:.2f}x)"
        )

    panel_ids = [ids.panel("overview", p.key, p.metrics) for p in panels.overview_panels()]
    app = create_app(long_dir.parent)
    with app.server.test_request_context():
        cat = data.catalog()

        def overview() -> None:
            _encode(importlib.import_module("app.pages.overview").layout(run="long"))
            for pid in panel_ids:
                _encode(render_panel(pid, ["long"], 0.6, None))

        from rldiag.analysis.scan import INDEX_DIR

        shutil.rmtree(long_dir / INDEX_DIR, ignore_errors=True)
        cat._states.clear()
        never = timed(overview)  # the first open ever: no run index on disk yet (it is written now)
        cold_samples: list[float] = []
        for _ in range(repeats):
            cat._states.clear()
            cold_samples.append(timed(overview))
        warm = timed(overview, repeats)
        c = statistics.median(cold_samples)
        print(
            f"overview of {long_steps:,} steps ({len(panel_ids)} panels): not cached {c * 1e3:.0f} ms "
            f"({c / base_long:.1f}x bare read; the run's first open ever, before its index exists: "
            f"{never * 1e3:.0f} ms, {never / base_long:.1f}x); cached {warm * 1e3:.0f} ms ({warm / base_long:.2f}x)"
        )
        rec = rldiag.Recorder(long_dir, roll_steps=1)
        rng = np.random.default_rng(0)
        ticks = []
        for k in range(repeats):
            old = -rng.exponential(1.0, (2, 100)).astype(np.float32)
            rec.record(
                step=long_steps + k,
                logprobs=np.minimum(old + 0.01, 0),
                old_logprobs=old,
                advantages=rng.normal(size=2).astype(np.float32),
            )
            rec.flush()
            t0 = time.perf_counter()
            extends, *_ = live_tick(["long"], panel_ids, 0.6, k)
            _encode(extends)
            ticks.append(time.perf_counter() - t0)
        rec.close()
        tick = statistics.median(ticks)
        print(f"live tick on the {long_steps:,}-step run, one new step: {tick * 1e3:.1f} ms ({tick / base_long:.2f}x)")
        for sub in (schema.STATS_DIR, schema.TOKENS_DIR, schema.WRITERS_DIR, "live"):
            for f in (long_dir / sub).glob(f"{rec.writer_id}*"):
                f.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--tokens-per-step", type=int, default=Config.tokens_per_step)
    ap.add_argument("--workdir", type=Path, default=None, help="where the run is written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated run")
    ap.add_argument(
        "--scale",
        action="store_true",
        help="only the scale targets: a 100,000-step run and a folder of 200 runs (--long-steps, --runs)",
    )
    ap.add_argument("--long-steps", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    if a.scale:
        work = a.workdir or Path(tempfile.mkdtemp(prefix="rldiag-bench-scale-"))
        try:
            scale(work, long_steps=a.long_steps, runs=a.runs, repeats=Config.repeats)
        finally:
            if not a.keep and a.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    cfg = Config(steps=a.steps, tokens_per_step=a.tokens_per_step)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rldiag-bench-dashboard-"))
    run_dir = work / "big"
    if not (a.keep and (run_dir / schema.MANIFEST_NAME).exists()):
        shutil.rmtree(run_dir, ignore_errors=True)
        generate(run_dir, cfg)

    import importlib

    from plotly.io.json import to_json_plotly  # what Dash encodes callback outputs with

    import rldiag
    from app import data, ids, panels
    from app.app import create_app, live_tick, render_panel

    stats_files = sorted((run_dir / schema.STATS_DIR).glob("*.parquet"))
    baseline = timed(lambda: pq.read_table(stats_files), cfg.repeats)
    print(f"baseline: read the statistics table ({len(stats_files)} files): {baseline * 1e3:.1f} ms")

    panel_ids = [ids.panel("overview", p.key, p.metrics) for p in panels.overview_panels()]

    def build_overview() -> None:
        importlib.import_module("app.pages.overview").layout(run="big")
        for pid in panel_ids:
            to_json_plotly(render_panel(pid, ["big"], 0.6, None))

    app = create_app(work)
    with app.server.test_request_context():
        cat = data.catalog()
        first = timed(build_overview)
        cat._states.clear()  # forget the run: the next build opens it and finalizes every metric again
        cold = timed(build_overview)
        warm = timed(build_overview, cfg.repeats)
        print(
            f"overview ({len(panel_ids)} panels): first request after start {first * 1e3:.0f} ms (imports, "
            f"numba cache load); run not cached {cold * 1e3:.0f} ms ({cold / baseline:.1f}x baseline); "
            f"cached {warm * 1e3:.0f} ms ({warm / baseline:.2f}x)"
        )

        idle = timed(lambda: live_tick(["big"], panel_ids, 0.6, 0), cfg.repeats)
        ticks = []
        rec = rldiag.Recorder(run_dir, roll_steps=1)
        rng = np.random.default_rng(0)
        for k in range(cfg.repeats):
            old = -rng.exponential(1.0, (100, 250)).astype(np.float32)
            rec.record(
                step=cfg.steps + k,
                logprobs=np.minimum(old + 0.01, 0),
                old_logprobs=old,
                advantages=rng.normal(size=100).astype(np.float32),
            )
            rec.flush()  # the step's segment is published: the next poll finds it
            t0 = time.perf_counter()
            extends, *_ = live_tick(["big"], panel_ids, 0.6, k)
            to_json_plotly(extends)
            ticks.append(time.perf_counter() - t0)
        rec.close()
        tick = statistics.median(ticks)
        print(
            f"live tick, one new step: {tick * 1e3:.1f} ms ({tick / baseline:.2f}x baseline); "
            f"nothing new: {idle * 1e3:.2f} ms"
        )

        tokens_page = importlib.import_module("app.pages.tokens")
        mid = cfg.steps // 2
        tok_first = timed(lambda: tokens_page.token_body("big", mid, "logratio", 10))
        tok = timed(lambda: tokens_page.token_body("big", mid + 1, "logratio", 10), cfg.repeats)
        st = data.catalog().state("big")
        steps_used = len(st.analysis_steps())
        buckets = timed(lambda: st.bucket_metrics("pos"))
        lens = timed(st.lens)
        print(
            f"positions page table (bucket_metrics on {steps_used} steps): {buckets:.2f} s; objective lens: "
            f"{lens:.2f} s (analysis layer; first use includes numba cache loading)"
        )
        n_files = sum(1 for _ in (run_dir / schema.TOKENS_DIR).glob("*.parquet"))
        print(
            f"tokens page, one step of {cfg.tokens_per_step:,} rows in a {cfg.steps * cfg.tokens_per_step:,}-row run "
            f"({n_files} token files): first {tok_first * 1e3:.0f} ms, median {tok * 1e3:.0f} ms "
            f"({tok / baseline:.1f}x baseline)"
        )
        for sub in (schema.STATS_DIR, schema.TOKENS_DIR, schema.WRITERS_DIR):  # leave the run as generated
            for f in (run_dir / sub).glob(f"{rec.writer_id}*"):
                f.unlink()
    if not a.keep and a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
