"""The plain, one-metric-at-a-time definitions that prunerep.probes.metrics is checked against.

Written for clarity, not speed: float64, straight from the definitions, no buffers, no
blocks, no one-pass tricks. Rows are tokens, the last dimension is features; dense first,
pruned second; ``Δ = x_pruned − x_dense``. A masked token (logit −inf, p = 0) contributes
``0 · log 0 = 0``; zero vectors: cos(0, 0) = 1, cos(0, x≠0) = cos(x≠0, 0) = 0, and a ratio
a / 0 is 0 for a = 0 and inf otherwise.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def log_probs(z: Tensor, t: float = 1.0) -> Tensor:
    """log softmax(z / T)."""
    z = f64(z) / t
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    out = torch.where((den == 0) & (num == 0), torch.zeros_like(out), out)
    return torch.where((den == 0) & (num != 0), torch.full_like(out, math.inf), out)


def geometry(x_dense: Tensor, x_pruned: Tensor) -> dict[str, Tensor]:
    """cos, 1 − cos, ‖Δ‖/‖x‖, and Δ = a·x + o (o ⟂ x): |a|, ‖o‖/‖x‖, ‖o‖/‖a·x‖."""
    x, y = f64(x_dense), f64(x_pruned)
    d = y - x
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    # 1 − cos = ½ ‖x/‖x‖ − y/‖y‖‖² (no cancellation, so exact enough for tiny angles)
    unit_x = x / torch.where(nx == 0, torch.ones_like(nx), nx).unsqueeze(-1)
    unit_y = y / torch.where(ny == 0, torch.ones_like(ny), ny).unsqueeze(-1)
    omc = 0.5 * (unit_x - unit_y).square().sum(dim=-1)
    omc = torch.where((nx == 0) & (ny == 0), torch.zeros_like(omc), omc)
    omc = torch.where((nx == 0) != (ny == 0), torch.ones_like(omc), omc)
    a = _ratio((d * x).sum(dim=-1), nx.square())
    orth = d - a.unsqueeze(-1) * x
    par_rel, orth_rel = a.abs(), _ratio(orth.norm(dim=-1), nx)
    return {"cos": 1.0 - omc, "one_minus_cos": omc, "rel_l2": _ratio(d.norm(dim=-1), nx),
            "par_rel": par_rel, "orth_rel": orth_rel, "orth_par_ratio": _ratio(orth_rel, par_rel)}


def centred(z: Tensor) -> Tensor:
    """z − mean_V(z): the logits with their mean over the vocabulary removed (softmax(z) is
    unchanged by any constant added to a row, and so is everything computed from this)."""
    z = f64(z)
    return z - z.mean(dim=-1, keepdim=True)


def _sum_where_p(p: Tensor, terms: Tensor) -> Tensor:
    """Σ terms over the tokens with p > 0 (0 · log 0 = 0)."""
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p log(p / q)."""
    p = logp.exp()
    return _sum_where_p(p, p * (logp - logq))


