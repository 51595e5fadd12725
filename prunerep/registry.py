"""The registries are the config groups. A method (a pruner, a quantizer) is a typed dataclass
in its own module: its fields are its settings, its class
flags its capabilities, its methods its checks and its algorithm. The methods of a group are
the dataclasses found in that group's package, so dropping a module in is all it takes to
add one (plus its YAML file in ``conf/<group>/``); nothing keeps a second list.

:func:`register_configs` stores the run's schema and one schema per method in Hydra's
ConfigStore (``<group>/<name>_schema``); each ``conf/<group>/<name>.yaml`` starts with
``defaults: [<name>_schema]``, so Hydra types the node by the method's dataclass and a key
the chosen method does not have fails at composition.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from prunerep.config import Config
from prunerep.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: config group -> the package whose modules hold its methods (its ``BASE`` is their base class)
GROUPS = {"pruner": "prunerep.compress.pruners", "quant": "prunerep.compress.quant"}


def _concrete(obj: Any, base: type, module: str) -> bool:
    if not (isinstance(obj, type) and issubclass(obj, base) and dataclasses.is_dataclass(obj)):
        return False
    default = {f.name: f.default for f in dataclasses.fields(obj)}.get("name", MISSING)
    return obj.__module__ == module and isinstance(default, str) and default != MISSING


def method_modules(group: str) -> list[str]:
    """The names of the group's method modules, sorted, without importing them: every module of
    its package but those whose name starts with "_" and the shared ``common`` module."""
    package = GROUPS[group]
    return [f"{package}.{info.name}"
            for info in sorted(pkgutil.iter_modules(importlib.util.find_spec(package).submodule_search_locations),
                               key=lambda i: i.name)
            if not info.name.startswith("_") and info.name != "common"]


def discover(group: str) -> dict[str, type]:
    """``{name: method class}`` for every module :func:`method_modules` names. Found anew each call:
    a module dropped into the package is seen without a restart of anything but the process."""
    base = importlib.import_module(GROUPS[group]).BASE
    found: dict[str, type] = {}
    for name in method_modules(group):
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if _concrete(obj, base, module.__name__):
                name = {f.name: f.default for f in dataclasses.fields(obj)}["name"]
                if name in found and found[name] is not obj:
                    raise TypeError(f"two {group} methods are named {name!r}: {found[name]} and {obj}")
                found[name] = obj
    return found


def method_class(group: str, name: str) -> type:
    methods = discover(group)
    if name not in methods:
        raise ConfigError(f"unknown {group} {name!r}; choose one of: {', '.join(sorted(methods))}")
    return methods[name]


def build_method(group: str, node: Any):
    """The typed method object of a composed config node (``cfg.pruner``, ``cfg.quant``)."""
    cls = method_class(group, str(node.name))
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    for key in sorted(values):
        if problem := unknown_setting(group, cls, key):
            raise ConfigError(problem)
    return cls(**values)


def config_groups() -> dict[str, list[str]]:
    """The config groups -- the folders of ``conf/`` -- and their options (the YAML files)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))}


def unknown_setting(group: str, cls: type, key: str) -> Optional[str]:
    """The one-line error for a key that the method ``cls`` of ``group`` does not have, or None."""
    if key in {f.name for f in dataclasses.fields(cls)}:
        return None
    return (f"{group}.{key}: the {cls.name} {group} has no setting {key!r} "
            f"(its settings: {', '.join(cls.settings()) or 'none'})")


def register_configs() -> None:
    """Store the run's schema and every method's schema in Hydra's ConfigStore."""
    OmegaConf.register_new_resolver(
        "prunerep_config_groups", lambda: "\n".join(f"{g}: {', '.join(o)}" for g, o in config_groups().items()),
        replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group in GROUPS:
        for name, cls in discover(group).items():
            cs.store(group=group, name=f"{name}_schema", node=cls)


def compose(*overrides: str):
    """The config the command line would compose from these overrides (for tests, benchmarks and
    notebooks: no YAML merged by hand)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
