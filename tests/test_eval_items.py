"""The per-item table (issue #23): dense vs pruned per document, read from the entries the
evaluations return, written out here by hand."""
from __future__ import annotations

import pandas as pd

from prunerep.evals.items import COLUMNS, item_table


def _mc(picks):
    """An mmlu_dev-like entry: lettered options, docs [task, doc_id, pick, gold]."""
    return {"type": "multiple_choice", "metric": "acc",
            "option_picks": {"labels": ["A", "B", "C", "D"], "docs": [["mmlu_dev", i, p, g] for i, p, g in picks]}}


def _gen(gens):
    return {"type": "generative", "metric": "exact_match",
            "generations": [{"doc_id": i, "text": t, "tokens": [1], "extracted": x, "target": "7", "exact_match": v}
                            for i, t, x, v in gens]}


DENSE = {"mmlu_dev": _mc([(0, 1, 1), (1, 0, 2)]),
         "arith_gen": _gen([(0, " 7. Done", "7", 1.0), (1, " 8", "8", 0.0)]),
         "code_retrieval": {"type": "retrieval", "metric": "ndcg@10",
                            "per_query": {"ndcg@10": [1.0, 0.5], "recall@1": [1.0, 0.0]}},
         "pydoc_ppl": {"type": "perplexity", "metric": "token_perplexity", "score": 12.0},
         "humaneval": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "no sandbox"}}
PRUNED = {"mmlu_dev": _mc([(0, 0, 1), (1, 0, 2)]),
          "arith_gen": _gen([(0, " 9", "9", 0.0), (1, " 8", "8", 0.0)]),
          "code_retrieval": {"type": "retrieval", "metric": "ndcg@10",
                             "per_query": {"ndcg@10": [0.63, 0.5], "recall@1": [0.0, 0.0]}},
          "pydoc_ppl": {"type": "perplexity", "metric": "token_perplexity", "score": 20.0},
          "humaneval": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "no sandbox"}}


def test_every_task_with_items_side_by_side():
    df = item_table(DENSE, PRUNED)
    assert list(df.columns) == COLUMNS
    assert df["task"].tolist() == ["mmlu_dev"] * 2 + ["arith_gen"] * 2 + ["code_retrieval"] * 2  # no ppl, no skipped
    mc = df[df["task"] == "mmlu_dev"].set_index("doc_id")
    assert mc.loc[0, ["target", "dense_answer", "pruned_answer"]].tolist() == ["B", "B", "A"]
    assert mc["dense_correct"].tolist() == [True, False] and mc["pruned_correct"].tolist() == [False, False]
    assert mc["same_answer"].tolist() == [False, True]
    gen = df[df["task"] == "arith_gen"].set_index("doc_id")
    assert gen.loc[0, ["dense_generation", "pruned_generation", "dense_answer", "pruned_answer", "target"]].tolist() \
        == [" 7. Done", " 9", "7", "9", "7"]
    assert gen["dense_correct"].tolist() == [True, False] and gen["pruned_value"].tolist() == [0.0, 0.0]
    ret = df[df["task"] == "code_retrieval"].set_index("doc_id")
    assert ret["dense_value"].tolist() == [1.0, 0.5] and ret["pruned_value"].tolist() == [0.63, 0.5]
    assert ret["dense_correct"].tolist() == [True, False] and ret["pruned_correct"].tolist() == [False, False]
    assert ret["dense_answer"].isna().all() and ret["same_answer"].isna().all()


def test_an_item_on_one_side_only_has_nulls_on_the_other(tmp_path):
    df = item_table({"arith_gen": _gen([(0, " 7", "7", 1.0)])},
                    {"arith_gen": _gen([(0, " 7", "7", 1.0), (1, " 3", "3", 0.0)])})
    assert df["doc_id"].tolist() == [0, 1]
    assert pd.isna(df.loc[1, "dense_answer"]) and pd.isna(df.loc[1, "dense_correct"])
    assert bool(df.loc[0, "same_answer"]) is True
    df.to_parquet(tmp_path / "items.parquet", index=False)  # the types survive the file
    back = pd.read_parquet(tmp_path / "items.parquet")
    assert back["dense_correct"].dtype == "boolean" and back["doc_id"].tolist() == [0, 1]
