"""The run's story: headline numbers from probes_summary.json and evals.json, and its console block."""
from __future__ import annotations

import json
import math

import pytest

from prunerep.story import format_story, sig, story

PROBES = {
    "final_layer": 30, "n_prompts": 8, "n_rows": 1000, "nonfinite_values": 0,
    "prompt/embedding/cos": 0.893, "prompt/embedding/one_minus_cos": 0.10712,
    "prompt/logit/one_minus_cos": 0.15549,
    "prompt/probability/kl@T=0.5": 2.5, "prompt/probability/kl@T=1": 0.6412,
    "prompt/probability/kl_est@T=1": 0.5381, "prompt/probability/kl_est@T=0.5": 2.1,
    "prompt/probability/one_minus_cos@T=1": 0.4204, "prompt/probability/one_minus_cos@T=0.5": 0.6,
    "prompt/probability/top1_agree": 0.75,
    "prompt/options/kl@T=1": 0.01, "prompt/options/top1_agree": 1.0,
    "teacher_forced/embedding/one_minus_cos": 0.2,
    "teacher_forced/probability/kl@T=1": 0.99, "teacher_forced/probability/kl@T=0.5": 3.0,
    "free_running/probability/kl@T=1": 4.2471, "free_running/probability/kl@T=0.5": 9.0,
    "free_running/tokens/token_agree": 0.4125, "free_running/tokens/first_divergence": 3.25,
    "free_running/tokens/diverged": 0.875,
    "error_accumulation/kl@T=1": 4.29, "error_accumulation/kl@T=0.5": 3.0,
}
EVALS = {
    "tasks": {
        "mmlu_dev": {"type": "multiple_choice", "metric": "acc", "dense": 0.5, "pruned": 0.45, "rel_change": -0.1},
        "arith_mc": {"type": "multiple_choice", "metric": "acc", "dense": 0.8, "pruned": 0.8, "rel_change": 0.0},
        "arith_gen": {"type": "generative", "metric": "exact_match", "dense": 0.4, "pruned": 0.1,
                      "rel_change": -0.75},
        "gsm_zero": {"type": "generative", "metric": "exact_match", "dense": 0.0, "pruned": 0.0,
                     "rel_change": None},
        "humaneval": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "code",
                      "dense": None, "pruned": None},
    },
    "mc_vs_gen_gap": 0.7,
    "mean_rel_drop": {"generative": 0.75, "multiple_choice": 0.05},
}


def test_story_values_and_order():
    s = story(PROBES, EVALS)
    assert list(s) == [
        "probes/final_layer", "probes/temperature", "probes/context",
        "h/one_minus_cos", "z/one_minus_cos", "p/one_minus_cos", "p/kl", "p/kl_est",
        "kl/teacher_forced", "kl/free_running", "kl/accumulation",
        "tokens/first_divergence", "tokens/agreement", "tokens/diverged",
        "options/top1_agree", "vocab/top1_agree",
        "family/multiple_choice/dense", "family/multiple_choice/pruned", "family/multiple_choice/retained",
        "family/generative/dense", "family/generative/pruned", "family/generative/retained",
        "evals/mc_vs_gen_gap"]
    assert s["probes/final_layer"] == 30 and isinstance(s["probes/final_layer"], int)
    assert s["probes/temperature"] == 1.0  # the reference temperature, not T=0.5
    assert s["probes/context"] == "prompt"
    assert (s["h/one_minus_cos"], s["z/one_minus_cos"], s["p/one_minus_cos"]) == (0.10712, 0.15549, 0.4204)
    assert (s["p/kl"], s["p/kl_est"]) == (0.6412, 0.5381)
    assert (s["kl/teacher_forced"], s["kl/free_running"], s["kl/accumulation"]) == (0.99, 4.2471, 4.29)
    assert (s["tokens/first_divergence"], s["tokens/agreement"], s["tokens/diverged"]) == (3.25, 0.4125, 0.875)
    assert (s["options/top1_agree"], s["vocab/top1_agree"]) == (1.0, 0.75)
    assert s["family/multiple_choice/dense"] == pytest.approx(0.65)
    assert s["family/multiple_choice/pruned"] == pytest.approx(0.625)
    assert s["family/multiple_choice/retained"] == pytest.approx(0.95)  # 1 - mean relative drop
    # gsm_zero (dense 0) counts in the means but not in the retained fraction; skipped tasks not at all
    assert s["family/generative/dense"] == pytest.approx(0.2)
    assert s["family/generative/pruned"] == pytest.approx(0.05)
    assert s["family/generative/retained"] == pytest.approx(0.25)
    assert s["evals/mc_vs_gen_gap"] == 0.7
    json.dumps(s, allow_nan=False)  # summary.json and W&B: plain JSON


