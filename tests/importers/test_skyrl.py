"""SkyRL ``dump_data_batch`` import, on pickles written by SkyRL's own ``TrainingInputBatch.save``.

skyrl-train 0.3.1 installs here with ``pip install --no-deps --ignore-requires-python skyrl-train==0.3.1`` plus
``jaxtyping`` (its ``training_batch`` module needs only torch and jaxtyping); the test is skipped where it
is missing. The newer SkyRL layout (tensors as numpy bytes, ``skyrl.backends.skyrl_train.training_batch``) is
covered by a pickle built the way its ``TensorBatch.__reduce__``/``__getstate__`` define it.
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.cli import main
from rldiag.importers import ImportInputError, ImportReport
from rldiag.importers.skyrl import import_skyrl

torch = pytest.importorskip("torch")


def batch_tensors(b=4, r=6, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.ones(b, r, dtype=torch.long)
    loss_mask[0, :2] = 0  # left padding of a short response
    loss_mask[1, 3] = 0  # a tool-output token
    old = -torch.rand(b, r, generator=g) * 3
    return {
        "sequences": torch.randint(1, 1000, (b, s), generator=g),
        "attention_mask": torch.ones(b, s, dtype=torch.long),
        "loss_mask": loss_mask,
        "response_mask": torch.ones(b, r, dtype=torch.long),
        "action_log_probs": old,
        "base_action_log_probs": old - 0.1 * torch.rand(b, r, generator=g),
        "advantages": torch.randn(b, 1, generator=g).expand(b, r).contiguous(),
        "rollout_logprobs": torch.clamp(old + 0.05 * torch.randn(b, r, generator=g), max=0.0),
    }


def test_pickles_written_by_skyrl_train(tmp_path):
    tb = pytest.importorskip("skyrl_train.training_batch")
    folder = tmp_path / "export" / "dumped_data"
    folder.mkdir(parents=True)
    batches = {}
    for step in (1, 2):
        batches[step] = batch_tensors(seed=step)
        b = tb.TrainingInputBatch(batches[step])
        b.metadata = {"response_length": 6}
        b.save(str(folder / f"global_step_{step}_training_input.pkl"))
    report = ImportReport(trainer="skyrl", source="x")
    run = rldiag.open_run(import_skyrl(tmp_path / "export", tmp_path / "run", report=report))
    assert run.steps() == [1, 2]
    d = batches[2]
    mask = (d["loss_mask"] != 0).numpy()
    old, roll = d["action_log_probs"].numpy()[mask], d["rollout_logprobs"].numpy()[mask]
    row = run.step_metrics().row(1, named=True)
    assert row["tokens/count"] == mask.sum()
    x = old.astype(np.float64) - roll
    assert row["mismatch/k3"] == pytest.approx(np.mean(np.exp(x) - 1 - x), rel=1e-4)
    ref = d["base_action_log_probs"].numpy()[mask] - old
    assert row["kl/ref_k3"] == pytest.approx(np.mean(np.exp(ref) - ref - 1), rel=1e-4)
    all_tokens = run.tokens().collect()
    tok = all_tokens.filter(all_tokens["step"] == 2)
    assert tok.height == mask.sum()
    assert sorted(tok["token_id"].to_list()) == sorted(d["sequences"][:, -6:].numpy()[mask].tolist())
    assert report.tokens == run.tokens().collect().height


def _new_layout_pickle(path, tensors):
    """A pickle in newer SkyRL's layout: _rebuild_tensor_batch(cls, state), tensors as numpy bytes."""
    mod = types.ModuleType("skyrl.backends.skyrl_train.training_batch")

    class TrainingInputBatch(dict):
        pass

    def _rebuild_tensor_batch(cls, state):  # pragma: no cover - never called here
        raise AssertionError

    TrainingInputBatch.__module__ = mod.__name__
    TrainingInputBatch.__qualname__ = "TrainingInputBatch"
    _rebuild_tensor_batch.__module__ = mod.__name__
    _rebuild_tensor_batch.__qualname__ = "_rebuild_tensor_batch"
    mod.TrainingInputBatch, mod._rebuild_tensor_batch = TrainingInputBatch, _rebuild_tensor_batch
    for name in ("skyrl", "skyrl.backends", "skyrl.backends.skyrl_train"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    try:
        state = {
            "batch_dict": {
                k: {
                    "format": "numpy",
                    "data": v.numpy().tobytes(),
                    "shape": tuple(v.shape),
                    "dtype": str(v.numpy().dtype),
                }
                for k, v in tensors.items()
            },
            "batch_size": 4,
            "device": torch.device("cpu"),
            "metadata": {"response_length": 6},
        }
        TrainingInputBatch.__reduce__ = lambda self: (_rebuild_tensor_batch, (TrainingInputBatch, state))
        with open(path, "wb") as f:
            pickle.dump(TrainingInputBatch(), f)
    finally:
        for name in (
            "skyrl.backends.skyrl_train.training_batch",
            "skyrl.backends.skyrl_train",
            "skyrl.backends",
            "skyrl",
        ):
            sys.modules.pop(name, None)


def test_newer_layout_and_a_planted_pickle(tmp_path, capsys):
    tensors = batch_tensors()
    _new_layout_pickle(tmp_path / "global_step_5_training_input.pkl", tensors)
    run = rldiag.open_run(import_skyrl(tmp_path / "global_step_5_training_input.pkl", tmp_path / "run"))
    assert run.step_metrics()["tokens/count"][0] == int((tensors["loss_mask"] != 0).sum())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "d"
    bad.mkdir()
    (bad / "global_step_1_training_input.pkl").write_bytes(pickle.dumps(Evil()))
    assert main(["import", "skyrl", str(bad), str(tmp_path / "run2")]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    # the global is builtins.print, or Ray's replacement of it when Ray was imported in this process
    assert "print is not allowed in a SkyRL batch pickle" in captured.err and captured.err.count("\n") == 1
    (bad / "global_step_1_training_input.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ImportInputError, match="not a readable SkyRL batch pickle"):
        import_skyrl(bad, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x80\x04\x95", b"\x80\x02c", b"PK\x03\x04"]))
def test_random_bytes_are_a_one_line_error(tmp_path, blob, prefix):
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / "global_step_1_training_input.pkl").write_bytes(prefix + blob)
    with pytest.raises(ImportInputError) as err:
        import_skyrl(d, d / "run")
    assert "\n" not in str(err.value) and not (d / "run").exists()
