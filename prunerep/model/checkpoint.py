"""A checkpoint compressed elsewhere (``pruner=external``): a Hugging Face safetensors directory,
local or a hub id, whose weights replace the dense model's. Plain safetensors (prunerep's
``save_model=true``, the reference Wanda/SparseGPT scripts' ``save_pretrained``) are read as they
are; llm-compressor's compressed-tensors format is decompressed by the ``compressed-tensors``
package. Only headers and ``config.json`` are read before the dense model loads; the tensors are
read one decoder block at a time when they are applied."""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from compressed_tensors import __version__ as CT_VERSION
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_quantizable_tensors
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model, revert_weight_conversion
from transformers.modeling_utils import LoadStateDictConfig

from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.model.sources import hub_reachable, looks_local

#: what a checkpoint directory needs of the Hub: its config and weights
_PATTERNS = ["*.json", "*.safetensors"]
#: the compressed-tensors formats that hold weights as they are (a sparse model saved dense)
_DENSE_FORMATS = {CompressionFormat.dense.value}
#: sparse formats that compressed-tensors no longer decompresses (the releases for transformers 5)
_LEGACY_SPARSE = {CompressionFormat.sparse_bitmask.value, CompressionFormat.sparse_24_bitmask.value,
                  CompressionFormat.marlin_24.value}
_LAYER = re.compile(r"^(.*?\.layers\.)(\d+)(\..*)$")


def resolve_dir(path: str, revision: Optional[str] = None, download: bool = True) -> Path:
    """The local directory of ``pruner.path``: itself, or a hub id's snapshot (the local Hugging Face
    cache first, then the Hub when ``download``). A missing local path is a ConfigError."""
    local = Path(os.path.expanduser(path))
    if local.exists() or looks_local(path):
        if not local.is_dir():
            raise ConfigError(f"pruner.path={path!r}: no such directory")
        return local
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if not (download and hub_reachable()):
        raise ModelUnavailable(f"pruner.path={path!r} is neither a local directory nor a hub id in the local Hugging "
                               f"Face cache, and the Hub cannot be reached")
    return Path(snapshot_download(path, revision=revision, allow_patterns=_PATTERNS))


def layer_index(name: str) -> Optional[tuple[str, int, str]]:
    """``("model.layers.", 3, ".mlp.up_proj.weight")`` of a decoder-block tensor name, else None."""
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def renumbered(name: str, layer_map: dict[int, int]) -> str:
    """The dense model's name of a checkpoint tensor: block j becomes block ``layer_map[j]``."""
    parts = layer_index(name)
    return name if parts is None else f"{parts[0]}{layer_map[parts[1]]}{parts[2]}"


