"""slime ``--save-debug-train-data`` import, on files in the payload slime's dump code defines.

slime does not install here. ``write_rollout`` saves with ``torch.save`` the version-2 payload of
``_build_dump_payload`` (``slime/observability/train_data_utils.py``): ``format_version``, ``rollout_id``,
``rank``, ``samples`` (one dict per sample: ``data_parallel_rank``, ``sample_index``, ``rollout_position``, the
rollout fields ``tokens``, ``response_lengths``, ``total_lengths``, ``loss_masks``, ``rewards``, ``truncated``
as Python values and the train fields ``log_probs``, ``rollout_log_probs`` (a list), ``ref_log_probs``,
``advantages``, ``returns``, ``entropy`` as response-length tensors), ``dp_shards`` and ``raw_reward``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.cli import main
from rldiag.importers import ImportInputError, ImportReport
from rldiag.importers.slime import import_slime

torch = pytest.importorskip("torch")


def write_rollout(folder, rollout_id, n=6, dp=2, seed=0):
    g = torch.Generator().manual_seed(seed + rollout_id)
    samples = []
    for i in range(n):
        prompt, resp = 3 + i % 3, 4 + i % 4
        old = -torch.rand(resp, generator=g) * 2
        mask = [1] * resp
        if i == 1:
            mask[1] = 0  # a tool-output token
        samples.append(
            {
                "data_parallel_rank": i % dp,
                "sample_index": i,
                "rollout_position": i,
                "tokens": torch.randint(1, 500, (prompt + resp,), generator=g).tolist(),
                "response_lengths": resp,
                "total_lengths": prompt + resp,
                "loss_masks": mask,
                "rewards": float(i % 2),
                "truncated": 0,
                "log_probs": old,
                "rollout_log_probs": torch.clamp(old + 0.02 * torch.randn(resp, generator=g), max=0).tolist(),
                "ref_log_probs": old - 0.1,
                "advantages": torch.full((resp,), float(i % 2) - 0.5),
                "returns": torch.zeros(resp),
                "entropy": torch.rand(resp, generator=g),
            }
        )
    payload = {
        "format_version": 2,
        "rollout_id": rollout_id,
        "rank": 0,
        "samples": samples,
        "dp_shards": [{"rank": r, "data_parallel_rank": r, "sample_indices": list(range(r, n, dp))} for r in range(dp)],
        "raw_reward": [s["rewards"] for s in samples],
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload, folder / f"{rollout_id}.pt")
    return samples


def test_import_slime_rollouts(tmp_path):
    data = {r: write_rollout(tmp_path / "dump" / "train_data", r) for r in (0, 1)}
    report = ImportReport(trainer="slime", source="x")
    run = rldiag.open_run(import_slime(tmp_path / "dump", tmp_path / "run", report=report))
    assert run.steps() == [0, 1] and run.ranks == [0, 1]
    s = data[1]
    mask = np.concatenate([np.array(x["loss_masks"], dtype=bool) for x in s])
    old = np.concatenate([x["log_probs"].numpy() for x in s])[mask].astype(np.float64)
    roll = np.concatenate([np.array(x["rollout_log_probs"]) for x in s])[mask]
    ent = np.concatenate([x["entropy"].numpy() for x in s])[mask]
    row = run.step_metrics().row(1, named=True)
    assert row["tokens/count"] == mask.sum()
    x = old - roll
    assert row["mismatch/k3"] == pytest.approx(np.mean(np.exp(x) - 1 - x), rel=1e-3)
    assert row["entropy/mean"] == pytest.approx(ent.mean(), rel=1e-5)
    assert row["reward/mean"] == pytest.approx(np.mean([x["rewards"] for x in s]))
    assert report.tokens == run.tokens().collect().height
    # a copied file of the same rollout is refused, not counted twice
    folder = tmp_path / "dump" / "train_data"
    (folder / "train_1.pt").write_bytes((folder / "1.pt").read_bytes())
    with pytest.raises(ImportInputError, match="rollout 1 also in"):
        import_slime(tmp_path / "dump", tmp_path / "run2")


def test_bad_samples_and_files(tmp_path, capsys):
    write_rollout(tmp_path / "d", 3)
    payload = torch.load(tmp_path / "d" / "3.pt", weights_only=True)
    payload["samples"][2]["log_probs"] = torch.zeros(1)  # wrong length
    torch.save(payload, tmp_path / "d" / "3.pt")
    assert main(["import", "slime", str(tmp_path / "d"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd' / '3.pt'}: samples[2], column log_probs: shape [1]" in err and err.count("\n") == 1
    assert main(["import", "slime", str(tmp_path / "d"), str(tmp_path / "run"), "--errors", "lenient"]) == 0
    assert "skipped 1: bad record" in capsys.readouterr().out
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "1.pt").write_bytes(b"not a torch file")
    with pytest.raises(ImportInputError, match="1.pt: not a readable slime train debug file"):
        import_slime(tmp_path / "e", tmp_path / "run2")
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format_version": 2}, tmp_path / "e" / "1.pt")
    with open(tmp_path / "e" / "1.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ImportInputError, match="not a readable"):
        import_slime(tmp_path / "e", tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x80\x02}q\x00", b"PK\x03\x04"]))
def test_random_bytes_are_a_one_line_error(tmp_path, blob, prefix):
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / "3.pt").write_bytes(prefix + blob)
    with pytest.raises(ImportInputError) as err:
        import_slime(d, d / "run")
    assert "\n" not in str(err.value) and not (d / "run").exists()
