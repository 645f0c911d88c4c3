"""``exp`` without the C library where its result is certain (rldiag/stats/exact_exp.py): every value it is sure
of is the library's bit for bit, it is unsure of few, and its error before the final rounding is within the
bound its margin is built on; and the lens pass that uses it gives the library's ratios, SAPO gates and
rollout weights across its blocks of rows."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from decimal import Decimal, localcontext

import numba
import numpy as np
import pytest

from rldiag.stats import exact_exp as E
from rldiag.stats import lens_kernel as K


@numba.njit
def _both(x):  # pragma: no cover - compiled
    got, sure, libm = np.empty(x.size), np.empty(x.size, np.bool_), np.empty(x.size)
    for i in range(x.size):
        v, ok = E.exp_sure(x[i])
        got[i], sure[i], libm[i] = v, ok, math.exp(x[i])
    return got, sure, libm


@numba.njit
def _parts(x):  # pragma: no cover - compiled
    out = np.empty((x.size, 3))
    for i in range(x.size):
        s, err, m = E._parts(x[i])
        out[i, 0], out[i, 1], out[i, 2] = s, err, m
    return out


def _inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Log-ratios as the lens sees them (differences of float32 log-probs), small and large arguments, the
    edges of the reduction (odd and even multiples of ln(2)/2 and halfway between them) and the special values."""
    half = math.log(2) / 2
    k = rng.integers(-2000, 2000, n).astype(np.float64)
    return np.concatenate(
        [
            np.float32(rng.normal(-2, 2, n)).astype(np.float64) - np.float32(rng.normal(-2, 2, n)).astype(np.float64),
            rng.normal(0, 0.05, n),
            rng.uniform(-710, 710, n),
            rng.uniform(-1e-9, 1e-9, n),
            (k + rng.choice([-0.5, 0.5], n) + rng.uniform(-1e-6, 1e-6, n)) * half,
            k * half,
            [0.0, -0.0, np.nan, np.inf, -np.inf, 700.0, -700.0, 699.999, -699.999, 1e-300, 5e-324, 1e308],
        ]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_every_value_it_is_sure_of_is_the_c_librarys(seed):
    x = _inputs(np.random.default_rng(seed), 400_000)
    got, sure, libm = _both(x)
    differ = sure & (got.view(np.int64) != libm.view(np.int64))
    assert not differ.any(), f"sure of exp({x[differ][:5]}) = {got[differ][:5]}, the library gives {libm[differ][:5]}"
    # it is unsure of a few percent (the margin around midpoints), never of most: else it would be no faster
    assert 0.01 < 1 - sure.mean() < 0.1
    # out of its range, NaN and infinities it is never sure
    assert not sure[~(np.abs(x) < E.LIMIT)].any()


def test_its_error_before_the_final_rounding_is_within_the_bound_of_its_margin():
    rng = np.random.default_rng(7)
    x = _inputs(rng, 600)
    x = x[np.abs(x) < E.LIMIT]
    out = _parts(x)
    worst = 0.0
    with localcontext() as ctx:
        ctx.prec = 50
        for xi, (s, err, m) in zip(x, out):
            exact = Decimal(float(xi)).exp() / Decimal(2) ** int(m)
            ulp = Decimal(float(np.nextafter(s, np.inf) - s))
            assert abs(Decimal(float(err))) <= ulp / 2  # s is the rounding of s + err
            worst = max(worst, float(abs((Decimal(float(s)) + Decimal(float(err)) - exact) / ulp)))
    # the module's text: at most 0.003 ULP; the margin adds the C library's 0.011 to it
    assert worst < 0.004
    assert E.MARGIN >= worst + 0.011


@numba.njit
def _reference(lp, olp, adv, roll, tau_pos, tau_neg):  # pragma: no cover - compiled
    r, w, g = np.empty(lp.size), np.empty(lp.size), np.empty(lp.size)
    for i in range(lp.size):
        x, y, a = np.float64(lp[i]), np.float64(olp[i]), np.float64(adv[i])
        r[i] = math.exp(x - y)
        w[i] = math.exp(y - np.float64(roll[i]))
        tau = tau_pos if a > 0 else tau_neg
        g[i] = 1.0 / (1.0 + math.exp(-tau * (r[i] - 1.0)))
    return r, w, g


_EDGES = np.array([0.8, 1.0, 1.2])


def _block(lp, olp, adv, roll, want_w, want_sapo):
    n = lp.size
    r, w, g = np.empty(n), np.empty(n), np.empty(n)
    rb = np.empty(n, np.int64)
    counts, edge, base, shift = K.bucket_lut(_EDGES)
    calls = K.block_exps(
        lp,
        olp,
        adv,
        roll,
        want_w,
        want_sapo,
        1.0,
        1.05,
        r,
        w,
        g,
        np.empty(n, np.bool_),
        True,
        counts,
        edge,
        base,
        shift,
        rb,
    )
    return r, w, g, rb, calls


def test_the_block_exponentials_are_the_c_librarys_bit_for_bit():
    """Every value of the block (those exp_sure was sure of, and those the library computed after it), and the
    ratio's bucket is the one of the library's ratio."""
    rng = np.random.default_rng(3)
    n = 3 * K.EXP_BLOCK + 17
    olp = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    lp = (olp + rng.normal(0, 0.5, n)).astype(np.float32)
    roll = (olp + rng.normal(0, 0.5, n)).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    r, w, g, rb, calls = _block(lp, olp, adv, roll, True, True)
    want = _reference(lp, olp, adv, roll, 1.0, 1.05)
    for got, ref in zip((r, w, g), want):
        np.testing.assert_array_equal(got.view(np.int64), ref.view(np.int64))
    np.testing.assert_array_equal(rb, [K._bucket(_EDGES, v) for v in want[0]])
    assert 0.01 * 3 * n < calls < 0.1 * 3 * n  # a few percent of the values go to the library, never most


def test_a_run_without_rollout_log_probs_keeps_the_block_path():
    """A NaN rollout log-prob (a run that recorded none) makes w NaN, which the pass only tests for NaN-ness: no
    such weight goes to the C library, instead of every row of such a run. Invalid tokens' NaN ratios neither."""
    rng = np.random.default_rng(4)
    n = 2 * K.EXP_BLOCK + 5
    olp = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    lp = (olp + rng.normal(0, 0.5, n)).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    roll = np.full(n, np.nan, np.float32)
    lp[::7] = np.nan  # invalid tokens
    r, w, _, _, calls = _block(lp, olp, adv, roll, True, False)
    *_, calls_no_w = _block(lp, olp, adv, roll, False, False)
    assert calls == calls_no_w  # the NaN weights cost nothing
    assert 0 < calls < 0.1 * n  # and the NaN ratios neither: only the few unsure valid ones
    assert np.isnan(w).all() and np.isnan(r[::7]).all()


def test_the_pass_leaves_the_c_librarys_ratio_of_every_valid_row():
    """Across block boundaries, with the rows it was unsure of computed by the library: r_out, Trust the Batch's
    input, is exp(logp - old_logp) bit for bit."""
    rng = np.random.default_rng(5)
    n = 5 * K.EXP_BLOCK + 101
    step = np.repeat(np.arange(3), [n // 3, n // 3, n - 2 * (n // 3)]).astype(np.int64)
    olp = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    lp = np.minimum(olp + rng.normal(0, 0.4, n), 0.0).astype(np.float32)
    lp[rng.random(n) < 0.02] = np.nan  # invalid rows: NaN in r_out
    adv = rng.normal(size=n).astype(np.float32)
    roll = (olp + rng.normal(0, 0.3, n)).astype(np.float32)
    uniq = np.arange(3, dtype=np.int64)
    edges = np.array([0.8, 1.0, 1.2])
    counts, edge, base, shift = K.bucket_lut(edges)
    want = np.ones(K.N_WANT, np.bool_)
    want[[K.W_GSPO, K.W_CTPO]] = False
    th = np.zeros(K.N_TH)
    th[K.TH_DCPO_LO_MAX], th[K.TH_DCPO_HI_MIN], th[K.TH_SAPO_POS], th[K.TH_SAPO_NEG] = 0.0, np.inf, 1.0, 1.05
    table = np.zeros((3, 3, 2 * edges.size + 1, 2 * 3 + 2, len(K.TABLE_SUMS)))
    acc, gacc, cacc = np.zeros((3, len(K.ACC_SUMS))), np.zeros((3, 6)), np.zeros((3, 5))
    r_out = np.empty(n)
    K.lens_pass(
        step, uniq, lp, olp, adv, roll, step[:0], np.zeros(0, np.int32), want, 1e-4, th,
        counts, edge, base, shift, K.padded(edges), edges.size, np.array([0.5, 1.0, 2.0]),
        0.8, 1.2, 0.2, 0.2, table, acc, gacc, cacc, r_out, np.zeros((3, 3), np.int64),
    )  # fmt: skip
    ref = _reference(lp, olp, adv, roll, 1.0, 1.05)[0]
    valid = ~np.isnan(lp)
    np.testing.assert_array_equal(r_out[valid].view(np.int64), ref[valid].view(np.int64))
    assert np.isnan(r_out[~valid]).all()
    # SAPO's weight sum, token by token in row order with the library's gate
    g = 1.0 / (1.0 + np.exp(-np.where(adv > 0, 1.0, 1.05) * (ref - 1.0)))
    for s in range(3):
        m = valid & (step == s)
        np.testing.assert_allclose(acc[s, K.ACC_SUMS.index("sapo.w")], (4 * g * (1 - g) * ref)[m].sum(), rtol=1e-12)


def test_without_the_cpus_fma_instruction_it_is_still_exact(tmp_path):
    """Compiled for a generic x86-64 CPU (no FMA instruction), ``fma`` becomes a call of the C library's, exact
    too: the values it is sure of are still the library's exp."""
    code = (
        "import math, numba, numpy as np\n"
        "from rldiag.stats.exact_exp import exp_sure\n"
        "@numba.njit\n"
        "def both(x):\n"
        "    got, sure, libm = np.empty(x.size), np.empty(x.size, np.bool_), np.empty(x.size)\n"
        "    for i in range(x.size):\n"
        "        v, ok = exp_sure(x[i])\n"
        "        got[i], sure[i], libm[i] = v, ok, math.exp(x[i])\n"
        "    return got, sure, libm\n"
        "x = np.random.default_rng(9).normal(0, 3, 200_000)\n"
        "got, sure, libm = both(x)\n"
        "print(int((sure & (got.view(np.int64) != libm.view(np.int64))).sum()), float(sure.mean()))\n"
    )
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    differ, sure = out.stdout.split()
    assert int(differ) == 0 and 0.9 < float(sure) < 0.99
