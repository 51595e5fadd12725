"""Wanda (Sun et al., 2023): score each weight by |W_ij| · ‖X_j‖₂, the magnitude times the
norm of its input feature over the calibration tokens, and prune the lowest scores within
each output row (or within each group of M inputs for N:M). No weight update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.pruners._profile import ProfiledPruner
from prunerep.pruners.common import (CalibratedPruner, apply_mask, calibrated_blocks, mask_for, prunable_linears,
                                     prune_block)


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖ for weight [out, in] and the per-input-feature sum of squares [in]."""
    return weight.abs().float() * input_sq_norm.float().sqrt()[None, :]


@dataclass
class Wanda(ProfiledPruner, CalibratedPruner):
    name: str = "wanda"

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        plan = self.layer_targets(model, calib, settings)
        for step in calibrated_blocks(model, calib, settings, desc="wanda"):
            spec = self.block_spec(plan, step.index, settings.spec)
            linears = prunable_linears(step.block, self)
            sq = {name: torch.zeros(lin.in_features, device=lin.weight.device, dtype=torch.float32)
                  for name, lin in linears.items()}

            def accumulate(name, x):
                sq[name] += x.float().pow(2).sum(0)

            def prune_linear(name, lin):
                apply_mask(lin, mask_for(wanda_score(lin.weight, sq[name]), spec, per_row=True))

            prune_block(step, linears, settings, accumulate, prune_linear)
        return {"method": "wanda", "calibration": True, "calib_shape": list(calib.shape),
                "profile": self.profile_report(plan, model)}
