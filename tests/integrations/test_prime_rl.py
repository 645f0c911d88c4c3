"""Import of prime-rl token exports, on files written in prime-rl's shape.

``write_exports`` writes ``token_exports/step_N/rank_R.jsonl`` with one JSON object per sequence, the way
prime-rl's ``TokenExporter`` does: the full token sequence (prompt included) with a ``loss_mask``, per-token
``advantages``, ``inference_logprobs``, ``trainer_logprobs`` and ``entropy``, plus ``step`` and ``rank``
and a few extra keys the importer must ignore. Expected metrics are computed here with numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.record.integrations.prime_rl import PrimeRLImportError, import_prime_rl


def make_sequence(rng: np.random.Generator, step: int, rank: int, *, multi_turn: bool = False) -> dict:
    prompt, resp = int(rng.integers(3, 8)), int(rng.integers(2, 12))
    n = prompt + resp
    mask = [False] * prompt + [True] * resp
    if multi_turn and resp > 5:
        mask[prompt + 2: prompt + 4] = [False, False]  # a tool result inside the response
    trainer = (-rng.exponential(1.0, n)).tolist()
    inference = (-np.abs(np.array(trainer) + rng.normal(0, 0.1, n))).tolist()
    adv = float(rng.normal())
    return {
        "schema_version": 2, "step": step, "export_step": step, "rank": rank, "micro_step": 0,
        "token_ids": rng.integers(0, 1000, n).tolist(),
        "position_ids": list(range(n)),
        "loss_mask": mask,
        "temperatures": [1.0] * n,
        "advantages": [adv] * n,
        "rewards": [adv + 0.5] * n,
        "inference_logprobs": inference,
        "trainer_logprobs": trainer,
        "entropy": rng.uniform(0, 3, n).tolist(),
        "mismatch_kl": (np.exp(np.array(trainer) - inference) - (np.array(trainer) - inference) - 1).tolist(),
        "sample_id": None, "run_id": None, "env_name": "toy",
    }


def write_exports(root, steps=(1, 2, 10), ranks=(0, 1), per_file=5, seed=0, stable=False, multi_turn=False):
    rng = np.random.default_rng(seed)
    records = []
    for step in steps:
        folder = root / "token_exports" / f"step_{step}"
        folder.mkdir(parents=True)
        for rank in ranks:
            seqs = [make_sequence(rng, step, rank, multi_turn=multi_turn) for _ in range(per_file)]
            (folder / f"rank_{rank}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seqs))
            records += seqs
        if stable:
            (folder / "STABLE").touch()
    return records


def trained(rec: dict, key: str) -> np.ndarray:
    return np.array(rec[key], dtype=float)[np.array(rec["loss_mask"])]


def test_imports_every_step_and_rank_with_the_documented_mapping(tmp_path):
    records = write_exports(tmp_path / "out", multi_turn=True)
    run_dir = import_prime_rl(tmp_path / "out", tmp_path / "run")
    run = rldiag.open_run(run_dir)
    assert run.name == "run"  # not the name of the folder it was built in
    assert run.steps() == [1, 2, 10]
    assert run.ranks == [0, 1]

    df = run.tokens().collect()
    assert len(df) == sum(int(np.sum(r["loss_mask"])) for r in records)
    for step in (1, 10):
        for rank in (0, 1):
            recs = [r for r in records if r["step"] == step and r["rank"] == rank]
            got = df.filter((pl.col("step") == step) & (pl.col("rank") == rank)).sort(["seq", "pos"])
            want = np.concatenate([trained(r, "trainer_logprobs") for r in recs])
            np.testing.assert_allclose(got["logp"].to_numpy(), want, rtol=1e-6)
            np.testing.assert_allclose(got["old_logp"].to_numpy(), want, rtol=1e-6)
            np.testing.assert_allclose(got["rollout_logp"].to_numpy(),
                                       np.concatenate([trained(r, "inference_logprobs") for r in recs]), rtol=1e-6)
            np.testing.assert_allclose(got["entropy"].to_numpy(),
                                       np.concatenate([trained(r, "entropy") for r in recs]), rtol=1e-6)
            np.testing.assert_array_equal(got["token_id"].to_numpy(),
                                          np.concatenate([trained(r, "token_ids") for r in recs]))
    # positions start at the first trained token; a trained run after a gap is the next turn
    recs = [r for r in records if r["step"] == 1 and r["rank"] == 0]
    idx, multi = next((i, r) for i, r in enumerate(recs) if not all(r["loss_mask"][r["loss_mask"].index(True):]))
    first = multi["loss_mask"].index(True)
    got = df.filter((pl.col("step") == 1) & (pl.col("rank") == 0)).sort(["seq", "pos"])
    rows = got.filter(pl.col("seq") == got["seq"].unique(maintain_order=True)[idx])
    expected_pos = [i - first for i, m in enumerate(multi["loss_mask"]) if m]
    assert rows["pos"].to_list() == expected_pos
    assert rows["turn"].to_list() == [0, 0] + [1] * (len(expected_pos) - 2)


def test_metrics_follow_from_the_mapping(tmp_path):
    records = write_exports(tmp_path / "out", steps=(4,), ranks=(0, 1, 2), per_file=8, seed=1)
    metrics = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run")).step_metrics()
    row = metrics.row(0, named=True)
    trainer = np.concatenate([trained(r, "trainer_logprobs") for r in records])
    inference = np.concatenate([trained(r, "inference_logprobs") for r in records])
    d = trainer - inference  # prime-rl's log importance ratio
    assert row["ratio/mean"] == pytest.approx(1.0, abs=1e-12)  # logp == old_logp: no within-step update
    assert row["clip/region"] == 0.0
    assert row["mismatch/k1"] == pytest.approx(np.mean(-d), rel=1e-5)
    assert row["mismatch/k3"] == pytest.approx(np.mean(np.exp(d) - 1 - d), rel=1e-4)
    # ... which is the mean of prime-rl's own per-token mismatch_kl over the trained tokens
    assert row["mismatch/k3"] == pytest.approx(np.mean(np.concatenate([trained(r, "mismatch_kl") for r in records])),
                                               rel=1e-4)
    assert row["entropy/mean"] == pytest.approx(np.mean(np.concatenate([trained(r, "entropy") for r in records])),
                                                rel=1e-5)
    rewards = [r["rewards"][0] for r in records]
    assert row["reward/mean"] == pytest.approx(np.mean(rewards), rel=1e-5)
    assert row["seq/count"] == len(records)
    assert math.isnan(row["group/nonzero_frac"])


def test_config_is_used_and_the_token_exports_folder_is_accepted(tmp_path):
    write_exports(tmp_path / "out", steps=(1,), ranks=(0,))
    cfg = rldiag.RecorderConfig(tis_cap=8.0)
    run = rldiag.open_run(import_prime_rl(tmp_path / "out" / "token_exports", tmp_path / "run", config=cfg))
    assert run.config.tis_cap == 8.0


def test_only_stable_steps_when_markers_exist(tmp_path):
    write_exports(tmp_path / "out", steps=(1, 2), ranks=(0,), stable=True)
    write_exports(tmp_path / "out2", steps=(3,), ranks=(0,))
    (tmp_path / "out2" / "token_exports" / "step_3").rename(tmp_path / "out" / "token_exports" / "step_3")
    with pytest.warns(UserWarning, match="step_3"):
        run_dir = import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert rldiag.open_run(run_dir).steps() == [1, 2]


def bad_file(tmp_path, mutate, line: int = 2):
    write_exports(tmp_path / "out", steps=(7,), ranks=(0,), per_file=3)
    path = tmp_path / "out" / "token_exports" / "step_7" / "rank_0.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[line - 1])
    lines[line - 1] = mutate(rec)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "trainer_logprobs"}), "trainer_logprobs"),
    (lambda r: json.dumps({**r, "inference_logprobs": r["inference_logprobs"][:-1]}), "different lengths"),
    (lambda r: json.dumps({**r, "entropy": r["entropy"] + [0.1]}), "entropy="),
    (lambda r: json.dumps({**r, "rank": 3}), "rank"),
    (lambda r: json.dumps({**r, "step": "seven"}), "step"),
    (lambda r: json.dumps({**r, "trainer_logprobs": ["x"] * len(r["trainer_logprobs"])}), "not a number"),
    (lambda r: json.dumps({**r, "loss_mask": [2] * len(r["loss_mask"])}), "loss_mask"),
    (lambda r: json.dumps({**r, "inference_logprobs": [0.5] * len(r["loss_mask"])}), "positive"),
    (lambda r: '{"step": 7, "rank": 0, ', "not valid JSON"),
    (lambda r: "[1, 2, 3]", "JSON object"),
])
def test_bad_input_names_file_and_line_and_leaves_nothing_behind(tmp_path, mutate, message):
    path = bad_file(tmp_path, mutate)
    with pytest.raises(PrimeRLImportError, match=message) as err:
        import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert f"{path}:2:" in str(err.value)
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_directory_errors(tmp_path):
    with pytest.raises(PrimeRLImportError, match="not a directory"):
        import_prime_rl(tmp_path / "missing", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrimeRLImportError, match="step_N"):
        import_prime_rl(tmp_path / "empty", tmp_path / "run")
    write_exports(tmp_path / "out", steps=(1,), ranks=(0,))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user data")
    with pytest.raises(PrimeRLImportError, match="not empty"):
        import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert (tmp_path / "run" / "keep.txt").read_text() == "user data"


def test_lenient_config_counts_positive_log_probs_instead(tmp_path):
    path = bad_file(tmp_path, lambda r: json.dumps({**r, "trainer_logprobs": [0.5] * len(r["loss_mask"])}))
    trained_per_line = [sum(json.loads(line)["loss_mask"]) for line in path.read_text().splitlines()]
    cfg = rldiag.RecorderConfig(errors="lenient")
    run = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", config=cfg))
    assert run.step_metrics()["tokens/count"][0] == sum(trained_per_line) - trained_per_line[1]
    assert run.step_stats()["n_invalid"].sum() == trained_per_line[1]


def test_null_log_probs_count_as_non_finite(tmp_path):
    def null_one(rec):
        i = rec["loss_mask"].index(True)
        rec["trainer_logprobs"][i] = None
        return json.dumps(rec)

    bad_file(tmp_path, null_one)
    row = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run")).step_metrics().row(0, named=True)
    assert row["ratio/nonfinite"] == 1
