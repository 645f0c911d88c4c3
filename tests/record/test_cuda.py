"""record() on CUDA tensors never synchronises the GPU (skipped where there is no GPU: CI has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rldiag

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_record_on_cuda_never_syncs_and_matches_cpu(tmp_path) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 64, 256
    logp = -torch.rand(B, T, device="cuda", generator=g) * 3
    old = (logp + 0.1 * torch.randn(B, T, device="cuda", generator=g)).clamp(max=0)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) < 0.9
    ent = torch.rand(B, T, device="cuda", generator=g).to(torch.bfloat16)
    with rldiag.Recorder(tmp_path / "gpu") as rec:
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call in record() raises
        try:
            for step in range(3):
                rec.record(step=step, logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, entropy=ent)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with rldiag.Recorder(tmp_path / "cpu") as rec:
        for step in range(3):
            rec.record(step=step, logprobs=logp.cpu(), old_logprobs=old.cpu(), advantages=adv.cpu(),
                       mask=mask.cpu(), entropy=ent.float().cpu())
    a = rldiag.open_run(tmp_path / "gpu").step_metrics()
    b = rldiag.open_run(tmp_path / "cpu").step_metrics()
    for name in a.columns:
        for x, y in zip(a[name].to_list(), b[name].to_list()):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6), name
    assert np.isfinite(a["entropy/mean"].to_numpy()).all()
