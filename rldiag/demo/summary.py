"""A few lines on what happened in a demo run, read back from the run directory like any other run.

Example::

    print(summarize("runs/demo"))
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from rldiag.demo.config import INFO_FILE

COLLAPSE_FRACTION = 0.3
"""Entropy below this share of its median over the first 10 steps counts as collapsed (the alert rule's)."""
COLLAPSE_FOR = 3
"""... for this many steps in a row."""


def facts(run_dir: str | Path) -> dict[str, Any]:
    """The numbers the summary prints (also used by the tests): phases, entropy, clipping, tails, alerts."""
    import numpy as np

    import rldiag
    from rldiag.alerts.engine import read_history

    run_dir = Path(run_dir)
    run = rldiag.open_run(run_dir)
    m = run.step_metrics(
        metrics=[
            "reward/mean",
            "entropy/mean",
            "clip/region",
            "ratio/max",
            "ratio/logabs_p999",
            "kl/k3",
            "group/nonzero_frac",
        ]
    )
    if m.height == 0:
        raise ValueError(f"{run_dir} holds no recorded steps")
    info_path = run_dir / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    change = info.get("regime_change_step")
    steps = m["step"].to_numpy()
    col = {c: m[c].to_numpy() for c in m.columns}
    ent = col["entropy/mean"]
    baseline = float(np.nanmedian(ent[:10]))
    low = ent < COLLAPSE_FRACTION * baseline
    collapsed_at = None
    for i in range(len(low) - COLLAPSE_FOR + 1):
        if low[i : i + COLLAPSE_FOR].all():
            collapsed_at = int(steps[i])
            break
    healthy = steps <= change if change else np.ones_like(steps, dtype=bool)
    after = ~healthy

    def stat(name: str, where: Any, fn: Any) -> float:
        v = col[name][where]
        v = v[np.isfinite(v)]
        return float(fn(v)) if v.size else math.nan

    def argmax_step(name: str, where: Any) -> int | None:
        v = np.where(where & np.isfinite(col[name]), col[name], -np.inf)
        return int(steps[int(np.argmax(v))]) if np.isfinite(v).any() else None

    alerts = [e for e in read_history(run_dir / "alerts.jsonl") if e.get("event") == "firing"]
    first_alert: dict[str, int] = {}
    for e in alerts:
        first_alert.setdefault(str(e["rule"]), int(e["step"]))
    return {
        "steps": int(len(steps)),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "regime_change_step": change,
        "entropy_start": baseline,
        "entropy_end": float(ent[-1]),
        "entropy_at_change": float(ent[steps == change][0]) if change and (steps == change).any() else math.nan,
        "entropy_collapsed_at": collapsed_at,
        "reward_start": stat("reward/mean", slice(0, 10), np.mean),
        "reward_healthy_end": stat("reward/mean", np.flatnonzero(healthy)[-10:], np.mean),
        "reward_end": stat("reward/mean", slice(-20, None), np.mean),
        "clip_healthy_mean": stat("clip/region", healthy, np.mean),
        "clip_max": stat("clip/region", slice(None), np.max),
        "clip_max_step": argmax_step("clip/region", np.ones_like(healthy)),
        "logabs_p999_healthy_max": stat("ratio/logabs_p999", healthy, np.max),
        "logabs_p999_max": stat("ratio/logabs_p999", after, np.max) if after.any() else math.nan,
        "ratio_max": stat("ratio/max", slice(None), np.max),
        "ratio_max_step": argmax_step("ratio/max", np.ones_like(healthy)),
        "kl_k3_max": stat("kl/k3", slice(None), np.max),
        "live_groups_end": stat("group/nonzero_frac", slice(-10, None), np.mean),
        "alerts_firing": dict(Counter(str(e["rule"]) for e in alerts)),
        "alerts_first_step": first_alert,
        "train_seconds": info.get("train_seconds"),
    }


def summarize(run_dir: str | Path) -> str:
    """A short plain-text account of a demo run (or any run with entropy and ratio statistics)."""
    f = facts(run_dir)
    lines = [f"rldiag demo run: {run_dir}"]
    secs = f" in {f['train_seconds']:.0f} s" if f.get("train_seconds") is not None else ""
    lines.append(f"  steps        {f['first_step']}..{f['last_step']} ({f['steps']} recorded){secs}")
    if f["regime_change_step"]:
        lines.append(
            f"  regime       healthy until step {f['regime_change_step']}, then a higher learning rate "
            "and stale rollouts reused many times"
        )
    else:
        lines.append("  regime       healthy throughout (no change of regime)")
    lines.append(
        f"  reward       {f['reward_start']:.2f} (first 10 steps) -> {f['reward_healthy_end']:.2f} "
        f"(last 10 healthy steps) -> {f['reward_end']:.2f} (last 20 steps)"
    )
    collapse = (
        f"collapsed at step {f['entropy_collapsed_at']} (below {COLLAPSE_FRACTION:.0%} of the start "
        f"for {COLLAPSE_FOR} steps)"
        if f["entropy_collapsed_at"] is not None
        else "no collapse"
    )
    lines.append(
        f"  entropy      {f['entropy_start']:.2f} nats at the start, {f['entropy_end']:.3f} at the end: {collapse}"
    )
    lines.append(
        f"  clipping     {f['clip_healthy_mean']:.2%} of tokens per step while healthy; peak "
        f"{f['clip_max']:.1%} at step {f['clip_max_step']}"
    )
    tail = f"  ratio tail   |log r| p99.9 up to {f['logabs_p999_healthy_max']:.2f} while healthy"
    if f["regime_change_step"]:
        tail += f", {f['logabs_p999_max']:.2f} after the change (ln 10 = 2.30)"
    lines.append(tail + f"; largest ratio {f['ratio_max']:.3g} at step {f['ratio_max_step']}")
    lines.append(f"  groups       {f['live_groups_end']:.0%} of prompt groups still carry a gradient (last 10 steps)")
    if f["alerts_firing"]:
        parts = [
            f"{rule} (step {f['alerts_first_step'][rule]})"
            for rule in sorted(f["alerts_first_step"], key=lambda r: f["alerts_first_step"][r])
        ]
        lines.append("  alerts       " + ", ".join(parts))
    else:
        lines.append("  alerts       none fired")
    return "\n".join(lines)
