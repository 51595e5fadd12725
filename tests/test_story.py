"""The run's story: headline numbers from probes_summary.json and evals.json, and its console block."""
from __future__ import annotations

import json
import math

import pytest

from prunerep.evals import compare_evals
from prunerep.results.story import story
from prunerep.viz.console import format_story, sig

PROBES = {
    "final_layer": 30, "n_prompts": 8, "n_rows": 1000, "nonfinite_values": 0,
    "prompt/embedding/cos": 0.893, "prompt/embedding/one_minus_cos": 0.10712,
    "prompt/logit/one_minus_cos": 0.15549, "prompt/logit/one_minus_cos_centred": 0.08123,
    "prompt/probability/kl@T=0.5": 2.5, "prompt/probability/kl@T=1": 0.6412,
    "prompt/probability/kl_est@T=1": 0.5381, "prompt/probability/kl_est@T=0.5": 2.1,
    "prompt/probability/one_minus_cos@T=1": 0.4204, "prompt/probability/one_minus_cos@T=0.5": 0.6,
    "prompt/probability/top1_agree": 0.75,
    "prompt/probability/kl_est_ratio_p10@T=1": 0.612, "prompt/probability/kl_est_ratio_p50@T=1": 0.8391,
    "prompt/probability/kl_est_ratio_p90@T=1": 1.104, "prompt/probability/kl_est_ratio_p50@T=0.5": 0.5,
    "prompt/options/kl@T=1": 0.01, "prompt/options/kl@T=0.5": 0.02, "prompt/options/top1_agree": 1.0,
    "prompt/answer/top1_agree": 0.5, "prompt/answer/kl@T=1": 0.4321, "prompt/answer/kl@T=0.5": 1.5,
    "teacher_forced/embedding/one_minus_cos": 0.2,
    "teacher_forced/probability/kl@T=1": 0.99, "teacher_forced/probability/kl@T=0.5": 3.0,
    "free_running/probability/kl@T=1": 4.2471, "free_running/probability/kl@T=0.5": 9.0,
    "free_running/tokens/token_agree": 0.4125, "free_running/tokens/first_divergence": 3.25,
    "free_running/tokens/diverged": 0.875,
    "error_accumulation/kl@T=1": 4.29, "error_accumulation/kl@T=0.5": 3.0,
}
def _entry(kind, score, **kw):
    return {"type": kind, "metric": "exact_match" if kind == "generative" else "acc", "score": score, **kw}


DENSE = {"mmlu_dev": _entry("multiple_choice", 0.5), "arith_mc": _entry("multiple_choice", 0.8),
         "arith_gen": _entry("generative", 0.4), "gsm_zero": _entry("generative", 0.0),
         "humaneval": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "code"}}
PRUNED = {"mmlu_dev": _entry("multiple_choice", 0.45), "arith_mc": _entry("multiple_choice", 0.8),
          "arith_gen": _entry("generative", 0.1), "gsm_zero": _entry("generative", 0.0),
          "humaneval": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "code"}}
EVALS = compare_evals(DENSE, PRUNED)


