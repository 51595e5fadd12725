"""Where a model's weights live and where they compute: the device and dtype, accelerate's device
maps (a model sharded over a node's GPUs, with CPU or disk offload where it does not fit) and
``offload`` (the whole model kept in CPU memory, each module visiting the compute device when it
runs). Every stage goes through the same accelerate hooks, so pruning, probes and evaluations see
one model however it is placed.

Changing weights of an offloaded model: between forwards an offloaded module holds meta tensors
and accelerate keeps its weights in a CPU state dict or in files. :func:`onloaded` materialises a
module's weights on its compute device for the duration (forwards inside do not reload or drop
them), and on exit writes every parameter that was changed in place back where accelerate reads it:
the CPU state dict, or a file of the run's own offload folder. A checkpoint file that accelerate
reads disk-offloaded weights from directly is never written: the changed weight gets a file of its
own and accelerate's index points there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from accelerate import cpu_offload, dispatch_model, infer_auto_device_map
from accelerate.utils import (OffloadedWeightsLoader, convert_file_size_to_int, get_balanced_memory,
                               offload_weight)
from torch import nn

from prunerep.errors import ConfigError
from prunerep.model.anatomy import final_norm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: accelerate's strategies for ``model.device_map``
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


# --------------------------------------------------------------------------- devices and dtypes

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device={device!r} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device!r} but no CUDA device is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ConfigError(f"model.device={device!r}: prunerep runs on cpu or cuda")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _map_device(value: Any, what: str) -> Union[str, int]:
    """A device-map or max_memory device: ``cpu``, ``disk``, a GPU index or ``cuda:<i>``."""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value in ("cpu", "disk"):
        return value
    elif isinstance(value, str) and (value.isdigit() or value.startswith("cuda")):
        index = int(value) if value.isdigit() else (torch.device(value).index or 0)
    else:
        raise ConfigError(f"{what}: {value!r} is not a device (cpu, disk, a GPU index or cuda:<index>)")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{what}: GPU {index} is not visible ({torch.cuda.device_count()} CUDA device(s))")
    return index


@dataclass(frozen=True)
class Placement:
    """Where the model goes, checked before it loads (:func:`placement`)."""

    device: torch.device  # where it computes (the main device of a device map)
    dtype: torch.dtype
    device_map: Union[None, str, dict] = None  # an accelerate strategy or {module: device}
    max_memory: Optional[dict] = None  # {device: bytes or "10GiB"}
    offload: bool = False  # the whole model in CPU memory, each module computing on `device`
    offload_dir: Optional[Path] = field(default=None, compare=False)  # set when the model loads

    @property
    def dispatched(self) -> bool:
        """Placed by accelerate's hooks (sharded or offloaded), not as one module on one device."""
        return self.device_map is not None or self.offload

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "device_map": self.device_map, "max_memory": self.max_memory, "offload": self.offload}


