"""Dense reference (cached once per model and prompt set) and the pruned-vs-dense comparison.

Only ONE model is ever in memory. The pipeline calls, in order::

    plan = build_plan(probe_cfg)                                              # once, before loading
    ref = dense_reference(model, tokenizer, plan, cache_dir, model_key=key)   # dense model
    ... prune the same model in place ...
    df = compare_to_reference(model, tokenizer, plan, ref)                    # pruned model
    summary = write_probe_outputs(df, run_dir)

The dense side is cached on disk as hidden states only, under
``cache_dir/probes/<key>/`` (one safetensors file per prompt, then ``manifest.json``
last: a directory without a manifest is incomplete and is recomputed). ``<key>`` hashes
the model identity (``model_key`` or the model's config), a sample of its weights, the
prompt token ids, the probed layers/sublayers/contexts and the decoding settings — not
the spaces, temperatures, top-k or chunk size, which only change what is computed from
the states. A sweep over sparsities therefore runs the dense model once.

Logits and probabilities of BOTH sides are recomputed on the fly through the model's own
final norm and LM head (the logit lens), streamed layer by layer and in chunks of
``plan.token_chunk`` tokens, so no ``[layers × tokens × vocab]`` tensor ever exists:
the extra memory is O(token_chunk × vocab). The lens applies to the residual stream
(sublayer ``block``); ``attn``/``mlp`` updates are compared in the embedding space only.

The table's layout is the results contract: :mod:`prunerep.results` (``PROBE_COLUMNS``).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from prunerep.io import atomic_write_json, atomic_write_with, stable_hash
from prunerep.models import final_norm, model_device, output_head
from prunerep.probes import metrics as M
from prunerep.probes.capture import SUBLAYERS, lens_logits, num_layers, resolve_layers
from prunerep.probes.contexts import (CONTEXTS, greedy_decode, prompt_states, stop_token_ids,
                                      teacher_forced_states)
from prunerep.probes.prompts import Prompt, load_prompts, read_prompts_file
from prunerep.results import PROBE_COLUMNS, PROBE_DTYPES, SPACES, empty_probe_table

log = logging.getLogger(__name__)

CACHE_VERSION = 1
NAN = math.nan


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ProbePlan:
    """What the probes will do, validated once (:func:`build_plan`) and passed to every stage."""

    spaces: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()
    sublayers: tuple[str, ...] = ("block",)
    temperatures: tuple[float, ...] = (1.0,)
    topk: tuple[int, ...] = (5, 10)
    layers: Any = "all"  # "all" | tuple of indices | {"every": k}; resolved against the model
    prompts: str = "offline"
    n_prompts: int = 0
    max_prompt_tokens: int = 256
    max_new_tokens: int = 0
    token_chunk: int = 256
    metric_threads: int | None = None
    compile: bool | None = None  # None: on CUDA only
    seed: int = 0

    @property
    def empty(self) -> bool:
        return not self.spaces or not self.contexts


def build_plan(probe_cfg) -> ProbePlan:
    """Validate a probe config (``conf/probe``) into a plan; ``name: none`` or empty
    spaces/contexts is an empty plan. Raises ValueError (one line)."""
    if str(probe_cfg.name) == "none":
        return ProbePlan()

    def check(values, allowed, what):
        values = tuple(str(v) for v in values)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"probe.{what}: unknown {bad}; choose from {list(allowed)}")
        return tuple(dict.fromkeys(values))

    temps = tuple(float(t) for t in probe_cfg.temperatures)
    if any(not (t > 0 and math.isfinite(t)) for t in temps):
        raise ValueError(f"probe.temperatures={list(temps)}: temperatures must be finite and > 0")
    spaces = check(probe_cfg.spaces, SPACES, "spaces")
    if "probability" in spaces and not temps:
        raise ValueError("probe.temperatures is empty but the probability space is probed")
    topk = tuple(int(k) for k in probe_cfg.topk)
    if any(k < 1 for k in topk):
        raise ValueError(f"probe.topk={list(topk)}: k must be >= 1")
    if int(probe_cfg.token_chunk) < 1 or int(probe_cfg.max_new_tokens) < 0:
        raise ValueError("probe.token_chunk must be >= 1 and probe.max_new_tokens >= 0")
    threads = probe_cfg.metric_threads
    if threads is not None and int(threads) < 1:
        raise ValueError(f"probe.metric_threads={threads} must be >= 1 or null")
    layers = probe_cfg.layers
    if isinstance(layers, str) and layers != "all":
        raise ValueError(f"probe.layers={layers!r}: use all, a list of indices or {{every: k}}")
    if hasattr(layers, "get") and "every" in layers:
        if int(layers["every"]) < 1:
            raise ValueError(f"probe.layers.every={layers['every']} must be >= 1")
        layers = {"every": int(layers["every"])}
    elif not isinstance(layers, (str, int)) and layers is not None:
        layers = tuple(int(i) for i in layers)
    src = str(probe_cfg.prompts)
    contexts = check(probe_cfg.contexts, CONTEXTS, "contexts")
    if spaces and contexts and src != "offline":
        if not Path(src).expanduser().is_file():
            raise ValueError(f"probe.prompts={src!r}: use 'offline' or a readable .jsonl file")
        if not read_prompts_file(Path(src).expanduser(), int(probe_cfg.n_prompts)):
            raise ValueError(f"probe.prompts={src!r} holds no prompt")
    return ProbePlan(spaces=spaces, contexts=contexts,
                     sublayers=check(probe_cfg.sublayers or ["block"], SUBLAYERS, "sublayers"),
                     temperatures=temps, topk=topk, layers=layers, prompts=src, n_prompts=int(probe_cfg.n_prompts),
                     max_prompt_tokens=int(probe_cfg.max_prompt_tokens), max_new_tokens=int(probe_cfg.max_new_tokens),
                     token_chunk=int(probe_cfg.token_chunk), metric_threads=None if threads is None else int(threads),
                     compile=probe_cfg.compile, seed=int(probe_cfg.seed))


# --------------------------------------------------------------------------- fingerprints

def _fingerprint(tensors: Sequence[Tensor], samples: int = 4096) -> str:
    """Hash of an evenly strided sample of each tensor's values (exact bits, cheap)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    return _fingerprint([p for _, p in sorted(model.named_parameters())])


