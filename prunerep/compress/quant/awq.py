"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): protect the input channels
that carry large activations by scaling them up before rounding. For the Linear layers that read
one input (q/k/v; gate/up; o; down) one per-input-channel scale s = ā^α / √(max·min) is searched
on calibration data (ā: mean |x| per channel, α on a grid of ``n_grid`` points in [0, 1); α = 0
is plain RTN), minimising their output error ‖X Wᵀ − X Ŵᵀ‖², Ŵ = Q(W·diag(s))·diag(s)⁻¹. Then
(``clip``) the largest |weight| of each group is shrunk by up to ``max_shrink`` where that lowers
the group's own output error, and the scaled, clipped weights are rounded group-wise.

In a deployment s is folded into the operation before the layers (the norm, v_proj, up_proj), so
it costs no storage; here the weight is written back as Q(W·s)/s, which computes the same. As in
the reference, the attention output projection is scaled only where that fold exists (as many
key/value heads as query heads), and the query/key projections are not clipped.

The grid is llm-awq's (:data:`GRID`). Block by block: block i+1 is calibrated on the outputs of
the quantized block i (``block_inputs=quantized``, the order of GPTQ and the pruners) or, as in
llm-awq's ``run_awq``, on the outputs of block i before it was scaled, clipped and quantized
(``block_inputs=dense``).

Two simplifications of the reference code, both to keep it model-generic and cheap on a CPU: the
loss is the layers' own outputs (the reference uses the attention / MLP sublayer's output for
q/k/v and gate/up), and both searches use the Gram matrix XᵀX of all calibration tokens (the
shared :class:`~prunerep.compress.stats.RunningHessians`) instead of the tokens themselves:
‖X ΔWᵀ‖² = tr(ΔW XᵀX ΔWᵀ), exact and independent of the number of tokens."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prunerep.compress.engine import calibrated_blocks, input_groups, prune_block
from prunerep.compress.grid import grid_params, grouped, relative_error, rtn_quantize, to_grid
from prunerep.compress.masks import write_back
from prunerep.compress.method import CalibratedQuantizer, targets_of
from prunerep.compress.stats import ExpertReport, RunningHessians
from prunerep.errors import ConfigError
from prunerep.model.anatomy import output_targets

#: llm-awq's grid: with sym=true, its zero_point=False one (prunerep.compress.grid)
GRID = "awq"
#: where the next block's inputs come from: the quantized block (the block-sequential order of
#: GPTQ and the pruners) or the block before quantization (llm-awq's run_awq)
BLOCK_INPUTS = ("quantized", "dense")
#: layers the clip search leaves alone (the reference: "qk bmm is hard to clip precisely")
NO_CLIP = re.compile(r"(^|\.)(q_proj|k_proj|query|key|qkv_proj|Wqkv)$")


# --------------------------------------------------------------------------- maths (pure)

def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = ā^α, floored at 1e-4, normalised so that max(s)·min(s) = 1 (α = 0: all ones)."""
    s = act_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_quantize(weight: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Q(W·diag(s))·diag(s)⁻¹: the weight as the scaled, rounded layer computes with it."""
    return rtn_quantize(weight.float() * s[None, :], bits, group_size, sym, GRID) / s[None, :]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖X ΔWᵀ‖² from the Gram matrix G = XᵀX (up to its normalisation): Σ_r Δw_r G Δw_rᵀ."""
    return ((delta.float() @ gram) * delta.float()).sum()


def awq_search_scale(weights: list[torch.Tensor], act_mean: torch.Tensor, gram: torch.Tensor, bits: int,
                     group_size: int, sym: bool, n_grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:
    """``(s, α, losses)``: the scale of the grid point α ∈ {0, 1/n, …, (n−1)/n} with the smallest
    output error summed over the layers that share the input."""
    losses, best = [], None
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_scales(act_mean, alpha)
        loss = sum(float(output_error(w.float() - scaled_quantize(w, s, bits, group_size, sym), gram))
                   for w in weights)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2], losses


def awq_clip(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, sym: bool, n_grid: int = 20,
             max_shrink: float = 0.5, row_chunk: int = 1024) -> torch.Tensor:
    """The weight with each group's |w| clipped at max|w|·(1 − i/n_grid), i < max_shrink·n_grid,
    choosing i per output row and group by the group's own output error Δw_g G_gg Δw_gᵀ (G_gg:
    the group's diagonal block of the Gram matrix)."""
    W = grouped(weight.float(), group_size)  # [out, G, g]
    rows, n_groups, g = W.shape
    blocks = torch.stack([gram[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(n_groups)]).float()  # [G, g, g]
    out = torch.empty_like(W)
    steps = max(1, int(max_shrink * n_grid))
    for r0 in range(0, rows, row_chunk):
        Wc = W[r0:r0 + row_chunk]
        org_max = Wc.abs().amax(-1, keepdim=True)
        best_max, best_err = org_max.clone(), None
        for i in range(steps):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(Wc, max_val), -max_val)
            delta = to_grid(cur, *grid_params(cur, bits, sym, GRID), bits) - Wc
            err = torch.einsum("rgk,gkl,rgl->rg", delta, blocks, delta)[..., None]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        out[r0:r0 + row_chunk] = torch.maximum(torch.minimum(Wc, best_max), -best_max)
    return out.reshape(weight.shape)


