"""A native kernel for CPU decode attention over a 4/8-bit group-quantised KV cache (see
cpu_attention.py): the two products read the packed bytes once, where they lie, with each group's
scale and minimum folded in (with codes centred, c = u - 2^(bits-1), and z = min + 2^(bits-1) s:
q.k = sum_g s_g (q_g . c_g) + z_g sum(q_g); p @ v = (p s) @ c plus (p @ z) per group), so no
dequantised copy of the cache is ever written.

It is plain C (GCC/Clang vector extensions, no Python or torch headers), built once per machine
with the system's C compiler into a cache directory ($FLEXGEN_KERNEL_DIR, else ~/.cache/flexgen)
and called through ctypes, which releases the GIL: chunks run on the Python worker threads, one
core each. Without a working compiler, or when the built kernel disagrees with the PyTorch path
on a check run once per process, `library()` is None (with one warning) and cpu_attention.py uses
its PyTorch version of the same folded products. FLEXGEN_CPU_PACKED_KERNEL=torch forces that.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

_SOURCE = r"""


#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));
typedef int8_t vc __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(64)));
#define W 16
#define TOF(x) __builtin_convertvector(__builtin_convertvector((x), vi), vf)
#define MAXD 1024
#define MAXG 128
#define MAXR 16

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    union { uint32_t u; float f; } o;
    o.u = (uint32_t)(h & 0x7fff) << 13;
    o.f *= 0x1p112f;
    if ((h & 0x7c00) == 0x7c00) o.u |= 255u << 23;
    o.u |= (uint32_t)(h & 0x8000) << 16;
    return o.f;
#endif
}

