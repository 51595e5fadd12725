"""What the methods gather from a target's calibration inputs: the tokens each saw (experts:
those routed to it), Wanda's input norms, the Hessian of the layer-wise reconstruction error and its
damped inverse (shared by SparseGPT and GPTQ), and SparseGPT's / GPTQ's column loop with lazy batch
updates. An expert that saw fewer than ``calib.expert_min_tokens`` tokens has no usable statistics:
its inputs are treated as isotropic (Wanda: magnitude per row; SparseGPT, GPTQ: H = I; AWQ: no
scale), and the method's report names it under ``experts.starved``."""
from __future__ import annotations

from typing import Callable, Optional


import torch

from prunerep.compress.method import PruneSettings
from prunerep.model.anatomy import Target


class InputCounts:
    """Calibration tokens seen per target, and which experts saw too few to be calibrated on."""

    def __init__(self, targets: dict[str, Target], min_tokens: int):
        self.kind = {n: t.kind for n, t in targets.items()}
        self.seen = {n: 0 for n in targets}
        self.min_tokens = min_tokens

    def add(self, name: str, x: torch.Tensor) -> None:
        self.seen[name] += x.shape[0]

    def starved(self, name: str) -> bool:
        return self.kind[name] == "expert" and self.seen[name] < self.min_tokens


class ExpertReport:
    """What pruning.json (and the quantizers' report) says about experts: the tokens each expert
    matrix was calibrated on and those that fell back to isotropic statistics."""

    def __init__(self, cfg: PruneSettings):
        self.cfg, self.tokens, self.starved = cfg, {}, []

    def record(self, block_index: int, counts: InputCounts) -> None:
        for name, n in counts.seen.items():
            if counts.kind[name] == "expert":
                self.tokens[f"layers.{block_index}.{name}"] = n
                if counts.starved(name):
                    self.starved.append(f"layers.{block_index}.{name}")

    def entry(self) -> dict:
        """``{"experts": {...}}`` for a method's report; {} for a model without experts."""
        if not self.tokens:
            return {}
        return {"experts": {"expert_tokens": self.cfg.expert_tokens, "min_tokens": self.cfg.expert_min_tokens,
                            "tokens": self.tokens, "starved": self.starved}}


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖ for weight [out, in] and the per-input-feature sum of squares [in]."""
    return weight.abs().float() * input_sq_norm.float().sqrt()[None, :]


class InputSquares:
    """Σ x_j² per input feature of each target over the calibration tokens (Wanda's ‖X_j‖²); all
    ones for an expert that saw too few tokens (the score is then the magnitude)."""

    def __init__(self, targets, min_tokens: int = 0):
        self.sq = {n: torch.zeros(t.in_features, device=t.weight.device, dtype=torch.float32)
                   for n, t in targets.items()}
        self.counts = InputCounts(targets, min_tokens)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.sq[name] += x.float().pow(2).sum(0)
        self.counts.add(name, x)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.ones_like(self.sq[name]) if self.counts.starved(name) else self.sq[name]



class RunningHessians:
    """H = (2/n)·Σ x xᵀ over the n calibration tokens seen so far, one per target (float32),
    kept as a running mean (the reference code's ``add_batch``). Pass it as the ``accumulate`` of
    :func:`prune_block`; :meth:`pop` hands a target's H over and frees it: the identity for an
    expert that saw fewer than ``min_tokens`` tokens (no usable statistics)."""

    def __init__(self, targets: dict[str, Target], min_tokens: int = 0):
        self.hess = {n: torch.zeros(t.in_features, t.in_features, device=t.weight.device, dtype=torch.float32)
                     for n, t in targets.items()}
        self.counts = InputCounts(targets, min_tokens)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        t = x.shape[0]
        if t == 0:
            return
        x = x.float()
        seen = self.counts.seen[name]
        self.hess[name] *= seen / (seen + t)
        self.counts.add(name, x)
        x = x * (2.0 / self.counts.seen[name]) ** 0.5
        self.hess[name] += x.T @ x

    def pop(self, name: str) -> torch.Tensor:
        h = self.hess.pop(name)
        if self.counts.starved(name):
            return torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        return h


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)`` for H [in, in]: U is the upper Cholesky factor of (H + λI)⁻¹, λ = percdamp ×
    the mean of diag(H), after every input that never fired (``dead``: H_jj = 0; the caller zeroes
    those weight columns) got H_jj = 1 -- SparseGPT's and GPTQ's preparation, verbatim."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


#: ``column(j, i, W1) -> q``: what column j (the i-th of the current block, whose updated columns
#: are W1) becomes; ``block(i1, i2, W1, Hinv1)`` runs first for every block of columns
Column = Callable[[int, int, torch.Tensor], torch.Tensor]


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, column: Column,
              block: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """SparseGPT's and GPTQ's loop (Optimal Brain Surgeon with lazy batch updates), in place on
    ``W`` [out, in] with ``Hinv`` the upper Cholesky factor of the damped inverse Hessian: column by
    column, q = ``column(...)`` (the column pruned or rounded), and its error (w − q)/[H⁻¹]_jj is
    spread over the columns not yet processed -- within the block of ``blocksize`` columns at once,
    beyond it once per block."""
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if block is not None:
            block(i1, i2, W1, Hinv1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = column(i1 + i, i, W1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W
