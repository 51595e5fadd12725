"""The sweep report: one tidy table, PNG figures, the 1-pp thresholds -- on run directories with known
contents (thresholds checked against a direct computation) and on a real small sweep of the tiny model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli import run_cli
from prunerep.registry import compose
from prunerep.report import (by_method, eval_scores, final_layer_points, format_thresholds, make_report, sparsity_key,
                             step_curves, thresholds)
from prunerep.report.claims import claim_bands
from prunerep.report.__main__ import main
from prunerep.report.load import load_sweep
from prunerep.report.plots import retained_lines
from prunerep.results.store import atomic_write_json, read_json

REPO = Path(__file__).resolve().parents[1]
PNGS = ("similarity_vs_sparsity.png", "kl_vs_sparsity.png", "mc_vs_gen_vs_sparsity.png", "retained_vs_sparsity.png",
        "divergence_vs_step.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ratio(sp: str) -> float:
    n, _, m = sp.partition(":")
    return int(n) / int(m) if m else float(sp)


def write_run(root: Path, pruner: str, sp: str, seed: int, status: str = "complete", mc_slope=3.0, gen_slope=10.0):
    """A run directory following the results contract; probe values depend on the sparsity."""
    rng = np.random.default_rng(seed)
    d = root / f"tiny_{pruner}_{sp}_{seed}"
    d.mkdir(parents=True)
    r = _ratio(sp)
    rows = []
    for space, metrics in (("embedding", ("cos", "rel_l2")), ("logit", ("cos", "kl")),
                           ("probability", ("kl", "top1_agree"))):
        for metric in metrics:
            sim = metric in ("cos", "top1_agree")
            for pid in range(3):
                for layer in range(5):  # step -1: mean over the prompt's positions
                    v = r * (layer + 1) / 5 * (1 + 0.1 * rng.standard_normal())
                    rows.append(("prompt", pid, layer, "block", -1, space, metric, 1.0, 1 - v if sim else v))
                for ctx, growth in (("teacher_forced", 0.02), ("free_running", 0.2)):
                    for step in range(6):
                        v = r * (1 + growth * step)
                        rows.append((ctx, pid, 4, "block", step, space, metric, 1.0, 1 - v if sim else v))
    df = pd.DataFrame(rows, columns=["context", "prompt_id", "layer", "sublayer", "step", "space", "metric",
                                     "temperature", "value"])
    df = df.astype({"prompt_id": "int32", "layer": "int16", "step": "int32"})
    df.to_parquet(d / "probes.parquet")
    dense_mc, dense_gen = 0.55, 0.40
    tasks = {
        "mmlu_dev": {"type": "multiple_choice", "metric": "acc", "dense": dense_mc, "pruned": dense_mc - mc_slope * r / 100},
        "arith_mc": {"type": "multiple_choice", "metric": "acc", "dense": 0.7, "pruned": 0.7 - 0.5 * mc_slope * r / 100},
        "arith_gen": {"type": "generative", "metric": "exact_match", "dense": dense_gen,
                      "pruned": dense_gen - gen_slope * r / 100},
    }
    for t in tasks.values():
        t["abs_change"] = t["pruned"] - t["dense"]
        t["rel_change"] = t["abs_change"] / t["dense"]
    atomic_write_json(d / "evals.json", {"tasks": tasks, "mc_vs_gen_gap": (gen_slope - mc_slope) * r / 100})
    atomic_write_json(d / "pruning.json", {"achieved_sparsity": r, "modules": {}})
    atomic_write_json(d / "summary.json", {
        "status": status, "error": None if status == "complete" else "RuntimeError: CUDA out of memory",
        "config_hash": f"{pruner}-{sp}", "model": "tiny", "pruner": pruner, "sparsity": sp if ":" in sp else float(sp),
        "achieved_sparsity": r, "timings_s": {"total": 1.0}, "peak_memory_mb": {"cpu_rss": 10.0}, "run_dir": str(d)})
    return d, df, tasks


def test_sparsity_order_puts_nm_at_its_ratio():
    sps = ["0.7", "2:4", "0.5", "0.3", "4:8", "1:4", "0.25"]
    assert sorted(sps, key=sparsity_key) == ["0.25", "1:4", "0.3", "0.5", "2:4", "4:8", "0.7"]


def _scores(rows):
    return pd.DataFrame(rows, columns=["run", "model", "pruner", "sparsity", "task", "task_type", "dense", "pruned"])


MC, GEN = "multiple_choice", "generative"
# (pruner, sparsity, task, type, dense, pruned), scores in percentage points
HAND_SCORES = _scores([
    (f"{pr}/{sp}", "tiny", pr, sp, task, tt, dense, pruned) for pr, sp, task, tt, dense, pruned in [
        # magnitude, MC: worst drop 0.5, 1.0 (exactly the tolerance), 2.0 (miss), then 0.5 again
        ("magnitude", "0.1", "a", MC, 50.0, 49.5), ("magnitude", "0.1", "b", MC, 60.0, 60.25),
        ("magnitude", "0.3", "a", MC, 50.0, 49.25), ("magnitude", "0.3", "b", MC, 60.0, 59.0),
        ("magnitude", "0.5", "a", MC, 50.0, 48.0), ("magnitude", "0.5", "b", MC, 60.0, 60.0),
        ("magnitude", "0.7", "a", MC, 50.0, 49.5), ("magnitude", "0.7", "b", MC, 60.0, 60.0),
        # N:M walked on its own: 2:4 (ratio 0.5) within, 4:8 (ratio 0.5, after 2:4) a miss
        ("magnitude", "2:4", "a", MC, 50.0, 49.25), ("magnitude", "2:4", "b", MC, 60.0, 60.0),
        ("magnitude", "4:8", "a", MC, 50.0, 48.5), ("magnitude", "4:8", "b", MC, 60.0, 60.0),
        # magnitude, generation: 0.1 already a miss; a gain at 2:4 counts as within
        ("magnitude", "0.1", "g", GEN, 40.0, 38.5), ("magnitude", "0.3", "g", GEN, 40.0, 40.0),
        ("magnitude", "2:4", "g", GEN, 40.0, 42.0),
        # wanda: MC only; 1:4 (ratio 0.25) misses, so 2:4 is not reached
        ("wanda", "0.5", "a", MC, 50.0, 50.0), ("wanda", "1:4", "a", MC, 50.0, 47.0),
        ("wanda", "2:4", "a", MC, 50.0, 50.0),
    ]
])


def test_thresholds_on_a_hand_made_scores_table():
    none = {"unstructured": None, "nm": None, "tested": []}
    assert thresholds(HAND_SCORES) == {"tiny": {
        "magnitude": {
            "mc": {"unstructured": "0.3", "nm": "2:4", "tested": [
                {"sparsity": "0.1", "worst_drop_pp": 0.5}, {"sparsity": "0.3", "worst_drop_pp": 1.0},
                {"sparsity": "0.5", "worst_drop_pp": 2.0}, {"sparsity": "2:4", "worst_drop_pp": 0.75},
                {"sparsity": "4:8", "worst_drop_pp": 1.5}, {"sparsity": "0.7", "worst_drop_pp": 0.5}]},
            "generative": {"unstructured": None, "nm": "2:4", "tested": [
                {"sparsity": "0.1", "worst_drop_pp": 1.5}, {"sparsity": "0.3", "worst_drop_pp": 0.0},
                {"sparsity": "2:4", "worst_drop_pp": -2.0}]},
            "retrieval": none,
        },
        "wanda": {
            "mc": {"unstructured": "0.5", "nm": None, "tested": [
                {"sparsity": "1:4", "worst_drop_pp": 3.0}, {"sparsity": "0.5", "worst_drop_pp": 0.0},
                {"sparsity": "2:4", "worst_drop_pp": 0.0}]},
            "generative": none,
            "retrieval": none,
        },
    }}
    # a wider tolerance walks further: magnitude MC past 0.5 to 0.7, and N:M to 4:8
    wide = thresholds(HAND_SCORES, tol_pp=2.0)["tiny"]["magnitude"]
    assert (wide["mc"]["unstructured"], wide["mc"]["nm"]) == ("0.7", "4:8")
    assert (wide["generative"]["unstructured"], wide["generative"]["nm"]) == ("0.3", "2:4")
    assert thresholds(_scores([])) == {}


def test_format_thresholds_table():
    assert format_thresholds(thresholds(HAND_SCORES)) == "\n".join([
        "highest sparsity with every task within 1 pp of dense:",
        "model          pruner       retrieval        MC               generation      ",
        "tiny           magnitude    -                0.3 (N:M 2:4)    none (N:M 2:4)  ",
        "tiny           wanda        -                0.5 (N:M none)   -               ",
    ])
    assert format_thresholds({}) == \
        "no eval scores in this sweep (task=none?): no retrieval / MC / generation thresholds"


def test_report_on_known_run_dirs(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    frames = {}
    i = 0
    for pruner, mc, gen in (("magnitude", 3.0, 10.0), ("wanda", 1.5, 4.0)):
        for sp in ("0.1", "0.3", "0.5", "2:4", "0.7"):
            d, df, tasks = write_run(sweep, pruner, sp, i, mc_slope=mc, gen_slope=gen)
            frames[(pruner, sp)] = (df, tasks)
            i += 1
    write_run(sweep, "wanda", "0.9", i, status="failed")

    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    out = sweep / "report"
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    table = pd.read_parquet(out / "sweep.parquet")
    csv = pd.read_csv(out / "sweep.csv")
    assert len(table) == len(csv)
    # one row per run x metric: probes (mean over prompts per context/space/metric/layer/step), evals, pruning
    for (pruner, sp), (df, tasks) in frames.items():
        t = table[(table["pruner"] == pruner) & (table["sparsity"] == sp)]
        probes = t[t["source"] == "probe"]
        keys = ["context", "space", "metric", "layer", "sublayer", "step", "temperature"]
        expected = df.groupby(keys, dropna=False)["value"].mean()
        assert len(probes) == len(expected)
        got = probes.set_index(keys)["value"].sort_index()
        np.testing.assert_allclose(got.to_numpy(), expected.sort_index().to_numpy(), rtol=1e-12)
        ev = t[t["source"] == "eval"]
        assert len(ev) == 4 * len(tasks) + 1  # dense, pruned, abs, rel per task + the gap
        assert set(t["sparsity_ratio"]) == {_ratio(sp)}
        assert bool(t["sparsity_nm"].iloc[0]) == (":" in sp)
    assert "failed" not in set(table["status"])  # failed runs are listed in runs.csv, not measured

    # the plotted points: KL / cos at the last layer of the prompt context, and KL per decoding step
    div = final_layer_points(table, "divergence")
    sim = final_layer_points(table, "similarity")
    steps = step_curves(table)
    for (pruner, sp), (df, _) in frames.items():
        last = df[(df["context"] == "prompt") & (df["layer"] == df["layer"].max())]
        for points, space, metric in ((div, "probability", "kl"), (div, "embedding", "one_minus_cos"),
                                      (sim, "logit", "cos")):
            row = points[(points["pruner"] == pruner) & (points["sparsity"] == sp) & (points["space"] == space)]
            want = last[(last["space"] == space) & (last["metric"] == metric)]["value"]
            if want.empty:  # embedding has no one_minus_cos here: rel_l2 is the divergence
                want = last[(last["space"] == space) & (last["metric"] == "rel_l2")]["value"]
            assert row["value"].iloc[0] == pytest.approx(want.mean())
        c = steps[(steps["pruner"] == pruner) & (steps["sparsity"] == sp) & (steps["space"] == "probability")]
        assert set(c["context"]) == {"teacher_forced", "free_running"}
        for (ctx, st), v in c.set_index(["context", "step"])["value"].items():
            want = df[(df["context"] == ctx) & (df["step"] == st) & (df["space"] == "probability")
                      & (df["metric"] == "kl")]["value"].mean()
            assert v == pytest.approx(want)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 11 and (runs["status"] == "failed").sum() == 1
    assert "CUDA out of memory" in runs.loc[runs["status"] == "failed", "error"].iloc[0]

    # thresholds, against a direct computation from the written scores (percentage points)
    th = read_json(out / "thresholds.json")["thresholds"]["tiny"]
    for pruner in ("magnitude", "wanda"):
        for kind, ttype in (("mc", "multiple_choice"), ("generative", "generative")):
            worst = {}
            for (p, sp), (_, tasks) in frames.items():
                if p == pruner:
                    worst[sp] = max(100 * (t["dense"] - t["pruned"]) for t in tasks.values() if t["type"] == ttype)
            best = None
            for sp in sorted((s for s in worst if ":" not in s), key=sparsity_key):
                if worst[sp] > 1.0 + 1e-9:
                    break
                best = sp
            assert th[pruner][kind]["unstructured"] == best, (pruner, kind, worst)
            assert th[pruner][kind]["nm"] == ("2:4" if worst["2:4"] <= 1.0 + 1e-9 else None)
    assert "magnitude" in printed and "wanda" in printed and "within 1 pp" in printed
    assert "failed: " in printed


def test_no_runs_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "-m", "prunerep.report", str(tmp_path / "empty")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no runs" in p.stderr
    p = subprocess.run([sys.executable, "-m", "prunerep.report", str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0


# --------------------------------------------------------------------------- a real sweep

SMALL = ["model=tiny", "probe.n_prompts=2", "probe.max_new_tokens=4", "probe.max_prompt_tokens=32",
         "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled"]


def test_report_on_a_real_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    p = run_cli("-m", *SMALL, "task=offline", "task.limit=4", "pruner=magnitude,wanda", "sparsity=0.3,2:4",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=1800,
                env={"PRUNEREP_OUTPUTS": str(tmp_path / "outputs"), "HYDRA_FULL_ERROR": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    offline_tasks = set(compose("task=offline").task.tasks)
    runs_dirs = sorted(sweep.glob("*/summary.json"))
    assert len(runs_dirs) == 4

    r = subprocess.run([sys.executable, "-m", "prunerep.report", str(sweep)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = sweep / "report"
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    table = pd.read_parquet(out / "sweep.parquet")
    assert set(table["run"]) == {d.parent.name for d in runs_dirs}
    assert set(zip(table["pruner"], table["sparsity"])) == {("magnitude", "0.3"), ("magnitude", "2:4"),
                                                             ("wanda", "0.3"), ("wanda", "2:4")}
    for d in runs_dirs:
        run = d.parent
        t = table[table["run"] == run.name]
        summary = read_json(d)
        assert t["achieved_sparsity"].iloc[0] == pytest.approx(summary["achieved_sparsity"])
        # every complete run wrote its probe table and its evals (task=offline)
        df = pd.read_parquet(run / "probes.parquet")
        keys = [c for c in ("context", "space", "metric", "layer", "sublayer", "step", "temperature") if c in df]
        assert (t["source"] == "probe").sum() == len(df.groupby(keys, dropna=False)) > 0
        # the mean over prompts of one group, recomputed from the run's own parquet
        g0 = df.groupby(keys, dropna=False)["value"].mean()
        k0, v0 = next(iter(g0.items()))
        probes = t[t["source"] == "probe"]
        sel = np.ones(len(probes), bool)
        for k, v in zip(keys, k0 if isinstance(k0, tuple) else (k0,)):
            col = probes[k]
            sel &= (col.isna().to_numpy() if pd.isna(v) else (col == v).fillna(False).to_numpy())
        assert sel.sum() == 1
        assert probes[sel]["value"].iloc[0] == pytest.approx(v0)
        ev = read_json(run / "evals.json")
        e = t[(t["source"] == "eval") & (t["metric"] == "pruned")]
        assert set(ev["tasks"]) == offline_tasks
        for task, v in ev["tasks"].items():
            assert e[e["task"] == task]["value"].iloc[0] == pytest.approx(v["pruned"])

    # thresholds.json against the evals.json files directly: worst drop per type, in points
    th = read_json(out / "thresholds.json")
    assert th["tolerance_pp"] == 1.0
    model = read_json(runs_dirs[0])["model"]
    assert set(th["thresholds"]) == {model}
    for pruner in ("magnitude", "wanda"):
        for kind, ttype in (("mc", "multiple_choice"), ("generative", "generative"), ("retrieval", "retrieval")):
            worst = {}
            for d in runs_dirs:
                s = read_json(d)
                if s["pruner"] == pruner:
                    tasks = read_json(d.parent / "evals.json")["tasks"].values()
                    worst[str(s["sparsity"])] = max(100 * (t["dense"] - t["pruned"]) for t in tasks
                                                    if t["type"] == ttype)
            entry = th["thresholds"][model][pruner][kind]
            assert [x["sparsity"] for x in entry["tested"]] == ["0.3", "2:4"]
            for x in entry["tested"]:
                assert x["worst_drop_pp"] == pytest.approx(worst[x["sparsity"]], abs=1e-3)
            assert entry["unstructured"] == ("0.3" if worst["0.3"] <= 1.0 + 1e-9 else None)
            assert entry["nm"] == ("2:4" if worst["2:4"] <= 1.0 + 1e-9 else None)
    assert (out / "thresholds.txt").read_text() == format_thresholds(th["thresholds"]) + "\n"


def test_families_retained_and_retrieval_threshold():
    """Perplexity is lower-is-better: retained = dense / pruned, kept in its own units; retrieval
    nDCG (a fraction) goes to points and gets its own 1-pp threshold; the retained figure is drawn."""
    rows = []
    for sp, ppl, ndcg in (("0.3", 22.0, 0.545), ("0.5", 40.0, 0.50)):
        for task, tt, d, p in (("pydoc_ppl", "perplexity", 20.0, ppl), ("code_retrieval", "retrieval", 0.55, ndcg)):
            for metric, v in (("dense", d), ("pruned", p)):
                rows.append({"source": "eval", "run": f"wanda/{sp}", "model": "tiny", "pruner": "wanda",
                             "sparsity": sp, "task": task, "task_type": tt, "metric": metric, "value": v})
    scores = eval_scores(pd.DataFrame(rows))
    ppl = scores[scores["task"] == "pydoc_ppl"].set_index("sparsity")
    assert ppl.loc["0.5", "retained"] == pytest.approx(0.5) and ppl.loc["0.5", "pruned"] == 40.0
    ret = scores[scores["task"] == "code_retrieval"].set_index("sparsity")
    assert ret.loc["0.3", "dense"] == pytest.approx(55.0) and ret.loc["0.5", "retained"] == pytest.approx(0.5 / 0.55)
    th = thresholds(scores)["tiny"]["wanda"]
    assert th["retrieval"]["unstructured"] == "0.3"  # 0.5 pp drop at 0.3, 5 pp at 0.5
    assert [t["worst_drop_pp"] for t in th["retrieval"]["tested"]] == [pytest.approx(0.5), pytest.approx(5.0)]
    assert "perplexity" not in th and th["mc"]["tested"] == []


def test_the_retained_figure_keeps_the_families_tasks_above_chance(tmp_path):
    """Like for like with evals.json's families: the solid line of retained_vs_sparsity.png is the mean
    kept-above-chance over the tasks the family keeps (a task at chance or letter-biased is left out);
    the dashed one, pruned / dense over every task."""
    sweep = tmp_path / "multirun"
    d, _, _ = write_run(sweep, "wanda", "0.5", 0)
    tasks = {  # by hand: chance 0.25; (pruned - 0.25) / (dense - 0.25)
        "word_cloze": {"type": "multiple_choice", "metric": "acc", "dense": 0.9, "pruned": 0.77, "chance": 0.25,
                       "retained_above_chance": 0.8, "excluded_at_chance": False, "excluded_option_bias": False},
        "arith_cloze": {"type": "multiple_choice", "metric": "acc", "dense": 0.75, "pruned": 0.45, "chance": 0.25,
                        "retained_above_chance": 0.4, "excluded_at_chance": False, "excluded_option_bias": False},
        "arith_mc": {"type": "multiple_choice", "metric": "acc", "dense": 0.35, "pruned": 0.35, "chance": 0.25,
                     "retained_above_chance": 1.0, "excluded_at_chance": False, "excluded_option_bias": True},
        "mmlu_dev": {"type": "multiple_choice", "metric": "acc", "dense": 0.25, "pruned": 0.25, "chance": 0.25,
                     "retained_above_chance": None, "excluded_at_chance": True, "excluded_option_bias": True},
    }
    atomic_write_json(d / "evals.json", {"tasks": tasks})
    scores = eval_scores(load_sweep(sweep)[0]).set_index("task")
    assert scores.loc["word_cloze", "kept_above_chance"] == pytest.approx(0.8)
    assert np.isnan(scores.loc["arith_mc", "kept_above_chance"]) and np.isnan(scores.loc["mmlu_dev", "kept_above_chance"])
    line = retained_lines(scores.reset_index()).iloc[0]
    assert line["kept_above_chance"] == pytest.approx((0.8 + 0.4) / 2) and line["n_kept"] == 2  # the two kept
    assert line["retained"] == pytest.approx((0.77 / 0.9 + 0.45 / 0.75 + 1.0 + 1.0) / 4) and line["n_tasks"] == 4


def test_claim_bands_over_sparsity(tmp_path):
    sweep = tmp_path / "multirun"
    written = {}
    for i, (pruner, sp) in enumerate((("wanda", "0.3"), ("wanda", "0.5"), ("magnitude", "0.5"))):
        d, _, _ = write_run(sweep, pruner, sp, i)
        summary = read_json(d / "summary.json")
        v = 0.1 * (i + 1)
        summary["story"] = {"claim/a_h_z_below_p": v, "claim/a_h_z_below_p/lo": v - 0.05,
                            "claim/a_h_z_below_p/hi": v + 0.05, "claim/a_h_z_below_p/n": 8,
                            "claim/a_h_z_below_p/unit": "prompts", "claim/a_h_z_below_p/verdict": "holds",
                            "claims/n_resamples": 2000}
        atomic_write_json(d / "summary.json", summary)
        written[(pruner, sp)] = v
    result = make_report(sweep)
    bands = claim_bands(by_method(result["table"]))
    assert len(bands) == 3 and set(bands["claim"]) == {"a_h_z_below_p"}
    for (pruner, sp), v in written.items():
        row = bands[(bands["pruner"] == pruner) & (bands["sparsity"] == sp)].iloc[0]
        assert (row["value"], row["lo"], row["hi"]) == (pytest.approx(v), pytest.approx(v - 0.05),
                                                         pytest.approx(v + 0.05))
    data = (sweep / "report" / "claims_vs_sparsity.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