@dataclass
class Checkpoint:
    """A checkpoint's config and its tensors' names, files and shapes (headers only)."""

    path: str  # as given
    dir: Path
    config: dict
    files: dict[str, Path]  # tensor name -> its safetensors file
    shapes: dict[str, tuple]  # tensor name -> shape, as stored
    quant: Optional[QuantizationConfig] = None  # compressed-tensors quantization
    formats: dict[str, str] = field(default_factory=dict)  # config group -> compression format

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def n_layers(self) -> int:
        found = {p[1] for n in self.files if (p := layer_index(n)) is not None}
        return int(self.text_config.get("num_hidden_layers") or (max(found) + 1 if found else 0))

    def weight_shapes(self) -> dict[str, tuple]:
        """Every weight the checkpoint holds, by its decompressed name (``...q_proj.weight``) and
        shape: a packed weight's shape is its ``weight_shape`` tensor (a few bytes read)."""
        out = {}
        for name, shape in self.shapes.items():
            module, _, param = name.rpartition(".")
            if param == "weight_packed":
                with safe_open(str(self.files[f"{module}.weight_shape"]), "pt") as f:
                    out[f"{module}.weight"] = tuple(int(v) for v in f.get_tensor(f"{module}.weight_shape").tolist())
            elif param in ("weight", "bias") or not self.quant:
                out[name] = shape
        return out

    def storage(self) -> Optional[dict]:
        """The quantized format, for the bits accounting: ``bits``, ``group_size`` (-1: per row)
        and ``sym`` of its weights (the first config group that quantizes weights); None when the
        weights are not quantized."""
        for scheme in (self.quant.config_groups.values() if self.quant else ()):
            w = scheme.weights
            if w is not None:
                return {"bits": int(w.num_bits), "group_size": int(w.group_size) if w.group_size else -1,
                        "sym": bool(w.symmetric)}
        return None

    def read(self, names: list[str], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], set[str]]:
        """The tensors ``names`` (complete modules: a packed weight with its scales), decompressed by
        compressed-tensors where the checkpoint is quantized, as plain weights in ``dtype``; and the
        names of the modules whose weights were quantized."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        tensors = {}
        for path, group in by_file.items():
            with safe_open(str(path), "pt") as f:
                tensors.update({n: f.get_tensor(n) for n in group})
        quantized: set[str] = set()
        if self.quant is not None:
            tensors = self._decompress(tensors, quantized)
        return {n: t.to(dtype) for n, t in tensors.items()}, quantized

    def _decompress(self, tensors: dict[str, torch.Tensor], quantized: set[str]) -> dict[str, torch.Tensor]:
        """compressed-tensors' own decompression, module by module (its model-free path, as in its
        ``CompressedTensorsDequantizer``, with each config group's saved format)."""
        out = {}
        for group, scheme in self.quant.config_groups.items():
            if scheme.weights is None or self.formats[group] in _DENSE_FORMATS:
                continue
            compressor = BaseCompressor.get_value_from_registry(self.formats[group])
            params = compressor.compression_param_names(scheme)
            for module, _ in match_quantizable_tensors(tensors, ignore=self.quant.ignore or [], targets=scheme.targets,
                                                       param_targets=[params[0]]):
                local = {p: tensors.pop(f"{module}.{p}") for p in params if f"{module}.{p}" in tensors}
                out[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"]
                quantized.add(module)
        qparams = ("_scale", "_zero_point", "_g_idx", "_global_scale", "_shape")
        out.update({n: t for n, t in tensors.items() if not n.endswith(qparams)})
        return out

    def block_names(self) -> Iterator[tuple[Optional[int], list[str]]]:
        """The stored tensor names grouped by decoder block (None: outside the blocks), in order."""
        groups: dict[Optional[int], list[str]] = {}
        for n in self.files:
            p = layer_index(n)
            groups.setdefault(None if p is None else p[1], []).append(n)
        for key in sorted(groups, key=lambda k: -1 if k is None else k):
            yield key, groups[key]


def meta_model(config, n_layers: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    """The causal LM of ``config`` on the meta device (no memory), with ``n_layers`` blocks if given."""
    if n_layers is not None:
        config = copy.deepcopy(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.num_hidden_layers = n_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:n_layers]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def stored_shapes(config) -> dict[str, tuple]:
    """The tensors a checkpoint of ``config``'s model holds as transformers saves it (its conversions
    reverted: a fused-experts model is saved one matrix per expert), by name, with their shapes."""
    model = meta_model(config)
    return {n: tuple(t.shape) for n, t in revert_weight_conversion(model, model.state_dict()).items()}


def to_model_format(config, tensors: dict[str, torch.Tensor], block: Optional[int], dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (of decoder block ``block``, or of none) as the model's own parameters and
    buffers, by transformers' own loading conversions (renamed keys; per-expert matrices fused),
    loaded into a one-block twin on the meta device: only what the tensors fill is materialised."""
    twin = meta_model(config, 1, dtype)
    here = {renumbered(n, {block: 0}) if block is not None else n: t for n, t in tensors.items()}
    convert_and_load_state_dict_in_model(twin, here, LoadStateDictConfig(
        weight_mapping=get_model_conversion_mapping(twin), dtype=dtype))
    loaded = {n: t for n, t in [*twin.named_parameters(), *twin.named_buffers()] if not t.is_meta}
    return {renumbered(n, {0: block}) if block is not None else n: t for n, t in loaded.items()}


def open_checkpoint(path: str, revision: Optional[str] = None, download: bool = True) -> Checkpoint:
    """The checkpoint at ``path`` (headers and config.json only). Raises ConfigError (one line)
    for what is not a checkpoint prunerep can read."""
    d = resolve_dir(path, revision, download)
    what = f"pruner.path={path!r}"
    if not (d / "config.json").is_file():
        raise ConfigError(f"{what} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: config.json cannot be read ({type(e).__name__}: {e})") from None
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{what} has no .safetensors weights (only safetensors checkpoints are read)")
    files, shapes = {}, {}
    for w in weights:
        try:
            with safe_open(str(w), "pt") as f:
                for n in f.keys():
                    files[n] = w
                    shapes[n] = tuple(f.get_slice(n).get_shape())
        except Exception as e:
            raise ConfigError(f"{what}: {w.name} is not a readable safetensors file ({type(e).__name__})") from None
    ckpt = Checkpoint(path=path, dir=d, config=config, files=files, shapes=shapes)
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if qc:
        _read_quantization(ckpt, qc, what)
    return ckpt


def _read_quantization(ckpt: Checkpoint, qc: dict, what: str) -> None:
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ConfigError(f"{what} is quantized with quant_method={method!r}; prunerep reads plain safetensors and "
                          f"llm-compressor's compressed-tensors format")
    sparse = (qc.get("sparsity_config") or {}).get("format")
    for fmt in (sparse, qc.get("format")):
        if fmt in _LEGACY_SPARSE:
            raise ConfigError(f"{what} is in compressed-tensors' {fmt!r} format, which compressed-tensors {CT_VERSION} "
                              f"(the releases for transformers 5) no longer decompresses; save it dense")
    if not qc.get("config_groups"):
        return  # sparsity alone: the weights are stored dense
    try:
        ckpt.quant = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "sparsity_config"})
    except Exception as e:
        raise ConfigError(f"{what}: its compressed-tensors quantization_config is not valid "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for group, scheme in ckpt.quant.config_groups.items():
        fmt = scheme.format or (qc.get("format") if qc.get("format") != "mixed-precision" else None)
        ckpt.formats[group] = fmt or infer_module_format(torch.nn.Linear, scheme).value
        try:
            BaseCompressor.get_value_from_registry(ckpt.formats[group])
        except Exception:
            raise ConfigError(f"{what}: compressed-tensors {CT_VERSION} cannot decompress format "
                              f"{ckpt.formats[group]!r}") from None


__all__ = ["Checkpoint", "open_checkpoint", "resolve_dir", "layer_index", "renumbered", "meta_model", "stored_shapes",
           "to_model_format"]
