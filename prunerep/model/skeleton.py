"""The model a config names, built on the meta device from its config alone (no weights): what the
checks before loading read. Depth, context length, the weight targets' names and widths and the
share of the blocks they cover are those of the real model, so bad input fails in one line before
gigabytes load."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunerep.errors import ConfigError
from prunerep.results.store import verify_dir_checksums
from prunerep.model.load import dequantized_cache_dir
from prunerep.model.sources import check_gguf, resolve_gguf

log = logging.getLogger(__name__)

#: the vocabulary of a random model's skeleton when its arch does not say (it only sizes the embeddings)
SKELETON_VOCAB = 32000


def model_config(mcfg, cache_dir) -> Optional[object]:
    """The transformers config of the model ``mcfg`` names, read without its weights; None where
    it cannot be known before loading (a hub id not in the local Hugging Face cache). A config
    that cannot be read (truncated JSON, an unknown model_type) is a ConfigError."""
    try:
        if mcfg.source == "random":
            arch = {k: v for k, v in dict(mcfg.arch).items() if k != "seed"}
            guessed = "vocab_size" not in arch
            arch.setdefault("vocab_size", SKELETON_VOCAB)
            config = AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
            config.vocab_guessed = guessed  # the tokenizer decides it at loading: checks leave it alone
            return config
        if mcfg.source in ("package", "gguf"):
            gguf = resolve_gguf(mcfg)
            check_gguf(gguf)
            cached = dequantized_cache_dir(gguf, cache_dir)
            if verify_dir_checksums(cached) is None:  # read only what its checksums vouch for
                return AutoConfig.from_pretrained(str(cached))
            try:
                return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            except Exception as e:
                raise ConfigError(f"{str(gguf)!r} is not a readable GGUF file (truncated or corrupt: "
                                  f"{type(e).__name__}: {_first_line(e)})") from None
        path = Path(os.path.expanduser(mcfg.path or ""))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"model.path={mcfg.path!r} has no config.json: not a Hugging Face model directory")
            return AutoConfig.from_pretrained(str(path), trust_remote_code=mcfg.trust_remote_code)
        found = try_to_load_from_cache(mcfg.path, "config.json", revision=mcfg.revision) if mcfg.path else None
        return AutoConfig.from_pretrained(str(Path(found).parent)) if isinstance(found, str) else None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model {mcfg.name!r}: its config cannot be read ({type(e).__name__}: "
                          f"{_first_line(e)})") from None


def skeleton(config) -> nn.Module:
    """The causal LM of ``config`` on the meta device. A config that transformers cannot build
    (hidden_size 0, heads that do not divide it) is a ConfigError."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _check_heads(config)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model config ({getattr(config, 'model_type', '?')}) cannot be built: "
                          f"{type(e).__name__}: {_first_line(e)}") from None
    return model


def _check_heads(config) -> None:
    """What transformers builds without complaint but cannot compute with."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    if not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"model config: hidden_size={hidden!r} must be a positive integer")
    if isinstance(heads, int) and heads > 0 and getattr(text, "head_dim", None) is None and hidden % heads:
        raise ConfigError(f"model config: num_attention_heads={heads} does not divide hidden_size={hidden}")
    for key in ("num_hidden_layers", "vocab_size", "intermediate_size"):
        v = getattr(text, key, None)
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"model config: {key}={v} must be >= 1")


def context_length(config) -> Optional[int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def _first_line(e: BaseException, limit: int = 240) -> str:
    """The message's first line (with the next when it ends in ':'), cut at ``limit`` characters
    (transformers lists every model type it knows after an unknown one)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["model_config", "skeleton", "context_length", "SKELETON_VOCAB"]
