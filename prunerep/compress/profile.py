"""Sparsity profiles: how the run's target is spread over the decoder blocks.

``uniform`` (the default) gives every block the target. ``owl`` is OWL (Yin et al., 2024,
"Outlier Weighed Layerwise Sparsity", reference code ``lib/prune.py: prune_wanda_outlier``):
a block with more outliers is pruned less.

1. On the dense model (one calibration pass, block by block, nothing pruned), every prunable
   Linear of block l gets the Wanda score |W_ij|·‖X_j‖₂. The block's *outlier ratio* D_l is the
   percentage of all its scores (its Linear layers together) above ``owl_m`` × their mean.
2. D is normalised to [0, 2λ] (λ = ``owl_lambda``): r_l = (D_l − min D) / (max D − min D) · 2λ.
3. s_l = target + λ − r_l, in [target − λ, target + λ], then shifted so that the mean of s
   (weighted by the blocks' prunable weights; equal weights in a homogeneous decoder, where
   this is exactly the reference's unweighted mean) equals the target. Equivalently
   s_l = target + mean(r) − r_l, the reference's ``1 − (r_l − mean(r) + 1 − target)``.

Where the reference would leave [0, 1] (a small target with a large λ; the reference then sets
any ratio ≤ 0 to 0.01 and misses the target), the ratios are clipped to [0, 1] and the excess
is spread evenly over the blocks that are not clipped, so the mean still equals the target.
When every block has the same outlier ratio (max D = min D, a division by zero in the
reference) the profile is uniform. The method then prunes block l to s_l with its own
criterion (|W|, Wanda, SparseGPT), each Linear layer to within one weight of s_l, so the
model-wide sparsity equals the target to within one weight per module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from prunerep.compress.engine import calibrated_blocks, run_block
from prunerep.compress.method import Pruner, targets_of
from prunerep.compress.stats import InputSquares, wanda_score
from prunerep.errors import ConfigError
from prunerep.model.anatomy import decoder_layers, feeding
from prunerep.model.placement import onloaded
from prunerep.sparsity import SparsitySpec

PROFILES = ("uniform", "owl")


def owl_layer_ratios(outlier_ratios: Sequence[float], target: float, lam: float,
                     weights: Optional[Sequence[float]] = None) -> list[float]:
    """Per-block sparsity from per-block outlier ratios (OWL's mapping, see the module doc)."""
    d = [float(x) for x in outlier_ratios]
    n = len(d)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if n == 0:
        return []
    lo, hi = min(d), max(d)
    if not (hi > lo) or not all(math.isfinite(x) for x in d):
        return [float(target)] * n
    r = [(x - lo) / (hi - lo) * 2 * lam for x in d]  # in [0, 2λ]
    s = [target + lam - x for x in r]  # in [target − λ, target + λ]
    shift = _mean(s, w) - target
    s = [x - shift for x in s]  # the mean is the target
    return _clip_keeping_mean(s, target, w)


def _mean(x: Sequence[float], w: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(x, w)) / sum(w)


def _clip_keeping_mean(s: list[float], target: float, w: list[float], lo: float = 0.0,
                       hi: float = 1.0) -> list[float]:
    """Clip to [lo, hi]; move the blocks not at a bound by the same amount until the weighted
    mean is the target again (feasible: lo <= target <= hi)."""
    s = [min(hi, max(lo, x)) for x in s]
    for _ in range(len(s) + 1):
        gap = target - _mean(s, w)
        if abs(gap) <= 1e-12:
            break
        free = [i for i, x in enumerate(s) if (x < hi if gap > 0 else x > lo)]
        if not free:
            break
        step = gap * sum(w) / sum(w[i] for i in free)
        for i in free:
            s[i] = min(hi, max(lo, s[i] + step))
    return s


@torch.no_grad()
def owl_outlier_ratios(model, calib: torch.Tensor, settings, pruner: Pruner, m: float) -> tuple[list[float], list[int]]:
    """Per block: the percentage of its Wanda scores |W|·‖X‖ above ``m`` × the block's mean score
    (on the dense model), and its number of prunable weights. One calibration pass; the scores of
    one Linear at a time exist (summed, then counted), never the whole block's."""
    ratios, sizes = [], []
    for step in calibrated_blocks(model, calib, settings, desc="owl outliers"):
        targets = targets_of(step.block, pruner)
        sq = InputSquares(targets, settings.expert_min_tokens)
        with feeding(targets, sq, expert_tokens=settings.expert_tokens):
            step.outputs = run_block(step.block, step.inputs, step.kwargs, settings.batch_size)  # dense: goes on
        numel = sum(t.numel for t in targets.values())
        total = sum(float(wanda_score(t.weight, sq[n]).sum(dtype=torch.float64)) for n, t in targets.items())
        cut = m * total / numel
        count = sum(int((wanda_score(t.weight, sq[n]) > cut).sum()) for n, t in targets.items())
        ratios.append(100.0 * count / numel)
        sizes.append(numel)
    return ratios, sizes


@dataclass
class ProfiledPruner(Pruner):
    """A pruner whose target can be spread over the blocks (magnitude, wanda, sparsegpt).

    ``profile``: ``uniform`` (every block at the target) or ``owl`` (OWL, see the module doc;
    needs calibration data whatever the method, for the Wanda scores of its outlier ratios),
    ``owl_lambda``: λ, the largest distance of a block's ratio from the target before the shift
    (0.08 as in the OWL README), ``owl_m``: M, a score is an outlier above M × its block's mean."""

    profile: str = "uniform"  # uniform | owl
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    @property
    def needs_calibration(self) -> bool:
        """OWL's outlier ratios read calibration activations, whatever the method."""
        return self.profile == "owl" or super().needs_calibration

    def validate(self, spec: SparsitySpec) -> None:
        super().validate(spec)
        if self.profile not in PROFILES:
            raise ConfigError(f"pruner.profile={self.profile!r}; choose {' or '.join(PROFILES)}")
        if self.profile == "owl":
            if spec.is_nm:
                raise ConfigError(f"pruner.profile=owl gives every block its own ratio, which an N:M pattern "
                                  f"(sparsity={spec}) cannot express; use a ratio or pruner.profile=uniform")
            if not (math.isfinite(self.owl_lambda) and 0 <= self.owl_lambda <= 0.5):
                raise ConfigError(f"pruner.owl_lambda={self.owl_lambda} must be in [0, 0.5]")
            if not (math.isfinite(self.owl_m) and self.owl_m > 0):
                raise ConfigError(f"pruner.owl_m={self.owl_m} must be > 0")

    def layer_targets(self, model, calib, settings) -> Optional[dict]:
        """None for ``uniform``; for ``owl`` the per-block outlier ratios and targets."""
        if self.profile != "owl":
            return None
        if calib is None:
            raise ValueError("pruner.profile=owl needs calibration data")
        outliers, sizes = owl_outlier_ratios(model, calib, settings, self, self.owl_m)
        targets = owl_layer_ratios(outliers, settings.spec.ratio, self.owl_lambda, sizes)
        return {"outlier_ratios": outliers, "targets": targets, "sizes": sizes}

    @staticmethod
    def block_spec(plan: Optional[dict], index: int, spec: SparsitySpec) -> SparsitySpec:
        """The target of block ``index``: the run's own spec (uniform) or the block's ratio."""
        return spec if plan is None else SparsitySpec(ratio=plan["targets"][index])

    @torch.no_grad()
    def profile_report(self, plan: Optional[dict], model) -> dict:
        """What pruning.json records about the profile (under ``method.profile``)."""
        if plan is None:
            return {"name": "uniform"}
        achieved = []
        for block in decoder_layers(model):
            with onloaded(block):
                ts = targets_of(block, self).values()
                achieved.append(sum(int((t.weight == 0).sum()) for t in ts) / sum(t.numel for t in ts))
        keys = [f"layers.{i}" for i in range(len(plan["targets"]))]
        return {"name": "owl", "lambda": self.owl_lambda, "m": self.owl_m,
                "outlier_ratios_pct": dict(zip(keys, plan["outlier_ratios"])),
                "layer_targets": dict(zip(keys, plan["targets"])),
                "layer_achieved": dict(zip(keys, achieved)),
                "max_abs_deviation_from_layer_targets_pp": 100 * max(
                    (abs(a - t) for a, t in zip(achieved, plan["targets"])), default=0.0)}