def test_temperature_falls_back_to_the_one_present():
    probes = {k.replace("@T=1", "@T=2"): v for k, v in PROBES.items() if "@T=0.5" not in k}
    s = story(probes, None)
    assert s["probes/temperature"] == 2.0
    assert s["p/kl"] == 0.6412 and s["kl/accumulation"] == 4.29


def test_missing_pieces_are_omitted():
    assert story({}, {}) == {} and story(None, None) == {}
    assert format_story({}) == ""
    only_evals = story({}, EVALS)
    assert all(k.startswith(("family/", "evals/")) for k in only_evals)
    only_probes = story(PROBES, {"tasks": {}, "mc_vs_gen_gap": None})
    assert not any(k.startswith(("family/", "evals/")) for k in only_probes)
    # a run without the free-running context, the options, or the prompt context
    partial = {k: v for k, v in PROBES.items() if not k.startswith(("free_running/", "error_acc", "prompt/"))}
    s = story(partial, None)
    assert s["probes/context"] == "teacher_forced"
    assert s["h/one_minus_cos"] == 0.2 and s["p/kl"] == 0.99 and s["kl/teacher_forced"] == 0.99
    assert not any(k.startswith(("tokens/", "options/", "vocab/", "z/")) or k == "kl/free_running" for k in s)


def test_format_story_lines():
    text = format_story(story(PROBES, EVALS), label="wanda 0.5")
    lines = text.splitlines()
    assert lines == [
        "representation hierarchy (final layer 30, T=1, wanda 0.5):",
        "  1-cos  h 0.107 -> z 0.155 -> p 0.420   KL 0.641 (estimate Var_p(dz)/2T^2 0.538)",
        "  decoding: KL teacher-forced 0.990 -> free-running 4.25 (x4.29 accumulated)",
        "  free-running tokens: first divergence at step 3.25 (88% of prompts diverged), token agreement 0.412",
        "  multiple choice: top-1 agreement on the options 1.00 vs full vocabulary 0.750",
        "  scores dense -> pruned: multiple_choice 0.650 -> 0.625 (0.950 retained); "
        "generative 0.200 -> 0.0500 (0.250 retained); mc_vs_gen_gap +70.0%",
    ]
    assert 5 <= len(lines) <= 8


def test_format_story_without_probes_or_divergence():
    assert format_story(story({}, EVALS)).splitlines()[0] == "summary:"
    probes = dict(PROBES, **{"free_running/tokens/diverged": 0.0, "free_running/tokens/first_divergence": 32.0})
    assert "free-running tokens: no divergence in 32 steps, token agreement 0.412" in format_story(story(probes, {}))


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
    from prunerep.results import PROBE_COLUMNS

    rows = []
    for ctx in ("prompt", "teacher_forced", "free_running"):
        for pid in (0, 1):
            step = -1 if ctx == "prompt" else 0
            kl = 0.8 if ctx == "free_running" else 0.4
            for space, metric, t, v in (("embedding", "one_minus_cos", np.nan, 0.1),
                                        ("logit", "one_minus_cos", np.nan, 0.2),
                                        ("probability", "one_minus_cos", 1.0, 0.3), ("probability", "kl", 1.0, kl),
                                        ("probability", "kl_est", 1.0, 0.35),
                                        ("probability", "top1_agree", np.nan, 0.7)):
                rows.append((ctx, pid, "mc", 2, "block", step, space, metric, t, v))
        if ctx == "prompt":
            rows += [("prompt", 0, "mc", 2, "block", 5, "options", "top1_agree", np.nan, 1.0)]
    for pid in (0, 1):
        rows += [("free_running", pid, "gen", 2, "block", 0, "tokens", "token_agree", np.nan, 0.5),
                 ("free_running", pid, "gen", 2, "block", -1, "tokens", "first_divergence", np.nan, 1.0 + pid),
                 ("free_running", pid, "gen", 2, "block", -1, "tokens", "diverged", np.nan, 1.0)]
    df = pd.DataFrame(rows, columns=list(PROBE_COLUMNS))
    s = story(summarize(df), {})
    assert s["probes/final_layer"] == 2
    assert (s["h/one_minus_cos"], s["z/one_minus_cos"], s["p/one_minus_cos"]) == pytest.approx((0.1, 0.2, 0.3))
    assert (s["p/kl"], s["p/kl_est"]) == pytest.approx((0.4, 0.35))
    assert (s["kl/teacher_forced"], s["kl/free_running"], s["kl/accumulation"]) == pytest.approx((0.4, 0.8, 2.0))
    assert (s["tokens/first_divergence"], s["tokens/agreement"], s["tokens/diverged"]) == pytest.approx((1.5, 0.5, 1))
    assert (s["options/top1_agree"], s["vocab/top1_agree"]) == pytest.approx((1.0, 0.7))
