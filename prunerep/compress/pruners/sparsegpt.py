"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and, after each column,
update the not-yet-processed columns with the Optimal Brain Surgeon correction computed
from the inverse Hessian H = 2XXᵀ of the layer's calibration inputs. Masks are chosen
adaptively per block of `blocksize` columns (by w² / [H⁻¹]_jj²), or per group of M for N:M."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.compress.engine import calibrated_blocks, prune_block
from prunerep.compress.masks import n_pruned, write_weight
from prunerep.compress.method import CalibratedPruner, targets_of
from prunerep.compress.profile import ProfiledPruner
from prunerep.compress.stats import ExpertReport, RunningHessians, inverse_hessian_cholesky, obs_sweep
from prunerep.errors import ConfigError


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, spec, blocksize: int = 128,
                           percdamp: float = 0.01) -> torch.Tensor:
    """Return the pruned and reconstructed weight [out, in] (float32) for H [in, in]: each block of
    columns gets its mask from the weights as the earlier blocks' updates left them (the lowest
    w² / [H⁻¹]_jj², exactly round(numel·ratio) of them; N:M: per group of M inputs of each row, at
    the group's first column), and every column's pruning error is compensated (:func:`obs_sweep`)."""
    W = weight.detach().float().clone()
    Hinv, dead = inverse_hessian_cholesky(hessian, percdamp)
    W[:, dead] = 0
    state: dict = {}

    def block(i1, i2, W1, Hinv1):
        d = state["d"] = torch.diag(Hinv1)
        if spec.is_nm:
            state["mask"] = torch.zeros_like(W1, dtype=torch.bool)
            return
        score = W1 ** 2 / d[None, :] ** 2
        mask = torch.zeros(W1.numel(), dtype=torch.bool, device=W.device)
        k = n_pruned(W1.numel(), spec.ratio)
        if k:
            mask[torch.topk(score.flatten(), k, largest=False).indices] = True
        state["mask"] = mask.view_as(W1)

    def column(j, i, W1):
        mask, d = state["mask"], state["d"]
        if spec.is_nm and i % spec.m == 0:
            score = W1[:, i:i + spec.m] ** 2 / d[None, i:i + spec.m] ** 2
            mask.scatter_(1, i + torch.topk(score, spec.n, dim=1, largest=False).indices, True)
        return W1[:, i].masked_fill(mask[:, i], 0)

    return obs_sweep(W, Hinv, blocksize, column, block)


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
