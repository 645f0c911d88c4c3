"""``rldiag summarize``'s table: metrics without a value on any step are named in one line, not printed as rows
of NaN; naming them in ``--metrics`` shows them."""

from __future__ import annotations

from pathlib import Path

from rldiag.cli import main

RUN = Path(__file__).resolve().parents[2] / "sample_logs" / "collapse"  # no rollout/reference log-probs, no MoE


def test_metrics_without_values_are_listed_in_one_line(capsys) -> None:
    assert main(["summarize", str(RUN)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:] if line and not line.startswith("NaN on every step")]
    assert "ratio/mean" in rows and "reward/nonfinite" in rows
    assert not any(r.startswith(("mismatch/", "removed/", "moe/")) or r == "kl/ref_k3" for r in rows), rows
    last = out.splitlines()[-1]
    assert last.startswith("NaN on every step")
    assert "mismatch/*" in last and "removed/*" in last and "kl/ref_k3" in last and "teacher_logp/nonfinite" in last
    # kl/k1..k3 have values: a family is starred only when all its metrics are NaN
    assert "kl/*" not in last and "ratio" not in last


def test_named_metrics_are_shown_even_without_values(capsys) -> None:
    assert main(["summarize", str(RUN), "--metrics", "mismatch/k1,ratio/mean"]) == 0
    out = capsys.readouterr().out
    assert "mismatch/k1" in out and "nan" in out and "NaN on every step" not in out


def _run_without_token_rows(where: Path, steps: int = 3) -> None:
    import numpy as np

    import rldiag

    old = np.log(np.linspace(0.1, 0.9, 32)).reshape(4, 8).astype(np.float32)
    with rldiag.Recorder(where, token_sample_rate=1e-12) as rec:  # statistics only, in practice
        for s in range(steps):
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))


def test_from_tokens_on_a_run_without_token_rows_says_so(tmp_path: Path, capsys) -> None:
    _run_without_token_rows(tmp_path / "run")
    assert main(["summarize", str(tmp_path / "run"), "--from-tokens"]) == 2
    err = capsys.readouterr().err
    assert "has no token rows, and --from-tokens recomputes every statistic from them" in err
    assert main(["summarize", str(tmp_path / "run")]) == 0  # the stored statistics still give every metric


def test_the_runs_own_warnings_are_one_line_on_stderr(tmp_path: Path, capsys) -> None:
    # a token file cut in half (a copy that stopped early): rldiag's warning about it, without Python's source line
    import shutil

    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    token_file = sorted((run / "tokens").glob("*.parquet"))[0]
    token_file.write_bytes(token_file.read_bytes()[: token_file.stat().st_size // 2])
    assert main(["summarize", str(run), "--from-tokens", "--metrics", "ratio/mean"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and all(line.startswith("rldiag summarize: warning: ") for line in err), err


def test_output_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    """``rldiag summarize RUN --per-step | head -1``: the reader closes the pipe after one line; the command
    stops without a traceback (exit status 141, as a process killed by SIGPIPE reports in a shell)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rldiag", "summarize", str(RUN), "--per-step"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # more than a pipe's buffer is still to come (670 kB)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""
