"""LLM-Drop (He et al., 2024): drop the attention sublayers, MLP sublayers or whole blocks
that change their input least on calibration data, importance = mean 1 − cos(input, output)
of the residual stream across the sublayer. A dropped sublayer becomes the identity on the
residual stream: its output projection(s) (o_proj / down_proj, and bias) are zeroed, so it adds
exactly nothing, and the model saves and reloads with `from_pretrained` unchanged.

Importance is measured on the dense model (one pass, block by block) and the k least
important candidates are dropped at once. k = round(sparsity · candidates), or
`pruner.count` when given. The sublayers' updates to the residual stream come from
:func:`prunerep.model.anatomy.residual_update` (so Gemma-2's post-sublayer norms are included);
a mixture-of-experts MLP is dropped by zeroing every expert's down projection and the shared
expert's (:func:`prunerep.model.anatomy.make_identity`).

Or the blocks are chosen by position, not importance: `pruner.layers=[20,21,22,23]` (block
indices, −1 = the last) or a contiguous window `pruner.window=4 pruner.window_start=20`; the
`target` sublayers of exactly those blocks are dropped. A positional selection excludes
`pruner.count`, and `sparsity` selects nothing then (it stays in the run's name and config;
the importance is still measured and recorded). Indices are checked against the model's depth
before it loads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from prunerep.compress.engine import calibrated_blocks, run_block
from prunerep.compress.method import Pruner
from prunerep.errors import ConfigError
from prunerep.model.anatomy import SUBLAYER_KINDS, decoder_layers, first_output, make_identity, residual_update
from prunerep.model.placement import onloaded

TARGETS = ("attn", "mlp", "block", "both")


def mean_cos_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of 1 − cos(a, b) (LLM-Drop's importance)."""
    cos = torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return float((1 - cos).mean())


