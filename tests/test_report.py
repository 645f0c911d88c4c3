"""The shareable HTML report (rldiag/report.py, ``rldiag report``) on the bundled sample runs.

Expected steps are read from the stored metrics, the run's alert history and the default rules, not written
here as numbers, so a regenerated sample run does not break the tests for the wrong reason.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.alerts import default_rules
from rldiag.cli import main
from rldiag.metrics.registry import HEADLINE
from rldiag.report import (
    ReportError,
    build_report,
    panels,
    summarize_run,
    visible,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
COLLAPSE = ROOT / "sample_logs" / "collapse"
HEALTHY = ROOT / "sample_logs" / "healthy"


@pytest.fixture(scope="module")
def compare_html() -> str:
    return build_report(COLLAPSE, [HEALTHY])


def _condition(rule_name: str, metric: str):
    rule = next(r for r in default_rules() if r.name == rule_name)
    return rule, next(c for c in rule.conditions if c.metric == metric)


def _first_run_of(bad: np.ndarray, length: int) -> int | None:
    """Index of the first of ``length`` consecutive True values."""
    for i in range(len(bad) - length + 1):
        if bad[i : i + length].all():
            return i
    return None


def _entropy_collapse_onset(run) -> int | None:
    """First step of the first `for` consecutive steps with entropy/mean below the rule's baseline multiple."""
    _, cond = _condition("entropy_collapse", "entropy/mean")
    m = run.step_metrics(metrics=["entropy/mean"])
    ent, steps = m["entropy/mean"].to_numpy(), m["step"].to_numpy()
    baseline = float(np.median(ent[: cond.baseline_steps]))
    i = _first_run_of(ent < cond.threshold * baseline, cond.for_)
    return None if i is None else int(steps[i])


def test_collapse_summary_names_the_collapse_and_its_steps() -> None:
    run = rldiag.open_run(COLLAPSE)
    s = summarize_run(run)
    assert s.verdict == "critical"
    onset = _entropy_collapse_onset(run)
    assert onset is not None, "the sample collapse run must collapse"
    fired = [e for e in run.alerts() if e["rule"] == "entropy_collapse" and e["event"] == "firing"]
    resolved = [e for e in run.alerts() if e["rule"] == "entropy_collapse" and e["event"] == "resolved"]
    assert fired and not resolved  # the sample never recovers: the summary must say so
    finding = next(f for f in s.findings if f.group == "entropy_collapse")
    assert finding.severity == "critical"
    assert (finding.onset_step, finding.lead.start_step) == (onset, int(fired[0]["step"]))
    assert f"entropy collapse from step {onset}" in s.headline.lower()
    assert f"started at step {onset}" in finding.sentence
    assert f"fired at step {fired[0]['step']}" in finding.sentence
    assert f"still firing at the last step ({run.steps()[-1]})" in finding.sentence
    # the driver: the early warning's covariance, and the covariance-ranked tokens when tokens are given
    assert "entropy/cov" in finding.sentence
    # ratio tails: the critical rule's first firing, backed by the stored metric above its threshold
    tail = next(f for f in s.findings if f.group == "ratio_tail")
    ev = next(e for e in run.alerts() if e["rule"] == "ratio_tail" and e["event"] == "firing")
    m = run.step_metrics(metrics=[ev["metric"]])
    value = float(m.filter(m["step"] == ev["step"])[ev["metric"]][0])
    assert value > float(ev["threshold"])
    assert tail.lead.start_step == int(ev["step"]) and f"at step {tail.onset_step}" in tail.sentence
    end = next(e for e in run.alerts() if e["rule"] == "ratio_tail" and e["event"] == "resolved")
    assert f"resolved at step {end['step']}" in tail.sentence
    # findings in the summary are in the order things went wrong
    onsets = [f.onset_step for f in s.findings if f.severity == "critical"]
    assert sorted(onsets)[0] == min(
        int(e["step"]) for e in run.alerts() if e["severity"] == "critical" and e["event"] == "firing"
    )


def test_healthy_summary_says_nothing_alarming() -> None:
    run = rldiag.open_run(HEALTHY)
    s = summarize_run(run)
    assert _entropy_collapse_onset(run) is None  # the stored metrics agree: no collapse
    assert not [e for e in run.alerts() if e["severity"] == "critical"]
    assert s.verdict in ("ok", "warn")
    assert s.headline.startswith("No critical alert fired") or s.headline.startswith("No alert fired")
    assert all(f.severity != "critical" for f in s.findings)
    text = s.text().lower()
    assert "started at step" not in text and "what went wrong" not in text


def test_summary_says_where_the_job_was_restarted(tmp_path: Path) -> None:
    """A job preempted after step 7 and resumed from its checkpoint at step 5: the summary says so."""
    from tests.app.synth import record_run

    record_run(tmp_path / "resumed", steps=8)
    record_run(tmp_path / "resumed", steps=4, start=5, seed=1)
    text = summarize_run(rldiag.open_run(tmp_path / "resumed")).text()
    assert "- The job was restarted: step 5 (rank 0). From a restart's step on" in text
    assert "restarted" not in summarize_run(rldiag.open_run(HEALTHY)).text()


