"""Perplexity, dense vs pruned: lower is better.

Two protocols (``task.ppl_protocol``), on the same text:

* ``lm_eval`` (default) -- lm-eval's ``loglikelihood_rolling``: each document scored on its
  own with rolling windows of the model's maximum length (lm-eval's ``wikitext`` task on the
  Hub, prunerep's ``pydoc_ppl`` offline). The entry's score is TOKEN perplexity
  ``exp(-sum log p / #tokens)`` (tokens as HFLM encodes the document: no special tokens),
  recomputed from lm-eval's per-document log-likelihoods (:func:`rolling_summary`); word and
  byte perplexity (lm-eval's own metrics) ride along in ``metrics``.
* ``reference`` -- ``eval_ppl`` of the Wanda (``lib/eval.py: eval_ppl_wikitext``) and SparseGPT
  code: the documents joined with ``"\\n\\n"`` and tokenised ONCE (the tokenizer's default special
  tokens, i.e. one BOS at the very start for LLaMA), cut into ``n = #tokens // seqlen``
  NON-overlapping windows of ``seqlen`` tokens (the tail is dropped), every window scored from
  its own start (its first token is context only), ``ppl = exp(mean NLL over the n * (seqlen-1)
  predicted tokens)``. ``seqlen`` is ``task.ppl_seqlen``, default the model's
  ``max_position_embeddings`` (what those repositories use: 2048 for OPT / LLaMA-1, 4096 for
  LLaMA-2). The published WikiText-2 numbers (Wanda README, LLaMA-2-7B: dense 5.12, Wanda 50%
  6.42; SparseGPT's tables) are THIS protocol on ``wikitext-2-raw-v1``'s test split; lm-eval's
  ``wikitext`` (document-level rolling, word perplexity) gives different, larger numbers.

Offline text (``pydoc_ppl``): :func:`prunerep.evals.offline.pydoc_eval_docs`.

``chance`` of a perplexity entry is the vocabulary size (a uniform next-token distribution),
so ``retained_above_chance`` can be measured in log space (:mod:`prunerep.evals.compare`).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import torch

from prunerep.calibration import load_hub_dataset
from prunerep.config import TaskConfig
from prunerep.evals.compare import finite_or_none
from prunerep.evals.offline import pydoc_eval_docs
from prunerep.evals.taskspec import LM_EVAL, PERPLEXITY, REFERENCE_PPL, TASKS
from prunerep.model.placement import input_device

log = logging.getLogger(__name__)

TOKEN_PPL = "token_perplexity"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"  # of the reference protocol's dataset (the registry's wikitext)


# --------------------------------------------------------------------------- reference protocol

def wikitext_reference_text() -> str:
    """WikiText-2 (raw) test split joined with ``"\\n\\n"``, as Wanda / SparseGPT build it (Hub)."""
    return "\n\n".join(load_hub_dataset(TASKS["wikitext"].reference_dataset, WIKITEXT_CONFIG, split="test")["text"])


def model_seqlen(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


@torch.no_grad()
def reference_nll(model, token_ids: Sequence[int] | torch.Tensor, seqlen: int) -> dict[str, Any]:
    """Wanda's / SparseGPT's ``eval_ppl`` over ``token_ids``: ``#tokens // seqlen`` non-overlapping
    windows, batch 1, each window's mean next-token NLL. Returns the per-window mean NLLs and
    ``ppl = exp(mean over windows)`` (= exp(mean NLL per predicted token): every window predicts
    ``seqlen - 1`` tokens)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    seqlen = int(seqlen)
    if seqlen < 2:
        raise ValueError(f"ppl_seqlen={seqlen} must be >= 2")
    n = ids.numel() // seqlen
    if n < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of ppl_seqlen={seqlen}")
    device = input_device(model)
    window_nll = []
    for i in range(n):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        window_nll.append(float(torch.nn.functional.cross_entropy(logits, x[0, 1:])))
    mean = sum(window_nll) / n
    return {"ppl": math.exp(mean), "nll_per_token": mean, "window_nll": window_nll, "n_windows": n,
            "seqlen": seqlen, "n_tokens_text": int(ids.numel()), "n_tokens_scored": n * (seqlen - 1),
            "n_tokens_dropped": int(ids.numel() - n * seqlen)}


def _ppl_stderr(ppl: float, per_unit_nll: list[float], weights: list[float] | None = None) -> float | None:
    """Delta-method stderr of ``ppl = exp(L)``, L the (weighted) mean NLL, treating the units
    (windows or documents) as independent: se(ppl) = ppl * se(L) (ratio estimator for weights)."""
    n = len(per_unit_nll)
    if n < 2:
        return None
    w = weights or [1.0] * n
    tot = sum(w)
    mean = sum(x * wi for x, wi in zip(per_unit_nll, w)) / tot
    wbar = tot / n
    var = sum((wi * (x - mean)) ** 2 for x, wi in zip(per_unit_nll, w)) / (n - 1) / (n * wbar ** 2)
    return ppl * math.sqrt(var)


