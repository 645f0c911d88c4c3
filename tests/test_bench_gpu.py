"""benchmarks/bench_gpu.py runs where CI has no GPU (``--device cpu``, a tiny model) and its checks hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_script_on_cpu_records_every_token(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    args = "--device cpu --layers 1 --hidden 64 --vocab 500 --batch 2 --seq 64 --steps 2".split()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["token_counts_match"] and res["rows_dropped"] == 0 and res["failures"] == 0
    assert res["fwd_bwd_ms"] > 0 and res["record_foreground_ms"] > 0
    assert set(res["record_alone_ms"]) == {"16x2048", "64x2048", "256x2048"}
    assert "record() / forward+backward" in proc.stdout


def test_bench_gpu_without_cuda_says_what_to_do() -> None:
    script = str(ROOT / "benchmarks" / "bench_gpu.py")
    code = "import runpy, sys, torch; torch.cuda.is_available = lambda: False; sys.argv = ['bench_gpu.py']; "
    code += f"runpy.run_path({script!r}, run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr and "--device cpu" in proc.stderr
