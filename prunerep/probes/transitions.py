"""Sublayer transitions: how much each attention and MLP sublayer moves the representation, in
h, z and p, and how much pruning perturbs each sublayer on its own (He et al. 2026, the layerwise
transition analysis of its Figures 2 and 5; ``probe.transitions=true``).

For block ``b`` (table ``layer`` = b + 1, the layer convention of :mod:`.capture`), with x its
input on the residual stream, ``mid = x + Attn(x)`` and ``out = mid + MLP(mid)``:

* **transition** (one model): the sublayer's input against its output, ``x`` vs ``mid``
  (attention) and ``mid`` vs ``out`` (MLP); on the dense model (``<sub>_transition_dense``) and
  on the pruned one (``<sub>_transition_pruned``, each on its own residual stream);
* **local damage** (dense vs pruned on the same input): ``x + Attn_dense(x)`` vs
  ``x + Attn_pruned(x)`` and ``mid + MLP_dense(mid)`` vs ``mid + MLP_pruned(mid)``, with x and mid
  the DENSE model's (``<sub>_local``): each sublayer's own perturbation, without the drift
  accumulated upstream. The pruned model runs one forward in which hooks replace each probed
  block's input by the dense one and its attention update by the dense update (so its MLP reads
  the dense ``mid``), and record what the pruned sublayers return. The hooks are removed on exit;
  no module or weight is changed (activation patching, as TransformerLens does it).

The rows go into the probe table (:data:`prunerep.results.schema.TRANSITION_SUBLAYERS` in the
``sublayer`` column), with every metric of :func:`~prunerep.probes.metrics.geometry` (embedding)
and :func:`~prunerep.probes.metrics.vocab_metrics` (logit, probability) for the spaces probed. The
base of each comparison plays the "dense" role of the metric conventions (Δ = other − base, KL
(p_base ‖ p_other), ``entropy_dense`` = the base's): for a transition the sublayer's input, so
``kl`` = KL(p_in ‖ p_out) and ``reverse_kl`` = KL(p_out ‖ p_in) (the paper's code reports the
latter); for local damage the dense sublayer's output. Contexts: ``prompt`` (mean over the prompt
positions, step −1) and ``teacher_forced`` (per decoding step along the dense continuation).

The lens is ``probe.lens``: ``final_norm`` (the model's final norm, then the LM head, as everywhere
else in the probes) or ``raw`` (the LM head on h without the final norm, which is what the paper's
released code applies, ``lm_head(residual)``). Memory stays bounded: one block and
``token_chunk / 16`` rows of each of the eight states go through the LM head at once.

The dense side is cached with the dense reference (``transitions/<context>/<layer>/{in,attn,mlp}``:
the block's input and the two updates over the whole sequence, which the patched forward needs);
the cache key changes only when transitions are on.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prunerep.model.anatomy import (LENS_ROW_MULTIPLE, decoder_layers, first_output, hooked, lens_rows,
                                     residual_update, with_first_output)
from prunerep.model.placement import input_device, lens_device
from prunerep.probes import metrics as M
from prunerep.probes.capture import capture
from prunerep.probes.contexts import states_forward
from prunerep.probes.plan import ProbePlan
from prunerep.probes.prompts import Prompt
from prunerep.probes.stream import intra_op_threads
from prunerep.probes.table import Rows
from prunerep.results.schema import TRANSITION_CONTEXTS, TRANSITION_SUBLAYERS

#: (sublayer value, base state, other state) of each comparison; states of :func:`_block_states`
PAIRS = (("attn_transition_dense", "in_d", "mid_d"), ("mlp_transition_dense", "mid_d", "out_d"),
         ("attn_transition_pruned", "in_p", "mid_p"), ("mlp_transition_pruned", "mid_p", "out_p"),
         ("attn_local", "mid_d", "loc_attn"), ("mlp_local", "out_d", "loc_mlp"))
STATES = ("in_d", "mid_d", "out_d", "in_p", "mid_p", "out_p", "loc_attn", "loc_mlp")
PREFIX = "transitions"
#: rows of each state per chunk = token_chunk / CHUNK_DIVISOR (8 states through the lens, 6 pairs of
#: logits copied side by side: ~1.25 x token_chunk x vocabulary held at once)
CHUNK_DIVISOR = 16
assert {name for name, _, _ in PAIRS} == set(TRANSITION_SUBLAYERS)


def cache_key_parts(plan: ProbePlan) -> tuple:
    """What the transitions add to the dense reference's key (nothing when they are off, so the
    other entries keep their keys)."""
    return (PREFIX, 1) if plan.transitions else ()


def blocks_of(layers: Sequence[int]) -> list[int]:
    """The table layers with transition rows: every probed layer i >= 1 (block i − 1)."""
    return [i for i in layers if i >= 1]


def _key(context: str, layer: int, part: str) -> str:
    return f"{PREFIX}/{context}/{layer}/{part}"


# --------------------------------------------------------------------------- forwards

def _sequence(ids: Tensor, gen: Tensor | None, context: str) -> tuple[Tensor, slice] | None:
    """The token sequence a context runs and the rows it compares (None: nothing to compare)."""
    if context == "prompt":
        return ids, slice(0, len(ids))
    if gen is None or len(gen) == 0:
        return None
    p, n = len(ids), len(gen)
    return torch.cat([ids.cpu(), gen.cpu()[: n - 1]]), slice(p - 1, p - 1 + n)


@torch.inference_mode()
def sublayer_states(model: nn.Module, seq: Tensor, layers: Sequence[int]) -> dict[int, dict[str, Tensor]]:
    """One forward over ``seq``: per table layer i (block i − 1) its input ``in`` and the attention
    and MLP updates ``attn``, ``mlp``, each ``[len(seq), d]``, on the model's device."""
    wanted = blocks_of(layers)
    with capture(model, sorted({i - 1 for i in wanted} | set(wanted)), ["block", "attn", "mlp"]) as acts:
        states_forward(model, seq)
    return {i: {"in": acts[(i - 1, "block")][0], "attn": acts[(i, "attn")][0], "mlp": acts[(i, "mlp")][0]}
            for i in wanted}


