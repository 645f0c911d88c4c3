"""record() on CUDA tensors never synchronises the GPU (skipped where there is no GPU: CI has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rldiag

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
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
            rec.record(
                step=step,
                logprobs=logp.cpu(),
                old_logprobs=old.cpu(),
                advantages=adv.cpu(),
                mask=mask.cpu(),
                entropy=ent.float().cpu(),
            )
    a = rldiag.open_run(tmp_path / "gpu").step_metrics()
    b = rldiag.open_run(tmp_path / "cpu").step_metrics()
    for name in a.columns:
        for x, y in zip(a[name].to_list(), b[name].to_list()):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6), name
    assert np.isfinite(a["entropy/mean"].to_numpy()).all()


def _batches(device: str, steps: int = 6) -> list[dict]:
    """The same batches on any device: drawn on the CPU (CUDA's generator draws other numbers), then moved."""
    out = []
    for seed in range(steps):
        g = torch.Generator().manual_seed(seed)
        B, T = 64, 2048  # 1.2 MB a record: more than the smallest queue holds
        logp = -torch.rand(B, T, generator=g) * 3
        batch = {
            "logprobs": logp,
            "old_logprobs": (logp + 0.1 * torch.randn(B, T, generator=g)).clamp(max=0),
            "advantages": torch.randn(B, generator=g),
            "mask": torch.rand(B, T, generator=g) < 0.9,
        }
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def _full_queue_run(path, batches: list[dict]) -> dict:
    """A recorder whose queue holds less than one record and never waits: every record takes the full path."""
    with rldiag.Recorder(path, queue_max_bytes=1 << 20, max_block_seconds=0.0) as rec:
        for step, batch in enumerate(batches):
            rec.record(step=step, **batch)
    return rec.stats  # after close: every record is processed


@needs_cuda
def test_full_queue_with_cuda_inputs_never_syncs_and_keeps_every_statistic(tmp_path) -> None:
    on_gpu = _batches("cuda")  # moved to the GPU before the check: a host-to-device copy may synchronise
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the caller's thread raises
    try:
        gpu = _full_queue_run(tmp_path / "gpu", on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _full_queue_run(tmp_path / "cpu", _batches("cpu"))
    a = rldiag.open_run(tmp_path / "gpu").step_metrics()
    b = rldiag.open_run(tmp_path / "cpu").step_metrics()
    assert a["tokens/count"].to_list() == b["tokens/count"].to_list()  # statistics are never dropped
    assert gpu["rows_written"] == 0 and gpu["rows_dropped"] > 0
    assert a["ratio/mean"].to_numpy() == pytest.approx(b["ratio/mean"].to_numpy(), rel=1e-6)


def test_full_queue_path_hands_copies_in_flight_to_the_writer(tmp_path, monkeypatch) -> None:
    """Without a GPU: snapshots that report a copy still in flight take the path CUDA inputs take, and the
    caller's thread never reads them (on a GPU, that read is the synchronisation)."""
    import threading

    from rldiag.record import recorder as recorder_mod
    from rldiag.record.tensors import HostSnapshot

    main = threading.current_thread()
    real_get = HostSnapshot.get

    def get(self):
        assert threading.current_thread() is not main, "a snapshot was read in the caller's thread"
        return real_get(self)

    monkeypatch.setattr(HostSnapshot, "ready", lambda self: False)
    monkeypatch.setattr(HostSnapshot, "get", get)
    monkeypatch.setattr(recorder_mod, "build_batch", lambda *a, **k: pytest.fail("reduced in the caller's thread"))
    stats = _full_queue_run(tmp_path / "inflight", _batches("cpu"))
    monkeypatch.undo()
    _full_queue_run(tmp_path / "ref", _batches("cpu"))
    a = rldiag.open_run(tmp_path / "inflight").step_metrics()
    b = rldiag.open_run(tmp_path / "ref").step_metrics()
    assert a.equals(b)  # the same statistics, computed by the writer
    assert stats["rows_written"] == 0 and stats["rows_dropped"] == int(a["tokens/count"].sum())


@needs_cuda
def test_the_loop_helper_on_cuda_logits_never_syncs_and_matches_cpu(tmp_path) -> None:
    """logprobs_and_record (the plain loop's one call: gather, entropy, record) on CUDA logits never synchronises
    the GPU; its log-probs and the recorded statistics are the CPU's within float rounding."""
    from rldiag.record.integrations.loop import logprobs_and_record

    g = torch.Generator().manual_seed(7)
    B, T, V = 8, 300, 5000  # 2,400 rows: the helpers' 1,024-row chunks, the last one partial
    cpu = {
        "logits": torch.randn(B, T, V, generator=g) * 3,
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "old_logprobs": -torch.rand(B, T, generator=g) * 8,
        "advantages": torch.randn(B, generator=g),
        "mask": torch.rand(B, T, generator=g) < 0.9,
    }
    gpu = {k: v.to("cuda") for k, v in cpu.items()}  # before the check: a host-to-device copy may synchronise
    gpu["logits"].requires_grad_(True)
    torch.cuda.synchronize()
    with rldiag.Recorder(tmp_path / "gpu") as rec:
        torch.cuda.set_sync_debug_mode("error")
        try:
            logp_gpu = logprobs_and_record(rec, step=0, **gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        logp_gpu.sum().backward()  # differentiable, as the loss uses it (torch's backward is not under test)
    with rldiag.Recorder(tmp_path / "cpu") as rec:
        logp_cpu = logprobs_and_record(rec, step=0, **cpu)
    torch.testing.assert_close(logp_gpu.detach().cpu(), logp_cpu, rtol=1e-5, atol=1e-5)
    assert gpu["logits"].grad is not None and torch.isfinite(gpu["logits"].grad).all()
    a = rldiag.open_run(tmp_path / "gpu").step_metrics()
    b = rldiag.open_run(tmp_path / "cpu").step_metrics()
    assert a["tokens/count"].to_list() == b["tokens/count"].to_list()
    for name in ("entropy/mean", "ratio/mean", "kl/k3"):
        assert a[name][0] == pytest.approx(b[name][0], rel=1e-5), name
