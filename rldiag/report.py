"""A report a person can share: one self-contained HTML file per run (or per comparison of runs).

The file holds the headline panels (the registry's ``headline`` metrics, each with its companions), the run's
alerts, the worst steps with their worst tokens, and a plain-language summary of what went wrong and when.
plotly.js is inlined, so the file opens from disk with no server and no network.

>>> html = build_report("sample_logs/collapse", compare=["sample_logs/healthy"])   # doctest: +SKIP
>>> write_report("sample_logs/collapse", "report.html", force=True)                 # doctest: +SKIP
>>> print(summarize_run(rldiag.open_run("sample_logs/collapse")).text())           # doctest: +SKIP

How the summary is derived (docs/report.md says the same in prose): the alert history (``alerts.jsonl``; when a
run has none, the default rules evaluated over its stored metrics) is turned into *episodes* (firing ->
resolved) and grouped by the rules' ``group`` label into *findings*. For each finding the deciding metric's
registry spec (direction, unit, doc) and the stored step metrics give the onset (the first step of the
consecutive bad steps the rule needed before it fired), the value before and the worst value, and the other
metrics of the group (an early-warning rule's) say what drove it. Token rows of the onset step name the tokens
behind it. Nothing is specific to a particular run.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import itertools
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import polars as pl

from rldiag import __version__, runformat, schema
from rldiag.metrics.registry import HEADLINE, REGISTRY, MetricSpec
from rldiag.storage import one_line

if TYPE_CHECKING:
    from rldiag.alerts.rules import Rule, RuleSet
    from rldiag.analysis.io import Run

RunLike: TypeAlias = "str | os.PathLike[str] | Run"
"""A run directory (or URI) or an open :class:`rldiag.Run`."""

__all__ = [
    "Episode",
    "Finding",
    "Panel",
    "ReportError",
    "Summary",
    "TokenPick",
    "WorstStep",
    "build_report",
    "check_out",
    "episodes_from_events",
    "panels",
    "summarize_run",
    "token_picks",
    "visible",
    "write_report",
]

Verdict = Literal["ok", "warn", "critical"]
_SEVERITY_RANK = {"info": 0, "warn": 1, "critical": 2}
_ACRONYMS = {"kl": "KL", "ess": "ESS", "tis": "TIS", "mis": "MIS", "nan": "NaN", "gspo": "GSPO", "ctpo": "CTPO"}

RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
"""One colour per run in a comparison (the first run is the first colour)."""
_LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SEVERITY_COLOURS = {"critical": "#c0392b", "warn": "#e67e22", "info": "#7f8c8d"}
_RESTART_COLOUR = "#6b7280"

TOKEN_RANKINGS: dict[str, str] = {
    "logratio": "largest |log-ratio| (moved most since sampling)",
    "cov": "largest covariance contribution (adv - mean adv)(logp - mean logp)",
    "entropy": "lowest entropy (near-deterministic)",
}
"""The token rankings of the worst-tokens tables."""
_COV_METRICS = frozenset({"entropy/cov", "entropy/cov_band_frac", "entropy/cov_top_share"})
_RATIO_FAMILIES = frozenset({"ratio", "ess", "kl", "clip", "regime", "balance", "seq", "stage"})


def _ranking_for(metric: str) -> str | None:
    """The token ranking that explains a metric: the covariance metrics are, by their formula, built from the
    ``cov`` ranking's values; the entropy metrics from the tokens' entropies; the metrics of the importance ratio
    (ratio, ESS, KL, clipping...) from the tokens that moved most. Others (groups, rewards) have none."""
    if metric in _COV_METRICS:
        return "cov"
    family = metric.split("/", 1)[0]
    if family == "entropy":
        return "entropy"
    return "logratio" if family in _RATIO_FAMILIES else None


class ReportError(ValueError):
    """Bad input for a report (not a run, an unwritable or existing output); the message is one line."""


# ---- text that came from a run -----------------------------------------------------------------------------
def visible(text: Any) -> str:
    """``text`` with control, format (bidi, zero-width) and separator characters written as escapes.

    >>> visible("a\\u202eb\\n")
    'a\\\\u202eb\\\\n'
    """
    out = []
    for ch in str(text):
        cat = unicodedata.category(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def _esc(text: Any) -> str:
    """HTML for untrusted text: escaped, with control/bidi characters shown as highlighted escapes."""
    parts = []
    for ch in str(text):
        v = visible(ch)
        parts.append(f'<span class="esc">{_html.escape(v)}</span>' if v != ch else _html.escape(ch))
    return "".join(parts)


def _ptext(text: Any) -> str:
    """Text for a plotly label: plotly reads a subset of HTML in labels, so tags are escaped too."""
    return _html.escape(visible(text), quote=False)


def _humanize(group: str) -> str:
    words = [_ACRONYMS.get(w.lower(), w) for w in str(group).replace("-", "_").split("_") if w]
    if not words:
        return "Alert"
    first = words[0] if words[0].isupper() else words[0].capitalize()
    return " ".join([first, *words[1:]])


def _lower_first(title: str) -> str:
    head, _, rest = title.partition(" ")
    head = head if head.isupper() else head.lower()
    return f"{head} {rest}" if rest else head


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        s = "inf" if v > 0 else "-inf"
    else:
        s = f"{v:.4g}"
    return f"{s} {unit}" if unit and unit not in ("tokens", "sequences", "steps") else s


# ---- alert episodes and findings --------------------------------------------------------------------------
@dataclass
class Episode:
    """One firing -> resolved episode of one alert rule, as read from the alert history."""

    rule: str
    severity: str
    group: str
    metric: str | None
    start_step: int
    """The step the rule fired."""
    end_step: int | None
    """The step it resolved; None when it was still firing at the end of the history."""
    value: float
    threshold: float
    summary: str
    description: str = ""
    expr: str = ""
    onset_step: int = 0
    """First step of the consecutive bad steps the rule needed before it fired (= start_step for rules that
    fire at once)."""
    bad_side: Literal[">", "<"] | None = None
    peak_step: int | None = None
    peak_value: float = math.nan
    before: float = math.nan
    """Median of the metric over the (up to) 20 steps before the onset."""


@dataclass
class Finding:
    """The episodes of one rule group (e.g. ``entropy_collapse`` and its early warning), in plain words."""

    group: str
    title: str
    severity: str
    episodes: list[Episode]
    lead: Episode
    """The first episode of the group's highest severity."""
    onset_step: int
    end_step: int | None
    """Last resolve of the group; None when an episode of its severity was still firing at the end."""
    peak_step: int | None = None
    """Step of the worst value of the lead's metric over the episodes of the lead's severity."""
    peak_value: float = math.nan
    sentence: str = ""


