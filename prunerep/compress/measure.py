"""What a method did, measured on the weights: the zero fraction of every target and overall,
the N:M check, the LM head's zero fraction (pruning.json)."""
from __future__ import annotations

import torch
from torch import nn

from prunerep.compress.method import PruneSettings, targets_of
from prunerep.model.anatomy import decoder_layers, output_head
from prunerep.model.placement import onloaded


@torch.no_grad()
def measure_sparsity(model: nn.Module, cfg: PruneSettings) -> dict:
    """Zero fraction of every target and overall (experts one by one), the N:M check, the LM
    head's zero fraction. This is what was done, measured on the weights, not what was asked."""
    modules, total, zeros = {}, 0, 0
    nm_ok = True
    n_experts = 0
    for i, block in enumerate(decoder_layers(model)):
        with onloaded(block):
            for name, t in targets_of(block, cfg.pruner).items():
                w = t.weight
                z = int((w == 0).sum())
                modules[f"layers.{i}.{name}"] = z / w.numel()
                total += w.numel()
                zeros += z
                n_experts += t.kind == "expert"
                if cfg.spec.is_nm and w.shape[1] % cfg.spec.m == 0:
                    groups = (w == 0).reshape(w.shape[0], -1, cfg.spec.m).sum(-1)
                    nm_ok &= bool((groups >= cfg.spec.n).all())
    head = output_head(model)
    with onloaded(head):
        head_sparsity = float((head.weight == 0).float().mean())
    report = {
        "target": str(cfg.spec),
        "target_ratio": cfg.spec.ratio,
        "achieved_sparsity": zeros / total if total else 0.0,
        "n_params_prunable": total,
        "n_zeros": zeros,
        "max_abs_deviation_pp": 100 * max((abs(v - cfg.spec.ratio) for v in modules.values()), default=0.0),
        "lm_head_sparsity": head_sparsity,
        "modules": modules,
    }
    if n_experts:
        report["n_expert_matrices"] = n_experts
    if cfg.spec.is_nm:
        report["nm_check"] = {"pattern": str(cfg.spec), "holds": nm_ok}
    return report
