"""The story's claims with bootstrap intervals (prunerep/results/claims.py): the statistics worked
out by hand on small probe tables and per-item eval outcomes, the verdicts, the console block."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from prunerep.evals import compare_evals
from prunerep.evals.compare import item_scores
from prunerep.results.claims import claims, free_running_split, item_aurocs, kept_with_large_kl, story_fields
from prunerep.results.schema import PROBE_COLUMNS
from prunerep.results.story import story
from prunerep.viz.console import format_story


def _table(rows):
    return pd.DataFrame(rows, columns=list(PROBE_COLUMNS))


def _prompt_rows(pid, h, z, p, kl, kl_est, layer=4):
    kind = "mc"
    return [("prompt", pid, kind, layer, "block", -1, "embedding", "one_minus_cos", math.nan, h),
            ("prompt", pid, kind, layer, "block", -1, "logit", "one_minus_cos_centred", math.nan, z),
            ("prompt", pid, kind, layer, "block", -1, "probability", "one_minus_cos", 1.0, p),
            ("prompt", pid, kind, layer, "block", -1, "probability", "kl", 1.0, kl),
            ("prompt", pid, kind, layer, "block", -1, "probability", "kl_est", 1.0, kl_est),
            # an earlier layer and another temperature, which the claims must not read
            ("prompt", pid, kind, layer - 1, "block", -1, "probability", "one_minus_cos", 1.0, 99.0),
            ("prompt", pid, kind, layer, "block", -1, "probability", "kl", 2.0, 99.0)]


def test_probe_claims_by_hand():
    rows = []
    # p - h = 0.3, 0.2, 0.1, p - z = 0.25, 0.3, 0.05 -> min of the means: mean(p-h) = 0.2, mean(p-z) = 0.2
    for pid, (h, z, p) in enumerate([(0.1, 0.15, 0.4), (0.1, 0.0, 0.3), (0.1, 0.15, 0.2)]):
        rows += _prompt_rows(pid, h, z, p, kl=[1.0, 2.0, 3.0][pid], kl_est=[0.6, 1.4, 4.5][pid])
    # MC answer rows: options agree on all three, the full vocabulary on one
    for pid in range(3):
        rows += [("prompt", pid, "mc", 4, "block", 20, "options", "top1_agree", math.nan, 1.0),
                 ("prompt", pid, "mc", 4, "block", 20, "answer", "top1_agree", math.nan, float(pid == 0))]
    found = claims(_table(rows))
    a, b, d = found["a_h_z_below_p"], found["b_kl_estimate"], found["d_options_stable"]
    assert a.interval.value == pytest.approx(0.2) and a.interval.n == 3 and a.unit == "prompts"
    assert a.interval.lo > 0 and a.verdict == "holds"  # every prompt has p above both
    assert b.interval.value == pytest.approx(6.5 / 6.0)  # the mean estimate over the mean KL
    # per prompt 0.6, 0.7, 1.5: every resample's ratio lies between, inside [1/2, 2]
    assert 0.6 <= b.interval.lo and b.interval.hi <= 1.5 and b.verdict == "holds"
    assert d.interval.value == pytest.approx(2 / 3) and d.verdict == "inconclusive at n = 3"  # a resample of prompt 0 gives 0
    assert "c_accumulation" not in found  # no decoding rows


def test_accumulation_and_the_split_at_the_first_divergence():
    rows = []
    for pid, first in ((0, 2), (1, 3)):
        for s in range(4):
            rows.append(("teacher_forced", pid, "gen", 4, "block", s, "probability", "kl", 1.0, 0.5))
            rows.append(("free_running", pid, "gen", 4, "block", s, "probability", "kl", 1.0, 0.5 if s < first else 3.0))
        rows.append(("free_running", pid, "gen", 4, "block", -1, "tokens", "first_divergence", math.nan, float(first)))
        rows.append(("free_running", pid, "gen", 4, "block", -1, "tokens", "diverged", math.nan, 1.0))
    df = _table(rows)
    c = claims(df)["c_accumulation"]
    # prompt 0: free-running mean (0.5+0.5+3+3)/4 = 1.75, prompt 1: (1.5+3)/4 = 1.125; teacher-forced 0.5 each
    assert c.interval.value == pytest.approx((1.75 + 1.125) / 2 / 0.5)
    assert (c.interval.lo, c.interval.hi) == (pytest.approx(1.125 / 0.5), pytest.approx(1.75 / 0.5))
    assert c.verdict == "holds"
    split = free_running_split(df)
    assert split == {"matched": pytest.approx(0.5), "after_divergence": pytest.approx(3.0)}


def test_accumulation_without_a_divergence_is_not_measured():
    """No trajectory diverged: the free-running contexts are the teacher-forced ones, so a ratio a
    hair above 1 (the KV cache's rounding) is no evidence of accumulation."""
    rows = []
    for pid in (0, 1):
        for s in range(4):
            rows.append(("teacher_forced", pid, "gen", 4, "block", s, "probability", "kl", 1.0, 0.5))
            rows.append(("free_running", pid, "gen", 4, "block", s, "probability", "kl", 1.0, 0.5001))
        rows.append(("free_running", pid, "gen", 4, "block", -1, "tokens", "first_divergence", math.nan, 4.0))
        rows.append(("free_running", pid, "gen", 4, "block", -1, "tokens", "diverged", math.nan, 0.0))
    c = claims(_table(rows))["c_accumulation"]
    assert c.interval.lo > 1.0
    assert c.verdict == "not measured: no free-running trajectory diverged"


def _mc(correct, chance=0.25):
    docs = [["arith_cloze", i, 0 if ok else 1, 0] for i, ok in enumerate(correct)]
    n = len(correct)
    k = sum(correct)
    return {"type": "multiple_choice", "metric": "acc", "score": k / n, "stderr": None, "n": n, "chance": chance,
            "pairs_with": "arith_gen",
            "option_picks": {"metric": "acc", "labels": ["#1", "#2"], "counts": [k, n - k], "n": n, "top": "#1",
                             "top_frac": max(k, n - k) / n, "biased": False, "threshold": 0.8, "docs": docs}}


def _gen(correct):
    gens = [{"doc_id": i, "text": "1", "tokens": [1], "exact_match": float(ok)} for i, ok in enumerate(correct)]
    return {"type": "generative", "metric": "exact_match", "score": sum(correct) / len(correct), "stderr": None,
            "n": len(correct), "generations": gens}


def _ret(ndcg, chance=0.2):
    return {"type": "retrieval", "metric": "ndcg@10", "score": float(np.mean(ndcg)), "stderr": None, "n": len(ndcg),
            "chance": chance, "higher_is_better": True, "metrics_chance": {"ndcg@10": chance},
            "per_query": {"ndcg@10": list(ndcg)}}


def test_item_claims_family_order_and_the_same_question_pair():
    dense = {"arith_cloze": _mc([1, 1, 1, 1, 1, 1, 1, 0]), "arith_gen": _gen([1, 1, 1, 1, 0, 0, 0, 0]),
             "code_retrieval": _ret([1.0, 1.0, 1.0, 1.0, 0.5, 0.5])}
    pruned = {"arith_cloze": _mc([1, 1, 1, 1, 1, 1, 0, 0]), "arith_gen": _gen([1, 0, 0, 0, 0, 0, 0, 0]),
              "code_retrieval": _ret([1.0, 1.0, 1.0, 1.0, 0.5, 0.5])}
    assert item_scores(dense["arith_cloze"])[7] == 0.0 and item_scores(pruned["arith_gen"])[0] == 1.0
    evals = compare_evals(dense, pruned)
    found = claims(None, evals, dense, pruned)
    # multiple choice (0.75 - 0.25) / (0.875 - 0.25) = 0.8; generative 0.125 / 0.5 = 0.25; retrieval 1
    assert found["pair_arith_cloze_arith_gen"].interval.value == pytest.approx(0.8 - 0.25)
    assert found["order_retrieval_multiple_choice"].interval.value == pytest.approx(1.0 - 0.8)
    assert found["order_multiple_choice_generative"].interval.value == pytest.approx(0.8 - 0.25)
    e = found["e_retrieval_kept"]
    assert (e.interval.value, e.interval.lo, e.interval.hi, e.verdict) == (1.0, 1.0, 1.0, "holds")
    # the two arithmetic tasks share their 8 questions: 8 independent units; retrieval its 6 queries
    assert found["order_multiple_choice_generative"].interval.n == 8
    assert found["pair_arith_cloze_arith_gen"].interval.n == 8 and found["order_retrieval_multiple_choice"].interval.n == 14
    for c in found.values():
        iv = c.interval
        assert iv.n_resamples == 2000 and (iv.lo <= iv.value <= iv.hi or not math.isfinite(iv.lo))
    fields = story_fields(found)
    s = story({}, evals, fields)
    assert s["claim/pair_arith_cloze_arith_gen"] == pytest.approx(0.55)
    assert s["claims/n_resamples"] == 2000
    text = format_story(s)
    assert "claims (95% bootstrap intervals, 2000 resamples):" in text
    assert "(e) retrieval kept (retained above chance > 0.9): 1.00 [1.00, 1.00], n = 6 queries: holds" in text


def test_a_claim_against_the_data_fails():
    rows = []
    for pid in range(4):  # p moves less than h on every prompt
        rows += _prompt_rows(pid, h=0.5, z=0.1, p=0.2 + 0.01 * pid, kl=1.0, kl_est=5.0)
    found = claims(_table(rows))
    assert found["a_h_z_below_p"].verdict == "fails"
    assert found["b_kl_estimate"].verdict == "fails"  # the estimate 5x the KL


def _items(rows):
    cols = ["task", "item", "family", "dense_score", "pruned_score", "lost", "h_one_minus_cos", "answer_kl",
            "options_kl", "options_top1_agree"]
    return pd.DataFrame(rows, columns=cols)


def test_auroc_of_each_measure_among_dense_right_items():
    # five dense-right MC items, two lost; h ranks them perfectly, options_kl by halves (one tie)
    rows = [("t", "0", "multiple_choice", 1.0, 1.0, False, 0.1, 0.2, 0.00, 1.0),
            ("t", "1", "multiple_choice", 1.0, 1.0, False, 0.2, 0.9, 0.01, 1.0),
            ("t", "2", "multiple_choice", 1.0, 1.0, False, 0.3, 0.1, 0.30, 1.0),
            ("t", "3", "multiple_choice", 1.0, 0.0, True, 0.4, 0.6, 0.30, 0.0),
            ("t", "4", "multiple_choice", 1.0, 0.0, True, 0.5, 0.7, 0.50, 0.0),
            # dense wrong: not among the ranked items, whatever its measures
            ("t", "5", "multiple_choice", 0.0, 0.0, False, 9.0, 9.0, 9.00, 1.0)]
    got = item_aurocs(_items(rows))
    h, n_lost = got["auroc/multiple_choice/h"]
    assert (h.value, n_lost, h.n) == (1.0, 2, 5)
    # options_kl: lost 0.30, 0.50 vs kept 0.00, 0.01, 0.30 -> pairs won: 0.30: 2 + 1/2, 0.50: 3 -> 5.5 / 6
    assert got["auroc/multiple_choice/p_options"][0].value == pytest.approx(5.5 / 6)
    # answer_kl: lost 0.6, 0.7 vs kept 0.2, 0.9, 0.1 -> 2 + 2 = 4 / 6
    assert got["auroc/multiple_choice/p_vocab"][0].value == pytest.approx(4 / 6)
    assert "auroc/multiple_choice/z" not in got  # not measured
    # full-vocabulary KL >= 0.5: items 1, 3, 4, 5, of which 1 and 5 keep their answer
    kept = kept_with_large_kl(_items(rows))
    assert (kept.value, kept.n) == (0.5, 4)
    s = story({}, None, story_fields({}, items=_items(rows)))
    text = format_story(s)
    assert "AUROC for a lost multiple choice item (2 of 5 dense-right items lost): h 1.00 [" in text
    s2 = dict(s, **{"auroc/multiple_choice/p_options/n": 9, "auroc/multiple_choice/p_options/n_lost": 3})
    assert "p_options 0.917 [" in format_story(s2) and "] (3 of 9)" in format_story(s2)
    assert "multiple-choice items with full-vocabulary KL >= 0.5 whose answer is kept: 0.500 [" in text


def test_items_of_one_source_are_one_unit():
    # 8 MC items cut from 2 documents: the order claim rests on 2 units, not 8
    dense = {"word_cloze": _mc([1, 1, 1, 1, 1, 1, 1, 0]), "arith_gen": _gen([1, 1, 1, 1, 0, 0, 0, 0])}
    dense["word_cloze"].pop("pairs_with")
    dense["word_cloze"]["items"] = [{"task": "word_cloze", "doc_id": i, "context": "c", "source": str(i // 4)}
                                    for i in range(8)]
    pruned = {"word_cloze": _mc([1, 1, 1, 1, 1, 1, 0, 0]), "arith_gen": _gen([1, 0, 0, 0, 0, 0, 0, 0])}
    pruned["word_cloze"].pop("pairs_with")
    evals = compare_evals(dense, pruned)
    c = claims(None, evals, dense, pruned)["order_multiple_choice_generative"]
    assert c.interval.n == 2 + 8 and c.interval.value == pytest.approx(0.8 - 0.25)


def test_claims_a_and_d_on_the_evaluated_items():
    items = pd.DataFrame({
        "task": ["c", "c", "c", "g"], "item": ["0", "1", "2", "0"],
        "family": ["multiple_choice"] * 3 + ["generative"],
        "answer_one_minus_cos": [0.5, 0.4, 0.3, 0.6], "h_one_minus_cos": [0.1, 0.1, 0.1, 0.2],
        "z_one_minus_cos_centred": [0.2, 0.1, 0.2, 0.1],
        "options_top1_agree": [1.0, 1.0, 0.0, np.nan], "answer_top1_agree": [0.0, 1.0, 0.0, np.nan]})
    found = claims(None, items=items)
    a, d = found["a_h_z_below_p_items"], found["d_options_stable_items"]
    # p - h: 0.4, 0.3, 0.2, 0.4 -> 0.325; p - z: 0.3, 0.3, 0.1, 0.5 -> 0.3
    assert a.interval.value == pytest.approx(0.3) and a.interval.n == 4 and a.verdict == "holds"
    assert d.interval.value == pytest.approx(1 / 3) and d.interval.n == 3 and d.unit == "items"
    assert d.verdict == "inconclusive at n = 3"  # a resample of items 1 and 2 only gives 0
    assert "on the evaluated items" in d.statement
