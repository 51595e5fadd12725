"""The item probes: the representation measures of each evaluated item, beside its outcome.

The items are the evaluation's own documents, the requests lm-eval sent for them (the dense
entries' ``items``: :func:`prunerep.evals.harness.item_requests`), the first ``probe.n_items`` per
task. Their answer position is the context's last token: the position whose next-token
distribution a multiple-choice option's first token, or a generation's first token, is read from.

* **Multiple choice** (lettered and cloze): the option distribution, the option log-likelihoods
  lm-eval summed over each option's tokens, normalised (softmax): exactly what decides the pick.
  Dense against pruned: ``options_kl``, ``options_top1_agree``, ``options_one_minus_cos``; beside it
  the full vocabulary at the answer position, ``answer_kl``, ``answer_top1_agree``,
  ``answer_one_minus_cos``; and h (the residual stream) and z (the centred lens logits) there, at
  every probed layer (``h_one_minus_cos_by_layer``, ``z_one_minus_cos_centred_by_layer``) and at
  the last one.
* **Generative**: the same at the answer position (the first generated token: the prompt's
  KL), ``teacher_forced_kl`` (the mean over the dense generation's tokens, final layer, both models
  fed the dense continuation) and ``first_divergence`` (the common prefix of the two generations,
  in tokens; ``diverged``).
* **Retrieval**: each query's ``embedding_one_minus_cos`` (its dense and pruned embeddings).

The outcome columns are the task's per-item scores (:func:`prunerep.evals.compare.item_scores`):
``dense_score``, ``pruned_score`` (1/0 for multiple choice and exact match, nDCG@10 for a query),
and ``lost``: right dense (score 1), not right pruned. The table's schema is
:data:`prunerep.results.schema.ITEM_COLUMNS`.

Bounds: ``probe.n_items`` items per task, contexts cut to their last ``probe.max_prompt_tokens``
tokens, generations to ``probe.max_new_tokens``; one forward per item and side, the probed layers
(block only) read at the answer position; for a generative item that forward runs over the context
and the dense generation (teacher-forced), whose steps are read at the last layer. The
dense side (hidden states at those positions only) is cached on disk, keyed by the dense model and
the items, so a sweep computes it once.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunerep.evals.compare import common_prefix_len, item_scores
from prunerep.evals.retrieval import unpack_embeddings
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL
from prunerep.model.anatomy import lens_rows, num_layers
from prunerep.model.placement import lens_device
from prunerep.probes.capture import resolve_layers
from prunerep.probes.contexts import prompt_states, teacher_forced_states
from prunerep.probes.metrics import geometry, option_metrics, vocab_metrics
from prunerep.probes.plan import ProbePlan
from prunerep.probes.prompts import context_ids, scored_requests
from prunerep.probes.reference import derived_model_key, weights_fingerprint
from prunerep.results.schema import ITEM_COLUMNS, ITEM_DTYPES, ITEM_LIST_COLUMNS, reference_temperature
from prunerep.results.store import (CacheInvalid, atomic_write_checked_bytes, cache_lock, read_checked_json,
                                    sha256_file, stable_hash, write_checked_json)

log = logging.getLogger(__name__)

#: bump when what the dense item cache holds changes
ITEMS_CACHE_VERSION = 1


@dataclass(frozen=True)
class ItemRequest:
    task: str
    item: str  # the item's key in the task's per-item scores, as a string
    family: str
    ids: tuple[int, ...]  # the context's tokens (its last max_prompt_tokens)
    gen_ids: tuple[int, ...] = ()  # generative: the dense generation's tokens


@dataclass
class DenseItems:
    """The dense side of the item probes: the requests and, per request, the hidden states at the
    answer position ``[layers, d]`` and (generative) the last layer's at the teacher-forced steps."""

    requests: list[ItemRequest] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    answer: list[Tensor] = field(default_factory=list)
    steps: list[Tensor | None] = field(default_factory=list)


