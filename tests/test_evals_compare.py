"""evals.json: changes, generation fidelity, the MC-vs-generative gap, the console table."""
from __future__ import annotations

import math

from prunerep.evals import compare_evals, format_evals_table
from prunerep.evals.compare import common_prefix_len, generation_fidelity


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
    prefixes = [common_prefix_len(d["tokens"], p["tokens"]) for d, p in zip(dense, pruned)
                if d["tokens"] != p["tokens"]]
    assert fid["n_compared"] == 4 and fid["unit"] == "token"
    assert fid["identical_frac"] == 2 / 4
    assert fid["mean_first_divergence"] == sum(prefixes) / len(prefixes) == (2 + 0) / 2
    assert generation_fidelity(dense, dense)["mean_first_divergence"] is None


def test_gap_is_positive_when_generation_drops_more():
    dense = {"mc": _task("multiple_choice", 0.8), "gen": _task("generative", 0.5, [_gen(0, [1])]),
             "code": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "opt-in"}}
    pruned = {"mc": _task("multiple_choice", 0.72), "gen": _task("generative", 0.1, [_gen(0, [2])]),
              "code": {"type": "generative", "metric": "pass@1", "skipped": True, "reason": "opt-in"}}
    ev = compare_evals(dense, pruned)
    mc, gen = ev["tasks"]["mc"], ev["tasks"]["gen"]
    assert math.isclose(mc["abs_change"], 0.72 - 0.8) and math.isclose(mc["rel_change"], (0.72 - 0.8) / 0.8)
    assert math.isclose(gen["rel_change"], (0.1 - 0.5) / 0.5)
    assert mc["stderr"] == {"dense": 0.05, "pruned": 0.05}
    assert math.isclose(ev["mc_vs_gen_gap"], -gen["rel_change"] - (-mc["rel_change"]))
    assert ev["mc_vs_gen_gap"] > 0
    assert ev["tasks"]["code"]["skipped"] and ev["tasks"]["code"]["reason"] == "opt-in"
    assert gen["fidelity"]["identical_frac"] == 0.0
    table = format_evals_table(ev)
    assert "mc_vs_gen_gap" in table and "skipped" in table and "gen" in table
    # swapping the roles flips the sign
    assert compare_evals(pruned, dense)["mc_vs_gen_gap"] < 0


def test_gap_is_null_without_both_kinds_and_zero_dense_is_left_out():
    only_mc = compare_evals({"mc": _task("multiple_choice", 0.5)}, {"mc": _task("multiple_choice", 0.4)})
    assert only_mc["mc_vs_gen_gap"] is None
    zero = compare_evals({"mc": _task("multiple_choice", 0.5), "gen": _task("generative", 0.0, [])},
                         {"mc": _task("multiple_choice", 0.4), "gen": _task("generative", 0.0, [])})
    assert zero["tasks"]["gen"]["rel_change"] is None and zero["mc_vs_gen_gap"] is None
    assert compare_evals({}, {}) == {"tasks": {}, "mc_vs_gen_gap": None,
                                     "mean_rel_drop": {"generative": None, "multiple_choice": None},
                                     "conventions": compare_evals({}, {})["conventions"]}
