"""How far a pruned model's representations are from the dense model's: pure tensor math.

Every function takes tensors and returns tensors; nothing here touches a model, a file or
a global. The conventions, shared by all functions:

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
  ``a = 0`` and ``+inf`` otherwise.
* **Non-finite inputs propagate.** A NaN/inf anywhere in a row gives a non-finite value
  for that row (never silently a number; the geometry metrics give NaN);
  :func:`count_nonfinite` lets callers warn.
* **Probabilities** are ``p = softmax(z / T)`` computed with ``log_softmax``. A ``-inf``
  logit (a masked token, p = 0) is allowed: its terms count as ``0 · log 0 = 0``.

KL direction: :func:`kl` is ``KL(p_dense ‖ p_pruned) = Σ p_dense (log p_dense − log p_pruned)``,
the expectation under the dense model. The paper's released code and its README disagree
on the direction (one computes KL(dense‖pruned), the other describes KL(pruned‖dense)), so
both are reported: ``kl`` (this direction) and ``reverse_kl``. The second-order estimate
``Var_p(Δz) / (2T²)`` is the same for both directions to leading order.

Second-order estimates (He et al. 2026), with ``Δz = z_pruned − z_dense`` in raw logits:

* ``KL ≈ Var_p(Δz) / (2T²)``, the variance weighted by ``p = p_dense`` at temperature T;
* ``1 − cos(p_dense, p_pruned) ≈ Var_r(Δz) / (2T²)`` with ``r ∝ p_dense²``
  (exactly: ``cos = E_r[e^δ] / sqrt(E_r[e^{2δ}])`` with ``δ = Δz/T``);
* the uniform-weight variance ``Var_u(Δz)`` is what an unweighted view of the logits sees.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "as_float", "count_nonfinite", "geometry", "cosine", "one_minus_cos", "rel_l2", "decompose",
    "log_probs", "kl", "reverse_kl", "js", "entropy", "weighted_var", "uniform_var",
    "kl_estimate", "cos_estimate", "top1_agree", "topk_overlap", "option_metrics",
    "prediction_metrics", "probability_metrics", "vocab_metrics", "GEOMETRY_METRICS",
]

GEOMETRY_METRICS = ("cos", "one_minus_cos", "rel_l2", "par_rel", "orth_rel", "orth_par_ratio")


# --------------------------------------------------------------------------- helpers

def as_float(x: Tensor) -> Tensor:
    """float32 for half precision and integers, otherwise unchanged (float32/float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = as_float(a), as_float(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def count_nonfinite(*tensors: Tensor) -> int:
    """Number of NaN/±inf entries over all the given tensors (for warnings, never to drop)."""
    return int(sum((~torch.isfinite(t)).sum().item() for t in tensors if t.is_floating_point()))


def _dot(a: Tensor, b: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Row-wise Σ a·b; with ``scratch`` (a buffer shaped like a) the product reuses it."""
    if scratch is None:
        return torch.linalg.vecdot(a, b, dim=-1)
    return torch.mul(a, b, out=scratch).sum(dim=-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den per row, with 0/0 = 0 and x/0 = +inf (num, den >= 0 or NaN)."""
    zero_den = den == 0
    safe = torch.where(zero_den, torch.ones_like(den), den)
    out = num / safe
    return torch.where(zero_den & (num != 0), torch.full_like(out, math.inf), out)


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
    return _geometry(xd, xp - xd)


def _geometry(xd: Tensor, delta: Tensor, scratch: Tensor | None = None) -> dict[str, Tensor]:
    """:func:`geometry` from x_dense and Δ; overwrites ``delta`` (with o) to save memory."""
    nd = torch.linalg.vector_norm(xd, dim=-1)
    nd2 = nd.square()
    a = _ratio(_dot(delta, xd, scratch), nd2)  # x_dense = 0 -> a = 0 (then o = Δ)
    norm_delta = torch.linalg.vector_norm(delta, dim=-1)
    orth = delta.addcmul_(a.unsqueeze(-1), xd, value=-1.0)
    par = a.abs()
    orth_rel = _ratio(torch.linalg.vector_norm(orth, dim=-1), nd)
    s = 1.0 + a
    r = torch.hypot(s, orth_rel)
    omc = torch.where(s >= 0, orth_rel.square() / (r * (r + s)), (r - s) / r)
    # zero vectors: cos(0, 0) = 1, cos(0, x) = cos(x, 0) = 0
    dense_zero, pruned_zero = nd == 0, torch.where(nd == 0, norm_delta == 0, r == 0)
    omc = torch.where(dense_zero & pruned_zero, torch.zeros_like(omc), omc)
    omc = torch.where(dense_zero ^ pruned_zero, torch.ones_like(omc), omc)
    out = {"cos": 1.0 - omc, "one_minus_cos": omc, "rel_l2": _ratio(norm_delta, nd),
           "par_rel": par, "orth_rel": orth_rel, "orth_par_ratio": _ratio(orth_rel, par)}
    # a row with a NaN/inf in either input is NaN in every metric (never a number)
    finite = torch.isfinite(nd) & torch.isfinite(norm_delta)
    return {k: torch.where(finite, v, torch.full_like(v, math.nan)) for k, v in out.items()}


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """cos(x, y) per row; cos(0, 0) = 1 and cos(0, y≠0) = 0."""
    return geometry(x, y)["cos"]


def one_minus_cos(x: Tensor, y: Tensor) -> Tensor:
    """1 − cos(x, y) per row, computed without cancellation (see :func:`geometry`)."""
    return geometry(x, y)["one_minus_cos"]


def rel_l2(x_dense: Tensor, x_pruned: Tensor) -> Tensor:
    """‖x_pruned − x_dense‖ / ‖x_dense‖ per row (0/0 = 0, x/0 = inf)."""
    xd, xp = _pair(x_dense, x_pruned)
    return _ratio(torch.linalg.vector_norm(xp - xd, dim=-1), torch.linalg.vector_norm(xd, dim=-1))


def decompose(x_dense: Tensor, x_pruned: Tensor) -> dict[str, Tensor]:
    """Δ split along x_dense: ``par_rel``, ``orth_rel`` (norms / ‖x_dense‖) and their ratio."""
    g = geometry(x_dense, x_pruned)
    return {k: g[k] for k in ("par_rel", "orth_rel", "orth_par_ratio")}


# --------------------------------------------------------------------------- probabilities

def log_probs(z: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) over the last dimension, in float32 (or float64)."""
    z = as_float(z)
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def _finite(*ts: Tensor) -> bool:
    """All entries finite? One read pass each: a row sum is NaN/inf iff an entry is (the
    values here are logits/log-probs, far from overflowing a float32 sum)."""
    return all(bool(torch.isfinite(t.sum())) for t in ts)


def _expect_diff(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """Σ p (log p − log q) per row, where terms with p = 0 count 0 (also when log p = −inf)."""
    d = logp - logq
    if not _finite(logp):  # masked tokens: 0 * (-inf - x) would be NaN; NaN p stays NaN
        d = torch.where(p == 0, torch.zeros_like(d), d)
    return _dot(p, d)


def kl(logp_dense: Tensor, logp_pruned: Tensor) -> Tensor:
    """KL(p_dense ‖ p_pruned) = Σ p_dense (log p_dense − log p_pruned), from log-probabilities.

    Direction note: the paper's code and README disagree; this is the dense-expectation
    direction, :func:`reverse_kl` the other one."""
    logp, logq = _pair(logp_dense, logp_pruned)
    return _expect_diff(logp.exp(), logp, logq)


def reverse_kl(logp_dense: Tensor, logp_pruned: Tensor) -> Tensor:
    """KL(p_pruned ‖ p_dense)."""
    return kl(logp_pruned, logp_dense)


def entropy(logp: Tensor) -> Tensor:
    """−Σ p log p per row (nats), with 0 log 0 = 0."""
    logp = as_float(logp)
    return -_expect_diff(logp.exp(), logp, torch.zeros_like(logp))


def _log_half_mix(delta: Tensor) -> Tensor:
    """g(δ) = log(2 / (1 + e^δ)) = log 2 − softplus(δ), exactly 0 at δ = 0 and overflow-free:
    g(δ) = −max(δ, 0) − log1p(expm1(−|δ|) / 2)."""
    return -torch.relu(delta) - torch.log1p(torch.expm1(-delta.abs()) * 0.5)


def js(logp_dense: Tensor, logp_pruned: Tensor) -> Tensor:
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, in nats (≤ log 2).

    With δ = log q − log p: log(p/m) = g(δ), log(q/m) = g(δ) + δ, so
    JS = ½ Σ (p + q) g(δ) + ½ KL(q‖p); exactly 0 when p == q."""
    logp, logq = _pair(logp_dense, logp_pruned)
    p, q = logp.exp(), logq.exp()
    if not _finite(logp, logq):
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (_expect_diff(p, logp, logm) + _expect_diff(q, logq, logm))
    delta = logq - logp
    return 0.5 * (_dot(p + q, _log_half_mix(delta)) + _dot(q, delta))


# --------------------------------------------------------------------------- estimates from Δz

def weighted_var(x: Tensor, w: Tensor) -> Tensor:
    """Var_w(x) = Σ w (x − Σ w x)² per row, with w normalised to sum to 1 (two-pass)."""
    x, w = _pair(x, w)
    w = w / w.sum(dim=-1, keepdim=True)
    mean = _dot(w, x)
    return _dot(w, (x - mean.unsqueeze(-1)).square())


def uniform_var(dz: Tensor) -> Tensor:
    """Var_u(Δz): plain (population) variance over the vocabulary."""
    return as_float(dz).var(dim=-1, correction=0)


def kl_estimate(z_dense: Tensor, dz: Tensor, temperature: float = 1.0) -> Tensor:
    """Var_p(Δz) / (2T²) with p = softmax(z_dense / T): second-order estimate of KL."""
    p = log_probs(z_dense, temperature).exp()
    return weighted_var(dz, p) / (2.0 * temperature ** 2)


def cos_estimate(z_dense: Tensor, dz: Tensor, temperature: float = 1.0) -> Tensor:
    """Var_r(Δz) / (2T²) with r ∝ p_dense² = softmax(2 z_dense / T): estimate of 1 − cos(p)."""
    r = log_probs(z_dense, temperature / 2.0).exp()
    return weighted_var(dz, r) / (2.0 * temperature ** 2)


# --------------------------------------------------------------------------- predictions

def top1_agree(z_dense: Tensor, z_pruned: Tensor) -> Tensor:
    """1.0 where both argmaxes agree, else 0.0 (float, so means are agreement rates)."""
    return (z_dense.argmax(dim=-1) == z_pruned.argmax(dim=-1)).to(as_float(z_dense).dtype)


def _overlap(idx_d: Tensor, idx_p: Tensor) -> Tensor:
    k = idx_d.shape[-1]
    hits = (idx_d.unsqueeze(-1) == idx_p.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return hits.float() / k


def topk_overlap(z_dense: Tensor, z_pruned: Tensor, k: int) -> Tensor:
    """|top-k(dense) ∩ top-k(pruned)| / k per row (order inside the top k ignored)."""
    k = min(k, z_dense.shape[-1])
    return _overlap(z_dense.topk(k, dim=-1).indices, z_pruned.topk(k, dim=-1).indices)


def option_metrics(z_dense: Tensor, z_pruned: Tensor, option_ids: Sequence[int],
                   temperature: float = 1.0) -> dict[str, Tensor]:
    """Multiple choice: p restricted to the option tokens and renormalised.

    Returns ``kl`` (KL(dense‖pruned) over the options), ``top1_agree`` (same chosen
    option) and ``margin_dense`` / ``margin_pruned`` (top minus second option probability)."""
    ids = torch.as_tensor(list(option_ids), device=z_dense.device)
    od, op = _pair(z_dense.index_select(-1, ids), z_pruned.index_select(-1, ids))
    logp, logq = log_probs(od, temperature), log_probs(op, temperature)

    def margin(logx: Tensor) -> Tensor:
        top2 = logx.exp().topk(min(2, logx.shape[-1]), dim=-1).values
        return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)

    return {"kl": kl(logp, logq), "top1_agree": top1_agree(od, op),
            "margin_dense": margin(logp), "margin_pruned": margin(logq)}


# --------------------------------------------------------------------------- bundles (hot path)

def prediction_metrics(z_dense: Tensor, z_pruned: Tensor, topk: Iterable[int] = (5, 10)) -> dict[str, Tensor]:
    """Temperature-free agreement of the predictions: ``top1_agree`` and ``top{k}_overlap``
    for each k (the ranking of z is the ranking of p at any T). One top-k per side."""
    zd, zp = _pair(z_dense, z_pruned)
    ks = sorted({min(int(k), zd.shape[-1]) for k in topk} | {1})
    idx_d, idx_p = zd.topk(ks[-1], dim=-1).indices, zp.topk(ks[-1], dim=-1).indices
    out = {"top1_agree": (idx_d[..., 0] == idx_p[..., 0]).to(zd.dtype)}
    for k in ks[1:]:
        out[f"top{k}_overlap"] = _overlap(idx_d[..., :k], idx_p[..., :k]).to(zd.dtype)
    return out


def probability_metrics(z_dense: Tensor, z_pruned: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
    """All probability-space metrics at one temperature (see :func:`vocab_metrics`)."""
    out = vocab_metrics(z_dense, z_pruned, [temperature], topk=(), logit=False)
    return {m: v for (_, m, t), v in out.items() if t == t}


def vocab_metrics(z_dense: Tensor, z_pruned: Tensor, temperatures: Sequence[float] = (1.0,),
                  topk: Iterable[int] = (5, 10), logit: bool = True, probability: bool = True,
                  compiled: bool = False) -> dict[tuple[str, str, float], Tensor]:
    """Every logit- and probability-space metric of a chunk of logits, keyed
    ``(space, metric, T)`` with ``T = nan`` for temperature-free metrics.

    * ``logit``: the geometry of z (:func:`geometry`) and ``var_uniform`` = Var_u(Δz);
    * ``probability``, temperature-free: ``top1_agree``, ``top{k}_overlap``;
    * ``probability`` at each T: the geometry of p, ``kl``, ``reverse_kl``, ``js``,
      ``entropy_dense``, ``entropy_pruned``, ``var_p`` = Var_p(Δz), ``var_r`` = Var_r(Δz)
      (r ∝ p²), ``kl_est`` = var_p/(2T²), ``cos_est`` = var_r/(2T²) (estimates
      1 − cos(p)) and ``unif_est`` = Var_u(Δz)/(2T²).

    Each row's values depend on that row only, bit for bit, whatever the batch size.
    The values equal those of the single-metric functions above (to rounding). This is
    the hot path of the probes (vocabulary-sized rows), so it is written for speed: rows
    are processed in blocks of ~2 MB that stay in cache, every elementwise op writes into
    one of a few scratch buffers allocated once per call (fresh multi-MB allocations cost
    more than the arithmetic on a CPU), p and log p come from one exp, and the variances
    use one pass, E_w[y²] − E_w[y]², on y = Δz − Δz[argmax z_dense] (shifted to the dense
    top token, where p concentrates, which keeps the subtraction well conditioned).

    ``compiled=True`` runs each block through ``torch.compile`` instead (a few fused loops
    instead of ~50 passes over the vocabulary; compiled once per process, then cached on
    disk by PyTorch), falling back to the eager path for non-finite logits or when the
    compiler is unavailable.
    """
    zd, zp = _pair(z_dense, z_pruned)
    lead, v = zd.shape[:-1], zd.shape[-1]
    zd, zp = zd.reshape(-1, v), zp.reshape(-1, v)
    n = zd.shape[0]
    block = max(2, ROW_BLOCK_ELEMENTS // max(v, 1) // 2 * 2)
    scratch = None  # the eager path's buffers, allocated once when first needed
    parts = []
    for i in range(0, max(n, 1), block):
        bd, bp = zd[i:i + block], zp[i:i + block]
        rows = bd.shape[0]
        if rows < block:  # pad: every call reduces [block, V], so no row depends on its neighbours
            bd = torch.cat([bd, bd.new_zeros(block - rows, v)])
            bp = torch.cat([bp, bp.new_zeros(block - rows, v)])
        part = _run_fused(bd, bp, temperatures, topk, logit, probability) if compiled else None
        if part is None:
            if scratch is None:
                scratch = torch.empty((_N_SCRATCH, block, v), dtype=zd.dtype, device=zd.device)
            part = _vocab_block(bd, bp, scratch, temperatures, topk, logit, probability)
        parts.append({k: val[:rows] for k, val in part.items()})
    return {k: torch.cat([part[k] for part in parts]).reshape(lead) for k in parts[0]}


# rows of [rows, V] buffers processed together: ~2 MB of float32 keeps the many passes of
# vocab_metrics in cache, which on CPUs is 1.5-3x faster than whole chunks. Every block has
# the same (even) number of rows, zero-padded: a multi-threaded reduction splits a row
# differently when a call has 1 or 3 rows, so fixed shapes make each row's result
# independent of how the rows were batched (bit-identical for any token_chunk on CPU).
ROW_BLOCK_ELEMENTS = 1 << 19
_N_SCRATCH = 8


def _softmax_into(z: Tensor, t: float, logp: Tensor, p: Tensor) -> None:
    """logp = log softmax(z/T), p = softmax(z/T), written into the given buffers (one exp)."""
    if t == 1.0:
        logp.copy_(z)
    else:
        torch.mul(z, 1.0 / t, out=logp)
    logp.sub_(logp.amax(dim=-1, keepdim=True))
    total = torch.exp(logp, out=p).sum(dim=-1, keepdim=True)
    p.div_(total)
    logp.sub_(total.log_())


def _vocab_block(zd: Tensor, zp: Tensor, buf: Tensor, temperatures: Sequence[float], topk: Iterable[int],
                 logit: bool, probability: bool) -> dict[tuple[str, str, float], Tensor]:
    """vocab_metrics on one block of rows; ``buf`` holds _N_SCRATCH buffers shaped like zd."""
    y, y2, logp, p, logq, q, tmp, prod = buf
    out: dict[tuple[str, str, float], Tensor] = {}
    nan = math.nan
    if logit:
        for m, val in _geometry(zd, torch.sub(zp, zd, out=tmp), prod).items():
            out[("logit", m, nan)] = val
    if not (logit or probability):
        return out
    idx_d = _agreement(zd, zp, topk_sizes(topk, zd.shape[-1]), probability, out)
    torch.sub(zp, zd, out=y)
    y.sub_(y.gather(-1, idx_d[..., :1]))  # Δz shifted by its value at the dense top token
    torch.mul(y, y, out=y2)
    mean_y = y.mean(dim=-1)
    var_u = y2.mean(dim=-1) - mean_y.square()
    if logit:
        out[("logit", "var_uniform", nan)] = var_u
    if not probability:
        return out
    if not _finite(zd, zp):  # masked (-inf) or broken logits: the careful, slower path
        for t in temperatures:
            for m, val in _probability_reference(zd, zp, float(t), var_u).items():
                out[("probability", m, float(t))] = val
        return out
    for t in temperatures:
        t = float(t)
        _softmax_into(zd, t, logp, p)
        _softmax_into(zp, t, logq, q)
        res = _geometry(p, torch.sub(q, p, out=tmp), prod)
        res["entropy_dense"] = -_dot(p, logp, prod)
        res["entropy_pruned"] = -_dot(q, logq, prod)
        delta = logq.sub_(logp)  # log q − log p
        res["kl"] = -_dot(p, delta, prod) + 0.0  # + 0.0: exactly +0 rather than -0 for p == q
        res["reverse_kl"] = _dot(q, delta, prod)
        mix = torch.abs(delta, out=logp).neg_().expm1_().mul_(0.5).log1p_()
        neg_g = delta.clamp_(min=0).add_(mix)  # −g(δ), see _log_half_mix
        res["js"] = 0.5 * (res["reverse_kl"] - _dot(p, neg_g, prod) - _dot(q, neg_g, prod)) + 0.0
        res["var_p"] = _dot(p, y2, prod) - _dot(p, y, prod).square()
        p2 = p.square_()  # r ∝ p²
        s2 = p2.sum(dim=-1)
        res["var_r"] = _dot(p2, y2, prod) / s2 - (_dot(p2, y, prod) / s2).square()
        _add_estimates(res, var_u, t, out)
    return out


def topk_sizes(topk: Iterable[int], vocab: int) -> tuple[int, ...]:
    """The k of the top-k overlaps, capped at the vocabulary, with 1 (top-1) first."""
    return tuple(sorted({min(int(k), vocab) for k in topk} | {1}))


def _agreement(zd: Tensor, zp: Tensor, ks: tuple[int, ...], probability: bool, out: dict) -> Tensor:
    """top1_agree and top{k}_overlap into ``out``; returns the dense top-k indices."""
    idx_d = zd.topk(ks[-1], dim=-1).indices
    if probability:
        idx_p = zp.topk(ks[-1], dim=-1).indices
        out[("probability", "top1_agree", math.nan)] = (idx_d[..., 0] == idx_p[..., 0]).to(zd.dtype)
        for k in ks[1:]:
            out[("probability", f"top{k}_overlap", math.nan)] = _overlap(idx_d[..., :k], idx_p[..., :k]).to(zd.dtype)
    return idx_d


def _add_estimates(res: dict, var_u: Tensor, t: float, out: dict) -> None:
    """The Var/(2T²) estimates from the variances in ``res``; everything into ``out`` at T."""
    two_t2 = 2.0 * t * t
    res["kl_est"], res["cos_est"], res["unif_est"] = res["var_p"] / two_t2, res["var_r"] / two_t2, var_u / two_t2
    for m, val in res.items():
        out[("probability", m, t)] = val


def _vocab_block_fused(zd: Tensor, zp: Tensor, temperatures: tuple[float, ...], ks: tuple[int, ...],
                       logit: bool, probability: bool) -> dict[tuple[str, str, float], Tensor]:
    """:func:`_vocab_block` as plain tensor expressions, for ``torch.compile`` to fuse into a
    few loops over the vocabulary (eagerly it would be ~2x slower than the buffered version).
    Finite logits only; the same values to rounding."""
    out: dict[tuple[str, str, float], Tensor] = {}
    if logit:
        for m, val in _geometry(zd, zp - zd).items():
            out[("logit", m, math.nan)] = val
    idx_d = _agreement(zd, zp, ks, probability, out)
    y = zp - zd
    y = y - y.gather(-1, idx_d[..., :1])
    y2 = y * y
    var_u = y2.mean(dim=-1) - y.mean(dim=-1).square()
    if logit:
        out[("logit", "var_uniform", math.nan)] = var_u
    if not probability:
        return out
    for t in temperatures:
        logp, logq = torch.log_softmax(zd / t, dim=-1), torch.log_softmax(zp / t, dim=-1)
        p, q = logp.exp(), logq.exp()
        res = _geometry(p, q - p)
        delta = logq - logp
        res["entropy_dense"] = -(p * logp).sum(-1)
        res["entropy_pruned"] = -(q * logq).sum(-1)
        res["kl"] = -(p * delta).sum(-1) + 0.0
        res["reverse_kl"] = (q * delta).sum(-1)
        neg_g = torch.relu(delta) + torch.log1p(torch.expm1(-delta.abs()) * 0.5)
        res["js"] = 0.5 * (res["reverse_kl"] - (p * neg_g).sum(-1) - (q * neg_g).sum(-1)) + 0.0
        res["var_p"] = (p * y2).sum(-1) - (p * y).sum(-1).square()
        p2 = p * p
        s2 = p2.sum(-1)
        res["var_r"] = (p2 * y2).sum(-1) / s2 - ((p2 * y).sum(-1) / s2).square()
        _add_estimates(res, var_u, t, out)
    return out


_COMPILED: dict[str, object] = {}


def _compiled_block():
    """torch.compile(_vocab_block_fused), built once per process."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_vocab_block_fused, dynamic=False)
    return _COMPILED["fn"]


def _run_fused(bd: Tensor, bp: Tensor, temperatures: Sequence[float], topk: Iterable[int], logit: bool,
               probability: bool):
    """The compiled block, or None (then the caller runs the eager path): non-finite logits,
    or a compiler that failed once (warned about, then never tried again in this process)."""
    fn = _compiled_block() if _COMPILED.get("failed") is None else None
    if fn is None or not _finite(bd, bp):
        return None
    try:
        return fn(bd, bp, tuple(float(t) for t in temperatures), topk_sizes(topk, bd.shape[-1]), logit, probability)
    except Exception as e:  # no C++ compiler / Triton, an unsupported op...: eager is always right
        import logging

        logging.getLogger(__name__).warning("probe.compile: torch.compile failed (%s: %s); using eager metrics",
                                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _COMPILED["failed"] = True
        return None


def _probability_reference(zd: Tensor, zp: Tensor, t: float, var_u: Tensor) -> dict[str, Tensor]:
    """The probability metrics from the single-metric functions (any logits, incl. −inf)."""
    logp, logq = log_probs(zd, t), log_probs(zp, t)
    p, q = logp.exp(), logq.exp()
    dz = zp - zd
    res = geometry(p, q)
    res.update(kl=kl(logp, logq), reverse_kl=reverse_kl(logp, logq), js=js(logp, logq),
               entropy_dense=entropy(logp), entropy_pruned=entropy(logq),
               var_p=weighted_var(dz, p), var_r=weighted_var(dz, p.square()))
    two_t2 = 2.0 * t * t
    res.update(kl_est=res["var_p"] / two_t2, cos_est=res["var_r"] / two_t2, unif_est=var_u / two_t2)
    return res
