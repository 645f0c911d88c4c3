"""NeMo-RL ``train_data_step{N}.jsonl`` import, on files in the shape NeMo-RL writes them.

NeMo-RL does not install here. ``write_step`` builds the GRPO loop's ``log_data`` (``grpo_train`` in
``nemo_rl/algorithms/grpo.py``: content, rewards, input_lengths, token_ids, token_loss_mask, sample_loss_mask,
advantages, generation_logprobs, prev_logprobs, right-padded to the batch's longest sample, log-prob of token t
at position t and 0 at position 0) and writes it the way ``Logger.log_batched_dict_as_jsonl``
(``nemo_rl/utils/logger.py``) does: one line per micro-batch of one sample, every value a batch-of-one list,
plus ``idx``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.cli import main
from rldiag.importers import ImportInputError, ImportReport
from rldiag.importers.nemo_rl import import_nemo_rl


def write_step(folder, step, batch=6, seed=0):
    rng = np.random.default_rng(seed + step)
    prompt = rng.integers(2, 5, batch)
    resp = rng.integers(2, 8, batch)
    lengths = prompt + resp
    T = int(lengths.max())
    ids = np.zeros((batch, T), dtype=int)
    mask = np.zeros((batch, T), dtype=int)
    prev = np.zeros((batch, T))
    gen = np.zeros((batch, T))
    adv = np.zeros((batch, T))
    rewards = rng.integers(0, 2, batch).astype(float)
    for i in range(batch):
        n = int(lengths[i])
        ids[i, :n] = rng.integers(1, 500, n)
        mask[i, prompt[i] : n] = 1
        lp = -rng.exponential(1.0, n)
        lp[0] = 0.0
        prev[i, 1:n] = lp[1:]
        gen[i, 1:n] = np.minimum(lp[1:] + rng.normal(0, 0.05, n - 1), 0)
        adv[i, prompt[i] : n] = rewards[i] - rewards.mean()
    log_data = {
        "content": [[{"role": "user", "content": "q"}]] * batch,
        "rewards": rewards.tolist(),
        "input_lengths": lengths.tolist(),
        "token_ids": ids.tolist(),
        "token_loss_mask": mask.tolist(),
        "sample_loss_mask": [1.0] * batch,
        "advantages": adv.tolist(),
        "generation_logprobs": gen.tolist(),
        "prev_logprobs": prev.tolist(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"train_data_step{step}.jsonl", "w") as f:
        for i in range(batch):
            sample = {k: v[i : i + 1] for k, v in log_data.items()}
            f.write(json.dumps({**sample, "idx": i}, default=str) + "\n")
    return log_data


def test_import_maps_prev_and_generation_log_probs(tmp_path):
    data = {s: write_step(tmp_path / "logs" / "exp_001", s) for s in (1, 2, 3)}
    report = ImportReport(trainer="nemo-rl", source="x")
    run = rldiag.open_run(import_nemo_rl(tmp_path / "logs", tmp_path / "run", report=report))
    assert run.steps() == [1, 2, 3]
    m = run.step_metrics().row(1, named=True)
    d = data[2]
    mask = np.array(d["token_loss_mask"], dtype=bool)
    prev, gen = np.array(d["prev_logprobs"])[mask], np.array(d["generation_logprobs"])[mask]
    assert m["tokens/count"] == mask.sum()
    assert m["ratio/mean"] == pytest.approx(1.0)
    x = prev - gen
    assert m["mismatch/k3"] == pytest.approx(np.mean(np.exp(x) - 1 - x), rel=1e-4)
    assert m["mismatch/k1"] == pytest.approx(np.mean(-x), rel=1e-4)
    assert m["reward/mean"] == pytest.approx(np.mean(d["rewards"]))
    assert m["adv/mean"] == pytest.approx(np.array(d["advantages"])[mask].mean(), abs=1e-6)
    tok = run.tokens().collect()
    assert tok.height == report.tokens == sum(int(np.sum(v["token_loss_mask"])) for v in data.values())
    assert sorted(tok.filter(tok["step"] == 2)["token_id"].to_list()) == sorted(np.array(d["token_ids"])[mask])


def test_bad_lines_named_and_lenient_counts(tmp_path, capsys):
    write_step(tmp_path / "logs", 1)
    path = tmp_path / "logs" / "train_data_step1.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["prev_logprobs"][0][rec["input_lengths"][0] - 1] = 0.3  # the last trained token
    lines[2] = json.dumps(rec)
    rec = json.loads(lines[4])
    rec["advantages"] = [rec["advantages"][0][:-1]]
    lines[4] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    assert main(["import", "nemo-rl", str(tmp_path / "logs"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3, column prev_logprobs[" in err and "positive log-probability" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert main(["import", "nemo-rl", str(tmp_path / "logs"), str(tmp_path / "run"), "--errors", "lenient"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1: bad record" in out and "skipped 1: positive log-probability (tokens)" in out


def test_an_old_dump_without_masks_is_refused(tmp_path):
    (tmp_path / "train_data_step0.jsonl").write_text(
        json.dumps(
            {
                "content": ["x"],
                "rewards": [1.0],
                "generation_logprobs": [[0.0, -1.0]],
                "prev_logprobs": [[0.0, -1.0]],
                "input_lengths": [2],
                "idx": 0,
            }
        )
        + "\n"
    )
    with pytest.raises(ImportInputError, match="lacks .*token_loss_mask"):
        import_nemo_rl(tmp_path, tmp_path / "run")


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), errors=st.sampled_from(["strict", "lenient"]))
def test_random_bad_values_never_give_anything_but_a_clear_error(data, errors):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_step(root / "logs", 4, batch=3)
        path = root / "logs" / "train_data_step4.jsonl"
        lines = path.read_text().splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        rec = json.loads(lines[i])
        key = data.draw(st.sampled_from(sorted(rec)))
        if data.draw(st.booleans()) and isinstance(rec[key], list) and rec[key] and isinstance(rec[key][0], list):
            j = data.draw(st.integers(0, len(rec[key][0]) - 1))
            rec[key][0][j] = data.draw(_JSON)
        else:
            rec[key] = data.draw(_JSON)
        lines[i] = json.dumps(rec)
        path.write_text("\n".join(lines) + "\n")
        report = ImportReport(trainer="nemo-rl", source="x")
        try:
            import_nemo_rl(root / "logs", root / "run", errors=errors, report=report)
        except ImportInputError as exc:
            assert str(exc).startswith(str(root / "logs")) and "\n" not in str(exc)
            assert sorted(p.name for p in root.iterdir()) == ["logs"]
            return
        assert rldiag.open_run(root / "run").tokens().collect().height == report.tokens