def test_story_values_and_order():
    s = story(PROBES, EVALS)
    assert list(s) == [
        "probes/final_layer", "probes/temperature", "probes/context",
        "h/one_minus_cos", "z/one_minus_cos", "z/one_minus_cos_centred", "p/one_minus_cos", "p/kl", "p/kl_est",
        "p/kl_est_ratio_p10", "p/kl_est_ratio_p50", "p/kl_est_ratio_p90",
        "kl/teacher_forced", "kl/free_running", "kl/accumulation",
        "tokens/first_divergence", "tokens/agreement", "tokens/diverged",
        "options/top1_agree", "answer/top1_agree", "options/kl", "answer/kl", "vocab/top1_agree_all_positions",
        "family/multiple_choice/dense", "family/multiple_choice/pruned", "family/multiple_choice/retained",
        "family/generative/dense", "family/generative/pruned", "family/generative/retained",
        "family/generative/retained_above_chance", "evals/mc_vs_gen_gap"]
    assert s["probes/final_layer"] == 30 and isinstance(s["probes/final_layer"], int)
    assert s["probes/temperature"] == 1.0  # the reference temperature, not T=0.5
    assert s["probes/context"] == "prompt"
    assert (s["h/one_minus_cos"], s["z/one_minus_cos"], s["p/one_minus_cos"]) == (0.10712, 0.15549, 0.4204)
    assert (s["p/kl"], s["p/kl_est"]) == (0.6412, 0.5381)
    assert (s["kl/teacher_forced"], s["kl/free_running"], s["kl/accumulation"]) == (0.99, 4.2471, 4.29)
    assert (s["tokens/first_divergence"], s["tokens/agreement"], s["tokens/diverged"]) == (3.25, 0.4125, 0.875)
    assert s["z/one_minus_cos_centred"] == 0.08123
    assert (s["p/kl_est_ratio_p10"], s["p/kl_est_ratio_p50"], s["p/kl_est_ratio_p90"]) == (0.612, 0.8391, 1.104)
    # like for like at the answer positions (option subspace vs full vocabulary), and every position apart
    assert (s["options/top1_agree"], s["answer/top1_agree"], s["vocab/top1_agree_all_positions"]) == (1.0, 0.5, 0.75)
    assert (s["options/kl"], s["answer/kl"]) == (0.01, 0.4321)
    assert s["family/multiple_choice/dense"] == pytest.approx(0.65)
    assert s["family/multiple_choice/pruned"] == pytest.approx(0.625)
    assert s["family/multiple_choice/retained"] == pytest.approx(0.95)  # 1 - mean relative drop
    # gsm_zero (dense 0) counts in the means but not in the retained fraction; skipped tasks not at all
    assert s["family/generative/dense"] == pytest.approx(0.2)
    assert s["family/generative/pruned"] == pytest.approx(0.05)
    assert s["family/generative/retained"] == pytest.approx(0.25)
    # above chance (0 for exact match): gsm_zero's dense score is not above it, so it is left out
    assert s["family/generative/retained_above_chance"] == pytest.approx(0.25)
    assert s["evals/mc_vs_gen_gap"] == pytest.approx(0.7)
    json.dumps(s, allow_nan=False)  # summary.json and W&B: plain JSON


def test_temperature_falls_back_to_the_one_present():
    probes = {k.replace("@T=1", "@T=2"): v for k, v in PROBES.items() if "@T=0.5" not in k}
    s = story(probes, None)
    assert s["probes/temperature"] == 2.0
    assert s["p/kl"] == 0.6412 and s["kl/accumulation"] == 4.29


def test_missing_pieces_are_omitted():
    assert story({}, None) == {} and story(None, None) == {} and story({}, compare_evals({}, {})) == {}
    assert format_story({}) == ""
    only_evals = story({}, EVALS)
    assert all(k.startswith(("family/", "evals/")) for k in only_evals)
    only_probes = story(PROBES, compare_evals({}, {}))
    assert not any(k.startswith(("family/", "evals/")) for k in only_probes)
    # a run without the free-running context, the options, or the prompt context
    partial = {k: v for k, v in PROBES.items() if not k.startswith(("free_running/", "error_acc", "prompt/"))}
    s = story(partial, None)
    assert s["probes/context"] == "teacher_forced"
    assert s["h/one_minus_cos"] == 0.2 and s["p/kl"] == 0.99 and s["kl/teacher_forced"] == 0.99
    assert not any(k.startswith(("tokens/", "options/", "answer/", "vocab/", "z/")) or k == "kl/free_running"
                   for k in s)


def test_format_story_lines():
    text = format_story(story(PROBES, EVALS), label="wanda 0.5")
    lines = text.splitlines()
    assert lines == [
        "representation hierarchy (final layer 30, T=1, wanda 0.5):",
        "  1-cos  h 0.107 -> z 0.155 (centred 0.0812) -> p 0.420   KL 0.641 (estimate Var_p(dz)/2T^2 0.538)",
        "  estimate / exact KL per row: median 0.839 (10-90%: 0.612 to 1.10)",
        "  decoding: KL teacher-forced 0.990 -> free-running 4.25 (x4.29 accumulated)",
        "  free-running tokens: first divergence at step 3.25 (88% of prompts diverged), token agreement 0.412",
        "  multiple choice, answer position: top-1 agreement options 1.00 vs full vocabulary 0.500 "
        "(every position 0.750); KL options 0.0100 vs full vocabulary 0.432",
        "  scores dense -> pruned: multiple_choice 0.650 -> 0.625 (0.950 retained); "
        "generative 0.200 -> 0.0500 (0.250 retained, 0.250 above chance)",
        "  mc_vs_gen_gap +70.0%",
    ]
    assert 5 <= len(lines) <= 8


