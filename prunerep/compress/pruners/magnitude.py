"""Magnitude pruning: zero the smallest |W| of each Linear layer (layer-wise threshold,
as the baseline in the Wanda repository); N:M picks the smallest |W| in each group."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunerep.compress.masks import apply_mask, mask_for
from prunerep.compress.method import targets_of
from prunerep.compress.profile import ProfiledPruner
from prunerep.errors import ConfigError
from prunerep.model.anatomy import Target, decoder_layers, output_head
from prunerep.model.placement import onloaded


@dataclass
class Magnitude(ProfiledPruner):
    name: str = "magnitude"
    prune_lm_head: bool = False  # also prune the LM head (untied models only)

    def check(self, model, settings) -> None:
        super().check(model, settings)
        if self.prune_lm_head and model.config.get_text_config().tie_word_embeddings:
            raise ConfigError("pruner.prune_lm_head=true on a model with tied embeddings would also prune "
                              "the input embeddings; leave it false for this model")

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        """Lowest scores are pruned."""
        return weight.abs().float()

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        """Needs no calibration data (but for profile=owl's outlier ratios), so it touches one
        weight matrix at a time, in place."""
        plan = self.layer_targets(model, calib, settings)
        for i, block in enumerate(decoder_layers(model)):
            spec = self.block_spec(plan, i, settings.spec)
            with onloaded(block):
                for t in targets_of(block, self).values():
                    apply_mask(t, mask_for(self.score(t.weight), spec, per_row=False))
        if self.prune_lm_head:  # the head is no block: it takes the run's target
            head = output_head(model)
            with onloaded(head):
                t = Target("lm_head", head)
                apply_mask(t, mask_for(self.score(t.weight), settings.spec, per_row=False))
        return {"method": self.name, "calibration": plan is not None, "profile": self.profile_report(plan, model)}
