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
the states. A sweep over sparsities therefore runs the dense model once, also when its
points start at once (SLURM arrays): the first takes the entry's lock
(``probes/<key>.lock``) and computes it, the others wait for it. The manifest records the
sha256 of every prompt file (and is checksummed itself); an entry that does not match is
never used: it is named in a warning and recomputed.

Logits and probabilities of BOTH sides are recomputed on the fly through the model's own
final norm and LM head (the logit lens), streamed layer by layer and in chunks of
``plan.token_chunk`` tokens, so no ``[layers × tokens × vocab]`` tensor ever exists:
the extra memory is O(token_chunk × vocab). The lens applies to the residual stream
(sublayer ``block``); ``attn``/``mlp`` updates are compared in the embedding space only.

The table's layout is the results contract: :mod:`prunerep.results.schema` (``PROBE_COLUMNS``).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from prunerep.results.store import (ABSENT, CacheInvalid, atomic_write_checked_bytes, cache_lock, read_checked_json,
                         sha256_file, stable_hash, write_checked_json)
from prunerep.model.anatomy import final_norm, lens_rows, num_layers, output_head
from prunerep.model.placement import iter_parameters, lens_device, onloaded
from prunerep.probes import metrics as M
from prunerep.probes.capture import SUBLAYERS, resolve_layers
from prunerep.probes.contexts import (CONTEXTS, active_memo, greedy_decode, prompt_states,
                                      reuse_last_states, stop_token_ids, teacher_forced_states)
from prunerep.probes.prompts import Prompt, load_prompts, read_prompts_file
from prunerep.results.schema import ANSWER_METRICS, PROBE_COLUMNS, PROBE_DTYPES, SPACES, empty_probe_table

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: checksummed entries (sha256 of every file in the manifest)
NAN = math.nan
#: probe.h: which state the last layer's embedding-space rows compare: the residual stream
#: before the final norm (what the hooks capture and the lens reads) or after it (what
#: transformers' ``output_hidden_states[-1]`` returns)
H_STATES = ("residual", "normed")
#: the second-order estimates and the exact values they estimate (per-row ratios est / exact)
ESTIMATE_RATIOS = {"kl_est_ratio": ("kl_est", "kl"), "cos_est_ratio": ("cos_est", "one_minus_cos")}


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
    h: str = "residual"  # the last layer's embedding-space rows: residual (before the final norm) | normed
    transitions: bool = False  # sublayer transitions and local damage (prunerep/probes/transitions.py)
    lens: str = "final_norm"  # the transition rows' lens: final_norm | raw (LM head without the final norm)
    top_tokens: int = 30  # top_tokens.parquet: the dense top-k at the answer / first-step position (0: off)

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
    h = str(getattr(probe_cfg, "h", "residual"))
    if h not in H_STATES:
        raise ValueError(f"probe.h={h!r}: choose from {list(H_STATES)}")
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
                     compile=probe_cfg.compile, seed=int(probe_cfg.seed), h=h,
                     **_transitions().plan_settings(probe_cfg))


def _transitions():
    from prunerep.probes import transitions  # imports this module: imported when first needed

    return transitions


# --------------------------------------------------------------------------- fingerprints

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
    prompts = load_prompts(p, tokenizer)
    n_layers = num_layers(model)
    layers = resolve_layers(p.layers, n_layers)
    stop = stop_token_ids(model, tokenizer)
    dtype = str(next(model.parameters()).dtype)
    key = stable_hash(CACHE_VERSION, model_key or derived_model_key(model), weights_fingerprint(model),
                      [pr.to_json() for pr in prompts], layers, list(p.sublayers), list(p.contexts),
                      p.max_new_tokens, stop, dtype, *_transitions().cache_key_parts(p))
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
        (path / "manifest.json").unlink(missing_ok=True)  # from now on readers see an incomplete entry
        _compute_reference(model, ref, p, stop, model_key)
    log.info("probe dense reference %s: %d prompts cached in %s", key, len(prompts), path)
    return ref