static inline vf ldf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stf(float *p, vf v) { memcpy(p, &v, sizeof v); }
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
static inline float hsum(vf v) {   /* a tree: halves added, not 16 scalar adds in a row */
    vf8 a, b; memcpy(&a, &v, 32); memcpy(&b, (char *)&v + 32, 32); a += b;
    vf4 c, d; memcpy(&c, &a, 16); memcpy(&d, (char *)&a + 16, 16); c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* Codes are used centred, c = u - half (exact in float), with z = min + half * s (symmetric: 0),
   so a value is s c + z: z is the group's mid-range, and the folded sums s (q . c) and z sum(q)
   do not cancel. Within a group, a 4-bit code's float order is the byte's low nibbles, then its
   high nibbles (even, then odd positions); q comes in that order. */
static inline __attribute__((always_inline)) vf code16(const uint8_t *x, int bits, int high) {
    vb v; memcpy(&v, x, W);
    if (bits == 4) return TOF((vc)(high ? v >> 4 : v & 15) - 8);
    return TOF((vc)(v ^ 0x80));
}
static inline __attribute__((always_inline)) float code1(const uint8_t *x, int k, int G, int bits) {
    if (bits == 4) return k < G / 2 ? (float)((x[k] & 15) - 8) : (float)((x[k - G / 2] >> 4) - 8);
    return (float)((int)x[k] - 128);
}
static inline __attribute__((always_inline)) void group_sz(const uint16_t *sc, const uint16_t *mn, int j,
                                                           float half, float *s, float *z) {
    *s = h2f(sc[j]);
    *z = mn ? h2f(mn[j]) + half * *s : 0.f;
}

/* scores[m, i, t] = sum_j s[t, j] (q[m, i, j] . c[t, j]) + z[t, j] qsum[m, i, j] */
static inline __attribute__((always_inline)) void qk_body(
        const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *q, const float *qsum, float *out, int c, int n, int r, int groups, int G, int bits) {
    int nb = G * bits / 8, D = groups * G, h = G / 2, vec = (bits == 4 ? h : G) / W * W;
    for (int m = 0; m < c; m++) {
        const float *qm = q + (long)m * r * D, *qs = qsum + (long)m * r * groups;
        float *om = out + (long)m * r * n;
        /* two rows at a time: each q load feeds both (an odd last row is done twice) */
        for (int t = 0; t < n; t += 2) {
            int t1 = t + 1 < n ? t + 1 : t;
            const uint8_t *row0 = data + m * dms + (long)t * groups * nb, *row1 = data + m * dms + (long)t1 * groups * nb;
            const uint16_t *s0 = sc + m * sms + (long)t * groups, *s1 = sc + m * sms + (long)t1 * groups;
            const uint16_t *z0 = mn ? mn + m * sms + (long)t * groups : 0, *z1 = mn ? mn + m * sms + (long)t1 * groups : 0;
            vf a0[MAXR], a1[MAXR];
            float rest0[MAXR], rest1[MAXR];
            for (int i = 0; i < r; i++) { a0[i] = a1[i] = (vf){0}; rest0[i] = rest1[i] = 0.f; }
            for (int j = 0; j < groups; j++) {
                const uint8_t *x0 = row0 + j * nb, *x1 = row1 + j * nb;
                float sa, za, sb, zb;
                group_sz(s0, z0, j, half, &sa, &za);
                group_sz(s1, z1, j, half, &sb, &zb);
                vf g0[MAXR], g1[MAXR];
                float tail0[MAXR], tail1[MAXR];
                for (int i = 0; i < r; i++) { g0[i] = g1[i] = (vf){0}; tail0[i] = tail1[i] = 0.f; }
                for (int b = 0; b < vec; b += W) {
                    vf lo0 = code16(x0 + b, bits, 0), lo1 = code16(x1 + b, bits, 0);
                    if (bits == 4) {
                        vf hi0 = code16(x0 + b, bits, 1), hi1 = code16(x1 + b, bits, 1);
                        for (int i = 0; i < r; i++) {
                            vf ql = ldf(qm + (long)i * D + j * G + b), qh = ldf(qm + (long)i * D + j * G + h + b);
                            g0[i] += ql * lo0;   /* as two statements: two FMAs (one sum: mul, FMA, add) */
                            g1[i] += ql * lo1;
                            g0[i] += qh * hi0;
                            g1[i] += qh * hi1;
                        }
                    } else {
                        for (int i = 0; i < r; i++) {
                            vf ql = ldf(qm + (long)i * D + j * G + b);
                            g0[i] += ql * lo0;
                            g1[i] += ql * lo1;
                        }
                    }
                }
                if (vec < (bits == 4 ? h : G))   /* group sizes that are not whole vectors */
                    for (int k = 0; k < G; k++) {
                        if ((bits == 4 ? k % h : k) < vec) continue;
                        float c0 = code1(x0, k, G, bits), c1 = code1(x1, k, G, bits);
                        for (int i = 0; i < r; i++) {
                            float qk_ = qm[(long)i * D + j * G + k];
                            tail0[i] += qk_ * c0;
                            tail1[i] += qk_ * c1;
                        }
                    }
                for (int i = 0; i < r; i++) {
                    float qz = qs[i * groups + j];
                    a0[i] += sa * g0[i]; rest0[i] += sa * tail0[i] + za * qz;
                    a1[i] += sb * g1[i]; rest1[i] += sb * tail1[i] + zb * qz;
                }
            }
            for (int i = 0; i < r; i++) { om[(long)i * n + t] = hsum(a0[i]) + rest0[i]; om[(long)i * n + t1] = hsum(a1[i]) + rest1[i]; }
        }
    }
}

/* out[m, i, :] = sum_t p[m, i, t] v[t, :], v[t, jG + k] = s[t, j] c[t, j, k] + z[t, j]:
   (p s) @ c plus p @ z per group; acc: r * D floats of the caller's */
static inline __attribute__((always_inline)) void pv_body(
        const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *p, float *out, float *acc, int c, int n, int r, int groups, int G, int bits) {
    int nb = G * bits / 8, D = groups * G, h = G / 2, vec = (bits == 4 ? h : G) / W * W;
    float zacc[MAXR * MAXG];
    for (int m = 0; m < c; m++) {
        const float *pm = p + (long)m * r * n;
        memset(acc, 0, sizeof(float) * r * D);
        memset(zacc, 0, sizeof(float) * r * groups);
        /* two rows at a time: one load and store of the accumulators for both (an odd last row
           pairs with itself at weight 0) */
        for (int t = 0; t < n; t += 2) {
            int pair = t + 1 < n, t1 = pair ? t + 1 : t;
            const uint8_t *row0 = data + m * dms + (long)t * groups * nb, *row1 = data + m * dms + (long)t1 * groups * nb;
            const uint16_t *s0 = sc + m * sms + (long)t * groups, *s1 = sc + m * sms + (long)t1 * groups;
            const uint16_t *z0 = mn ? mn + m * sms + (long)t * groups : 0, *z1 = mn ? mn + m * sms + (long)t1 * groups : 0;
            for (int j = 0; j < groups; j++) {
                const uint8_t *x0 = row0 + j * nb, *x1 = row1 + j * nb;
                float sa, za, sb, zb, w0[MAXR], w1[MAXR];
                group_sz(s0, z0, j, half, &sa, &za);
                group_sz(s1, z1, j, half, &sb, &zb);
                for (int i = 0; i < r; i++) {
                    float p0 = pm[(long)i * n + t], p1 = pair ? pm[(long)i * n + t1] : 0.f;
                    w0[i] = p0 * sa; w1[i] = p1 * sb;
                    zacc[i * groups + j] += p0 * za + p1 * zb;
                }
                for (int b = 0; b < vec; b += W) {
                    vf lo0 = code16(x0 + b, bits, 0), lo1 = code16(x1 + b, bits, 0);
                    for (int i = 0; i < r; i++) { float *y = acc + (long)i * D + j * G + b; stf(y, ldf(y) + w0[i] * lo0 + w1[i] * lo1); }
                    if (bits == 4) {
                        vf hi0 = code16(x0 + b, bits, 1), hi1 = code16(x1 + b, bits, 1);
                        for (int i = 0; i < r; i++) { float *y = acc + (long)i * D + j * G + h + b; stf(y, ldf(y) + w0[i] * hi0 + w1[i] * hi1); }
                    }
                }
                if (vec < (bits == 4 ? h : G))
                    for (int k = 0; k < G; k++) {
                        if ((bits == 4 ? k % h : k) < vec) continue;
                        float c0 = code1(x0, k, G, bits), c1 = code1(x1, k, G, bits);
                        for (int i = 0; i < r; i++) acc[(long)i * D + j * G + k] += w0[i] * c0 + w1[i] * c1;
                    }
            }
        }
        float *om = out + (long)m * r * D;
        for (int i = 0; i < r; i++)
            for (int j = 0; j < groups; j++) {
                const float *a = acc + (long)i * D + j * G;
                float *o = om + (long)i * D + j * G, zz = zacc[i * groups + j];
                if (bits == 4)
                    for (int k = 0; k < h; k++) { o[2 * k] = a[k] + zz; o[2 * k + 1] = a[h + k] + zz; }
                else
                    for (int k = 0; k < G; k++) o[k] = a[k] + zz;
            }
    }
}

/* The usual shapes get copies with constant sizes (unrolled, accumulators in registers):
   1, 2, 4 or 8 query heads per kv head, head dims 64/128 in groups of 32/64/128. */
#define SHAPES(body, ...) \
    if (bits == 4 && G == 64 && groups == 2) body(__VA_ARGS__, 2, 64, 4); \
    else if (bits == 4 && G == 64 && groups == 1) body(__VA_ARGS__, 1, 64, 4); \
    else if (bits == 4 && G == 32 && groups == 4) body(__VA_ARGS__, 4, 32, 4); \
    else if (bits == 4 && G == 128 && groups == 1) body(__VA_ARGS__, 1, 128, 4); \
    else if (bits == 8 && G == 64 && groups == 2) body(__VA_ARGS__, 2, 64, 8); \
    else body(__VA_ARGS__, groups, G, bits);
#define DISPATCH(body, ...) \
    if (r == 1) { SHAPES(body, __VA_ARGS__, 1) } \
    else if (r == 2) { SHAPES(body, __VA_ARGS__, 2) } \
    else if (r == 4) { SHAPES(body, __VA_ARGS__, 4) } \
    else if (r == 8) { SHAPES(body, __VA_ARGS__, 8) } \
    else { SHAPES(body, __VA_ARGS__, r) }

int limits(int *maxd, int *maxg, int *maxr) { *maxd = MAXD; *maxg = MAXG; *maxr = MAXR; return 1; }

void qk(const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *q, const float *qsum, float *out, int c, int n, int r, int groups, int G, int bits) {
    DISPATCH(qk_body, data, dms, sc, mn, sms, half, q, qsum, out, c, n)
}

void pv(const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *p, float *out, float *acc, int c, int n, int r, int groups, int G, int bits) {
    DISPATCH(pv_body, data, dms, sc, mn, sms, half, p, out, acc, c, n)
}

/* exp(x) for x <= 0, 16 lanes: x = k ln2 + f, |f| <= ln2 / 2, e^f by its Taylor series to f^7
   (relative error < 1e-8, under float32's rounding), times 2^k built in the exponent bits;
   x < -87 (and -inf, a masked position) gives 0 */
static inline vf exp16(vf x) {
    vf k = x * 1.44269504088896341f;
    k = (k + 12582912.f) - 12582912.f;                       /* rounded to the nearest integer (1.5 * 2^23) */
    vi ki = __builtin_convertvector(k, vi);
    vf kf = k;
    vf f = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;   /* ln 2 in two parts: f exact enough */
    vf e = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720 + f * (1.f / 5040)))))));
    vi bits = (ki + 127) << 23;
    vf scale; memcpy(&scale, &bits, sizeof scale);
    vi keep = x >= -87.f;
    vf out = e * scale;
    vi ob; memcpy(&ob, &out, sizeof ob); ob &= keep; memcpy(&out, &ob, sizeof out);
    return out;
}