@dataclass
class Summary:
    """The plain-language summary of one run."""

    run: str
    verdict: Verdict
    headline: str
    findings: list[Finding]
    sentences: list[str]
    first_step: int | None
    last_step: int | None
    history: str
    """Where the alerts came from: the run's alerts.jsonl, or the default rules evaluated for the report."""

    def text(self) -> str:
        """The summary as plain text: the headline, then one line per finding."""
        return "\n".join([self.headline, *(f"- {s}" for s in self.sentences)])


def episodes_from_events(
    events: Sequence[Mapping[str, Any]], metrics: pl.DataFrame | None = None, rules: RuleSet | None = None
) -> list[Episode]:
    """Firing/resolved events (alerts.jsonl lines, oldest first) -> episodes, with onset and peak from ``metrics``.

    ``rules`` (a :class:`rldiag.alerts.RuleSet`, default: the default pack) tells how many steps a rule needs
    before it fires; a rule that is not in it, or whose expression differs from the event's, is taken to fire
    at once.
    """
    if rules is None:
        from rldiag.alerts import default_rules

        rules = default_rules()
    by_name = {r.name: r for r in rules}
    eps: list[Episode] = []
    open_: dict[tuple[str, int], Episode] = {}
    for ev in events:
        try:
            rule, kind, step = str(ev["rule"]), str(ev["event"]), int(ev["step"])
            start = int(ev.get("start_step", step))
        except (KeyError, TypeError, ValueError):
            continue
        key = (rule, start)
        if kind == "firing":
            labels = ev.get("labels") if isinstance(ev.get("labels"), Mapping) else {}
            ann = ev.get("annotations") if isinstance(ev.get("annotations"), Mapping) else {}
            ep = Episode(
                rule=rule,
                severity=str(ev.get("severity") or "warn"),
                group=str((labels or {}).get("group") or rule),
                metric=(str(ev["metric"]) if ev.get("metric") else None),
                start_step=start,
                end_step=None,
                value=_num(ev.get("value")),
                threshold=_num(ev.get("threshold")),
                summary=str(ev.get("summary") or ""),
                description=str((ann or {}).get("description") or ""),
                expr=str((ann or {}).get("expr") or ""),
                onset_step=start,
            )
            open_[key] = ep
            eps.append(ep)
        elif kind == "resolved" and key in open_:
            open_.pop(key).end_step = step
    if metrics is not None and metrics.height:
        for ep in eps:
            _locate(ep, metrics, by_name.get(ep.rule))
    return eps


def _needed_steps(rule: Rule | None, ep: Episode) -> int:
    """How many consecutive steps the rule looks back over before firing (1 when unknown)."""
    if rule is None or getattr(rule, "describe", None) is None or rule.describe() != ep.expr:
        return 1
    n = max(rule.within or rule.for_, 1)
    for c in rule.conditions:
        if c.metric == ep.metric:
            n = max(n, c.within or c.for_)
    return n


def _locate(ep: Episode, metrics: pl.DataFrame, rule: Rule | None) -> None:
    if not ep.metric or ep.metric not in metrics.columns:
        return
    steps = metrics["step"].to_numpy()
    vals = metrics[ep.metric].cast(pl.Float64).fill_null(math.nan).to_numpy()
    spec = REGISTRY.get(ep.metric)
    if math.isfinite(ep.value) and math.isfinite(ep.threshold) and ep.value != ep.threshold:
        ep.bad_side = ">" if ep.value > ep.threshold else "<"
    elif spec is not None and spec.direction != "neutral":
        ep.bad_side = ">" if spec.direction == "lower" else "<"
    idx = np.searchsorted(steps, ep.start_step)
    if idx >= steps.size or steps[idx] != ep.start_step:
        return
    j = int(idx)
    if ep.bad_side is not None and math.isfinite(ep.threshold):
        thr, side = ep.threshold, ep.bad_side

        def bad(v: float) -> bool:
            return bool(v > thr) if side == ">" else bool(v < thr)

        need = _needed_steps(rule, ep)
        while j > 0 and idx - (j - 1) < need and bad(vals[j - 1]):
            j -= 1
    ep.onset_step = int(steps[j])
    end = steps.size if ep.end_step is None else int(np.searchsorted(steps, ep.end_step, side="right"))
    window = vals[j:end]
    ok = np.isfinite(window)
    if ok.any() and ep.bad_side is not None:
        k = int(np.nanargmax(window) if ep.bad_side == ">" else np.nanargmin(window))
        ep.peak_step, ep.peak_value = int(steps[j + k]), float(window[k])
    before = vals[max(j - 20, 0) : j]
    before = before[np.isfinite(before)]
    ep.before = float(np.median(before)) if before.size else math.nan


def _findings(eps: list[Episode], last_step: int | None) -> list[Finding]:
    groups: dict[str, list[Episode]] = {}
    for ep in eps:
        groups.setdefault(ep.group, []).append(ep)
    out = []
    for group, members in groups.items():
        top = max(_SEVERITY_RANK.get(e.severity, 0) for e in members)
        leads = [e for e in members if _SEVERITY_RANK.get(e.severity, 0) == top]
        lead = min(leads, key=lambda e: (e.onset_step, e.start_step))
        ends = [e.end_step for e in leads]
        end = None if any(x is None for x in ends) else max(int(x) for x in ends if x is not None)
        f = Finding(
            group=group,
            title=_humanize(group),
            severity=lead.severity,
            episodes=members,
            lead=lead,
            onset_step=lead.onset_step,
            end_step=end,
        )
        same = [e for e in leads if e.metric == lead.metric and e.peak_step is not None]
        if same:  # the worst value over every episode of the lead's rule and metric, not only the first
            side = lead.bad_side
            worst = (max if side == ">" else min)(same, key=lambda e: e.peak_value)
            f.peak_step, f.peak_value = worst.peak_step, worst.peak_value
        out.append(f)
    out.sort(key=lambda f: (-_SEVERITY_RANK.get(f.severity, 0), f.onset_step))
    return out


def _side_words(side: str | None) -> tuple[str, str]:
    return ("rose", "above") if side == ">" else ("fell", "below")


