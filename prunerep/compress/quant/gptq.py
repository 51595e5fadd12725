"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, 2022): quantize a layer column by column and,
after each column, spread its rounding error over the columns not yet quantized with the
Optimal Brain Surgeon update from the inverse Hessian H = 2XXᵀ of the layer's calibration
inputs -- SparseGPT's machinery with rounding in place of the mask, and the same code: the
Hessian accumulation (:class:`~prunerep.compress.stats.RunningHessians`), its damped inverse
(:func:`~prunerep.compress.stats.inverse_hessian_cholesky`) and the block-sequential calibration
(:func:`~prunerep.compress.engine.calibrated_blocks`, :func:`~prunerep.compress.engine.prune_block`)
are the pruners'.

Groups: without ``act_order`` a group's scale and zero point are set when the loop reaches its
first column, from the weights as the earlier blocks of columns left them -- not yet updated by
the columns before it in its own block (the reference's dynamic groups, ``fasterquant``: the
grid of ``W[:, j:j+g]``, not of the block's working copy). With ``act_order`` the columns go in order of decreasing H_jj and each group's
grid is set from the weights before the loop (static groups, so a group is still ``group_size``
consecutive input weights and needs no index in storage).

After a pruner (``sets_zeros``): weights that are zero stay zero (they are not stored), and the error of holding
them at zero is compensated like a rounding error (SparseGPT's joint sparsification and
quantization)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.compress.engine import calibrated_blocks, prune_block
from prunerep.compress.grid import grid_params, group_size_of, grouped, relative_error, to_grid
from prunerep.compress.masks import write_back
from prunerep.compress.method import CalibratedQuantizer, targets_of
from prunerep.compress.stats import ExpertReport, RunningHessians, inverse_hessian_cholesky, obs_sweep
from prunerep.errors import ConfigError


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                         blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         hold_zeros: bool = True) -> torch.Tensor:
    """The quantized weight [out, in] (float32, on GPTQ's grid of :mod:`prunerep.compress.grid`)
    for H [in, in]; with ``hold_zeros`` (a pruner ran) the entries of ``weight`` that are exactly
    zero stay zero, and the error of holding them is compensated like a rounding error."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    g = group_size_of(group_size, cols)
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} input features")
    H = hessian.float()
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    Hinv, dead = inverse_hessian_cholesky(H, percdamp)
    if perm is not None:
        W[:, perm[dead]] = 0
        # static groups: every group's grid from the weights before the loop, in the original order
        s_all, z_all = grid_params(grouped(W, g), bits, sym)  # [rows, cols/g, 1]
        W = W[:, perm]
        group_of = perm // g
    else:
        W[:, dead] = 0
    # held at zero: the pruner's zeros (and the dead inputs, zero for every method)
    pruned = (W == 0) if hold_zeros else torch.zeros_like(W, dtype=torch.bool)
    grid: dict = {}

    def column(j, i, W1):
        if perm is not None:
            scale, zero = s_all[:, group_of[j]], z_all[:, group_of[j]]
        else:
            if j % g == 0:  # a group starts: its grid from the weights as the earlier blocks left them (the reference's)
                grid["sz"] = grid_params(W[:, j:j + g].masked_fill(pruned[:, j:j + g], 0), bits, sym)
            scale, zero = grid["sz"]
        return to_grid(W1[:, i:i + 1], scale, zero, bits)[:, 0].masked_fill(pruned[:, j], 0)

    W = obs_sweep(W, Hinv, blocksize, column)
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W


@dataclass
class GPTQ(CalibratedQuantizer):
    name: str = "gptq"
    blocksize: int = 128  # columns updated together (lazy batch updates)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    act_order: bool = False  # columns in order of decreasing H_jj (static groups)

    def validate(self) -> None:
        super().validate()
        if self.blocksize < 1 or not self.percdamp >= 0:
            raise ConfigError(f"quant.blocksize={self.blocksize} must be >= 1 and quant.percdamp={self.percdamp} >= 0")

    @torch.no_grad()
    def quantize(self, model, calib, settings) -> dict:
        errors = {}
        experts = ExpertReport(settings)
        for step in calibrated_blocks(model, calib, settings, desc="gptq"):
            targets = targets_of(step.block, self)
            hess = RunningHessians(targets, settings.expert_min_tokens)

            def quantize_target(name, t):
                w = t.weight
                new = gptq_quantize_weight(w, hess.pop(name), self.bits, self.group_size, self.sym, self.blocksize,
                                           self.percdamp, self.act_order, hold_zeros=settings.pruner.sets_zeros)
                errors[f"layers.{step.index}.{name}"] = relative_error(w, new)
                write_back(t, new, w == 0 if settings.pruner.sets_zeros else torch.zeros_like(w, dtype=torch.bool))

            prune_block(step, targets, settings, self.sequential, hess, quantize_target)
            experts.record(step.index, hess.counts)
        return self.report(errors, calibration=True, calib_shape=list(calib.shape), blocksize=self.blocksize,
                           percdamp=self.percdamp, act_order=self.act_order, sequential=self.sequential,
                           **experts.entry())
