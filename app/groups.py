"""Runs as rows with attributes (config, tags), filters and groups over them, and a group's band figure.

A run's *attributes* come from its manifest: the recorder config (``config.eps_high``), the world size, and
tags when the manifest has them (``"tags": {"lr": 3e-6, "seed": 1}`` or ``"tags": ["baseline", ...]``). The
Runs page shows them as columns, filters with ``key=value`` terms, and groups runs by one attribute, or by the
run name with its seed removed (``lr3e-6_seed2`` -> ``lr3e-6``), which is how seed sweeps are usually named.
:func:`band_figure` draws, per group, the mean over its runs of one metric with the min/max band around it.

Pure functions of dicts and frames; :mod:`app.pages.runs` reads the manifests and metrics through
:mod:`app.data`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl

from app import data
from app.downsample import DEFAULT_BUCKETS
from app.figures import PALETTE, empty_figure, line_mode
from app.security import plot_text

NAME_GROUP = "name without seed"
"""Group-by choice: the run id with a trailing seed (``seed3``, ``s3``, ``-3``) removed."""
MAX_GROUPS = 10
"""Most groups one band figure draws (the largest ones)."""
MAX_VALUE_CHARS = 80
_SEED = re.compile(r"([-_/.]?(seed|s)[-_=]?\d+|[-_]\d+)$", re.IGNORECASE)
_TERM = re.compile(r"^([^=<>!]+?)(=|!=)(.*)$")


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v if not isinstance(v, str) else v[:MAX_VALUE_CHARS]
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(str(_scalar(x)) for x in v[:8])[:MAX_VALUE_CHARS]
    return str(v)[:MAX_VALUE_CHARS]


def attributes(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{name: scalar}`` of a run manifest: ``world_size``, ``config.*`` and ``tags.*`` (or ``tags``)."""
    out: dict[str, Any] = {}
    if isinstance(manifest.get("world_size"), int):
        out["world_size"] = manifest["world_size"]
    for section in ("config", "tags", "params"):
        value = manifest.get(section)
        if isinstance(value, Mapping):
            for k, v in list(value.items())[:200]:
                out[f"{section}.{str(k)[:MAX_VALUE_CHARS]}"] = _scalar(v)
        elif section == "tags" and isinstance(value, (list, tuple)):
            out["tags"] = _scalar(sorted(str(v) for v in value))
    return out


