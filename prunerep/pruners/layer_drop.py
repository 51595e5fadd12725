"""LLM-Drop (He et al., 2024): drop the attention sublayers, MLP sublayers or whole blocks
that change their input least on calibration data, importance = mean 1 − cos(input, output)
of the residual stream across the sublayer. A dropped sublayer becomes the identity on the
residual stream: its output projection (o_proj / down_proj, and bias) is zeroed, so it adds
exactly nothing, and the model saves and reloads with `from_pretrained` unchanged.

Importance is measured on the dense model (one pass, block by block) and the k least
important candidates are dropped at once. k = round(sparsity · candidates), or
`pruner.count` when given. The sublayers' updates to the residual stream come from
:func:`prunerep.models.residual_update` (so Gemma-2's post-sublayer norms are included)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from prunerep.errors import ConfigError
from prunerep.models import SUBLAYER_KINDS, decoder_layers, output_projection, residual_update, sublayer
from prunerep.pruners.common import Pruner, calibrated_blocks, mean_cos_distance, removing, run_block

TARGETS = ("attn", "mlp", "block", "both")


@torch.no_grad()
def make_identity(block: torch.nn.Module, kind: str) -> None:
    """The block's `kind` sublayer adds zero to the residual stream from now on."""
    lin = output_projection(sublayer(block, kind))
    lin.weight.zero_()
    if lin.bias is not None:
        lin.bias.zero_()


@dataclass
class LayerDrop(Pruner):
    name: str = "layer_drop"
    target: str = "attn"  # attn | mlp | block | both (attn and mlp sublayers ranked together)
    count: Optional[int] = None  # how many to drop; null: round(sparsity x candidates)

    needs_calibration: ClassVar[bool] = True
    supports_nm: ClassVar[bool] = False
    meets_target: ClassVar[bool] = False  # sparsity is the fraction of sublayers dropped, not of weights

    def validate(self, spec) -> None:
        super().validate(spec)
        if self.target not in TARGETS:
            raise ConfigError(f"pruner.target={self.target!r}; choose {', '.join(TARGETS)}")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"pruner.count={self.count} must be >= 0")

    def n_candidates(self, model) -> int:
        return len(decoder_layers(model)) * (2 if self.target == "both" else 1)

    def n_to_drop(self, n_candidates: int, spec) -> int:
        if self.count is not None:
            if self.count > n_candidates:
                raise ConfigError(f"pruner.count={self.count} but the model has only {n_candidates} "
                                  f"{self.target} candidates")
            return int(self.count)
        return int(round(spec.ratio * n_candidates))

    def check(self, model, settings) -> None:
        super().check(model, settings)
        self.n_to_drop(self.n_candidates(model), settings.spec)

    @torch.no_grad()
    def importance(self, model, calib, settings) -> dict[str, float]:
        """1 − cos(input, output) for every candidate ("layers.3.attn", "layers.3.mlp", "layers.3")."""
        scores: dict[str, float] = {}
        for step in calibrated_blocks(model, calib, settings, desc="layer_drop importance"):
            i, block, inputs = step.index, step.block, step.inputs
            upd: dict[str, list] = {k: [] for k in SUBLAYER_KINDS}
            hooks = [residual_update(block, k).register_forward_hook(
                lambda m, a, out, k=k: upd[k].append(out[0] if isinstance(out, tuple) else out))
                for k in SUBLAYER_KINDS]
            with removing(hooks):
                outputs = run_block(block, inputs, step.kwargs, settings.batch_size)
            step.outputs = outputs  # nothing is pruned while measuring: the dense outputs go on
            mid = inputs + torch.cat(upd["attn"])
            scores[f"layers.{i}.attn"] = mean_cos_distance(inputs, mid)
            scores[f"layers.{i}.mlp"] = mean_cos_distance(mid, mid + torch.cat(upd["mlp"]))
            scores[f"layers.{i}"] = mean_cos_distance(inputs, outputs)
        return scores

    def prune(self, model, calib, settings) -> dict:
        scores = self.importance(model, calib, settings)
        if self.target == "block":
            candidates = {k: v for k, v in scores.items() if k.count(".") == 1}
        elif self.target == "both":
            candidates = {k: v for k, v in scores.items() if k.endswith((".attn", ".mlp"))}
        else:
            candidates = {k: v for k, v in scores.items() if k.endswith("." + self.target)}
        dropped = sorted(candidates, key=candidates.get)[:self.n_to_drop(len(candidates), settings.spec)]
        layers = decoder_layers(model)
        for name in dropped:
            parts = name.split(".")
            for kind in (SUBLAYER_KINDS if len(parts) == 2 else (parts[2],)):
                make_identity(layers[int(parts[1])], kind)
        order = sorted(dropped, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])
        return {"method": "layer_drop", "calibration": True, "target": self.target, "n_candidates": len(candidates),
                "n_dropped": len(dropped), "dropped": order, "importance": scores}
