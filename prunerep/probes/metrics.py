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
  for that row (never silently a number; the geometry metrics give NaN).
* **Probabilities** are ``p = softmax(z / T)`` computed with ``log_softmax``. A ``-inf``
  logit (a masked token, p = 0) is allowed: its terms count as ``0 · log 0 = 0``.

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

import logging
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["geometry", "option_metrics", "vocab_metrics", "GEOMETRY_METRICS"]

GEOMETRY_METRICS = ("cos", "one_minus_cos", "rel_l2", "par_rel", "orth_rel", "orth_par_ratio")

# rows of [rows, V] processed together: ~2 MB of float32 keeps the ~40 passes of
# vocab_metrics in cache, which on CPUs is 1.5-3x faster than whole chunks. Every block has
# the same (even) number of rows, zero-padded: a multi-threaded reduction splits a row
# differently when a call has 1 or 3 rows, so fixed shapes make each row's result
# independent of how the rows were batched (bit-identical for any token_chunk on CPU).
ROW_BLOCK_ELEMENTS = 1 << 19


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


def _wdot(w: Tensor, x: Tensor, masked: bool, out: Tensor | None = None) -> Tensor:
    """Row-wise Σ w·x where, if ``masked``, the terms with w = 0 count 0 (also when x is ±inf
    or NaN there: 0 · log 0 = 0 for a masked token); a NaN weight stays NaN."""
    terms = torch.mul(w, x, out=out)
    if masked:
        terms = terms.masked_fill_(w == 0, 0.0)
    return terms.sum(dim=-1)


def _weighted_var(w: Tensor, y: Tensor, y2: Tensor, out: Tensor | None = None) -> Tensor:
    """Var_w(y) = E_w[y²] − E_w[y]² per row from y and y², w normalised by its sum (Σp is 1
    only to rounding). One pass: y is shifted so that its mean is small (see :func:`_vocab_block`)."""
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
    return torch.linalg.vector_norm(x, dim=-1) == 0


