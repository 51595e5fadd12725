"""Magnitude pruning: zero the smallest |W| of each Linear layer (layer-wise threshold,
as the baseline in the Wanda repository); N:M picks the smallest |W| in each group."""
from __future__ import annotations

import torch

from prunerep.models import decoder_layers, output_head
from prunerep.pruners.common import apply_mask, mask_for, prunable_linears


@torch.no_grad()
def prune_by_score(model, cfg, score_fn) -> dict:
    """Prune every prunable Linear by `score_fn(weight) -> score` (lowest scores go).
    Needs no calibration data, so it touches one weight matrix at a time, in place."""
    for block in decoder_layers(model):
        for lin in prunable_linears(block, cfg.pruner).values():
            apply_mask(lin, mask_for(score_fn(lin.weight.to(cfg.device)), cfg.spec, per_row=False))
    if cfg.pruner.prune_lm_head:
        head = output_head(model)
        apply_mask(head, mask_for(score_fn(head.weight.to(cfg.device)), cfg.spec, per_row=False))
    return {"method": cfg.pruner.name, "calibration": False}


def prune(model, calib, cfg) -> dict:
    return prune_by_score(model, cfg, lambda w: w.abs().float())
