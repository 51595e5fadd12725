"""Dense vs pruned per item: each task's documents (retrieval: queries) side by side, what each
model answered and whether it was right -- ``eval_items.parquet`` and the W&B table ``eval/items``.

Read from the entries :func:`prunerep.evals.evaluate_model` returns, nothing is recomputed:

* multiple choice: the option each side picked (``option_picks.docs``: the argmax lm-eval scores),
  as its label (the letter, or ``#k`` when the documents' options differ), against the gold one;
* generative: the raw generation, the answer extracted from it and the per-document metric
  (correct: the metric is 1, as lm-eval's exact match / pass@1 count it);
* retrieval: the query's headline metric (nDCG@10) and whether the first passage ranked is a
  relevant one (recall@1), when the entry keeps its per-query values;
* perplexity keeps no per-document outcome: no rows.

One row per (task, subtask, doc_id) present on either side (:data:`COLUMNS`); a side without the
item has nulls.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from prunerep.evals.compare import finite_or_none
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL

#: eval_items.parquet's columns, in order
COLUMNS = ["task", "subtask", "type", "metric", "doc_id", "target", "dense_answer", "pruned_answer",
           "dense_correct", "pruned_correct", "dense_value", "pruned_value", "dense_generation", "pruned_generation",
           "same_answer"]
SIDES = ("dense", "pruned")


def _mc_items(name: str, entry: dict) -> dict[tuple, dict]:
    picks = entry.get("option_picks") or {}
    labels = picks.get("labels") or []

    def label(i):
        return labels[i] if i is not None and 0 <= i < len(labels) else (None if i is None else f"#{i + 1}")

    return {(task, int(doc)): {"target": label(gold), "answer": label(pick),
                               "correct": None if gold is None else pick == gold,
                               "value": None if gold is None else float(pick == gold)}
            for task, doc, pick, gold in picks.get("docs") or []}


def _gen_items(name: str, entry: dict) -> dict[tuple, dict]:
    metric = entry.get("metric")
    out = {}
    for g in entry.get("generations") or []:
        v = finite_or_none(g.get(metric))
        out[(g.get("task", name), int(g["doc_id"]))] = {
            "target": None if g.get("target") is None else str(g["target"]),
            "answer": None if g.get("extracted") is None else str(g["extracted"]),
            "generation": g.get("text"), "value": v, "correct": None if v is None else v == 1.0}
    return out


def _retrieval_items(name: str, entry: dict) -> dict[tuple, dict]:
    per_query = entry.get("per_query") or {}
    values, top1 = per_query.get(entry.get("metric")) or [], per_query.get("recall@1")
    return {(name, i): {"value": float(v), "correct": None if top1 is None else top1[i] == 1.0}
            for i, v in enumerate(values)}


_ITEMS = {MULTIPLE_CHOICE: _mc_items, GENERATIVE: _gen_items, RETRIEVAL: _retrieval_items}


def item_table(dense: dict, pruned: dict) -> pd.DataFrame:
    """Every task's items, dense vs pruned (:data:`COLUMNS`), in task order, then subtask and doc id."""
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys([*(dense or {}), *(pruned or {})]):
        entries = {side: (scores or {}).get(name) or {} for side, scores in zip(SIDES, (dense, pruned))}
        ref = entries["dense"] or entries["pruned"]
        items = _ITEMS.get(ref.get("type"))
        if items is None or any(e.get("skipped") for e in entries.values()):
            continue
        got = {side: items(name, e) if e else {} for side, e in entries.items()}
        for key in sorted(set(got["dense"]) | set(got["pruned"])):
            d, p = got["dense"].get(key, {}), got["pruned"].get(key, {})
            row = {"task": name, "subtask": key[0], "type": ref.get("type"), "metric": ref.get("metric"),
                   "doc_id": key[1], "target": d.get("target", p.get("target"))}
            for side, it in (("dense", d), ("pruned", p)):
                row.update({f"{side}_{k}": it.get(k) for k in ("answer", "correct", "value", "generation")})
            both = d and p and d.get("answer") is not None and p.get("answer") is not None
            row["same_answer"] = d["answer"] == p["answer"] if both else None
            rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("dense_correct", "pruned_correct", "same_answer"):
        df[c] = df[c].astype("boolean")
    for c in ("dense_value", "pruned_value"):
        df[c] = df[c].astype("float64")
    return df.astype({"doc_id": "int64"})


__all__ = ["COLUMNS", "item_table"]
