"""The identity of a model's files as they are now, for the keys of the dense caches and of the
completed-points index: replacing the weights under the same ``model.path`` changes it."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import HfApi, try_to_load_from_cache

from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.results.store import stable_hash
from prunerep.model.sources import hub_reachable, package_file, resolve_gguf

log = logging.getLogger(__name__)


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
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(found, str):
        snapshot = Path(found).parent
        return {"hub": repo, "commit": snapshot.name, "files": dir_identity(snapshot)}
    if hub_reachable():
        return {"hub": repo, "commit": HfApi().model_info(repo, revision=revision, timeout=10).sha}
    raise ModelUnavailable(f"{repo!r} is neither in the local Hugging Face cache nor reachable")


def _source_identity(spec: str, revision: str | None = None) -> dict:
    """Identity of what a weights/tokenizer source names: ``package:<pkg>/<file>``, a .gguf file,
    a local directory or a hub id."""
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
            ident = {"file": file_identity(resolve_gguf(mcfg))}
        else:
            if not mcfg.path:
                raise ConfigError(f"model {mcfg.name!r} has no model.path")
            ident = _source_identity(mcfg.path, mcfg.revision)
        if mcfg.tokenizer:
            ident["tokenizer"] = _source_identity(mcfg.tokenizer)
    except Exception as e:  # never in the way of a run: its caches are just not shared
        log.warning("cannot establish the identity of model %r's files (%s: %s): its dense reference is "
                    "computed afresh and not shared", mcfg.name, type(e).__name__, e)
        return f"unresolved-{secrets.token_hex(8)}"
    return stable_hash(ident)


def model_key(mcfg, where) -> str:
    """Identity of the dense model for the dense-reference caches (probes, evals): its config, its
    dtype and device type, and what its files are now (:func:`files_identity`), so new weights
    under the same ``model.path`` get new caches. Where it is placed (device map, offload) is not
    part of it: a placement computes the same values."""
    m = {k: v for k, v in dataclasses.asdict(mcfg).items() if k not in ("device", "device_map", "max_memory")}
    m["dtype"] = str(where.dtype)
    m["device_type"] = where.device.type
    m["files"] = files_identity(mcfg)
    return f"{mcfg.name}-{stable_hash(m)}"
