"""Masks and writes: a mask is a bool tensor shaped like the weight, True = this weight is set
to zero. Selection is exact: every layer hits its target to within one weight."""
from __future__ import annotations

import torch

from prunerep.model.anatomy import Target
from prunerep.sparsity import SparsitySpec


def n_pruned(numel: int, ratio: float) -> int:
    return int(round(numel * ratio))


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the k lowest-scored entries of the whole matrix. Selection (kthvalue,
    linear time), not a sort; entries tied at the cut are taken in index order."""
    flat = score.flatten()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    cut = torch.kthvalue(flat, k).values
    mask = flat < cut
    short = k - int(mask.sum())
    if short:
        mask[(flat == cut).nonzero().squeeze(1)[:short]] = True
    return mask.view_as(score)


def per_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest-scored weights of each output row (Wanda's comparison group).

    Every row loses k = floor(cols·ratio) weights; the remaining round(numel·ratio) − k·rows
    prunes go, one each, to the rows whose next-lowest score is smallest. The layer thus
    hits its target to within one weight, and each row still keeps exactly its top scores.
    Selection (kthvalue, linear time) replaces a full sort; rows with tied scores at the
    cut fall back to a sort, so counts stay exact."""
    rows, cols = score.shape
    k, extra = divmod(n_pruned(score.numel(), ratio), rows)
    prune_count = torch.full((rows,), k, dtype=torch.long, device=score.device)
    if extra:
        nxt = torch.kthvalue(score, k + 1, dim=1).values
        prune_count[torch.topk(nxt, extra, largest=False).indices] += 1
    if k == 0 and not extra:
        return torch.zeros_like(score, dtype=torch.bool)
    if not extra:
        return _lowest_per_row(score, k)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for count in prune_count.unique().tolist():
        if count == 0:
            continue
        sel = (prune_count == count).nonzero().squeeze(1)
        mask[sel] = _lowest_per_row(score[sel], count)
    return mask


def _lowest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest entries of every row."""
    cut = torch.kthvalue(score, count, dim=1).values
    mask = score <= cut[:, None]
    if bool((mask.sum(1) != count).any()):  # ties at the cut: exact, by sorting
        mask = torch.zeros_like(mask).scatter_(1, torch.argsort(score, dim=1)[:, :count], True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input weights of a row, prune the n lowest-scored."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def mask_for(score: torch.Tensor, spec: SparsitySpec, per_row: bool) -> torch.Tensor:
    if spec.is_nm:
        return nm_mask(score, spec.n, spec.m)
    if per_row:
        return per_row_mask(score, spec.ratio)
    return lowest_k_mask(score, n_pruned(score.numel(), spec.ratio))


@torch.no_grad()
def apply_mask(target: Target, mask: torch.Tensor) -> None:
    """Zero the target's weights where ``mask`` is True, in place."""
    w = target.weight
    w.masked_fill_(mask.to(w.device), 0)


@torch.no_grad()
def write_weight(target: Target, new: torch.Tensor) -> None:
    """Copy ``new`` into the target in place; the weights that are exactly zero in ``new`` (pruned)
    stay exactly zero in the model's dtype."""
    w = target.weight
    w.copy_(new.to(device=w.device, dtype=w.dtype))
    w.masked_fill_((new == 0).to(w.device), 0)


@torch.no_grad()
def write_back(target: Target, new: torch.Tensor, zeros: torch.Tensor) -> None:
    """Copy the quantized weight into the target; the weights that were zero (pruned) stay zero."""
    w = target.weight
    w.copy_(new.to(device=w.device, dtype=w.dtype))
    apply_mask(target, zeros)
