"""The dense baseline: nothing is pruned (the pipeline still probes and evaluates)."""
from __future__ import annotations


def prune(model, calib, cfg) -> dict:
    return {"method": "none"}