def varying(attrs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Attribute names whose value differs between runs (tags always count), sorted."""
    keys = sorted({k for a in attrs.values() for k in a})
    out = []
    for k in keys:
        values = {repr(a.get(k)) for a in attrs.values()}
        if len(values) > 1 or k.startswith(("tags", "params")):
            out.append(k)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt(v: Any) -> str:
    """An attribute value as a table cell."""
    return _fmt(v)


def matches(run_id: str, attrs: Mapping[str, Any], query: str | None) -> bool:
    """Every whitespace-separated term of ``query`` holds: ``key=value`` / ``key!=value`` on an attribute
    (``key`` matches the full name or its last part, ``value`` may be a glob), else a glob or substring of the
    run id (case-insensitive)."""
    for term in (query or "").split():
        m = _TERM.match(term)
        if m:
            key, op, want = m.group(1).lower(), m.group(2), m.group(3).lower()
            hits = [v for k, v in attrs.items() if k.lower() == key or k.lower().rsplit(".", 1)[-1] == key]
            ok = any(_like(_fmt(v).lower(), want) or _same_number(v, want) for v in hits)
            if ok == (op == "!="):
                return False
            continue
        t, rid = term.lower(), run_id.lower()
        if not (fnmatch.fnmatchcase(rid, t) if any(c in t for c in "*?[") else t in rid):
            return False
    return True


def _like(text: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(text, pattern) if any(c in pattern for c in "*?[") else text == pattern


def _same_number(v: Any, want: str) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(want) == float(v)
    except ValueError:
        return False


def group_of(run_id: str, attrs: Mapping[str, Any], by: str | None) -> str:
    """The group label of a run under ``by`` (an attribute name or :data:`NAME_GROUP`)."""
    if not by:
        return ""
    if by == NAME_GROUP:
        stripped = _SEED.sub("", run_id)
        return stripped or run_id
    return f"{by}={_fmt(attrs.get(by))}"


def group_runs(run_ids: Sequence[str], attrs: Mapping[str, Mapping[str, Any]], by: str | None) -> dict[str, list[str]]:
    """Group label -> its runs (in the given order); one group ``""`` without ``by``."""
    out: dict[str, list[str]] = {}
    for r in run_ids:
        out.setdefault(group_of(r, attrs.get(r, {}), by), []).append(r)
    return out


# --- the band ---------------------------------------------------------------------------------------------
def band(
    frames: Mapping[str, pl.DataFrame], metric: str, *, buckets: int = DEFAULT_BUCKETS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max, runs counted) of ``metric`` over the runs of ``frames``, aligned on step.

    At each step the mean, min and max are over the runs that have a finite value there. Long runs are cut
    into at most ``buckets`` equal-width step buckets: the mean of the per-step means, the min of the mins
    and the max of the maxes, so one run's spike stays inside the band.
    """
    cols = []
    for i, f in enumerate(frames.values()):
        if metric in f.columns and f.height:
            cols.append(f.select(pl.col("step"), pl.col(metric).cast(pl.Float64).alias(f"r{i}")))
    if not cols:
        z = np.zeros(0)
        return z, z, z, z, z
    wide = cols[0]
    for c in cols[1:]:
        wide = wide.join(c, on="step", how="full", coalesce=True)
    wide = wide.sort("step")
    steps = wide["step"].to_numpy().astype(np.float64)
    values = wide.drop("step").fill_nan(None).to_numpy().astype(np.float64)  # nulls -> NaN
    finite = np.isfinite(values)
    count = finite.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(finite, values, 0.0).sum(axis=1)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        lo = np.where(count > 0, np.where(finite, values, np.inf).min(axis=1), np.nan)
        hi = np.where(count > 0, np.where(finite, values, -np.inf).max(axis=1), np.nan)
    if len(steps) <= buckets:
        return steps, mean, lo, hi, count
    width = (steps[-1] - steps[0]) / buckets or 1.0
    ids = np.minimum(((steps - steps[0]) / width).astype(np.int64), buckets - 1)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ok = np.isfinite(mean)
    n = np.add.reduceat(ok.astype(np.float64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.add.reduceat(np.where(ok, mean, 0.0), starts) / n
        b_lo = np.minimum.reduceat(np.where(ok, lo, np.inf), starts)
        b_hi = np.maximum.reduceat(np.where(ok, hi, -np.inf), starts)
    empty = n == 0
    m[empty], b_lo[empty], b_hi[empty] = np.nan, np.nan, np.nan
    return steps[starts], m, b_lo, b_hi, np.maximum.reduceat(count, starts)


def has_values(frame: pl.DataFrame, metric: str) -> bool:
    """Whether ``frame`` has a finite value of ``metric``."""
    return metric in frame.columns and bool(frame[metric].cast(pl.Float64).is_finite().any())


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def band_figure(groups: Mapping[str, Mapping[str, pl.DataFrame]], metric: str, *, height: int = 360) -> go.Figure:
    """Per group: the min/max band of ``metric`` over its runs (shaded) and their mean (a line)."""
    traces: list[go.Scatter] = []
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:MAX_GROUPS]
    for i, (label, frames) in enumerate(ranked):
        x, mean, lo, hi, count = band(frames, metric)
        if not len(x) or not np.isfinite(mean).any():
            continue
        color = PALETTE[i % len(PALETTE)]
        shown = plot_text(label or "all runs")
        name = f"{shown} ({len(frames)} run{'s' if len(frames) != 1 else ''})"
        traces.append(
            go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0, color=color), hoverinfo="skip", showlegend=False)
        )
        traces.append(
            go.Scatter(
                x=x,
                y=hi,
                mode="lines",
                fill="tonexty",
                fillcolor=_rgba(color, 0.18),
                line=dict(width=0, color=color),
                hoverinfo="skip",
                showlegend=False,
            )
        )
        traces.append(
            go.Scatter(
                x=x,
                y=mean,
                customdata=np.stack([lo, hi, count], axis=1),
                mode=line_mode(mean),
                name=name,
                line=dict(width=2, color=color),
                hovertemplate="step %{x}<br>mean %{y:.4g}<br>min %{customdata[0]:.4g} · max %{customdata[1]:.4g}"
                "<br>runs %{customdata[2]}",
            )
        )
    if not traces:
        return empty_figure(f"no {metric} data in these runs", height=height)
    fig = go.Figure(traces)
    fig.update_layout(
        title=dict(text=f"{metric}: mean over each group's runs, min/max band", x=0.01, font=dict(size=13)),
        height=height,
        margin=dict(l=55, r=15, t=40, b=30),
        paper_bgcolor="white",
        plot_bgcolor="white",
        hovermode="closest",
        legend=dict(orientation="h", y=-0.15),
        xaxis=dict(title="step", gridcolor="#ebeef2"),
        yaxis=dict(title=metric, gridcolor="#ebeef2"),
    )
    return fig


def frames_of(run_ids: Sequence[str], metric: str) -> dict[str, pl.DataFrame]:
    """Cached step metrics (``metric`` at least) of runs (those that fail to open are left out)."""
    cat = data.catalog()
    out = {}
    for r in run_ids:
        try:
            out[r] = cat.state(r).metrics([metric])
        except Exception:  # an unreadable run is named on the Runs table; the band leaves it out
            continue
    return out