def _geometry(xd: Tensor, delta: Tensor, pruned_zero: Tensor | None, prod: Tensor | None = None
              ) -> dict[str, Tensor]:
    """:func:`geometry` from x_dense, Δ and which x_pruned rows are 0 (None: none can be, as
    for probabilities); overwrites ``delta`` (with o) to save a buffer (and ``prod``, a
    scratch buffer for the products, if given)."""
    nd = torch.linalg.vector_norm(xd, dim=-1)
    a = _ratio(_dot(delta, xd, prod), nd.square())  # x_dense = 0 -> a = 0 (then o = Δ)
    norm_delta = torch.linalg.vector_norm(delta, dim=-1)
    orth = delta.addcmul_(a.unsqueeze(-1), xd, value=-1.0)
    par = a.abs()
    orth_rel = _ratio(torch.linalg.vector_norm(orth, dim=-1), nd)
    s = 1.0 + a
    r = torch.hypot(s, orth_rel)
    omc = torch.where(s >= 0, orth_rel.square() / (r * (r + s)), (r - s) / r)
    # zero vectors: cos(0, 0) = 1, cos(0, x) = cos(x, 0) = 0
    # x_pruned = 0 is tested directly: a = −1 and o = 0 hold there only to rounding
    dense_zero = nd == 0
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
                  compiled: bool = False) -> dict[tuple[str, str, float], Tensor]:
    """Every logit- and probability-space metric of a chunk of logits, keyed
    ``(space, metric, T)`` with ``T = nan`` for temperature-free metrics.

    * ``logit``: the geometry of z (:func:`geometry`) and ``var_uniform`` = Var_u(Δz);
    * ``probability``, temperature-free: ``top1_agree``, ``top{k}_overlap`` (|top-k dense ∩
      top-k pruned| / k, order ignored; k capped at the vocabulary);
    * ``probability`` at each T: the geometry of p, ``kl``, ``reverse_kl``, ``js`` (Jensen–
      Shannon, nats), ``entropy_dense``, ``entropy_pruned``, ``var_p`` = Var_p(Δz),
      ``var_r`` = Var_r(Δz) (r ∝ p²), ``kl_est`` = var_p/(2T²), ``cos_est`` = var_r/(2T²)
      (estimates 1 − cos(p)) and ``unif_est`` = Var_u(Δz)/(2T²).

    Each row's values depend on that row only, bit for bit, whatever the batch size. Rows
    go through :func:`_vocab_block` in blocks of ~2 MB that stay in cache. Run eagerly, it
    writes every vocabulary-sized intermediate into a few scratch buffers allocated once
    per call (fresh multi-MB allocations cost more than the arithmetic on a CPU).
    ``compiled=True`` runs the same function through ``torch.compile`` instead, without
    the buffers (its elementwise passes fused into a few loops over the vocabulary;
    compiled once per process, then cached on disk by PyTorch); where the compiler fails,
    the eager run takes over (warned once).
    """
    zd, zp = _pair(z_dense, z_pruned)
    lead, v = zd.shape[:-1], zd.shape[-1]
    zd, zp = zd.reshape(-1, v), zp.reshape(-1, v)
    n = zd.shape[0]
    temps = tuple(float(t) for t in temperatures)
    ks = tuple(sorted({min(int(k), v) for k in topk} | {1}))  # 1 (top-1) first
    block = max(2, ROW_BLOCK_ELEMENTS // max(v, 1) // 2 * 2)
    scratch = None  # the eager run's buffers, allocated once when first needed
    parts = []
    for i in range(0, max(n, 1), block):
        bd, bp = zd[i:i + block], zp[i:i + block]
        rows = bd.shape[0]
        if rows < block:  # pad: every call reduces [block, V], so no row depends on its neighbours
            bd = torch.cat([bd, bd.new_zeros(block - rows, v)])
            bp = torch.cat([bp, bp.new_zeros(block - rows, v)])
        args = (bd, bp, temps, ks, logit, probability, _finite(bd, bp))
        part = _run_compiled(args) if compiled else None
        if part is None:
            if scratch is None:
                scratch = tuple(torch.empty((_N_SCRATCH, block, v), dtype=zd.dtype, device=zd.device))
            part = _vocab_block(*args, scratch)
        parts.append({k: val[:rows] for k, val in part.items()})
    return {k: torch.cat([part[k] for part in parts]).reshape(lead) for k in parts[0]}


_N_SCRATCH = 8


def _vocab_block(zd: Tensor, zp: Tensor, temperatures: tuple[float, ...], ks: tuple[int, ...],
                 logit: bool, probability: bool, finite: bool, scratch: Sequence[Tensor] | None = None
                 ) -> dict[tuple[str, str, float], Tensor]:
    """:func:`vocab_metrics` of one block of rows: run eagerly with ``scratch`` (_N_SCRATCH
    buffers shaped like zd), or through ``torch.compile`` without (every ``out=None``: plain
    tensor expressions, which the compiler fuses).

    p and log p come from one exp; the variances take one pass, E_w[y²] − E_w[y]², on
    y = Δz − Δz[argmax z_dense] (shifted to the dense top token, where p concentrates,
    which keeps the subtraction well conditioned). ``finite``: no NaN/inf in the logits;
    otherwise masked tokens (−inf logits, p = 0) count 0 in every p-weighted sum."""
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
        for m, val in _geometry(zd, dz, _is_zero(zp), prod).items():  # overwrites dz
            out[("logit", m, nan)] = val
    y2 = torch.mul(y, y, out=y2)
    var_u = y2.mean(dim=-1) - y.mean(dim=-1).square()
    if logit:
        out[("logit", "var_uniform", nan)] = var_u
    if not probability:
        return out
    masked = not finite
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
        # at δ = 0 and overflow-free. For finite δ, g(−δ) = g(δ) + δ: ½ Σ (p + q) g(δ) + ½ KL(q‖p).
        half_mix = torch.abs(delta, out=logp).neg_().expm1_().mul_(0.5).log1p_()  # L (log p is done)
        if masked:
            res["js"] = -0.5 * (_wdot(p, torch.clamp(delta, min=0, out=tmp).add_(half_mix), True, prod)
                                + _wdot(q, torch.clamp(delta, max=0, out=tmp).neg_().add_(half_mix), True, prod)
                                ) + 0.0
        else:
            neg_g = delta.clamp_(min=0).add_(half_mix)  # −g(δ)
            res["js"] = 0.5 * (res["reverse_kl"] - _dot(torch.add(p, q, out=tmp), neg_g, prod)) + 0.0
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


_COMPILED: dict[str, object] = {}


def _run_compiled(args: tuple):
    """``torch.compile(_vocab_block)(*args)`` (built once per process), or None where the
    compiler failed (warned about once, then never tried again in this process)."""
    if _COMPILED.get("failed"):
        return None
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_vocab_block, dynamic=False)
    try:
        return _COMPILED["fn"](*args)
    except Exception as e:  # no C++ compiler / Triton, an unsupported op...: eager is always right
        logging.getLogger(__name__).warning(
            "probe.compile: torch.compile failed (%s: %s); using eager metrics",
            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _COMPILED["failed"] = True
        return None