def _item_key(rec: dict, several: bool) -> str:
    return f"{rec['task']}:{rec['doc_id']}" if several else str(int(rec["doc_id"]))


def item_requests(tokenizer, dense_scores: dict, p: ProbePlan) -> list[ItemRequest]:
    """The first ``p.n_items`` items of every multiple-choice and generative task of the dense
    entries that kept their requests, tokenised as lm-eval does (no special tokens added)."""
    out = []
    for name, family, recs, several in scored_requests(dense_scores):
        gens = {(g.get("task", name), int(g["doc_id"])): g for g in dense_scores[name].get("generations") or []}
        for rec in recs[: p.n_items]:
            ids = context_ids(tokenizer, rec["context"], p.max_prompt_tokens)
            if not ids:
                continue
            gen_ids: tuple[int, ...] = ()
            if family == GENERATIVE:
                g = gens.get((rec["task"] if several else name, int(rec["doc_id"]))) or {}
                gen_ids = tuple(int(t) for t in (g.get("tokens") or [])[: p.max_new_tokens])
            out.append(ItemRequest(name, _item_key(rec, several), family, ids, gen_ids))
    return out


def _states(model: nn.Module, req: ItemRequest, layers: list[int]) -> tuple[Tensor, Tensor | None]:
    """The hidden states at the answer position ``[layers, d]`` and, for a generation, the last
    layer's at its teacher-forced steps ``[n, d]``: one forward (the teacher-forced sequence starts
    with the answer position; a causal model's state there does not see what follows)."""
    ids = torch.tensor(req.ids)
    if req.gen_ids:
        states = teacher_forced_states(model, ids, torch.tensor(req.gen_ids), layers, ("block",))
        answer = torch.stack([states[(la, "block")][0] for la in layers])
        return answer.float().cpu(), states[(layers[-1], "block")].float().cpu()
    states = prompt_states(model, ids, layers, ("block",))
    return torch.stack([states[(la, "block")][-1] for la in layers]).float().cpu(), None


@torch.inference_mode()
def dense_items(model: nn.Module, tokenizer, p: ProbePlan, dense_scores: dict, cache_dir=None,
                model_key: str | None = None) -> DenseItems:
    """The dense model's side of the item probes (empty when the plan probes nothing or
    ``probe.n_items`` is 0), cached in ``<cache_dir>/items/<key>.safetensors`` when ``cache_dir``
    is given. The key covers the dense model (``model_key`` and a weight sample), the items' token
    ids and the layers; the file's sha256 is kept beside it (``<key>.json``), and an entry that does
    not match it is computed again."""
    if p.empty or p.n_items < 1:
        return DenseItems()
    requests = item_requests(tokenizer, dense_scores, p)
    layers = resolve_layers(p.layers, num_layers(model))
    if not requests:
        return DenseItems(requests, layers)
    if cache_dir is None:
        return _compute(model, requests, layers)
    key = stable_hash(ITEMS_CACHE_VERSION, model_key or derived_model_key(model), weights_fingerprint(model),
                      [dataclasses.astuple(r) for r in requests], layers, str(next(model.parameters()).dtype))
    path = Path(os.path.expanduser(str(cache_dir))) / "items" / f"{key}.safetensors"
    got = _read(path, requests, layers)
    if got is not None:
        log.info("item probes: the dense side of %d items from %s", len(requests), path)
        return got
    with cache_lock(path, what=f"dense item states {key}"):
        got = _read(path, requests, layers)  # another process may have written it meanwhile
        if got is not None:
            return got
        dense = _compute(model, requests, layers)
        tensors = {f"answer/{i}": a.contiguous() for i, a in enumerate(dense.answer)}
        tensors.update({f"steps/{i}": s.contiguous() for i, s in enumerate(dense.steps) if s is not None})
        digest = atomic_write_checked_bytes(path, save(tensors))
        write_checked_json(path.with_suffix(".json"), {"sha256": digest, "n_items": len(requests)})
    return dense


