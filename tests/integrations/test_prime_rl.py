"""Import of prime-rl token exports, on files in the exact shape prime-rl's exporter writes.

prime-rl does not install here, so ``write_exports`` generates files from the format as prime-rl defines it
(``TokenExporter.export`` and ``_export_columns`` in ``src/prime_rl/trainer/rl/token_export.py``): one JSON object
per packed sequence with ``schema_version``, ``step``, ``rank``, ``micro_step``, ``micro_sequence_idx``,
``export_sequence_idx``, ``env_name`` and the per-token lists, ``null`` for non-finite floats and a list of
``null`` for a weight stream the batch does not carry, compact separators, ``allow_nan=False``; ``STABLE``
once every rank flushed. Expected metrics are computed here with numpy, the way prime-rl's
``compute_loss`` and ``train.py`` select tokens.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rldiag
from rldiag.cli import main
from rldiag.importers import ImportReport
from rldiag.record.integrations.prime_rl import PrimeRLImportError, import_prime_rl


def _f(values) -> list:
    return [None if not math.isfinite(v) else float(np.float32(v)) for v in values]


def make_sequence(
    rng, step, rank, micro_step, micro_idx, export_idx, *, multi_turn=False, rl_weights=False, env="math"
) -> dict:
    prompt, resp = int(rng.integers(3, 8)), int(rng.integers(2, 12))
    n = prompt + resp
    mask = [False] * prompt + [True] * resp
    if multi_turn and resp > 5:
        mask[prompt + 2 : prompt + 4] = [False, False]  # a tool result inside the response
    trainer = -rng.exponential(1.0, n)
    inference = -np.abs(trainer + rng.normal(0, 0.1, n))
    adv = float(rng.normal())
    log_ratio = trainer - inference
    rlw = None
    if rl_weights:
        rlw = [1.0] * n
        rlw[prompt] = 0.0  # the first response token belongs to the CE component only
    nones = [None] * n
    return {
        "schema_version": 1,
        "step": step,
        "rank": rank,
        "micro_step": micro_step,
        "micro_sequence_idx": micro_idx,
        "export_sequence_idx": export_idx,
        "env_name": env,
        "token_ids": rng.integers(0, 1000, n).tolist(),
        "position_ids": list(range(n)),
        "loss_mask": mask,
        "advantages": _f([adv] * n),
        "inference_logprobs": _f(inference),
        "trainer_logprobs": _f(trainer),
        "entropy": _f(rng.uniform(0, 3, n)),
        "mismatch_kl": _f(np.exp(log_ratio) - log_ratio - 1),
        "log_importance_ratio": _f(log_ratio),
        "importance_ratio": _f(np.exp(log_ratio)),
        "prob_delta": _f(np.exp(trainer) - np.exp(inference)),
        "is_masked": [False] * n,
        "is_masked_high": [False] * n,
        "is_masked_low": [False] * n,
        "rl_weights": rlw if rlw is not None else nones,
        "ce_weights": [0.0 if w else 1.0 for w in rlw] if rlw is not None else nones,
        "ref_kl_weights": nones,
    }


def write_exports(
    root,
    steps=(1, 2, 10),
    ranks=(0, 1),
    per_file=5,
    seed=0,
    stable=False,
    multi_turn=False,
    micro_steps=1,
    rl_weights=False,
    envs=("math",),
):
    rng = np.random.default_rng(seed)
    records = []
    for step in steps:
        folder = root / "token_exports" / f"step_{step}"
        folder.mkdir(parents=True)
        for rank in ranks:
            seqs, k = [], 0
            for micro in range(micro_steps):
                for j in range(per_file):
                    seqs.append(
                        make_sequence(
                            rng,
                            step,
                            rank,
                            micro,
                            j,
                            k,
                            multi_turn=multi_turn,
                            rl_weights=rl_weights,
                            env=envs[k % len(envs)],
                        )
                    )
                    k += 1
            text = "".join(json.dumps(s, separators=(",", ":"), allow_nan=False) + "\n" for s in seqs)
            (folder / f"rank_{rank}.jsonl").write_text(text)
            records += seqs
        if stable:
            (folder / "STABLE").touch()
    return records


def rl_mask(rec: dict) -> np.ndarray:
    mask = np.array(rec["loss_mask"])
    if rec["rl_weights"][0] is not None:
        mask &= np.array(rec["rl_weights"]) != 0
    return mask


def trained(rec: dict, key: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in rec[key]], dtype=float)[rl_mask(rec)]


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
            np.testing.assert_allclose(
                got["rollout_logp"].to_numpy(),
                np.concatenate([trained(r, "inference_logprobs") for r in recs]),
                rtol=1e-6,
            )
            np.testing.assert_allclose(
                got["entropy"].to_numpy(), np.concatenate([trained(r, "entropy") for r in recs]), rtol=1e-6
            )
            np.testing.assert_array_equal(
                got["token_id"].to_numpy(), np.concatenate([trained(r, "token_ids") for r in recs])
            )
    # positions start at the first trained token; a trained run after a gap is the next turn
    recs = [r for r in records if r["step"] == 1 and r["rank"] == 0]
    idx, multi = next((i, r) for i, r in enumerate(recs) if not all(r["loss_mask"][r["loss_mask"].index(True) :]))
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
    # ... which is prime-rl's own mismatch_kl/all/mean: the token mean of its per-token mismatch_kl
    assert row["mismatch/k3"] == pytest.approx(
        np.mean(np.concatenate([trained(r, "mismatch_kl") for r in records])), rel=1e-4
    )
    assert row["entropy/mean"] == pytest.approx(
        np.mean(np.concatenate([trained(r, "entropy") for r in records])), rel=1e-5
    )
    assert row["seq/count"] == len(records)
    assert math.isnan(row["group/nonzero_frac"])
    assert math.isnan(row["reward/mean"])  # the export has no reward


def test_rl_weights_decide_which_tokens_are_rl_tokens(tmp_path):
    records = write_exports(tmp_path / "out", steps=(3,), ranks=(0,), per_file=12, seed=2, rl_weights=True)
    report = ImportReport(trainer="prime-rl", source="x")
    row = (
        rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", report=report))
        .step_metrics()
        .row(0, named=True)
    )
    kl = [trained(r, "mismatch_kl") for r in records]
    want = np.mean(np.concatenate(kl))
    everything = np.mean(
        np.concatenate([np.array(r["mismatch_kl"], dtype=float)[np.array(r["loss_mask"])] for r in records])
    )
    assert row["mismatch/k3"] == pytest.approx(want, rel=1e-4)
    assert abs(want - everything) > 1e-4 * abs(want)  # the test would fail if zero-weight tokens counted
    assert row["tokens/count"] == sum(len(k) for k in kl) == report.tokens
    assert report.notes["tokens outside the RL stream (zero rl weight, CE only)"] == len(records)


def test_micro_step_and_env_name_are_kept(tmp_path):
    records = write_exports(tmp_path / "out", steps=(5,), ranks=(0,), per_file=3, micro_steps=3, envs=("math", "code"))
    report = ImportReport(trainer="prime-rl", source="x")
    run = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", report=report))
    tok = run.tokens().collect()
    assert sorted(tok["micro"].unique().to_list()) == [0, 1, 2]
    assert report.notes["env_name -> stage"] == {"math": 0, "code": 1}
    assert sorted(tok["stage"].unique().to_list()) == [0, 1]
    # prime-rl's per-environment mismatch_kl/<env>/mean and entropy/<env>/mean are the stage buckets
    table = run.bucket_metrics(by="stage").sort("bucket")
    for code, env in enumerate(("math", "code")):
        recs = [r for r in records if r["env_name"] == env]
        row = table.row(code, named=True)
        assert row["mismatch/k3"] == pytest.approx(
            np.mean(np.concatenate([trained(r, "mismatch_kl") for r in recs])), rel=1e-4
        )
        assert row["entropy/mean"] == pytest.approx(
            np.mean(np.concatenate([trained(r, "entropy") for r in recs])), rel=1e-5
        )


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


BAD = [
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "trainer_logprobs"}), "trainer_logprobs"),
    (lambda r: json.dumps({**r, "inference_logprobs": r["inference_logprobs"][:-1]}), "different lengths"),
    (lambda r: json.dumps({**r, "entropy": r["entropy"] + [0.1]}), "entropy="),
    (lambda r: json.dumps({**r, "rank": 3}), "column rank"),
    (lambda r: json.dumps({**r, "step": "seven"}), "column step"),
    (lambda r: json.dumps({**r, "step": None}), "column step"),
    (lambda r: json.dumps({**r, "step": 10**30}), "column step"),
    (lambda r: json.dumps({**r, "step": 8}), "does not match the folder"),
    (lambda r: json.dumps({**r, "token_ids": [10**30] * len(r["token_ids"])}), "column token_ids"),
    (lambda r: json.dumps({**r, "trainer_logprobs": ["x"] * len(r["trainer_logprobs"])}), "not a number"),
    (lambda r: json.dumps({**r, "trainer_logprobs": [1e400 if False else 10**400] * len(r["loss_mask"])}), "too large"),
    (lambda r: json.dumps({**r, "loss_mask": [2] * len(r["loss_mask"])}), "column loss_mask"),
    (lambda r: json.dumps({**r, "inference_logprobs": [0.5] * len(r["loss_mask"])}), "positive"),
    (lambda r: json.dumps({**r, "entropy": [-1.0] * len(r["loss_mask"])}), "negative entropy"),
    (lambda r: json.dumps({**r, "advantages": {"a": 1}}), "column advantages"),
    (lambda r: json.dumps({**r, "rl_weights": [None, 1.0] + [1.0] * (len(r["loss_mask"]) - 2)}), "rl_weights"),
    (lambda r: json.dumps({**r, "export_sequence_idx": 0}), "repeats the record 0"),
    (lambda r: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda r: '{"step": ' + "9" * 5000 + "}", "not valid JSON"),
    (lambda r: '{"step": 7, "rank": 0, ', "not valid JSON"),
    (lambda r: "[1, 2, 3]", "JSON object"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_input_names_file_and_line_and_leaves_nothing_behind(tmp_path, mutate, message):
    path = bad_file(tmp_path, mutate)
    with pytest.raises(
        PrimeRLImportError
        if "repeats" not in message and "positive" not in message and "negative" not in message
        else ValueError,
        match=message,
    ) as err:
        import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert str(err.value).startswith(f"{path}:2")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mutate,message", BAD)
def test_lenient_skips_the_bad_record_and_counts_it(tmp_path, mutate, message):
    path = bad_file(tmp_path, mutate)
    good = [json.loads(x) for i, x in enumerate(path.read_text().splitlines()) if i != 1]
    report = ImportReport(trainer="prime-rl", source="x")
    run = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", errors="lenient", report=report))
    assert report.rows_read == 3
    assert sum(report.skipped.values()) >= 1
    assert any(f"{path}:2" in where for where in report.first.values())
    kept = run.tokens().collect().height
    assert kept == report.tokens
    if "positive" in message or "negative" in message:  # token-level: the record's other tokens stay
        assert kept == sum(sum(r["loss_mask"]) for r in good)
    else:
        assert kept == sum(sum(r["loss_mask"]) for r in good)


def test_directory_errors(tmp_path):
    with pytest.raises(PrimeRLImportError, match="not a directory"):
        import_prime_rl(tmp_path / "missing", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrimeRLImportError, match="step_N"):
        import_prime_rl(tmp_path / "empty", tmp_path / "run")
    write_exports(tmp_path / "out", steps=(1,), ranks=(0,))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert (tmp_path / "run" / "keep.txt").read_text() == "user data"


def test_empty_export_is_an_error(tmp_path):
    folder = tmp_path / "out" / "token_exports" / "step_0"
    folder.mkdir(parents=True)
    (folder / "rank_0.jsonl").write_text("")
    with pytest.raises(PrimeRLImportError, match="no trained tokens"):
        import_prime_rl(tmp_path / "out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lenient_config_counts_positive_log_probs(tmp_path):
    path = bad_file(tmp_path, lambda r: json.dumps({**r, "trainer_logprobs": [0.5] * len(r["loss_mask"])}))
    trained_per_line = [sum(json.loads(line)["loss_mask"]) for line in path.read_text().splitlines()]
    cfg = rldiag.RecorderConfig(errors="lenient")
    report = ImportReport(trainer="prime-rl", source="x")
    run = rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", config=cfg, report=report))
    assert run.step_metrics()["tokens/count"][0] == sum(trained_per_line) - trained_per_line[1]
    assert report.skipped["positive log-probability (tokens)"] == trained_per_line[1]


def test_null_log_probs_count_as_non_finite_and_are_reported(tmp_path):
    def null_two(rec):
        i = rec["loss_mask"].index(True)
        rec["trainer_logprobs"][i] = None
        rec["inference_logprobs"][i + 1] = None  # prime-rl writes null for a -inf sampling log-prob
        return json.dumps(rec)

    bad_file(tmp_path, null_two)
    report = ImportReport(trainer="prime-rl", source="x")
    row = (
        rldiag.open_run(import_prime_rl(tmp_path / "out", tmp_path / "run", report=report))
        .step_metrics()
        .row(0, named=True)
    )
    assert row["ratio/nonfinite"] == 1
    assert report.missing == {"trainer_logprobs": 1, "inference_logprobs": 1}
    assert "inference_logprobs: stored as NaN" in report.summary().replace("missing ", "")
    stored = json.loads((tmp_path / "run" / ".rldiag-import.json").read_text())
    assert stored["missing"] == {"trainer_logprobs": 1, "inference_logprobs": 1}


def test_cli_one_line_error_then_a_retry_works(tmp_path, capsys):
    path = bad_file(tmp_path, lambda r: "[" * 100_000)
    assert main(["import", "prime-rl", str(tmp_path / "out"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main(["import", "prime-rl", str(tmp_path / "out"), str(tmp_path / "run"), "--errors", "lenient"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1: bad record" in out
    assert rldiag.open_run(tmp_path / "run").tokens().collect().height > 0


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_KEYS = [
    "step",
    "rank",
    "micro_step",
    "export_sequence_idx",
    "token_ids",
    "loss_mask",
    "advantages",
    "inference_logprobs",
    "trainer_logprobs",
    "entropy",
    "rl_weights",
    "ce_weights",
    "ref_kl_weights",
    "env_name",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), errors=st.sampled_from(["strict", "lenient"]))
def test_random_bad_records_never_give_anything_but_a_clear_error(data, errors):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_exports(root / "out", steps=(2,), ranks=(0,), per_file=3)
        path = root / "out" / "token_exports" / "step_2" / "rank_0.jsonl"
        lines = path.read_text().splitlines()
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(lines) - 1))
            rec = json.loads(lines[i])
            key = data.draw(st.sampled_from(_KEYS))
            if data.draw(st.booleans()) and isinstance(rec.get(key), list) and rec[key]:
                j = data.draw(st.integers(0, len(rec[key]) - 1))
                rec[key][j] = data.draw(_JSON)  # one bad element of a per-token list
            else:
                rec[key] = data.draw(_JSON)
            lines[i] = json.dumps(rec)
        path.write_text("\n".join(lines) + "\n")
        report = ImportReport(trainer="prime-rl", source="x")
        try:
            import_prime_rl(root / "out", root / "run", errors=errors, report=report)
        except PrimeRLImportError as exc:
            assert str(exc).startswith(str(root / "out")) and "\n" not in str(exc)
            assert sorted(p.name for p in root.iterdir()) == ["out"]
            return
        assert rldiag.open_run(root / "run").tokens().collect().height == report.tokens
