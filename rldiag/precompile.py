"""Compile rldiag's kernels into numba's on-disk cache ahead of use (``rldiag precompile``).

rldiag's compiled passes (the recorder's statistics kernel, recomputes from token rows, bucket tables, the
objective lens, histogram merges, the dashboard's smoothing) are numba functions cached on disk. A process that
finds them in the cache loads them in a fraction of a second; one that does not compiles them first: measured
on this repository's 2-core machine, the recorder's kernel takes about 9 s, a first recompute from token rows
about 10 s, a first lens about 7 s and a first position table about 6 s. That happens once per installation
where the cache is kept, but on every start of a job in a fresh container, where the recorder's first
statistics then wait those seconds (and a preemption in them finds nothing published).

:func:`precompile` runs every kernel once on a tiny run it records in a temporary folder, so the cache holds
each of them with the argument types the real calls use; run it where the package is installed (a container
image's build, a job's setup step on a shared ``NUMBA_CACHE_DIR``). numba keys each cached function on the
CPU it was compiled for: a cache built on another CPU model is compiled again on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGES = ("rldiag", "app")
"""The packages whose numba functions are compiled (``app`` is the dashboard's package)."""


@dataclass
class Precompiled:
    """What :func:`precompile` did: each cached function by ``module.name``."""

    compiled: list[str] = field(default_factory=list)
    """Compiled by this call (they were not in the cache)."""
    loaded: list[str] = field(default_factory=list)
    """Found in the cache and loaded (a function called only from other compiled functions is loaded with them,
    and listed in neither when it was cached)."""
    cache_dirs: list[str] = field(default_factory=list)
    """Where numba keeps them (``__pycache__`` beside the modules, or ``NUMBA_CACHE_DIR``)."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``rldiag precompile --format json``)."""
        return dataclasses.asdict(self)


def cached_functions() -> dict[str, Any]:
    """Every numba function of :data:`PACKAGES` that is cached on disk, by ``module.name``.

    Modules are found by walking the packages and imported only when their source mentions numba, so that
    optional integrations (trainers, trackers) are never imported here."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    out: dict[str, Any] = {}
    for pkg_name in PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            spec = importlib.util.find_spec(info.name)
            origin = getattr(spec, "origin", None)
            if info.ispkg or not origin or not origin.endswith(".py"):
                continue
            if "numba" not in Path(origin).read_text(encoding="utf-8"):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if not isinstance(obj, Dispatcher) or obj.__module__ != info.name:
                    continue
                if obj.targetoptions.get("inline") == "always":  # compiled into its callers only
                    continue
                if not isinstance(getattr(obj, "_cache", None), NullCache):
                    out[f"{info.name}.{name}"] = obj
    return out


def _record_tiny_run(run_dir: Path) -> None:
    """A run with every input the recorder takes: 3 small steps, and one of 2 x 64 x 1,100 tokens whose turn
    ids run to 44,000 (a chunk the lens splits between threads; a turn table too wide to sum in place)."""
    import torch

    from rldiag.config import RecorderConfig
    from rldiag.record.recorder import Recorder

    gen = torch.Generator().manual_seed(0)
    zero = torch.zeros(())
    cfg = RecorderConfig(roll_seconds=3600.0)
    with Recorder(run_dir, config=cfg, alerts=False) as rec:
        for step, (B, T, turn_every) in enumerate([(6, 16, 8)] * 3 + [(64, 1100, -40)]):
            positions = torch.arange(T).expand(B, T)
            turns = positions // turn_every if turn_every > 0 else positions * -turn_every
            for micro in range(2):
                old = -torch.rand(B, T, generator=gen) * 3
                lp = torch.minimum(old + 0.3 * torch.randn(B, T, generator=gen), zero)
                mask = torch.ones(B, T, dtype=torch.bool)
                mask[:, T - 1 - micro :] = False
                rec.record(
                    step=step,
                    logprobs=lp,
                    old_logprobs=old,
                    advantages=torch.randn(B, 1, generator=gen).expand(B, T),
                    mask=mask,
                    entropy=torch.rand(B, T, generator=gen) * 2,
                    rollout_logprobs=torch.minimum(old + 0.05 * torch.randn(B, T, generator=gen), zero),
                    ref_logprobs=torch.minimum(old - 0.1, zero),
                    teacher_logprobs=torch.minimum(lp - 0.2, zero),
                    base_logprobs=torch.minimum(lp - 0.4, zero),
                    group_ids=torch.arange(B) // 2,
                    rewards=torch.rand(B, generator=gen),
                    token_ids=torch.randint(50, (B, T), generator=gen),
                    versions=torch.full((B,), max(step - 1, 0)),
                    turns=turns,
                    stages=positions // 4,
                    route_agree=torch.rand(B, T, generator=gen),
                )


def _shuffled_copy(run_dir: Path, dst: Path) -> None:
    """A copy of the run whose token rows are not in the recorder's order (as some importers write them): the
    bucket tables and the lens take other compiled paths for such rows."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from rldiag.runformat import TOKENS_DIR

    shutil.copytree(run_dir, dst)
    for path in sorted((dst / TOKENS_DIR).glob("*.parquet")):
        table = pq.read_table(path)
        order = np.random.default_rng(0).permutation(table.num_rows)
        pq.write_table(table.take(order), path)


def _exercise(run_dir: Path) -> None:
    """Every analysis that runs a compiled pass, as the CLI and the dashboard call them."""
    import numpy as np

    from rldiag.analysis.io import open_run
    from rldiag.metrics.registry import BUCKET_KINDS

    run = open_run(run_dir)
    run.step_metrics()
    run.step_metrics(by_rank=True)
    run.step_metrics(from_tokens=True)
    run.step_metrics(config=run.config.replace(eps_high=0.3))
    for by in BUCKET_KINDS:
        run.bucket_metrics(by=by)
    run.lens()
    run.cliff()
    try:
        from app.downsample import ema
    except ImportError:  # the dashboard's package is not installed
        return
    ema(np.arange(8, dtype=float), 0.6)


def precompile(progress: Callable[[str], None] | None = None) -> Precompiled:
    """Load or compile every cached numba function of rldiag into numba's cache; returns what it did."""
    from rldiag.stats import kernel

    t0 = time.perf_counter()
    functions = cached_functions()
    if progress is not None:
        progress(f"{len(functions)} compiled functions to load or compile")
    kernel.warmup()
    with tempfile.TemporaryDirectory(prefix="rldiag-precompile-") as tmp:
        run_dir = Path(tmp) / "run"
        _record_tiny_run(run_dir)
        _exercise(run_dir)
        _shuffled_copy(run_dir, Path(tmp) / "shuffled")
        _exercise(Path(tmp) / "shuffled")
    out = Precompiled(seconds=time.perf_counter() - t0)
    dirs: set[str] = set()
    for name, disp in sorted(functions.items()):
        # A function called only from other compiled functions is loaded with its callers (it shows neither
        # count then); on an empty cache every function here is compiled (tests/test_precompile.py).
        if disp.stats.cache_misses:
            out.compiled.append(name)
        elif disp.stats.cache_hits:
            out.loaded.append(name)
        else:
            continue
        if disp.stats.cache_path:
            dirs.add(str(disp.stats.cache_path))
    out.cache_dirs = sorted(dirs)
    return out