def _metric_phrase(ep: Episode, peak_step: int | None = None, peak_value: float = math.nan) -> str:
    spec = REGISTRY.get(ep.metric or "")
    unit = spec.unit if spec else ""
    verb, where = _side_words(ep.bad_side)
    if peak_step is None:
        peak_step, peak_value = ep.peak_step, ep.peak_value
    if peak_step is None:
        return f"{ep.metric} = {_fmt(ep.value, unit)} (threshold {_fmt(ep.threshold, unit)})"
    start = f" from {_fmt(ep.before, unit)}" if math.isfinite(ep.before) else ""
    return (
        f"{ep.metric} {verb}{start} to {_fmt(peak_value, unit)} at step {peak_step} "
        f"({where} the threshold {_fmt(ep.threshold, unit)})"
    )


def _steps_before(metrics: pl.DataFrame, metric: str, onset: int, n: int = 10) -> np.ndarray:
    m = metrics.filter(pl.col("step") < onset).tail(n)
    return m[metric].cast(pl.Float64).fill_null(math.nan).to_numpy() if metric in m.columns else np.zeros(0)


_TOKEN_PHRASE = {
    "logratio": "the tokens that moved most",
    "cov": "the tokens with the largest covariance contribution",
    "entropy": "the lowest-entropy tokens",
}


def _sentence(
    f: Finding, metrics: pl.DataFrame, last_step: int | None, tokens: Mapping[tuple[int, str], list[TokenPick]]
) -> str:
    lead = f.lead
    if f.severity != "critical":
        rules = sorted({e.rule for e in f.episodes})
        spans = ", ".join(f"{e.start_step}-{e.end_step if e.end_step is not None else 'end'}" for e in f.episodes[:6])
        more = f" and {len(f.episodes) - 6} more" if len(f.episodes) > 6 else ""
        n = len(f.episodes)
        times = "once" if n == 1 else f"{n} times"
        s = (
            f"Warning {', '.join(rules)} fired {times} (steps {spans}{more})"
            f"{'; the last was still firing at the end' if f.end_step is None else ''}"
        )
        if lead.metric and lead.peak_step is not None:
            s += f"; {_metric_phrase(lead, f.peak_step, f.peak_value)}"
        return s + "; no critical rule of this group fired."
    fired = f" (the {lead.rule} alert fired at step {lead.start_step})" if lead.start_step != lead.onset_step else ""
    s = f"{f.title} started at step {f.onset_step}{fired}"
    if lead.metric:
        s += f": {_metric_phrase(lead, f.peak_step, f.peak_value)}"
    elif lead.summary:
        s += f": {lead.summary}"
    s += f"; still firing at the last step ({last_step})" if f.end_step is None else f"; resolved at step {f.end_step}"
    # the tokens behind it, at the onset step: ranked the way the group's metrics are built
    group_metrics = [e.metric for e in sorted(f.episodes, key=lambda e: e.start_step) if e.metric]
    rankings = [r for r in (_ranking_for(m) for m in group_metrics) if r is not None]
    ranking = "cov" if "cov" in rankings else (rankings[0] if rankings else None)
    picks = (tokens.get((f.onset_step, ranking)) or []) if ranking else []
    # the group's other metrics (an early warning's, another condition's): what drove it
    drivers: list[str] = []
    seen = {lead.metric}
    for e in sorted(f.episodes, key=lambda e: e.start_step):
        if e.metric in seen or not e.metric or e.bad_side is None or not math.isfinite(e.threshold):
            continue
        seen.add(e.metric)
        prev = _steps_before(metrics, e.metric, f.onset_step)
        prev = prev[np.isfinite(prev)]
        if not prev.size:
            continue
        n_bad = int(np.sum(prev > e.threshold) if e.bad_side == ">" else np.sum(prev < e.threshold))
        _, where = _side_words(e.bad_side)
        spec = REGISTRY.get(e.metric)
        what = f"; {spec.doc.rstrip('.')}" if spec else ""
        drivers.append(
            f"{e.metric} was {where} {_fmt(e.threshold)} on {n_bad} of the {prev.size} steps before "
            f"(the {e.rule} warning fired at step {e.start_step}{what})"
        )
    shown = ""
    if picks:
        texts = Counter(p.text for p in picks).most_common(3)
        shown = ", ".join(f"'{visible(t)}'" + (f" x{c}" if c > 1 else "") for t, c in texts)
    if ranking == "cov" and (picks or drivers):
        s += "; driven by the tokens with the largest covariance contribution"
        s += f" (at step {f.onset_step}: {shown}; table below)" if picks else ""
        s += (": " + "; ".join(drivers)) if drivers else ""
    else:
        if drivers:
            s += "; driven by " + "; ".join(drivers)
        if picks and ranking:
            s += (
                f". {_TOKEN_PHRASE[ranking][0].upper()}{_TOKEN_PHRASE[ranking][1:]} at step {f.onset_step}: {shown} "
                "(table below)"
            )
    return s + "."


def summarize_run(
    run: Run,
    *,
    events: Sequence[Mapping[str, Any]] | None = None,
    metrics: pl.DataFrame | None = None,
    tokens: Mapping[tuple[int, str], list[TokenPick]] | None = None,
) -> Summary:
    """The plain-language summary of ``run`` (an open :class:`rldiag.Run`).

    ``events``: the alert history (default: the run's alerts.jsonl, or, when it has none, the default rules
    evaluated over its stored metrics). ``tokens``: worst tokens by (step, ranking), to name the tokens behind a
    finding.
    """
    metrics = run.step_metrics() if metrics is None else metrics
    history = "alerts.jsonl"
    if events is None:
        events, history = _history(run, metrics)
    steps = metrics["step"].to_list() if metrics.height else []
    first, last = (steps[0], steps[-1]) if steps else (None, None)
    eps = episodes_from_events(events, metrics)
    findings = _findings(eps, last)
    for f in findings:
        f.sentence = _sentence(f, metrics, last, tokens or {})
    span = f"steps {first}-{last}" if steps else "no steps"
    critical = [f for f in findings if f.severity == "critical"]
    if critical:
        verdict: Verdict = "critical"
        order = sorted(critical, key=lambda f: f.onset_step)
        parts = [f"{_lower_first(f.title) if i else f.title} from step {f.onset_step}" for i, f in enumerate(order)]
        headline = f"What went wrong ({span}): " + ", ".join(parts) + "."
    elif findings:
        verdict = "warn"
        headline = (
            f"No critical alert fired over {span}; {len(findings)} warning rule group"
            f"{'s' if len(findings) != 1 else ''} fired (below)."
        )
    else:
        verdict = "ok"
        headline = f"No alert fired over {span}: nothing alarming in the run's metrics."
    sentences = [f.sentence for f in sorted(findings, key=lambda f: (f.onset_step, -_SEVERITY_RANK.get(f.severity, 0)))]
    restarts = run.resume.describe(limit=8)
    if restarts:
        sentences.append(
            "The job was restarted: "
            + "; ".join(restarts)
            + ". From a restart's step on, what the earlier attempt had recorded is replaced by the later one's."
        )
    return Summary(
        run=run.name,
        verdict=verdict,
        headline=headline,
        findings=findings,
        sentences=sentences,
        first_step=first,
        last_step=last,
        history=history,
    )


