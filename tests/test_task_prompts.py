"""probe.prompts=tasks: the probes run on the run's own evaluated items."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from prunerep.probes.prompts import task_prompts
from tests.cli import run_cli


def _mc(task, contexts, options):
    return {"type": "multiple_choice", "items": [
        {"task": task, "doc_id": i, "context": c, "continuations": o, "lls": [0.0] * len(o)}
        for i, (c, o) in enumerate(zip(contexts, options))]}


def _gen(task, contexts):
    return {"type": "generative", "items": [{"task": task, "doc_id": i, "context": c} for i, c in enumerate(contexts)]}


def test_items_are_taken_in_turn_half_per_family(smollm2_tok):
    scores = {
        "cloze_a": _mc("cloze_a", ["The sky is", "Grass is", "Snow is"],
                       [[" blue", " green"], [" blue", " green"], [" white", " black"]]),
        "cloze_b": _mc("cloze_b", ["Two plus two is", "One plus one is"], [[" four", " five"], [" two", " twenty"]]),
        "gen_a": _gen("gen_a", ["Question: 3+4?\nAnswer:", "Question: 5+6?\nAnswer:"]),
        "ppl": {"type": "perplexity", "items": []},
        "permuted": _mc("permuted", ["x", "y"], [[" a", " b"], [" a", " b"]]),
        "gen_skipped": {"type": "generative", "skipped": True, "items": _gen("gen_skipped", ["Q"])["items"]},
    }
    scores["permuted"]["items"][1]["task"] = "permuted_rot1"  # two leaves: rotations, not the scored items
    got = task_prompts(smollm2_tok, scores, 5, 256)
    # 5 // 2 = 2 multiple choice (one from each task in turn), then 3 generative (gen_a has only 2)
    assert [(p.meta["task"], p.meta["doc_id"], p.kind) for p in got] == [
        ("cloze_a", 0, "mc"), ("cloze_b", 0, "mc"), ("gen_a", 0, "gen"), ("gen_a", 1, "gen")]
    assert [p.id for p in got] == [0, 1, 2, 3]
    first = got[0]
    assert first.ids == tuple(smollm2_tok("The sky is", add_special_tokens=False)["input_ids"])
    assert first.options == (" blue", " green")
    assert first.option_ids == tuple(smollm2_tok.encode(o, add_special_tokens=False)[0] for o in (" blue", " green"))
    assert first.to_json()["task"] == "cloze_a" and first.to_json()["doc_id"] == 0
    assert task_prompts(smollm2_tok, scores, 3, 2)[0].ids == first.ids[-2:]


def test_a_generative_group_of_several_leaves_names_each_items_leaf(smollm2_tok):
    group = _gen("leaf_a", ["Question: 1+1?\nAnswer:"])
    group["items"] += _gen("leaf_b", ["Question: 2+2?\nAnswer:"])["items"]
    got = task_prompts(smollm2_tok, {"group": group}, 2, 64)
    assert [(p.meta["task"], p.meta["doc_id"]) for p in got] == [("leaf_a", 0), ("leaf_b", 0)]


def test_options_without_distinct_first_tokens_are_passed_over(smollm2_tok):
    same = " 12"
    assert smollm2_tok.encode(" 123", add_special_tokens=False)[0] == smollm2_tok.encode(same, add_special_tokens=False)[0]
    scores = {"c": _mc("c", ["Pick", "Pick again"], [[" 123", same], [" yes", " no"]])}
    got = task_prompts(smollm2_tok, scores, 4, 64)
    assert [(p.meta["doc_id"], p.kind) for p in got] == [(1, "mc")]


def test_tasks_without_items_to_probe_are_one_line_before_loading(tmp_path):
    res = run_cli("model=tiny", "task=none", "probe.prompts=tasks", "wandb.mode=disabled",
                  f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and "probe.prompts=tasks" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_only_perplexity_tasks_are_refused_before_loading(tmp_path):
    res = run_cli("model=tiny", "task=offline", "task.tasks=[pydoc_ppl]", "probe.prompts=tasks", "wandb.mode=disabled",
                  f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "probe.prompts=tasks" in res.stderr and "pydoc_ppl" in res.stderr and "Traceback" not in res.stderr


def test_a_run_probes_the_items_it_evaluated(tmp_path):
    run = tmp_path / "run"
    res = run_cli("model=tiny", "pruner=wanda", "task=offline", "task.tasks=[word_cloze,arith_gen]", "task.limit=4",
                  "probe.prompts=tasks", "probe.n_prompts=4", "probe.max_new_tokens=4", "wandb.mode=disabled",
                  f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the first 4 word_cloze items are cut from one pydoc topic: one of them is probed (one per source)
    (entry,) = [json.loads(f.read_text())["payload"] for f in (tmp_path / "cache" / "evals").glob("*.json")]
    assert [r["source"] for r in entry["word_cloze"]["items"]] == ["0"] * 4
    df = pd.read_parquet(run / "probes.parquet")
    kinds = df.groupby("prompt_id")["prompt_kind"].first()
    assert kinds.to_dict() == {0: "mc", 1: "gen", 2: "gen", 3: "gen"}
    log = (run / "prunerep.log").read_text()
    assert "the evaluated items 0=word_cloze:0, 1=arith_gen:0, 2=arith_gen:1, 3=arith_gen:2" in log


def test_auto_takes_the_offline_prompts_when_no_task_runs(tmp_path):
    run = tmp_path / "run"
    res = run_cli("model=tiny", "task=none", "probe.n_prompts=2", "probe.max_new_tokens=4", "wandb.mode=disabled",
                  f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "probe prompts: the offline prompts (probe.prompts=auto" in (run / "prunerep.log").read_text()
    kinds = pd.read_parquet(run / "probes.parquet").groupby("prompt_id")["prompt_kind"].first()
    assert kinds.to_dict() == {0: "mc", 1: "gen"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_mixture_of_experts_run_probes_its_evaluated_items(tmp_path, dtype):
    run = tmp_path / "run"
    res = run_cli("model=tiny", "model.arch.model_type=mixtral", "+model.arch.num_local_experts=4",
                  "+model.arch.num_experts_per_tok=2", f"model.dtype={dtype}", "pruner=wanda", "task=offline",
                  "task.tasks=[word_cloze,arith_gen]", "task.limit=4", "probe.prompts=tasks", "probe.n_prompts=2",
                  "probe.n_items=2", "probe.max_new_tokens=4", "wandb.mode=disabled", f"cache_dir={tmp_path / 'cache'}",
                  f"hydra.run.dir={run}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    probed = pd.read_parquet(run / "probes.parquet")
    assert probed.groupby("prompt_id")["prompt_kind"].first().to_dict() == {0: "mc", 1: "gen"}
    assert json.loads((run / "summary.json").read_text())["probes"]["nonfinite_values"] == 0
    items = pd.read_parquet(run / "items.parquet")
    measured = items.dropna(subset=["h_one_minus_cos"])  # probe.n_items=2 of each task's 4 evaluated items
    assert sorted(measured["task"]) == ["arith_gen", "arith_gen", "word_cloze", "word_cloze"]
    assert (measured["h_one_minus_cos"] > 0).all() and np.isfinite(measured["answer_kl"]).all()
