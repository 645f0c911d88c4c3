"""The extrapolation-cliff rules fire from `rldiag watch --cliff-lam` on a run with teacher and base log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.analysis.cliff import lambda_star
from rldiag.cli import main


def _distill_run(path: Path) -> float:
    rng = np.random.default_rng(0)
    B, T = 8, 16
    with rldiag.Recorder(path) as rec:
        for step in range(4):
            logp = np.log(rng.uniform(0.3, 0.99, (B, T))).astype(np.float32)
            rec.record(
                step=step,
                logprobs=logp,
                old_logprobs=logp,
                advantages=np.ones(B, np.float32),
                teacher_logprobs=np.full((B, T), np.log(0.96), np.float32),
                base_logprobs=np.full((B, T), np.log(0.90), np.float32),
            )
    return float(lambda_star(0.96, 0.90, 1 / (1 - 0.2)))  # the run's eps_low gives c


def _states(out: str) -> dict[str, str]:
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    return {r[0]: r[2] for r in rows}


@pytest.mark.parametrize(
    "factor, warn, critical", [(0.5, "inactive", "inactive"), (0.97, "firing", "inactive"), (1.2, "firing", "firing")]
)
def test_cliff_rules_follow_the_headroom(tmp_path, capsys, factor, warn, critical) -> None:
    star = _distill_run(tmp_path / "run")
    args = ["watch", str(tmp_path / "run"), "--once", "--no-history", "-q", "--cliff-lam", str(factor * star)]
    code = main([*args, "--fail-on", "warn"])
    states = _states(capsys.readouterr().out)
    assert states["extrapolation_cliff"] == warn and states["extrapolation_cliff_critical"] == critical
    assert code == (1 if warn == "firing" else 0)
    assert main(args) == (1 if critical == "firing" else 0)  # the default fails on critical alerts only


def test_without_cliff_lam_the_rules_stay_quiet(tmp_path, capsys) -> None:
    _distill_run(tmp_path / "run")
    assert main(["watch", str(tmp_path / "run"), "--once", "--no-history", "-q"]) == 0
    assert _states(capsys.readouterr().out)["extrapolation_cliff_critical"] == "inactive"
    assert main(["watch", str(tmp_path / "run"), "--once", "--cliff-lam", "-1"]) == 2