def _history(run: Run, metrics: pl.DataFrame) -> tuple[list[dict[str, Any]], str]:
    """The run's alert events; without an alert history, the default rules evaluated over ``metrics``."""
    events = run.alerts()
    if events or runformat.alerts_signature(run.path):  # a history, maybe all replaced: alerts.jsonl or alerts/
        return list(events), f"the run's {runformat.alert_history_name(run.path)} ({len(events)} events)"
    from rldiag.alerts import Engine, default_rules

    if not metrics.height:
        return [], "no steps to evaluate"
    engine = Engine(default_rules(), run=run.name)
    notes = engine.update(metrics, now=0.0)
    note = (
        "no alert history in the run: the default rules, evaluated over its stored metrics for this "
        f"report ({len(notes)} events)"
    )
    return [n.to_json() for n in notes], note


# ---- worst steps and their tokens -------------------------------------------------------------------------
@dataclass
class TokenPick:
    """One token of a worst-tokens table, with the tokens around it in its sequence."""

    ranking: str
    score: float
    step: int
    rank: int
    micro: int
    seq: int
    pos: int
    token_id: int | None
    logratio: float
    entropy: float
    adv: float
    cov: float
    text: str = ""
    context: list[tuple[int | None, str, bool]] = field(default_factory=list)
    """(token id, text, is this token) for the tokens around it, in position order."""


@dataclass
class WorstStep:
    """A step worth looking at, and why."""

    step: int
    reasons: list[str]
    weight: int


def _worst_steps(findings: list[Finding], metrics: pl.DataFrame, k: int) -> list[WorstStep]:
    cands: dict[int, WorstStep] = {}

    def add(step: int | None, reason: str, weight: int) -> None:
        if step is None:
            return
        ws = cands.setdefault(int(step), WorstStep(int(step), [], 0))
        if reason not in ws.reasons:
            ws.reasons.append(reason)
        ws.weight = max(ws.weight, weight)

    for f in findings:
        w = 10 * (_SEVERITY_RANK.get(f.severity, 0) + 1)
        lead = f.lead
        add(f.onset_step, f"onset of {_lower_first(f.title)} ({lead.rule})", w + 1)
        if f.peak_step is not None and lead.metric:
            spec = REGISTRY.get(lead.metric)
            add(f.peak_step, f"worst {lead.metric} = {_fmt(f.peak_value, spec.unit if spec else '')}", w)
    if len(cands) < k and metrics.height > 1:
        for step, reason in _deviating_steps(metrics, k):
            if len(cands) >= k:
                break
            if step not in cands:
                add(step, reason, 0)
    chosen = sorted(cands.values(), key=lambda c: (-c.weight, c.step))[:k]
    return sorted(chosen, key=lambda c: c.step)


def _deviating_steps(metrics: pl.DataFrame, k: int) -> list[tuple[int, str]]:
    """Steps where a headline metric is furthest on its bad side of the run's median, in interquartile ranges."""
    steps = metrics["step"].to_numpy()
    best: dict[int, tuple[float, str]] = {}
    for name in HEADLINE:
        spec = REGISTRY[name]
        if spec.direction == "neutral" or name not in metrics.columns:
            continue
        v = metrics[name].cast(pl.Float64).fill_null(math.nan).to_numpy()
        ok = np.isfinite(v)
        if ok.sum() < 4:
            continue
        q25, med, q75 = np.percentile(v[ok], [25, 50, 75])
        scale = q75 - q25
        if not scale > 0:
            continue
        dev = (v - med) / scale if spec.direction == "lower" else (med - v) / scale
        dev = np.where(ok, dev, -np.inf)
        for i in np.argsort(-dev)[:k]:
            if dev[i] <= 1.5:
                break
            s = int(steps[i])
            if s not in best or dev[i] > best[s][0]:
                best[s] = (
                    float(dev[i]),
                    f"{name} = {_fmt(float(v[i]), spec.unit)} (run median {_fmt(med, spec.unit)})",
                )
    return [(s, r) for s, (_, r) in sorted(best.items(), key=lambda kv: -kv[1][0])]


