"""Two real gloo ranks write shards of one run; merged statistics equal a single process's."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import rldiag
from tests.metrics.reference import make_record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(seed: int, steps: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    return [
        [make_record(rng, 8, 24, group_offset=100 * s + 10 * i, version_step=s) for i in range(2)] for s in range(steps)
    ]


def _worker(rank: int, port: int, run_dir: str, seed: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    batches = _batches(seed, steps)
    with rldiag.Recorder(run_dir) as rec:  # rank and world size come from the process group
        assert rec.rank == rank and rec.world_size == 2
        for s, recs in enumerate(batches):
            rec.record(step=s, **recs[rank])
            dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_merge_to_single_process_statistics(tmp_path) -> None:
    steps = 3
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "dist"), 7, steps), nprocs=2, join=True)
    with rldiag.Recorder(tmp_path / "single") as rec:
        for s, recs in enumerate(_batches(7, steps)):
            for r in recs:  # the same records, one process
                rec.record(step=s, **r)
    d = rldiag.open_run(tmp_path / "dist")
    assert d.ranks == [0, 1] and d.info()["world_size"] == 2
    a, b = d.step_metrics(), rldiag.open_run(tmp_path / "single").step_metrics()
    for name in a.columns:
        for x, y in zip(a[name].to_list(), b[name].to_list()):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=1e-12), name
    per_rank = d.step_metrics(by_rank=True)
    assert per_rank.height == 2 * steps
    assert (
        d.step_metrics(ranks=[1])["tokens/count"].sum() == per_rank.filter(per_rank["rank"] == 1)["tokens/count"].sum()
    )
