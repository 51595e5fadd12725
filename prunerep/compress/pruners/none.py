"""The dense baseline: nothing is pruned (the pipeline still probes and evaluates)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunerep.compress.method import Pruner


@dataclass
class NoPruning(Pruner):
    name: str = "none"
    zeroes_weights: ClassVar[bool] = False  # sparsity is ignored: nothing is pruned
    prunes_weights: ClassVar[bool] = False

    @property
    def sets_zeros(self) -> bool:
        return False

    def prune(self, model, calib, settings) -> dict:
        return {"method": "none"}
