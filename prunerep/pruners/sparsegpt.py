"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and, after each column,
update the not-yet-processed columns with the Optimal Brain Surgeon correction computed
from the inverse Hessian H = 2XXᵀ of the layer's calibration inputs. Masks are chosen
adaptively per block of `blocksize` columns (by w² / [H⁻¹]_jj²), or per group of M for N:M."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.errors import ConfigError
from prunerep.pruners.common import (CalibratedPruner, apply_mask, calibrated_blocks, n_pruned, prunable_linears,
                                     prune_block)


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, spec, blocksize: int = 128,
                           percdamp: float = 0.01) -> torch.Tensor:
    """Return the pruned and reconstructed weight [out, in] (float32) for H [in, in]."""
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

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
class SparseGPT(CalibratedPruner):
    name: str = "sparsegpt"
    blocksize: int = 128  # columns updated together (lazy batch updates)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal

    def validate(self, spec) -> None:
        super().validate(spec)
        if self.blocksize < 1 or not self.percdamp >= 0:
            raise ConfigError(f"pruner.blocksize={self.blocksize} must be >= 1 and pruner.percdamp={self.percdamp} >= 0")

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        for step in calibrated_blocks(model, calib, settings, desc="sparsegpt"):
            linears = prunable_linears(step.block, self)
            hess = {n: torch.zeros(l.in_features, l.in_features, device=l.weight.device, dtype=torch.float32)
                    for n, l in linears.items()}
            seen = {n: 0 for n in linears}

            def accumulate(name, x):  # running mean of 2·x xᵀ over tokens
                x = x.float()
                t = x.shape[0]
                hess[name] *= seen[name] / (seen[name] + t)
                seen[name] += t
                x = x * (2.0 / seen[name]) ** 0.5
                hess[name] += x.T @ x

            def prune_linear(name, lin):
                new = sparsegpt_prune_weight(lin.weight, hess.pop(name), settings.spec, self.blocksize, self.percdamp)
                lin.weight.data.copy_(new.to(lin.weight.dtype))
                apply_mask(lin, new == 0)  # exact zeros survive the cast back to the model's dtype

            prune_block(step, linears, settings, accumulate, prune_linear)
        return {"method": "sparsegpt", "calibration": True, "calib_shape": list(calib.shape),
                "blocksize": self.blocksize, "percdamp": self.percdamp}