void qk(const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *q, const float *qsum, float *out, int c, int n, int r, int groups, int G, int bits);
void pv(const uint8_t *data, long dms, const uint16_t *sc, const uint16_t *mn, long sms, float half,
        const float *p, float *out, float *acc, int c, int n, int r, int groups, int G, int bits);

/* A chunk's whole first softmax block in one call (no Python between the products): for each
   matrix m and query head i, its running max mx, the sum of exp(score - mx) and the weighted
   values, over positions t < n not marked in invalid (m's row at invalid + m * inv_stride; NULL:
   none). Rows with no valid position get mx = -inf, total 0, acc 0. scratch: r * n floats;
   work: r * groups * G floats. */
void attend(const uint8_t *kd, long kdms, const uint16_t *ks, const uint16_t *km, long ksms,
            const uint8_t *vd, long vdms, const uint16_t *vs, const uint16_t *vm, long vsms, float half,
            const float *q, const float *qsum, const uint8_t *invalid, long inv_stride,
            float *mx, float *tot, float *acc, float *scratch, float *work, int c, int n, int r,
            int groups, int G, int bits) {
    int D = groups * G;
    for (int m = 0; m < c; m++) {
        qk(kd + m * kdms, 0, ks + m * ksms, km ? km + m * ksms : 0, 0, half, q + (long)m * r * D,
           qsum + (long)m * r * groups, scratch, 1, n, r, groups, G, bits);
        if (invalid) {
            const uint8_t *bad = invalid + m * inv_stride;
            for (int t = 0; t < n; t++)
                if (bad[t]) for (int i = 0; i < r; i++) scratch[(long)i * n + t] = -__builtin_inff();
        }
        for (int i = 0; i < r; i++) {
            float *sc_ = scratch + (long)i * n, top = -__builtin_inff(), sum = 0.f;
            for (int t = 0; t < n; t++) top = sc_[t] > top ? sc_[t] : top;
            float shift = top == -__builtin_inff() ? 0.f : top;
            int t = 0;
            vf vsum = {0};
            for (; t + W <= n; t += W) { vf e = exp16(ldf(sc_ + t) - shift); stf(sc_ + t, e); vsum += e; }
            for (; t < n; t++) {
                vf x = {0}; x[0] = sc_[t] - shift;
                float e = exp16(x)[0];
                sc_[t] = e; sum += e;
            }
            mx[(long)m * r + i] = top;
            tot[(long)m * r + i] = hsum(vsum) + sum;
        }
        pv(vd + m * vdms, 0, vs + m * vsms, vm ? vm + m * vsms : 0, 0, half, scratch, acc + (long)m * r * D, work,
           1, n, r, groups, G, bits);
    }
}
"""

_LOCK = threading.Lock()
_STATE = {"done": False, "lib": None, "why": None, "limits": None}
_FLAGS = (["-O3", "-march=native"], ["-O3"])   # the second for compilers that do not know this CPU


def library():
    """The loaded, checked kernel library, or None (why: `unavailable()`)."""
    if not _STATE["done"]:
        with _LOCK:
            if not _STATE["done"]:
                _load()
                _STATE["done"] = True
    return _STATE["lib"]


def unavailable() -> str | None:
    """Why the native kernel is not used (None when it is)."""
    library()
    return _STATE["why"]


def fits(bits: int, groups: int, group_size: int) -> bool:
    """Whether a store of this shape is within the kernel's fixed per-row buffers."""
    lib = library()
    if lib is None:
        return False
    maxd, maxg, _ = _STATE["limits"]
    return bits in (4, 8) and groups * group_size <= maxd and groups <= maxg


