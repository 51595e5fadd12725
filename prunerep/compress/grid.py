"""The quantization grid, pure functions (tensors in, tensors out): each group of ``group_size``
consecutive input weights of an output row has a scale s (stored in fp16: the simulated values are
those an fp16-scale format gives back) and an integer zero point z; a weight w is stored as
q = clamp(round(w/s) + z, 0, 2^b − 1) and read back as (q − z)·s.

* asymmetric (``sym=false``, every method): s = (max − min)/(2^b − 1) over the group with 0 included
  in the range (min ≤ 0 ≤ max), z = round(−min/s): 2^b levels spanning the group.
* symmetric (``sym=true``), each method's own reference grid (:data:`GRIDS`):

  - ``gptq`` (GPTQ's ``--sym``, and RTN, GPTQ's baseline): with m = max(|min|, max), the range
    [−m, m] (or [0, max] when no weight is negative), s = 2m/(2^b − 1), z = 2^(b−1) (the
    midpoint);
  - ``awq`` (llm-awq's ``zero_point=False``): s = max|w| / (2^(b−1) − 1), z = 2^(b−1): the levels
    −2^(b−1)·s … (2^(b−1) − 1)·s, so ±max|w| are on the grid (code 0 is never used).

  No zero point is stored either way.

0 is exactly on every grid (q = z), so weights a pruner zeroed stay exactly zero, and the quantizers
also re-apply the zero mask after any error feedback (GPTQ) or rescaling (AWQ): pruned weights are
not stored (see :mod:`prunerep.compress.accounting`).
"""
from __future__ import annotations

import torch

FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal): scales never round to 0
FP16_MAX = 65504.0
#: the symmetric grids of the reference implementations (see the module doc)
GRIDS = ("gptq", "awq")


def group_size_of(group_size: int, in_features: int) -> int:
    """The number of input weights per group: ``-1`` means the whole row (per output channel)."""
    return in_features if group_size == -1 else group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool, grid: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of every group of ``w [..., g]`` (the last dimension is one group), each
    shaped ``[..., 1]``; the scale rounded to fp16, the zero point an integer in [0, 2^bits − 1];
    ``grid`` picks the symmetric grid (see the module doc)."""
    w = w.float()
    maxq = 2 ** bits - 1
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    if sym and grid == "awq":
        scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    elif sym:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
        scale = (hi - lo) / maxq
    else:
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


def rtn_params(weight: torch.Tensor, bits: int, group_size: int, sym: bool, grid: str = "gptq"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per output row and group, each ``[out, in/g, 1]``."""
    return grid_params(grouped(weight.float(), group_size), bits, sym, grid)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, grid: str = "gptq") -> torch.Tensor:
    """Round-to-nearest, group-wise: every weight to the nearest point of its group's grid
    (float32, the shape of ``weight``)."""
    w = grouped(weight.float(), group_size)
    scale, zero = grid_params(w, bits, sym, grid)
    return to_grid(w, scale, zero, bits).reshape(weight.shape)


def relative_error(weight: torch.Tensor, new: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F."""
    w = weight.float()
    return float((w - new.float()).norm() / w.norm().clamp_min(1e-30))
