"""How far a pruned model's representations are from the dense model's: pure tensor math.

Every function takes tensors and returns tensors; nothing here touches a model, a file or
the model's state (:func:`compile_once` keeps ``torch.compile``'s functions for the process).
The conventions, shared by all functions:

* **Rows are tokens, the last dimension is features** (hidden size, or vocabulary for
  logits and probabilities). Each metric reduces the last dimension: inputs of shape
  ``[..., D]`` give one value per row, shape ``[...]``.
* **Dense first, pruned second.** ``Δ = x_pruned − x_dense`` and every ratio is relative
  to the dense side.
* **Precision.** Half-precision inputs (bf16, fp16) are computed in float32; float32 stays
  float32 and float64 stays float64 (the tests use float64 to check second-order
  estimates at tiny perturbations).
* **Zero vectors** never produce NaN by themselves: ``cos(0, 0) = 1`` (identical),
  ``cos(0, x≠0) = 0``; a ratio ``a / ‖x_dense‖`` with ``‖x_dense‖ = 0`` is ``0`` when
  ``a = 0`` and ``+inf`` otherwise. For the centred logit metrics the zero vector is a
  constant row (all logits equal).
* **Non-finite inputs propagate.** A NaN/inf anywhere in a row gives a non-finite value
  for that row (never silently a number; the geometry metrics give NaN).
* **Probabilities** are ``p = softmax(z / T)``. A ``-inf`` logit (a masked token, p = 0) is
  allowed: its terms count as ``0 · log 0 = 0``.

Raw and centred logits. The softmax ignores a constant added to every logit of a row, so
the logit geometry is reported twice: on the raw ``z`` (``cos``, ``rel_l2``, ...: what the
logit lens outputs) and on the centred ``z − mean_V(z)`` (``cos_centred``,
``rel_l2_centred``, ...: invariant to such a shift, which is the version the paper's
argument, "z barely moves, p is amplified", needs). ``var_uniform`` = Var_u(Δz) is
shift-invariant already (it is ``‖Δz_centred‖² / V``).

KL direction: ``kl`` is ``KL(p_dense ‖ p_pruned) = Σ p_dense (log p_dense − log p_pruned)``,
the expectation under the dense model. The paper's released code and its README disagree
on the direction (one computes KL(dense‖pruned), the other describes KL(pruned‖dense)), so
both are reported: ``kl`` (this direction) and ``reverse_kl``. The second-order estimate
``Var_p(Δz) / (2T²)`` is the same for both directions to leading order.

Second-order estimates (He et al. 2026), with ``Δz = z_pruned − z_dense`` in raw logits:

* ``KL ≈ Var_p(Δz) / (2T²)``, the variance weighted by ``p = p_dense`` at temperature T;
* ``1 − cos(p_dense, p_pruned) ≈ Var_r(Δz) / (2T²)`` with ``r ∝ p_dense²``
  (exactly: ``cos = E_r[e^δ] / sqrt(E_r[e^{2δ}])`` with ``δ = Δz/T``);
* the uniform-weight variance ``Var_u(Δz)`` is what an unweighted view of the logits sees.

The plain one-metric-at-a-time definitions these functions are checked against live in
``tests/oracle.py``.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

from prunerep.probes import fused as F

__all__ = ["geometry", "option_metrics", "vocab_metrics", "GEOMETRY_METRICS", "CENTRED"]

GEOMETRY_METRICS = ("cos", "one_minus_cos", "rel_l2", "par_rel", "orth_rel", "orth_par_ratio")
#: suffix of the logit-space geometry of the centred logits z − mean_V(z)
CENTRED = "_centred"

# rows of [rows, V] processed together (~2 MB of float32 per buffer: the ~10 buffers stay in
# a CPU's last-level cache, and each tensor op has enough work to be worth splitting over
# torch's threads). Every block has the same (even) number of rows, zero-padded: fixed shapes
# make each row's result independent of how the rows were batched (bit-identical for any
# token_chunk on CPU).
ROW_BLOCK_ELEMENTS = 1 << 19
# per-row scalar arithmetic (the last, O(rows) stage) runs on slabs of this many rows, padded:
# the same SIMD path for every row whatever the batch size
FINISH_ROWS = 256


# --------------------------------------------------------------------------- helpers

def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both in one float dtype: float32 for half precision and integers, else as given."""
    a = a if a.dtype in (torch.float32, torch.float64) else a.float()
    b = b if b.dtype in (torch.float32, torch.float64) else b.float()
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _dot(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Row-wise Σ a·b; the products go to ``out`` (a scratch buffer shaped like a) if given."""
    return torch.mul(a, b, out=out).sum(dim=-1)


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def _wdot(w: Tensor, x: Tensor, masked: bool, out: Tensor | None = None) -> Tensor:
    """Row-wise Σ w·x where, if ``masked``, the terms with w = 0 count 0 (also when x is ±inf
    or NaN there: 0 · log 0 = 0 for a masked token); a NaN weight stays NaN."""
    terms = torch.mul(w, x, out=out)
    if masked:
        terms = terms.masked_fill_(w == 0, 0.0)
    return terms.sum(dim=-1)


def _weighted_var(w: Tensor, y: Tensor, y2: Tensor, out: Tensor | None = None) -> Tensor:
    """Var_w(y) = E_w[y²] − E_w[y]² per row from y and y², w normalised by its sum (Σp is 1
    only to rounding). One pass: y is shifted so that its mean is small (see :func:`_general_block`)."""
    total = w.sum(dim=-1)
    return _dot(w, y2, out) / total - (_dot(w, y, out) / total).square()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den per row, with 0/0 = 0 and x/0 = +inf (num, den >= 0 or NaN)."""
    zero_den = den == 0
    safe = torch.where(zero_den, torch.ones_like(den), den)
    out = num / safe
    return torch.where(zero_den & (num != 0), torch.full_like(out, math.inf), out)


def _finite(*ts: Tensor) -> bool:
    """All entries finite? One read pass each: a sum is NaN/inf iff an entry is (the values
    here are logits, far from overflowing a float32 sum)."""
    return all(bool(torch.isfinite(t.sum())) for t in ts)


# --------------------------------------------------------------------------- geometry

def geometry(x_dense: Tensor, x_pruned: Tensor) -> dict[str, Tensor]:
    """Cosine, relative L2 and the parallel/orthogonal split of Δ = x_pruned − x_dense.

    Δ = a·x_dense + o with o ⟂ x_dense. Returned per row:

    * ``cos``, ``one_minus_cos`` — cosine similarity of x_dense and x_pruned;
    * ``rel_l2``  — ‖Δ‖ / ‖x_dense‖;
    * ``par_rel`` — ‖a·x_dense‖ / ‖x_dense‖ = |a|;
    * ``orth_rel`` — ‖o‖ / ‖x_dense‖;
    * ``orth_par_ratio`` — orth_rel / par_rel (0 when Δ = 0, +inf when Δ ⟂ x_dense exactly).

    1 − cos is computed from the split, not as 1 − dot/(‖x‖‖y‖): with s = 1 + a,
    o' = orth_rel and R = hypot(s, o'), cos = s / R and 1 − cos = o'² / (R (R + s)) for
    s ≥ 0 — accurate down to 1 − cos ~ eps², where the textbook formula stops at ~eps —
    and exactly 0 when x_pruned == x_dense. Zero vectors follow the module conventions.
    """
    xd, xp = _pair(x_dense, x_pruned)
    return _geometry(xd, xp - xd, _is_zero(xp))


def _is_zero(x: Tensor) -> Tensor:
    """Rows that are the zero vector (per the norm, as for x_dense in :func:`_geometry`)."""
    return _norm(x) == 0


def _geometry(xd: Tensor, delta: Tensor, pruned_zero: Tensor | None, prod: Tensor | None = None
              ) -> dict[str, Tensor]:
    """:func:`geometry` from x_dense, Δ and which x_pruned rows are 0 (None: none can be, as
    for probabilities); overwrites ``delta`` (with o) to save a buffer (and ``prod``, a
    scratch buffer for the products, if given)."""
    nd = _norm(xd)
    a = _ratio(_dot(delta, xd, prod), nd.square())  # x_dense = 0 -> a = 0 (then o = Δ)
    norm_delta = _norm(delta)
    orth = delta.addcmul_(a.unsqueeze(-1), xd, value=-1.0)
    return _split(nd, norm_delta, a, _norm(orth), nd == 0, pruned_zero)


def _split(nd: Tensor, norm_delta: Tensor, a: Tensor, norm_orth: Tensor, dense_zero: Tensor,
           pruned_zero: Tensor | None) -> dict[str, Tensor]:
    """The geometry metrics from ‖x_dense‖, ‖Δ‖, the parallel coefficient a, ‖o‖ and which
    rows are zero vectors on either side (see :func:`geometry`)."""
    par = a.abs()
    orth_rel = _ratio(norm_orth, nd)
    s = 1.0 + a
    r = torch.hypot(s, orth_rel)
    omc = torch.where(s >= 0, orth_rel.square() / (r * (r + s)), (r - s) / r)
    # zero vectors: cos(0, 0) = 1, cos(0, x) = cos(x, 0) = 0
    # x_pruned = 0 is tested directly: a = −1 and o = 0 hold there only to rounding
    pruned_zero = torch.zeros_like(dense_zero) if pruned_zero is None else pruned_zero
    omc = torch.where(dense_zero & pruned_zero, torch.zeros_like(omc), omc)
    omc = torch.where(dense_zero ^ pruned_zero, torch.ones_like(omc), omc)
    out = {"cos": 1.0 - omc, "one_minus_cos": omc, "rel_l2": _ratio(norm_delta, nd),
           "par_rel": par, "orth_rel": orth_rel, "orth_par_ratio": _ratio(orth_rel, par)}
    # a row with a NaN/inf in either input is NaN in every metric (never a number)
    finite = torch.isfinite(nd) & torch.isfinite(norm_delta)
    return {k: torch.where(finite, v, torch.full_like(v, math.nan)) for k, v in out.items()}


# --------------------------------------------------------------------------- multiple choice

def option_metrics(z_dense: Tensor, z_pruned: Tensor, option_ids: Sequence[int],
                   temperature: float = 1.0) -> dict[str, Tensor]:
    """Multiple choice: p restricted to the option tokens and renormalised.

    Returns ``kl`` (KL(dense‖pruned) over the options), ``top1_agree`` (same chosen
    option) and ``margin_dense`` / ``margin_pruned`` (top minus second option probability)."""
    ids = torch.as_tensor(list(option_ids), device=z_dense.device)
    od, op = _pair(z_dense.index_select(-1, ids), z_pruned.index_select(-1, ids))
    logp = torch.log_softmax(od if temperature == 1.0 else od / temperature, dim=-1)
    logq = torch.log_softmax(op if temperature == 1.0 else op / temperature, dim=-1)
    p = logp.exp()

    def margin(logx: Tensor) -> Tensor:
        top2 = logx.exp().topk(min(2, logx.shape[-1]), dim=-1).values
        return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)

    return {"kl": _wdot(p, logp - logq, not _finite(logp)),
            "top1_agree": (od.argmax(dim=-1) == op.argmax(dim=-1)).to(od.dtype),
            "margin_dense": margin(logp), "margin_pruned": margin(logq)}


