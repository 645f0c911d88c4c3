"""The token explorer's selection: one step's token rows in, the worst tokens with their context out.

Pure polars/numpy on a single step (tens of thousands of rows), no I/O: :meth:`app.data.RunState.tokens_at`
reads the step, :mod:`app.pages.tokens` renders what this returns. Three rankings, as the issue asks:

* ``logratio``: largest |logp - old_logp| (the tokens that moved the most since sampling);
* ``entropy``: lowest entropy (near-deterministic positions, where collapse starts);
* ``cov``: largest covariance contribution ``(adv - mean adv)(logp - mean logp)`` (the tokens Clip-Cov and
  KL-Cov would clip: they drive the entropy down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from rldiag import schema

RANKINGS: dict[str, str] = {
    "logratio": "largest |log-ratio|",
    "entropy": "lowest entropy",
    "cov": "largest covariance contribution",
}
CONTEXT = 12
"""Tokens shown on each side of the selected one."""


@dataclass
class ContextToken:
    pos: int
    token_id: int | None
    logratio: float
    entropy: float
    selected: bool
    text: str = ""


@dataclass
class TokenPick:
    """One selected token: its score, its keys and values, and its sequence context."""

    score: float
    seq: int
    rank: int
    micro: int
    pos: int
    token_id: int | None
    logratio: float
    entropy: float
    adv: float
    cov: float
    context: list[ContextToken] = field(default_factory=list)
    text: str = ""


def _col(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _ints(frame: pl.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.zeros(frame.height, dtype=np.int64)
    return frame[name].fill_null(-1).cast(pl.Int64).to_numpy()


def available(frame: pl.DataFrame) -> dict[str, bool]:
    """Which rankings the step's rows support (entropy and cov are optional columns)."""
    has = {
        "logratio": frame.height > 0,
        "entropy": schema.ENTROPY in frame.columns and bool(frame[schema.ENTROPY].is_not_null().any()),
        "cov": schema.COV in frame.columns and bool(frame[schema.COV].is_not_null().any()),
    }
    return has


def pick(frame: pl.DataFrame, ranking: str, *, k: int = 10, context: int = CONTEXT) -> list[TokenPick]:
    """The ``k`` worst tokens of one step under ``ranking``, each with ``context`` tokens either side."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    if frame.height == 0:
        return []
    logp, old = _col(frame, schema.LOGP), _col(frame, schema.OLD_LOGP)
    lr = logp - old
    ent = _col(frame, schema.ENTROPY)
    cov = _col(frame, schema.COV)
    if ranking == "logratio":
        score, order_key = np.abs(lr), -np.abs(lr)
    elif ranking == "entropy":
        score, order_key = ent, ent
    else:
        score, order_key = cov, -cov
    valid = np.flatnonzero(np.isfinite(order_key))
    if valid.size == 0:
        return []
    k = min(k, valid.size)
    top = valid[np.argpartition(order_key[valid], k - 1)[:k]]
    top = top[np.argsort(order_key[top], kind="stable")]

    seq, rank, micro, pos = (_ints(frame, c) for c in (schema.SEQ, schema.RANK, schema.MICRO, schema.POS))
    tok = frame[schema.TOKEN_ID].to_numpy() if schema.TOKEN_ID in frame.columns else None
    adv = _col(frame, schema.ADV)
    # Rows of each sequence, sorted by position, for the context windows.
    _, key = np.unique(np.stack([rank, micro, seq], axis=1), axis=0, return_inverse=True)
    key = key.reshape(-1)
    order = np.lexsort((pos, key))
    sorted_key = key[order]

    picks = []
    for i in top:
        lo, hi = np.searchsorted(sorted_key, key[i], "left"), np.searchsorted(sorted_key, key[i], "right")
        rows = order[lo:hi]
        at = int(np.flatnonzero(rows == i)[0])
        window = rows[max(at - context, 0) : at + context + 1]
        ctx = [
            ContextToken(
                pos=int(pos[j]),
                token_id=_tok(tok, j),
                logratio=float(lr[j]),
                entropy=float(ent[j]),
                selected=bool(j == i),
            )
            for j in window
        ]
        picks.append(
            TokenPick(
                score=float(score[i]),
                seq=int(seq[i]),
                rank=int(rank[i]),
                micro=int(micro[i]),
                pos=int(pos[i]),
                token_id=_tok(tok, i),
                logratio=float(lr[i]),
                entropy=float(ent[i]),
                adv=float(adv[i]),
                cov=float(cov[i]),
                context=ctx,
            )
        )
    return picks


def _tok(tok: np.ndarray | None, j: int) -> int | None:
    if tok is None:
        return None
    v = tok[j]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)


def decode(picks: list[TokenPick], decoder: Any) -> list[TokenPick]:
    """Fill ``text`` of every pick and context token through ``decoder.decode(ids)`` (one batched call)."""
    ids = [p.token_id for p in picks] + [c.token_id for p in picks for c in p.context]
    texts = iter(decoder.decode(ids))
    for p in picks:
        p.text = next(texts)
    for p in picks:
        for c in p.context:
            c.text = next(texts)
    return picks


def summary(frame: pl.DataFrame) -> dict[str, float]:
    """Counts of the step shown above the tables."""
    lr = _col(frame, schema.LOGP) - _col(frame, schema.OLD_LOGP)
    seqs = (
        frame.select(
            pl.struct([c for c in (schema.RANK, schema.MICRO, schema.SEQ) if c in frame.columns]).n_unique()
        ).item()
        if frame.height
        else 0
    )
    return {
        "tokens": float(frame.height),
        "sequences": float(seqs),
        "max_abs_logratio": float(np.nanmax(np.abs(lr))) if frame.height and np.isfinite(lr).any() else float("nan"),
    }