@dataclass
class LayerDrop(Pruner):
    name: str = "layer_drop"
    target: str = "attn"  # attn | mlp | block | both (attn and mlp sublayers ranked together)
    count: Optional[int] = None  # how many to drop; null: round(sparsity x candidates)
    layers: Optional[List[int]] = None  # drop these blocks' `target` sublayers (-1 = last), not the least important
    window: Optional[int] = None  # drop the `target` sublayers of this many consecutive blocks ...
    window_start: Optional[int] = None  # ... the first of them being this block

    supports_nm: ClassVar[bool] = False
    zeroes_weights: ClassVar[bool] = False  # sparsity is the fraction of sublayers dropped, not of weights
    prunes_weights: ClassVar[bool] = False  # it drops whole sublayers

    @property
    def needs_calibration(self) -> bool:
        return True

    def validate(self, spec) -> None:
        super().validate(spec)
        if self.target not in TARGETS:
            raise ConfigError(f"pruner.target={self.target!r}; choose {', '.join(TARGETS)}")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"pruner.count={self.count} must be >= 0")
        if self.layers is not None and (self.window is not None or self.window_start is not None):
            raise ConfigError("pruner.layers and pruner.window/window_start both choose the blocks by position; "
                              "give one of them")
        if (self.window is None) != (self.window_start is None):
            raise ConfigError(f"pruner.window={self.window} and pruner.window_start={self.window_start}: a window "
                              f"needs both its size and its first block")
        if self.window is not None and (self.window < 1 or self.window_start < 0):
            raise ConfigError(f"pruner.window={self.window} must be >= 1 and pruner.window_start={self.window_start} "
                              f">= 0")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("pruner.layers=[] names no block; give indices, or null to rank by importance")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"pruner.layers={list(self.layers)} names a block twice")
        if self.count is not None and self.selection != "importance":
            raise ConfigError(f"pruner.count={self.count} picks the least important sublayers; it cannot be "
                              f"combined with pruner.{self.selection} (blocks chosen by position)")

    @property
    def selection(self) -> str:
        """How the dropped blocks are chosen: importance (sparsity / count), layers or window."""
        return "layers" if self.layers is not None else "window" if self.window is not None else "importance"

    def positional_blocks(self, n_layers: int) -> Optional[list[int]]:
        """The blocks chosen by position (sorted, in [0, n_layers)); None when ranked by importance.
        Raises ConfigError (one line) when one is out of range."""
        if self.selection == "layers":
            bad = [i for i in self.layers if not -n_layers <= i < n_layers]
            if bad:
                raise ConfigError(f"pruner.layers={list(self.layers)}: block {bad[0]} is out of range; the model has "
                                  f"{n_layers} blocks (0..{n_layers - 1}, or -{n_layers}..-1)")
            idx = [i % n_layers for i in self.layers]
            if len(set(idx)) != len(idx):
                raise ConfigError(f"pruner.layers={list(self.layers)} names a block twice ({n_layers} blocks)")
            return sorted(idx)
        if self.selection == "window":
            if self.window_start + self.window > n_layers:
                raise ConfigError(f"pruner.window={self.window} pruner.window_start={self.window_start}: blocks "
                                  f"{self.window_start}..{self.window_start + self.window - 1} are out of range; the "
                                  f"model has {n_layers} blocks (window_start <= {n_layers - self.window})")
            return list(range(self.window_start, self.window_start + self.window))
        return None

    def check_depth(self, n_layers: int) -> None:
        self.positional_blocks(n_layers)
        n_candidates = n_layers * (2 if self.target == "both" else 1)
        if self.selection == "importance":
            self.n_to_drop(n_candidates, None)

    def n_candidates(self, model) -> int:
        return len(decoder_layers(model)) * (2 if self.target == "both" else 1)

    def n_to_drop(self, n_candidates: int, spec) -> Optional[int]:
        """How many of the candidates go (importance selection); None without count and spec."""
        if self.count is not None:
            if self.count > n_candidates:
                raise ConfigError(f"pruner.count={self.count} but the model has only {n_candidates} "
                                  f"{self.target} candidates")
            return int(self.count)
        return None if spec is None else int(round(spec.ratio * n_candidates))

    @torch.no_grad()
    def importance(self, model, calib, settings) -> dict[str, float]:
        """1 − cos(input, output) for every candidate ("layers.3.attn", "layers.3.mlp", "layers.3")."""
        scores: dict[str, float] = {}
        for step in calibrated_blocks(model, calib, settings, desc="layer_drop importance"):
            i, block, inputs = step.index, step.block, step.inputs
            upd: dict[str, list] = {k: [] for k in SUBLAYER_KINDS}
            hooks = [residual_update(block, k).register_forward_hook(
                lambda m, a, out, k=k: upd[k].append(first_output(out))) for k in SUBLAYER_KINDS]
            try:
                outputs = run_block(block, inputs, step.kwargs, settings.batch_size)
            finally:
                for h in hooks:
                    h.remove()
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
        layers = decoder_layers(model)
        blocks = self.positional_blocks(len(layers))
        if blocks is None:
            dropped = sorted(candidates, key=candidates.get)[:self.n_to_drop(len(candidates), settings.spec)]
        else:
            dropped = [c for c in candidates if int(c.split(".")[1]) in blocks]
        for name in dropped:
            parts = name.split(".")
            with onloaded(layers[int(parts[1])]):
                for kind in (SUBLAYER_KINDS if len(parts) == 2 else (parts[2],)):
                    make_identity(layers[int(parts[1])], kind)
        order = sorted(dropped, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])
        report = {"method": "layer_drop", "calibration": True, "target": self.target, "selection": self.selection,
                  "n_candidates": len(candidates), "n_dropped": len(dropped), "dropped": order}
        if blocks is not None:
            report["blocks"] = blocks
            if self.selection == "window":
                report.update(window=self.window, window_start=self.window_start)
        report["importance"] = scores
        return report
