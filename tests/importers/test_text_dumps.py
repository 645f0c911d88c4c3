"""verl's ``rollout_data_dir`` and AReaL's rollout dumps hold no per-token values: the importers say so.

Fixtures follow the writers' definitions: verl ``RayPPOTrainer._write_generations``
(``verl/trainer/ppo/ray_trainer.py``: ``{step}.jsonl`` lines with input, output, gts, score, step and reward
extras) and AReaL ``WorkflowExecutor._dump_trajectory`` (``areal/infra/workflow_executor.py``:
``rollout/<tail_version>/<task_id>.jsonl`` with task_id, sample_idx, seqlen, prompt_len, head_version,
tail_version, reward, prompt, completion).
"""

from __future__ import annotations

import json

import pytest

from rldiag.cli import main
from rldiag.importers import ImportInputError
from rldiag.importers.areal import import_areal
from rldiag.importers.verl import import_verl


def test_verl_dump_is_read_and_refused_with_what_it_lacks(tmp_path, capsys):
    for step in (1, 2):
        with open(tmp_path / f"{step}.jsonl", "w") as f:
            f.writelines(
                json.dumps(
                    {"input": "q", "output": "a", "gts": "4", "score": 1.0, "step": step, "acc": 1}, ensure_ascii=False
                )
                + "\n"
                for i in range(3)
            )
    with pytest.raises(ImportInputError, match=r"6 samples over 2 step\(s\).*no per-token log-probs"):
        import_verl(tmp_path, tmp_path / "run")
    (tmp_path / "3.jsonl").write_text('{"input": "q"}\n')
    assert main(["import", "verl", str(tmp_path), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / '3.jsonl'}:1: lacks ['output', 'score', 'step']" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_areal_dump_is_read_and_refused_with_what_it_lacks(tmp_path):
    folder = tmp_path / "rollout" / "7"
    folder.mkdir(parents=True)
    (folder / "12.jsonl").write_text(
        json.dumps(
            {
                "task_id": 12,
                "sample_idx": 0,
                "seqlen": 9,
                "prompt_len": 4,
                "head_version": 6,
                "tail_version": 7,
                "reward": 1.0,
                "prompt": "p",
                "completion": "c",
            }
        )
        + "\n"
    )
    with pytest.raises(ImportInputError, match=r"1 samples over 1 step.*versions"):
        import_areal(tmp_path, tmp_path / "run")
