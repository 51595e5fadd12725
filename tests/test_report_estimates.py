"""The sweep report's view of issue #13: the full vocabulary at the MC answer rows next to the option
subspace, the centred logits beside the raw ones, and the second-order estimates against their exact
values (estimates_vs_exact.png) -- on run directories with known contents."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prunerep.results.store import atomic_write_json
from prunerep.report import estimate_points, final_layer_points, load_sweep, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 4


def write_run(root, pruner: str, sp: float):
    """A complete run whose probe values are known functions of (sparsity, layer, prompt)."""
    d = root / f"tiny_{pruner}_{sp}"
    d.mkdir(parents=True)
    rows = []
    for pid in range(2):
        for layer in range(LAYERS + 1):
            x = sp * (layer + 1) / (LAYERS + 1) * (1 + 0.1 * pid)
            for space, metric, t, v in (("probability", "kl", 1.0, x), ("probability", "kl_est", 1.0, 0.9 * x),
                                        ("probability", "one_minus_cos", 1.0, x / 2),
                                        ("probability", "cos_est", 1.0, 0.6 * x),
                                        ("probability", "top1_agree", np.nan, 1 - x),
                                        ("logit", "cos", np.nan, 1 - x / 10), ("logit", "cos_centred", np.nan, 1 - x / 5),
                                        ("logit", "one_minus_cos", np.nan, x / 10),
                                        ("logit", "one_minus_cos_centred", np.nan, x / 5)):
                rows.append(("prompt", pid, "mc", layer, "block", -1, space, metric, t, v))
            for space, metric, t, v in (("options", "top1_agree", np.nan, 1.0), ("answer", "top1_agree", np.nan, 1 - 2 * x),
                                        ("options", "kl", 1.0, x / 100), ("answer", "kl", 1.0, 3 * x)):
                rows.append(("prompt", pid, "mc", layer, "block", 20, space, metric, t, v))
            # per-position ratio rows (not plotted here; they ride along in the table)
            rows += [("prompt", pid, "mc", layer, "block", pos, "probability", "kl_est_ratio", 1.0, 0.9)
                     for pos in range(3)]
    df = pd.DataFrame(rows, columns=["context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space",
                                     "metric", "temperature", "value"])
    df.astype({"prompt_id": "int32", "layer": "int16", "step": "int32"}).to_parquet(d / "probes.parquet")
    atomic_write_json(d / "evals.json", {"tasks": {}, "mc_vs_gen_gap": None})
    atomic_write_json(d / "summary.json", {"status": "complete", "config_hash": f"{pruner}-{sp}", "model": "tiny",
                                           "pruner": pruner, "sparsity": sp, "achieved_sparsity": sp,
                                           "timings_s": {"total": 1.0}, "run_dir": str(d)})
    return df


def test_answer_rows_centred_logits_and_estimates_in_the_report(tmp_path):
    sweep = tmp_path / "multirun"
    frames = {(p, sp): write_run(sweep, p, sp) for p in ("magnitude", "wanda") for sp in (0.3, 0.5)}
    table, _ = load_sweep(sweep)
    sim, div = final_layer_points(table, "similarity"), final_layer_points(table, "divergence")
    pts = estimate_points(table)
    for (pruner, sp), df in frames.items():
        last = df[(df["layer"] == LAYERS)]

        def mean(space, metric):
            return last[(last["space"] == space) & (last["metric"] == metric)]["value"].mean()

        def point(points, space):
            row = points[(points["pruner"] == pruner) & (points["sparsity"] == str(sp)) & (points["space"] == space)]
            assert len(row) == 1, space
            return row["metric"].item(), row["value"].item()

        # MC answer rows: the option subspace and the full vocabulary at the same rows
        assert point(sim, "options") == ("top1_agree", pytest.approx(mean("options", "top1_agree")))
        assert point(sim, "answer") == ("top1_agree", pytest.approx(mean("answer", "top1_agree")))
        assert point(div, "answer") == ("kl", pytest.approx(mean("answer", "kl")))
        # the logits, raw and centred, as two lines
        assert point(sim, "logit") == ("cos", pytest.approx(mean("logit", "cos")))
        assert point(sim, "logit_centred") == ("cos_centred", pytest.approx(mean("logit", "cos_centred")))
        assert point(div, "logit_centred") == ("one_minus_cos_centred",
                                               pytest.approx(mean("logit", "one_minus_cos_centred")))
        # estimates vs exact: one point per layer, the means over prompts
        mine = pts[(pts["pruner"] == pruner) & (pts["sparsity"] == str(sp))]
        assert len(mine) == 2 * (LAYERS + 1)
        for exact, est in (("kl", "kl_est"), ("one_minus_cos", "cos_est")):
            for layer in range(LAYERS + 1):
                at = df[(df["layer"] == layer) & (df["space"] == "probability")]
                row = mine[(mine["exact_metric"] == exact) & (mine["layer"] == layer)]
                assert row["exact"].item() == pytest.approx(at[at["metric"] == exact]["value"].mean())
                assert row["estimate"].item() == pytest.approx(at[at["metric"] == est]["value"].mean())
    res = make_report(sweep)
    data = (res["out_dir"] / "estimates_vs_exact.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
