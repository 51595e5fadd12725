"""Offline evaluation data: the MMLU parser, the arithmetic generator, HumanEval, task YAMLs."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from prunerep.config import TaskConfig
from prunerep.evals import offline
from prunerep.evals.taskfiles import read_task_yaml, write_task_yaml
from prunerep.evals.taskspec import TASKS

OFFLINE_TASKS = {n: t for n, t in TASKS.items() if t.yaml}


# --------------------------------------------------------------------------- MMLU

def test_mmlu_questions_are_well_formed():
    qs = offline.load_mmlu_questions()
    raw = json.loads(offline.mmlu_prompts_path().read_text(encoding="utf-8"))
    # every subject of the file contributes, and every question is a 4-option MC item
    assert {q["subject"] for q in qs} == set(raw)
    for q in qs:
        assert set(q) == {"subject", "question", "choices", "answer"}
        assert q["question"] and not q["question"].startswith("Q:")
        assert len(q["choices"]) == 4 and all(isinstance(c, str) and c for c in q["choices"])
        assert q["answer"] in (0, 1, 2, 3)
        assert "Let's think step by step" not in q["question"]  # the reasoning is dropped
        assert not any(re.search(r"\([A-E]\) ", c) for c in q["choices"])
    # 282 question blocks in lm-eval 0.4.x; the one with a fifth option (E) is refused
    n_blocks = sum(len(re.split(r"\n\n(?=Q: )", t)) - 1 for t in raw.values())
    n_five = sum(1 for t in raw.values() for b in re.split(r"\n\n(?=Q: )", t)[1:]
                 if re.search(r"\(E\) ", b.partition("\nA: ")[0]))
    assert len(qs) == n_blocks - n_five == 281


def test_mmlu_answers_match_the_worked_solution():
    """Independent check: the answer letter is the last '(X)' the worked reasoning names."""
    raw = json.loads(offline.mmlu_prompts_path().read_text(encoding="utf-8"))
    by_question = {(q["subject"], q["question"]): q for q in offline.load_mmlu_questions()}
    checked = 0
    for subject, text in raw.items():
        for block in text.split("\n\nQ: ")[1:]:
            head, _, reasoning = block.partition("\nA: ")
            q = by_question.get((subject, head.partition("\n(A) ")[0].strip()))
            if q is None:
                continue
            letter = reasoning.rsplit("answer is (", 1)[1][0]
            assert "ABCD"[q["answer"]] == letter
            checked += 1
    assert checked >= 270


def test_mmlu_returns_fresh_copies():
    a = offline.load_mmlu_questions()
    a[0]["choices"].append("x")
    assert len(offline.load_mmlu_questions()[0]["choices"]) == 4


# --------------------------------------------------------------------------- arithmetic

_FORMULA = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


@pytest.mark.parametrize("kinds", [offline.DEFAULT_ARITH_KINDS, tuple(offline.ARITH_KINDS)])
def test_arithmetic_answers_recomputed_from_the_question(kinds):
    probs = offline.arithmetic_problems(300, seed=7, kinds=kinds)
    assert {p["kind"] for p in probs} == set(kinds)
    for i, p in enumerate(probs):
        assert p["id"] == i
        operands = [int(x) for x in re.findall(r"\d+", p["question"])]
        assert len(operands) == 2, p
        assert p["answer"] == _FORMULA[p["kind"].removesuffix("_story")](*operands) > 0
        assert len(p["choices"]) == 4 and len(set(p["choices"])) == 4
        assert all(c.isdigit() and int(c) > 0 for c in p["choices"])
        assert p["choices"][p["answer_idx"]] == str(p["answer"])
        assert sum(c == str(p["answer"]) for c in p["choices"]) == 1
    # the right answer is not always in the same slot
    assert len({p["answer_idx"] for p in probs}) == 4


def test_arithmetic_is_deterministic_per_seed_and_prefix_stable():
    a = offline.arithmetic_problems(50, seed=3)
    assert a == offline.arithmetic_problems(50, seed=3)
    assert a[:20] == offline.arithmetic_problems(20, seed=3)
    assert a != offline.arithmetic_problems(50, seed=4)
    with pytest.raises(ValueError):
        offline.arithmetic_problems(5, kinds=("division",))


# --------------------------------------------------------------------------- HumanEval, YAMLs

def test_humaneval_is_read_from_the_installed_package():
    probs = offline.load_humaneval()
    assert len(probs) == 164
    assert all({"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in probs)


def test_offline_task_yamls_point_at_local_files(tmp_path):
    tc = TaskConfig(name="offline", tasks=list(OFFLINE_TASKS), num_fewshot=2, n_arith=30)
    for name, spec in OFFLINE_TASKS.items():
        path = write_task_yaml(name, tc, tmp_path)
        text = path.read_text()
        cfg = yaml.load(text, Loader=yaml.BaseLoader)  # tolerant of the !function tag
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        for f in cfg["dataset_kwargs"]["data_files"].values():
            assert f.startswith(str(tmp_path)) and (tmp_path / "data").exists()
            with open(f) as fh:
                assert sum(1 for _ in fh) > 0
        assert int(cfg["num_fewshot"]) == (0 if spec.fixed_fewshot else 2)
        assert ("unsafe_code" in cfg) == spec.unsafe
    # the run-time settings are filled in where the task's YAML leaves them open
    gen_kwargs = {n: read_task_yaml(tmp_path / "tasks" / f"{n}.yaml")["generation_kwargs"]["max_gen_toks"]
                  for n in ("arith_gen", "word_gen", "humaneval")}
    assert gen_kwargs == {"arith_gen": tc.max_gen_toks, "word_gen": 4, "humaneval": tc.code_max_gen_toks}
    gen = (tmp_path / "tasks" / "arith_gen.yaml").read_text()
    mc = (tmp_path / "tasks" / "arith_mc.yaml").read_text()
    # the generative and the MC arithmetic tasks read the same problems
    files = lambda t: yaml.safe_load(t)["dataset_kwargs"]["data_files"]  # noqa: E731
    assert files(gen) == files(mc)


# --------------------------------------------------------------------------- next word (word_cloze)

TEXT = ("the quick brown fox jumps over the lazy sleeping hound while seven small birds watch from "
        "a nearby garden wall and every morning the farmer counts twelve green apples before walking "
        "slowly towards the river where children gather smooth stones beside tall silver reeds")


def test_next_word_problems_are_the_words_that_follow_their_contexts():
    probs = offline.next_word_problems([TEXT], n=3, seed=0, context_words=8)
    assert len(probs) == 3
    for p in probs:
        # the context is the 8 words before the answer, and the text goes on with " <answer>"
        assert len(p["context"].split()) == 8 and (p["context"] + " " + p["answer"]) in TEXT
        assert p["choices"][p["answer_idx"]] == p["answer"] and len(set(p["choices"])) == 4
        context_words = set(p["context"].split())
        distractors = [d for i, d in enumerate(p["choices"]) if i != p["answer_idx"]]
        assert len(distractors) == 3
        for d in distractors:  # words of the text, length within one letter, not in the context
            assert d in TEXT.split() and abs(len(d) - len(p["answer"])) <= 1 and d not in context_words
    starts = [TEXT.index(p["context"] + " " + p["answer"]) for p in probs]
    assert starts == sorted(starts)  # drawn in text order
    # deterministic per seed, prefix-stable in n
    assert offline.next_word_problems([TEXT], n=3, seed=0, context_words=8) == probs
    assert offline.next_word_problems([TEXT], n=2, seed=0, context_words=8) == probs[:2]


def test_word_cloze_reads_held_out_text_only():
    """word_cloze's contexts come from the pydoc topics held out of calibration (like pydoc_ppl)."""
    from prunerep.calibration import pydoc_text

    probs = offline.next_word_problems(offline.pydoc_eval_docs(), n=40, seed=1234)
    assert len(probs) == 40
    calib = pydoc_text()
    for p in probs:
        assert p["context"][-60:] not in calib


def test_every_task_yaml_of_the_package_is_a_registered_task():
    from prunerep.evals.taskspec import TASKS_DIR

    tasks = {p.stem for p in TASKS_DIR.glob("*.yaml") if not p.stem.startswith("_")}
    assert tasks == set(OFFLINE_TASKS) and all(TASKS[n].yaml.is_file() for n in OFFLINE_TASKS)
