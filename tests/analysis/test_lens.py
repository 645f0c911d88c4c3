"""Objective lens against independent per-token numpy references and hand-computed batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from rldiag.analysis import lens as L

NAN = float("nan")


# --- an independent reference: per token, one objective at a time, straight from metrics-spec section 3 --------


def _quantities(kept, w, adv, valid=None):
    kept = np.asarray(kept, bool)
    w = np.asarray(w, float)
    if valid is not None:
        kept, w, adv = kept[valid], w[valid], adv[valid]
    n = len(adv)
    wa = w * adv
    abs_mass, abs_adv = np.abs(wa).sum(), np.abs(adv).sum()
    return {
        "kept_frac": kept.mean() if n else NAN,
        "weight_mean": w.mean() if n else NAN,
        "pos_share": np.clip(wa, 0, None).sum() / abs_mass if abs_mass > 0 else NAN,
        "kept_adv_frac": np.abs(adv)[kept].sum() / abs_adv if abs_adv > 0 else NAN,
    }


def _clip(r, adv, lo, hi):
    kept = ~(((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo)))
    return kept, np.where(kept, r, 0.0)


def reference_step(t: dict[str, np.ndarray], p: L.LensParams) -> dict[str, float]:
    """All lens columns of one step from its token arrays (already restricted to finite logp/old_logp/adv)."""
    lr = t["logp"] - t["old_logp"]
    r, adv = np.exp(lr), t["adv"]
    out: dict[str, float] = {}

    def put(obj, q):
        for k, v in q.items():
            out[L.column(obj, k)] = v

    for obj in ("ppo", "dapo"):
        cp = getattr(p, obj)
        put(obj, _quantities(*_clip(r, adv, 1 - cp.eps_low, 1 + cp.eps_high), adv))
    d = p.dual_clip
    kept, _ = _clip(r, adv, 1 - d.eps_low, 1 + d.eps_high)
    kept &= ~((adv < 0) & (r > d.c))
    put("dual_clip", _quantities(kept, np.where(kept, r, 0), adv))
    q = np.exp(t["old_logp"])
    lo = 0.5 + 0.5 * np.sqrt(np.maximum(1 - 4 * p.dcpo.eps_low / q, 0))
    hi = 0.5 + 0.5 * np.sqrt(1 + 4 * p.dcpo.eps_high / q)
    put("dcpo", _quantities(*_clip(r, adv, lo, hi), adv))
    put("cispo", _quantities(np.ones_like(r, bool), np.minimum(r, 1 + p.cispo.eps_high), adv))
    tau = np.where(adv > 0, p.sapo.tau_pos, p.sapo.tau_neg)
    s = 1 / (1 + np.exp(-tau * (r - 1)))
    put("sapo", _quantities(np.ones_like(r, bool), 4 * s * (1 - s) * r, adv))

    # GSPO and CTPO, sequence by sequence
    keys = np.stack([t[k] for k in ("rank", "micro", "seq")], axis=1)
    _, seq_id = np.unique(keys, axis=0, return_inverse=True)
    seq_id = seq_id.ravel()
    g_kept, g_w = np.zeros_like(r, bool), np.zeros_like(r)
    c_kept, c_w = np.zeros_like(r, bool), np.zeros_like(r)
    for i in np.unique(seq_id):
        idx = np.flatnonzero(seq_id == i)
        s_i = math.exp(lr[idx].mean())
        a_i = adv[idx].mean()
        clipped = (s_i > 1 + p.gspo.eps_high and a_i > 0) or (s_i < 1 - p.gspo.eps_low and a_i < 0)
        g_kept[idx], g_w[idx] = not clipped, 0.0 if clipped else s_i
        order = idx[np.argsort(t["pos"][idx])]
        Lt = np.cumsum(lr[order])  # over the sequence's valid tokens, bounds at their positions
        b = np.sqrt(t["pos"][order] + 1.0)
        k = ~(((adv[order] > 0) & (Lt > p.ctpo.high * b)) | ((adv[order] < 0) & (Lt < -p.ctpo.low * b)))
        c_kept[order], c_w[order] = k, np.where(k, np.exp(Lt), 0.0)
    put("gspo", _quantities(g_kept, g_w, adv))
    put("ctpo", _quantities(c_kept, c_w, adv))

    w_is = np.exp(t["old_logp"] - t["rollout_logp"])
    valid = ~np.isnan(w_is)
    for obj in ("tis", "mis"):
        ip = getattr(p, obj)
        kept, _ = _clip(r, adv, 1 - ip.eps_low, 1 + ip.eps_high)
        if obj == "tis":
            w = np.where(kept, r * np.minimum(w_is, ip.cap), 0)
        else:
            kept = kept & (w_is <= ip.cap) & (w_is >= 1 / ip.cap)
            w = np.where(kept, r * w_is, 0)
        put(obj, _quantities(kept, w, adv, valid) if valid.any() else dict.fromkeys(L.QUANTITIES, NAN))

    bp = p.bapo

    def grid(start, stop):
        return [round(start + k * bp.step, 10) for k in range(int(round((stop - start) / bp.step)) + 1)]

    lows, highs = grid(bp.low_start, bp.low_max), grid(bp.high_start, bp.high_max)
    path = [(lo, highs[0]) for lo in lows] + [(lows[-1], h) for h in highs[1:]]
    for lo, hi in path:
        kept, w = _clip(r, adv, lo, hi)
        pos = (w * adv)[adv > 0].sum()
        neg = -(w * adv)[adv < 0].sum()
        if neg == 0 or pos >= bp.target * neg:
            saturated = 0.0
            break
    else:
        saturated = 1.0
    put("bapo", _quantities(kept, w, adv))
    out.update(
        {L.column("bapo", "clip_low"): lo, L.column("bapo", "clip_high"): hi, L.column("bapo", "saturated"): saturated}
    )

    ess = r.sum() ** 2 / (len(r) * (r**2).sum())
    put("ttb", _quantities(np.ones_like(r, bool), np.minimum(r, ess), adv))
    out.update({L.column("ttb", "ess"): ess, L.column("ttb", "reg_weight"): 1 - ess})
    return out


def reference(frame: pl.DataFrame, p: L.LensParams) -> pl.DataFrame:
    rows = []
    finite = frame.filter(
        pl.col("logp").is_finite()
        & pl.col("old_logp").is_finite()
        & pl.col("adv").is_finite()
        & (pl.col("logp") <= 1e-4)
        & (pl.col("old_logp") <= 1e-4)
    )
    for (step,), part in finite.sort("step").group_by("step", maintain_order=True):
        t = {c: part[c].cast(pl.Float64).fill_null(NAN).to_numpy() for c in part.columns}
        rows.append({"step": step, **reference_step(t, p)})
    return pl.DataFrame(rows).select("step", *L.columns())


# --- batches ---------------------------------------------------------------------------------------------------


def random_tokens(seed: int = 0, steps: int = 3, seqs: int = 6, max_len: int = 40, shift: float = 0.15) -> pl.DataFrame:
    """Token rows as the recorder writes them: per step, sequences contiguous and in position order."""
    rng = np.random.default_rng(seed)
    parts = []
    for step in range(steps):
        for s in range(seqs):
            n = int(rng.integers(1, max_len))
            old = np.log(rng.uniform(0.02, 1.0, n))
            lp = np.minimum(old + rng.normal(0, shift, n), 0.0)
            roll = old + rng.normal(0, 0.3, n)
            if s == 1:
                roll[: n // 2] = np.nan  # rollout log-probs missing on some tokens
            adv = np.full(n, rng.normal()) if s % 3 else rng.normal(size=n)  # GRPO-style and per-token
            if s == 2:
                adv[:] = 0.0
            parts.append(
                pl.DataFrame(
                    {
                        "step": np.full(n, step, np.int64),
                        "rank": np.full(n, s % 2, np.int32),
                        "micro": np.zeros(n, np.int32),
                        "seq": np.full(n, s, np.int64),
                        "pos": np.arange(n, dtype=np.int32),
                        "logp": lp.astype(np.float32),
                        "old_logp": old.astype(np.float32),
                        "adv": adv.astype(np.float32),
                        "rollout_logp": roll.astype(np.float32),
                    }
                )
            )
    return pl.concat(parts)


def assert_frames_close(got: pl.DataFrame, want: pl.DataFrame, rtol: float = 1e-9) -> None:
    assert got.columns == want.columns
    assert got["step"].to_list() == want["step"].to_list()
    for c in want.columns[1:]:
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=rtol, atol=1e-12, err_msg=c)


# --- hand-made batches whose answers are worked out by hand ------------------------------------------------------


def hand_batch(pairs, step=0, old_logp=-2.0):
    """One sequence of tokens with the given (ratio, advantage) pairs."""
    r = np.array([p[0] for p in pairs], float)
    return pl.DataFrame(
        {
            "step": [step] * len(pairs),
            "seq": [0] * len(pairs),
            "pos": list(range(len(pairs))),
            "logp": np.log(r) + old_logp,
            "old_logp": [old_logp] * len(pairs),
            "adv": [float(p[1]) for p in pairs],
        }
    )


HAND = [(1.0, 1), (1.25, 1), (1.5, 1), (0.7, -1), (0.9, -1), (3.5, -1)]


def test_ppo_family_on_a_hand_batch():
    got = L.lens(hand_batch(HAND), objectives=["ppo", "dapo", "dual_clip", "cispo"]).row(0, named=True)
    # PPO eps 0.2: A>0 keeps r <= 1.2 (1.0); A<0 keeps r >= 0.8 (0.9, 3.5)
    assert got["lens/ppo/kept_frac"] == pytest.approx(3 / 6)
    assert got["lens/ppo/weight_mean"] == pytest.approx((1.0 + 0.9 + 3.5) / 6)
    assert got["lens/ppo/pos_share"] == pytest.approx(1.0 / (1.0 + 0.9 + 3.5))
    assert got["lens/ppo/kept_adv_frac"] == pytest.approx(3 / 6)
    # DAPO clip-higher 0.28 also keeps r = 1.25
    assert got["lens/dapo/kept_frac"] == pytest.approx(4 / 6)
    assert got["lens/dapo/pos_share"] == pytest.approx(2.25 / (2.25 + 4.4))
    # dual clip c = 3 drops A<0 with r = 3.5
    assert got["lens/dual_clip/kept_frac"] == pytest.approx(2 / 6)
    assert got["lens/dual_clip/weight_mean"] == pytest.approx(1.9 / 6)
    # CISPO keeps everything with weight min(r, 1.2)
    assert got["lens/cispo/kept_frac"] == 1.0
    assert got["lens/cispo/weight_mean"] == pytest.approx((1 + 1.2 + 1.2 + 0.7 + 0.9 + 1.2) / 6)
    assert got["lens/cispo/pos_share"] == pytest.approx(3.4 / (3.4 + 2.8))


def test_bapo_raises_the_lower_bound_then_the_upper():
    # neg mass 0.66 + 0.77 + 0.9 at lower bound 0.6; pos mass 1.0 (r = 1.3, 1.5 clipped at 1.2)
    batch = hand_batch([(1.0, 1), (1.3, 1), (1.5, 1), (0.66, -1), (0.77, -1), (0.9, -1)])
    got = L.lens(batch, objectives=["bapo"]).row(0, named=True)
    # 0.7 drops 0.66 (neg 1.67), 0.8 drops 0.77 (neg 0.9): pos 1.0 >= 0.9 at upper 1.2
    assert (got["lens/bapo/clip_low"], got["lens/bapo/clip_high"]) == (0.8, 1.2)
    assert got["lens/bapo/saturated"] == 0.0
    assert got["lens/bapo/pos_share"] == pytest.approx(1.0 / 1.9)
    assert got["lens/bapo/kept_frac"] == pytest.approx(2 / 6)
    # negatives that stay above every lower bound: the upper bound must rise until 1.3 is kept
    batch = hand_batch([(1.0, 1), (1.28, 1), (0.9, -2)])
    got = L.lens(batch, objectives=["bapo"]).row(0, named=True)
    assert (got["lens/bapo/clip_low"], got["lens/bapo/clip_high"]) == (0.8, 1.3)
    assert got["lens/bapo/saturated"] == 0.0
    # unreachable balance: saturates at (0.8, 2.0)
    got = L.lens(hand_batch([(1.0, 1), (0.9, -5)]), objectives=["bapo"]).row(0, named=True)
    assert (got["lens/bapo/clip_low"], got["lens/bapo/clip_high"], got["lens/bapo/saturated"]) == (0.8, 2.0, 1.0)


def test_clip_boundaries_are_inclusive_like_ppo():
    # r == 1 exactly: with eps 0 the bounds are 1.0 and a token at the bound keeps its gradient
    batch = hand_batch([(1.0, 1), (1.0, -1)])
    got = L.lens(batch, objectives=["ppo"], params={"ppo": {"eps_low": 0.0, "eps_high": 0.0}})
    assert got["lens/ppo/kept_frac"].item() == 1.0


def test_gspo_ctpo_ttb_on_hand_batches():
    # one sequence with mean log-ratio 0.25 > log(1 + 4e-4) and A > 0: GSPO drops it
    lp = pl.DataFrame(
        {
            "step": [0, 0],
            "seq": [0, 0],
            "pos": [0, 1],
            "logp": [-1.0, -0.5],
            "old_logp": [-1.0, -1.0],
            "adv": [1.0, 1.0],
        }
    )
    got = L.lens(lp, objectives=["gspo", "ctpo", "ttb"]).row(0, named=True)
    assert got["lens/gspo/kept_frac"] == 0.0
    # CTPO: L_0 = 0 kept, L_1 = 0.5 > 0.05*sqrt(2) dropped
    assert got["lens/ctpo/kept_frac"] == 0.5
    assert got["lens/ctpo/weight_mean"] == pytest.approx(0.5)
    r = np.array([1.0, math.exp(0.5)])
    ess = r.sum() ** 2 / (2 * (r**2).sum())
    assert got["lens/ttb/ess"] == pytest.approx(ess)
    assert got["lens/ttb/weight_mean"] == pytest.approx(ess)  # both ratios exceed the ESS cap
    assert got["lens/ttb/reg_weight"] == pytest.approx(1 - ess)


def test_tis_mis_use_the_rollout_weight():
    frame = pl.DataFrame(
        {
            "step": [0, 0, 0],
            "seq": [0, 0, 0],
            "pos": [0, 1, 2],
            "logp": [-1.0, -1.0, -1.0],
            "old_logp": [-1.0, -1.0, -1.0],
            "adv": [1.0, 1.0, -1.0],
            "rollout_logp": [-1.0 - math.log(3.0), -1.0, -1.0 + math.log(4.0)],  # w = 3, 1, 1/4
        }
    )
    got = L.lens(frame, objectives=["tis", "mis"]).row(0, named=True)
    assert got["lens/tis/kept_frac"] == 1.0
    assert got["lens/tis/weight_mean"] == pytest.approx((2.0 + 1.0 + 0.25) / 3)  # min(w, 2)
    assert got["lens/mis/kept_frac"] == pytest.approx(1 / 3)  # 3 and 1/4 are outside [1/2, 2]
    assert got["lens/mis/pos_share"] == 1.0
    # without rollout log-probs the mismatch objectives are undefined, not zero
    got = L.lens(frame.drop("rollout_logp"), objectives=["tis"]).row(0, named=True)
    assert math.isnan(got["lens/tis/kept_frac"])


# --- against the reference on random batches ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_objective_matches_the_numpy_reference(seed):
    frame = random_tokens(seed)
    assert_frames_close(L.lens(frame.lazy()), reference(frame, L.LensParams()))


def test_reference_holds_with_other_parameters_and_large_shifts():
    frame = random_tokens(7, shift=0.6)
    params = L.LensParams().replace(
        {
            "ppo": {"eps_low": 0.1, "eps_high": 0.3},
            "dual_clip": {"c": 2.0},
            "dcpo": {"eps_low": 0.3},
            "sapo": {"tau_pos": 2.0},
            "gspo": {"eps_low": 0.05, "eps_high": 0.05},
            "ctpo": {"low": 0.3, "high": 0.2},
            "tis": {"cap": 1.5},
            "mis": {"cap": 3.0},
            "bapo": {"high_max": 3.0, "step": 0.1},
        }
    )
    assert_frames_close(L.lens(frame, params=params), reference(frame, params))


def test_shuffled_rows_take_the_window_path_and_agree():
    frame = random_tokens(3)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=5)
    assert_frames_close(L.lens(shuffled), reference(frame, L.LensParams()))


def test_masked_positions_are_skipped_by_ctpo_like_the_recorder():
    # a masked token inside a response (multi-turn tool output): L_t sums the valid tokens, bounds use pos
    frame = random_tokens(4)
    holes = frame.filter(~((pl.col("pos") % 5 == 3) & (pl.col("seq") < 3)))
    got = L.lens(holes, objectives=["ctpo"])
    assert_frames_close(got, reference(holes, L.LensParams()).select(got.columns))
    lr_sorted = holes.filter((pl.col("step") == 0) & (pl.col("seq") == 0)).sort("pos")
    assert lr_sorted["pos"].to_list()[:4] == [0, 1, 2, 4]


def test_non_finite_and_invalid_tokens_are_excluded():
    frame = random_tokens(5)
    bad = pl.concat(
        [
            frame,
            frame.head(3).with_columns(
                pl.lit(float("nan"), pl.Float32).alias("logp"), pl.lit(10_000, pl.Int64).alias("seq")
            ),
            frame.head(2).with_columns(
                pl.lit(0.5, pl.Float32).alias("old_logp"), pl.lit(10_001, pl.Int64).alias("seq")
            ),
        ]
    )
    assert_frames_close(L.lens(bad), L.lens(frame))


def test_chunking_and_step_selection_do_not_change_results():
    frame = random_tokens(6, steps=5)
    whole = L.lens(frame)
    assert_frames_close(L.lens(frame, chunk_rows=1), whole)  # one step per chunk
    some = L.lens(frame, steps=[1, 3])
    assert some["step"].to_list() == [1, 3]
    assert_frames_close(some, whole.filter(pl.col("step").is_in([1, 3])))


def test_ppo_kept_frac_is_one_minus_the_clip_region():
    frame = random_tokens(8, shift=0.4)
    r = (frame["logp"].cast(pl.Float64) - frame["old_logp"].cast(pl.Float64)).exp().to_numpy()
    adv = frame["adv"].to_numpy()
    region = ((r > 1.2) & (adv > 0)) | ((r < 0.8) & (adv < 0))
    per_step = pl.DataFrame({"step": frame["step"], "c": region}).group_by("step").agg(pl.col("c").mean())
    want = 1 - per_step.sort("step")["c"]
    np.testing.assert_allclose(L.lens(frame, objectives=["ppo"])["lens/ppo/kept_frac"].to_numpy(), want.to_numpy())


# --- interface -------------------------------------------------------------------------------------------------


def test_columns_and_selection():
    got = L.lens(random_tokens(0), objectives=["dapo", "ppo"])
    assert got.columns == ["step", *L.columns(["ppo", "dapo"])]
    assert got.schema["step"] == pl.Int64
    assert L.columns(["bapo"])[-3:] == ["lens/bapo/clip_low", "lens/bapo/clip_high", "lens/bapo/saturated"]


def test_without_sequence_columns_gspo_and_ctpo_are_nan():
    frame = random_tokens(0).drop("seq", "pos")
    got = L.lens(frame, objectives=["gspo", "ctpo", "ppo"])
    assert got["lens/gspo/kept_frac"].is_nan().all() and got["lens/ctpo/kept_frac"].is_nan().all()
    assert not got["lens/ppo/kept_frac"].is_nan().any()


def test_a_run_supplies_its_config():
    frame = random_tokens(1, shift=0.3)
    cfg = SimpleNamespace(eps_low=0.1, eps_high=0.3, dual_clip_c=2.5, tis_cap=1.5, ctpo_bounds=(0.1, 0.2))
    run = SimpleNamespace(tokens=lambda: frame.lazy(), config=cfg)
    objs = ["ppo", "cispo", "dual_clip", "ctpo", "tis", "dapo"]
    got = L.lens(run, objectives=objs)
    params = L.LensParams(
        ppo=L.ClipParams(0.1, 0.1),
        cispo=L.CISPOParams(0.3),
        dual_clip=L.DualClipParams(0.1, 0.1, 2.5),
        ctpo=L.CTPOParams(0.1, 0.2),
        tis=L.ISParams(1.5, 0.1, 0.1),
    )
    assert_frames_close(got, L.lens(frame, objectives=objs, params=params))
    assert_frames_close(got.select("step", *L.columns(["dapo"])), L.lens(frame, objectives=["dapo"]))
    assert not np.allclose(got["lens/ppo/kept_frac"], L.lens(frame, objectives=["ppo"])["lens/ppo/kept_frac"])


def test_empty_and_bad_input():
    empty = random_tokens(0).head(0)
    got = L.lens(empty)
    assert got.height == 0 and got.columns == ["step", *L.columns()]
    assert L.lens(random_tokens(0), steps=[99]).height == 0
    with pytest.raises(ValueError, match="unknown objective"):
        L.lens(random_tokens(0), objectives=["ppo", "grpo2"])
    with pytest.raises(ValueError, match="lack required column.*old_logp"):
        L.lens(random_tokens(0).drop("old_logp"))
    with pytest.raises(ValueError, match="its fields are: eps_low, eps_high"):
        L.LensParams().replace({"dapo": {"eps": 0.3}})
    with pytest.raises(TypeError, match="takes a Run"):
        L.lens([1, 2, 3])
    with pytest.raises(ValueError, match="tis.cap=0.5 must be > 1"):
        L.lens(random_tokens(0), params={"tis": {"cap": 0.5}})
    with pytest.raises(ValueError, match=r"ppo.eps_high=nan must be a finite number"):
        L.LensParams().replace({"ppo": {"eps_high": float("nan")}})


# --- a real run written by the recorder ---------------------------------------------------------------------------


def test_on_a_recorded_run(run_dir):
    import rldiag
    from tests.metrics.reference import make_record

    rng = np.random.default_rng(11)
    with rldiag.Recorder(run_dir, clip_low=0.15, clip_high=0.15, roll_steps=2) as rec:
        for step in range(4):
            for _ in range(2):  # two micro-batches per step
                rec.record(step=step, **make_record(rng, 6, 12, nan_frac=0.02))
    run = rldiag.open_run(run_dir)
    got = L.lens(run)
    params = L.LensParams.from_config(run.config)
    assert params.ppo == L.ClipParams(0.15, 0.15)
    assert_frames_close(got, reference(run.tokens().collect(), params))
    # the lens's PPO keeps exactly the tokens outside the recorder's clip region
    region = run.step_metrics()["clip/region"].to_numpy()
    np.testing.assert_allclose(got["lens/ppo/kept_frac"].to_numpy(), 1 - region, rtol=1e-12)


def test_cli(run_dir, capsys):
    import json

    import rldiag
    from rldiag.cli import main
    from tests.metrics.reference import make_record

    rng = np.random.default_rng(1)
    with rldiag.Recorder(run_dir) as rec:
        for step in range(3):
            rec.record(step=step, **make_record(rng, 4, 10))
    assert main(["lens", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "objective lens over 3 steps" in out and all(o in out for o in L.OBJECTIVES)
    assert (
        main(
            [
                "lens",
                str(run_dir),
                "--objectives",
                "dapo,ppo",
                "--steps",
                "1:3",
                "--format",
                "json",
                "--set",
                "dapo.eps_high=0.5",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    want = L.lens(
        rldiag.open_run(run_dir), objectives=["ppo", "dapo"], steps=[1, 2], params={"dapo": {"eps_high": 0.5}}
    )
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["lens/dapo/kept_frac"] for r in rows] == pytest.approx(want["lens/dapo/kept_frac"].to_list())
    assert main(["lens", str(run_dir), "--per-step", "--objectives", "bapo"]) == 0
    assert "bapo" in capsys.readouterr().out
    assert main(["lens", str(run_dir), "--objectives", "grpo9"]) == 2
    assert "unknown objective" in capsys.readouterr().err
    assert main(["lens", str(run_dir), "--set", "dapo.eps_high"]) == 2
    assert "OBJECTIVE.FIELD=VALUE" in capsys.readouterr().err
    assert main(["lens", str(run_dir), "--set", "dapo.eps=0.3"]) == 2
    assert "its fields are" in capsys.readouterr().err


def test_cli_names_the_column_an_objective_without_values_needs(tmp_path, capsys):
    import rldiag
    from rldiag.cli import main
    from tests.metrics.reference import make_record

    rng = np.random.default_rng(2)
    with rldiag.Recorder(tmp_path / "run") as rec:
        for step in range(2):
            rec.record(step=step, **make_record(rng, 4, 10, extras=False))  # no rollout log-probs
    assert main(["lens", str(tmp_path / "run"), "--objectives", "tis,mis,ppo"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["tis"].rstrip().endswith("lack rollout_logp") and lines["mis"].rstrip().endswith("lack rollout_logp")
    assert "lack" not in lines["ppo"]
    # no value is "-" in the mean and in the last step's column alike, never a bare nan
    assert "nan" not in lines["tis"] and lines["tis"].split()[1:9] == ["-"] * 8