def test_families_are_evals_json_families():
    """The family numbers are evals.json's: perplexity's retained is dense / pruned (lower is
    better), a task at chance counts in the scores but not above chance, and a multiple-choice task
    whose dense side answers by one option is left out above chance, as in evals.json's families."""
    dense = {"pydoc_ppl": _entry("perplexity", 20.0, stderr=0.5, chance=1000.0),
             "arith_mc": _entry("multiple_choice", 0.75, stderr=0.05, chance=0.25),
             "letters": _entry("multiple_choice", 0.8, stderr=0.05, chance=0.25, option_picks=_picks(1.0)),
             "code_retrieval": _entry("retrieval", 0.5, stderr=0.5, chance=0.1)}
    pruned = {"pydoc_ppl": _entry("perplexity", 25.0, stderr=0.5, chance=1000.0),
              "arith_mc": _entry("multiple_choice", 0.5, stderr=0.05, chance=0.25),
              "letters": _entry("multiple_choice", 0.7, stderr=0.05, chance=0.25, option_picks=_picks(0.9)),
              "code_retrieval": _entry("retrieval", 0.45, stderr=0.5, chance=0.1)}
    evals = compare_evals(dense, pruned)
    fams = evals.families
    s = story({}, evals)
    assert [k for k in s if k.startswith("family/") and k.endswith("/dense")] == [
        "family/retrieval/dense", "family/multiple_choice/dense", "family/perplexity/dense"]
    assert s["family/perplexity/retained"] == 0.8 == fams["perplexity"].retained
    assert s["family/perplexity/retained_above_chance"] == fams["perplexity"].retained_above_chance
    assert s["family/multiple_choice/dense"] == pytest.approx((0.75 + 0.8) / 2)
    assert s["family/multiple_choice/retained"] == pytest.approx((2 / 3 + 0.7 / 0.8) / 2)
    assert fams["multiple_choice"].excluded_option_bias == ["letters"]
    assert s["family/multiple_choice/retained_above_chance"] == pytest.approx(0.5)  # arith_mc alone
    assert "family/retrieval/retained_above_chance" not in s  # excluded at chance
    text = format_story(s)
    assert "perplexity 20.0 -> 25.0 (0.800 retained, " in text


def _picks(top_frac: float) -> dict:
    n = 10
    docs = [["letters", i, 0 if i < top_frac * n else 1, 0] for i in range(n)]
    return {"metric": "acc", "labels": ["A", "B", "C", "D"], "counts": [int(top_frac * n), n - int(top_frac * n), 0, 0],
            "n": n, "top": "A", "top_frac": top_frac, "biased": top_frac >= 0.8, "threshold": 0.8, "docs": docs}


def test_gap_above_chance_comes_through():
    dense = {"mc": _entry("multiple_choice", 0.75, stderr=0.05, chance=0.25), "gen": _entry("generative", 0.5,
                                                                                          stderr=0.05)}
    pruned = {"mc": _entry("multiple_choice", 0.5, stderr=0.05, chance=0.25), "gen": _entry("generative", 0.25,
                                                                                           stderr=0.05)}
    evals = compare_evals(dense, pruned)
    s = story({}, evals)
    assert (s["evals/gap_above_chance"], s["evals/gap_above_chance_stderr"]) == (
        evals.gap_above_chance.value, evals.gap_above_chance.stderr)
    assert s["evals/gap_above_chance"] == pytest.approx(0.0)
    assert f"gap above chance {s['evals/gap_above_chance']:+.2f} ± " in format_story(s)


def test_format_story_without_probes_or_divergence():
    assert format_story(story({}, EVALS)).splitlines()[0] == "summary:"
    probes = dict(PROBES, **{"free_running/tokens/diverged": 0.0, "free_running/tokens/first_divergence": 32.0})
    assert "free-running tokens: no divergence in 32 steps, token agreement 0.412" in format_story(story(probes, None))


