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