def placement(device: str, dtype: str, device_map: Any = None, max_memory: Any = None,
              offload: bool = False) -> Placement:
    """The checked :class:`Placement` of ``model.device``, ``model.dtype``, ``model.device_map``,
    ``model.max_memory`` and ``offload``; a ConfigError (one line) for what cannot work here."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if device_map is not None and offload:
        raise ConfigError("offload=true and model.device_map both place the model; give one (a device map with "
                          "cpu entries offloads those modules)")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ConfigError(f"model.device_map={device_map!r}; choose {', '.join(DEVICE_MAP_STRATEGIES)} or a "
                              f"mapping {{module: device}}")
    elif isinstance(device_map, dict):
        if not device_map:
            raise ConfigError("model.device_map={} places no module")
        device_map = {str(k): _map_device(v, f"model.device_map.{k}") for k, v in device_map.items()}
    elif device_map is not None:
        raise ConfigError(f"model.device_map={device_map!r}; choose {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping")
    if max_memory is not None:
        if device_map is None or not isinstance(device_map, str):
            raise ConfigError("model.max_memory needs model.device_map=auto|balanced|balanced_low_0|sequential")
        if not isinstance(max_memory, dict) or not max_memory:
            raise ConfigError(f"model.max_memory={max_memory!r}: give {{device: size}}, e.g. {{0: 70GiB, cpu: 200GiB}}")
        checked = {}
        for k, v in max_memory.items():
            key = _map_device(k if not (isinstance(k, str) and k.isdigit()) else int(k), "model.max_memory")
            try:
                checked[key] = convert_file_size_to_int(v) if isinstance(v, str) else int(v)
            except (ValueError, TypeError):
                raise ConfigError(f"model.max_memory.{k}={v!r} is not a size (bytes, or e.g. 10GiB, 500MB)") from None
        max_memory = checked
    return Placement(device=dev, dtype=dt, device_map=device_map, max_memory=max_memory, offload=bool(offload))


# --------------------------------------------------------------------------- placing a model

def dispatch(model: nn.Module, where: Placement, offload_dir: Optional[Path]) -> nn.Module:
    """Put an in-memory model where ``where`` says: on its device, sharded by a device map (disk
    entries written into ``offload_dir``), or offloaded to CPU memory."""
    if where.offload:
        model.to("cpu")
        return cpu_offload(model, execution_device=where.device)
    if where.device_map is None:
        return model.to(where.device)
    device_map = resolved_device_map(model, where)
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("a device map with disk entries needs an offload folder")
    return dispatch_model(model, device_map=device_map, main_device=_main_device(device_map, where),
                          offload_dir=None if offload_dir is None else str(offload_dir))


def resolved_device_map(model: nn.Module, where: Placement) -> dict:
    """An explicit device map for ``model``: the given mapping, or accelerate's for the strategy."""
    if isinstance(where.device_map, dict):
        return dict(where.device_map)
    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = where.max_memory
    if where.device_map in ("auto", "balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=where.dtype, low_zero=where.device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=where.dtype)


def _main_device(device_map: dict, where: Placement):
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
    return gpus[0] if gpus else ("cpu" if where.device.type == "cpu" else where.device)


def from_pretrained_kwargs(where: Placement, offload_dir: Optional[Path]) -> dict:
    """The placement arguments of ``from_pretrained`` (offload is applied after loading)."""
    if where.device_map is None:
        return {}
    kw: dict = {"device_map": where.device_map}
    if where.max_memory is not None:
        kw["max_memory"] = where.max_memory
    if offload_dir is not None:
        kw["offload_folder"] = str(offload_dir)
    return kw


# --------------------------------------------------------------------------- reading a placed model

def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _offload_hook(module: nn.Module):
    """The accelerate hook that offloads ``module``'s own weights, or None."""
    return next((h for h in _hooks(module) if getattr(h, "offload", False) and getattr(h, "weights_map", None)
                 is not None), None)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device, else its first weight's device."""
    for m in (module, *module.modules()):
        for h in _hooks(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        p = next(m.parameters(recurse=False), None)
        if p is not None and p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the device its token embedding computes on."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb if emb is not None else model)


def lens_device(model: nn.Module) -> torch.device:
    """Where the logit lens computes: the device of the model's final norm."""
    return module_device(final_norm(model))


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hook(m) is not None for m in model.modules())


def _store(module: nn.Module, hook, name: str, value: torch.Tensor) -> None:
    """Write ``module``'s parameter ``name`` where accelerate reads it between forwards."""
    wm = hook.weights_map
    key = f"{getattr(wm, 'prefix', '')}{name}"
    ds = getattr(wm, "dataset", wm)
    value = value.detach().to("cpu").contiguous()
    if isinstance(ds, OffloadedWeightsLoader):
        if key in ds.state_dict:
            ds.state_dict[key] = value
            return
        if ds.save_folder is None:
            raise RuntimeError(f"{key} is offloaded to disk without an offload folder to write it into")
        # its own file in the run's offload folder; the index no longer points at the checkpoint
        offload_weight(value, key, ds.save_folder, index=ds.index)
        return
    ds[key] = value


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, every offloaded weight under ``module`` is a real tensor on its compute device, kept
    between forwards; weights changed in place are written back on exit (see the module doc).
    Modules that are not offloaded are left as they are."""
    leaves = [(m, h) for m in module.modules() if (h := _offload_hook(m)) is not None]
    versions = []
    try:
        # Weights loaded under a caller's inference_mode would be inference tensors, which keep no
        # version counter: load them as normal tensors so an in-place change is still seen.
        with torch.inference_mode(False):
            for m, h in leaves:
                h.pre_forward(m)
                h.offload = False
                versions.append({n: p._version for n, p in m.named_parameters(recurse=False)})
        yield module
    finally:
        for (m, h), before in zip(leaves, versions):
            for n, p in m.named_parameters(recurse=False):
                if p._version != before.get(n):
                    _store(m, h, n, p.data)
            h.offload = True
            h.post_forward(m, None)


@contextmanager
def onloaded_all(modules) -> Iterator[None]:
    with ExitStack() as stack:
        for m in modules:
            stack.enter_context(onloaded(m))
        yield


def iter_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter (tied ones once), sorted by name, each loaded on its
    compute device for its turn: one pass over an offloaded model holds one module's weights."""
    for name in sorted(n for n, _ in model.named_parameters()):
        owner, _, pname = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        with onloaded(mod):
            yield name, getattr(mod, pname)


def new_offload_dir(cache_dir: Union[str, os.PathLike]) -> Path:
    """A fresh folder for this process's disk-offloaded weights (removed by :func:`remove_offload_dir`)."""
    root = Path(os.path.expanduser(str(cache_dir))) / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))


def remove_offload_dir(path: Optional[Path]) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["DTYPES", "DEVICE_MAP_STRATEGIES", "resolve_device", "resolve_dtype", "Placement", "placement", "dispatch",
           "resolved_device_map", "from_pretrained_kwargs", "module_device", "input_device", "lens_device", "is_offloaded",
           "onloaded", "onloaded_all", "iter_parameters", "new_offload_dir", "remove_offload_dir"]