MANIFEST = "manifest.json"


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
    from safetensors.torch import save

    generative = {"teacher_forced", "free_running"} & set(p.contexts)
    checksums = {}
    for prompt in _tqdm(ref.prompts, desc="probe: dense reference", unit="prompt"):
        ids = torch.tensor(prompt.ids, dtype=torch.long)
        tensors = {"prompt_ids": ids}
        if "prompt" in p.contexts:
            tensors.update(_states_to_cpu("prompt", prompt_states(model, ids, ref.layers, p.sublayers)))
        if prompt.kind == "gen" and generative and p.max_new_tokens > 0:
            traj = greedy_decode(model, ids, p.max_new_tokens, stop)
            tensors["gen_ids"] = traj.tokens
            if "free_running" in p.contexts:
                tensors["free_running/h_last"] = traj.h_last.contiguous()
            if "teacher_forced" in p.contexts:
                tensors.update(_states_to_cpu("teacher_forced", teacher_forced_states(
                    model, ids, traj.tokens, ref.layers, p.sublayers)))
        if p.transitions:  # the sublayers' dense inputs and updates (prunerep/probes/transitions.py)
            tensors.update(_transitions().dense_states(model, ids, tensors.get("gen_ids"), ref.layers, p.contexts))
        f = ref.file(prompt.id)
        checksums[f.name] = atomic_write_checked_bytes(f, save(tensors))
        del tensors
    write_checked_json(ref.path / MANIFEST, {
        "key": ref.key, "version": CACHE_VERSION, "model_key": model_key, "files": checksums, "layers": ref.layers,
        "sublayers": list(p.sublayers), "contexts": list(p.contexts), "n_layers": ref.n_layers,
        "max_new_tokens": p.max_new_tokens, "stop_ids": stop, "prompts": [pr.to_json() for pr in ref.prompts]})


# --------------------------------------------------------------------------- per-chunk metrics

def embedding_metrics(model: nn.Module, h_dense: Tensor, h_pruned: Tensor, normed: bool = False
                      ) -> dict[tuple[str, str, float], Tensor]:
    """The embedding-space metrics (:func:`~prunerep.probes.metrics.geometry`) of two ``[n, d]``
    state matrices, per row, keyed ``("embedding", metric, nan)``, float64 on the CPU.
    ``normed``: compare the final norm's outputs instead of h (the last layer with
    ``probe.h=normed``). The logit and probability rows go through :class:`LensStream`."""
    device = lens_device(model)
    hd, hp = h_dense.to(device), h_pruned.to(device)
    with torch.inference_mode(), intra_op_threads(1, device):  # [n, d] ops: too small to gain from threads
        if normed:
            norm = final_norm(model)
            hd, hp = norm(hd), norm(hp)
        return {("embedding", m, NAN): v.to("cpu", torch.float64) for m, v in M.geometry(hd, hp).items()}


