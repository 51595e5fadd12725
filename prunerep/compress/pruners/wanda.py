"""Wanda (Sun et al., 2023): score each weight by |W_ij| · ‖X_j‖₂, the magnitude times the
norm of its input feature over the calibration tokens, and prune the lowest scores within
each output row (or within each group of M inputs for N:M). No weight update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.compress.engine import calibrated_blocks, prune_block
from prunerep.compress.masks import apply_mask, mask_for
from prunerep.compress.method import CalibratedPruner, targets_of
from prunerep.compress.profile import ProfiledPruner
from prunerep.compress.stats import ExpertReport, InputSquares, wanda_score


@dataclass
class Wanda(ProfiledPruner, CalibratedPruner):
    name: str = "wanda"

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        plan = self.layer_targets(model, calib, settings)
        experts = ExpertReport(settings)
        for step in calibrated_blocks(model, calib, settings, desc="wanda"):
            spec = self.block_spec(plan, step.index, settings.spec)
            targets = targets_of(step.block, self)
            sq = InputSquares(targets, settings.expert_min_tokens)

            def prune_target(name, t):
                apply_mask(t, mask_for(wanda_score(t.weight, sq[name]), spec, per_row=True))

            prune_block(step, targets, settings, self.sequential, sq, prune_target)
            experts.record(step.index, sq.counts)
        return {"method": "wanda", "calibration": True, "calib_shape": list(calib.shape),
                "profile": self.profile_report(plan, model), **experts.entry()}
