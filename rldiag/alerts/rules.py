"""Alert rules as data: frozen dataclasses, a TOML loader and a safe summary template.

A *rule* watches one or more *conditions* on step metrics (names of the metric registry,
docs/metrics.md) and carries everything the engine needs: comparison, fire and resolve thresholds (hysteresis),
how many steps a condition must hold (``for``, or ``for`` of ``within`` steps: "2 of 3"), how long a rule
keeps firing once clear (``keep_firing_for``), severity and a summary template. Nothing in a rule is code:
templates accept only named fields (``{value}``, ``{metric}``, ...), never attribute or index access.

Rule files are TOML (read with :mod:`tomllib`)::

    [settings]
    repeat_interval = "4h"

    [rules.kl_spike]            # overrides the default rule of that name, field by field
    threshold = 0.02

    [rules.clip_spike]
    enabled = false             # or: disable = ["clip_spike"] at the top level

    [rules.my_rule]
    severity = "warn"
    metric = "ratio/max"
    op = ">"
    threshold = 5.0
    resolve = 3.0
    for = 2

Every error names the file, the rule and the field. See docs/alerts.md for the full format.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

from rldiag.record.scalars import CUSTOM_PREFIX, check_name

__all__ = [
    "SEVERITIES",
    "Condition",
    "Rule",
    "RuleSet",
    "RuleError",
    "Settings",
    "default_rules",
    "load_rules",
    "parse_rules",
    "parse_duration",
    "check_template",
    "render_template",
    "TEMPLATE_FIELDS",
]

Op = Literal[">", ">=", "<", "<="]
Kind = Literal["threshold", "baseline", "rolling", "trend"]
Severity = Literal["info", "warn", "critical"]

SEVERITIES: Final[tuple[str, ...]] = ("info", "warn", "critical")
"""Severities, least to most severe."""

OPS: Final[tuple[str, ...]] = (">", ">=", "<", "<=")
KINDS: Final[tuple[str, ...]] = ("threshold", "baseline", "rolling", "trend")
MATCHES: Final[tuple[str, ...]] = ("any", "all")
DIRECTIONS: Final[tuple[str, ...]] = ("rising", "falling")
TREND_MODES: Final[tuple[str, ...]] = ("monotone", "net")

TOKEN_COUNT_METRIC: Final = "tokens/count"
"""The token count ``min_tokens`` multiplies a share by."""
ON_POLICY_METRICS: Final = ("ratio/min", "ratio/max")
"""Both exactly 1: an on-policy step (``skip_on_policy``)."""

DEFAULT_REPEAT_INTERVAL: Final[float] = 4 * 3600.0
"""Alertmanager's default ``repeat_interval``: re-notify a firing alert every 4 hours."""
DEFAULT_STALL_AFTER: Final[float] = 600.0

TEMPLATE_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "rule",
        "severity",
        "run",
        "metric",
        "value",
        "threshold",
        "resolve",
        "op",
        "step",
        "start_step",
        "reference",
        "status",
    }
)
"""The only names a summary template may use."""

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
# A standard format spec (https://docs.python.org/3/library/string.html#format-specification-mini-language)
# with width and precision bounded, so a template cannot ask for a gigabyte of padding.
_SPEC_RE = re.compile(r"^(?:[^{}]?[<>=^])?[+\- ]?z?#?0?(?:\d{1,3})?[_,]?(?:\.\d{1,2})?[bcdeEfFgGnosxX%]?$")


class RuleError(ValueError):
    """A rule (or rule file) is invalid; the message names the file, the rule and the field."""


