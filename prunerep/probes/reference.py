"""The dense reference: the dense model's hidden states over the probe prompts, computed once per
model and prompt set and cached on disk.

The entry is ``cache_dir/probes/<key>/``: one safetensors file per prompt, then ``manifest.json``
last (a directory without a manifest is incomplete and is recomputed). ``<key>`` hashes the model
identity (``model_key`` or the model's config), a sample of its weights, the prompts' text and token
ids (so ``probe.chat_template`` on and off are different entries; off leaves the prompts as they were), the
probed layers/sublayers/contexts and the decoding settings — not the spaces, temperatures, top-k
or chunk size, which only change what is computed from the states. A sweep over sparsities
therefore runs the dense model once, also when its points start at once (SLURM arrays): the first
takes the entry's lock (``probes/<key>.lock``) and computes it, the others wait for it. The
manifest records the sha256 of every prompt file (and is checksummed itself); an entry that does
not match is never used: it is named in a warning and recomputed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunerep.model.anatomy import final_norm, num_layers, output_head
from prunerep.model.placement import iter_parameters, onloaded
from prunerep.probes import transitions
from prunerep.probes.capture import resolve_layers
from prunerep.probes.contexts import run_contexts, stop_token_ids
from prunerep.probes.plan import ProbePlan
from prunerep.probes.prompts import Prompt, probe_prompts
from prunerep.results.schema import STEP_CONTEXTS
from prunerep.results.store import (ABSENT, CacheInvalid, atomic_write_checked_bytes, cache_lock, read_checked_json,
                                    sha256_file, stable_hash, write_checked_json)

log = logging.getLogger(__name__)

CACHE_VERSION = 5  # raised whenever the entry's format or the way its states are computed changes
MANIFEST = "manifest.json"


def _fingerprint(tensors: Iterable[Tensor], samples: int = 4096) -> str:
    """Hash of an evenly strided sample of each tensor's values (exact bits, cheap)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    return _fingerprint(p for _, p in iter_parameters(model))


def lens_fingerprint(model: nn.Module) -> str:
    """Identity of the final norm + LM head (the logit lens) — must not change when pruning."""
    def params():
        for module in (final_norm(model), output_head(model)):
            with onloaded(module):
                yield from module.parameters()

    return _fingerprint(params())


def derived_model_key(model: nn.Module) -> str:
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    return f"{name}-{stable_hash(cfg)}"


# --------------------------------------------------------------------------- the entry

