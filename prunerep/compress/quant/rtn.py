"""Round-to-nearest (RTN): every weight to the nearest point of its group's grid, with no data
and no error feedback -- the baseline GPTQ and AWQ are measured against (see
:mod:`prunerep.compress.grid` for the grid)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.compress.grid import relative_error, rtn_quantize
from prunerep.compress.masks import write_back
from prunerep.compress.method import GroupQuantizer, targets_of
from prunerep.model.anatomy import decoder_layers
from prunerep.model.placement import onloaded


@dataclass
class RTN(GroupQuantizer):
    name: str = "rtn"

    @torch.no_grad()
    def quantize(self, model, calib, settings) -> dict:
        """Data-free: one weight matrix at a time, in place (on its compute device)."""
        errors = {}
        for i, block in enumerate(decoder_layers(model)):
            with onloaded(block):
                for name, t in targets_of(block, self).items():
                    w = t.weight
                    new = rtn_quantize(w, self.bits, self.group_size, self.sym)
                    errors[f"layers.{i}.{name}"] = relative_error(w, new)
                    write_back(t, new, w == 0 if settings.pruner.sets_zeros else torch.zeros_like(w, dtype=torch.bool))
        return self.report(errors, calibration=False)