# --------------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class Condition:
    """One test of one metric per step.

    ``kind`` decides what ``threshold`` and ``resolve`` are compared against:

    - ``threshold``: the metric itself (``value op threshold``).
    - ``baseline``: ``threshold`` and ``resolve`` are multiples of the run's baseline, the median of the
      first ``baseline_steps`` values of the metric (``entropy/mean < 0.3 * baseline``).
    - ``rolling``: multiples of the median of the previous ``window`` values (the current one excluded).
    - ``trend``: no threshold; the metric moved ``direction`` over the last ``steps`` steps, every step
      (``mode="monotone"``) or from the first to the last (``mode="net"``), by at least ``min_change``
      relative to the first value.

    For relative kinds ``floor`` is an absolute bound the value must also pass (guards a reference of 0);
    for trends it is the level the last value must reach (a rising trend must end at or above it, a
    falling one at or below it).
    A condition *trips* on a step when its test holds; it is *met* when it tripped on at least ``for_``
    of the last ``within`` evaluated steps. While the rule fires, the condition *holds* as long as the
    value stays on the bad side of ``resolve`` (hysteresis).
    """

    metric: str
    op: Op = ">"
    threshold: float = 0.0
    resolve: float | None = None
    kind: Kind = "threshold"
    for_: int = 1
    within: int | None = None
    baseline_steps: int = 10
    window: int = 20
    min_periods: int | None = None
    floor: float | None = None
    direction: Literal["rising", "falling"] = "rising"
    steps: int = 5
    mode: Literal["monotone", "net"] = "monotone"
    min_change: float = 0.0
    min_tokens: int = 0
    """A share of tokens (``clip/region``...) trips and holds only when it stands for at least this many tokens
    (``value x tokens/count``): 4 clipped tokens of 128 are 3%, and noise. 0: no such guard."""
    summary: str = ""
    """This condition's sentence when it decides the notification (default: the rule's ``summary``)."""

    @property
    def resolve_threshold(self) -> float:
        """The resolve threshold (defaults to the fire threshold: no hysteresis)."""
        return self.threshold if self.resolve is None else self.resolve

    @property
    def n(self) -> int:
        """Length of the k-of-n window (``within``, default ``for``)."""
        return self.within if self.within is not None else self.for_

    @property
    def needed_periods(self) -> int:
        return self.window if self.min_periods is None else self.min_periods

    def describe(self) -> str:
        """A short human form: ``entropy/mean < 0.3 x baseline(10) for 3``."""
        if self.kind == "trend":
            text = f"{self.metric} {self.direction} {self.steps} steps ({self.mode})"
            if self.min_change:
                text += f" by >= {self.min_change:.0%}"
            if self.floor is not None:
                text += f" to {'>=' if self.direction == 'rising' else '<='} {self.floor:g}"
        elif self.kind == "baseline":
            text = f"{self.metric} {self.op} {self.threshold:g} x median(first {self.baseline_steps})"
        elif self.kind == "rolling":
            text = f"{self.metric} {self.op} {self.threshold:g} x median(last {self.window})"
        else:
            text = f"{self.metric} {self.op} {self.threshold:g}"
        if self.floor is not None and self.kind in ("baseline", "rolling"):
            text += f" and {self.op} {self.floor:g}"
        if self.min_tokens:
            text += f" on >= {self.min_tokens} tokens"
        if self.n > 1 or self.for_ > 1:
            text += f" for {self.for_}" + (f" of {self.n}" if self.n != self.for_ else "") + " steps"
        return text