def lens_fingerprint(model: nn.Module) -> str:
    """Identity of the final norm + LM head (the logit lens) — must not change when pruning."""
    return _fingerprint(list(final_norm(model).parameters()) + list(output_head(model).parameters()))


def derived_model_key(model: nn.Module) -> str:
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    return f"{name}-{stable_hash(cfg)}"


# --------------------------------------------------------------------------- dense reference

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
        from safetensors.torch import load_file

        return load_file(str(self.file(prompt_id)), device=str(device))


def _tqdm(it, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, leave=False, **kw)


def _states_to_cpu(prefix: str, states: dict) -> dict[str, Tensor]:
    return {f"{prefix}/{layer}/{sub}": v.detach().to("cpu").contiguous().clone()
            for (layer, sub), v in states.items()}


def dense_reference(model: nn.Module, tokenizer, p: ProbePlan, cache_dir: str | os.PathLike,
                    model_key: str | None = None) -> DenseReference:
    """Run the dense model over the probe prompts once and cache its hidden states.

    ``model_key`` names the dense model (the pipeline passes one); without it the key is
    derived from ``model.config``. A weight sample is hashed in as well, so two models
    with the same config but different weights never share a cache."""
    if p.empty:
        return DenseReference(key="", path=None)
    prompts = load_prompts(p, tokenizer)
    n_layers = num_layers(model)
    layers = resolve_layers(p.layers, n_layers)
    stop = stop_token_ids(model, tokenizer)
    dtype = str(next(model.parameters()).dtype)
    key = stable_hash(CACHE_VERSION, model_key or derived_model_key(model), weights_fingerprint(model),
                      [pr.to_json() for pr in prompts], layers, list(p.sublayers), list(p.contexts),
                      p.max_new_tokens, stop, dtype)
    path = Path(os.path.expanduser(str(cache_dir))) / "probes" / key
    ref = DenseReference(key=key, path=path, prompts=prompts, layers=layers, sublayers=list(p.sublayers),
                         contexts=list(p.contexts), n_layers=n_layers, lens_fingerprint=lens_fingerprint(model))
    manifest = path / "manifest.json"
    if manifest.is_file() and all(ref.file(pr.id).is_file() for pr in prompts):
        log.info("probe dense reference %s: loaded from cache", key)
        ref.from_cache = True
        return ref

    from safetensors.torch import save_file

    generative = {"teacher_forced", "free_running"} & set(p.contexts)
    for prompt in _tqdm(prompts, desc="probe: dense reference", unit="prompt"):
        ids = torch.tensor(prompt.ids, dtype=torch.long)
        tensors = {"prompt_ids": ids}
        if "prompt" in p.contexts:
            tensors.update(_states_to_cpu("prompt", prompt_states(model, ids, layers, p.sublayers)))
        if prompt.kind == "gen" and generative and p.max_new_tokens > 0:
            traj = greedy_decode(model, ids, p.max_new_tokens, stop)
            tensors["gen_ids"] = traj.tokens
            if "free_running" in p.contexts:
                tensors["free_running/h_last"] = traj.h_last.contiguous()
            if "teacher_forced" in p.contexts:
                tensors.update(_states_to_cpu("teacher_forced", teacher_forced_states(
                    model, ids, traj.tokens, layers, p.sublayers)))
        atomic_write_with(ref.file(prompt.id), lambda tmp, t=tensors: save_file(t, str(tmp)))
    atomic_write_json(manifest, {"key": key, "version": CACHE_VERSION, "model_key": model_key,
                                 "layers": layers, "sublayers": list(p.sublayers), "contexts": list(p.contexts),
                                 "n_layers": n_layers, "max_new_tokens": p.max_new_tokens, "stop_ids": stop,
                                 "prompts": [pr.to_json() for pr in prompts]})
    log.info("probe dense reference %s: %d prompts cached in %s", key, len(prompts), path)
    return ref


