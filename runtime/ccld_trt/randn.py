"""``torch.randn`` from a freshly seeded CPU generator, float32, bit for bit, on numpy: the starting noise of a
job that runs without torch (``graph_sample``).

torch 2.13's CPU normal kernel for float32 tensors of 16 values or more (``normal_fill``) draws every uniform first
(mt19937, 24 bits each), then turns each block of 16 into normals by Box-Muller over the pairs (j, j + 8); when the
size is not a multiple of 16 it draws 16 uniforms more and recomputes the last 16 values from them. On a CPU with
AVX2 (AVX-512 CPUs run the same code: no AVX-512 copy is built) the block is ``normal_fill_16_AVX2``: Cephes'
``log256_ps`` and ``sincos256_ps`` (``avx_mathfun.h``) with 20 multiply-adds fused by the compiler, which is what
``_log`` and ``_sincos`` follow, step by step. Other CPUs run another kernel; ``graph_sample`` uses these draws
only where a run with torch checked them against ``torch.randn`` on the same machine (``sampler_plan``).
"""

from __future__ import annotations

import numpy as np

BLOCK = 16  # values per Box-Muller block; torch's kernel needs at least one block
_F = np.float32
# Cephes' constants, as avx_mathfun.h spells them (rounded to float32)
_LOG_P = tuple(_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                               1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                               3.3333331174e-1))
_LOG_Q1, _LOG_Q2, _SQRT_HALF = _F(-2.12194440e-4), _F(0.693359375), _F(0.707106781186547524)
_DP1, _DP2, _DP3 = _F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8)
_SIN_P = (_F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1))
_COS_P = (_F(2.443315711809948e-5), _F(-1.388731625493765e-3), _F(4.166664568298827e-2))
_FOUR_OVER_PI, _TWO_PI = _F(1.27323954473516), _F(2.0 * np.pi)


def randn(seed: int, size: int) -> np.ndarray:
    """``torch.randn(size, generator=torch.Generator().manual_seed(seed))`` on an AVX2 CPU: float32 [size]
    (reshape as wanted). ValueError below BLOCK values (torch draws those another way)."""
    if size < BLOCK:
        raise ValueError(f"randn replicates torch's kernel for {BLOCK} values or more, not {size}")
    # torch seeds its mt19937 with the seed's low 32 bits, as numpy's legacy generator does
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    values = _uniforms(state, size)
    whole = size // BLOCK * BLOCK
    values[:whole] = _box_muller(values[:whole].reshape(-1, BLOCK)).reshape(-1)
    if size % BLOCK:
        values[size - BLOCK:] = _box_muller(_uniforms(state, BLOCK).reshape(1, BLOCK)).reshape(-1)
    return values


def _uniforms(state: np.random.RandomState, size: int) -> np.ndarray:
    """``size`` uniforms in [0, 1), float32: the low 24 bits of each 32-bit draw, times 2^-24 (exact)."""
    raw = state.randint(0, 2**32, size=size, dtype=np.uint32)
    return (raw & 0xFFFFFF).astype(np.float32) * _F(2.0**-24)


def _box_muller(u: np.ndarray) -> np.ndarray:
    """Uniforms [k, 16] -> normals [k, 16]: radius from the first 8 of a row, angle from the last 8."""
    radius = np.sqrt(_log(_F(1) - u[:, :8]) * _F(-2))
    sin, cos = _sincos(_TWO_PI * u[:, 8:])
    # + 0: the kernel's mean (its fma with std 1 and mean 0 is exact)
    return np.concatenate([radius * cos + _F(0), radius * sin + _F(0)], axis=1)


def _fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """a * b + c rounded once to float32, as the FMA instruction: the product is exact in float64, and the sum
    rounded to odd there then to float32 is rounded as the exact sum would be (double rounding made safe)."""
    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = p + c64
    # the sum's rounding error (Knuth's two-sum); where it is not zero and s is even, move s one step toward it
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(np.uint64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _log(x: np.ndarray) -> np.ndarray:
    """log256_ps: natural log of float32 x > 0 (x = 1 - u is in (0, 1])."""
    x = np.maximum(x, np.array([0x00800000], np.int32).view(np.float32)[0])  # the smallest normal
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(np.float32) + _F(1)
    x = ((bits & ~0x7F800000) | np.array([0.5], np.float32).view(np.int32)[0]).view(np.float32)  # mantissa in [0.5, 1)
    small = x < _SQRT_HALF
    e = e - np.where(small, _F(1), _F(0))
    x = (x - _F(1)) + np.where(small, x, _F(0))
    z = x * x
    y = _fma(_LOG_P[0], x, _LOG_P[1])
    for p in _LOG_P[2:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, e * _LOG_Q1)
    y = _fma(-z, _F(0.5), y)
    return _fma(e, _LOG_Q2, x + y)


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x >= 0: (sin x, cos x), float32."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sign_sin = ((j & 4) << 29).astype(np.uint32)
    sign_cos = ((~(j - 2) & 4) << 29).astype(np.uint32)
    use_sin_poly = (j & 2) == 0
    # extended-precision reduction to [-pi/4, pi/4]
    x = _fma(y, _DP1, x)
    x = _fma(_DP2, y, x)
    x = _fma(y, _DP3, x)
    z = x * x
    yc = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2])
    yc = _fma(z, z * yc, -(z * _F(0.5))) + _F(1)
    ys = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2])
    ys = _fma(z * ys, x, x)
    sin_part = np.where(use_sin_poly, ys, _F(0))
    cos_part = np.where(use_sin_poly, _F(0), yc)
    sin = sin_part + cos_part
    cos = (ys - sin_part) + (yc - cos_part)
    return (sin.view(np.uint32) ^ sign_sin).view(np.float32), (cos.view(np.uint32) ^ sign_cos).view(np.float32)