def _load():
    if os.environ.get("FLEXGEN_CPU_PACKED_KERNEL", "").lower() == "torch":
        _STATE["why"] = "FLEXGEN_CPU_PACKED_KERNEL=torch"
        return
    try:
        path = _build()
        lib = ctypes.CDLL(path)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        _STATE["why"] = str(e)
        warnings.warn(f"CPU packed-cache attention: no native kernel ({e}); using the PyTorch version", stacklevel=3)
        return
    p, i, f, l_ = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    lib.qk.argtypes = [p, l_, p, p, l_, f, p, p, p, i, i, i, i, i, i]
    lib.pv.argtypes = [p, l_, p, p, l_, f, p, p, p, i, i, i, i, i, i]
    lib.attend.argtypes = [p, l_, p, p, l_, p, l_, p, p, l_, f, p, p, p, l_, p, p, p, p, p, i, i, i, i, i, i]
    lib.qk.restype = lib.pv.restype = lib.attend.restype = None
    lim = [ctypes.c_int() for _ in range(3)]
    lib.limits(*[ctypes.byref(x) for x in lim])
    _STATE["limits"] = tuple(x.value for x in lim)
    _STATE["lib"] = lib
    bad = _self_check()
    if bad:
        _STATE["lib"], _STATE["why"] = None, bad
        warnings.warn(f"CPU packed-cache attention: the native kernel failed its check ({bad}); "
                      "using the PyTorch version", stacklevel=3)


