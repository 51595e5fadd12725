"""The vocabulary metrics' per-row sums in one fused kernel per block of row pairs (CPU, numba).

:func:`block_sums` returns what :func:`prunerep.probes.metrics._block_sums` returns (the same
keys and definitions), so :func:`prunerep.probes.metrics._finish` turns either into the
metrics. The eager torch path makes ~45 vocabulary-sized passes per row pair; here a row pair is
read from memory once and then re-read from the core's cache:

0. the top-k of each side, ranked as :func:`prunerep.probes.metrics._top` ranks them (group
   maxima, then the members of the groups that can hold a top-k element);
1. the plain sums (Σz_d, Σz_d², Σz_d Δz, ‖Δz‖², Σz_p, Σz_p², and of y = Δz − Δz[argmax z_d]); a
   NaN/inf logit makes them non-finite, and the row is flagged for the general path there;
2. (logit) the orthogonal parts of Δz and of the centred Δz, whose coefficients pass 1 gave;
3. per temperature, the unnormalised p̃ = exp((z_d − max) / T), u = expm1(y / T) and
   q̃ ∝ p̃ e^{y/T} (one polynomial gives e^g and expm1 g), with every sum over them; p̃, q̃, u
   go to a per-row scratch buffer;
4. per temperature, the sums that need E_p[u] from pass 3 (JS's log(m/p) = log1p(t) and the
   geometry of p).

Every element is taken to float64 and every sum is a float64 sum, so the result is the float64
computation of the given float32 rows: within 1e-6 relative of the eager path run on the same
rows in float64 (``tests/test_fused_metrics.py``). Sums over p use p̃ (Σp̃ is the normaliser),
which ``_finish`` divides out as it does the eager path's Σp ≈ 1. Each row is one iteration of
the parallel loop, in a fixed order, so a row's values do not depend on the batch or the thread
count.

exp, expm1 and log1p are written out (range reduction and a polynomial) because numba's
``math.exp`` is a scalar libm call that keeps the loop from vectorising (13 ns against ~1 ns per
element and function with AVX2).

The kernel is compiled at first use (~5-15 s) and cached on disk by numba (``cache=True``: the
package's ``__pycache__``, or numba's per-user cache directory where the install is read-only,
or ``NUMBA_CACHE_DIR``). Without numba (:data:`AVAILABLE` false), ``probe.kernel=auto`` is eager.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

try:  # an optional accelerator: the eager path computes the same metrics without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; a platform without a wheel stays eager
    numba = None

AVAILABLE = numba is not None

if AVAILABLE and numba.config.CPU_FEATURES is None:  # NUMBA_CPU_FEATURES, where set, wins
    import llvmlite.binding

    # LLVM gives AVX-512 CPUs 256-bit vectors (older ones lowered their clock for 512-bit work).
    # The kernel is bound by float64 arithmetic, which 512-bit vectors do twice as wide: 1.3x
    # faster on the bench machine. The flag only reaches numba's code, and its cache keys on it.
    _features = llvmlite.binding.get_host_cpu_features().flatten()
    if "+avx512f" in _features.split(","):
        numba.config.CPU_FEATURES = _features + ",-prefer-256-bit"

#: the per-row scalar slots of the kernel's output, in order; ``@`` keys repeat per temperature
_ROW = ("sy", "syy", "sxx", "ndz", "a", "no", "sx", "a_c", "no_c", "m_d", "m_p",
        "const_d", "const_p", "zero_p", "bad")
_PER_T = ("sd", "sq", "p_top", "q_top", "hp", "hq", "sqy", "spu", "sw", "swy", "spw", "sww", "spp",
          "spl", "sql", "nd", "ap", "nop")
_N_ROW, _N_PER_T = len(_ROW), len(_PER_T)

# reassociation lets the sums vectorise; contraction gives FMAs. No 'nnan'/'ninf': an overflow
# must stay inf (it sends the row to the general path)
_FM = {"reassoc", "contract"}
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LOG2E = 1.4426950408889634
_SQRT2 = 1.4142135623730951


def _jit(**kw):
    return njit(fastmath=_FM, cache=True, **kw) if AVAILABLE else (lambda f: f)


@_jit(inline="always")
def _expm1_reduced(r):
    """expm1(r) for |r| <= ln2 / 2: Taylor to r^10 (the next term is < 1e-12 relative: the
    metrics are float32 values, and each sum's error is relative to its own size)."""
    p = 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    return r + r * r * p


@_jit(inline="always")
def _split2(x):
    """x = n ln2 + r: (2^n, expm1(r)), n clamped to float64's normal exponents."""
    n = np.floor(x * _LOG2E + 0.5)
    n = min(max(n, -1022.0), 1023.0)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    f = np.int64((np.int64(n) + 1023) << 52).view(np.float64)
    return f, _expm1_reduced(r)


@_jit(inline="always")
def _exp(x):
    f, em = _split2(x)
    v = f + f * em
    v = 0.0 if x < -708.0 else v
    return math.inf if x > 709.78 else v


@_jit(inline="always")
def _log1p(t):
    """log(1 + t) for t > −1 (here t >= −1/2): x = 1 + t = 2^e m, m in [√½, √2),
    log m = 2 atanh(s), s = (m − 1)/(m + 1), |s| <= 0.172, to s^19 (< 1e-13 relative); plus the
    rounding of 1 + t."""
    x = 1.0 + t
    bits = np.float64(x).view(np.int64)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = np.int64((bits & 0xFFFFFFFFFFFFF) | (np.int64(1023) << 52)).view(np.float64)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    ef = np.float64(e)
    log_x = (ef * _LN2_HI + (2.0 * s + 2.0 * s * s2 * p)) + ef * _LN2_LO
    return log_x + (t - (x - 1.0)) / x


@_jit(inline="always")
def _ratio(num, den):
    """num / den with 0/0 = 0 and x/0 = +inf (as metrics._ratio)."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


#: top-k over a vocabulary, here and in metrics._top: the maxima of groups of this many logits first
#: (index mod V // TOPK_GROUP), then the members of the groups that can hold a top-k element (one cheap
#: pass instead of a selection over V; any size gives the same top-k)
TOPK_GROUP = 64


@_jit(inline="always")
def _before(val, i, other_val, other_i):
    """(val, i) ranks before (other_val, other_i): a larger value, or an equal one at a lower index."""
    return val > other_val or (val == other_val and i < other_i)


@_jit(inline="always")
def _insert(val, i, k, vals, idx, count):
    """Put (val, i) into the ranked list vals/idx of ``count`` <= k entries if it belongs there;
    returns the new count."""
    if count == k and not _before(val, i, vals[k - 1], idx[k - 1]):
        return count
    pos = min(count, k - 1)
    while pos > 0 and _before(val, i, vals[pos - 1], idx[pos - 1]):
        vals[pos] = vals[pos - 1]
        idx[pos] = idx[pos - 1]
        pos -= 1
    vals[pos] = val
    idx[pos] = i
    return min(count + 1, k)


@_jit()
def _topk(z, k, idx, gmax, vals):
    """The top-k of ``z`` into ``idx``, ranked by value and then by index (the lower index first,
    as :func:`prunerep.probes.metrics._top`): the maxima of the G = V // 64 groups of logits of
    equal index modulo G (64 vectorised passes over contiguous slices), the k-th largest of
    them, then the members of every group whose maximum reaches it, and the V mod 64 last
    logits (an element of the top-k is at least as large as the k-th largest group maximum, so
    it lies in such a group)."""
    v = z.shape[0]
    g = v // TOPK_GROUP
    for i in range(g):
        gmax[i] = z[i]
    for s in range(1, TOPK_GROUP):
        off = s * g
        for i in range(g):
            x = z[off + i]
            gmax[i] = x if x > gmax[i] else gmax[i]
    count = 0
    for i in range(g):
        count = _insert(np.float64(gmax[i]), i, k, vals, idx, count)
    kth = vals[count - 1] if count else -math.inf
    count = 0
    for i in range(g):
        if gmax[i] >= kth:
            for j in range(i, g * TOPK_GROUP, g):
                count = _insert(np.float64(z[j]), j, k, vals, idx, count)
    for j in range(g * TOPK_GROUP, v):
        count = _insert(np.float64(z[j]), j, k, vals, idx, count)
    for i in range(count, k):  # fewer than k comparable elements (NaN): the row is flagged bad
        idx[i] = 0


@_jit(inline="always")
def _row(zd, zp, k, inv_t, logit, probability, out, idx_d, idx_p, scratch, gmax, vals):
    """One row pair: the top-k of each side (``idx_d``; ``idx_p`` with ``probability``), then
    the scalar slots (:data:`_ROW`, then :data:`_PER_T` per temperature) into ``out``, or only
    ``bad`` where the row holds a NaN/inf; ``scratch`` [3, V] holds p̃, q̃ and u of one
    temperature between its passes, ``gmax`` and ``vals`` the top-k scan's."""
    v = zd.shape[0]
    _topk(zd, k, idx_d, gmax, vals)
    first = idx_d[0]
    m_d = np.float64(zd[first])
    dz_top = np.float64(zp[first]) - m_d
    # pass 1: the plain sums; Σy, Σy² from y = Δz − Δz_top explicitly (its mean is small: the
    # one-pass variances stay accurate)
    sy = 0.0
    syy = 0.0
    sxy = 0.0
    sx = 0.0
    sxx = 0.0
    sxdz = 0.0
    sdd = 0.0
    sp = 0.0
    spp_z = 0.0
    for j in range(v):
        a = np.float64(zd[j])
        b = np.float64(zp[j])
        dz = b - a
        sx += a
        sxx += a * a
        sxdz += a * dz
        sdd += dz * dz
        sp += b
        spp_z += b * b
        y = dz - dz_top
        sy += y
        syy += y * y
        sxy += a * y
    if not math.isfinite(sx + sp):  # a NaN/inf logit: the general path takes the row
        out[14] = 1.0
        return
    out[0] = sy
    out[1] = syy
    out[2] = sxx
    out[3] = math.sqrt(sdd)
    out[6] = sx
    out[9] = m_d
    # constant rows (the centred zero vector) and a zero pruned row, as metrics._zero_flags: from
    # the moments, and from the extremes only where the moments leave a row in doubt (rare)
    tol = 1e-6
    const_d = False
    const_p = False
    zero_p = False
    if (sxx - sx * sx / v <= tol * sxx or spp_z - sp * sp / v <= tol * max(spp_z, 0.0)
            or spp_z <= tol * sxx):
        min_d = math.inf
        min_p = math.inf
        max_p = -math.inf
        for j in range(v):
            min_d = min(min_d, np.float64(zd[j]))
            min_p = min(min_p, np.float64(zp[j]))
            max_p = max(max_p, np.float64(zp[j]))
        const_d = min_d == m_d
        const_p = min_p == max_p
        zero_p = max_p == 0.0 and min_p == 0.0
    out[11] = 1.0 if const_d else 0.0
    out[12] = 1.0 if const_p else 0.0
    out[13] = 1.0 if zero_p else 0.0
    if logit:
        a_raw = _ratio(sxdz, sxx)
        var_x = max(sxx - sx * sx / v, 0.0)
        a_c = 0.0 if const_d else _ratio(sxy - sx * sy / v, var_x)
        c = (sy - a_c * sx) / v
        no = 0.0
        no_c = 0.0
        for j in range(v):
            a = np.float64(zd[j])
            dz = np.float64(zp[j]) - a
            o = dz - a_raw * a
            oc = (dz - dz_top) - a_c * a - c
            no += o * o
            no_c += oc * oc
        out[4] = a_raw
        out[5] = math.sqrt(no)
        out[7] = a_c
        out[8] = math.sqrt(no_c)
    if probability:
        _topk(zp, k, idx_p, gmax, vals)
        m_p = np.float64(zp[idx_p[0]])
        out[10] = m_p
        for ti in range(inv_t.shape[0]):
            s = inv_t[ti]
            c_q = math.exp((dz_top + m_d - m_p) * s)
            o = out[_N_ROW + ti * _N_PER_T:]
            sd = 0.0
            sq = 0.0
            hp = 0.0
            hq = 0.0
            sqy = 0.0
            spu = 0.0
            sw = 0.0
            swy = 0.0
            spw = 0.0
            sww = 0.0
            spp = 0.0
            sppu = 0.0
            for j in range(v):
                a = np.float64(zd[j])
                b = np.float64(zp[j])
                y = (b - a) - dz_top
                p = _exp((a - m_d) * s)
                g = y * s
                f, em = _split2(g)
                # q̃ = exp((z_p − m_p) s) = p̃ e^g e^{(Δz_top + m_d − m_p) s}, with e^g and expm1 g
                # from one polynomial: a second exp saved
                u = f * em + (f - 1.0)
                q = p * (f + f * em) * c_q
                u = -1.0 if g < -708.0 else u
                q = 0.0 if g < -708.0 else q
                u = math.inf if g > 709.78 else u
                q = math.inf if g > 709.78 else q
                scratch[0, j] = p
                scratch[1, j] = q
                scratch[2, j] = u
                w = p * y
                sd += p
                sq += q
                hp += p * a
                hq += q * b
                sqy += q * y
                spu += p * u
                sw += w
                swy += w * y
                spw += p * w
                sww += w * w
                spp += p * p
                sppu += p * p * u
            # ½ (q/p − 1) = (u − E) / (2 (1 + E)), E = E_p[u]: Δ = q − p ∝ p·t and log(m/p) = log1p(t)
            big_e = spu / sd
            half = 0.5 / (1.0 + big_e)
            # Σ p d = ½ Σ p² (u − E) / (1 + E): the parallel coefficient before the last pass
            spd = half * (sppu - big_e * spp)
            ap = _ratio(spd, spp)
            spl = 0.0
            sql = 0.0
            sdd2 = 0.0
            nop = 0.0
            for j in range(v):
                p = scratch[0, j]
                t = (scratch[2, j] - big_e) * half
                d = p * t
                lm = _log1p(t)
                r = d - ap * p
                spl += p * lm
                sql += scratch[1, j] * lm
                sdd2 += d * d
                nop += r * r
            o[0] = sd
            o[1] = sq
            o[2] = 1.0  # p̃ at the dense top token, q̃ at the pruned one: exp(0)
            o[3] = 1.0
            o[4] = hp
            o[5] = hq
            o[6] = sqy
            o[7] = spu
            o[8] = sw
            o[9] = swy
            o[10] = spw
            o[11] = sww
            o[12] = spp
            o[13] = spl
            o[14] = sql
            o[15] = math.sqrt(sdd2)
            o[16] = ap
            o[17] = math.sqrt(nop)


@_jit(parallel=True)
def _kernel(zd, zp, k, inv_t, logit, probability, out, idx_d, idx_p):
    v = zd.shape[1]
    for r in prange(zd.shape[0]):
        scratch = np.empty((3, v if probability else 0), dtype=np.float64)
        gmax = np.empty_like(zd[r, :v // TOPK_GROUP])
        vals = np.empty(k, dtype=np.float64)
        _row(zd[r], zp[r], k, inv_t, logit, probability, out[r], idx_d[r], idx_p[r], scratch, gmax, vals)


def block_sums(zd: Tensor, zp: Tensor, k: int, temperatures: tuple[float, ...], logit: bool,
               probability: bool) -> dict[str, Tensor]:
    """The sums of :func:`prunerep.probes.metrics._block_sums` of ``[rows, V]`` CPU logits
    (float32 or float64, both the same dtype), every row in one call, as float64 sums, with the
    top-k indices of each side (``idx_d``, ``idx_p``: k of them with ``probability``, else the
    dense argmax alone) and their first maxima. A row holding a NaN/inf, or whose exp
    overflows, is flagged in ``retry`` (its other values are meaningless)."""
    n = zd.shape[0]
    k = k if probability else 1
    nt = len(temperatures) if probability else 0
    out = np.zeros((n, _N_ROW + nt * _N_PER_T), dtype=np.float64)
    idx_d = np.zeros((n, k), dtype=np.int64)
    idx_p = np.zeros((n, k if probability else 0), dtype=np.int64)
    inv_t = np.array([1.0 / t for t in temperatures[:nt]], dtype=np.float64)
    if n:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        _kernel(zd.contiguous().numpy(), zp.contiguous().numpy(), k, inv_t, logit, probability, out, idx_d, idx_p)
    col = {key: torch.from_numpy(out[:, i]) for i, key in enumerate(_ROW)}
    idx_d = torch.from_numpy(idx_d)
    res = {"sy": col["sy"], "syy": col["syy"], "first_d": idx_d[:, 0], "retry": col["bad"] == 1}
    if logit:
        res.update(const_d=col["const_d"] == 1, const_p=col["const_p"] == 1, zero_p=col["zero_p"] == 1,
                   **{key: col[key] for key in ("sxx", "ndz", "a", "no", "sx", "a_c", "no_c")})
    if probability:
        idx_p = torch.from_numpy(idx_p)
        res.update(m_d=col["m_d"], m_p=col["m_p"], idx_d=idx_d, idx_p=idx_p, first_p=idx_p[:, 0])
        for i in range(nt):
            start = _N_ROW + i * _N_PER_T
            for j, key in enumerate(_PER_T):
                res[f"{key}@{i}"] = torch.from_numpy(out[:, start + j])
            res["retry"] |= ~torch.isfinite(res[f"spu@{i}"])
    return res
