"""Registry of pruning methods: one module per method, each exposing
``prune(model, calib, cfg) -> report`` (see prunerep/pruners/common.py for `cfg`)."""
from __future__ import annotations

import importlib

PRUNERS = ("none", "magnitude", "wanda", "sparsegpt", "random", "layer_drop")


def get_pruner(name: str):
    if name not in PRUNERS:
        from prunerep.config import ConfigError

        raise ConfigError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")
    return importlib.import_module(f"prunerep.pruners.{name}").prune
