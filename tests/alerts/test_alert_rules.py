"""Rules as data: the default pack against metrics-spec section 4, the TOML format and its errors, templates."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rldiag.alerts import Condition, Rule, RuleError, RuleSet, default_rules, load_rules
from rldiag.alerts.rules import check_template, parse_duration, render_template
from rldiag.metrics.registry import REGISTRY


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.toml"
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------- the default pack


def cond(rules: RuleSet, rule: str, metric: str, kind: str = "threshold") -> Condition:
    matches = [c for c in rules[rule].conditions if c.metric == metric and c.kind == kind]
    assert len(matches) == 1, (rule, metric, kind)
    return matches[0]


def test_default_pack_is_metrics_spec_section_4() -> None:
    r = default_rules()
    assert set(r.names) == {
        "nonfinite",
        "entropy_collapse",
        "entropy_collapse_early",
        "ratio_tail",
        "ess_collapse",
        "ess_collapse_critical",
        "clip_spike",
        "kl_spike",
        "kl_spike_critical",
        "mismatch_drift",
        "dead_groups",
        "dead_groups_critical",
        "negative_dominance",
        "negative_dominance_critical",
        "stalled_run",
        "extrapolation_cliff",
        "extrapolation_cliff_critical",
        # second-generation diagnostics (tests/alerts/test_section5_rules.py)
        "mismatch_error",
        "extreme_mismatch",
        "extreme_mismatch_critical",
        "hidden_widening_gap",
        "hidden_widening_gap_tis",
        "seq_is_breakdown",
        "routing_drift",
    }  # section 3's cliff alert
    c = cond(r, "extrapolation_cliff", "cliff/headroom")
    assert (c.op, c.threshold, r["extrapolation_cliff"].severity) == (">=", 0.95, "warn")
    c = cond(r, "extrapolation_cliff_critical", "cliff/headroom")
    assert (c.op, c.threshold, r["extrapolation_cliff_critical"].severity) == (">=", 1.0, "critical")
    # non-finite values: ratio/nonfinite > 0, critical, at once
    c = cond(r, "nonfinite", "ratio/nonfinite")
    assert (c.op, c.threshold, c.for_, r["nonfinite"].severity, r["nonfinite"].for_) == (">", 0, 1, "critical", 1)
    # entropy collapse: below 30% of the median of the first 10 steps for 3 steps, or low_frac > 0.9
    e = r["entropy_collapse"]
    assert (e.match, e.severity) == ("any", "critical")
    c = cond(r, "entropy_collapse", "entropy/mean", "baseline")
    assert (c.op, c.threshold, c.baseline_steps, c.for_) == ("<", 0.3, 10, 3)
    c = cond(r, "entropy_collapse", "entropy/low_frac")
    assert (c.op, c.threshold, c.for_) == (">", 0.9, 1)
    # ... warn earlier when entropy/cov > 0 for 10 steps while entropy falls
    w = r["entropy_collapse_early"]
    assert (w.match, w.severity) == ("all", "warn")
    c = cond(r, "entropy_collapse_early", "entropy/cov")
    assert (c.op, c.threshold, c.for_) == (">", 0, 10)
    c = cond(r, "entropy_collapse_early", "entropy/mean", "trend")
    assert (c.direction, c.steps) == ("falling", 10)
    # ratio-tail blow-up: p999 > ln 10, alpha < 2, m2 > 0.1, for 2 of 3 steps, critical
    t = r["ratio_tail"]
    assert (t.match, t.for_, t.within, t.severity) == ("any", 2, 3, "critical")
    assert cond(r, "ratio_tail", "ratio/logabs_p999").threshold == pytest.approx(math.log(10))
    assert (cond(r, "ratio_tail", "ratio/tail_alpha").op, cond(r, "ratio_tail", "ratio/tail_alpha").threshold) == (
        "<",
        2,
    )
    assert cond(r, "ratio_tail", "ratio/m2").threshold == 0.1
    # two-level rules
    for name, metric, op, thr, sev in [
        ("ess_collapse", "ess/token", "<", 0.9, "warn"),
        ("ess_collapse_critical", "ess/token", "<", 0.5, "critical"),
        ("kl_spike", "kl/k3", ">", 0.015, "warn"),
        ("kl_spike_critical", "kl/k3", ">", 0.05, "critical"),
        ("dead_groups", "group/nonzero_frac", "<", 0.5, "warn"),
        ("dead_groups_critical", "group/nonzero_frac", "<", 0.3, "critical"),
        ("negative_dominance", "balance/pos_share", "<", 0.4, "warn"),
        ("negative_dominance_critical", "balance/pos_share", "<", 0.3, "critical"),
    ]:
        c = cond(r, name, metric)
        assert (c.op, c.threshold, r[name].severity) == (op, thr, sev), name
    assert cond(r, "negative_dominance_critical", "balance/pos_share").for_ * r["negative_dominance_critical"].for_ == 3
    # clip spike: > 0.2, or > 3x its rolling median over 20 steps, warn
    assert cond(r, "clip_spike", "clip/region").threshold == 0.2
    c = cond(r, "clip_spike", "clip/region", "rolling")
    assert (c.op, c.threshold, c.window, r["clip_spike"].severity) == (">", 3.0, 20, "warn")
    # mismatch drift: tis_frac > 0.01, or k3 rising 5 steps in a row, warn
    assert cond(r, "mismatch_drift", "mismatch/tis_frac").threshold == 0.01
    c = cond(r, "mismatch_drift", "mismatch/k3", "trend")
    assert (c.direction, c.mode, c.steps) == ("rising", "monotone", 5)
    # stalled run: 10 minutes, warn
    s = r["stalled_run"]
    assert (s.kind, s.stall_after, s.severity) == ("stall", 600.0, "warn")


def test_default_rules_use_registry_metrics_and_are_documented() -> None:
    for rule in default_rules():
        assert rule.doc.strip() and rule.source.strip(), rule.name
        assert rule.summary, rule.name
        for m in rule.metrics:
            assert m in REGISTRY or m.startswith("cliff/"), (rule.name, m)


def test_resolve_thresholds_give_hysteresis() -> None:
    for rule in default_rules():
        for c in rule.conditions:
            if c.kind in ("threshold", "baseline", "rolling") and c.metric != "ratio/nonfinite":
                if c.metric == "entropy/cov":
                    continue  # sign test: 0 is the natural resolve point
                assert c.resolve is not None and c.resolve != c.threshold, (rule.name, c.metric)


# ---------------------------------------------------------------- TOML: overrides, disabling, new rules


def test_override_by_name_keeps_other_fields(tmp_path: Path) -> None:
    r = load_rules(
        write(
            tmp_path,
            """
        [rules.kl_spike]
        threshold = 0.02
        severity = "critical"
    """,
        )
    )
    c = r["kl_spike"].conditions[0]
    assert (c.threshold, c.resolve, c.metric, r["kl_spike"].severity) == (0.02, 0.01, "kl/k3", "critical")
    assert r["kl_spike_critical"] == default_rules()["kl_spike_critical"]


def test_disable_two_ways_and_custom_rule(tmp_path: Path) -> None:
    r = load_rules(
        write(
            tmp_path,
            """
        disable = ["clip_spike"]
        [settings]
        repeat_interval = "30m"
        [rules.kl_spike]
        enabled = false
        [rules.max_ratio]
        severity = "info"
        metric = "ratio/max"
        op = ">="
        threshold = 5
        resolve = 3
        for = 2
        within = 4
        keep_firing_for = 1
        summary = "ratio max {value:.2f} at {step}"
        labels = { team = "rl" }
    """,
        )
    )
    assert "clip_spike" not in r and "kl_spike" not in r and "kl_spike_critical" in r
    m = r["max_ratio"]
    assert (m.severity, m.for_, m.within, m.keep_firing_for, dict(m.labels)) == ("info", 2, 4, 1, {"team": "rl"})
    assert (m.conditions[0].op, m.conditions[0].threshold, m.conditions[0].resolve) == (">=", 5.0, 3.0)
    assert r.settings.repeat_interval == 1800.0


def test_include_defaults_false_and_compound_replacement(tmp_path: Path) -> None:
    r = load_rules(
        write(
            tmp_path,
            """
        include_defaults = false
        [rules.only]
        match = "all"
        [[rules.only.conditions]]
        metric = "kl/k3"
        threshold = 0.1
        [[rules.only.conditions]]
        metric = "clip/region"
        kind = "rolling"
        threshold = 2
        window = 5
    """,
        )
    )
    assert r.names == ("only",)
    assert [c.kind for c in r["only"].conditions] == ["threshold", "rolling"]
    r2 = load_rules(
        write(
            tmp_path,
            """
        [rules.clip_spike]
        [[rules.clip_spike.conditions]]
        metric = "clip/region"
        threshold = 0.3
    """,
        )
    )
    assert len(r2["clip_spike"].conditions) == 1 and r2["clip_spike"].conditions[0].threshold == 0.3


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[rules.kl_spike]\ntreshold = 0.1\n", ["kl_spike", "treshold", "threshold"]),
        ('[rules.kl_spike]\nthreshold = "high"\n', ["kl_spike", "'threshold'", "number"]),
        ('[rules.kl_spike]\nop = "=>"\n', ["kl_spike", "'op'"]),
        ("[rules.kl_spike]\nresolve = 0.5\n", ["kl_spike", "'resolve'", "must not exceed"]),
        ('[rules.x]\nmetric = "kl/k33"\n', ["rule 'x'", "'metric'", "kl/k3"]),
        ('[rules.x]\nmetric = "kl/k3"\nseverity = "page"\n', ["rule 'x'", "'severity'"]),
        ('[rules.x]\nmetric = "kl/k3"\nfor = 0\n', ["rule 'x'", "'for'"]),
        ('[rules.x]\nmetric = "kl/k3"\nfor = 3\nwithin = 2\n', ["rule 'x'", "'within'"]),
        ('[rules.x]\nmetric = "kl/k3"\nsummary = "{value.__class__}"\n', ["rule 'x'", "'summary'", "not allowed"]),
        ('[rules.x]\nmetric = "kl/k3"\nsummary = "{value[0]}"\n', ["rule 'x'", "'summary'"]),
        ('[rules.x]\nmetric = "kl/k3"\nsummary = "{value:999999999}"\n', ["rule 'x'", "'summary'", "format spec"]),
        ('[rules.x]\nmetric = "kl/k3"\nsummary = "{0}"\n', ["rule 'x'", "'summary'"]),
        ('[rules.x]\nmetric = "kl/k3"\nkind = "rolling"\nwindow = 0\n', ["rule 'x'", "'window'"]),
        ('[rules.x]\nmetric = "kl/k3"\nkind = "trend"\ndirection = "up"\n', ["rule 'x'", "'direction'"]),
        ('[rules.x]\nkind = "stall"\nafter = "soon"\n', ["rule 'x'", "'after'"]),
        ('[rules.x]\nkind = "stall"\nmetric = "kl/k3"\n', ["rule 'x'", "'metric'", "no conditions"]),
        ('[rules.x]\nmetric = "kl/k3"\nrepeat_interval = -1\n', ["rule 'x'", "'repeat_interval'"]),
        ("[rules.entropy_collapse]\nthreshold = 0.2\n", ["entropy_collapse", "'threshold'", "conditions"]),
        (
            '[rules.x]\nmatch = "any"\n[[rules.x.conditions]]\nmetric = "kl/k3"\nseverity = "warn"\n',
            ["rule 'x', conditions[0]", "'severity'", "rule field"],
        ),
        (
            '[rules.x]\n[[rules.x.conditions]]\nmetric = "kl/k3"\n[[rules.x.conditions]]\nmetric = "kl/k3"\nop = "!"\n',
            ["conditions[1]", "'op'"],
        ),
        ('disable = ["klspike"]\n', ["disable", "klspike", "kl_spike"]),
        ('[rulez.x]\nmetric = "kl/k3"\n', ["rulez", "rules"]),
        ('[settings]\nrepeat = "1h"\n', ["settings", "repeat"]),
        ('[rules.kl_spike]\nenabled = "no"\n', ["kl_spike", "'enabled'"]),
        ('[rules.x]\nmetric = "kl/k3"\nlabels = { "bad-name" = "v" }\n', ["rule 'x'", "'labels'"]),
        ('[rules.x]\nmetric = "kl/k3"\nthreshold = nan\n', ["rule 'x'", "'threshold'", "finite"]),
    ],
)
def test_rule_file_errors_name_rule_and_field(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_toml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[rules.x]\nmetric = "kl/k3"\nthreshold = = 1\n')
    with pytest.raises(RuleError, match=r"line 3"):
        load_rules(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="not found"):
        load_rules(tmp_path / "nope.toml")


def test_python_api_replace_and_without() -> None:
    r = default_rules().without("clip_spike").replace("kl_spike", severity="info", keep_firing_for=2)
    assert "clip_spike" not in r and r["kl_spike"].severity == "info" and r["kl_spike"].keep_firing_for == 2
    with pytest.raises(RuleError, match="severity"):
        default_rules().replace("kl_spike", severity="urgent")
    with pytest.raises(RuleError, match="defined twice"):
        RuleSet((Rule("a", (Condition("kl/k3"),)), Rule("a", (Condition("kl/k3"),))))


# ---------------------------------------------------------------- templates and durations


def test_render_template_fields_and_specs() -> None:
    out = render_template(
        "{rule}: {metric}={value:.3f} > {threshold:g} at {step} ({status!r})",
        {"rule": "kl", "metric": "kl/k3", "value": 0.12345, "threshold": 0.015, "step": 7, "status": "firing"},
    )
    assert out == "kl: kl/k3=0.123 > 0.015 at 7 ('firing')"
    assert render_template("{value:.2f} {{literal}}", {"value": None}) == "n/a {literal}"
    assert render_template("{value:d}", {"value": 1.5}) == "1.5"  # a spec that does not fit prints the value


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_accepted_template_renders(template: str) -> None:
    try:
        check_template(template)
    except RuleError:
        return
    fields = {
        "value": 1.5,
        "metric": "m",
        "step": 3,
        "threshold": 0.1,
        "rule": "r",
        "severity": "warn",
        "run": "x",
        "resolve": 0.05,
        "op": ">",
        "start_step": 1,
        "reference": None,
        "status": "firing",
    }
    out = render_template(template, fields)
    assert isinstance(out, str) and len(out) < 2000


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("10m", 600), ("4h", 14400), ("1h30m", 5400), (600, 600), (1.5, 1.5), ("250ms", 0.25)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "m", "-5m", "5 minutes", True, 0, [1]])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)