@pytest.mark.parametrize("x, text", [(0.10712, "0.107"), (4.2471, "4.25"), (1.0, "1.00"), (0.0020686, "0.00207"),
                                     (32.0, "32.0"), (100.0, "100"), (12345.0, "1.23e+04"), (0, "0"),
                                     (None, "-"), (math.nan, "nan"), (math.inf, "inf")])
def test_three_significant_digits(x, text):
    assert sig(x) == text


def test_story_of_a_real_run_layout():
    """The keys probes.outputs.summarize writes are the ones story reads."""
    import numpy as np
    import pandas as pd

    from prunerep.probes.outputs import summarize
    from prunerep.results.schema import PROBE_COLUMNS

    rows = []
    for ctx in ("prompt", "teacher_forced", "free_running"):
        for pid in (0, 1):
            step = -1 if ctx == "prompt" else 0
            kl = 0.8 if ctx == "free_running" else 0.4
            for space, metric, t, v in (("embedding", "one_minus_cos", np.nan, 0.1),
                                        ("logit", "one_minus_cos", np.nan, 0.2),
                                        ("logit", "one_minus_cos_centred", np.nan, 0.15),
                                        ("probability", "one_minus_cos", 1.0, 0.3), ("probability", "kl", 1.0, kl),
                                        ("probability", "kl_est", 1.0, 0.35),
                                        ("probability", "top1_agree", np.nan, 0.7)):
                rows.append((ctx, pid, "mc", 2, "block", step, space, metric, t, v))
        if ctx == "prompt":
            rows += [("prompt", 0, "mc", 2, "block", 5, "options", "top1_agree", np.nan, 1.0),
                     ("prompt", 0, "mc", 2, "block", 5, "answer", "top1_agree", np.nan, 0.0),
                     ("prompt", 0, "mc", 2, "block", 5, "options", "kl", 1.0, 0.01),
                     ("prompt", 0, "mc", 2, "block", 5, "answer", "kl", 1.0, 0.25)]
            # per-position estimate ratios: percentiles over every row of every prompt
            rows += [("prompt", pid, "mc", 2, "block", pos, "probability", "kl_est_ratio", 1.0, 0.5 + 0.1 * (pos + pid))
                     for pid in (0, 1) for pos in range(5)]
    for pid in (0, 1):
        rows += [("free_running", pid, "gen", 2, "block", 0, "tokens", "token_agree", np.nan, 0.5),
                 ("free_running", pid, "gen", 2, "block", -1, "tokens", "first_divergence", np.nan, 1.0 + pid),
                 ("free_running", pid, "gen", 2, "block", -1, "tokens", "diverged", np.nan, 1.0)]
    df = pd.DataFrame(rows, columns=list(PROBE_COLUMNS))
    s = story(summarize(df), None)
    assert s["probes/final_layer"] == 2
    assert (s["h/one_minus_cos"], s["z/one_minus_cos"], s["p/one_minus_cos"]) == pytest.approx((0.1, 0.2, 0.3))
    assert (s["p/kl"], s["p/kl_est"]) == pytest.approx((0.4, 0.35))
    assert (s["kl/teacher_forced"], s["kl/free_running"], s["kl/accumulation"]) == pytest.approx((0.4, 0.8, 2.0))
    assert (s["tokens/first_divergence"], s["tokens/agreement"], s["tokens/diverged"]) == pytest.approx((1.5, 0.5, 1))
    assert (s["options/top1_agree"], s["answer/top1_agree"], s["vocab/top1_agree_all_positions"]) == \
        pytest.approx((1.0, 0.0, 0.7))
    assert (s["options/kl"], s["answer/kl"], s["z/one_minus_cos_centred"]) == pytest.approx((0.01, 0.25, 0.15))
    # 0.5 .. 0.9 and 0.6 .. 1.0: the 10th, 50th, 90th percentiles of those ten values
    assert (s["p/kl_est_ratio_p10"], s["p/kl_est_ratio_p50"], s["p/kl_est_ratio_p90"]) == \
        pytest.approx(tuple(np.percentile([0.5, 0.6, 0.7, 0.8, 0.9, 0.6, 0.7, 0.8, 0.9, 1.0], [10, 50, 90])))
