"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and, after each column,
update the not-yet-processed columns with the Optimal Brain Surgeon correction computed
from the inverse Hessian H = 2XXᵀ of the layer's calibration inputs. Masks are chosen
adaptively per block of `blocksize` columns (by w² / [H⁻¹]_jj²), or per group of M for N:M."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.errors import ConfigError
from prunerep.pruners._profile import ProfiledPruner
from prunerep.pruners.common import (CalibratedPruner, ExpertReport, RunningHessians, calibrated_blocks,
                                     inverse_hessian_cholesky, n_pruned, prune_block, targets_of, write_weight)


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, spec, blocksize: int = 128,
                           percdamp: float = 0.01) -> torch.Tensor:
    """Return the pruned and reconstructed weight [out, in] (float32) for H [in, in]."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_cholesky(hessian, percdamp)  # shared with GPTQ (prunerep/quant/gptq.py)
    W[:, dead] = 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if spec.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # exactly round(numel·ratio) prunes in this column block
            score = W1 ** 2 / d[None, :] ** 2
            mask1 = torch.zeros(W1.numel(), dtype=torch.bool, device=W.device)
            k = n_pruned(W1.numel(), spec.ratio)
            if k:
                mask1[torch.topk(score.flatten(), k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        for i in range(count):
            w = W1[:, i]
            if spec.is_nm and i % spec.m == 0:
                score = W1[:, i:i + spec.m] ** 2 / d[None, i:i + spec.m] ** 2
                mask1.scatter_(1, i + torch.topk(score, spec.n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@dataclass
class SparseGPT(ProfiledPruner, CalibratedPruner):
    name: str = "sparsegpt"
    blocksize: int = 128  # columns updated together (lazy batch updates)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal

    def validate(self, spec) -> None:
        super().validate(spec)
        if self.blocksize < 1 or not self.percdamp >= 0:
            raise ConfigError(f"pruner.blocksize={self.blocksize} must be >= 1 and pruner.percdamp={self.percdamp} >= 0")

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        plan = self.layer_targets(model, calib, settings)
        experts = ExpertReport(settings)
        for step in calibrated_blocks(model, calib, settings, desc="sparsegpt"):
            spec = self.block_spec(plan, step.index, settings.spec)
            targets = targets_of(step.block, self)
            hess = RunningHessians(targets, settings.expert_min_tokens)  # running mean of 2·x xᵀ (shared with GPTQ)

            def prune_target(name, t):
                write_weight(t, sparsegpt_prune_weight(t.weight, hess.pop(name), spec, self.blocksize, self.percdamp))

            prune_block(step, targets, settings, self.sequential, hess, prune_target)
            experts.record(step.index, hess.counts)
        return {"method": "sparsegpt", "calibration": True, "calib_shape": list(calib.shape),
                "blocksize": self.blocksize, "percdamp": self.percdamp, "profile": self.profile_report(plan, model),
                **experts.entry()}
