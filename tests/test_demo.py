"""The demo: task, model, CLI arguments, determinism, and the bundled sample runs it made."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

from rldiag.cli import CLIError, main
from rldiag.commands import demo as demo_cmd
from rldiag.demo.config import DEMO_MARKER, DemoConfig
from rldiag.demo.task import ALPHABET, make_prompts, make_reward, score

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_logs"
needs_samples = pytest.mark.skipif(not (SAMPLES / "collapse").is_dir(), reason="sample_logs/ not present")


# ---- task ------------------------------------------------------------------------------------------
def test_prompts_are_deterministic_and_distinct_letters() -> None:
    a, b = make_prompts(50, seed=3), make_prompts(50, seed=3)
    assert a == b and a != make_prompts(50, seed=4)
    for p in a:
        letters = p[:-1]
        assert p.endswith("=") and len(letters) == 4 and len(set(letters)) == 4 and set(letters) <= set(ALPHABET)
    with pytest.raises(ValueError, match="letters"):
        make_prompts(1, seed=0, letters=len(ALPHABET) + 1)


def test_scores() -> None:
    assert score("subset", "cab=", "bbca", 4) == 1.0
    assert score("subset", "cab=", "bbcx", 4) == 0.75
    assert score("subset", "cab=", "bb", 4) == 0.5  # a short completion loses the letters it did not write
    assert score("subset", "cab=", "bbcaaaaa", 4) == 1.0  # only the first `length` letters count
    assert score("copy", "cab=", "cab", 3) == 1.0 and score("copy", "cab=", "cxb", 3) == pytest.approx(2 / 3)
    assert score("reverse", "cab=", "bac", 3) == 1.0
    reward = make_reward("subset", length=4)
    assert reward(prompts=["cab=", "def="], completions=["aaaa", "aaaa"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown task"):
        make_reward("sort")


# ---- model -------------------------------------------------------------------------------------------
def test_tokenizer_and_model_are_built_locally_and_deterministic() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from rldiag.demo.model import build_model, build_tokenizer

    tok = build_tokenizer(ALPHABET + "=")
    ids = tok("cab=")["input_ids"]
    assert len(ids) == 4 and tok.decode(ids) == "cab="
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == "cab="
    m1, m2, m3 = build_model(tok, seed=1), build_model(tok, seed=1), build_model(tok, seed=2)
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert m1.config.vocab_size == len(tok)


# ---- CLI arguments -----------------------------------------------------------------------------------
def _args(**kw: object) -> argparse.Namespace:
    base = {
        "out": "x",
        "steps": DemoConfig.steps,
        "seed": 0,
        "change_step": None,
        "healthy": False,
        "no_alerts": False,
        "quiet": True,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_config_from_args() -> None:
    d = DemoConfig()
    assert demo_cmd.config_from_args(_args()).change_step == d.change_step
    assert demo_cmd.config_from_args(_args(healthy=True)).change_step == 0
    scaled = demo_cmd.config_from_args(_args(steps=120)).change_step
    assert scaled == round(120 * d.change_step / d.steps)
    assert demo_cmd.config_from_args(_args(steps=50, change_step=10)).change_step == 10
    for bad in (_args(steps=1), _args(steps=50, change_step=50), _args(change_step=-1)):
        with pytest.raises(CLIError):
            demo_cmd.config_from_args(bad)


def test_check_out(tmp_path: Path) -> None:
    from rldiag.demo.config import check_out

    assert check_out(tmp_path / "new") == tmp_path / "new"  # absent
    assert check_out(tmp_path) == tmp_path  # empty
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an rldiag demo run; choose another --out"):
        check_out(tmp_path)
    with pytest.raises(FileExistsError):
        check_out(tmp_path / "notes.txt")  # a file
    (tmp_path / DEMO_MARKER).write_text("")
    assert check_out(tmp_path) == tmp_path  # an earlier demo run: replaced


def test_demo_refuses_a_wrong_out_before_importing_the_trainer(tmp_path: Path) -> None:
    """The refusal comes from the arguments alone: torch, transformers and TRL are never imported for it."""
    import subprocess

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code = (
        "import sys\n"
        "from rldiag.cli import main\n"
        f"rc = main(['demo', '--out', {str(tmp_path / 'mine')!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
    assert "is not an rldiag demo run; choose another --out" in out.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_help_and_docs_quote_the_measured_time() -> None:
    from rldiag.demo.config import TIMING

    parser = argparse.ArgumentParser(prog="rldiag")
    demo_cmd.register(parser.add_subparsers())
    help_text = " ".join(parser._subparsers._group_actions[0].choices["demo"].format_help().split())  # type: ignore[union-attr]
    doc = " ".join((ROOT / "docs" / "demo.md").read_text().split())
    assert TIMING in help_text and TIMING in doc
    assert "minute or two" not in help_text and "10-30 s" not in doc


def test_serve_hook_without_dashboard(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "app.app", None)  # `from app.app import ...` now raises ImportError
    assert demo_cmd.start_dashboard(tmp_path, "127.0.0.1", 8050) is None
    err = capsys.readouterr().err
    assert "dashboard is not available" in err and f"rldiag dashboard {tmp_path}" in err


# ---- the bundled sample runs --------------------------------------------------------------------------
@needs_samples
def test_sample_collapse_run_shows_the_documented_sequence() -> None:
    from rldiag.demo.summary import facts

    f = facts(SAMPLES / "collapse")
    change = f["regime_change_step"]
    assert change == DemoConfig.change_step and f["last_step"] == DemoConfig.steps
    # healthy phase: ratios stay near 1, little clipping
    assert f["logabs_p999_healthy_max"] < 1.0 and f["clip_healthy_mean"] < 0.02
    # after the change: the ratio tail blows up past ln 10, then the entropy collapses, then groups die
    assert f["logabs_p999_max"] > math.log(10)
    assert f["entropy_collapsed_at"] is not None and change < f["entropy_collapsed_at"] <= change + 20
    assert f["entropy_end"] < 0.05 * f["entropy_start"] and f["live_groups_end"] < 0.3
    first = f["alerts_first_step"]
    assert {"ratio_tail", "entropy_collapse", "dead_groups_critical"} <= set(first)
    assert change < first["ratio_tail"] <= first["entropy_collapse"] < first["dead_groups_critical"]


@needs_samples
def test_sample_healthy_run_stays_healthy() -> None:
    from rldiag.alerts.engine import read_history
    from rldiag.demo.summary import facts

    f = facts(SAMPLES / "healthy")
    assert f["regime_change_step"] is None and f["last_step"] == DemoConfig.steps
    assert f["entropy_collapsed_at"] is None and f["entropy_end"] > 0.3 * f["entropy_start"]
    assert f["reward_healthy_end"] > f["reward_start"] + 0.3  # it learns
    assert f["logabs_p999_healthy_max"] < 1.0 and f["ratio_max"] < 2.0
    critical = [e for e in read_history(SAMPLES / "healthy" / "alerts.jsonl") if e.get("severity") == "critical"]
    assert critical == []


@needs_samples
def test_docs_demo_numbers_are_those_of_the_sample_runs() -> None:
    """docs/demo.md's table is doc_section() of sample_logs/: regenerate it with the command in
    rldiag/demo/story.py when the sample runs or the default rules change."""
    from rldiag.demo.story import BEGIN, END, doc_section

    page = (ROOT / "docs" / "demo.md").read_text()
    shown = page[page.index(BEGIN) : page.index(END) + len(END)]
    assert shown == doc_section(SAMPLES / "collapse", SAMPLES / "healthy")


@needs_samples
def test_samples_share_the_healthy_phase() -> None:
    """Same seed, same settings until the change: the two runs are identical up to the change step."""
    import rldiag

    h = rldiag.open_run(SAMPLES / "healthy").step_metrics(metrics=["entropy/mean", "clip/region", "kl/k3"])
    c = rldiag.open_run(SAMPLES / "collapse").step_metrics(metrics=["entropy/mean", "clip/region", "kl/k3"])
    n = DemoConfig.change_step
    assert h.head(n).equals(c.head(n))
    assert not h.slice(n, 5).equals(c.slice(n, 5))


# ---- training for real -------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_cli_runs_is_deterministic_and_changes_regime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("trl")
    import polars as pl
    from polars.testing import assert_frame_equal

    import rldiag

    argv = ["demo", "--steps", "40", "--change-step", "24", "--quiet", "--no-alerts"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "rldiag demo run:" in out and "healthy until step 24" in out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert main([*argv, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = (rldiag.open_run(tmp_path / n) for n in "abc")
    assert_frame_equal(a.step_metrics(), b.step_metrics())
    cols = ["step", "micro", "seq", "pos"]
    assert_frame_equal(a.tokens().collect().sort(cols), b.tokens().collect().sort(cols))
    assert not a.step_metrics()["entropy/mean"].equals(c.step_metrics()["entropy/mean"])
    m = a.step_metrics()
    assert m["step"].to_list() == list(range(1, 41))
    before, after = m.filter(pl.col("step") <= 24), m.filter(pl.col("step") > 24)
    # healthy: each rollout feeds 2 updates (staleness 0, 1); after the change, 8 (staleness 0..7)
    assert before["staleness/max"].to_list() == [0.0, 1.0] * 12
    assert after["staleness/max"].to_list() == [float(i) for i in range(DemoConfig.stale_iterations)] * 2
    assert after["kl/k3"].max() > 10 * before["kl/k3"].max()
    # a rerun into the same folder replaces it; a folder that is not a demo run is refused
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / DEMO_MARKER).exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([*argv, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
@needs_samples
def test_sample_runs_regenerate(tmp_path: Path) -> None:
    """The README's command reproduces the start of sample_logs/collapse (same seed, same code).

    Only the first steps are compared, with a tolerance: the collapse amplifies the last bit of floating-point
    difference a different CPU may introduce. If this fails after a change to the demo, regenerate sample_logs
    with the commands in sample_logs/README.md.
    """
    pytest.importorskip("trl")
    import numpy as np

    import rldiag
    from rldiag.demo.train import main as train

    run = train(DemoConfig(out=str(tmp_path / "collapse"), steps=DemoConfig.steps, quiet=True, alerts=False))
    names = ["entropy/mean", "reward/mean", "clip/region", "kl/k3"]
    fresh = rldiag.open_run(run).step_metrics(metrics=names).head(20)
    stored = rldiag.open_run(SAMPLES / "collapse").step_metrics(metrics=names).head(20)
    for name in names:
        np.testing.assert_allclose(fresh[name].to_numpy(), stored[name].to_numpy(), atol=1e-4, err_msg=name)
