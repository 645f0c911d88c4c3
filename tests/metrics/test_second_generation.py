"""The second-generation diagnostics (docs/metrics.md: mismatch/*, removed/*, moe/*) against independent numpy
references (tests/metrics/reference.py), exact over micro-batch splits, ranks and files, with their config
fields (icepop_band, geo_bounds, correct_reward, lowprob) and the ``route_agree`` input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

import rldiag
from rldiag import schema
from rldiag.config import RecorderConfig
from rldiag.metrics import aggregate
from rldiag.metrics.registry import REGISTRY
from rldiag.record.tensors import HostSnapshot
from rldiag.record.writer import Job, build_batch
from rldiag.stats import hist, kernel
from rldiag.stats.table import to_table
from tests.metrics.reference import (
    HIST_METRICS,
    SECOND_GEN_LNW,
    _flat,
    make_record,
    reference_metrics,
    reference_second_generation,
)
from tests.metrics.test_registry import CFG, _check, _stats_table

SECOND_GEN = [n for n in REGISTRY if n.split("/")[0] in ("removed", "moe")] + [
    "mismatch/extreme_frac",
    "mismatch/mult_err",
    "mismatch/kl_ent_ratio",
    "mismatch/ratio_p01",
    "mismatch/ratio_p99",
    "mismatch/icepop_frac",
    "mismatch/seq_logratio_absmax",
    "mismatch/seq_logratio_p99",
    "mismatch/geo_mask_frac",
    "mismatch/seq_mult_err_max",
    "mismatch/lowprob_k3_share",
]


def _records(rng: np.random.Generator, n: int = 3, B: int = 12, T: int = 40) -> list[dict]:
    return [make_record(rng, B, T, group_offset=100 * i, heavy_mismatch=True) for i in range(n)]


def test_every_name_of_the_spec_is_registered() -> None:
    assert len(SECOND_GEN) == 11 + 12 + 3
    assert {
        f"removed/{c}/{q}" for c in ("tis", "mis", "icepop", "geo") for q in ("adv_mass", "pos_share", "correct_frac")
    } <= set(REGISTRY)
    for name in ("mismatch/tis_frac", "mismatch/mis_frac"):
        assert name in REGISTRY


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_second_generation_metrics_match_numpy(seed: int, tmp_path) -> None:
    """Recorded through the Recorder (several micro-batches per step), read back: each equals its reference,
    and the data is such that every metric is defined (not NaN) in some step, so no comparison is vacuous."""
    rng = np.random.default_rng(seed)
    steps = {}
    with rldiag.Recorder(tmp_path / "run", config=CFG) as rec:
        for step in range(3):
            records = _records(rng)
            for r in records:
                rec.record(step=step, **r)
            steps[step] = records
    df = rldiag.open_run(tmp_path / "run").step_metrics()
    defined: set[str] = set()
    for step, records in steps.items():
        got = df.filter(df["step"] == step).row(0, named=True)
        _check(got, reference_metrics(records, step), SECOND_GEN)
        defined |= {n for n in SECOND_GEN if not math.isnan(got[n])}
    assert defined == set(SECOND_GEN)


def test_split_over_micro_batches_ranks_and_files_is_exact() -> None:
    """One batch as one record, as micro-batches, and as micro-batches on several ranks merged from separate
    tables (files) in any order: the same metrics (sequence-level ones included: a sequence never spans records)."""
    rng = np.random.default_rng(7)
    rec = make_record(rng, 24, 30, heavy_mismatch=True, nan_frac=0.02)
    want = aggregate.finalize(aggregate.merge(_stats_table([rec], 0))).row(0, named=True)
    for cuts in ([5, 11, 17], [1, 2, 23], [12]):
        bounds = [0, *cuts, 24]
        pieces = [{k: v[a:b] for k, v in rec.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        tables = [_stats_table([p], 0, rank=i % 3, micro0=i) for i, p in enumerate(pieces)]
        for order in (tables, tables[::-1]):
            got = aggregate.finalize(aggregate.merge(pa.concat_tables(order))).row(0, named=True)
            compacted = aggregate.finalize(aggregate.merge(aggregate.compact(pa.concat_tables(order)))).row(
                0, named=True
            )
            for name in SECOND_GEN:
                for g in (got[name], compacted[name]):
                    w = want[name]
                    assert (math.isnan(w) and math.isnan(g)) or g == pytest.approx(w, rel=1e-9, abs=1e-12), name
    ref = reference_metrics([rec])
    _check(want, ref, SECOND_GEN)


def _kernel_metrics(records: list[dict], cfg: RecorderConfig) -> dict[str, float]:
    tables = []
    for i, rec in enumerate(records):
        B, T = rec["logprobs"].shape
        names = {
            "logprobs": "logp",
            "old_logprobs": "old_logp",
            "advantages": "adv",
            "rollout_logprobs": "rollout_logp",
        }
        names |= {"mask": "mask", "entropy": "entropy", "rewards": "reward", "route_agree": "route_agree"}
        snaps = {names[k]: HostSnapshot(v, float_cast=True) for k, v in rec.items() if k in names}
        tb, _, _ = build_batch(Job(step=0, micro=i, shape=(B, T), inputs=snaps), 0)
        tables.append(to_table(kernel.compute(tb, cfg), np.array([0]), np.array([0]), np.array([i])))
    return aggregate.finalize(aggregate.merge(pa.concat_tables(tables))).row(0, named=True)


def test_config_fields_change_exactly_what_they_should() -> None:
    """Other bands, bounds, threshold of correctness and of low probability: the reference with the same
    settings agrees, and each setting changed its metrics."""
    rng = np.random.default_rng(3)
    records = _records(rng, n=2)
    base = RecorderConfig(eps_low=0.2, eps_high=0.28)
    other = base.replace(icepop_band=(0.8, 1.25), geo_bounds=(0.9, 1.1), correct_reward=0.5, lowprob=0.5, tis_cap=1.5)
    got_base, got = _kernel_metrics(records, base), _kernel_metrics(records, other)
    ref = reference_second_generation(
        _flat(records), cap=1.5, icepop=(0.8, 1.25), geo=(0.9, 1.1), correct=0.5, lowprob=0.5
    )
    for name in SECOND_GEN:
        if name in HIST_METRICS:
            continue
        e = ref[name]
        assert (math.isnan(e) and math.isnan(got[name])) or got[name] == pytest.approx(e, rel=1e-6, abs=1e-9), name
    for name in (
        "mismatch/icepop_frac",
        "mismatch/geo_mask_frac",
        "mismatch/lowprob_k3_share",
        "removed/tis/adv_mass",
        "removed/icepop/adv_mass",
        "removed/geo/correct_frac",
    ):
        assert got[name] != got_base[name], name


def test_ratio_quantiles_hold_their_stated_bound_on_heavy_tails() -> None:
    rng = np.random.default_rng(11)
    records = [make_record(rng, 32, 64, heavy_mismatch=True) for _ in range(2)]
    got = _kernel_metrics(records, CFG)
    ref = reference_metrics(records)
    for name in SECOND_GEN_LNW:
        e, g = ref[f"_exact/{name}"], got[name]
        assert abs(math.log(g) / math.log(e) - 1) <= hist.RELATIVE_ERROR + 1e-12, (name, g, e)
    e, g = ref["_exact/mismatch/seq_logratio_p99"], got["mismatch/seq_logratio_p99"]
    assert abs(g / e - 1) <= hist.RELATIVE_ERROR + 1e-12


def test_absent_inputs_leave_their_metrics_undefined(tmp_path) -> None:
    rng = np.random.default_rng(0)
    r = make_record(rng, 8, 16, extras=False)
    with rldiag.Recorder(tmp_path / "run", config=CFG) as rec:
        rec.record(step=0, **r)
    row = rldiag.open_run(tmp_path / "run").step_metrics().row(0, named=True)
    for name in SECOND_GEN:
        assert math.isnan(row[name]), name


def test_route_agree_is_a_token_column_and_is_validated(tmp_path) -> None:
    rng = np.random.default_rng(1)
    r = make_record(rng, 6, 10, heavy_mismatch=True)
    assert schema.TOKEN_DTYPES[schema.ROUTE_AGREE] == pa.float32()
    with rldiag.Recorder(tmp_path / "ok", config=CFG) as rec:
        rec.record(step=0, **r)
        no_route = {k: v for k, v in r.items() if k != "route_agree"}
        rec.record(step=1, **no_route)
    tokens = rldiag.open_run(tmp_path / "ok").tokens().collect()
    col = tokens.filter(tokens["step"] == 0)[schema.ROUTE_AGREE]
    mask = r["mask"]
    np.testing.assert_array_equal(col.to_numpy(), r["route_agree"][mask])
    assert tokens.filter(tokens["step"] == 1)[schema.ROUTE_AGREE].null_count() == int(mask.sum())

    bad = dict(r)
    bad["route_agree"] = r["route_agree"].copy()
    bad["mask"] = np.ones_like(r["mask"])
    bad["route_agree"][0, 0] = 1.5
    bad["route_agree"][1, 1] = np.nan
    with rldiag.Recorder(tmp_path / "strict", config=CFG) as rec:
        with pytest.raises(ValueError, match=r"^route_agree has 2 masked-in values .* \[0, 1\]"):
            rec.record(step=0, **bad)
        with pytest.raises(ValueError, match="route_agree has shape"):
            rec.record(step=0, **{**r, "route_agree": r["route_agree"][:, :3]})
    with pytest.warns(RuntimeWarning, match="route_agree"):
        with rldiag.Recorder(tmp_path / "lenient", config=CFG.replace(errors="lenient")) as rec:
            rec.record(step=0, **bad)
            stats = rec.stats
    assert stats["invalid_values"]["route_agree"] == 2
    row = rldiag.open_run(tmp_path / "lenient").step_metrics().row(0, named=True)
    ra = bad["route_agree"][bad["mask"]]
    kept = ra[(ra >= 0) & (ra <= 1)]
    assert row["moe/route_agree_mean"] == pytest.approx(kept.mean(), rel=1e-6)
