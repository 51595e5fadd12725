"""What every quantizer shares: the base of the method classes, the grid maths, the targets.

The grid (GPTQ's and AWQ's reference conventions): each group of ``group_size`` consecutive
input weights of an output row has a scale s (stored in fp16: the simulated values are those an
fp16-scale format gives back) and an integer zero point z; a weight w is stored as
q = clamp(round(w/s) + z, 0, 2^b − 1) and read back as (q − z)·s.

* asymmetric (``sym=false``): s = (max − min)/(2^b − 1) over the group with 0 included in the
  range (min ≤ 0 ≤ max), z = round(−min/s): 2^b levels spanning the group.
* symmetric (``sym=true``): s = max|w| / (2^(b−1) − 1), z = 2^(b−1): the levels
  −2^(b−1)·s … (2^(b−1) − 1)·s, so ±max|w| are on the grid; no zero point is stored.

Either way 0 is exactly on the grid (q = z), so weights a pruner zeroed stay exactly zero, and
the quantizers also re-apply the zero mask after any error feedback (GPTQ) or rescaling (AWQ):
pruned weights are not stored (see :mod:`prunerep.quant.accounting`).

The maths are pure functions (tensors in, tensors out); the classes only walk the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from prunerep.errors import ConfigError
from prunerep.model.anatomy import Target
from prunerep.pruners.common import PruneSettings, apply_mask, check_target_patterns, method_targets
from prunerep.registry import Method

MIN_BITS, MAX_BITS = 2, 8
FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal): scales never round to 0
FP16_MAX = 65504.0


# --------------------------------------------------------------------------- the grid (pure)

def group_size_of(group_size: int, in_features: int) -> int:
    """The number of input weights per group: ``-1`` means the whole row (per output channel)."""
    return in_features if group_size == -1 else group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of every group of ``w [..., g]`` (the last dimension is one group), each
    shaped ``[..., 1]``; the scale rounded to fp16, the zero point an integer in [0, 2^bits − 1]."""
    w = w.float()
    maxq = 2 ** bits - 1
    if sym:
        scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        lo = w.amin(-1, keepdim=True).clamp(max=0)
        hi = w.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    scale = scale.clamp(FP16_TINY, FP16_MAX).half().float()
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize: the grid value (q − z)·s nearest to each weight (float32)."""
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, in/g, g]`` (a view where possible)."""
    rows, cols = weight.shape
    g = group_size_of(group_size, cols)
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} input features")
    return weight.reshape(rows, cols // g, g)


def rtn_params(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per output row and group, each ``[out, in/g, 1]``."""
    return grid_params(grouped(weight.float(), group_size), bits, sym)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest, group-wise: every weight to the nearest point of its group's grid
    (float32, the shape of ``weight``)."""
    w = grouped(weight.float(), group_size)
    scale, zero = grid_params(w, bits, sym)
    return to_grid(w, scale, zero, bits).reshape(weight.shape)


def relative_error(weight: torch.Tensor, new: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F."""
    w = weight.float()
    return float((w - new.float()).norm() / w.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the methods

@dataclass
class Quantizer(Method):
    """Base of every quantization method (``conf/quant/<name>.yaml`` + ``prunerep/quant/<name>.py``).

    Capabilities are class flags; :meth:`validate` runs before the model loads (settings alone),
    :meth:`check` on its skeleton before it loads, :meth:`quantize` after the pruner."""

    quantizes: ClassVar[bool] = True  # False for ``none``: no quantize stage, no quantization entry

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are loaded for it."""
        return False

    def validate(self) -> None:
        """Checks that need no model. Raise ConfigError (one line)."""

    def check(self, model: nn.Module) -> None:
        """Checks against the model (its skeleton on the meta device will do). Raise ConfigError
        (one line)."""

    def quantize(self, model: nn.Module, calib: Optional[torch.Tensor], settings: PruneSettings) -> dict:
        """Quantize-dequantize ``model``'s weights in place; return what the method reports."""
        raise NotImplementedError

    def storage(self) -> Optional[dict]:
        """The storage format it gives its target weights (``bits``, ``group_size``, ``sym``), for
        the bits accounting; None when it quantizes nothing."""
        return None


@dataclass
class GroupQuantizer(Quantizer):
    """A quantizer to ``bits``-bit integers with one fp16 scale (and, asymmetric, one zero point)
    per group of ``group_size`` consecutive input weights of each output row (``-1``: one group
    per row). ``include`` / ``exclude`` / ``routers``: which weight targets of a decoder block, as
    for the pruners (the embeddings and the LM head are never quantized)."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    include: str = r".*"
    exclude: Optional[str] = None
    routers: bool = False

    def validate(self) -> None:
        if isinstance(self.bits, bool) or not (MIN_BITS <= int(self.bits) <= MAX_BITS):
            raise ConfigError(f"quant.bits={self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"quant.group_size={self.group_size} must be >= 1, or -1 (one group per output row)")
        check_target_patterns(self, "quant")

    def check(self, model: nn.Module) -> None:
        for name, t in method_targets(model, self, "quant").items():
            if self.group_size != -1 and t.in_features % self.group_size:
                raise ConfigError(f"quant.group_size={self.group_size} does not divide the {t.in_features} input "
                                  f"features of {name}; choose a divisor of every width (e.g. 64 or 32) or -1 "
                                  f"(one group per output row)")

    def storage(self) -> Optional[dict]:
        return {"bits": int(self.bits), "group_size": int(self.group_size), "sym": bool(self.sym)}

    def report(self, errors: dict[str, float], **extra) -> dict:
        """What every group quantizer reports (quantization entry of compression.json)."""
        return {"method": self.name, **self.storage(), "n_layers": len(errors),
                "mean_weight_rel_error": sum(errors.values()) / len(errors) if errors else 0.0, **extra}


@dataclass
class CalibratedQuantizer(GroupQuantizer):
    """A quantizer that reads calibration activations block by block (GPTQ, AWQ), through the
    pruners' machinery (:func:`prunerep.pruners.common.calibrated_blocks` /
    :func:`~prunerep.pruners.common.prune_block`): block i+1 sees the outputs of the already
    quantized block i. ``sequential`` as for the pruners: ``true``, each layer's statistics come
    from the block with the layers before it already quantized; ``false``, from the block as the
    pruner left it."""

    sequential: bool = True

    @property
    def needs_calibration(self) -> bool:
        return True


# --------------------------------------------------------------------------- helpers

@torch.no_grad()
def write_back(target: Target, new: torch.Tensor, zeros: torch.Tensor) -> None:
    """Copy the quantized weight into the target; the weights that were zero (pruned) stay zero."""
    w = target.weight
    w.copy_(new.to(device=w.device, dtype=w.dtype))
    apply_mask(target, zeros)


__all__ = ["Quantizer", "GroupQuantizer", "CalibratedQuantizer", "grid_params", "to_grid", "grouped", "rtn_params",
           "rtn_quantize", "relative_error", "write_back", "group_size_of"]