def _compute(model: nn.Module, requests: list[ItemRequest], layers: list[int]) -> DenseItems:
    got = [_states(model, r, layers) for r in tqdm(requests, desc="probe: dense items", unit="item", leave=False)]
    return DenseItems(requests, layers, [a for a, _ in got], [s for _, s in got])


def _read(path: Path, requests: list[ItemRequest], layers: list[int]) -> DenseItems | None:
    """The cached dense side, or None where there is none or it does not match its sha256."""
    try:
        want = read_checked_json(path.with_suffix(".json"))["sha256"]
        if sha256_file(path) != want:
            raise CacheInvalid("does not match its sha256")
        tensors = load_file(str(path))
    except FileNotFoundError:
        return None
    except (OSError, CacheInvalid, KeyError, TypeError) as e:
        log.warning("dense item states %s are not intact (%s): computing them again", path, e)
        return None
    return DenseItems(requests, layers, [tensors[f"answer/{i}"] for i in range(len(requests))],
                      [tensors.get(f"steps/{i}") for i in range(len(requests))])


def _lens(model: nn.Module, *states: Tensor) -> list[Tensor]:
    dtype = next(model.parameters()).dtype  # a meta (offloaded) weight still has its dtype
    device = lens_device(model)
    return [z.float().cpu() for z in lens_rows(model, [s.to(device=device, dtype=dtype) for s in states])]


