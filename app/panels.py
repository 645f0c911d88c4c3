"""Which metric goes on which panel: derived from the metric registry, never a second list of metrics.

Every line panel of the dashboard is a group of registry metrics that share a *family* and a *unit*; the
registry's ``doc``, ``direction``, ``formula`` and ``source`` become the panel's help text. A page names only
the families it shows (:data:`PAGE_FAMILIES`), so a metric added to the registry appears on its page without
touching the app. Reference lines come from the default alert rules (their thresholds are data too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from rldiag.alerts.rules import default_rules
from rldiag.metrics.registry import REGISTRY, MetricSpec

MAX_PER_PANEL = 5
"""More metrics than this with one unit are split over several panels (a legend of ten lines is unreadable)."""

PAGE_FAMILIES: dict[str, tuple[str, ...]] = {
    "ratios": ("ratio", "ess", "kl", "seq"),
    "clipping": ("clip", "regime", "balance"),
    "entropy": ("entropy",),
    "mismatch": ("mismatch", "staleness"),
    "positions": ("stage",),
}
"""Families shown as line panels on each metric page (the Overview shows every family)."""


@dataclass(frozen=True)
class HelpItem:
    name: str
    doc: str
    direction: str
    formula: str
    source: str
    derived: bool


@dataclass(frozen=True)
class Panel:
    """A line panel: metrics of one family and one unit."""

    key: str
    family: str
    title: str
    unit: str
    metrics: tuple[str, ...]
    help: tuple[HelpItem, ...]


def registry() -> Mapping[str, MetricSpec]:
    """The metric registry (:data:`rldiag.metrics.registry.REGISTRY`): one float per step each."""
    return REGISTRY


def family_of(spec: MetricSpec) -> str:
    return spec.family


def _help(spec: MetricSpec) -> HelpItem:
    return HelpItem(
        name=spec.name,
        doc=spec.doc,
        direction=spec.direction,
        formula=spec.formula,
        source=spec.source,
        derived=spec.derived,
    )


def families(specs: Mapping[str, MetricSpec] | None = None) -> dict[str, list[MetricSpec]]:
    """Registry specs grouped by family, families and metrics in registry order."""
    out: dict[str, list[MetricSpec]] = {}
    for spec in (specs if specs is not None else registry()).values():
        out.setdefault(family_of(spec), []).append(spec)
    return out


def scale_key(spec: MetricSpec) -> str | None:
    """Metrics with the same key share a y-axis: same unit, or shares bounded to [0, 1]; None: own panel."""
    if spec.unit:
        return f"unit:{spec.unit}"
    if tuple(spec.bounds) == (0.0, 1.0):
        return "share"
    return None


def _split(family: str, specs: Sequence[MetricSpec], limit: int, *, suffix: str = "") -> list[Panel]:
    groups: list[list[MetricSpec]] = []
    keyed: dict[str, list[MetricSpec]] = {}
    for spec in specs:
        key = scale_key(spec)
        if key is None:
            groups.append([spec])
        elif key in keyed:
            keyed[key].append(spec)
        else:
            keyed[key] = [spec]
            groups.append(keyed[key])  # same list object: later specs with this key land in it
    panels: list[Panel] = []
    for group in groups:
        for start in range(0, len(group), limit):
            chunk = group[start : start + limit]
            unit = str(getattr(chunk[0], "unit", "") or "")
            key = f"{family}-{len(panels)}{suffix}"
            panels.append(
                Panel(
                    key,
                    family,
                    panel_title(s.name for s in chunk),
                    unit,
                    tuple(s.name for s in chunk),
                    tuple(_help(s) for s in chunk),
                )
            )
    return panels


def panel_title(metrics: Iterable[str]) -> str:
    """``clip: low, high, region`` for metrics of one family; the full names otherwise."""
    names = list(metrics)
    fams = {n.split("/", 1)[0] for n in names}
    if len(fams) == 1:
        return f"{fams.pop()}: " + ", ".join(n.split("/", 1)[-1] for n in names)
    return ", ".join(names)


def page_panels(page: str, specs: Mapping[str, MetricSpec] | None = None) -> list[Panel]:
    """Line panels of a metric page, in registry order of families."""
    wanted = PAGE_FAMILIES[page]
    fams = families(specs)
    out: list[Panel] = []
    for fam in wanted:
        if fam in fams:
            out.extend(_split(fam, fams[fam], MAX_PER_PANEL))
    return out


def overview_panels(specs: Mapping[str, MetricSpec] | None = None) -> list[Panel]:
    """The registry's headline metrics (``MetricSpec.headline``), grouped by family and scale."""
    out = []
    for fam, group in families(specs).items():
        head = [s for s in group if getattr(s, "headline", False)]
        if head:
            out.extend(_split(fam, head, MAX_PER_PANEL, suffix="-overview"))
    return out


def custom_help(name: str) -> HelpItem:
    """Help of a custom scalar: the training loop logged it; rldiag knows nothing more about it."""
    return HelpItem(
        name=name,
        doc="a scalar the training loop logged with Recorder.log (rldiag stores it exactly, one value per step; "
        "several ranks give their mean)",
        direction="neutral",
        formula="",
        source="your training loop",
        derived=False,
    )


def page_of(metric: str) -> str | None:
    """The metric page whose panels chart ``metric`` (the Overview for a headline metric no page lists)."""
    spec = spec_of(metric)
    if spec is None:
        return None
    fam = family_of(spec)
    for page, fams in PAGE_FAMILIES.items():
        if fam in fams:
            return page
    return "overview" if spec.headline else None


REQUIRED_INPUTS = frozenset({"logp", "old_logp", "adv"})


def no_data_note(metrics: Sequence[str]) -> str:
    """What to record to see these metrics: their optional inputs from the registry."""
    needs: list[str] = []
    for m in metrics:
        spec = spec_of(m)
        for col in spec.inputs if spec is not None else ():
            if col not in REQUIRED_INPUTS and col not in needs:
                needs.append(col)
    return "no data in this run" + (f": record {', '.join(needs)}" if needs else "")


def spec_of(metric: str) -> MetricSpec | None:
    """The registry spec of ``metric`` (None for names the registry does not know, e.g. lens columns)."""
    return registry().get(metric)


@lru_cache(maxsize=1)
def _rule_lines() -> dict[str, tuple[tuple[float, str], ...]]:
    lines: dict[str, list[tuple[float, str]]] = {}
    for rule in default_rules().rules:  # the packaged rule file (its own tests keep it valid)
        for cond in rule.conditions:
            if cond.kind == "threshold":
                lines.setdefault(cond.metric, []).append((float(cond.threshold), f"{rule.name} ({rule.severity})"))
    return {k: tuple(v) for k, v in lines.items()}


def reference_lines(metrics: Sequence[str]) -> list[tuple[float, str]]:
    """Alert thresholds of the default rules for these metrics, as (value, label)."""
    table = _rule_lines()
    out: list[tuple[float, str]] = []
    for m in metrics:
        out.extend(table.get(m, ()))
    return out