# --------------------------------------------------------------------------- the hot path

def vocab_metrics(z_dense: Tensor, z_pruned: Tensor, temperatures: Sequence[float] = (1.0,),
                  topk: Iterable[int] = (5, 10), logit: bool = True, probability: bool = True,
                  compiled: bool = False, fused: bool = False) -> dict[tuple[str, str, float], Tensor]:
    """Every logit- and probability-space metric of a chunk of logits, keyed
    ``(space, metric, T)`` with ``T = nan`` for temperature-free metrics.

    * ``logit``: the geometry of z (:func:`geometry`), the same geometry of the centred
      logits z − mean_V(z) (``cos_centred``, ``one_minus_cos_centred``, ``rel_l2_centred``,
      ``par_rel_centred``, ``orth_rel_centred``, ``orth_par_ratio_centred``) and
      ``var_uniform`` = Var_u(Δz);
    * ``probability``, temperature-free: ``top1_agree``, ``top{k}_overlap`` (|top-k dense ∩
      top-k pruned| / k, order ignored; k capped at the vocabulary);
    * ``probability`` at each T: the geometry of p, ``kl``, ``reverse_kl``, ``js`` (Jensen–
      Shannon, nats), ``entropy_dense``, ``entropy_pruned``, ``var_p`` = Var_p(Δz),
      ``var_r`` = Var_r(Δz) (r ∝ p²), ``kl_est`` = var_p/(2T²), ``cos_est`` = var_r/(2T²)
      (estimates 1 − cos(p)) and ``unif_est`` = Var_u(Δz)/(2T²).

    Only what ``logit`` / ``probability`` ask for is computed. Each row's values depend on
    that row only, bit for bit, whatever the batch size.

    How: rows with finite logits (all of them, in practice) go through :func:`_block_sums`
    in blocks of ~2 MB per buffer that stay in the CPU's caches, one read of each
    vocabulary-sized buffer per sum; everything per row (the metrics from those sums) is then
    computed at once for the chunk. The top-k of each side is found once, for every k. Each
    pass runs on torch's intra-op threads (the caller sets how many). Rows holding a NaN/inf
    (masked tokens) take :func:`_general_block`, which counts ``0 · log 0 = 0``.
    ``compiled=True`` runs the blocks of finite rows through ``torch.compile`` instead
    (compiled once per process, then cached on disk by PyTorch); where the compiler fails, the
    eager run takes over (warned once). ``fused=True`` (CPU tensors, numba installed) computes the
    sums of all finite rows in one call of :func:`prunerep.probes.fused.block_sums` instead: a
    few passes per row pair, in float64; the metrics are returned in the eager path's dtype.
    """
    zd, zp = _pair(z_dense, z_pruned)
    fused = fused and F.AVAILABLE and zd.device.type == "cpu"
    lead, v = zd.shape[:-1], zd.shape[-1]
    zd, zp = zd.reshape(-1, v), zp.reshape(-1, v)
    n = zd.shape[0]
    if not (logit or probability):
        return {}
    temps = tuple(float(t) for t in temperatures)
    ks = tuple(sorted({min(int(k), v) for k in topk} | {1}))  # 1 (top-1) first
    if n == 0:  # the keys, with no rows
        return {k: val[:0].reshape(lead) for k, val in vocab_metrics(
            zd.new_zeros(1, v), zp.new_zeros(1, v), temps, ks, logit, probability, compiled, fused).items()}
    block = max(2, ROW_BLOCK_ELEMENTS // max(v, 1) // 2 * 2)

    def blocks(fast: bool, rows: Tensor | None, count: int) -> dict:
        """The rows (all when ``rows`` is None) in padded blocks, through the fast or general path."""
        if fast and fused:  # every row in one call: each row is one iteration of the kernel's loop
            bd, bp = (zd, zp) if rows is None else (zd.index_select(0, rows), zp.index_select(0, rows))
            return F.block_sums(bd, bp, ks[-1], temps, logit, probability)
        scratch, parts = None, []  # one set of buffers for all blocks of this call, made on first use
        for start in range(0, count, block):
            stop = min(start + block, count)
            bd = zd[start:stop] if rows is None else zd.index_select(0, rows[start:stop])
            bp = zp[start:stop] if rows is None else zp.index_select(0, rows[start:stop])
            if stop - start < block:  # pad: every call reduces [block, V], so no row depends on its neighbours
                bd = torch.cat([bd, bd.new_zeros(block - (stop - start), v)])
                bp = torch.cat([bp, bp.new_zeros(block - (stop - start), v)])
            args = (bd, bp, temps, ks, logit, probability)
            fn = _block_sums if fast else _general_block
            part = compile_once(fn)(*args) if (compiled and fast) else None  # rows with NaN/inf: rare, eager
            if part is None:
                scratch = scratch or _scratch(fast, block, v, zd)
                part = fn(*args, scratch)
            parts.append({k: val[:stop - start] for k, val in part.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    out = _vocab_rows(zd, zp, n, blocks, temps, ks, v, logit, probability, fused)
    return {k: val.reshape(lead) for k, val in out.items()}


def _vocab_rows(zd: Tensor, zp: Tensor, n: int, blocks, temps, ks, v: int, logit: bool, probability: bool,
                fused: bool) -> dict:
    """:func:`vocab_metrics` of ``[n, V]`` rows: finite rows on the fast path, the others (and
    the fast path's overflows) on the general one. The fused kernel finds the non-finite rows
    itself (in its first pass), so every row goes to it."""
    finite = (torch.ones(n, dtype=torch.bool, device=zd.device) if fused
              else torch.isfinite(zd.sum(dim=-1)) & torch.isfinite(zp.sum(dim=-1)))
    fast_rows = None if bool(finite.all()) else finite.nonzero().squeeze(-1)
    n_fast = n if fast_rows is None else len(fast_rows)
    out = _finish(blocks(True, fast_rows, n_fast), temps, ks, v, logit, probability) if n_fast else {}
    out = {k: val if val.dtype == torch.bool else val.to(zd.dtype) for k, val in out.items()}  # fused: float64 sums
    retry = out.pop("retry", None)
    general = (~finite).nonzero().squeeze(-1)
    if retry is not None and bool(retry.any()):  # exp overflowed on the fast path: computed again
        general = torch.cat([general, retry.nonzero().squeeze(-1) if fast_rows is None else fast_rows[retry]])
    if len(general):
        general = general.sort().values
        slow = blocks(False, general, len(general))
        if fast_rows is not None or not out:  # scatter the fast rows into full-length outputs
            full = {k: val.new_full((n,), math.nan) for k, val in slow.items()}
            for k, val in out.items():
                full[k][fast_rows if fast_rows is not None else slice(None)] = val
            out = full
        for k, val in slow.items():
            out[k][general] = val
    return out


def _scratch(fast: bool, rows: int, v: int, like: Tensor) -> dict | tuple:
    """Buffers for blocks of ``[rows, V]``: named (:data:`_FAST_BUFFERS`) for the fast path, a
    tuple of :data:`_N_SCRATCH` for the general one."""
    names = _FAST_BUFFERS if fast else range(_N_SCRATCH)
    bufs = torch.empty((len(names), rows, v), dtype=like.dtype, device=like.device)
    return dict(zip(names, bufs)) if fast else tuple(bufs)


# --------------------------------------------------------------------------- fast path: per-row sums

_FAST_BUFFERS = ("dz", "y", "o", "p", "q", "u", "d")


def _top(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices of the top-k of each row, by value and then by index: of equal values the lower
    index comes first and is the one kept at the k-th place; the row's argmax, its first maximum).

    For a large vocabulary: the logits fall into G groups by index modulo G (G = V // F.TOPK_GROUP,
    so each group has F.TOPK_GROUP members), the maxima of the groups come from one vectorised
    pass (the element-wise max of F.TOPK_GROUP contiguous slices), then the top-k of the members of
    every group whose maximum reaches the k-th largest group maximum (k groups, more on a tie):
    every element at least as large as the k-th largest element lies in one of them."""
    b, v = z.shape
    m = F.TOPK_GROUP
    groups = v // m
    if groups < 4 * k:
        cand = torch.arange(v, device=z.device).expand(b, -1)
    else:
        gmax = z[:, :groups * m].view(b, m, groups).amax(dim=1)
        kth = gmax.topk(k, dim=-1).values[:, -1:]
        wide = int((gmax >= kth).sum(dim=-1).max())  # > k only where group maxima tie at the k-th
        gidx = gmax.topk(wide, dim=-1).indices
        cand = (gidx.unsqueeze(-1) + groups * torch.arange(m, device=z.device)).flatten(1)
        if groups * m < v:
            cand = torch.cat([cand, torch.arange(groups * m, v, device=z.device).expand(b, -1)], dim=1)
    vals = z.gather(1, cand)
    top = vals.topk(k, dim=-1)
    idx, top_vals = cand.gather(1, top.indices), top.values
    tied = (vals >= top_vals[:, -1:]).sum(dim=-1) > k  # a tie across the k-th place: which to keep
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(-1)
        c = cand[rows].sort(dim=-1).values  # by index, so that the stable sort keeps the lower first
        order = z[rows].gather(1, c).sort(dim=-1, descending=True, stable=True).indices[:, :k]
        idx[rows] = c.gather(1, order)
        top_vals[rows] = z[rows].gather(1, idx[rows])
    # within the k: by value, equal values by index
    idx, perm = idx.sort(dim=-1)
    idx = idx.gather(1, top_vals.gather(1, perm).sort(dim=-1, descending=True, stable=True).indices)
    return idx, idx[:, 0]


def _block_sums(zd: Tensor, zp: Tensor, temperatures: tuple[float, ...], ks: tuple[int, ...], logit: bool,
                probability: bool, scratch: dict | None = None) -> dict[str, Tensor]:
    """The per-row sums :func:`_finish` turns into metrics, for one block ``[rows, V]`` of
    finite logits. Eager with ``scratch`` (:data:`_FAST_BUFFERS`, each shaped like zd), or
    through ``torch.compile`` without (every ``out=None``: plain tensor expressions).

    One read of each vocabulary-sized buffer per sum, and every sum well conditioned:

    * Δz is shifted to its value at the dense top token, y = Δz − Δz[argmax z_dense] (p
      concentrates there, which keeps the one-pass weighted variances E_w[y²] − E_w[y]²
      accurate); the geometries' orthogonal parts are formed explicitly (accurate when Δ is
      nearly parallel to x);
    * p = softmax(z_d / T); its normalisation is only ~1e-5 accurate (a vectorised sum), so
      every sum over p is divided by Σp (torch's cascaded sum) instead of assuming 1; the same for q;
    * with g = y/T, log q − log p = g − M where M = log E_p[e^g] = log1p(E_p[expm1 g]):
      KL = M − E_p[g] and KL(q‖p) = E_q[g] − M take the differences of quantities that are
      each accurate to rounding relative to their (first-order) size, so a small KL keeps
      its digits (a log-probability difference loses them); q/p − 1 = (expm1 g − E)/(1 + E),
      E = E_p[expm1 g], gives Δ = q − p and JS's log(m/p) the same way. Where expm1 g
      overflows (a pruned logit ~88·T above the dense top token's) the row is flagged
      (``retry``) and computed again by :func:`_general_block`."""
    b = scratch.get if scratch is not None else (lambda _name: None)
    v = zd.shape[-1]
    out: dict[str, Tensor] = {}
    idx_d, first_d = _top(zd, ks[-1] if probability else 1)
    top = first_d.unsqueeze(-1)
    dz = torch.sub(zp, zd, out=b("dz"))
    dz_top = dz.gather(1, top)
    y = torch.sub(dz, dz_top, out=b("y"))
    sy = y.sum(dim=-1)
    out.update(sy=sy, syy=_dot(y, y, b("o")))
    m_d = zd.gather(1, top).squeeze(-1)
    if logit:
        # raw: Δz = a·z_dense + o
        sxx, sxdz, ndz = _dot(zd, zd, b("o")), _dot(zd, dz, b("o")), _norm(dz)
        a = _ratio(sxdz, sxx)
        no = _norm(torch.addcmul(dz, a.unsqueeze(-1), zd, value=-1.0, out=b("o")))
        # centred: Δz_c = a_c·z_c + o_c, from the moments of z_dense and y (y_c = Δz_c)
        sx, sxy = zd.sum(dim=-1), _dot(zd, y, b("o"))
        flags = _zero_flags(zd, zp, m_d, sxx, sx, sxx + 2 * sxdz + ndz.square(), sx + sy + v * dz_top.squeeze(-1),
                            v, exact=scratch is None)
        var_x = (sxx - sx * sx / v).clamp(min=0)
        a_c = torch.where(flags["const_d"], torch.zeros_like(sx), _ratio(sxy - sx * sy / v, var_x))
        o_c = torch.addcmul(y, a_c.unsqueeze(-1), zd, value=-1.0, out=b("o"))
        o_c = o_c.sub_(((sy - a_c * sx) / v).unsqueeze(-1))  # the means: o_c = y_c − a_c·z_c
        out.update(flags, sxx=sxx, ndz=ndz, a=a, no=no, sx=sx, a_c=a_c, no_c=_norm(o_c))
    if probability:
        idx_p, first_p = _top(zp, ks[-1])
        top_p = first_p.unsqueeze(-1)
        out.update(idx_d=idx_d, idx_p=idx_p, first_d=first_d, first_p=first_p, m_d=m_d,
                   m_p=zp.gather(1, top_p).squeeze(-1))
        retry = torch.zeros_like(sy, dtype=torch.bool)
        for i, t in enumerate(temperatures):
            s = 1.0 / t
            # p = softmax(z_d / T) (its own normalisation is only ~1e-5 accurate: every sum is
            # divided by Σp, a cascaded sum, instead)
            p = torch.softmax(zd if t == 1.0 else torch.mul(zd, s, out=b("d")), dim=-1, out=b("p"))
            q = torch.softmax(zp if t == 1.0 else torch.mul(zp, s, out=b("d")), dim=-1, out=b("q"))
            u = torch.expm1(y if t == 1.0 else torch.mul(y, s, out=b("d")), out=b("u"))
            spu = _dot(p, u, b("o"))
            w = torch.mul(p, y, out=b("o"))  # p·y: Σw = Σ p y, Σ w y = Σ p y², Σ p w = Σ p² y, Σ w w = Σ p² y²
            sums = {"sd": p.sum(dim=-1), "sq": q.sum(dim=-1), "p_top": p.gather(1, top).squeeze(-1),
                    "q_top": q.gather(1, top_p).squeeze(-1), "hp": _dot(p, zd, b("d")), "hq": _dot(q, zp, b("d")),
                    "sqy": _dot(q, y, b("d")), "spu": spu, "sw": w.sum(dim=-1), "swy": _dot(w, y, b("d")),
                    "spw": _dot(p, w, b("d")), "sww": _dot(w, w, b("o")), "spp": _dot(p, p, b("d"))}
            # ½ (q/p − 1) = ½ expm1(g − M) = (u − E) / (2 (1 + E)), E = E_p[u]: Δ = q − p and
            # log(m/p) = log1p(½ (q/p − 1)) from it, accurate where q ≈ p (unlike q − p)
            big_e = (spu / sums["sd"]).unsqueeze(-1)
            half = 0.5 / (1.0 + big_e)
            t_half = torch.addcmul(-big_e * half, half, u, out=b("u"))
            d = torch.mul(p, t_half, out=b("d"))  # Δ = (2 / Σp)·d
            lm = torch.log1p(t_half, out=b("o"))
            sums.update(spl=_dot(p, lm, b("u")), sql=_dot(q, lm, b("u")))
            # the geometry of p: Δ = a·p + o with a = 2·ap
            ap = _ratio(_dot(p, d, b("u")), sums["spp"])
            sums.update(nd=_norm(d), ap=ap, nop=_norm(d.addcmul_(p, ap.unsqueeze(-1), value=-1.0)))
            retry = retry | ~torch.isfinite(spu)
            out.update({f"{k}@{i}": val for k, val in sums.items()})
        out["retry"] = retry
    return out


def _zero_flags(zd: Tensor, zp: Tensor, m_d: Tensor, sxx: Tensor, sx: Tensor, spp: Tensor, sp: Tensor, v: int,
                exact: bool) -> dict[str, Tensor]:
    """Which rows are the zero vector (z_pruned) or constant (either side: the centred zero
    vector): from the rows' max and min, taken only when the moments leave a row in doubt (or
    ``exact``)."""
    tol = 1e-6
    var_d, var_p = sxx - sx * sx / v, spp - sp * sp / v
    doubt = (var_d <= tol * sxx) | (var_p <= tol * spp.clamp(min=0)) | (spp <= tol * sxx)
    if exact or bool(doubt.any()):
        zp_max, zp_min, zd_min = zp.amax(dim=-1), zp.amin(dim=-1), zd.amin(dim=-1)
        return {"const_d": zd_min == m_d, "const_p": zp_min == zp_max, "zero_p": (zp_max == 0) & (zp_min == 0)}
    no = torch.zeros_like(doubt)
    return {"const_d": no, "const_p": no, "zero_p": no}


def _finish(s: dict[str, Tensor], temperatures: tuple[float, ...], ks: tuple[int, ...], v: int, logit: bool,
            probability: bool) -> dict[tuple[str, str, float], Tensor]:
    """The metrics of :func:`vocab_metrics` from the sums of :func:`_block_sums`, on slabs of
    :data:`FINISH_ROWS` rows (zero-padded: every row takes the same SIMD path)."""
    n = next(iter(s.values())).shape[0]
    parts = []
    for i in range(0, n, FINISH_ROWS):
        slab = {}
        for k, val in s.items():
            val = val[i:i + FINISH_ROWS]
            if val.shape[0] < FINISH_ROWS:
                val = torch.cat([val, val.new_zeros((FINISH_ROWS - val.shape[0], *val.shape[1:]))])
            slab[k] = val
        res = _finish_slab(slab, temperatures, ks, v, logit, probability)
        parts.append({k: val[:min(FINISH_ROWS, n - i)] for k, val in res.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _finish_slab(s: dict[str, Tensor], temperatures: tuple[float, ...], ks: tuple[int, ...], v: int, logit: bool,
                 probability: bool) -> dict[tuple[str, str, float], Tensor]:
    nan = math.nan
    out: dict[tuple[str, str, float], Tensor] = {}
    if "retry" in s:
        out["retry"] = s["retry"]
    var_u = ((s["syy"] - s["sy"] * s["sy"] / v) / v).clamp(min=0)  # Var_u(Δz) = ‖Δz_c‖² / V
    if logit:
        nx = s["sxx"].sqrt()
        for m, val in _split(nx, s["ndz"], s["a"], s["no"], nx == 0, s["zero_p"]).items():
            out[("logit", m, nan)] = val
        const_d, const_p = s["const_d"], s["const_p"]
        nx_c = torch.where(const_d, torch.zeros_like(nx), (s["sxx"] - s["sx"] * s["sx"] / v).clamp(min=0).sqrt())
        for m, val in _split(nx_c, (var_u * v).sqrt(), s["a_c"], s["no_c"], const_d, const_p).items():
            out[("logit", m + CENTRED, nan)] = val
        out[("logit", "var_uniform", nan)] = var_u
    if not probability:
        return out
    idx_d, idx_p = s["idx_d"], s["idx_p"]
    dtype = var_u.dtype
    out[("probability", "top1_agree", nan)] = (s["first_d"] == s["first_p"]).to(dtype)
    for k in ks[1:]:
        hits = (idx_d[:, :k].unsqueeze(-1) == idx_p[:, :k].unsqueeze(-2)).any(dim=-1).sum(dim=-1)
        out[("probability", f"top{k}_overlap", nan)] = hits.to(dtype) / k
    no_zero = torch.zeros_like(var_u, dtype=torch.bool)
    for i, t in enumerate(temperatures):
        g = {k.rsplit("@", 1)[0]: val for k, val in s.items() if k.endswith(f"@{i}")}
        s_inv = 1.0 / t
        sd, sq = g["sd"], g["sq"]  # Σp, Σq: 1 to ~1e-5; every sum over p or q is divided by it
        # Δ = q − p = (2 / Σp)·d = a·p + o with a = 2·ap and ‖o‖ = (2 / Σp)·nop
        res = _split(g["spp"].sqrt() / sd, 2.0 * g["nd"] / sd, 2.0 * g["ap"], 2.0 * g["nop"] / sd, no_zero, None)
        # H(p) = −log p_top − (E_p[z_d] − max z_d)/T, p_top = p[argmax z_d] (normalised)
        res["entropy_dense"] = torch.log(sd) - torch.log(g["p_top"]) - s_inv * (g["hp"] / sd - s["m_d"])
        res["entropy_pruned"] = torch.log(sq) - torch.log(g["q_top"]) - s_inv * (g["hq"] / sq - s["m_p"])
        big_m = torch.log1p(g["spu"] / sd)  # M = log E_p[e^g]
        kl = big_m - s_inv * g["sw"] / sd
        rkl = s_inv * g["sqy"] / sq - big_m
        res["kl"], res["reverse_kl"] = kl + 0.0, rkl + 0.0  # + 0.0: exactly +0 rather than -0 for p == q
        # JS = ½ Σ p log(p/m) + ½ Σ q log(q/m) = ½ KL(q‖p) − ½ Σ (p + q) log(m/p)
        res["js"] = 0.5 * rkl - 0.5 * (g["spl"] / sd + g["sql"] / sq) + 0.0
        var_p = g["swy"] / sd - (g["sw"] / sd).square()
        var_r = g["sww"] / g["spp"] - (g["spw"] / g["spp"]).square()
        two_t2 = 2.0 * t * t
        res.update(var_p=var_p, var_r=var_r, kl_est=var_p / two_t2, cos_est=var_r / two_t2, unif_est=var_u / two_t2)
        for m, val in res.items():
            out[("probability", m, t)] = val
    return out


# --------------------------------------------------------------------------- rows with NaN/inf

_N_SCRATCH = 8


def _general_block(zd: Tensor, zp: Tensor, temperatures: tuple[float, ...], ks: tuple[int, ...],
                   logit: bool, probability: bool, scratch: Sequence[Tensor] | None = None
                   ) -> dict[tuple[str, str, float], Tensor]:
    """:func:`vocab_metrics` of one block of rows that may hold NaN/inf (masked tokens): run
    eagerly with ``scratch`` (_N_SCRATCH buffers shaped like zd), or through ``torch.compile``
    without. Masked tokens (−inf logits, p = 0) count 0 in every p-weighted sum; p and log p
    come from one exp; the variances take one pass on y = Δz − Δz[argmax z_dense]."""
    y, y2, logp, p, logq, q, tmp, prod = scratch if scratch is not None else (None,) * _N_SCRATCH
    out: dict[tuple[str, str, float], Tensor] = {}
    nan = math.nan
    if not (logit or probability):
        return out
    idx_d = zd.topk(ks[-1], dim=-1).indices
    if probability:
        idx_p = zp.topk(ks[-1], dim=-1).indices
        out[("probability", "top1_agree", nan)] = (idx_d[:, 0] == idx_p[:, 0]).to(zd.dtype)
        for k in ks[1:]:
            hits = (idx_d[:, :k].unsqueeze(-1) == idx_p[:, :k].unsqueeze(-2)).any(dim=-1).sum(dim=-1)
            out[("probability", f"top{k}_overlap", nan)] = hits.to(zd.dtype) / k
    dz = torch.sub(zp, zd, out=tmp)
    y = torch.sub(dz, dz.gather(-1, idx_d[:, :1]), out=y)  # Δz shifted by its value at the dense top token
    if logit:
        zc = torch.sub(zd, zd.mean(dim=-1, keepdim=True), out=prod)
        dzc = torch.sub(dz, dz.mean(dim=-1, keepdim=True), out=y2)
        for m, val in _geometry(zc, dzc, _is_zero(zp - zp.mean(dim=-1, keepdim=True)), None).items():
            out[("logit", m + CENTRED, nan)] = val
        for m, val in _geometry(zd, dz, _is_zero(zp), prod).items():  # overwrites dz
            out[("logit", m, nan)] = val
    y2 = torch.mul(y, y, out=y2)
    var_u = y2.mean(dim=-1) - y.mean(dim=-1).square()
    if logit:
        out[("logit", "var_uniform", nan)] = var_u
    if not probability:
        return out
    masked = True
    for t in temperatures:
        logp, p = _log_softmax(zd, t, logp, p)
        logq, q = _log_softmax(zp, t, logq, q)
        res = _geometry(p, torch.sub(q, p, out=tmp), None, prod)
        res["entropy_dense"] = -_wdot(p, logp, masked, prod)
        res["entropy_pruned"] = -_wdot(q, logq, masked, prod)
        delta = logq.sub_(logp)  # log q − log p
        res["kl"] = -_wdot(p, delta, masked, prod) + 0.0  # + 0.0: exactly +0 rather than -0 for p == q
        res["reverse_kl"] = _wdot(q, delta, masked, prod)
        # JS = ½ Σ p log(p/m) + ½ Σ q log(q/m) with log(p/m) = g(δ), log(q/m) = g(−δ) and
        # g(δ) = log(2 / (1 + e^δ)) = −max(δ, 0) − L, L = log1p(expm1(−|δ|) / 2): exactly 0
        # at δ = 0 and overflow-free
        half_mix = torch.abs(delta, out=logp).neg_().expm1_().mul_(0.5).log1p_()  # L (log p is done)
        res["js"] = -0.5 * (_wdot(p, torch.clamp(delta, min=0, out=tmp).add_(half_mix), True, prod)
                            + _wdot(q, torch.clamp(delta, max=0, out=tmp).neg_().add_(half_mix), True, prod)
                            ) + 0.0
        res["var_p"] = _weighted_var(p, y, y2, prod)
        res["var_r"] = _weighted_var(p.square_(), y, y2, prod)  # r ∝ p²
        two_t2 = 2.0 * t * t
        res.update(kl_est=res["var_p"] / two_t2, cos_est=res["var_r"] / two_t2, unif_est=var_u / two_t2)
        for m, val in res.items():
            out[("probability", m, t)] = val
    return out


def _log_softmax(z: Tensor, t: float, logp: Tensor | None, p: Tensor | None) -> tuple[Tensor, Tensor]:
    """log softmax(z/T) and softmax(z/T) (into the given buffers, if any) from one exp."""
    if t == 1.0:
        logp = torch.sub(z, z.amax(dim=-1, keepdim=True), out=logp)
    else:
        logp = torch.mul(z, 1.0 / t, out=logp)
        logp = logp.sub_(logp.amax(dim=-1, keepdim=True))
    p = torch.exp(logp, out=p)
    total = p.sum(dim=-1, keepdim=True)
    p.div_(total)
    return logp.sub_(total.log_()), p


class _Compiled:
    """``torch.compile(fn)``; None (eager) once the compiler has failed, warned about once."""

    def __init__(self, fn):
        self.fn, self.failed = torch.compile(fn, dynamic=False), False

    def __call__(self, *args):
        try:
            return None if self.failed else self.fn(*args)
        except Exception as e:  # no C++ compiler / Triton, an unsupported op...: eager is always right
            logging.getLogger(__name__).warning(
                "probe.compile: torch.compile failed (%s: %s); using eager metrics",
                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.failed = True
            return None


@functools.cache  # one compiled function per process: compiling takes seconds, and a failure is not retried
def compile_once(fn) -> _Compiled:
    return _Compiled(fn)