def _cache_dir() -> str:
    d = os.environ.get("FLEXGEN_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flexgen", "kernels")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = os.path.join(tempfile.gettempdir(), f"flexgen-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(d, exist_ok=True)
    return d


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache directory may be shared
    by machines of different CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> str:
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)][:1]
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256("\0".join([_SOURCE, *cc, _cpu_id(), platform.machine()]).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = os.path.join(out_dir, f"packed_attention-{key}.so")
    if os.path.exists(lib):
        return lib
    src = os.path.join(out_dir, f"packed_attention-{key}.{os.getpid()}.c")
    with open(src, "w") as f:
        f.write(_SOURCE)
    tmp = f"{lib}.{os.getpid()}.tmp"
    errors = []
    try:
        for flags in _FLAGS:
            r = subprocess.run([*cc, *flags, "-fPIC", "-shared", "-o", tmp, src], capture_output=True, text=True,
                               timeout=120)
            if r.returncode == 0:
                os.replace(tmp, lib)   # atomic: a concurrent build of the same key is harmless
                return lib
            errors.append((r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"])
    finally:
        for name in (src, tmp):
            if os.path.exists(name):
                os.remove(name)
    raise RuntimeError(f"{cc[0]} could not build it: {errors[-1][0]}")


def scores(lib, data, scale, mn, half: float, q, bits: int, group_size: int):
    """q (c, r, d) float32 against matrices data (c, n, groups, bytes) uint8, scale/mn (c, n, groups, 1)
    fp16 (mn None: symmetric): (c, r, n) float32 scores. More than the kernel's MAXR query heads per
    kv head (multi-query models) go through it MAXR at a time."""
    c, n, groups, _ = data.shape
    r = q.shape[1]
    out = torch.empty(c, r, n)
    step = _STATE["limits"][2]
    for i in range(0, r, step):
        qd, qsum = _query(q[:, i:i + step], groups, group_size, bits)
        o = out if r <= step else torch.empty(c, qd.shape[1], n)
        lib.qk(data.data_ptr(), data.stride(0), scale.data_ptr(), 0 if mn is None else mn.data_ptr(), scale.stride(0),
               half, qd.data_ptr(), qsum.data_ptr(), o.data_ptr(), c, n, qd.shape[1], groups, group_size, bits)
        if r > step:
            out[:, i:i + step] = o
    return out


def weighted(lib, data, scale, mn, half: float, p, bits: int, group_size: int, d: int):
    """p (c, r, n) float32 times the dequantised matrices: (c, r, d) float32."""
    c, n, groups, _ = data.shape
    r = p.shape[1]
    width = groups * group_size
    out = torch.empty(c, r, width)
    step = _STATE["limits"][2]
    acc = torch.empty(min(r, step) * width)
    for i in range(0, r, step):
        pi = p[:, i:i + step].contiguous()
        o = out if r <= step else torch.empty(c, pi.shape[1], width)
        lib.pv(data.data_ptr(), data.stride(0), scale.data_ptr(), 0 if mn is None else mn.data_ptr(), scale.stride(0),
               half, pi.data_ptr(), o.data_ptr(), acc.data_ptr(), c, n, pi.shape[1], groups, group_size, bits)
        if r > step:
            out[:, i:i + step] = o
    return out[..., :d]


def _strides_are(t, dims, want) -> bool:
    """t's strides at dims are want, except where a dim has size 1 (never stepped over)."""
    return all(t.shape[i] == 1 or t.stride(i) == w for i, w in zip(dims, want))


def rows_laid_out(parts) -> bool:
    """Whether packed parts (n, matrices, groups, x) have each matrix's rows contiguous, as the
    kernel reads them (any stride between matrices; scale and min alike)."""
    data, scale, *mn = parts
    _, _, groups, nb = data.shape
    ok = _strides_are(data, (0, 2, 3), (groups * nb, nb, 1)) and _strides_are(scale, (0, 2), (groups, 1))
    return ok and all(_strides_are(m, (0, 1, 2), (scale.stride(0), scale.stride(1), scale.stride(2))) for m in mn)


class Attend:
    """A chunk's whole softmax block over packed K and V in one call of the native kernel
    (scores, mask, max, exp, sums and p @ v: no Python between them, so pool threads hardly meet
    on Python's lock), written straight into the running softmax's rows."""

    def __init__(self, lib, kparts, vparts, config, d: int):
        self.lib, self.k, self.v, self.config, self.d = lib, kparts, vparts, config, d
        self.groups = kparts[0].shape[2]
        self.half = float(1 << (config.num_bits - 1))

    def prepare(self, state) -> bool:
        """The query in the kernel's order, once per call; False when the kernel cannot take it
        (more than MAXR query heads per kv head: the two-call path splits those)."""
        if state.q.shape[1] > _STATE["limits"][2]:
            return False
        state.packed_query = _query(state.q, self.groups, self.config.group_size, self.config.num_bits)
        return True

    def __call__(self, state, lo: int, hi: int, n: int):
        qd, qsum = state.packed_query
        c, r, width = hi - lo, qd.shape[1], self.groups * self.config.group_size

        def at(t, row=None):   # the address of matrix lo of a part, or of row lo of a (matrices, ...) tensor
            if t is None:
                return 0
            return t.data_ptr() + lo * (t.stride(1) if row is None else t.stride(0)) * t.element_size()

        kd, ks, *km = self.k
        vd, vs, *vm = self.v
        acc = None if width == self.d else torch.empty(c, r, width)   # padded groups: cut after
        inv = state.invalid if state.masked else None
        scratch, work = torch.empty(r * n), torch.empty(r * width)       # held until the call returns
        self.lib.attend(at(kd), kd.stride(1), at(ks), at(km[0] if km else None), ks.stride(1),
                        at(vd), vd.stride(1), at(vs), at(vm[0] if vm else None), vs.stride(1), self.half,
                        at(qd, 0), at(qsum, 0), at(inv, 0), 0 if inv is None else inv.stride(0),
                        at(state.m, 0), at(state.total, 0), at(state.acc, 0) if acc is None else acc.data_ptr(),
                        scratch.data_ptr(), work.data_ptr(),
                        c, n, r, self.groups, self.config.group_size, self.config.num_bits)
        if acc is not None:
            state.acc[lo:hi] = acc[..., :self.d]


def laid_out(data, scale, mn) -> bool:
    """Whether chunk views (c, n, groups, x) have the layout the kernel reads: each matrix's rows
    contiguous (any stride between matrices, the same for scale and min)."""
    c, n, groups, nb = data.shape
    ok = _strides_are(data, (1, 2, 3), (groups * nb, nb, 1)) and _strides_are(scale, (1, 2), (groups, 1))
    return ok and (mn is None or _strides_are(mn, (0, 1, 2), (scale.stride(0), scale.stride(1), scale.stride(2))))


def _query(q, groups, group_size, bits):
    """q (c, r, d) padded to the groups' width, each group in the kernel's order (4-bit: even
    positions, then odd: low nibbles, then high), and each group's sum."""
    c, r, d = q.shape
    width = groups * group_size
    if width != d:
        q = torch.nn.functional.pad(q, (0, width - d))
    g = q.reshape(c, r, groups, group_size)
    qsum = g.sum(-1).contiguous()
    if bits == 4:
        g = g.view(c, r, groups, group_size // 2, 2).transpose(-1, -2)
    return g.contiguous(), qsum


def _self_check() -> str | None:
    """The kernel against dequantise-then-multiply on a small case of each specialised and the
    general path (asymmetric and symmetric, GQA, a padded head dim); None when it agrees."""
    from ..memory.compression import compress, decompress
    from ..policy import CompressionConfig
    gen = torch.Generator().manual_seed(0)
    lib = _STATE["lib"]
    for bits, gs, d, r, sym in ((4, 64, 128, 1, False), (4, 32, 64, 4, True), (8, 64, 128, 2, False),
                                (4, 8, 20, 3, False), (8, 16, 48, 1, True), (4, 128, 128, 1, False),
                                (4, 64, 128, 8, False), (4, 32, 128, 20, False)):
        cfg = CompressionConfig(bits, gs, -1, sym)
        x = torch.randn(3, 17, d, generator=gen)
        pk = compress(x, cfg)
        deq = decompress(pk, torch.float32)
        q = torch.randn(3, r, d, generator=gen)
        half = float(1 << (bits - 1))
        data, scale, mn = pk.data, pk.scale, pk.mn
        s = scores(lib, data, scale, mn, half, q, bits, gs)
        want = torch.bmm(q, deq.transpose(1, 2))
        p = torch.softmax(want, -1)
        o = weighted(lib, data, scale, mn, half, p, bits, gs, d)
        if not (torch.allclose(s, want, rtol=1e-4, atol=1e-4) and
                torch.allclose(o, torch.bmm(p, deq), rtol=1e-4, atol=1e-4)):
            return f"{bits}-bit, group {gs}, d {d}: results differ"
        if r <= _STATE["limits"][2] and not _attend_agrees(lib, pk, deq, q, cfg, d):
            return f"{bits}-bit, group {gs}, d {d}: the whole-chunk call differs"
    return None


def _attend_agrees(lib, pk, deq, q, cfg, d) -> bool:
    """Attend on matrices (3, 17, d) (K = V) with a row partly and a row wholly masked, against
    the same softmax block in PyTorch."""
    import types
    parts = [t.transpose(0, 1) for t in pk.parts()]        # (n, matrices, groups, x), as the engine's
    invalid = torch.zeros(3, 18, dtype=torch.bool)
    invalid[1, :5] = True
    invalid[2, :17] = True
    c, r = q.shape[:2]
    state = types.SimpleNamespace(q=q, invalid=invalid, masked=True, m=torch.empty(c, r),
                                  total=torch.empty(c, r), acc=torch.empty(c, r, d))
    run = Attend(lib, parts, parts, cfg, d)
    if not run.prepare(state):
        return True
    run(state, 0, 1, 17)
    run(state, 1, 3, 17)                                    # a chunk not at matrix 0
    sc = torch.bmm(q, deq.transpose(1, 2)).masked_fill(invalid[:, None, :17], float("-inf"))
    m = sc.amax(-1)
    p = (sc - torch.where(torch.isinf(m), 0.0, m)[..., None]).exp()
    return (torch.equal(state.m.isinf(), m.isinf()) and torch.allclose(state.m[~m.isinf()], m[~m.isinf()]) and
            torch.allclose(state.total, p.sum(-1), rtol=1e-4, atol=1e-5) and
            torch.allclose(state.acc, torch.bmm(p, deq), rtol=1e-4, atol=1e-4))
