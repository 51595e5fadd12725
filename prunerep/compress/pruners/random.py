"""A baseline: zero a uniformly random subset of each layer's weights (seeded)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from prunerep.compress.pruners.magnitude import Magnitude


@dataclass
class Random(Magnitude):
    name: str = "random"
    seed: Optional[int] = None  # null: the run's seed

    def prune(self, model, calib, settings) -> dict:
        seed = int(self.seed if self.seed is not None else settings.seed)
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        report = super().prune(model, calib, settings)
        report["seed"] = seed
        return report

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self._gen).to(weight.device)
