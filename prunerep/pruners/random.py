"""A baseline: zero a uniformly random subset of each layer's weights (seeded)."""
from __future__ import annotations

import torch

from prunerep.pruners.magnitude import prune_by_score


def prune(model, calib, cfg) -> dict:
    seed = cfg.pruner.seed if cfg.pruner.seed is not None else cfg.seed
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def score(w):
        return torch.rand(w.shape, generator=gen).to(w.device)

    report = prune_by_score(model, cfg, score)
    report["seed"] = int(seed)
    return report
