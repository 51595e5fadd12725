"""Load a causal LM and its tokenizer: a hub id, a local Hugging Face directory, a .gguf file,
the embedded package's GGUF (dequantised once into the cache) or a random initialisation from
``model.arch``; placed where :class:`~prunerep.model.placement.Placement` says."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.results.store import ABSENT, cache_lock, stable_hash, verify_dir_checksums, write_dir_checksums
from prunerep.model.anatomy import output_head
from prunerep.model.identity import file_identity
from prunerep.model.placement import Placement, dispatch, from_pretrained_kwargs, input_device, placement
from prunerep.model.sources import hub_reachable, package_file, resolve_gguf

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the embedded / GGUF models

#: bump when the layout of a dequantised model directory changes: older ones are then ignored
DEQUANT_VERSION = 2  # 2: checksums.json, keyed by the GGUF's content identity


def dequantized_cache_dir(gguf: Path, cache_dir: str | os.PathLike) -> Path:
    key = stable_hash(DEQUANT_VERSION, gguf.name, file_identity(gguf))
    return Path(os.path.expanduser(str(cache_dir))) / "models" / f"{gguf.stem}-{key}"


def dequantize_gguf_to_cache(gguf: Path, cache_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF once (~20 s for SmolLM2) and save it as safetensors + tokenizer.

    The directory appears atomically (built aside, then renamed), so a killed run never
    leaves a cache that looks complete. Its ``checksums.json`` records the sha256 of every
    file; a directory that does not match (a truncated or overwritten file) is never used:
    it is named in a warning and rebuilt. Processes needing it at once take its lock
    (``<dir>.lock``): one dequantises, the others wait. The half-built directories of writers
    that died are removed under the lock (nobody else can be writing one then)."""
    target = dequantized_cache_dir(gguf, cache_dir)
    if verify_dir_checksums(target) is None:
        return target
    with cache_lock(target, what=f"dequantised {gguf.name}"):
        problem = verify_dir_checksums(target)
        if problem is None:
            return target
        if problem != ABSENT:
            log.warning("dequantised model cache %s is not intact (%s): not used, rebuilding it", target, problem)
            bad = target.with_name(f".{target.name}.bad.{os.getpid()}")
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(target, bad)
            shutil.rmtree(bad, ignore_errors=True)
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.name.endswith(".tmp") or ".bad." in stale.name:
                log.info("removing %s, left by a process that died while building it", stale)
                shutil.rmtree(stale, ignore_errors=True)
        log.info("dequantising %s into %s (once)", gguf.name, target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            _dequantize_into(gguf, tmp, dtype)
            write_dir_checksums(tmp)
            os.replace(tmp, target)
        except OSError:
            if verify_dir_checksums(target) is not None:  # not "another process finished first"
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize_into(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Load a GGUF through transformers (dequantising it) and save it as safetensors in `out`."""
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # the weights are plain floats now: drop the GGUF quantiser so transformers will save them
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def load_tokenizer(spec: str, cache_dir, **hub_kw):
    """`package:<pkg>/<file.gguf>`, a `.gguf` path, a local directory or a hub id (then
    `hub_kw`, e.g. revision, go to `from_pretrained`)."""
    if spec.startswith("package:"):
        pkg, _, fname = spec[len("package:"):].partition("/")
        gguf = package_file(pkg, fname)
        return AutoTokenizer.from_pretrained(str(dequantize_gguf_to_cache(gguf, cache_dir)))
    if spec.endswith(".gguf"):
        p = Path(spec)
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return _from_hub(AutoTokenizer.from_pretrained, spec, **hub_kw)


def _from_hub(fn, path: str, **kw):
    """`from_pretrained` for a local directory or a hub id: the local Hugging Face cache first,
    then the Hub; 'no network and not cached' becomes one clear line."""
    if os.path.isdir(path):
        try:
            return fn(path, **kw)
        except (OSError, ValueError) as e:
            raise ModelUnavailable(f"{path!r} is not a loadable Hugging Face model directory: {e}") from e
    try:
        return fn(path, local_files_only=True, **kw)
    except OSError:
        pass
    unavailable = (f"model {path!r} is not available offline (not in the Hugging Face cache and the Hub "
                   f"cannot be reached); download it where there is network "
                   f"(`hf download {path} --local-dir DIR`) and pass model.path=DIR")
    if not hub_reachable():
        raise ModelUnavailable(unavailable)
    try:
        return fn(path, **kw)
    except OSError as e:
        raise ModelUnavailable(f"{unavailable} ({str(e).splitlines()[0]})") from e


def _build_random(mcfg, tokenizer, dtype, device: torch.device) -> nn.Module:
    arch = dict(mcfg.arch)
    model_type = arch.pop("model_type", "llama")
    seed = int(arch.pop("seed", 0))
    arch.setdefault("vocab_size", len(tokenizer))
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, k, None)
        if v is not None:
            arch.setdefault(k, v)
    config = AutoConfig.for_model(model_type, **arch)
    torch.manual_seed(seed)
    with torch.device(device):  # random numbers of that device's generator, as a GPU user gets them
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _contiguous_input(_head, args):
    """The LM head's input as a contiguous tensor. transformers feeds it ``h[:, -k:, :]`` (a view
    with a stride over the sequence) when it keeps the last k positions' logits (generation); on a
    CPU a half-precision matmul of such a view expands the [vocab, d] weight over the batch
    (16 x 0.47 GB for a batch of 16 at a 152k vocabulary). Copying the few input rows avoids it;
    the values are the same."""
    x = args[0]
    return None if x.is_contiguous() else (x.contiguous(), *args[1:])


def load_model(mcfg, cache_dir, where: Optional[Placement] = None, offload_dir: Optional[Path] = None
               ) -> tuple[nn.Module, object]:
    """Returns (model in eval mode, tokenizer with a pad token), placed as ``where`` says (default:
    as ``mcfg`` says): on its device, sharded by a device map (disk entries in ``offload_dir``), or
    offloaded to CPU memory."""
    if where is None:
        where = placement(mcfg.device, mcfg.dtype, mcfg.device_map, mcfg.max_memory)
    t0 = time.perf_counter()
    common = dict(dtype=where.dtype, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
    placed = from_pretrained_kwargs(where, offload_dir)
    if mcfg.source == "random":
        if not mcfg.tokenizer:
            raise ConfigError(f"model {mcfg.name!r} is random-initialised: set model.tokenizer (its vocabulary)")
        tokenizer = load_tokenizer(mcfg.tokenizer, cache_dir)
        model = _build_random(mcfg, tokenizer, where.dtype, torch.device("cpu") if where.dispatched else where.device)
        placed = None
    elif mcfg.source in ("package", "gguf"):
        gguf = resolve_gguf(mcfg)
        if mcfg.cache_dequantized:
            local = dequantize_gguf_to_cache(gguf, cache_dir)
            tokenizer = load_tokenizer(str(local), cache_dir)
            model = AutoModelForCausalLM.from_pretrained(str(local), dtype=where.dtype, **placed)
        else:
            tokenizer = load_tokenizer(str(gguf), cache_dir)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=where.dtype,
                                                         **placed)
    else:
        if not mcfg.path:
            raise ConfigError(f"model {mcfg.name!r} has no model.path (a hub id or a local directory)")
        path = os.path.expanduser(mcfg.path)
        own = {} if mcfg.tokenizer else dict(revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
        tokenizer = load_tokenizer(mcfg.tokenizer or path, cache_dir, **own)
        model = _from_hub(AutoModelForCausalLM.from_pretrained, path, **common, **placed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not placed:  # in memory: now to its device, its shards or CPU offload
        model = dispatch(model, where, offload_dir)
    if where.dtype in (torch.bfloat16, torch.float16):
        output_head(model).register_forward_pre_hook(_contiguous_input)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s, %s) in %.1fs", mcfg.name, type(model).__name__, where.dtype,
             "device map" if where.dispatched else input_device(model), time.perf_counter() - t0)
    return model, tokenizer
