"""evals.json: changes, generation fidelity, the MC-vs-generative gap, the console table."""
from __future__ import annotations

import math

from prunerep.evals import compare_evals
from prunerep.evals.compare import common_prefix_len, generation_fidelity
from prunerep.results.schema import Fidelity
from prunerep.viz.console import format_evals_table


def _gen(doc_id, tokens):
    return {"doc_id": doc_id, "text": "".join(map(str, tokens)), "tokens": tokens}


def _task(kind, score, gens=None, stderr=0.05):
    out = {"type": kind, "metric": "acc" if kind == "multiple_choice" else "exact_match",
           "score": score, "stderr": stderr}
    if gens is not None:
        out["generations"] = gens
    return out


def test_fidelity_counts_identical_generations_and_first_divergence():
    dense = [_gen(0, [1, 2, 3]), _gen(1, [4, 5, 6, 7]), _gen(2, [8]), _gen(3, [9, 9])]
    pruned = [_gen(0, [1, 2, 3]), _gen(1, [4, 5, 0]), _gen(2, [0]), _gen(3, [9, 9])]
    fid = generation_fidelity(dense, pruned)
    assert fid == Fidelity(n_compared=4, identical_frac=0.5, unit="token",
                           mean_first_divergence=1.0)  # docs 1 and 2 diverge after 2 and 0 tokens: (2 + 0) / 2
    assert generation_fidelity(dense, dense) == Fidelity(n_compared=4, identical_frac=1.0, unit="token",
                                                         mean_first_divergence=None)
    assert [common_prefix_len(a, b) for a, b in [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7], [4, 5, 0]), ([8], [0]),
                                                 ([], [1]), ([1, 2], [1, 2, 3])]] == [3, 2, 0, 0, 2]


def test_gap_is_positive_when_generation_drops_more():
    dense = {"mc": _task("multiple_choice", 0.8), "gen": _task("generative", 0.5, [_gen(0, [1])]),
             "code": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "opt-in"}}
    pruned = {"mc": _task("multiple_choice", 0.72), "gen": _task("generative", 0.1, [_gen(0, [2])]),
              "code": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "opt-in"}}
    report = compare_evals(dense, pruned)
    ev = report.to_json()
    mc, gen = ev["tasks"]["mc"], ev["tasks"]["gen"]
    assert math.isclose(mc["abs_change"], 0.72 - 0.8) and math.isclose(mc["rel_change"], (0.72 - 0.8) / 0.8)
    assert math.isclose(gen["rel_change"], (0.1 - 0.5) / 0.5)
    assert mc["stderr"] == {"dense": 0.05, "pruned": 0.05}
    assert math.isclose(ev["mc_vs_gen_gap"], 0.8 - 0.1)  # relative drops: gen (0.5-0.1)/0.5, mc (0.8-0.72)/0.8
    assert ev["mc_vs_gen_gap"] > 0
    assert ev["tasks"]["code"]["skipped"] and ev["tasks"]["code"]["reason"] == "opt-in"
    assert gen["fidelity"]["identical_frac"] == 0.0
    table = format_evals_table(report)
    assert "mc_vs_gen_gap" in table and "skipped" in table and "gen" in table
    # swapping the roles flips the sign
    assert compare_evals(pruned, dense).mc_vs_gen_gap < 0


def test_gap_is_null_without_both_kinds_and_zero_dense_is_left_out():
    only_mc = compare_evals({"mc": _task("multiple_choice", 0.5)}, {"mc": _task("multiple_choice", 0.4)})
    assert only_mc.mc_vs_gen_gap is None
    zero = compare_evals({"mc": _task("multiple_choice", 0.5), "gen": _task("generative", 0.0, [])},
                         {"mc": _task("multiple_choice", 0.4), "gen": _task("generative", 0.0, [])})
    assert zero.tasks["gen"].rel_change is None and zero.mc_vs_gen_gap is None
    assert compare_evals({}, {}).to_json() == {
        "tasks": {}, "mc_vs_gen_gap": None, "mean_rel_drop": {"generative": None, "multiple_choice": None},
        "conventions": ("rel_change=(pruned-dense)/dense; relative drop=-rel_change; "
                        "mc_vs_gen_gap=mean drop(generative)-mean drop(multiple_choice), "
                        ">0: generation hurt more; fidelity at token level, first divergence = "
                        "common-prefix length averaged over diverging docs")}
