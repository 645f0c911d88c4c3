"""The recorder's contract: bad input, strict/lenient, queue bound, flush/close, torch inputs."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

import rldiag
from rldiag.record.writer import WriterError
from tests.metrics.reference import make_record


def _rec(rng, B=4, T=8):
    return make_record(rng, B, T, extras=False)


def test_shape_mismatch_names_argument_and_shapes(run_dir) -> None:
    with rldiag.Recorder(run_dir) as rec:
        with pytest.raises(ValueError, match=r"old_logprobs has shape \[4, 7\] but logprobs has shape \[4, 8\]"):
            rec.record(
                step=0,
                logprobs=np.zeros((4, 8), np.float32),
                old_logprobs=np.zeros((4, 7), np.float32),
                advantages=np.zeros(4, np.float32),
            )
        with pytest.raises(ValueError, match=r"advantages .* must be \[4\] or \[4, 8\]"):
            rec.record(
                step=0,
                logprobs=np.zeros((4, 8), np.float32),
                old_logprobs=np.zeros((4, 8), np.float32),
                advantages=np.zeros(5, np.float32),
            )
        with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
            rec.record(
                step=0,
                logprobs=np.zeros(8, np.float32),
                old_logprobs=np.zeros(8, np.float32),
                advantages=np.zeros(1, np.float32),
            )
        with pytest.raises(TypeError, match="step must be"):
            rec.record(
                step=torch.tensor(1),
                logprobs=np.zeros((1, 2), np.float32),
                old_logprobs=np.zeros((1, 2), np.float32),
                advantages=np.zeros(1, np.float32),
            )
    assert rldiag.open_run(run_dir).steps() == []


def test_strict_rejects_integer_logprobs_lenient_counts_them(tmp_path) -> None:
    bad = dict(
        logprobs=np.zeros((2, 3), np.int64),
        old_logprobs=np.zeros((2, 3), np.float32),
        advantages=np.ones(2, np.float32),
    )
    with rldiag.Recorder(tmp_path / "s") as rec:
        with pytest.raises(TypeError, match="must be floating point"):
            rec.record(step=0, **bad)
    with rldiag.Recorder(tmp_path / "l", errors="lenient") as rec, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rec.record(step=0, **bad)
    info = rldiag.open_run(tmp_path / "l").info()
    assert info["tokens"] == 0 and info["tokens_invalid"] == 6


def test_positive_logprobs_strict_raises_at_the_call_lenient_counts(tmp_path) -> None:
    rng = np.random.default_rng(0)
    good = _rec(rng)
    bad = {k: v.copy() for k, v in good.items()}
    bad["mask"] = np.ones((4, 8), bool)
    bad["logprobs"][0, 0] = 0.5  # a logit, not a log-prob
    rec = rldiag.Recorder(tmp_path / "s")
    rec.record(step=0, **good)
    with pytest.raises(ValueError, match=r"logprobs has 1 masked-in values above 0.0001 \(largest 0.5\)"):
        rec.record(step=1, **bad)
    rec.record(step=2, **good)
    rec.close()
    run = rldiag.open_run(tmp_path / "s")
    assert run.steps() == [0, 2]  # the bad record was not written; earlier and later ones are intact

    with rldiag.Recorder(tmp_path / "l", errors="lenient") as rec:
        rec.record(step=0, **bad)
    info = rldiag.open_run(tmp_path / "l").info()
    assert info["tokens_invalid"] == 1 and info["tokens"] == 31


def test_torch_and_numpy_inputs_agree_and_buffers_may_be_reused(tmp_path) -> None:
    rng = np.random.default_rng(3)
    r = make_record(rng, 6, 10)
    with rldiag.Recorder(tmp_path / "np") as rec:
        rec.record(step=0, **r)
    with rldiag.Recorder(tmp_path / "pt") as rec:
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.items()}
        t["logprobs"] = t["logprobs"].to(torch.bfloat16).float()  # exercise a cast path
        t2 = {k: v.clone() for k, v in t.items()}
        t2["logprobs"] = torch.from_numpy(r["logprobs"]).clone()
        rec.record(step=0, **t2)
        for v in t2.values():  # the caller reuses its buffers at once
            v.zero_() if v.dtype != torch.bool else v.fill_(False)
    a = rldiag.open_run(tmp_path / "np").step_metrics().row(0, named=True)
    b = rldiag.open_run(tmp_path / "pt").step_metrics().row(0, named=True)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-7), k


def test_full_queue_drops_token_rows_never_statistics(tmp_path) -> None:
    rng = np.random.default_rng(4)
    cfg = rldiag.RecorderConfig(queue_max_bytes=2**20)  # 1 MiB: each record below is ~1.2 MiB
    recs = [make_record(rng, 64, 512, extras=False) for _ in range(6)]
    with rldiag.Recorder(tmp_path / "run", config=cfg) as rec:
        for i, r in enumerate(recs):
            rec.record(step=i, **r)
    run = rldiag.open_run(tmp_path / "run")
    info = run.info()
    masked = sum(int(r["mask"].sum()) for r in recs)
    assert info["tokens_masked_in"] == masked  # statistics of every record
    assert info["token_rows_dropped"] > 0
    assert info["token_rows_written"] + info["token_rows_dropped"] == masked
    assert run.tokens().collect().height == info["token_rows_written"]
    assert run.token_rows_sampled


def test_token_sampling_keeps_statistics_exact(tmp_path) -> None:
    rng = np.random.default_rng(5)
    recs = [make_record(rng, 32, 16) for _ in range(4)]
    with rldiag.Recorder(tmp_path / "all") as rec:
        for i, r in enumerate(recs):
            rec.record(step=i, **r)
    with rldiag.Recorder(tmp_path / "some", token_sample_rate=0.25) as rec:
        for i, r in enumerate(recs):
            rec.record(step=i, **r)
    a, b = rldiag.open_run(tmp_path / "all"), rldiag.open_run(tmp_path / "some")
    assert b.tokens().collect().height < 0.5 * a.tokens().collect().height
    ma, mb = a.step_metrics(), b.step_metrics()
    assert ma.equals(mb)


def test_close_is_idempotent_and_record_after_close_is_refused(run_dir) -> None:
    rng = np.random.default_rng(6)
    rec = rldiag.Recorder(run_dir)
    rec.record(step=0, **_rec(rng))
    rec.close()
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.record(step=1, **_rec(rng))


def test_flush_is_a_barrier_and_local_metrics(run_dir) -> None:
    rng = np.random.default_rng(7)
    with rldiag.Recorder(run_dir, roll_seconds=3600) as rec:
        rec.record(step=0, **_rec(rng))
        rec.flush()
        run = rldiag.open_run(run_dir)
        assert run.steps() == [0]
        rec.record(step=1, **_rec(rng))
        m = rec.local_metrics(wait=True)
        assert m["tokens/count"] > 0
        assert run.refresh() == []  # not published yet: no flush, no roll
        rec.flush()
        assert len(run.refresh()) == 1 and run.steps() == [0, 1]


def test_writer_failure_strict_raises_lenient_warns_and_files_stay(tmp_path) -> None:
    rng = np.random.default_rng(8)
    for mode in ("strict", "lenient"):
        d = tmp_path / mode
        rec = rldiag.Recorder(d, errors=mode)
        rec.record(step=0, **_rec(rng))
        rec.flush()
        before = sorted(p.name for p in (d / "stats").iterdir())
        os.chmod(d / "stats", 0o500)
        os.chmod(d / "tokens", 0o500)
        try:
            if os.access(d / "stats", os.W_OK):  # root ignores permissions: make the target a file instead
                os.chmod(d / "stats", 0o700)
                os.chmod(d / "tokens", 0o700)
                rec._writer.run_dir = d / "manifest.json"  # publishing into a file fails like a full disk
            rec.record(step=1, **_rec(rng))
            if mode == "strict":
                with pytest.raises(WriterError, match="intact"):
                    rec.flush()
            else:
                with pytest.warns(RuntimeWarning, match="recording continues"):
                    rec.flush()
        finally:
            os.chmod(d / "stats", 0o700)
            os.chmod(d / "tokens", 0o700)
            rec._writer.run_dir = d
        rec.close()
        run = rldiag.open_run(d)
        assert sorted(p.name for p in (d / "stats").iterdir() if p.suffix == ".parquet")[: len(before)] == before
        assert 0 in run.steps()
        assert not run.problems


def test_existing_foreign_directory_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an rldiag run"):
        rldiag.Recorder(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_restart_appends_resume_point(run_dir) -> None:
    rng = np.random.default_rng(9)
    with rldiag.Recorder(run_dir) as rec:
        rec.record(step=0, **_rec(rng))
    with rldiag.Recorder(run_dir) as rec:
        rec.record(step=1, **_rec(rng))
    info = rldiag.open_run(run_dir).info()
    assert [w["first_step"] for w in sorted(info["resume_points"], key=lambda w: w["started"])] == [0, 1]
    assert info["steps"] == 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1


def test_entropy_and_gather_helpers_match_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1000, dtype=torch.bfloat16) * 4
    ent = rldiag.entropy_from_logits(logits, chunk_size=4)
    ref = torch.distributions.Categorical(logits=logits.float()).entropy()
    assert torch.allclose(ent, ref, atol=1e-4)
    ids = torch.randint(0, 1000, (3, 5))
    lp = rldiag.gather_logprobs(logits, ids, chunk_size=7)
    ref_lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    with pytest.raises(ValueError, match="token_ids has shape"):
        rldiag.gather_logprobs(logits, ids[:, :2])


# ---- what the values mean (issue 16): named at the call, counted in lenient mode ---------------------------
def _full(rng, B=4, T=8):
    r = make_record(rng, B, T)
    r["mask"] = np.ones((B, T), bool)
    r["token_ids"] = np.arange(B * T, dtype=np.int64).reshape(B, T)
    r["versions"] = np.full(B, 3, np.int64)
    return r


def _spoil(r: dict, arg: str):
    r = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
    if arg == "mask":
        r["mask"] = np.where(r["mask"], 0.5, 0.0).astype(np.float32)  # a loss-weight mask
    elif arg == "group_ids":
        r["group_ids"] = r["group_ids"].astype(np.float64) + 0.5
    elif arg == "token_ids":
        r["token_ids"][0, 0] = 2**31 + 5
    elif arg == "versions":
        r["versions"] = r["versions"].astype(np.float64)
        r["versions"][1] = np.nan
    elif arg == "entropy":
        r["entropy"][0, 1] = -0.5
    else:  # a log-prob input
        r[arg][1, 2] = 0.7
    return r


BAD_VALUES = {
    "mask": r"mask must hold 0/1 or booleans, got 32 other values",
    "group_ids": r"group_ids must hold integers, got 4 fractional",
    "token_ids": r"token_ids has 1 values outside \[0, 2147483647\]",
    "versions": r"versions must hold integers, got 1 fractional or non-finite",
    "entropy": r"entropy has 1 masked-in negative values \(smallest -0.5\)",
    "rollout_logprobs": r"rollout_logprobs has 1 masked-in values above 0.0001 \(largest 0.7\)",
    "ref_logprobs": r"ref_logprobs has 1 masked-in values above",
    "teacher_logprobs": r"teacher_logprobs has 1 masked-in values above",
    "base_logprobs": r"base_logprobs has 1 masked-in values above",
    "old_logprobs": r"old_logprobs has 1 masked-in values above",
}


@pytest.mark.parametrize("arg", sorted(BAD_VALUES))
def test_meaningless_values_are_refused_at_the_call_naming_the_argument(tmp_path, arg) -> None:
    rng = np.random.default_rng(11)
    r = _full(rng)
    r["teacher_logprobs"] = r["ref_logprobs"].copy()
    r["base_logprobs"] = r["ref_logprobs"].copy()
    with rldiag.Recorder(tmp_path / "s", handle_signals=False) as rec:
        rec.record(step=0, **r)
        with pytest.raises(ValueError, match=BAD_VALUES[arg]):
            rec.record(step=1, **_spoil(r, arg))
    assert rldiag.open_run(tmp_path / "s").steps() == [0]


def test_lenient_counts_refused_values_per_argument_and_keeps_the_rest(tmp_path) -> None:
    rng = np.random.default_rng(12)
    r = _full(rng)
    bad = _spoil(_spoil(_spoil(r, "group_ids"), "entropy"), "rollout_logprobs")
    with rldiag.Recorder(tmp_path / "l", errors="lenient", handle_signals=False) as rec:
        with pytest.warns(RuntimeWarning, match="group_ids must hold integers"):
            rec.record(step=0, **bad)
        rec.record(step=1, **r)
        rec.flush()
        s = rec.stats
    assert s["invalid_values"] == {"group_ids": 4, "entropy": 1, "rollout_logprobs": 1}
    run = rldiag.open_run(tmp_path / "l")
    info = run.info()
    assert info["tokens"] == 64 and info["tokens_invalid"] == 0  # ratio statistics of both records kept
    toks = run.tokens().collect()
    assert toks.filter(toks["step"] == 0)["group"].null_count() == 32  # fractional ids left out, not truncated
    assert toks.filter(toks["step"] == 0)["entropy"].is_nan().sum() == 1
    writer = json.loads(next((tmp_path / "l" / "writers").glob("*.json")).read_text())
    assert writer["counters"]["invalid_values"]["entropy"] == 1


def test_loss_weight_mask_is_not_read_as_all_ones_in_lenient_mode(tmp_path) -> None:
    rng = np.random.default_rng(13)
    r = _spoil(_full(rng), "mask")
    with (
        rldiag.Recorder(tmp_path / "l", errors="lenient", handle_signals=False) as rec,
        pytest.warns(RuntimeWarning, match="mask must hold 0/1"),
    ):
        rec.record(step=0, **r)
    info = rldiag.open_run(tmp_path / "l").info()
    assert info["tokens"] == 0 and info["tokens_invalid"] == 32 and rec.stats["invalid_values"] == {"mask": 32}


def test_nan_is_counted_per_input(tmp_path) -> None:
    rng = np.random.default_rng(14)
    r = _full(rng)
    r["entropy"][0, :3] = np.nan
    r["rollout_logprobs"][1, 0] = np.nan
    r["ref_logprobs"][2, 0] = np.inf
    r["rewards"][3] = np.nan
    r["mask"][0, 2] = False  # a NaN under the mask is not counted
    with rldiag.Recorder(tmp_path / "r", handle_signals=False) as rec:
        rec.record(step=0, **r)
        rec.flush()
        assert rec.stats["nonfinite"] == {"entropy": 2, "rollout_logprobs": 1, "ref_logprobs": 1, "rewards": 1}


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (np.zeros((4, 8), np.complex128), r"logprobs has dtype complex128: it must hold floating point numbers"),
        (np.full((4, 8), "x"), r"logprobs has dtype <U1"),
        (np.zeros((4, 8), "datetime64[s]"), r"logprobs has dtype datetime64\[s\]"),
        (np.zeros((4, 8), object), r"logprobs has dtype object"),
        (torch.zeros((4, 8), dtype=torch.complex64), r"logprobs has dtype complex64"),
    ],
)
def test_dtype_errors_name_the_actual_dtype(tmp_path, value, pattern) -> None:
    r = _full(np.random.default_rng(15))
    r["logprobs"] = value
    with rldiag.Recorder(tmp_path / "r", errors="lenient", handle_signals=False) as rec:
        with pytest.raises(TypeError, match=pattern):
            rec.record(step=0, **r)


def test_string_group_ids_and_huge_step_are_refused_at_the_call(tmp_path) -> None:
    r = _full(np.random.default_rng(16))
    with rldiag.Recorder(tmp_path / "r", handle_signals=False) as rec:
        with pytest.raises(TypeError, match=r"group_ids has dtype <U1: it must hold integers \(map labels"):
            rec.record(step=0, **{**r, "group_ids": np.array(list("abcd"))})
        with pytest.raises(ValueError, match=r"step must be in \[0, 2\*\*63\)"):
            rec.record(step=2**63, **r)
        rec.record(step=2**63 - 1, **r)
    assert rldiag.open_run(tmp_path / "r").steps() == [2**63 - 1]


def test_numpy_masked_arrays_are_honoured_or_refused(tmp_path) -> None:
    r = _full(np.random.default_rng(17))
    lp = np.ma.masked_array(r["logprobs"], mask=np.zeros((4, 8), bool))
    lp.mask[0, :5] = True
    lp.data[0, :5] = 9.0  # garbage under the mask: never read
    with rldiag.Recorder(tmp_path / "r", handle_signals=False) as rec:
        rec.record(step=0, **{**r, "logprobs": lp})
        rew = np.ma.masked_array(r["rewards"], mask=[False, True, False, False])
        with pytest.raises(ValueError, match="rewards is a masked array with 1 masked entries"):
            rec.record(step=1, **{**r, "rewards": rew})
    info = rldiag.open_run(tmp_path / "r").info()
    assert info["tokens"] == 27 and info["tokens_invalid"] == 0


def test_values_of_device_inputs_are_checked_by_the_writer(tmp_path) -> None:
    """Device tensors are checked where their host copy lands (the writer), named at the next call."""
    from rldiag.record.tensors import HostSnapshot
    from rldiag.record.writer import Job

    r = _spoil(_full(np.random.default_rng(18)), "entropy")
    rec = rldiag.Recorder(tmp_path / "r", handle_signals=False)
    snaps = {
        col: HostSnapshot(r[arg], float_cast=True)
        for arg, col in (
            ("logprobs", "logp"),
            ("old_logprobs", "old_logp"),
            ("advantages", "adv"),
            ("entropy", "entropy"),
        )
    }
    rec._writer.put(Job(step=7, micro=0, shape=(4, 8), inputs=snaps, checked=False))
    with pytest.raises(WriterError, match=r"entropy has 1 masked-in negative values .* step 7 \(micro 0\)"):
        rec.flush()
    rec.close()
    assert rldiag.open_run(tmp_path / "r").steps() == []