def test_panels_mark_restarts_and_break_lines_across_steps_without_data(tmp_path: Path) -> None:
    """Killed after step 5, resumed from a checkpoint at step 8: the report's panels mark the restart and do not
    join steps 5 and 8 by a line across steps that hold no data."""
    from rldiag import report
    from tests.app.synth import record_run

    record_run(tmp_path / "late", steps=6)
    record_run(tmp_path / "late", steps=4, start=8, seed=1)
    run = rldiag.open_run(tmp_path / "late")
    d = report._prepare(run, "late", "#1f77b4", top_steps=1, top_tokens=1, context=2)
    fig = report._figure(report.Panel("ratio/max", ("ratio/max",)), [d], 2000)
    line = next(t for t in fig.data if t.name == "ratio/max")
    assert list(line.x) == [0, 1, 2, 3, 4, 5, 6.5, 8, 9, 10, 11] and line.y[6] is None
    assert [(sh.x0, sh.line.dash) for sh in fig.layout.shapes] == [(8, "dot")]
    assert [a.text for a in fig.layout.annotations] == ["restart (rank 0)"]
    plain = report._figure(
        report.Panel("ratio/max", ("ratio/max",)),
        [report._prepare(rldiag.open_run(HEALTHY), "h", "#1f77b4", top_steps=1, top_tokens=1, context=2)],
        2000,
    )
    assert not plain.layout.shapes and None not in next(t for t in plain.data if t.name == "ratio/max").y


def test_summary_without_alert_history_evaluates_the_default_rules(tmp_path: Path) -> None:
    copy = tmp_path / "collapse"
    shutil.copytree(COLLAPSE, copy, ignore=shutil.ignore_patterns("alerts.jsonl", ".rldiag-index"))
    with_history = summarize_run(rldiag.open_run(COLLAPSE))
    without = summarize_run(rldiag.open_run(copy))
    assert "default rules" in without.history and "alerts.jsonl" in with_history.history
    assert [(f.group, f.onset_step, f.end_step) for f in without.findings] == [
        (f.group, f.onset_step, f.end_step) for f in with_history.findings
    ]
    assert not (copy / "alerts.jsonl").exists()  # a report never writes into the run


def test_html_is_self_contained(compare_html: str) -> None:
    from plotly.offline import get_plotlyjs

    html = compare_html
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S | re.I)
    assert len(scripts) >= 2 and not any(re.search(r"\bsrc\s*=", attrs, re.I) for attrs, _ in scripts)
    # the first script is plotly.js itself, inlined whole (its own source mentions URLs it never loads here)
    assert scripts[0][1] == get_plotlyjs()
    assert all(
        "Plotly.newPlot" in body and not re.search(r"https?:|//[a-z]", body, re.I)
        for _, body in scripts[1:]
        if "newPlot" in body
    )
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S | re.I)
    assert not re.search(r"<link\b", markup, re.I)
    assert not re.search(r"https?://|\b(?:src|href)\s*=|@import|url\(", markup, re.I)
    # one plot per headline panel with data (mismatch/k3 was not recorded in the demo: a note instead)
    drawn = [p for p in panels() if p.metric != "mismatch/k3"]
    assert html.count('class="panel"') == len(drawn)
    assert "mismatch/k3</code>: not recorded (needs rollout_logp)" in html


def test_compare_draws_both_runs_in_their_colours(compare_html: str) -> None:
    from rldiag.report import RUN_COLOURS

    figures = compare_html.replace("\\u002f", "/")  # plotly's JSON writes "/" as \u002f
    lines = set(re.findall(r'"line":\{"color":"(#\w+)"[^}]*\},"mode":"lines","name":"([^"]+?) · (\w+/\w+)"', figures))
    for label, colour in (("collapse", RUN_COLOURS[0]), ("healthy", RUN_COLOURS[1])):
        assert (colour, label, "entropy/mean") in lines
        assert {c for c, lab, _ in lines if lab == label} == {colour}  # one colour per run, on every panel
    # the divergence sentence names the first step where a headline metric differs, after agreement
    a = rldiag.open_run(COLLAPSE).step_metrics(metrics=list(HEADLINE))
    b = rldiag.open_run(HEALTHY).step_metrics(metrics=list(HEADLINE))
    m = re.search(r"first differ by more than 1% at step (\d+) \(([^:]+):", compare_html)
    assert m, "compare summary missing"
    step, name = int(m.group(1)), m.group(2)
    x = a.filter(a["step"] == step)[name][0]
    y = b.filter(b["step"] == step)[name][0]
    assert abs(x - y) / (abs(x) + abs(y)) > 0.01
    before = a.filter(a["step"] < step).join(b.filter(b["step"] < step), on="step", suffix="_b")
    for n in HEADLINE:
        u, v = before[n].to_numpy(), before[f"{n}_b"].to_numpy()
        ok = np.isfinite(u) & np.isfinite(v)
        assert np.all(np.abs(u[ok] - v[ok]) <= np.maximum(0.01 * (np.abs(u[ok]) + np.abs(v[ok])), 1e-9)), n


