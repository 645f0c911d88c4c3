"""``rldiag precompile`` fills numba's cache with every kernel, and a recorder loads its kernel before the first
record (a fresh container otherwise compiles it while the first statistics wait)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rldiag.precompile import cached_functions

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}


def _precompile(cache: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "rldiag", "precompile", "--format", "json"],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


@pytest.mark.slow
def test_precompile_compiles_every_cached_kernel_once_then_a_new_process_compiles_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    first = _precompile(cache)
    kernels = set(cached_functions())
    assert len(kernels) >= 30
    # on an empty cache every cached function of rldiag and the dashboard is compiled: a kernel added without
    # a call in rldiag.precompile's workload fails here
    assert set(first["compiled"]) == kernels, sorted(kernels - set(first["compiled"]))
    assert first["loaded"] == []
    assert first["cache_dirs"] and all(d.startswith(str(cache)) for d in first["cache_dirs"])
    second = _precompile(cache)
    assert second["compiled"] == []
    assert "rldiag.stats.kernel._kernel" in second["loaded"]
    assert "rldiag.stats.lens_kernel.lens_pass" in second["loaded"]


def test_the_recorder_loads_its_kernel_before_the_first_record(tmp_path: Path) -> None:
    """A fresh process: constructing a Recorder loads the statistics kernel in the writer thread, without a
    record (before, it was loaded, or compiled, at the first record)."""
    script = textwrap.dedent(
        f"""
        import time
        import rldiag
        from rldiag.stats import kernel
        rec = rldiag.Recorder({str(tmp_path / "run")!r})
        deadline = time.monotonic() + 120
        while not kernel._kernel.signatures and time.monotonic() < deadline:
            time.sleep(0.02)
        print(len(kernel._kernel.signatures))
        rec.close()
        """
    )
    cache = Path(os.environ.get("NUMBA_CACHE_DIR", tmp_path / "numba-cache"))
    out = subprocess.run([sys.executable, "-c", script], env=_env(cache), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1"]