def _col(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[name].cast(pl.Float64).fill_null(math.nan).to_numpy()


def _ints(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.zeros(frame.height, dtype=np.int64)
    return frame[name].fill_null(-1).cast(pl.Int64).to_numpy()


def token_picks(rows: pl.DataFrame, ranking: str, *, k: int = 5, context: int = 6) -> list[TokenPick]:
    """The ``k`` worst tokens of the token rows of ONE step under ``ranking`` (see :data:`TOKEN_RANKINGS`).

    ``cov`` uses the stored ``cov`` column, or, when it was not recorded, (adv - mean adv)(logp - mean logp)
    with the means of the token's record (step, rank, micro), as the recorder computes it.
    """
    if ranking not in TOKEN_RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(TOKEN_RANKINGS)}")
    if rows.height == 0:
        return []
    logp, old, adv = _col(rows, schema.LOGP), _col(rows, schema.OLD_LOGP), _col(rows, schema.ADV)
    lr = logp - old
    ent = _col(rows, schema.ENTROPY)
    cov = _col(rows, schema.COV)
    rank, micro, seq, pos = (_ints(rows, c) for c in (schema.RANK, schema.MICRO, schema.SEQ, schema.POS))
    if not np.isfinite(cov).any():
        rec = (
            rows.select(schema.RANK, schema.MICRO)
            .with_columns(_lp=pl.Series(logp), _a=pl.Series(adv))
            .with_columns(
                _mlp=pl.col("_lp").mean().over(schema.RANK, schema.MICRO),
                _ma=pl.col("_a").mean().over(schema.RANK, schema.MICRO),
            )
        )
        cov = ((rec["_a"] - rec["_ma"]) * (rec["_lp"] - rec["_mlp"])).fill_null(math.nan).to_numpy()
    key = {"logratio": -np.abs(lr), "cov": -cov, "entropy": ent}[ranking]
    score = {"logratio": np.abs(lr), "cov": cov, "entropy": ent}[ranking]
    valid = np.flatnonzero(np.isfinite(key))
    if valid.size == 0:
        return []
    k = min(k, valid.size)
    top = valid[np.argpartition(key[valid], k - 1)[:k]]
    top = top[np.argsort(key[top], kind="stable")]
    tok = _ints(rows, schema.TOKEN_ID) if schema.TOKEN_ID in rows.columns else None
    has_tok = rows[schema.TOKEN_ID].is_not_null().to_numpy() if tok is not None else None
    _, seq_key = np.unique(np.stack([rank, micro, seq], axis=1), axis=0, return_inverse=True)
    seq_key = seq_key.reshape(-1)
    order = np.lexsort((pos, seq_key))
    sorted_key = seq_key[order]
    step = int(_ints(rows, schema.STEP)[0])

    def tid(j: int) -> int | None:
        return int(tok[j]) if tok is not None and has_tok is not None and has_tok[j] else None

    picks = []
    for i in top:
        lo, hi = np.searchsorted(sorted_key, seq_key[i], "left"), np.searchsorted(sorted_key, seq_key[i], "right")
        members = order[lo:hi]
        at = int(np.flatnonzero(members == i)[0])
        window = members[max(at - context, 0) : at + context + 1]
        picks.append(
            TokenPick(
                ranking=ranking,
                score=float(score[i]),
                step=step,
                rank=int(rank[i]),
                micro=int(micro[i]),
                seq=int(seq[i]),
                pos=int(pos[i]),
                token_id=tid(i),
                logratio=float(lr[i]),
                entropy=float(ent[i]),
                adv=float(adv[i]),
                cov=float(cov[i]),
                context=[(tid(j), "", bool(j == i)) for j in window],
            )
        )
    return picks


def _decoder(run: Run) -> tuple[Callable[[list[int | None]], list[str]], str]:
    """Token ids -> texts with the run's own ``tokenizer/`` folder (never downloads), and a note on how."""
    folder = getattr(run, "tokenizer_dir", None)
    folder = Path(folder) if folder else None

    def ids_only(ids: list[int | None]) -> list[str]:
        return ["?" if i is None else f"#{i}" for i in ids]

    if folder is None:
        return ids_only, "the run has no tokenizer/ folder: tokens are shown as #id"
    one: Callable[[int], str] | None = None
    err = ""
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tk = Tokenizer.from_file(str(folder / "tokenizer.json"))

            def one(i: int) -> str:
                return str(tk.decode([i], skip_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - any loader failure: fall back to ids and say why
            err = one_line(exc)
    if one is None:
        try:
            from transformers import AutoTokenizer

            at = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

            def one(i: int) -> str:
                return str(at.decode([i], skip_special_tokens=False))
        except Exception as exc:  # noqa: BLE001
            err = err or one_line(exc)
            return ids_only, f"could not load the run's tokenizer ({err}): tokens are shown as #id"
    memo: dict[int, str] = {}
    assert one is not None
    dec = one

    def decode(ids: list[int | None]) -> list[str]:
        out = []
        for i in ids:
            if i is None:
                out.append("?")
                continue
            if i not in memo:
                try:
                    memo[i] = dec(int(i))
                except Exception:  # noqa: BLE001 - an id outside the vocabulary
                    memo[i] = f"#{i}"
            out.append(memo[i])
        return out

    return decode, "decoded with the run's own tokenizer/ folder"


def _worst_tokens(
    run: Any, steps: list[int], *, k: int, context: int
) -> tuple[dict[tuple[int, str], list[TokenPick]], str]:
    """Worst tokens of each step by every ranking the rows support, decoded; and a note on the token rows."""
    if not steps:
        return {}, ""
    try:
        rows = run.tokens().filter(pl.col(schema.STEP).is_in(steps)).collect()
    except Exception as exc:  # noqa: BLE001 - damaged token files: the report goes on without tokens
        return {}, f"token rows could not be read ({one_line(exc)})"
    if rows.height == 0:
        return {}, "no token rows were recorded for these steps (token_sample_rate 0 or rows dropped)"
    decode, how = _decoder(run)
    out: dict[tuple[int, str], list[TokenPick]] = {}
    for (step,), part in rows.group_by(schema.STEP):
        for ranking in TOKEN_RANKINGS:
            if ranking == "entropy" and not np.isfinite(_col(part, schema.ENTROPY)).any():
                continue
            picks = token_picks(part, ranking, k=k, context=context)
            if picks:
                out[(int(step), ranking)] = picks
    ids = [p.token_id for ps in out.values() for p in ps] + [c[0] for ps in out.values() for p in ps for c in p.context]
    texts = iter(decode(ids))
    for ps in out.values():
        for p in ps:
            p.text = next(texts)
    for ps in out.values():
        for p in ps:
            p.context = [(c[0], next(texts), c[2]) for c in p.context]
    note = how
    if getattr(run, "token_rows_sampled", False):
        note += "; token rows cover only part of the tokens (sampled or dropped), so these are the worst sampled tokens"
    return out, note


# ---- panels -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One plot: a headline metric and its companions (same family, unit, bounds and direction)."""

    metric: str
    metrics: tuple[str, ...]

    @property
    def spec(self) -> MetricSpec:
        return REGISTRY[self.metric]


def panels() -> list[Panel]:
    """The headline panels, in registry order: each headline metric with the non-headline metrics of its family
    that share its unit, bounds and direction (``clip/region`` with ``clip/low``, ``clip/high``...)."""
    out = []
    for name in HEADLINE:
        spec = REGISTRY[name]
        comp = [
            s.name
            for s in REGISTRY.values()
            if s.family == spec.family
            and not s.headline
            and s.unit == spec.unit
            and s.bounds == spec.bounds
            and s.direction == spec.direction
        ]
        out.append(Panel(name, (name, *comp)))
    return out


def _decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points: each bucket of steps keeps its lowest and highest value (so spikes
    survive)."""
    n = x.size
    if n <= max_points:
        return x, y
    buckets = max(max_points // 2, 1)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    keep: list[int] = []
    for a, b in itertools.pairwise(edges.tolist()):
        seg = y[a:b]
        if b <= a:
            continue
        ok = np.isfinite(seg)
        if not ok.any():
            keep.append(int(a))
            continue
        lo = int(np.nanargmin(np.where(ok, seg, np.nan)))
        hi = int(np.nanargmax(np.where(ok, seg, np.nan)))
        keep.extend(sorted({a + lo, a + hi}))
    idx = np.asarray(keep, dtype=np.int64)
    return x[idx], y[idx]


@dataclass
class _RunData:
    run: Any
    label: str
    colour: str
    metrics: pl.DataFrame
    events: list[dict[str, Any]]
    summary: Summary
    worst: list[WorstStep]
    tokens: dict[tuple[int, str], list[TokenPick]]
    token_note: str


def _figure(panel: Panel, data: list[_RunData], max_points: int) -> Any | None:
    import plotly.graph_objects as go

    fig = go.Figure()
    compare = len(data) > 1
    any_values = False
    # the first run is drawn last, on top: where a compared run is identical, the run the report is about shows
    for ri, d in reversed(list(enumerate(data))):
        steps = d.metrics["step"].to_numpy()
        resume = getattr(d.run, "resume", None) or runformat.Resume()
        for mi, name in enumerate(panel.metrics):
            if name not in d.metrics.columns:
                continue
            y = d.metrics[name].cast(pl.Float64).fill_null(math.nan).to_numpy()
            if not np.isfinite(y).any():
                continue
            any_values = True
            x, yy = _decimate(steps.astype(np.float64), y, max_points)
            # steps a restart left without data: a point without a value halfway, where the line breaks
            cut = np.asarray(runformat.gap_breaks(x.tolist(), resume.gap_ranges()), dtype=np.int64)
            if cut.size:
                x = np.insert(x, cut + 1, (x[cut] + x[cut + 1]) / 2)
                yy = np.insert(yy, cut + 1, math.nan)
            colour = d.colour if compare else _LINE_COLOURS[mi % len(_LINE_COLOURS)]
            label = f"{_ptext(d.label)} · {name}" if compare else name
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[float(v) if math.isfinite(v) else None for v in yy],
                    mode="lines",
                    name=label,
                    line={"color": colour, "dash": _DASHES[mi % len(_DASHES)] if compare else "solid", "width": 1.6},
                    legendrank=1000 + 100 * ri + mi,
                    hovertemplate=f"{label}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                )
            )
        for step, ranks in list(resume.restarted_ranks().items())[:50]:
            who = runformat.ranks_text(ranks)
            fig.add_vline(
                x=step,
                line={"color": d.colour if compare else _RESTART_COLOUR, "width": 1, "dash": "dot"},
                annotation={"text": f"restart ({who})", "font": {"size": 9, "color": _RESTART_COLOUR}},
                annotation_position="top left",
            )
        # alerts on this panel's metrics: a marker where each episode fired, shading while critical ones fired
        fired = [e for e in episodes_from_events(d.events) if e.metric in panel.metrics]
        if fired:
            xs, ys, texts, colours, symbols = [], [], [], [], []
            for e in fired:
                xs.append(e.start_step)
                ys.append(e.value if math.isfinite(e.value) else None)
                texts.append(_ptext(f"{d.label}: {e.summary}") if compare else _ptext(e.summary))
                colours.append(d.colour if compare else _SEVERITY_COLOURS.get(e.severity, "#7f8c8d"))
                symbols.append("x" if e.severity == "critical" else "triangle-up")
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    name=f"alerts ({_ptext(d.label)})" if compare else "alerts fired",
                    marker={"color": colours, "symbol": symbols, "size": 9, "line": {"width": 1, "color": "#333"}},
                    legendrank=1000 + 100 * ri + 99,
                    hovertext=texts,
                    hoverinfo="text",
                )
            )
            if not compare:
                last = int(steps[-1]) if steps.size else 0
                for e in fired:
                    if e.severity == "critical":
                        fig.add_vrect(
                            x0=e.start_step,
                            x1=e.end_step if e.end_step is not None else last,
                            fillcolor=_SEVERITY_COLOURS["critical"],
                            opacity=0.08,
                            line_width=0,
                        )
    if not any_values:
        return None
    spec = panel.spec
    unit = f" ({spec.unit})" if spec.unit else ""
    fig.update_layout(
        template="plotly_white",
        height=300,
        margin={"l": 55, "r": 15, "t": 36, "b": 30},
        title={"text": f"{_ptext(panel.metric)}{_ptext(unit)}", "font": {"size": 14}, "x": 0.01},
        legend={"orientation": "h", "y": -0.18, "font": {"size": 10}},
        hovermode="closest",
        xaxis={"title": {"text": ""}},
        showlegend=True,
    )
    return fig


# ---- HTML ------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .meta{font-size:12px;color:#cfd8dc;margin-top:4px}
main{padding:8px 24px 40px}section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:14px 0;
padding:12px 18px}h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:12px 0 6px}
.verdict{display:inline-block;padding:2px 8px;border-radius:4px;font-weight:600;font-size:12px;color:#fff}
.v-critical{background:#c0392b}.v-warn{background:#e67e22}.v-ok{background:#27ae60}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.panel{border:1px solid #eee;border-radius:4px;padding:4px}.panel p{font-size:11px;color:#555;margin:2px 6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}th,td{border-bottom:1px solid #eee;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev-critical{color:#c0392b;font-weight:600}.sev-warn{color:#e67e22;font-weight:600}
.esc{background:#fdecea;color:#b71c1c;font-family:monospace;border-radius:2px;padding:0 1px}
.ctx{font-family:monospace;white-space:pre-wrap}.ctx .sel{background:#ffe082;font-weight:700;outline:1px solid #f9a825}
.ctx .tk{border-right:1px dotted #ccc}.note{font-size:12px;color:#555}details summary{cursor:pointer}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
"""


def _verdict_badge(v: str) -> str:
    word = {"critical": "critical problems", "warn": "warnings only", "ok": "no alert"}[v]
    return f'<span class="verdict v-{v}">{word}</span>'


def _summary_html(d: _RunData, compare: bool) -> str:
    s = d.summary
    swatch = f'<span class="swatch" style="background:{d.colour}"></span>' if compare else ""
    items = "".join(f"<li>{_esc(x)}</li>" for x in s.sentences)
    return (
        f'<div class="run-summary" data-run="{_html.escape(visible(d.label), quote=True)}">'
        f"<h3>{swatch}{_esc(d.label)} {_verdict_badge(s.verdict)}</h3>"
        f'<p class="headline">{_esc(s.headline)}</p>'
        + (f"<ul>{items}</ul>" if items else "")
        + f'<p class="note">Alerts from {_esc(s.history)}.</p></div>'
    )


def _glance_html(data: list[_RunData]) -> str:
    head = "".join(f"<th>{_esc(d.label)}: first 10 steps</th><th>last 10 steps</th>" for d in data)
    rows = []
    for name in HEADLINE:
        spec = REGISTRY[name]
        cells = []
        for d in data:
            v = (
                d.metrics[name].cast(pl.Float64).fill_null(math.nan).to_numpy()
                if name in d.metrics.columns
                else np.zeros(0)
            )
            a, b = v[:10], v[-10:]
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            cells.append(
                f'<td class="num">{_fmt(float(np.median(a)), spec.unit) if a.size else "not recorded"}</td>'
                f'<td class="num">{_fmt(float(np.median(b)), spec.unit) if b.size else "-"}</td>'
            )
        better = {"lower": "lower is better", "higher": "higher is better"}.get(spec.direction, "")
        rows.append(
            f"<tr><td><code>{_esc(name)}</code></td><td>{_esc(spec.doc)}"
            f"{' (' + better + ')' if better else ''}</td>{''.join(cells)}</tr>"
        )
    return (
        f"<table><tr><th>metric</th><th>meaning</th>{head}</tr>{''.join(rows)}</table>"
        '<p class="note">Medians; a metric whose inputs were not recorded shows "not recorded".</p>'
    )


def _alerts_html(d: _RunData) -> str:
    eps = episodes_from_events(d.events, d.metrics)
    if not eps:
        return f"<h3>{_esc(d.label)}</h3><p>No alert fired. ({_esc(d.summary.history)})</p>"
    rows = []
    for e in sorted(eps, key=lambda e: (e.start_step, -_SEVERITY_RANK.get(e.severity, 0))):
        spec = REGISTRY.get(e.metric or "")
        unit = spec.unit if spec else ""
        end = str(e.end_step) if e.end_step is not None else "still firing"
        peak = f"{_fmt(e.peak_value, unit)} at {e.peak_step}" if e.peak_step is not None else "-"
        rows.append(
            f'<tr><td class="sev-{_html.escape(visible(e.severity), quote=True)}">{_esc(e.severity)}</td>'
            f"<td><code>{_esc(e.rule)}</code></td><td class='num'>{e.onset_step}</td>"
            f"<td class='num'>{e.start_step}</td><td class='num'>{_esc(end)}</td>"
            f"<td><code>{_esc(e.metric or '-')}</code></td><td class='num'>{_fmt(e.value, unit)}</td>"
            f"<td class='num'>{_fmt(e.threshold, unit)}</td><td class='num'>{_esc(peak)}</td>"
            f"<td>{_esc(e.summary)}<details><summary>rule</summary><code>{_esc(e.expr)}</code><br>"
            f"{_esc(e.description)}</details></td></tr>"
        )
    return (
        f"<h3>{_esc(d.label)}</h3><p class='note'>From {_esc(d.summary.history)}. <b>onset</b>: first step of the "
        "consecutive bad steps the rule needed; <b>fired</b>: the alert's step.</p>"
        "<table><tr><th>severity</th><th>rule</th><th>onset</th><th>fired</th><th>resolved</th><th>metric</th>"
        "<th>value</th><th>threshold</th><th>worst (step)</th><th>message</th></tr>" + "".join(rows) + "</table>"
    )


def _tokens_html(d: _RunData) -> str:
    out = [f"<h3>{_esc(d.label)}</h3>"]
    if d.token_note:
        out.append(f'<p class="note">Tokens: {_esc(d.token_note)}.</p>')
    if not d.worst:
        out.append("<p>No step stands out.</p>")
        return "".join(out)
    for ws in d.worst:
        out.append(
            f'<details class="worst-step" open data-step="{ws.step}"><summary><b>step {ws.step}</b>: '
            f"{_esc('; '.join(ws.reasons))}</summary>"
        )
        shown = False
        for ranking, title in TOKEN_RANKINGS.items():
            picks = d.tokens.get((ws.step, ranking))
            if not picks:
                continue
            shown = True
            rows = []
            for p in picks:
                ctx = "".join(
                    f'<span class="{"tk sel" if sel else "tk"}">{_esc(text)}</span>' for _, text, sel in p.context
                )
                rows.append(
                    f"<tr><td class='num'>{_fmt(p.score)}</td><td>{_esc(p.text)}</td>"
                    f"<td class='num'>{'' if p.token_id is None else p.token_id}</td>"
                    f"<td class='num'>{p.rank}/{p.micro}/{p.seq}</td><td class='num'>{p.pos}</td>"
                    f"<td class='num'>{_fmt(p.logratio)}</td><td class='num'>{_fmt(p.entropy)}</td>"
                    f"<td class='num'>{_fmt(p.adv)}</td><td class='num'>{_fmt(p.cov)}</td>"
                    f"<td class='ctx'>{ctx}</td></tr>"
                )
            out.append(
                f"<p class='note'>{_esc(title)}</p><table class='tokens' data-ranking='{ranking}'><tr>"
                "<th>score</th><th>token</th><th>id</th><th>rank/micro/seq</th><th>pos</th><th>log-ratio</th>"
                "<th>entropy</th><th>adv</th><th>cov</th><th>context (token highlighted)</th></tr>"
                + "".join(rows)
                + "</table>"
            )
        if not shown:
            out.append('<p class="note">No token rows for this step.</p>')
        out.append("</details>")
    return "".join(out)


def _open(run: RunLike) -> Run:
    if not isinstance(run, (str, os.PathLike)):
        return run
    from rldiag.analysis.io import open_run

    try:
        return open_run(run)
    except (FileNotFoundError, ValueError) as exc:
        raise ReportError(" ".join(str(exc).split())) from None


def _prepare(run: Run, label: str, colour: str, *, top_steps: int, top_tokens: int, context: int) -> _RunData:
    metrics = run.step_metrics()
    if metrics.height == 0:
        raise ReportError(f"{run.path} holds no recorded steps yet: nothing to report")
    events, history = _history(run, metrics)
    first = summarize_run(run, events=events, metrics=metrics)
    worst = _worst_steps(first.findings, metrics, top_steps)
    onsets = sorted({f.onset_step for f in first.findings})
    tokens, note = _worst_tokens(run, sorted({w.step for w in worst} | set(onsets)), k=top_tokens, context=context)
    summary = summarize_run(run, events=events, metrics=metrics, tokens=tokens)
    summary.history = history
    return _RunData(run, label, colour, metrics, events, summary, worst, tokens, note)


def _divergence(a: _RunData, b: _RunData, tol: float = 0.01) -> str:
    """First common step where a headline metric of ``b`` differs from ``a`` by more than ``tol`` (relative)."""
    j = a.metrics.select("step", *[n for n in HEADLINE if n in a.metrics.columns]).join(
        b.metrics.select("step", *[n for n in HEADLINE if n in b.metrics.columns]), on="step", suffix="__b"
    )
    if j.height == 0:
        return f"{b.label} and {a.label} share no step."
    steps = j["step"].to_numpy()
    first: tuple[int, int, str, float, float] | None = None
    for name in HEADLINE:
        if name not in j.columns or f"{name}__b" not in j.columns:
            continue
        x, y = _col(j, name), _col(j, f"{name}__b")
        ok = np.isfinite(x) & np.isfinite(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(x - y) / np.maximum(np.abs(x) + np.abs(y), 1e-12)
        hit = np.flatnonzero(ok & (rel > tol) & (np.abs(x - y) > 1e-9))
        if hit.size and (first is None or int(hit[0]) < first[0]):
            i = int(hit[0])
            first = (i, int(steps[i]), name, float(x[i]), float(y[i]))
    if first is None:
        return (
            f"{b.label} and {a.label} agree within {tol:.0%} on every headline metric over their "
            f"{j.height} common steps."
        )
    i, step, name, xv, yv = first
    same = f" agree on every headline metric until step {int(steps[i - 1])}; they" if i > 0 else ""
    return (
        f"{a.label} and {b.label}{same} first differ by more than {tol:.0%} at step {step} "
        f"({name}: {_fmt(xv)} vs {_fmt(yv)})."
    )


def build_report(
    run: RunLike,
    compare: Sequence[RunLike] = (),
    *,
    top_steps: int = 6,
    top_tokens: int = 5,
    context: int = 6,
    max_points: int = 2000,
) -> str:
    """The report of ``run`` (a path or an open :class:`rldiag.Run`), with ``compare`` runs on the same panels,
    as one self-contained HTML document (plotly.js inlined; no network needed to view it).

    Args:
        run: the run to report on.
        compare: other runs drawn on the same panels, one colour per run.
        top_steps: how many worst steps per run get a worst-tokens table.
        top_tokens: tokens per ranking and step.
        context: tokens shown on each side of a worst token.
        max_points: points per line at most (min/max per bucket of steps beyond that).

    Raises:
        ReportError: a path that is not a run, or a run with no steps.
    """
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    runs = [_open(r) for r in (run, *compare)]
    labels: list[str] = []
    for r in runs:
        label = r.name
        while label in labels:
            label += "'"
        labels.append(label)
    data = [
        _prepare(r, lab, RUN_COLOURS[i % len(RUN_COLOURS)], top_steps=top_steps, top_tokens=top_tokens, context=context)
        for i, (r, lab) in enumerate(zip(runs, labels))
    ]
    compare_mode = len(data) > 1
    config = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}
    figs, missing = [], []
    for i, panel in enumerate(panels()):
        fig = _figure(panel, data, max_points)
        spec = panel.spec
        if fig is None:
            extra = [c for c in spec.inputs if c not in ("logp", "old_logp", "adv")]
            missing.append(
                f"<li><code>{_esc(panel.metric)}</code>: not recorded"
                f"{' (needs ' + ', '.join(extra) + ')' if extra else ''}</li>"
            )
            continue
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, config=config, div_id=f"panel-{i}")
        comp = f" With {', '.join(panel.metrics[1:])}." if len(panel.metrics) > 1 else ""
        figs.append(
            f'<div class="panel" data-metric="{_html.escape(visible(panel.metric), quote=True)}">{div}'
            f"<p>{_esc(spec.doc)}{_esc(comp)}</p></div>"
        )
    title = " vs ".join(labels)
    runs_meta = "; ".join(
        f"{d.label}: {d.run.path} (steps {d.summary.first_step}-{d.summary.last_step}, "
        f"{len(d.run.ranks)} rank{'s' if len(d.run.ranks) != 1 else ''})"
        for d in data
    )
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    legend = ""
    if compare_mode:
        legend = (
            "<p>"
            + " ".join(f'<span class="swatch" style="background:{d.colour}"></span>{_esc(d.label)}' for d in data)
            + " (dash styles tell a panel's metrics apart)</p>"
        )
    else:
        legend = (
            '<p class="note">Markers: where an alert on the panel\'s metric fired (x critical, triangle '
            "warn); red shading: while a critical one fired.</p>"
        )
    diverge = ""
    if compare_mode:
        diverge = "<ul>" + "".join(f"<li>{_esc(_divergence(data[0], d))}</li>" for d in data[1:]) + "</ul>"
    body = [
        (
            f"<header><h1>rldiag report: {_esc(title)}</h1><div class='meta'>{_esc(runs_meta)}<br>generated {when} by "
            f"rldiag {_esc(__version__)}; self-contained (plotly.js inlined, no network)</div></header><main>"
        ),
        "<section id='summary'><h2>Summary</h2>"
        + "".join(_summary_html(d, compare_mode) for d in data)
        + diverge
        + "</section>",
        "<section id='panels'><h2>Headline metrics</h2>"
        + legend
        + f"<div class='grid'>{''.join(figs)}</div>"
        + (f"<ul class='note'>{''.join(missing)}</ul>" if missing else "")
        + "</section>",
        "<section id='glance'><h2>At a glance</h2>" + _glance_html(data) + "</section>",
        "<section id='alerts'><h2>Alerts</h2>" + "".join(_alerts_html(d) for d in data) + "</section>",
        "<section id='tokens'><h2>Worst steps and their worst tokens</h2><p class='note'>Steps: each finding's "
        "onset and worst step, then the steps where a headline metric is furthest on its bad side of the run's "
        "median.</p>" + "".join(_tokens_html(d) for d in data) + "</section>",
        "</main>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>rldiag report: {_esc(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>" + "".join(body) + "</body></html>"
    )


def check_out(out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """The output path, checked before any work: its folder exists and is writable, and it is not an existing
    file (unless ``force``) or a folder."""
    p = Path(out)
    if p.is_dir():
        raise ReportError(f"--out {p} is a directory; give a file name such as {p / 'report.html'}")
    if p.exists() and not force:
        raise ReportError(f"{p} already exists; pass --force (force=True) to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ReportError(f"cannot write {p}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write {p}: the folder {parent} is not writable")
    return p


def write_report(
    run: RunLike, out: str | os.PathLike[str], *, compare: Sequence[RunLike] = (), force: bool = False, **options: Any
) -> Path:
    """Write :func:`build_report` to ``out`` atomically (a temporary file in the same folder, then a rename).

    Refuses to replace an existing ``out`` unless ``force``. Returns the path written.

    >>> write_report("runs/exp1", "report.html", compare=["runs/exp0"])     # doctest: +SKIP
    PosixPath('report.html')
    """
    p = check_out(out, force=force)
    text = build_report(run, compare, **options)
    try:
        runformat.atomic_write_bytes(p, text.encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
