"""The dense model's top tokens next to the pruned model's probabilities for them (the paper's
top-token figure): at each multiple-choice answer position and at the first decoding step of each
generative prompt (both the last prompt position, P − 1), the dense top-k tokens (``probe.top_tokens``,
default 30) in the dense order, with p_dense and p_pruned at every probed temperature.

Both sides are the models' own next-token distributions: the final layer through the final norm and
the LM head (the logit lens at the last layer), whatever ``probe.lens`` says. The dense state comes
from the dense reference (the prompt context's last position; else the first teacher-forced or
free-running step); the pruned one from one forward of the pruned model over the same tokens.

The table (:data:`COLUMNS`) is the ``top_tokens`` of :class:`~prunerep.probes.outputs.ProbeResult`,
written as ``top_tokens.parquet`` with the plot ``probes_top_tokens.png``.
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from prunerep.model.placement import lens_device
from prunerep.probes.contexts import prompt_states, teacher_forced_states
from prunerep.probes.plan import ProbePlan
from prunerep.probes.reference import DenseReference
from prunerep.probes.stream import lens_pair

COLUMNS = ["prompt_id", "prompt_kind", "where", "position", "rank", "token_id", "token", "temperature", "p_dense",
           "p_pruned"]
DTYPES = {"prompt_id": "int32", "prompt_kind": "object", "where": "object", "position": "int32", "rank": "int16",
          "token_id": "int64", "token": "object", "temperature": "float64", "p_dense": "float64",
          "p_pruned": "float64"}
#: ``where``: the MC answer position, or the first decoding step of a generative prompt
WHERE = {"mc": "answer", "gen": "first_step"}


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=DTYPES[c]) for c in COLUMNS})


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return str(tokenizer.decode([token_id]))
    except Exception:  # a tokenizer that cannot decode one id alone
        return str(token_id)


def top_probabilities(z_dense: Tensor, z_pruned: Tensor, k: int, temperatures) -> tuple[Tensor, dict]:
    """The dense top-k token ids of one ``[V]`` logit row (descending; k capped at V) and, per
    temperature, ``(p_dense, p_pruned)`` of those tokens (float64 softmax of z/T over the vocabulary)."""
    zd, zp = z_dense.double(), z_pruned.double()
    ids = zd.topk(min(k, zd.shape[-1])).indices
    probs = {}
    for t in temperatures:
        probs[float(t)] = (torch.softmax(zd / t, -1)[ids], torch.softmax(zp / t, -1)[ids])
    return ids, probs


def _dense_state(cached: dict[str, Tensor], n_layers: int) -> tuple[str, Tensor] | None:
    """Where the dense last-layer state at position P − 1 comes from, and the state."""
    for source, key, row in (("prompt", f"prompt/{n_layers}/block", -1),
                             ("teacher_forced", f"teacher_forced/{n_layers}/block", 0),
                             ("free_running", "free_running/h_last", 0)):
        t = cached.get(key)
        if t is not None and len(t):
            return source, t[row]
    return None


@torch.inference_mode()
def top_tokens_table(model: nn.Module, tokenizer, plan: ProbePlan, ref: DenseReference, memo: dict | None = None
                     ) -> pd.DataFrame:
    """The top-token table of every prompt of ``ref`` against ``model`` (the pruned model); the
    pruned states and logits the comparison kept in ``memo`` (:mod:`.contexts`, :mod:`.stream`)
    are not computed again."""
    if plan.top_tokens <= 0 or "probability" not in plan.spaces or not plan.temperatures:
        return empty_table()
    n_layers = ref.n_layers
    device = lens_device(model)
    rows = []
    for prompt in ref.prompts:
        cached = ref.load(prompt.id)
        found = _dense_state(cached, n_layers)
        if found is None:
            continue
        source, hd = found
        ids = cached["prompt_ids"]
        if source == "teacher_forced":
            states, row = teacher_forced_states(model, ids, cached["gen_ids"], [n_layers], ["block"], memo), 0
        else:
            states, row = prompt_states(model, ids, [n_layers], ["block"], memo), -1
        hp = states[(n_layers, "block")][row]
        zd, zp = lens_pair(model, hd.to(device).unsqueeze(0), hp.to(device).unsqueeze(0), memo)
        top, probs = top_probabilities(zd[0], zp[0], plan.top_tokens, plan.temperatures)
        top = top.cpu().tolist()
        tokens = [_token_text(tokenizer, t) for t in top]
        for t, (pd_, pp_) in probs.items():
            for rank, (tid, tok, a, b) in enumerate(zip(top, tokens, pd_.tolist(), pp_.tolist())):
                rows.append((prompt.id, prompt.kind, WHERE.get(prompt.kind, prompt.kind), len(ids) - 1, rank, tid, tok,
                             t, a, b))
    if not rows:
        return empty_table()
    return pd.DataFrame(rows, columns=COLUMNS).astype({c: t for c, t in DTYPES.items() if t != "object"})