def test_worst_steps_have_decoded_worst_tokens(compare_html: str) -> None:
    run = rldiag.open_run(COLLAPSE)
    onset = _entropy_collapse_onset(run)
    assert f'data-step="{onset}"' in compare_html
    # decoded with the run's own tokenizer: the demo's vocabulary has these special tokens
    vocab = json.loads((COLLAPSE / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "&lt;/s&gt;" in compare_html and "</s>" in vocab
    assert (
        "decoded with the run&#x27;s own tokenizer/ folder" in compare_html
        or "decoded with the run's own tokenizer/ folder" in compare_html
    )
    assert "data-ranking='cov'" in compare_html and "data-ranking='logratio'" in compare_html


HOSTILE = "<img src=x onerror=alert(1)>\u202eevil\u200b\n"


def test_text_from_the_run_is_escaped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(HEALTHY, run_dir, ignore=shutil.ignore_patterns(".rldiag-index"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["name"] = "<script>alert('name')</script>\u2066x"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    tok = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    victim = next(k for k in vocab if len(k) == 1 and k.isalpha())
    vocab[HOSTILE] = vocab.pop(victim)
    (run_dir / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    lines = (run_dir / "alerts.jsonl").read_text().splitlines()
    ev = json.loads(lines[0])
    ev["summary"] = HOSTILE
    ev["rule"] = "rule<b>\u202e"
    lines.append(json.dumps(ev))
    (run_dir / "alerts.jsonl").write_text("\n".join(lines) + "\n")

    html = build_report(run_dir, top_steps=8, top_tokens=20)
    body = html[html.index("<body>") :]
    # found/missing lists, not `x in body` asserts: pytest's diff of a 5 MB string takes many minutes
    leaked = [raw for raw in ("<img src=x", "<script>alert", "rule<b>", "\u202e", "\u2066", "\u200b") if raw in body]
    assert leaked == []
    wanted = [
        "&lt;img src=x onerror=alert(1)&gt;",
        '<span class="esc">\\u202e</span>',
        '<span class="esc">\\u2066</span>',
        "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt;",
    ]
    assert [w for w in wanted if w not in body] == []
    # the decoded hostile token shows up escaped in the token tables
    assert body.count("&lt;img src=x onerror=alert(1)&gt;") >= 2


def test_visible_escapes_controls_and_bidi() -> None:
    assert visible("a\u202eb\u2067c\x00d\te\n") == "a\\u202eb\\u2067c\\u0000d\\te\\n"
    assert visible("plain text, ünïcode ok") == "plain text, ünïcode ok"


def test_cli_writes_atomically_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(COLLAPSE), "--out", str(out)]) == 0
    assert out.stat().st_size > 1_000_000 and out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind
    capsys.readouterr()

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    before = out.read_bytes()
    assert "already exists; pass --force" in error(["report", str(COLLAPSE), "--out", str(out)])
    assert "not an rldiag run" in error(["report", str(tmp_path), "--out", str(tmp_path / "x.html")])
    assert "does not exist" in error(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")])
    assert "not an rldiag run" in error(
        ["report", str(COLLAPSE), "--compare", str(tmp_path), "--out", str(tmp_path / "x.html")]
    )
    assert "folder" in error(["report", str(COLLAPSE), "--out", str(tmp_path / "no" / "such" / "r.html")])
    assert "is a directory" in error(["report", str(COLLAPSE), "--out", str(tmp_path)])
    # a failed --force run leaves the existing report untouched
    assert "not an rldiag run" in error(["report", str(tmp_path), "--out", str(out), "--force"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert main(["report", str(HEALTHY), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != before


def test_write_report_refuses_an_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    # the tests run as root, for whom every folder is writable: ask os.access the way a user would be answered
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real(p, mode, **kw))
    with pytest.raises(ReportError, match="not writable"):
        write_report(COLLAPSE, tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_in_chromium_offline(tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    if shutil.which("chromedriver") is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.support.ui import WebDriverWait

    out = write_report(COLLAPSE, tmp_path / "report.html", compare=[HEALTHY])
    expected = out.read_text().count('class="panel"')
    opts = Options()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--window-size=1400,2200",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts)
    try:
        driver.get(out.as_uri())
        WebDriverWait(driver, 60).until(
            lambda d: (
                d.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length") >= 2 * expected
            )
        )
        counts = driver.execute_script("""
            const plots = [...document.querySelectorAll('.js-plotly-plot')];
            return {plots: plots.length,
                    withSvg: plots.filter(p => p.querySelector('svg.main-svg')).length,
                    withLines: plots.filter(p => p.querySelectorAll('.scatterlayer path.js-line').length).length,
                    plotly: typeof window.Plotly};""")
        assert counts == {"plots": expected, "withSvg": expected, "withLines": expected, "plotly": "object"}
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()