@contextmanager
def patched(model: nn.Module, dense: dict[int, dict[str, Tensor]]) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Hooks for the local-damage forward: for each table layer i in ``dense`` (block i − 1), the
    block's input becomes ``dense[i]["in"]`` and its attention update ``dense[i]["attn"]`` (both
    ``[seq, d]``); yields ``{i: {"attn": ..., "mlp": ...}}``, filled by the next forward with the
    updates the model's own sublayers return on those dense inputs. The hooks only replace values
    in flight; they are removed on exit."""
    blocks = decoder_layers(model)
    device = input_device(model)
    got: dict[int, dict[str, Tensor]] = defaultdict(dict)

    def as_batch(x: Tensor, like: Tensor) -> Tensor:
        return x.to(device=like.device, dtype=like.dtype).reshape(like.shape)

    def block_input(x: Tensor):
        def hook(_module, args, kwargs):
            if args:
                return (as_batch(x, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": as_batch(x, kwargs["hidden_states"])}
        return hook

    def attn_update(i: int, a: Tensor):
        def hook(_module, _inputs, output):
            out = first_output(output)
            got[i]["attn"] = out.detach()[0]
            return with_first_output(output, as_batch(a, out))
        return hook

    def mlp_update(i: int):
        def hook(_module, _inputs, output):
            got[i]["mlp"] = first_output(output).detach()[0]
        return hook

    pre, post = [], []
    for i, states in dense.items():
        block = blocks[i - 1]
        pre.append((block, block_input(states["in"].to(device))))
        post += [(residual_update(block, "attn"), attn_update(i, states["attn"].to(device))),
                 (residual_update(block, "mlp"), mlp_update(i))]
    with hooked(post, pre):
        yield got


@torch.inference_mode()
def local_updates(model: nn.Module, seq: Tensor, dense: dict[int, dict[str, Tensor]]) -> dict[int, dict[str, Tensor]]:
    """The attention and MLP updates of ``model``'s sublayers fed the dense inputs (:func:`patched`)."""
    with patched(model, dense) as got:
        states_forward(model, seq)
    return dict(got)


# --------------------------------------------------------------------------- dense side (cached)

def dense_states(model: nn.Module, ids: Tensor, gen: Tensor | None, layers: Sequence[int],
                 contexts: Sequence[str]) -> dict[str, Tensor]:
    """The dense tensors the transitions need, for the dense reference's file of one prompt:
    ``transitions/<context>/<i>/{in,attn,mlp}`` over the whole sequence of each context."""
    out = {}
    for context in TRANSITION_CONTEXTS:
        run = _sequence(ids, gen, context) if context in contexts else None
        if run is None:
            continue
        for i, parts in sublayer_states(model, run[0], layers).items():
            for part, v in parts.items():
                out[_key(context, i, part)] = v.detach().to("cpu").contiguous().clone()
    return out


# --------------------------------------------------------------------------- the comparison

