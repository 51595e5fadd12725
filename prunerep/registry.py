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
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from prunerep.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: config group -> the package whose modules hold its methods (its ``BASE`` is their base class)
GROUPS = {"pruner": "prunerep.pruners", "quant": "prunerep.quant"}


@dataclass
class Method:
    """Base of every method. A concrete method gives ``name`` a default (its registry key and
    the stem of its YAML file); bases leave it MISSING and are never registered."""

    name: str = MISSING

    @classmethod
    def settings(cls) -> list[str]:
        """The keys a user may set on this method (its dataclass fields)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "name"]


def _concrete(obj: Any, base: type, module: str) -> bool:
    if not (isinstance(obj, type) and issubclass(obj, base) and dataclasses.is_dataclass(obj)):
        return False
    default = {f.name: f.default for f in dataclasses.fields(obj)}.get("name", MISSING)
    return obj.__module__ == module and isinstance(default, str) and default != MISSING


def discover(group: str) -> dict[str, type]:
    """``{name: method class}`` for every method module in the group's package (modules whose
    name starts with "_" and the shared ``common`` module are skipped). Found anew each call:
    a module dropped into the package is seen without a restart of anything but the process."""
    package = importlib.import_module(GROUPS[group])
    base = package.BASE
    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
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
    from omegaconf import OmegaConf

    cls = method_class(group, str(node.name))
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]}: the {values['name']} {group} has no "
                          f"setting {unknown[0]!r} (its settings: {', '.join(cls.settings()) or 'none'})")
    return cls(**values)


def register_configs() -> None:
    """Store the run's schema, every method's schema and the local_gpu launcher's in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from prunerep.config import Config
    from prunerep.local_gpu import register_config as register_local_gpu_launcher

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group in GROUPS:
        for name, cls in discover(group).items():
            cs.store(group=group, name=f"{name}_schema", node=cls)
    register_local_gpu_launcher()  # hydra/launcher: prunerep_local_gpu (launchers/local_gpu.yaml)


def compose(*overrides: str):
    """The config the command line would compose from these overrides (for tests, benchmarks and
    notebooks: no YAML merged by hand)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