# --------------------------------------------------------------------------- per-chunk metrics

def compare_states(model: nn.Module, h_dense: Tensor, h_pruned: Tensor, *, lens: bool, spaces: Sequence[str],
                   temperatures: Sequence[float], topk: Sequence[int], token_chunk: int,
                   metric_threads: int | None = None, compile: bool | None = None
                   ) -> dict[tuple[str, str, float], Tensor]:
    """Per-row metrics of two ``[n, d]`` state matrices, keyed ``(space, metric, T)``.

    ``lens``: also compare z = lens(h) and p = softmax(z/T) (residual-stream states only).
    Rows are processed ``token_chunk`` at a time; results are float64 on the CPU and each
    row's value does not depend on the chunk size (see :func:`lens_rows`). ``compile``: fuse
    the vocabulary metrics with torch.compile (None: on CUDA only)."""
    device = model_device(model)
    compiled = device.type == "cuda" if compile is None else bool(compile)
    out: dict[tuple[str, str, float], list[Tensor]] = defaultdict(list)
    want_z = lens and ("logit" in spaces or "probability" in spaces)
    for start in range(0, h_dense.shape[0], token_chunk):
        hd = h_dense[start:start + token_chunk].to(device)
        hp = h_pruned[start:start + token_chunk].to(device)
        if "embedding" in spaces:
            for m, v in M.geometry(hd, hp).items():
                out[("embedding", m, NAN)].append(v)
        if not want_z:
            continue
        zd, zp = lens_pair(model, hd, hp)
        with intra_op_threads(metric_threads, device):
            for k, v in M.vocab_metrics(zd, zp, temperatures, topk, logit="logit" in spaces,
                                        probability="probability" in spaces, compiled=compiled).items():
                out[k].append(v)
        del zd, zp
    return {k: torch.cat(v).to("cpu", torch.float64) for k, v in out.items()}


def compare_layers(model: nn.Module, cached: dict[str, Tensor], context: str, states: dict, kw: dict
                   ) -> dict[tuple[int, str], dict[tuple[str, str, float], Tensor]]:
    """:func:`compare_states` for every captured ``(layer, sublayer)`` of one context.

    The residual-stream states (``block``) of all layers go through the lens together, so
    the LM-head matmuls run on full ``token_chunk``-row chunks however short the prompt
    (a few large matmuls are what makes the probe cost close to its floor); the results
    are split back per layer. ``states`` and the matching ``cached`` entries are consumed."""
    out = {}
    block = [key for key in states if key[1] == "block"]
    if block:
        lengths = [states[key].shape[0] for key in block]
        hp = torch.cat([states.pop(key) for key in block])
        hd = torch.cat([cached.pop(f"{context}/{layer}/{sub}") for layer, sub in block])
        per_row = compare_states(model, hd, hp, lens=True, **kw)
        del hp, hd
        offsets = np.cumsum([0] + lengths)
        for j, key in enumerate(block):
            out[key] = {k: v[offsets[j]:offsets[j + 1]] for k, v in per_row.items()}
    for key in list(states):
        layer, sub = key
        out[key] = compare_states(model, cached.pop(f"{context}/{layer}/{sub}"), states.pop(key), lens=False, **kw)
    return out