def reverse_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(q ‖ p)."""
    return kl(logq, logp)


def js(logp: Tensor, logq: Tensor) -> Tensor:
    """½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q) / 2."""
    logm = torch.log((logp.exp() + logq.exp()) / 2)
    return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)


def entropy(logp: Tensor) -> Tensor:
    """−Σ p log p."""
    p = logp.exp()
    return -_sum_where_p(p, p * logp)


def weighted_var(x: Tensor, w: Tensor) -> Tensor:
    """Σ w (x − Σ w x)² with w normalised to sum to 1 (two passes)."""
    x, w = f64(x), f64(w)
    w = w / w.sum(dim=-1, keepdim=True)
    mean = (w * x).sum(dim=-1, keepdim=True)
    return (w * (x - mean).square()).sum(dim=-1)


def uniform_var(x: Tensor) -> Tensor:
    """Σ (x − mean x)² / V."""
    x = f64(x)
    return (x - x.mean(dim=-1, keepdim=True)).square().mean(dim=-1)


def kl_estimate(z_dense: Tensor, dz: Tensor, t: float = 1.0) -> Tensor:
    """Var_p(Δz) / (2T²), p = softmax(z_dense / T)."""
    return weighted_var(dz, log_probs(z_dense, t).exp()) / (2 * t * t)


def cos_estimate(z_dense: Tensor, dz: Tensor, t: float = 1.0) -> Tensor:
    """Var_r(Δz) / (2T²), r ∝ p²."""
    return weighted_var(dz, log_probs(z_dense, t).exp().square()) / (2 * t * t)


def top1_agree(z_dense: Tensor, z_pruned: Tensor) -> Tensor:
    return (z_dense.argmax(dim=-1) == z_pruned.argmax(dim=-1)).to(torch.float64)


def topk_overlap(z_dense: Tensor, z_pruned: Tensor, k: int) -> Tensor:
    """|top-k(dense) ∩ top-k(pruned)| / k per row, as Python sets."""
    k = min(k, z_dense.shape[-1])
    out = []
    for zd, zp in zip(z_dense.reshape(-1, z_dense.shape[-1]), z_pruned.reshape(-1, z_pruned.shape[-1])):
        a, b = set(zd.topk(k).indices.tolist()), set(zp.topk(k).indices.tolist())
        out.append(len(a & b) / k)
    return torch.tensor(out, dtype=torch.float64).reshape(z_dense.shape[:-1])


def option_metrics(z_dense: Tensor, z_pruned: Tensor, option_ids, t: float = 1.0) -> dict[str, Tensor]:
    """KL, top-1 agreement and top-minus-second margins of p restricted to the options."""
    ids = list(option_ids)
    logp, logq = log_probs(z_dense[..., ids], t), log_probs(z_pruned[..., ids], t)

    def margin(logx: Tensor) -> Tensor:
        s = logx.exp().sort(dim=-1, descending=True).values
        return s[..., 0] - (s[..., 1] if s.shape[-1] > 1 else 0.0)

    return {"kl": kl(logp, logq), "top1_agree": top1_agree(logp, logq),
            "margin_dense": margin(logp), "margin_pruned": margin(logq)}


def vocab_metrics(z_dense: Tensor, z_pruned: Tensor, temperatures=(1.0,), topk=(5, 10)
                  ) -> dict[tuple[str, str, float], Tensor]:
    """Every metric of ``prunerep.probes.metrics.vocab_metrics``, keyed the same way (T = nan
    for the temperature-free ones), each from its definition above."""
    zd, zp = f64(z_dense), f64(z_pruned)
    dz = zp - zd
    nan = math.nan
    out = {("logit", k, nan): v for k, v in geometry(zd, zp).items()}
    out.update({("logit", k + "_centred", nan): v for k, v in geometry(centred(zd), centred(zp)).items()})
    out[("logit", "var_uniform", nan)] = uniform_var(dz)
    out[("probability", "top1_agree", nan)] = top1_agree(zd, zp)
    for k in sorted({min(int(k), zd.shape[-1]) for k in topk} - {1}):
        out[("probability", f"top{k}_overlap", nan)] = topk_overlap(zd, zp, k)
    for t in temperatures:
        t = float(t)
        logp, logq = log_probs(zd, t), log_probs(zp, t)
        p = logp.exp()
        res = geometry(p, logq.exp())
        res.update(kl=kl(logp, logq), reverse_kl=reverse_kl(logp, logq), js=js(logp, logq),
                   entropy_dense=entropy(logp), entropy_pruned=entropy(logq),
                   var_p=weighted_var(dz, p), var_r=weighted_var(dz, p.square()),
                   kl_est=kl_estimate(zd, dz, t), cos_est=cos_estimate(zd, dz, t),
                   unif_est=uniform_var(dz) / (2 * t * t))
        out.update({("probability", k, t): v for k, v in res.items()})
    return out


# --------------------------------------------------------------------------- GPTQ, as the reference writes it

def gptq_find_params(x: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """GPTQ's ``Quantizer.find_params`` (per row of ``x``), its scale stored in fp16 as prunerep's."""
    maxq = 2 ** bits - 1
    zeros = torch.zeros(x.shape[0])
    xmin, xmax = torch.minimum(x.min(1).values, zeros), torch.maximum(x.max(1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both, -1.0, xmin), torch.where(both, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def gptq_fasterquant(W: Tensor, H: Tensor, bits: int, groupsize: int, sym: bool, blocksize: int = 128,
                     percdamp: float = 0.01) -> Tensor:
    """GPTQ's ``fasterquant`` (dynamic groups, no act-order): a group's grid is found from
    ``W[:, j:j+groupsize]`` -- the weights as the earlier blocks left them -- when the loop reaches
    its first column."""
    W, H = W.clone().float(), H.clone().float()
    maxq = 2 ** bits - 1
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = gptq_find_params(W[:, i1 + i:i1 + i + groupsize], bits, sym)
            q = (scale * (torch.clamp(torch.round(w[:, None] / scale) + zero, 0, maxq) - zero))[:, 0]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q