@dataclass
class DenseReference:
    """Handle on the cached dense-side states; ``load(prompt_id)`` reads one prompt's file."""

    key: str
    path: Path | None
    prompts: list[Prompt] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    sublayers: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    n_layers: int = 0
    lens_fingerprint: str = ""
    from_cache: bool = False

    @property
    def empty(self) -> bool:
        return not self.prompts or not self.contexts

    def file(self, prompt_id: int) -> Path:
        return self.path / f"prompt-{prompt_id:04d}.safetensors"

    def load(self, prompt_id: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        return load_file(str(self.file(prompt_id)), device=str(device))


def _states_to_cpu(prefix: str, states: dict) -> dict[str, Tensor]:
    return {f"{prefix}/{layer}/{sub}": v.detach().to("cpu").contiguous().clone()
            for (layer, sub), v in states.items()}


def dense_reference(model: nn.Module, tokenizer, p: ProbePlan, cache_dir: str | os.PathLike,
                    model_key: str | None = None, dense_scores: dict | None = None) -> DenseReference:
    """Run the dense model over the probe prompts once and cache its hidden states.
    The prompts are :func:`~prunerep.probes.prompts.probe_prompts` (``dense_scores``: the evaluated
    items, for ``probe.prompts=auto | tasks``).

    ``model_key`` names the dense model (the pipeline passes one, built from its resolved files:
    :func:`prunerep.model.identity.files_identity`); without it the key is derived from ``model.config``.
    A weight sample is hashed in as well, so two models with the same config but different
    weights never share a cache.

    The entry is checksummed: ``manifest.json`` (written last) holds the sha256 of every prompt
    file and its own. A tampered, truncated or half-overwritten entry is never used: it is
    named in a warning and computed again. Processes needing the same entry at once (a SLURM
    array) take its lock, ``probes/<key>.lock``: one computes, the others wait and read it."""
    if p.empty:
        return DenseReference(key="", path=None)
    prompts = probe_prompts(tokenizer, p.prompts, p.n_prompts, p.seed, p.max_prompt_tokens, p.chat_template,
                            dense_scores)
    n_layers = num_layers(model)
    layers = resolve_layers(p.layers, n_layers)
    stop = stop_token_ids(model, tokenizer)
    dtype = str(next(model.parameters()).dtype)
    key = stable_hash(CACHE_VERSION, model_key or derived_model_key(model), weights_fingerprint(model),
                      [pr.to_json() for pr in prompts], layers, list(p.sublayers), list(p.contexts),
                      p.max_new_tokens, stop, dtype, *transitions.cache_key_parts(p))
    path = Path(os.path.expanduser(str(cache_dir))) / "probes" / key
    ref = DenseReference(key=key, path=path, prompts=prompts, layers=layers, sublayers=list(p.sublayers),
                         contexts=list(p.contexts), n_layers=n_layers, lens_fingerprint=lens_fingerprint(model))
    if verify_reference(ref) is None:
        log.info("probe dense reference %s: loaded from cache", key)
        ref.from_cache = True
        return ref
    with cache_lock(path, what=f"probe dense reference {key}"):
        problem = verify_reference(ref)  # another process may have computed it while this one waited
        if problem is None:
            log.info("probe dense reference %s: loaded from cache (computed by another process)", key)
            ref.from_cache = True
            return ref
        if problem != ABSENT:
            log.warning("probe dense reference cache %s is not intact (%s): not used, recomputing it", path, problem)
        (path / MANIFEST).unlink(missing_ok=True)  # from now on readers see an incomplete entry
        _compute_reference(model, ref, p, stop, model_key)
    log.info("probe dense reference %s: %d prompts cached in %s", key, len(prompts), path)
    return ref


def verify_reference(ref: DenseReference) -> str | None:
    """None when the cached entry of ``ref`` is complete and every file matches the sha256 its
    manifest records; :data:`~prunerep.results.store.ABSENT` when there is no manifest (never computed,
    or being computed); else what is wrong, naming the file."""
    try:
        manifest = read_checked_json(ref.path / MANIFEST)
    except FileNotFoundError:
        return ABSENT
    except (OSError, CacheInvalid) as e:
        return f"{MANIFEST}: {e}"
    if not isinstance(manifest, dict) or manifest.get("key") != ref.key or manifest.get("version") != CACHE_VERSION:
        return f"{MANIFEST} describes another entry"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST} records no checksums"
    for prompt in ref.prompts:
        f = ref.file(prompt.id)
        want = files.get(f.name)
        if want is None:
            return f"{f.name} is not in {MANIFEST}"
        try:
            if sha256_file(f) != want:
                return f"{f.name} does not match its sha256"
        except FileNotFoundError:
            return f"{f.name} is missing"
        except OSError as e:
            return f"{f.name} is unreadable ({e})"
    return None


def _compute_reference(model: nn.Module, ref: DenseReference, p: ProbePlan, stop, model_key: str | None) -> None:
    """Run the dense model over ``ref.prompts``; write one file per prompt, then the manifest."""
    generative = set(STEP_CONTEXTS) & set(p.contexts)
    checksums = {}
    for prompt in tqdm(ref.prompts, desc="probe: dense reference", unit="prompt", leave=False):
        ids = torch.tensor(prompt.ids, dtype=torch.long)
        tensors = {"prompt_ids": ids}
        decode = p.max_new_tokens if prompt.kind == "gen" and generative else 0
        got = run_contexts(model, ids, ref.layers, p.sublayers, prompt="prompt" in p.contexts, decode_steps=decode,
                           stop_ids=stop, teacher_forced="teacher_forced" in p.contexts)
        if got.prompt is not None:
            tensors.update(_states_to_cpu("prompt", got.prompt))
        if got.free_running is not None:
            tensors["gen_ids"] = got.continuation
            if "free_running" in p.contexts:
                tensors["free_running/h_last"] = got.free_running.h_last.contiguous()
        if got.teacher_forced is not None:
            tensors.update(_states_to_cpu("teacher_forced", got.teacher_forced))
        if p.transitions:  # the sublayers' dense inputs and updates (prunerep/probes/transitions.py)
            tensors.update(transitions.dense_states(model, ids, tensors.get("gen_ids"), ref.layers, p.contexts))
        f = ref.file(prompt.id)
        checksums[f.name] = atomic_write_checked_bytes(f, save(tensors))
        del tensors
    write_checked_json(ref.path / MANIFEST, {
        "key": ref.key, "version": CACHE_VERSION, "model_key": model_key, "files": checksums, "layers": ref.layers,
        "sublayers": list(p.sublayers), "contexts": list(p.contexts), "n_layers": ref.n_layers,
        "max_new_tokens": p.max_new_tokens, "stop_ids": stop, "prompts": [pr.to_json() for pr in ref.prompts]})
