"""No quantization (the default): the weights keep the model's dtype."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunerep.compress.method import Quantizer


@dataclass
class NoQuant(Quantizer):
    name: str = "none"
    quantizes: ClassVar[bool] = False

    def quantize(self, model, calib, settings) -> dict:
        return {"method": "none"}