class LensStream:
    """Row pairs (h_dense, h_pruned) of any prompt, context and layer through the logit lens and
    :func:`~prunerep.probes.metrics.vocab_metrics`, in full chunks of ``token_chunk`` rows: the LM
    head (a multi-GB read for a 7B model) is read once per chunk, however short the prompts and
    contexts. Each segment (:meth:`add`) gets its rows' metrics (float64, CPU) through its
    callback once all of them are through, and callbacks (:meth:`then` too) run in the order they
    were registered, so the table comes out the same whatever the chunk size; each row's values do
    not depend on the chunking either (see :func:`lens_rows`)."""

    def __init__(self, model: nn.Module, *, spaces: Sequence[str], temperatures: Sequence[float],
                 topk: Sequence[int], token_chunk: int, metric_threads: int | None = None,
                 compile: bool | None = None):
        self.model, self.device = model, lens_device(model)
        self.compiled = self.device.type == "cuda" if compile is None else bool(compile)
        self.logit, self.probability = "logit" in spaces, "probability" in spaces
        self.temperatures, self.topk, self.chunk, self.threads = tuple(temperatures), tuple(topk), token_chunk, \
            metric_threads
        self.blocks: deque = deque()  # pending [h_dense, h_pruned] row blocks, in order
        self.pending = 0
        self.added = self.done = 0  # rows registered / through the lens
        self.segments: deque = deque()  # [start, n, parts, callback, options, keep]

    def add(self, h_dense: Tensor, h_pruned: Tensor, callback, options=None, keep: Sequence[int] = ()) -> None:
        """``callback(per_row)`` with ``{(space, metric, T): [n]}`` once the rows are through.
        ``options = (row, option_ids, into)``: the option subspace at that row (a multiple-choice
        answer position) from the same logits, ``into[(metric, T)] = value``. ``keep``: rows whose
        logits :func:`lens_pair` serves again (the top-token table asks for them)."""
        n = h_dense.shape[0]
        if n == 0:
            return self.then(lambda: None)
        self.segments.append([self.added, n, [], callback, options, tuple(keep)])
        self.added += n
        self.blocks.append([h_dense, h_pruned])
        self.pending += n
        while self.pending >= self.chunk:
            self._run(self.chunk)

    def then(self, callback) -> None:
        """``callback()`` once every segment added before is done (right away if there is none)."""
        self.segments.append([self.added, 0, [], lambda _: callback(), None, ()])
        self._complete()

    def flush(self) -> None:
        while self.pending:
            self._run(min(self.pending, self.chunk))
        self._complete()

    def release(self) -> None:
        """Copy the pending rows (views into one prompt's states), so those states can be freed."""
        for b in self.blocks:
            b[0], b[1] = b[0].clone(), b[1].clone()

    def _run(self, n: int) -> None:
        hd, hp = [], []
        while len(hd) == 0 or sum(x.shape[0] for x in hd) < n:
            bd, bp = self.blocks[0]
            k = min(n - sum(x.shape[0] for x in hd), bd.shape[0])
            hd.append(bd[:k])
            hp.append(bp[:k])
            if k == bd.shape[0]:
                self.blocks.popleft()
            else:
                self.blocks[0] = [bd[k:], bp[k:]]
        self.pending -= n
        start = self.done
        zd, zp = lens_pair(self.model, torch.cat(hd).to(self.device), torch.cat(hp).to(self.device))
        memo = active_memo(self.model)
        for seg_start, seg_n, _parts, _cb, options, keep in self.segments:
            if seg_start >= start + n:
                break
            if options is not None and start <= seg_start + options[0] < start + n:
                self._options(zd, zp, seg_start + options[0] - start, *options[1:])
            for r in keep:
                if memo is not None and start <= seg_start + r < start + n:
                    i = seg_start + r - start
                    memo[_lens_key(_row(hd, i), _row(hp, i))] = (zd[i:i + 1].clone(), zp[i:i + 1].clone())
        with intra_op_threads(self.threads, self.device):
            per_row = M.vocab_metrics(zd, zp, self.temperatures, self.topk, logit=self.logit,
                                      probability=self.probability, compiled=self.compiled)
        per_row = {k: v.to("cpu", torch.float64) for k, v in per_row.items()}
        del zd, zp
        self.done += n
        for seg in self.segments:
            seg_start, seg_n, parts = seg[0], seg[1], seg[2]
            if seg_start >= start + n:
                break
            lo, hi = max(seg_start, start), min(seg_start + seg_n, start + n)
            if hi > lo:
                parts.append({k: v[lo - start:hi - start] for k, v in per_row.items()})
        self._complete()

    def _complete(self) -> None:
        while self.segments and self.segments[0][0] + self.segments[0][1] <= self.done:
            _start, _n, parts, callback, _options, _keep = self.segments.popleft()
            callback({k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {})

    def _options(self, zd: Tensor, zp: Tensor, i: int, option_ids, into: dict) -> None:
        got = {(m, NAN): v for m, v in M.option_metrics(zd[i:i + 1], zp[i:i + 1], option_ids).items()
               if m == "top1_agree"}
        for t in self.temperatures:
            got.update({(m, t): v for m, v in M.option_metrics(zd[i:i + 1], zp[i:i + 1], option_ids, t).items()
                        if m != "top1_agree"})
        into.update({k: float(v[0]) for k, v in got.items()})


def _row(parts: list[Tensor], i: int) -> Tensor:
    """Row ``i`` of the concatenation of ``parts``."""
    for t in parts:
        if i < t.shape[0]:
            return t[i]
        i -= t.shape[0]
    raise IndexError(i)


def _lens_key(h_dense: Tensor, h_pruned: Tensor) -> tuple:
    return ("lens", _bits(h_dense), _bits(h_pruned))


def _bits(t: Tensor) -> bytes:
    """The exact bytes of a tensor of any dtype (numpy has no bfloat16)."""
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def lens_pair(model: nn.Module, hd: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~prunerep.model.anatomy.lens_rows` of both sides in ONE LM-head matmul (the [V, d]
    head, 2 GB for a 7B model in float32, is read once, not twice); a row the comparison has run
    already (the top-token table asks again) comes from the memo."""
    memo = active_memo(model)
    if memo is not None and hd.shape[0] == 1 == hp.shape[0]:
        got = memo.get(_lens_key(hd[0], hp[0]))
        if got is not None:
            return got
    zd, zp = lens_rows(model, [hd, hp])
    return zd, zp


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

    def add_estimate_ratios(self, context: str, prompt: Prompt, layer: int,
                            per_row: dict[tuple[str, str, float], Tensor], steps) -> None:
        """Per row (prompt position or decoding step: ``steps``), the second-order estimate over
        the exact value it estimates, :data:`ESTIMATE_RATIOS`, at every temperature; rows where
        the exact value is 0 (p_pruned == p_dense: the ratio is undefined) are left out."""
        steps = np.asarray(steps)
        for name, (est, exact) in ESTIMATE_RATIOS.items():
            for (space, metric, t), v in per_row.items():
                if space != "probability" or metric != exact or (space, est, t) not in per_row:
                    continue
                x, e = v.numpy(), per_row[(space, est, t)].numpy()
                keep = x != 0
                if keep.any():
                    with np.errstate(divide="ignore", invalid="ignore"):
                        self.add(context, prompt, layer, "block", "probability", name, t, steps[keep],
                                 e[keep] / x[keep])

    def add_answer(self, prompt: Prompt, layer: int, position: int, options: dict,
                   per_row: dict[tuple[str, str, float], Tensor]) -> None:
        """A multiple-choice prompt's answer position at one layer: the option subspace
        (``options``: ``{(metric, T): value}``) and, from the same row, the full vocabulary
        (space ``answer``: :data:`~prunerep.results.schema.ANSWER_METRICS`)."""
        for (metric, t), v in options.items():
            self.add("prompt", prompt, layer, "block", "options", metric, t, position, v)
        for (space, metric, t), v in per_row.items():
            if space == "probability" and metric in ANSWER_METRICS:
                self.add("prompt", prompt, layer, "block", "answer", metric, t, position, float(v[position]))

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
    with reuse_last_states(model):  # the top-token table reads the last layer's states again
        return _compare(model, tokenizer, p, ref)


def _compare(model: nn.Module, tokenizer, p: ProbePlan, ref: DenseReference) -> pd.DataFrame:
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
    want_options = "probability" in p.spaces and "block" in p.sublayers
    normed = n_layers if p.h == "normed" else None
    vocab = "logit" in p.spaces or "probability" in p.spaces
    # the final-layer logits at P − 1 (else the first decoding step) that the top-token table asks for again
    keep_top = int(getattr(p, "top_tokens", 0) or 0) > 0 and "probability" in p.spaces
    rows = _Rows()
    stream = LensStream(model, **kw)  # every lens row of every prompt, in full chunks

    def context_rows(context, prompt, cached, states, steps, options=None, answer=None, keep_layer_row=None):
        """Register one context's rows: the embedding rows now, the lens rows through the stream."""
        for key in list(states):
            layer, sub = key
            hd, hp = cached.pop(f"{context}/{layer}/{sub}"), states.pop(key)
            step_arg = None if context == "prompt" else steps
            if "embedding" in p.spaces:
                emb = embedding_metrics(model, hd, hp, normed=sub == "block" and layer == normed)
                stream.then(lambda c=context, pr=prompt, la=layer, su=sub, e=emb, st=step_arg:
                            rows.add_metrics(c, pr, la, su, e, steps=st))
            if sub != "block" or not vocab:
                continue
            into = {} if options is not None else None

            def done(per_row, c=context, pr=prompt, la=layer, st=step_arg, into=into):
                rows.add_metrics(c, pr, la, "block", per_row, steps=st)
                rows.add_estimate_ratios(c, pr, la, per_row, steps)
                if into:
                    rows.add_answer(pr, la, answer, into, per_row)

            keep = [keep_layer_row[1]] if keep_layer_row is not None and keep_layer_row[0] == layer else []
            stream.add(hd, hp, done, options=(answer, options, into) if into is not None else None, keep=keep)

    for prompt in _tqdm(ref.prompts, desc="probe: compare", unit="prompt"):
        cached = ref.load(prompt.id)
        ids = cached["prompt_ids"]
        keep = keep_top  # this prompt's top-token row is still to be kept
        if "prompt" in p.contexts:
            states = prompt_states(model, ids, layers, p.sublayers)
            mc = prompt.kind == "mc" and want_options and bool(prompt.option_ids)
            context_rows("prompt", prompt, cached, states, np.arange(len(ids)),
                         options=prompt.option_ids if mc else None, answer=len(ids) - 1,
                         keep_layer_row=(n_layers, len(ids) - 1) if keep else None)
            keep = keep and "block" not in p.sublayers  # kept above
        gen = cached.get("gen_ids")
        if gen is not None and len(gen):
            steps = np.arange(len(gen))
            if "teacher_forced" in p.contexts:
                states = teacher_forced_states(model, ids, gen, layers, p.sublayers)
                context_rows("teacher_forced", prompt, cached, states, steps,
                             keep_layer_row=(n_layers, 0) if keep else None)
                keep = False
            if "free_running" in p.contexts:
                traj = greedy_decode(model, ids, len(gen))  # exactly as many steps as the dense model
                n = min(len(gen), len(traj.tokens))
                hd, hp = cached["free_running/h_last"][:n], traj.h_last[:n]
                if "embedding" in p.spaces:
                    emb = embedding_metrics(model, hd, hp, normed=normed is not None)
                    stream.then(lambda pr=prompt, e=emb, st=steps[:n]:
                                rows.add_metrics("free_running", pr, n_layers, "block", e, steps=st))
                if vocab:
                    stream.add(hd, hp, lambda per_row, pr=prompt, st=steps[:n]: (
                        rows.add_metrics("free_running", pr, n_layers, "block", per_row, steps=st),
                        rows.add_estimate_ratios("free_running", pr, n_layers, per_row, st)),
                        keep=[0] if keep else [])
                agree = (traj.tokens[:n] == gen[:n]).numpy()
                first = int(np.argmin(agree)) if not agree.all() else n

                def tokens(pr=prompt, st=steps[:n], agree=agree, first=first, n=n):
                    rows.add("free_running", pr, n_layers, "block", "tokens", "token_agree", NAN, st, agree)
                    rows.add("free_running", pr, n_layers, "block", "tokens", "first_divergence", NAN, -1, first)
                    rows.add("free_running", pr, n_layers, "block", "tokens", "diverged", NAN, -1, float(first < n))
                stream.then(tokens)
        stream.release()  # the pending rows are copied: this prompt's states can go
    stream.flush()
    df = rows.frame()
    if p.transitions:  # the transition rows (prunerep/probes/transitions.py)
        df = pd.concat([df, _transitions().transition_table(model, p, ref)], ignore_index=True)
    from prunerep.probes import top_tokens  # the top-token table rides in df.attrs to write_probe_outputs
    df = top_tokens.attach(df, top_tokens.top_tokens_table(model, tokenizer, p, ref))
    df.attrs["probe_h"] = p.h  # which h the last layer's embedding rows are (probes_summary.json "h")
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