@dataclass(frozen=True)
class Rule:
    """A named alert rule: conditions combined with ``match`` ("any" / "all"), plus its notification data.

    ``kind="stall"`` rules have no conditions: they fire when no new step arrived for ``stall_after``
    seconds while the run is open (the engine's no-data state).
    """

    name: str
    conditions: tuple[Condition, ...] = ()
    match: Literal["any", "all"] = "any"
    severity: Severity = "warn"
    for_: int = 1
    within: int | None = None
    keep_firing_for: int = 0
    summary: str = ""
    doc: str = ""
    source: str = ""
    group: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    repeat_interval: float | None = None
    kind: Literal["metric", "stall"] = "metric"
    stall_after: float = DEFAULT_STALL_AFTER
    skip_on_policy: bool = False
    """A step whose importance ratios are all exactly 1 (``ratio/min`` = ``ratio/max`` = 1: the first update on
    fresh rollouts, on-policy by construction) says nothing about the update's size: for this rule it is a
    missing step (it neither fires nor clears it). Without it a run that reuses each rollout batch for k
    updates resolves and fires its KL or clipping alert again every k steps."""

    def __hash__(self) -> int:  # labels is a dict; rules are still usable as dict keys
        return hash((self.name, self.conditions, self.match, self.severity, self.kind))

    @property
    def n(self) -> int:
        return self.within if self.within is not None else self.for_

    @property
    def clear_steps(self) -> int:
        """Consecutive clear steps after which a firing rule resolves.

        A rule that needs ``k`` of ``n`` steps to fire can re-fire as long as one step in the last
        ``n - k + 1`` was bad, so it resolves only after that many clear steps (then ``keep_firing_for``
        more): otherwise an alternating series would fire and resolve on every other step.
        """
        spans = [self.n - self.for_ + 1] + [c.n - c.for_ + 1 for c in self.conditions]
        return max(spans) + self.keep_firing_for

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the rule reads: its conditions' and those its guards need (``tokens/count``, on-policy)."""
        names = [c.metric for c in self.conditions]
        if any(c.min_tokens for c in self.conditions):
            names.append(TOKEN_COUNT_METRIC)
        if self.skip_on_policy:
            names.extend(ON_POLICY_METRICS)
        return tuple(dict.fromkeys(names))

    def describe(self) -> str:
        if self.kind == "stall":
            return f"no new step for {format_duration(self.stall_after)} while the run is open"
        sep = " or " if self.match == "any" else " and "
        text = sep.join(c.describe() for c in self.conditions)
        if self.n > 1 or self.for_ > 1:
            text = f"({text}) for {self.for_}" + (f" of {self.n}" if self.n != self.for_ else "") + " steps"
        return text


@dataclass(frozen=True)
class Settings:
    """File-wide settings (``[settings]`` table)."""

    repeat_interval: float = DEFAULT_REPEAT_INTERVAL
    """Seconds between re-notifications of an alert that keeps firing (Alertmanager's ``repeat_interval``)."""


