"""Cold start: how long a recorder's first statistics take to be published when numba's cache is empty (a fresh
container) and when it is filled (``rldiag precompile``), each in a fresh process with its own
``NUMBA_CACHE_DIR``. The baseline is the filled cache, measured in the same run; prints each ratio to it.

    python benchmarks/bench_coldstart.py [--gap 12] [--repeat 2]

``--gap``: seconds between creating the recorder and its first record (a trainer loading its model and sampling
its first rollout); the recorder loads or compiles its kernel in that time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import glob, sys, time
    import torch, rldiag
    run_dir, gap = sys.argv[1], float(sys.argv[2])
    rec = rldiag.Recorder(run_dir, config=rldiag.RecorderConfig(roll_seconds=1.0))
    time.sleep(gap)
    x = -torch.rand(64, 256)
    t = time.perf_counter()
    rec.record(step=1, logprobs=x, old_logprobs=x, advantages=torch.randn(64, 256),
               mask=torch.ones(64, 256, dtype=torch.bool))
    while not glob.glob(run_dir + "/stats/*.parquet"):
        time.sleep(0.01)
    print(time.perf_counter() - t)
    rec.close()
    """
)


def first_publish(cache: Path, gap: float, tmp: Path) -> float:
    """Seconds from the first record to its published statistics, in a fresh process using ``cache``."""
    run_dir = tempfile.mkdtemp(dir=tmp)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, run_dir + "/run", str(gap)], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gap", type=float, default=12.0, help="seconds from the recorder's creation to its first record")
    p.add_argument("--repeat", type=int, default=2, help="measurements of each case (each with a new empty cache)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        filled = tmp / "filled"
        env = {**os.environ, "NUMBA_CACHE_DIR": str(filled), "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "rldiag", "precompile"], env=env, check=True, capture_output=True)
        rows: dict[str, list[float]] = {
            "filled cache (rldiag precompile), first record at once": [],
            "empty cache, first record at once": [],
            f"empty cache, first record {args.gap:g} s after the recorder was created": [],
        }
        names = list(rows)
        for i in range(args.repeat):
            rows[names[0]].append(first_publish(filled, 0.0, tmp))
            rows[names[1]].append(first_publish(tmp / f"empty-a{i}", 0.0, tmp))
            rows[names[2]].append(first_publish(tmp / f"empty-b{i}", args.gap, tmp))
    base = statistics.median(rows[names[0]])
    print("seconds from the first record to its published statistics (roll_seconds=1), median of", args.repeat)
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(f"  {name}: {med:.2f} s ({', '.join(f'{v:.2f}' for v in vals)}), {med / base:.1f}x the filled cache")


if __name__ == "__main__":
    main()