LENS_ROW_MULTIPLE = 8


def lens_rows(model: nn.Module, h: Tensor) -> Tensor:
    """:func:`lens_logits` of ``[n, d]`` rows, zero-padded to a multiple of 8 rows: a BLAS
    takes another code path for 1-3 rows (gemv), so padding keeps each row's logits
    bit-identical however the rows are chunked."""
    pad = -h.shape[0] % LENS_ROW_MULTIPLE
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[-1])])
    z = lens_logits(model, h)
    return z[: z.shape[0] - pad] if pad else z


def lens_pair(model: nn.Module, hd: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lens_rows` of both sides in ONE LM-head matmul: with few rows the matmul is
    bound by reading the [V, d] head (2 GB for a 7B model in float32), so reading it once
    instead of twice halves the cost. Each side is padded to a multiple of 8 rows first,
    so every row's logits are those :func:`lens_rows` gives (bit for bit)."""
    n, pad = hd.shape[0], -hd.shape[0] % LENS_ROW_MULTIPLE
    both = [hd, hd.new_zeros(pad, hd.shape[-1]), hp] if pad else [hd, hp]
    z = lens_rows(model, torch.cat(both))
    return z[:n], z[n + pad:n + pad + hp.shape[0]]


@contextmanager
def intra_op_threads(n: int | None, device: torch.device):
    """Temporarily use ``n`` CPU threads (None: leave torch's setting)."""
    if n is None or device.type != "cpu" or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- the table

_LABELS = ("context", "prompt_id", "prompt_kind", "layer", "sublayer", "space", "metric", "temperature")


class _Rows:
    """Columnar accumulator: each `add` appends one vector of values sharing its labels."""

    def __init__(self):
        self.labels: list[tuple] = []
        self.steps: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, context: str, prompt: Prompt, layer: int, sublayer: str, space: str, metric: str,
            temperature: float, steps, values) -> None:
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        steps = np.broadcast_to(np.asarray(steps, dtype=np.int32), values.shape)
        self.labels.append((context, prompt.id, prompt.kind, layer, sublayer, space, metric, temperature))
        self.steps.append(steps)
        self.values.append(values)

    def add_metrics(self, context: str, prompt: Prompt, layer: int, sublayer: str,
                    per_row: dict[tuple[str, str, float], Tensor], steps=None) -> None:
        """``steps=None``: mean over rows (step -1); else one table row per metric row."""
        for (space, metric, t), v in per_row.items():
            v = v.numpy()
            if steps is None:
                self.add(context, prompt, layer, sublayer, space, metric, t, -1, v.mean() if v.size else NAN)
            else:
                self.add(context, prompt, layer, sublayer, space, metric, t, steps, v)

    def frame(self) -> pd.DataFrame:
        if not self.labels:
            return empty_probe_table()
        lengths = np.array([len(v) for v in self.values])
        cols = list(zip(*self.labels))
        data = {}
        for name, col in zip(_LABELS, cols):
            data[name] = np.repeat(np.asarray(col, dtype=object if isinstance(col[0], str) else None), lengths)
        data["step"] = np.concatenate(self.steps)
        data["value"] = np.concatenate(self.values)
        df = pd.DataFrame(data)
        return df.astype({c: t for c, t in PROBE_DTYPES.items() if t != "object"})[list(PROBE_COLUMNS)]


# --------------------------------------------------------------------------- comparison

def _check_compatible(ref: DenseReference, p: ProbePlan, layers: list[int]) -> None:
    missing = {"contexts": [c for c in p.contexts if c not in ref.contexts],
               "sublayers": [s for s in p.sublayers if s not in ref.sublayers],
               "layers": [i for i in layers if i not in ref.layers]}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        raise ValueError(f"the dense reference was built without {missing}; build it with the same "
                         f"probe config as the comparison")


def compare_to_reference(model: nn.Module, tokenizer, p: ProbePlan, ref: DenseReference) -> pd.DataFrame:
    """Compare the (pruned) ``model`` with the cached dense reference; returns the tidy table."""
    if p.empty or ref.empty:
        return empty_probe_table()
    n_layers = num_layers(model)
    if n_layers != ref.n_layers:
        raise ValueError(f"the model has {n_layers} blocks, the dense reference {ref.n_layers} (layer "
                         f"dropping must keep the blocks, as identity sublayers)")
    layers = resolve_layers(p.layers, n_layers)
    _check_compatible(ref, p, layers)
    if lens_fingerprint(model) != ref.lens_fingerprint:
        log.warning("the final norm / LM head changed since the dense reference (pruned LM head?): both "
                    "sides are projected through the CURRENT head, so the logit/probability spaces do not "
                    "include the head's own damage")
    kw = dict(spaces=p.spaces, temperatures=p.temperatures, topk=p.topk, token_chunk=p.token_chunk,
              metric_threads=p.metric_threads, compile=p.compile)
    want_options = "probability" in p.spaces
    device = model_device(model)
    rows = _Rows()
    for prompt in _tqdm(ref.prompts, desc="probe: compare", unit="prompt"):
        cached = ref.load(prompt.id)
        ids = cached["prompt_ids"]
        if "prompt" in p.contexts:
            states = prompt_states(model, ids, layers, p.sublayers)
            if prompt.kind == "mc" and want_options and "block" in p.sublayers:
                last = len(ids) - 1
                zd, zp = lens_pair(model, torch.stack([cached[f"prompt/{i}/block"][-1] for i in layers]).to(device),
                                   torch.stack([states[(i, "block")][-1] for i in layers]).to(device))
                for t in p.temperatures:
                    for m, v in M.option_metrics(zd, zp, prompt.option_ids, t).items():
                        if m != "top1_agree":
                            for i, layer in enumerate(layers):
                                rows.add("prompt", prompt, layer, "block", "options", m, t, last, v[i].item())
                top1 = M.option_metrics(zd, zp, prompt.option_ids)["top1_agree"]
                for i, layer in enumerate(layers):
                    rows.add("prompt", prompt, layer, "block", "options", "top1_agree", NAN, last, top1[i].item())
            for (layer, sub), per_row in compare_layers(model, cached, "prompt", states, kw).items():
                rows.add_metrics("prompt", prompt, layer, sub, per_row)
        gen = cached.get("gen_ids")
        if gen is None or len(gen) == 0:
            continue
        steps = np.arange(len(gen))
        if "teacher_forced" in p.contexts:
            states = teacher_forced_states(model, ids, gen, layers, p.sublayers)
            for (layer, sub), per_row in compare_layers(model, cached, "teacher_forced", states, kw).items():
                rows.add_metrics("teacher_forced", prompt, layer, sub, per_row, steps=steps)
        if "free_running" in p.contexts:
            traj = greedy_decode(model, ids, len(gen))  # exactly as many steps as the dense model
            n = min(len(gen), len(traj.tokens))
            rows.add_metrics("free_running", prompt, n_layers, "block",
                             compare_states(model, cached["free_running/h_last"][:n], traj.h_last[:n],
                                            lens=True, **kw), steps=steps[:n])
            agree = (traj.tokens[:n] == gen[:n]).numpy()
            first = int(np.argmin(agree)) if not agree.all() else n
            rows.add("free_running", prompt, n_layers, "block", "tokens", "token_agree", NAN, steps[:n], agree)
            rows.add("free_running", prompt, n_layers, "block", "tokens", "first_divergence", NAN, -1, first)
            rows.add("free_running", prompt, n_layers, "block", "tokens", "diverged", NAN, -1, float(first < n))
    df = rows.frame()
    warn_nonfinite(df)
    return df


def warn_nonfinite(df: pd.DataFrame) -> int:
    """logging.warning with counts per (context, space, metric) of NaN/inf values; returns the total."""
    bad = ~np.isfinite(df["value"].to_numpy())
    total = int(bad.sum())
    if total:
        counts = df[bad].groupby(["context", "space", "metric"], sort=True).size()
        detail = ", ".join(f"{c}/{s}/{m}: {k}" for (c, s, m), k in counts.items())
        log.warning("probes: %d non-finite values (NaN/inf) of %d, kept in the table — %s",
                    total, len(df), detail)
    return total
