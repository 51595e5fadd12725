"""Shared fixtures: tiny random-initialised decoders built here, the embedded SmolLM2 and its
tokenizer, a character tokenizer, the module's prompts as a file. Plain helpers: helpers.py."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("PRUNEREP_CACHE", os.path.expanduser("~/.cache/prunerep"))

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` runs one worker per core: share the cores
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # the processes the tests start, too


def make_tiny(model_type: str = "llama", seed: int = 0, vocab_size: int = 256, hidden_size: int = 64,
              intermediate_size: int = 160, num_hidden_layers: int = 3, num_attention_heads: int = 4,
              num_key_value_heads: int = 2, **kw):
    """A random-initialised causal LM of the given family (llama, qwen2, mistral, gemma...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=512, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture
def tiny_qwen2():
    return make_tiny("qwen2")


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 32), generator=g)


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return CACHE_DIR


@pytest.fixture(scope="module")
def smollm2_tok(cache_dir):
    """The embedded SmolLM2's tokenizer (the real 49k vocabulary), once per test module."""
    from helpers import SMOLLM2_TOKENIZER
    from prunerep.model.load import load_tokenizer

    return load_tokenizer(SMOLLM2_TOKENIZER, cache_dir)


@pytest.fixture(scope="module")
def char_tok():
    """helpers.CharTokenizer: one token per character, a 256-token vocabulary."""
    from helpers import CharTokenizer

    return CharTokenizer()


@pytest.fixture(scope="module")
def tiny(request):
    """The test module's tiny random Llama (make_tiny's seed 0), once per module: ``TINY_LAYERS``
    decoder blocks over the vocabulary of the tokenizer fixture that its ``TINY_TOKENIZER`` names
    (``"smollm2_tok"`` or ``"char_tok"``)."""
    tok = request.getfixturevalue(request.module.TINY_TOKENIZER)
    return make_tiny("llama", vocab_size=len(tok), num_hidden_layers=request.module.TINY_LAYERS)


@pytest.fixture
def prompts_file(request, tmp_path) -> Path:
    """The test module's ``PROMPTS`` (dicts: prompt, options) as a JSONL file, one per test."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in request.module.PROMPTS))
    return path


@pytest.fixture(scope="session")
def embedded(cache_dir):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session.
    Tests that prune it must work on a copy (`copy.deepcopy(model)`) or reload."""
    from omegaconf import OmegaConf

    from prunerep.model.load import load_model
    from prunerep.registry import compose

    return load_model(OmegaConf.to_object(compose("model=smollm2", "model.device=cpu").model), cache_dir)


@contextlib.contextmanager
def network_blocked():
    """Every non-loopback connect / name lookup raises; yields the list of attempts."""
    attempts: list = []
    local = ("127.0.0.1", "::1", "localhost")
    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family == getattr(socket, "AF_UNIX", None) or address[0] in local:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network blocked by the test: {address}")

    def getaddrinfo(host, *a, **k):
        if host is None or host in local:
            return real_gai(host, *a, **k)
        attempts.append(host)
        raise socket.gaierror(f"name lookup blocked by the test: {host}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield attempts