def _block_states(dense: dict[str, Tensor], pruned: dict[str, Tensor], local: dict[str, Tensor]
                  ) -> dict[str, Tensor]:
    """The eight residual-stream states of one block (rows already selected, one device)."""
    mid_d = dense["in"] + dense["attn"]
    mid_p = pruned["in"] + pruned["attn"]
    return {"in_d": dense["in"], "mid_d": mid_d, "out_d": mid_d + dense["mlp"],
            "in_p": pruned["in"], "mid_p": mid_p, "out_p": mid_p + pruned["mlp"],
            "loc_attn": dense["in"] + local["attn"], "loc_mlp": mid_d + local["mlp"]}


def block_metrics(model: nn.Module, states: dict[str, Tensor], plan: ProbePlan
                  ) -> dict[str, dict[tuple[str, str, float], Tensor]]:
    """Per comparison of :data:`PAIRS`, the per-row metrics ``{(space, metric, T): [n]}`` (float64,
    CPU) of one block's :data:`STATES` (``[n, d]`` each), through the lens ``plan.lens``.

    Rows go :data:`CHUNK_DIVISOR` times fewer than ``token_chunk`` at a time: the eight states of a
    chunk through the lens in one matmul, then the six pairs through ONE
    :func:`~prunerep.probes.metrics.vocab_metrics` call (base rows against other rows), so the
    logits held at once are about 1.25 × ``token_chunk`` × vocabulary, as for the other probes."""
    device = lens_device(model)
    spaces = plan.spaces
    want_z = "logit" in spaces or "probability" in spaces
    out: dict[str, dict[tuple[str, str, float], list[Tensor]]] = {name: defaultdict(list) for name, _, _ in PAIRS}
    n = states["in_d"].shape[0]
    rows = max(LENS_ROW_MULTIPLE, plan.token_chunk // CHUNK_DIVISOR // LENS_ROW_MULTIPLE * LENS_ROW_MULTIPLE)
    for start in range(0, n, rows):
        chunk = {k: v[start:start + rows] for k, v in states.items()}
        m = next(iter(chunk.values())).shape[0]
        if "embedding" in spaces:
            for name, base, other in PAIRS:
                for k, v in M.geometry(chunk[base], chunk[other]).items():
                    out[name][("embedding", k, math.nan)].append(v)
        if not want_z:
            continue
        z = dict(zip(STATES, lens_rows(model, [chunk[s] for s in STATES], plan.lens == "raw")))
        z_base = torch.cat([z[base] for _, base, _ in PAIRS])
        z_other = torch.cat([z[other] for _, _, other in PAIRS])
        del z
        kernel = plan.kernel_on(device)
        with intra_op_threads(plan.metric_threads, device):
            per_row = M.vocab_metrics(z_base, z_other, plan.temperatures, plan.topk, logit="logit" in spaces,
                                      probability="probability" in spaces, compiled=kernel == "compiled",
                                      fused=kernel == "fused")
        del z_base, z_other
        for j, (name, _, _) in enumerate(PAIRS):
            for k, v in per_row.items():
                out[name][k].append(v[j * m:(j + 1) * m])
    return {name: {k: torch.cat(v).to("cpu", torch.float64) for k, v in per.items()} for name, per in out.items()}


@torch.inference_mode()
def compare_prompt(model: nn.Module, plan: ProbePlan, prompt: Prompt, cached: dict[str, Tensor],
                   layers: Sequence[int], rows: Rows) -> None:
    """The transition rows of one prompt (``cached``: its file of the dense reference), added to ``rows``."""
    ids = cached["prompt_ids"]
    gen = cached.get("gen_ids")
    device = lens_device(model)
    for context in TRANSITION_CONTEXTS:
        run = _sequence(ids, gen, context) if context in plan.contexts else None
        if run is None:
            continue
        seq, sel = run
        wanted = blocks_of(layers)
        missing = [i for i in wanted if _key(context, i, "in") not in cached]
        if missing:
            raise ValueError(f"the dense reference was built without transitions (context {context}, layers "
                             f"{missing}); build it with the same probe config as the comparison")
        dense = {i: {part: cached[_key(context, i, part)] for part in ("in", "attn", "mlp")} for i in wanted}
        pruned = sublayer_states(model, seq, layers)
        local = local_updates(model, seq, dense)
        steps = None if context == "prompt" else np.arange(sel.stop - sel.start)

        def pick(parts: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[sel].to(device) for k, v in parts.items()}

        for i in wanted:
            states = _block_states(pick(dense[i]), pick(pruned.pop(i)), pick(local.pop(i)))
            for name, per_row in block_metrics(model, states, plan).items():
                rows.add_metrics(context, prompt, i, name, per_row, steps=steps)
            del states
