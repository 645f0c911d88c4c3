"""Mismatch & staleness: training-inference log-prob mismatch and policy staleness, when recorded."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from app import buckets, data, panels
from app import layout as ui

dash.register_page(__name__, path="/mismatch", name="Mismatch & staleness", title="rldiag · Mismatch", order=5)

PAGE = "mismatch"
VIEW = buckets.MISMATCH
buckets.register(VIEW)
NEEDS = {
    "mismatch": "rollout_logp (the inference engine's log-probs)",
    "staleness": "version (the policy version that generated each token)",
}


def has_data(run_id: str, family: str) -> bool:
    """True when any metric of ``family`` has a finite value in the run."""
    specs = panels.families().get(family, [])
    frame = data.catalog().state(run_id).metrics(s.name for s in specs)
    for spec in specs:
        if spec.name in frame.columns and bool(frame[spec.name].is_finite().any()):
            return True
    return False


def layout(run: Any = None, **_query: Any) -> html.Div:
    runs, error = ui.resolve_runs(run)
    children: list[Any] = [
        ui.run_header(
            "Mismatch & staleness",
            runs,
            error=error,
            intro="logp - rollout_logp = (old_logp - rollout_logp) + (logp - old_logp): the engine/trainer "
            "discrepancy times the staleness. This page shows the first factor and the policy lag.",
        )
    ]
    if not runs:
        return html.Div(children)
    by_family: dict[str, list[panels.Panel]] = {}
    for p in panels.page_panels(PAGE):
        by_family.setdefault(p.family, []).append(p)
    for fam, ps in by_family.items():
        missing = [r for r in runs if not has_data(r, fam)]
        if len(missing) == len(runs):
            children.append(
                ui.section(
                    fam,
                    ui.notice(f"{', '.join(runs)}: no {fam} data — record {NEEDS.get(fam, 'its inputs')} to see it."),
                )
            )
            continue
        note = f"no {fam} data in: {', '.join(missing)}" if missing else None
        children.append(ui.section(fam, ui.panel_grid(PAGE, ps), note=note))
    children.append(
        ui.section(
            "by rollout probability and routing agreement",
            VIEW.layout(runs),
            note="Step x bucket tables of Run.bucket_metrics: by the rollout engine's token probability "
            "(by='prob': where in the distribution the trainer and the engine disagree) and by the share of "
            "a token's experts both routed alike (by='route', mixture-of-experts runs). One heatmap per run; "
            "drag to zoom, click a cell for that step's tokens.",
        )
    )
    return html.Div(children)