def reference_entry(model, tokenizer, text: str, seqlen: int | None, source: str) -> dict:
    """The reference-protocol perplexity of ``text`` as an :func:`prunerep.evals.evaluate_model` entry."""
    t0 = time.perf_counter()
    ids = tokenizer(text)["input_ids"]  # default special tokens, as the reference code
    res = reference_nll(model, ids, int(seqlen or model_seqlen(model)))
    vocab = _vocab_size(model, tokenizer)
    return {
        "type": PERPLEXITY, "metric": TOKEN_PPL, "filter": "none", "protocol": REFERENCE_PPL,
        "score": res["ppl"], "stderr": _ppl_stderr(res["ppl"], res["window_nll"]),
        "n": res["n_windows"], "num_fewshot": 0, "higher_is_better": False, "chance": float(vocab),
        "metrics": {TOKEN_PPL: res["ppl"], "nll_per_token": res["nll_per_token"]},
        "all_metrics": {TOKEN_PPL: res["ppl"]},
        "windows": {k: res[k] for k in ("n_windows", "seqlen", "n_tokens_text", "n_tokens_scored",
                                        "n_tokens_dropped")},
        "source": source, "eval_seconds": round(time.perf_counter() - t0, 2),
    }


def _vocab_size(model, tokenizer) -> int:
    out = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(out) if out else len(tokenizer)


def run_reference(name: str, model, tokenizer, task: TaskConfig) -> dict:
    """``pydoc_ppl`` or ``wikitext`` under the reference protocol."""
    if name == "pydoc_ppl":
        docs = pydoc_eval_docs(task.ppl_chars)
        if task.limit is not None:
            docs = docs[: int(task.limit)]
        text, source = "\n\n".join(docs), "pydoc_data.topics (held out of calibration)"
    elif name == "wikitext":
        text, source = wikitext_reference_text(), f"{TASKS[name].reference_dataset}/{WIKITEXT_CONFIG} test"
    else:
        raise KeyError(f"no perplexity task {name!r}")
    entry = reference_entry(model, tokenizer, text, task.ppl_seqlen, source)
    log.info("%s (reference protocol): token perplexity %.3f over %d windows of %d tokens, %.1fs", name,
             entry["score"], entry["n"], entry["windows"]["seqlen"], entry["eval_seconds"])
    return entry


# --------------------------------------------------------------------------- lm-eval protocol

def rolling_summary(samples: list[dict], tokenizer) -> dict[str, Any] | None:
    """Token perplexity from lm-eval's logged ``loglikelihood_rolling`` samples: each sample's
    log-likelihood over its document's tokens (the document re-tokenised as HFLM does, no
    special tokens). None when the samples do not carry the document or its log-likelihood."""
    lls, ntoks = [], []
    for s in samples:
        args = s.get("arguments") or []
        text = args[0][0] if args and isinstance(args[0], (list, tuple)) and args[0] else s.get("target")
        resp = (s.get("filtered_resps") or [None])[0]
        if isinstance(resp, (list, tuple)):
            resp = resp[0] if resp else None
        ll = finite_or_none(resp)
        if ll is None or not isinstance(text, str):
            return None
        lls.append(ll)
        ntoks.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    if not lls or sum(ntoks) == 0:
        return None
    nll = -sum(lls) / sum(ntoks)
    ppl = math.exp(nll)
    per_doc = [-ll / max(1, n) for ll, n in zip(lls, ntoks)]
    return {"ppl": ppl, "nll_per_token": nll, "n_tokens": sum(ntoks), "n_docs": len(lls),
            "stderr": _ppl_stderr(ppl, per_doc, [float(n) for n in ntoks])}


def rolling_entry(entry: dict, result: dict, samples: list[dict], tokenizer) -> dict:
    """Complete the summary ``entry`` of an lm-eval ``loglikelihood_rolling`` task (in place):
    lower is better, token perplexity as the score (:func:`rolling_summary`), lm-eval's word /
    byte perplexity in ``metrics``; word perplexity is the score when token counts are unavailable."""
    metrics = {m: v for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")
               if (v := finite_or_none(result.get(f"{m},none"))) is not None}
    summary = rolling_summary(samples, tokenizer) if tokenizer is not None else None
    entry.update(higher_is_better=False, protocol=LM_EVAL)
    if summary is not None:
        metrics = {TOKEN_PPL: summary["ppl"], **metrics, "nll_per_token": summary["nll_per_token"],
                   "n_tokens": summary["n_tokens"]}
        entry.update(metric=TOKEN_PPL, filter="none", score=summary["ppl"], stderr=summary["stderr"],
                     chance=float(len(tokenizer)))
    elif "word_perplexity" in metrics:
        entry.update(metric="word_perplexity", filter="none", score=metrics["word_perplexity"], stderr=None)
    entry["metrics"] = metrics
    return entry