def awq_quantize_weight(weight: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
                        sym: bool, clip: bool = True, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """One layer, its scale chosen: Q(clip(W·s))/s (float32); zeros stay zero."""
    Ws = weight.float() * s[None, :]
    if clip:  # the scaled layer sees the inputs x/s: G -> diag(1/s) G diag(1/s)
        Ws = awq_clip(Ws, gram / s[:, None] / s[None, :], bits, group_size, sym, n_grid, max_shrink)
    return rtn_quantize(Ws, bits, group_size, sym, GRID) / s[None, :]


# --------------------------------------------------------------------------- the method

@dataclass
class AWQ(CalibratedQuantizer):
    name: str = "awq"
    sequential: bool = False  # the reference gathers a block's statistics before quantizing any of it
    n_grid: int = 20  # points of the α grid (and of the clip search)
    clip: bool = True  # search a per-group clipping threshold after the scale
    max_shrink: float = 0.5  # the clip search shrinks max|w| by at most this fraction
    block_inputs: str = "quantized"  # quantized | dense (llm-awq's): what the next block is calibrated on

    def validate(self) -> None:
        super().validate()
        if self.block_inputs not in BLOCK_INPUTS:
            raise ConfigError(f"quant.block_inputs={self.block_inputs!r}; choose {' or '.join(BLOCK_INPUTS)}")
        if self.n_grid < 1:
            raise ConfigError(f"quant.n_grid={self.n_grid} must be >= 1")
        if not (0 <= self.max_shrink < 1):
            raise ConfigError(f"quant.max_shrink={self.max_shrink} must be in [0, 1)")

    @torch.no_grad()
    def quantize(self, model, calib, settings) -> dict:
        text = model.config.get_text_config()
        heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
        fold_attn_out = kv_heads is None or kv_heads == heads
        errors, alphas = {}, {}
        experts = ExpertReport(settings)
        for step in calibrated_blocks(model, calib, settings, desc="awq"):
            targets = targets_of(step.block, self)
            groups = input_groups(step, targets, settings)
            leader = {n: grp[0] for grp in groups for n in grp}
            lead = {grp[0]: targets[grp[0]] for grp in groups}
            gram = RunningHessians(lead, settings.expert_min_tokens)  # 2XᵀX/n: the Gram matrix up to a constant
            abs_mean = {n: torch.zeros(t.in_features, device=t.weight.device) for n, t in lead.items()}
            unscaled = _unscalable(step.block, targets, fold_attn_out)
            done: set[str] = set()

            def accumulate(name, x):
                if name not in lead or x.shape[0] == 0:
                    return
                seen = gram.counts.seen[name]
                gram(name, x)
                t = x.shape[0]
                abs_mean[name] += (x.float().abs().sum(0) - t * abs_mean[name]) / (seen + t)

            def quantize_group(name, _target):
                head = leader[name]
                if head in done:
                    return
                done.add(head)
                members = [n for n in targets if leader[n] == head]
                starved = gram.counts.starved(head)
                G = gram.pop(head)
                weights = [targets[n].weight for n in members]
                if starved or any(n in unscaled for n in members):
                    s, alpha = torch.ones_like(abs_mean[head]), None
                else:
                    s, alpha, _ = awq_search_scale(weights, abs_mean[head], G, self.bits, self.group_size, self.sym,
                                                   self.n_grid)
                for n in members:
                    w = targets[n].weight
                    new = awq_quantize_weight(w, s, G, self.bits, self.group_size, self.sym,
                                              self.clip and not NO_CLIP.search(n), self.n_grid, self.max_shrink)
                    errors[f"layers.{step.index}.{n}"] = relative_error(w, new)
                    alphas[f"layers.{step.index}.{n}"] = alpha
                    write_back(targets[n], new, w == 0 if settings.pruner.sets_zeros else torch.zeros_like(
                        w, dtype=torch.bool))

            prune_block(step, targets, settings, self.sequential, accumulate, quantize_group,
                        dense_outputs=self.block_inputs == "dense")
            experts.record(step.index, gram.counts)
        return self.report(errors, calibration=True, calib_shape=list(calib.shape), n_grid=self.n_grid,
                           clip=self.clip, max_shrink=self.max_shrink, sequential=self.sequential,
                           block_inputs=self.block_inputs, alpha=alphas,
                           **experts.entry())


def _unscalable(block, targets: dict, fold_attn_out: bool) -> set[str]:
    """The targets whose input scale has nowhere to be folded: the attention output projection
    when key/value heads are shared (grouped-query attention), as in the reference, and every
    expert's gate/up projection (its input is the norm's output that the router and all the other
    experts read too; an expert's down projection folds into its own up projection)."""
    out = {n for n, t in targets.items() if t.kind == "expert" and t.param != "down_proj"}
    if not fold_attn_out:
        try:
            attn_out = {id(t.module) for t in output_targets(block, "attn")}
        except (TypeError, ValueError):
            attn_out = set()
        out |= {n for n, t in targets.items() if id(t.module) in attn_out}
    return out


__all__ = ["AWQ", "awq_scales", "scaled_quantize", "output_error", "awq_search_scale", "awq_clip",
           "awq_quantize_weight", "NO_CLIP"]