@dataclass(frozen=True)
class RuleSet:
    """An ordered collection of rules with unique names, plus file-wide settings."""

    rules: tuple[Rule, ...]
    settings: Settings = Settings()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise RuleError(f"rule {rule.name!r} is defined twice")
            seen.add(rule.name)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __getitem__(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(rule.name == name for rule in self.rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    def without(self, *names: str) -> RuleSet:
        """This set less the named rules (unknown names are an error)."""
        for name in names:
            if name not in self:
                raise RuleError(_unknown("rule", name, self.names))
        return RuleSet(tuple(r for r in self.rules if r.name not in names), self.settings)

    def replace(self, name: str, **changes: Any) -> RuleSet:
        """This set with fields of one rule replaced (``rules.replace("kl_spike", severity="critical")``)."""
        rule = self[name]
        new = dataclasses.replace(rule, **changes)
        validate_rule(new)
        return RuleSet(tuple(new if r.name == name else r for r in self.rules), self.settings)


# --------------------------------------------------------------------------------------------------
# validation


def _unknown(what: str, name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}{hint}"


def known_metrics() -> frozenset[str] | None:
    """Names of the metric registry, or None while the registry is not importable."""
    from rldiag.metrics.registry import METRICS

    # lens/*, cliff/* and law/* come from token rows (docs/metrics.md, analyses): `rldiag watch --cliff-lam` adds
    # cliff/* to the frame
    return frozenset(METRICS)


def validate_condition(cond: Condition, where: str, metrics: frozenset[str] | None = None) -> None:
    """Raise :class:`RuleError` naming ``where`` and the field when ``cond`` is inconsistent."""

    def fail(fieldname: str, msg: str) -> None:
        raise RuleError(f"{where}, field {fieldname!r}: {msg}")

    if not isinstance(cond.metric, str) or not cond.metric:
        fail("metric", "a metric name is required")
    if cond.metric.startswith(CUSTOM_PREFIX):  # a custom scalar (Recorder.log): any name it may have
        try:
            check_name(cond.metric[len(CUSTOM_PREFIX) :])
        except (TypeError, ValueError) as exc:
            fail("metric", str(exc))
    elif metrics is not None and cond.metric not in metrics:
        fail(
            "metric", _unknown("metric", cond.metric, metrics) + f" (a custom scalar is named '{CUSTOM_PREFIX}<name>')"
        )
    if cond.kind not in KINDS:
        fail("kind", f"must be one of {', '.join(KINDS)}, got {cond.kind!r}")
    if cond.op not in OPS:
        fail("op", f"must be one of {', '.join(OPS)}, got {cond.op!r}")
    for name in ("threshold", "min_change"):
        v = getattr(cond, name)
        if not math.isfinite(v):
            fail(name, f"must be finite, got {v!r}")
    for name in ("resolve", "floor"):
        v = getattr(cond, name)
        if v is not None and not math.isfinite(v):
            fail(name, f"must be finite, got {v!r}")
    if cond.for_ < 1:
        fail("for", f"must be at least 1, got {cond.for_}")
    if cond.within is not None and cond.within < cond.for_:
        fail("within", f"must be at least `for` ({cond.for_}), got {cond.within}")
    if cond.n > 1000:
        fail("within", f"at most 1000 steps, got {cond.n}")
    if cond.kind != "trend" and cond.resolve is not None:
        higher_is_bad = cond.op in (">", ">=")
        if higher_is_bad and cond.resolve > cond.threshold:
            fail(
                "resolve",
                f"with op {cond.op!r} the resolve threshold ({cond.resolve:g}) must not exceed "
                f"the fire threshold ({cond.threshold:g})",
            )
        if not higher_is_bad and cond.resolve < cond.threshold:
            fail(
                "resolve",
                f"with op {cond.op!r} the resolve threshold ({cond.resolve:g}) must not be below "
                f"the fire threshold ({cond.threshold:g})",
            )
    if cond.kind == "baseline" and not 1 <= cond.baseline_steps <= 10_000:
        fail("baseline_steps", f"must be in [1, 10000], got {cond.baseline_steps}")
    if cond.kind == "rolling":
        if not 1 <= cond.window <= 10_000:
            fail("window", f"must be in [1, 10000], got {cond.window}")
        if not 1 <= cond.needed_periods <= cond.window:
            fail("min_periods", f"must be in [1, window={cond.window}], got {cond.needed_periods}")
    if cond.kind == "trend":
        if not 1 <= cond.steps <= 10_000:
            fail("steps", f"must be in [1, 10000], got {cond.steps}")
        if cond.direction not in DIRECTIONS:
            fail("direction", f"must be one of {', '.join(DIRECTIONS)}, got {cond.direction!r}")
        if cond.mode not in TREND_MODES:
            fail("mode", f"must be one of {', '.join(TREND_MODES)}, got {cond.mode!r}")
        if cond.min_change < 0:
            fail("min_change", f"must be >= 0, got {cond.min_change}")
    if not 0 <= cond.min_tokens <= 2**40:
        fail("min_tokens", f"must be a count of tokens >= 0, got {cond.min_tokens}")
    if cond.summary:
        try:
            check_template(cond.summary)
        except RuleError as exc:
            fail("summary", str(exc))


def validate_rule(rule: Rule, metrics: frozenset[str] | None = None, *, origin: str = "") -> None:
    """Raise :class:`RuleError` if ``rule`` is inconsistent (``metrics``: known names, None = any)."""
    where = f"{origin}rule {rule.name!r}"

    def fail(fieldname: str, msg: str) -> None:
        raise RuleError(f"{where}, field {fieldname!r}: {msg}")

    if not isinstance(rule.name, str) or not _NAME_RE.match(rule.name):
        fail("name", "must start with a letter or _ and use only letters, digits, _ . - (at most 128)")
    if rule.severity not in SEVERITIES:
        fail("severity", f"must be one of {', '.join(SEVERITIES)}, got {rule.severity!r}")
    if rule.match not in MATCHES:
        fail("match", f"must be one of {', '.join(MATCHES)}, got {rule.match!r}")
    if rule.for_ < 1:
        fail("for", f"must be at least 1, got {rule.for_}")
    if rule.within is not None and rule.within < rule.for_:
        fail("within", f"must be at least `for` ({rule.for_}), got {rule.within}")
    if rule.n > 1000:
        fail("within", f"at most 1000 steps, got {rule.n}")
    if rule.keep_firing_for < 0:
        fail("keep_firing_for", f"must be >= 0, got {rule.keep_firing_for}")
    if rule.repeat_interval is not None and not rule.repeat_interval > 0:
        fail("repeat_interval", f"must be positive, got {rule.repeat_interval}")
    if rule.kind == "stall":
        if rule.conditions:
            fail("conditions", "a stall rule has no conditions")
        if not rule.stall_after > 0:
            fail("after", f"must be positive, got {rule.stall_after}")
    elif rule.kind == "metric":
        if not rule.conditions:
            fail("metric", "a rule needs a metric (or a list of `conditions`)")
        for i, cond in enumerate(rule.conditions):
            sub = where if len(rule.conditions) == 1 else f"{where}, conditions[{i}]"
            validate_condition(cond, sub, metrics)
    else:
        fail("kind", f"must be 'metric' or 'stall', got {rule.kind!r}")
    for key, value in rule.labels.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            fail("labels", f"label names are identifiers, got {key!r}")
        if not isinstance(value, str):
            fail("labels", f"label {key!r} must be a string, got {type(value).__name__}")
    try:
        check_template(rule.summary)
    except RuleError as exc:
        fail("summary", str(exc))


# --------------------------------------------------------------------------------------------------
# safe templates


def check_template(template: str) -> None:
    """Raise :class:`RuleError` unless ``template`` uses only :data:`TEMPLATE_FIELDS` with plain format specs.

    ``{value:.3g}`` is fine; ``{value.__class__}``, ``{value[0]}``, ``{0}``, ``{}`` and nested
    ``{value:{width}}`` are refused.
    """
    if not isinstance(template, str):
        raise RuleError(f"a template is a string, got {type(template).__name__}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RuleError(f"bad template {template!r}: {exc}") from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            allowed = ", ".join("{" + f + "}" for f in sorted(TEMPLATE_FIELDS))
            raise RuleError(f"template field {{{name}}} is not allowed; use only {allowed}")
        if conversion not in (None, "s", "r"):
            raise RuleError(f"template conversion !{conversion} is not allowed")
        if spec and ("{" in spec or not _SPEC_RE.match(spec)):
            raise RuleError(f"template format spec {spec!r} of {{{name}}} is not a plain format spec")


def render_template(template: str, fields: Mapping[str, Any]) -> str:
    """Fill a template checked by :func:`check_template`; a field that does not fit its spec prints as is.

    >>> render_template("{metric} = {value:.2f} at step {step}", {"metric": "kl/k3", "value": 0.1234, "step": 7})
    'kl/k3 = 0.12 at step 7'
    """
    check_template(template)
    out: list[str] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = fields.get(name)
        if value is None:
            out.append("n/a")
            continue
        if conversion == "r":
            value = repr(value)
        elif conversion == "s":
            value = str(value)
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError):
            out.append(str(value))
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# durations


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string like ``"90s"``, ``"10m"``, ``"4h"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        matches = list(_DURATION_RE.finditer(text))
        if not text or "".join(m.group(0) for m in matches) != text:
            raise ValueError(f"expected a duration like '90s', '10m' or '4h', got {value!r}")
        seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in matches)
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------------------------------
# TOML parsing

_COND_KEYS: Final = {
    "metric",
    "op",
    "threshold",
    "resolve",
    "kind",
    "for",
    "within",
    "baseline_steps",
    "window",
    "min_periods",
    "floor",
    "direction",
    "steps",
    "mode",
    "min_change",
    "min_tokens",
}
_RULE_KEYS: Final = {
    "severity",
    "match",
    "conditions",
    "keep_firing_for",
    "summary",
    "doc",
    "source",
    "group",
    "labels",
    "repeat_interval",
    "kind",
    "after",
    "enabled",
    "for",
    "within",
    "skip_on_policy",
}
# `for` and `within` of a single-condition rule written flat apply to the rule (the same thing there).
_FLAT_COND_KEYS: Final = _COND_KEYS - {"for", "within"}
_TOP_KEYS: Final = {"rules", "settings", "disable", "include_defaults"}


class _Fields:
    """Typed access to one TOML table that names the rule and field in every error."""

    def __init__(self, table: Mapping[str, Any], where: str):
        self.table = table
        self.where = where

    def fail(self, key: str, msg: str) -> RuleError:
        return RuleError(f"{self.where}, field {key!r}: {msg}")

    def number(self, key: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        v = self.table[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(key, f"expected a number, got {v!r}")
        return float(v)

    def integer(self, key: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        v = self.table[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"expected an integer, got {v!r}")
        return v

    def text(self, key: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        v = self.table[key]
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, got {v!r}")
        return v

    def duration(self, key: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        try:
            return parse_duration(self.table[key])
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None


def _condition_from(table: Mapping[str, Any], where: str, flat: bool) -> Condition:
    allowed = _FLAT_COND_KEYS if flat else _COND_KEYS
    f = _Fields(table, where)
    d = Condition("x")
    kw: dict[str, Any] = dict(
        metric=f.text("metric", ""),
        op=f.text("op", d.op),
        threshold=f.number("threshold", d.threshold),
        resolve=f.number("resolve", None),
        kind=f.text("kind", d.kind),
        baseline_steps=f.integer("baseline_steps", d.baseline_steps),
        window=f.integer("window", d.window),
        min_periods=f.integer("min_periods", None),
        floor=f.number("floor", None),
        direction=f.text("direction", d.direction),
        steps=f.integer("steps", d.steps),
        mode=f.text("mode", d.mode),
        min_change=f.number("min_change", d.min_change),
        min_tokens=f.integer("min_tokens", d.min_tokens),
    )
    if not flat:
        kw["for_"] = f.integer("for", 1)
        kw["within"] = f.integer("within", None)
        kw["summary"] = f.text("summary", "")
    unknown = [k for k in table if k not in allowed and k not in _RULE_KEYS]
    if unknown:
        raise f.fail(unknown[0], _unknown("field", unknown[0], sorted(allowed)))
    if not flat:
        stray = [k for k in table if k not in allowed and k != "summary"]
        if stray:
            raise f.fail(stray[0], "is a rule field, not a condition field")
    return Condition(**kw)


def _rule_from(name: str, table: Mapping[str, Any], origin: str, metrics: frozenset[str] | None) -> Rule:
    where = f"{origin}rule {name!r}"
    if not isinstance(table, Mapping):
        raise RuleError(f"{where}: expected a table ([rules.{name}]), got {type(table).__name__}")
    f = _Fields(table, where)
    unknown = [k for k in table if k not in _RULE_KEYS and k not in _COND_KEYS]
    if unknown:
        raise f.fail(unknown[0], _unknown("field", unknown[0], sorted(_RULE_KEYS | _COND_KEYS)))
    kind = f.text("kind", "metric")
    if kind not in ("metric", "stall", *KINDS):
        raise f.fail("kind", f"must be one of metric, stall, {', '.join(KINDS)}; got {kind!r}")
    labels = table.get("labels", {})
    if not isinstance(labels, Mapping):
        raise f.fail("labels", f"expected a table of strings, got {labels!r}")
    common: dict[str, Any] = dict(
        name=name,
        severity=f.text("severity", "warn"),
        match=f.text("match", "any"),
        keep_firing_for=f.integer("keep_firing_for", 0),
        summary=f.text("summary", ""),
        doc=f.text("doc", ""),
        source=f.text("source", ""),
        group=f.text("group", ""),
        labels=dict(labels),
        repeat_interval=f.duration("repeat_interval", None),
        for_=f.integer("for", 1),
        within=f.integer("within", None),
    )
    if "skip_on_policy" in table:
        if not isinstance(table["skip_on_policy"], bool):
            raise f.fail("skip_on_policy", f"expected true or false, got {table['skip_on_policy']!r}")
        common["skip_on_policy"] = table["skip_on_policy"]
    if kind == "stall":
        extra = [k for k in table if k in _FLAT_COND_KEYS - {"kind"} or k == "conditions"]
        if extra:
            raise f.fail(extra[0], "a stall rule has no conditions")
        rule = Rule(kind="stall", stall_after=f.duration("after", DEFAULT_STALL_AFTER), **common)
    else:
        if "after" in table:
            raise f.fail("after", 'only stall rules (kind = "stall") take `after`')
        flat_keys = [k for k in table if k in _FLAT_COND_KEYS]
        if "conditions" in table:
            if flat_keys:
                raise f.fail(
                    flat_keys[0],
                    "give either `conditions` or the condition fields of a single "
                    "condition at the rule level, not both",
                )
            raw = table["conditions"]
            if not isinstance(raw, list) or not raw:
                raise f.fail("conditions", "expected a non-empty array of tables ([[rules.NAME.conditions]])")
            conds = []
            for i, item in enumerate(raw):
                if not isinstance(item, Mapping):
                    raise f.fail("conditions", f"item {i} is not a table")
                conds.append(_condition_from(item, f"{where}, conditions[{i}]", flat=False))
            conditions = tuple(conds)
        else:
            flat = dict(table)
            if kind in KINDS:
                flat["kind"] = kind
            else:
                flat.pop("kind", None)
            conditions = (_condition_from(flat, where, flat=True),)
        rule = Rule(kind="metric", conditions=conditions, **common)
    validate_rule(rule, metrics, origin=origin)
    return rule


def _merge_override(base: Mapping[str, Any], override: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A default rule's table with a user's table laid over it, key by key."""
    merged = dict(base)
    if "conditions" in override:
        for k in list(merged):
            if k in _FLAT_COND_KEYS:
                del merged[k]
    elif "conditions" in base:
        flat = [k for k in override if k in _FLAT_COND_KEYS]
        if flat:
            raise RuleError(
                f"{where}, field {flat[0]!r}: the default rule has several conditions; "
                f"give the whole `conditions` array to change them"
            )
    merged.update(override)
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError as exc:  # pragma: no cover - Python 3.10
        raise RuleError("reading rule files needs Python 3.11 (tomllib)") from exc
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{path}: not valid TOML: {exc}") from None


def _default_tables() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError as exc:  # pragma: no cover - Python 3.10
        raise RuleError("rldiag alert rules need Python 3.11 or newer (tomllib)") from exc
    text = resources.files("rldiag.alerts").joinpath("default_rules.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def parse_rules(
    data: Mapping[str, Any],
    *,
    origin: str = "",
    base: Mapping[str, Any] | None = None,
    metrics: frozenset[str] | None | Literal["registry"] = "registry",
) -> RuleSet:
    """Build a :class:`RuleSet` from a parsed TOML document.

    ``base`` is the parsed document the file overrides (the default pack unless the file sets
    ``include_defaults = false``); ``metrics`` the known metric names ("registry": those of
    :data:`rldiag.metrics.registry.REGISTRY` when importable; None: any name).
    """
    prefix = f"{origin}: " if origin else ""
    known = known_metrics() if metrics == "registry" else metrics
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise RuleError(
            f"{prefix}{_unknown('top-level key', unknown[0], sorted(_TOP_KEYS))} (rules go in [rules.NAME] tables)"
        )
    rules_tbl = data.get("rules", {})
    if not isinstance(rules_tbl, Mapping):
        raise RuleError(f"{prefix}`rules` must be a table of [rules.NAME] tables")
    include = data.get("include_defaults", True)
    if not isinstance(include, bool):
        raise RuleError(f"{prefix}`include_defaults` must be true or false, got {include!r}")
    settings_tbl = data.get("settings", {})
    if not isinstance(settings_tbl, Mapping):
        raise RuleError(f"{prefix}`settings` must be a table")
    bad = [k for k in settings_tbl if k != "repeat_interval"]
    if bad:
        raise RuleError(f"{prefix}settings, field {bad[0]!r}: {_unknown('setting', bad[0], ['repeat_interval'])}")

    base_rules: dict[str, Any] = dict(base.get("rules", {})) if (base is not None and include) else {}
    base_settings = dict(base.get("settings", {})) if (base is not None and include) else {}
    settings_in = {**base_settings, **settings_tbl}
    sf = _Fields(settings_in, f"{prefix}settings")
    settings = Settings(repeat_interval=sf.duration("repeat_interval", DEFAULT_REPEAT_INTERVAL))

    tables: dict[str, Any] = dict(base_rules)
    for name, table in rules_tbl.items():
        where = f"{prefix}rule {name!r}"
        if not isinstance(table, Mapping):
            raise RuleError(f"{where}: expected a table ([rules.{name}]), got {type(table).__name__}")
        tables[name] = _merge_override(base_rules[name], table, where) if name in base_rules else dict(table)

    disable = data.get("disable", [])
    if not isinstance(disable, list) or not all(isinstance(x, str) for x in disable):
        raise RuleError(f"{prefix}`disable` must be an array of rule names, got {disable!r}")
    for name in disable:
        if name not in tables:
            raise RuleError(f"{prefix}disable: {_unknown('rule', name, tables)}")

    rules = []
    for name, table in tables.items():
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise RuleError(f"{prefix}rule {name!r}, field 'enabled': expected true or false, got {enabled!r}")
        if not enabled or name in disable:
            continue
        rules.append(_rule_from(name, table, prefix, known))
    return RuleSet(tuple(rules), settings)


def default_rules(*, metrics: frozenset[str] | None | Literal["registry"] = "registry") -> RuleSet:
    """The default rule pack of docs/alerts.md (``rldiag/alerts/default_rules.toml``)."""
    return parse_rules(_default_tables(), origin="default_rules.toml", metrics=metrics)


def load_rules(
    path: str | Path | None = None,
    *,
    metrics: frozenset[str] | None | Literal["registry"] = "registry",
) -> RuleSet:
    """Rules of a TOML file laid over the default pack (``path=None``: the default pack alone).

    A rule the file names replaces the default of that name field by field; ``enabled = false`` or a
    top-level ``disable = [...]`` removes rules; ``include_defaults = false`` starts from nothing.
    """
    if path is None:
        return default_rules(metrics=metrics)
    p = Path(path)
    return parse_rules(_read_toml(p), origin=str(p), base=_default_tables(), metrics=metrics)


def coerce_rules(rules: RuleSet | Sequence[Rule] | str | Path | None) -> RuleSet:
    """A :class:`RuleSet` from a rule set, a sequence of rules, a TOML path or None (the default pack)."""
    if rules is None:
        return default_rules()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    seq = tuple(rules)
    for r in seq:
        if not isinstance(r, Rule):
            raise TypeError(f"expected Rule objects, got {type(r).__name__}")
        validate_rule(r)
    return RuleSet(seq)
