"""docs/metrics.md, generated from the registry (and the default alert rules). Never edit the file by hand:

    python -m rldiag.metrics.docs > docs/metrics.md

A test fails when the file is stale.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from rldiag.metrics.registry import (
    ANALYSES,
    BUCKET_KINDS,
    BUCKET_METRICS,
    FAMILY_ORDER,
    LENS_OBJECTIVES,
    LENS_QUANTITIES,
    PROB_BUCKET_METRICS,
    REGISTRY,
)
from rldiag.stats import hist
from rldiag.stats.bucket_kernel import PROB_EDGES, ROUTE_EDGES
from rldiag.stats.kernel import NONFINITE_INPUTS, STATS

_FAMILY_TITLES = {
    "ratio": "Ratio and trust region",
    "ess": "Effective sample size",
    "kl": "KL estimators (current vs old)",
    "clip": "Clipping (sign-aware)",
    "regime": "Regimes (DISPO)",
    "balance": "Positive/negative balance (BAPO)",
    "entropy": "Entropy and its driver",
    "adv": "Advantages",
    "group": "Prompt groups",
    "reward": "Rewards",
    "seq": "Sequence level",
    "tokens": "Counts",
    "mismatch": "Training-inference mismatch",
    "staleness": "Staleness",
    "removed": "What mismatch corrections remove",
    "moe": "MoE routing consistency",
    "stage": "Position and stage",
}
for _col in NONFINITE_INPUTS:  # an input with no family of its own: its `<input>/nonfinite` gets a section
    _FAMILY_TITLES.setdefault(_col, f"Non-finite inputs: {_col}")


def _bucket_tables() -> list[str]:
    """The bucket tables of ``Run.bucket_metrics`` (from token rows), from the code that defines them."""
    prob = ", ".join(f"{e:g}" for e in PROB_EDGES[1:])
    route = ", ".join(f"{e:g}" for e in ROUTE_EDGES)
    cols = ", ".join(f"`{m}`" for m in BUCKET_METRICS)
    pcols = ", ".join(f"`{m}`" for m in PROB_BUCKET_METRICS)
    lines = [
        "## Bucket tables (from token rows)",
        "",
        "`run.bucket_metrics(by=...)` (the dashboard's heatmaps; `by` is one of "
        + ", ".join(f"`{k}`" for k in BUCKET_KINDS)
        + ") gives one row per (step, bucket) with the token count `n` and each metric computed over the",
        "bucket's valid tokens with the same definition as the step metric of that name. `stage/ratio_mean_min`",
        "and `stage/ratio_std_spread` above summarize the position/stage table per step.",
        "",
        "| by | buckets | columns |",
        "|---|---|---|",
        f"| `pos` | deciles of the step's longest response (`buckets=`), or `width=` positions each | {cols} |",
        f"| `stage`, `turn` | the column's values | {cols} |",
        f"| `prob` | sampler probability `exp(rollout_logp)`: at most {PROB_EDGES[0]:g}, then up to each of {prob} "
        f"(edges in `bucket_lo`, `bucket_hi`) | {pcols}; `mismatch/absd_mean` is mean(abs(d)), "
        "`d = old_logp - rollout_logp` |",
        f"| `route` | `route_agree` in [a, b) for the edges {route}, and exactly 1 (edges in `bucket_lo`, "
        f"`bucket_hi`) | {cols} |",
        "",
        "The `prob` and `route` tables are empty for a run without `rollout_logp` or `route_agree`.",
        "",
    ]
    return lines


def _alert_defaults() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    try:
        text = resources.files("rldiag.alerts").joinpath("default_rules.toml").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return out
    rules: dict[str, Any] = tomllib.loads(text).get("rules", {})
    for name, rule in rules.items():
        conds = rule.get("conditions") or [rule]
        for c in conds:
            metric = c.get("metric")
            if not metric:
                continue
            kind = c.get("kind", "threshold")
            thr = c.get("threshold")
            if kind == "baseline":
                txt = f"{c.get('op')} {thr:g} x median of first {c.get('baseline_steps', 10)} steps"
            elif kind == "rolling":
                txt = f"{c.get('op')} {thr:g} x rolling median ({c.get('window', 20)} steps)"
            elif kind == "trend":
                if c.get("mode") == "net":
                    txt = f"{c.get('direction', 'rising')} (net) over {c.get('steps', 5)} steps"
                else:
                    txt = f"{c.get('direction', 'rising')} {c.get('steps', 5)} steps in a row"
            else:
                txt = f"{c.get('op')} {thr:g}" if thr is not None else str(c.get("op"))
            extra = []
            if c.get("for"):
                extra.append(f"for {c['for']}")
            if c.get("k_of_n"):
                extra.append(f"{c['k_of_n'][0]} of {c['k_of_n'][1]} steps")
            sev = rule.get("severity", "warn")
            out.setdefault(metric, []).append(f"{txt}{' (' + ', '.join(extra) + ')' if extra else ''}: {sev} `{name}`")
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The whole of docs/metrics.md."""
    alerts = _alert_defaults()
    lines = [
        "# Metrics",
        "",
        "<!-- generated by `python -m rldiag.metrics.docs > docs/metrics.md` from rldiag/metrics/registry.py; "
        "do not edit -->",
        "",
        "Every metric rldiag computes per step, with its public name (the API: CLI, dashboard, alerts and",
        "`run.step_metrics()` columns use exactly these strings), its formula, the inputs it needs, its source and",
        "its default alert. Notation: `lr = logp - old_logp`, `r = exp(lr)`; means are token means over the valid",
        "tokens of the whole step (all ranks, all micro-batches). Each metric is finalized from sufficient",
        "statistics that merge exactly (docs/run-format.md), never from averages of averages.",
        "",
        "**derived** marks a formula that was reconstructed rather than read from the cited paper.",
        "",
        "## Quantiles",
        "",
        f"Quantiles come from fixed log-spaced histograms ({hist.BINS_PER_OCTAVE} bins per octave of |x| between",
        f"2^{hist.MIN_EXP} and 2^{hist.MAX_EXP}, mirrored for negative values), which merge by adding counts. The",
        "reported value is the geometric midpoint of the bin holding the exact inverted-CDF quantile, so it lies",
        f"within a factor 2^(1/16) (+-{hist.RELATIVE_ERROR:.2%}) of the exact quantile for |x| in that range; tests",
        "check this bound against numpy on heavy-tailed samples. The Hill tail index reads its order statistics",
        "from the same histogram (values spread evenly within a bin) and stays within 5% of the exact estimator",
        "in the tests.",
        "",
    ]
    for fam in FAMILY_ORDER:
        specs = [s for s in REGISTRY.values() if s.family == fam]
        lines += [
            f"## {_FAMILY_TITLES.get(fam, fam)}",
            "",
            "| name | formula | inputs | source | alert default | better |",
            "|---|---|---|---|---|---|",
        ]
        for s in specs:
            formula = _md(s.formula) + (" **derived**" if s.derived else "")
            inputs = ", ".join(f"`{i}`" for i in s.inputs)
            alert = "; ".join(_md(a) for a in alerts.get(s.name, [])) or "-"
            better = {"lower": "lower", "higher": "higher", "neutral": "-"}[s.direction]
            lines.append(f"| `{s.name}` | {formula} | {inputs} | {_md(s.source) or '-'} | {alert} | {better} |")
        lines.append("")
        for s in specs:
            lines.append(f"- `{s.name}`: {s.doc}" + (f" Error bound: {s.error_bound}." if s.error_bound else ""))
        lines.append("")
    lines += [
        "## Advanced analytics (from token rows)",
        "",
        "Computed on demand from the token rows rather than from the stored statistics (the call is in the",
        "last column); see [lens.md](lens.md), [cliff.md](cliff.md) and [law.md](law.md). The objective lens",
        f"reports {', '.join('`' + q + '`' for q in LENS_QUANTITIES)} for every objective "
        f"({', '.join('`' + o + '`' for o in LENS_OBJECTIVES)}): `lens/<objective>/<quantity>`.",
        "",
        "| name | formula | source | alert default | better | computed by |",
        "|---|---|---|---|---|---|",
    ]
    shown_lens: set[str] = set()
    for s in ANALYSES.values():
        parts = s.name.split("/")
        if parts[0] == "lens":  # one row per lens quantity, not per objective
            q = parts[2]
            if q in LENS_QUANTITIES:
                if q in shown_lens:
                    continue
                shown_lens.add(q)
                name = f"lens/<objective>/{q}"
            else:
                name = s.name
        else:
            name = s.name
        formula = _md(s.formula) + (" **derived**" if s.derived else "")
        alert = "; ".join(_md(a) for a in alerts.get(s.name, [])) or "-"
        better = {"lower": "lower", "higher": "higher", "neutral": "-"}[s.direction]
        src = "-" if name.startswith("lens/<") else (_md(s.source) or "-")
        lines.append(f"| `{name}` | {formula} | {src} | {alert} | {better} | `{s.computed_by}` |")
    lines.append("")
    lines += _bucket_tables()
    lines += [
        "## Sufficient statistics",
        "",
        "Stored per (step, rank, micro) in `stats/*.parquet`; `config` marks those that depend on the clip",
        "settings (recomputed from token rows by `run.step_metrics(config=...)`).",
        "",
        "| statistic | merge | meaning |",
        "|---|---|---|",
    ]
    for st in STATS.values():
        lines.append(f"| `{st.name}` | {st.merge}{' (config)' if st.config_dependent else ''} | {_md(st.doc)} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