@torch.inference_mode()
def compare_items(model: nn.Module, dense: DenseItems, p: ProbePlan) -> pd.DataFrame:
    """The (pruned) ``model`` against the dense side, per item: the measures of the module
    docstring that need the models (the option distribution and the outcomes are joined by
    :func:`item_table`). One row per request."""
    t = reference_temperature(p.temperatures) if p.temperatures else 1.0
    t = 1.0 if t != t else t
    kernel = p.kernel_on(torch.device("cpu"))  # the lens rows come back to the CPU (_lens)
    metrics = partial(vocab_metrics, temperatures=(t,), topk=(), compiled=kernel == "compiled", fused=kernel == "fused")
    rows = []
    for req, hd, sd in zip(dense.requests, dense.answer, dense.steps):
        hp, sp = _states(model, req, dense.layers)
        zd, zp = _lens(model, hd, hp)
        h_geo, z_geo = geometry(hd, hp), metrics(zd, zp, probability=False)
        final = metrics(zd[-1:], zp[-1:], logit=False)
        row = {"task": req.task, "item": req.item, "family": req.family, "layers": list(dense.layers),
               "h_one_minus_cos_by_layer": h_geo["one_minus_cos"].tolist(),
               "z_one_minus_cos_centred_by_layer": z_geo[("logit", "one_minus_cos_centred", math.nan)].tolist(),
               "answer_kl": float(final[("probability", "kl", t)][0]),
               "answer_top1_agree": float(final[("probability", "top1_agree", math.nan)][0]),
               "answer_one_minus_cos": float(final[("probability", "one_minus_cos", t)][0])}
        row["h_one_minus_cos"] = row["h_one_minus_cos_by_layer"][-1]
        row["z_one_minus_cos_centred"] = row["z_one_minus_cos_centred_by_layer"][-1]
        if sd is not None:
            zsd, zsp = _lens(model, sd, sp)
            kl = metrics(zsd, zsp, logit=False)[("probability", "kl", t)]
            row["teacher_forced_kl"] = float(kl.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _options(dense_rec: dict | None, pruned_rec: dict | None) -> dict:
    """The option distribution (the option log-likelihoods, normalised) dense vs pruned."""
    if not dense_rec or not pruned_rec or len(dense_rec.get("lls") or []) != len(pruned_rec.get("lls") or []):
        return {}
    k = len(dense_rec["lls"])
    ld = torch.tensor([dense_rec["lls"]], dtype=torch.float64)
    lp = torch.tensor([pruned_rec["lls"]], dtype=torch.float64)
    m = option_metrics(ld, lp, range(k))
    cos = geometry(torch.softmax(ld, -1), torch.softmax(lp, -1))["one_minus_cos"]
    return {"options_kl": float(m["kl"][0]), "options_top1_agree": float(m["top1_agree"][0]),
            "options_one_minus_cos": float(cos[0])}


def _requests_by_item(entry: dict | None) -> dict[str, dict]:
    recs = (entry or {}).get("items") or []
    several = len({r["task"] for r in recs}) > 1
    return {_item_key(r, several): r for r in recs}


def _generation_divergence(dense: dict | None, pruned: dict | None) -> dict[str, dict]:
    def by_item(entry):
        gens = (entry or {}).get("generations") or []
        return {f"{g['task']}:{g['doc_id']}" if "task" in g else str(int(g["doc_id"])): g for g in gens}
    d, p = by_item(dense), by_item(pruned)
    out = {}
    for key in d.keys() & p.keys():
        td, tp = list(d[key].get("tokens") or []), list(p[key].get("tokens") or [])
        out[key] = {"first_divergence": float(common_prefix_len(td, tp)), "diverged": float(td != tp)}
    return out


def _query_drift(dense: dict | None, pruned: dict | None) -> list[float]:
    """1 − cos of each query's dense and pruned embedding (the stored queries come first)."""
    bd, bp = (dense or {}).get("embeddings"), (pruned or {}).get("embeddings")
    if not bd or not bp or bd.get("texts") != bp.get("texts") or bd.get("shape") != bp.get("shape"):
        return []
    n = int(bd.get("n_queries") or 0)
    a, b = unpack_embeddings(bd)[:n].double(), unpack_embeddings(bp)[:n].double()
    return geometry(a, b)["one_minus_cos"].tolist()


def item_table(measures: pd.DataFrame | None, dense_scores: dict, pruned_scores: dict) -> pd.DataFrame:
    """items.parquet: one row per evaluated item of every multiple-choice, generative and
    retrieval task, its outcome dense and pruned beside its measures (:data:`ITEM_COLUMNS`; a
    measure the item has not is NaN)."""
    probed = {} if measures is None or measures.empty else \
        {(r["task"], r["item"]): r for r in measures.to_dict("records")}
    rows = []
    for name, d in (dense_scores or {}).items():
        pr = (pruned_scores or {}).get(name)
        family = d.get("type")
        if family not in (MULTIPLE_CHOICE, GENERATIVE, RETRIEVAL) or d.get("skipped") or not pr or pr.get("skipped"):
            continue
        ds, ps = item_scores(d), item_scores(pr)
        reqs_d, reqs_p = _requests_by_item(d), _requests_by_item(pr)
        div = _generation_divergence(d, pr) if family == GENERATIVE else {}
        drift = _query_drift(d, pr) if family == RETRIEVAL else []
        for key in sorted(ds.keys() & ps.keys(), key=lambda k: (isinstance(k, str), k)):
            item = str(key)
            row = {"task": name, "item": item, "family": family, "dense_score": ds[key], "pruned_score": ps[key],
                   "lost": ds[key] == 1.0 and ps[key] != 1.0}
            row.update(probed.get((name, item), {}))
            if family == MULTIPLE_CHOICE:
                row.update(_options(reqs_d.get(item), reqs_p.get(item)))
            row.update(div.get(item, {}))
            if family == RETRIEVAL and isinstance(key, int) and key < len(drift):
                row["embedding_one_minus_cos"] = drift[key]
            rows.append(row)
    df = pd.DataFrame(rows).reindex(columns=list(ITEM_COLUMNS))
    for c in ITEM_LIST_COLUMNS:  # an item without the layer measures (not probed, retrieval): none
        df[c] = [v if isinstance(v, list) else None for v in df[c]]
    return df.astype({c: t for c, t in ITEM_DTYPES.items() if t != "object"})
