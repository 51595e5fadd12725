"""The comparison: the (pruned) model against its dense reference, in every probed space, context,
layer and sublayer, into a :class:`~prunerep.probes.outputs.ProbeResult`.

Logits and probabilities of BOTH sides are recomputed on the fly through the model's own final
norm and LM head (the logit lens), streamed by :class:`~prunerep.probes.stream.LensStream` in
chunks of ``plan.token_chunk`` rows, so no ``[layers × tokens × vocab]`` tensor ever exists: the
extra memory is O(token_chunk × vocab). The lens applies to the residual stream (sublayer
``block``); ``attn``/``mlp`` updates are compared in the embedding space only.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunerep.model.anatomy import final_norm, num_layers
from prunerep.model.placement import lens_device
from prunerep.probes import metrics as M, transitions
from prunerep.probes.capture import resolve_layers
from prunerep.probes.contexts import run_contexts
from prunerep.probes.outputs import ProbeResult
from prunerep.probes.plan import ProbePlan
from prunerep.probes.reference import DenseReference, lens_fingerprint
from prunerep.probes.stream import LensStream, intra_op_threads
from prunerep.probes.table import Rows
from prunerep.probes.top_tokens import empty_table, top_tokens_table
from prunerep.results.schema import TRANSITION_CONTEXTS, empty_probe_table

log = logging.getLogger(__name__)


def embedding_metrics(model: nn.Module, h_dense: Tensor, h_pruned: Tensor, normed: bool = False
                      ) -> dict[tuple[str, str, float], Tensor]:
    """The embedding-space metrics (:func:`~prunerep.probes.metrics.geometry`) of two ``[n, d]``
    state matrices, per row, keyed ``("embedding", metric, nan)``, float64 on the CPU.
    ``normed``: compare the final norm's outputs instead of h (the last layer with
    ``probe.h=normed``)."""
    device = lens_device(model)
    hd, hp = h_dense.to(device), h_pruned.to(device)
    with torch.inference_mode(), intra_op_threads(1, device):  # [n, d] ops: too small to gain from threads
        if normed:
            norm = final_norm(model)
            hd, hp = norm(hd), norm(hp)
        return {("embedding", m, math.nan): v.to("cpu", torch.float64) for m, v in M.geometry(hd, hp).items()}


def _check_compatible(ref: DenseReference, p: ProbePlan, layers: list[int]) -> None:
    missing = {"contexts": [c for c in p.contexts if c not in ref.contexts],
               "sublayers": [s for s in p.sublayers if s not in ref.sublayers],
               "layers": [i for i in layers if i not in ref.layers]}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        raise ValueError(f"the dense reference was built without {missing}; build it with the same "
                         f"probe config as the comparison")


def compare_to_reference(model: nn.Module, tokenizer, p: ProbePlan, ref: DenseReference) -> ProbeResult:
    """Compare the (pruned) ``model`` with the cached dense reference: the probe table, the
    top-token table and which h was compared."""
    if p.empty or ref.empty:
        return ProbeResult(empty_probe_table(), empty_table(), p.h)
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
    # the last layer's states and the logits at P − 1 that the top-token table asks for again: kept
    # here for this comparison only (the model does not change in between)
    memo: dict = {}
    df = _residual_stream_table(model, p, ref, layers, memo)
    if p.transitions and set(p.contexts) & set(TRANSITION_CONTEXTS):
        rows = Rows()
        for prompt in tqdm(ref.prompts, desc="probe: transitions", unit="prompt", leave=False):
            transitions.compare_prompt(model, p, prompt, ref.load(prompt.id), ref.layers, rows)
        df = pd.concat([df, rows.frame()], ignore_index=True)
    result = ProbeResult(df, top_tokens_table(model, tokenizer, p, ref, memo), p.h)
    warn_nonfinite(df)
    return result


def _residual_stream_table(model: nn.Module, p: ProbePlan, ref: DenseReference, layers: list[int],
                           memo: dict) -> pd.DataFrame:
    """The rows of every sublayer of :data:`~prunerep.results.schema.SUBLAYERS`, in every context."""
    n_layers = ref.n_layers
    want_options = "probability" in p.spaces and "block" in p.sublayers
    normed = n_layers if p.h == "normed" else None
    vocab = "logit" in p.spaces or "probability" in p.spaces
    keep_top = p.top_tokens > 0 and "probability" in p.spaces
    rows = Rows()
    stream = LensStream(model, p, memo)  # every lens row of every prompt, in full chunks

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

    for prompt in tqdm(ref.prompts, desc="probe: compare", unit="prompt", leave=False):
        cached = ref.load(prompt.id)
        ids = cached["prompt_ids"]
        keep = keep_top  # this prompt's top-token row is still to be kept
        gen = cached.get("gen_ids")
        gen = gen if gen is not None and len(gen) else None
        got = run_contexts(model, ids, layers, p.sublayers, prompt="prompt" in p.contexts,
                           decode_steps=len(gen) if gen is not None and "free_running" in p.contexts else 0,
                           teacher_forced=gen is not None and "teacher_forced" in p.contexts, forced=gen, memo=memo)
        if got.prompt is not None:
            mc = prompt.kind == "mc" and want_options and bool(prompt.option_ids)
            context_rows("prompt", prompt, cached, got.prompt, np.arange(len(ids)),
                         options=prompt.option_ids if mc else None, answer=len(ids) - 1,
                         keep_layer_row=(n_layers, len(ids) - 1) if keep else None)
            keep = keep and "block" not in p.sublayers  # kept above
        if gen is not None:
            steps = np.arange(len(gen))
            if got.teacher_forced is not None:
                context_rows("teacher_forced", prompt, cached, got.teacher_forced, steps,
                             keep_layer_row=(n_layers, 0) if keep else None)
                keep = False
            if got.free_running is not None:
                traj = got.free_running  # exactly as many steps as the dense model
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
                    rows.add("free_running", pr, n_layers, "block", "tokens", "token_agree", math.nan, st, agree)
                    rows.add("free_running", pr, n_layers, "block", "tokens", "first_divergence", math.nan, -1, first)
                    rows.add("free_running", pr, n_layers, "block", "tokens", "diverged", math.nan, -1,
                             float(first < n))
                stream.then(tokens)
        stream.release()  # the pending rows are copied: this prompt's states can go
    stream.flush()
    return rows.frame()


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
