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


def check_pruner(model, cfg) -> None:
    """Everything that can fail before pruning starts: the shared checks (pattern vs shapes,
    LM-head options) and the method's own ``check(model, cfg)`` where its module has one."""
    from prunerep.pruners.common import check_prunable

    check_prunable(model, cfg)
    check = getattr(importlib.import_module(f"prunerep.pruners.{cfg.pruner.name}"), "check", None)
    if check is not None:
        check(model, cfg)
