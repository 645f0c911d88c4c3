"""``exp(x)`` without calling the C library where its result is certain, in code that compiles to SIMD lanes.

The compiled passes compute ratios ``exp(logp - old_logp)`` with the C library's ``exp`` (numba's ``math.exp``);
a token's side of a clip bound, and every sum after it, depend on its last bit. A call of the library's ``exp``
costs about 3.6 ns here and keeps the loop around it scalar. :func:`exp_sure` finds the same bits in about 1.3 ns
a value inside a vectorized loop, or says that it cannot be sure, and the caller then calls the library.

How it can be sure. :func:`exp_sure` computes ``exp(x)`` to within 0.003 units in the last place (ULP) before
its final rounding: ``x = k ln(2)/2 + r`` with ``|r| <= ln(2)/4`` carried in two doubles (Cody and Waite's
reduction, the product's error from a fused multiply-add), ``exp(r)`` as its Taylor series to ``r^12`` with its
three leading terms summed exactly (Knuth's TwoSum, Dekker's Fast2Sum), times ``sqrt(2)`` in two doubles for an
odd ``k``, times ``2^floor(k/2)``. Its final rounding is then the correctly rounded ``exp(x)`` unless the exact
value lies within 0.003 ULP of a midpoint between two doubles. GNU libc's ``exp`` (since 2.28; musl has the
same routine, from Arm's optimized-routines) is within 0.511 ULP (the error bound stated with its polynomial in
``e_exp_data.c``), so it too rounds correctly unless the exact value lies within
0.011 ULP of a midpoint (older glibc rounds correctly always). So the two agree bit for bit whenever the value
before the final rounding is more than :data:`MARGIN` (0.02 ULP) away from a midpoint; :func:`exp_sure` says
it is not sure otherwise (about 4 % of values, spread evenly), and for ``|x| >= 700``, NaN, or a power of two.
With a C library whose ``exp`` is less accurate (not glibc or musl), a value it is sure of is still the correctly
rounded ``exp(x)``, which that library's may miss by one unit in the last place.

Tested in tests/stats/test_exact_exp.py: bit for bit against ``math.exp`` compiled by numba on millions of values
(no value it is sure of differs), and its error before the final rounding against exact decimal arithmetic.
Numba's disk cache of a pass that inlines this code is keyed on the pass's own file: after a change here, clear
``rldiag/stats/__pycache__/*.nb*`` in a source checkout (an installed package changes all its files at once).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import Any, Final

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def _fma_typer(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        vals = [context.cast(builder, v, t, types.float64) for v, t in zip(args, signature.args)]
        return builder.call(fn, vals)

    return sig, codegen


fma: Any = intrinsic(_fma_typer)
"""``fma(a, b, c)``: ``a * b + c`` rounded once (LLVM's ``llvm.fma``: the CPU's instruction, vectorized in loops;
for a CPU without one, or numba told to compile for a generic CPU, a call of the C library's ``fma``, exact too
but slower: checked with ``NUMBA_CPU_NAME=generic``)."""


def _bits(v: float) -> int:
    return int(np.array([v], dtype=np.float64).view(np.int64)[0])


def _double(b: int) -> float:
    return float(np.array([b], dtype=np.int64).view(np.float64)[0])


with localcontext() as _ctx:
    _ctx.prec = 80
    _HALF_LN2 = Decimal(2).ln() / 2
    # ln(2)/2 in three parts; the first with its low 13 bits clear, so k * H1 is exact for |k| < 2**13
    H1: Final[float] = _double(_bits(float(_HALF_LN2)) & ~((1 << 13) - 1))
    H2: Final[float] = float(_HALF_LN2 - Decimal(H1))
    H3: Final[float] = float(_HALF_LN2 - Decimal(H1) - Decimal(H2))
    INV_HALF_LN2: Final[float] = float(1 / _HALF_LN2)
    _SQRT2 = Decimal(2).sqrt()
    Q1: Final[float] = float(_SQRT2)
    Q2: Final[float] = float(_SQRT2 - Decimal(Q1))
    C3, C4, C5, C6, C7, C8, C9, C10, C11, C12 = (float(Decimal(1) / math.factorial(n)) for n in range(3, 13))

SHIFT: Final[float] = 6755399441055744.0
"""1.5 * 2**52: ``y + SHIFT`` rounds ``y`` to an integer, which the low bits of the sum hold."""
SHIFT_BITS: Final[int] = _bits(SHIFT)

LIMIT: Final[float] = 700.0
"""Beyond it (or NaN) :func:`exp_sure` is never sure (the result would overflow or be subnormal near the ends)."""

MARGIN: Final[float] = 0.02
"""ULPs from a rounding midpoint under which :func:`exp_sure` is not sure: its own error before rounding (at most
0.003, see the module's text) plus the C library's (0.011), and room."""


@numba.njit(inline="always")
def _parts(x: float) -> tuple[float, float, Any]:  # pragma: no cover - compiled
    """``exp(x) = (s + err) * 2^m`` to within 0.003 ULP of ``s``, ``s + err`` exact, ``|err| <= ulp(s) / 2``."""
    xc = min(max(x, -LIMIT), LIMIT)
    kd = xc * INV_HALF_LN2 + SHIFT
    k = np.float64(kd).view(np.int64) - SHIFT_BITS
    kf = kd - SHIFT
    t = xc - kf * H1  # exact (Sterbenz)
    p2 = kf * H2
    e2 = fma(kf, H2, -p2)  # kf * H2 = p2 + e2 exactly
    rh = t - p2  # TwoSum(t, -p2) = rh + re exactly
    bb = rh - t
    re = (t - (rh - bb)) + (-p2 - bb)
    rl = (re - e2) - kf * H3  # r = rh + rl
    sq = rh * rh
    sqe = fma(rh, rh, -sq)  # rh^2 = sq + sqe exactly
    tail = fma(C12, rh, C11)
    tail = fma(tail, rh, C10)
    tail = fma(tail, rh, C9)
    tail = fma(tail, rh, C8)
    tail = fma(tail, rh, C7)
    tail = fma(tail, rh, C6)
    tail = fma(tail, rh, C5)
    tail = fma(tail, rh, C4)
    tail = fma(tail, rh, C3)
    t3 = tail * (sq * rh)  # r^3 / 3! + ... + r^12 / 12!, |t3| < 0.00087
    s1 = 1.0 + rh  # Fast2Sum: 1 + rh = s1 + e1
    e1 = (1.0 - s1) + rh
    c = 0.5 * sq
    s2 = s1 + c  # Fast2Sum: s1 + c = s2 + ea
    ea = (s1 - s2) + c
    s3 = s2 + t3  # Fast2Sum: s2 + t3 = s3 + eb
    eb = (s2 - s3) + t3
    low = (e1 + ea) + (eb + (0.5 * sqe + (rl + rh * rl + 0.5 * sq * rl)))  # exp(r) = s3 + low
    odd = (k & 1) == 1  # an odd k: times sqrt(2) = Q1 + Q2
    p = s3 * Q1
    pe = fma(s3, Q1, -p)
    plo = pe + (s3 * Q2 + low * Q1)
    hi = p if odd else s3
    lo = plo if odd else low
    s = hi + lo  # Fast2Sum: the final rounding, and what it dropped
    err = (hi - s) + lo
    return s, err, k >> 1


@numba.njit(inline="always")
def exp_sure(x: float) -> tuple[float, bool]:  # pragma: no cover - compiled
    """(``exp(x)``, sure): when ``sure``, the value is the C library's ``exp(x)`` bit for bit (module text);
    otherwise call it. Branch-free, so a loop of it runs in SIMD lanes."""
    s, err, m = _parts(x)
    sb = np.float64(s).view(np.int64)
    ulp = np.int64(sb + 1).view(np.float64) - s
    near = abs(abs(err) - 0.5 * ulp) < MARGIN * ulp
    sure = (abs(x) < LIMIT) & (not near) & ((sb & ((1 << 52) - 1)) != 0)  # not at a power of two either
    return s * np.int64((m + 1023) << 52).view(np.float64), sure
