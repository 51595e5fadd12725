"""The prompts the probes run on: multiple-choice questions and generative problems.

``probe.prompts=offline``: half MMLU questions formatted as multiple choice
(option tokens " A" " B" " C" " D", probed at the answer position), half arithmetic word
problems used generatively (greedy continuation: teacher-forced and free-running
contexts). Both come from :mod:`prunerep.evals.offline` (installed packages, no network).

``probe.prompts=tasks``: the run's own evaluated items (:func:`task_prompts`): the contexts lm-eval
and the offline tasks sent the dense model, identified by task and document id, half from the
multiple-choice tasks (the options are the task's own continuations) and half from the
generative ones, taken in turn from each task. ``probe.prompts=auto`` (the default): those where
the run evaluates such items, else the offline prompts.

``probe.prompts=path/to/file.jsonl``: one JSON object per line,
``{"prompt": str, "options": [str, ...]}`` with ``options`` optional; a prompt with
options is multiple choice (its options' first tokens are the option subspace), one
without is generative. The first ``n_prompts`` lines are used, in file order.

``probe.chat_template`` (auto: on when the tokenizer has a chat template) puts each prompt in the
user turn of the tokenizer's chat template, ending at the assistant's turn
(:func:`prunerep.model.chat.as_user_turn`); the options stay as given.

Token ids are computed here once; the dense reference caches them, so the dense and the
pruned side always see the same ids. Prompts longer than ``max_prompt_tokens`` keep
their last tokens (the answer position of a question is at the end).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from prunerep.errors import ConfigError
from prunerep.evals.offline import arithmetic_problems, load_mmlu_questions
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE
from prunerep.model import chat

log = logging.getLogger(__name__)

LETTERS = "ABCD"
#: probe.prompts: the evaluated items where the run has some, else the offline prompts (auto); the
#: evaluated items (tasks); the fixed offline prompts (offline)
AUTO, FROM_TASKS, OFFLINE = "auto", "tasks", "offline"


@dataclass(frozen=True)
class Prompt:
    id: int
    kind: str  # "mc" (multiple choice: prompt context + option subspace) | "gen" (generative)
    text: str
    ids: tuple[int, ...]
    options: tuple[str, ...] = ()
    option_ids: tuple[int, ...] = ()  # first token of each option
    answer: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "text": self.text, "ids": list(self.ids),
               "options": list(self.options), "option_ids": list(self.option_ids), "answer": self.answer}
        if "task" in self.meta:  # an evaluated item (probe.prompts=tasks): which one
            out.update(task=self.meta["task"], doc_id=self.meta["doc_id"])
        return out


def format_mc(question: str, choices: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def format_gen(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _offline_items(n: int, seed: int) -> list[dict]:
    n_mc = n // 2
    n_gen = n - n_mc
    questions = load_mmlu_questions()
    rng = random.Random(seed)
    picked = rng.sample(range(len(questions)), min(n_mc, len(questions)))
    items = []
    for i in picked:
        q = questions[i]
        items.append({"prompt": format_mc(q["question"], q["choices"]), "options": [f" {c}" for c in LETTERS],
                      "answer": f" {LETTERS[q['answer']]}", "meta": {"source": "mmlu", "subject": q["subject"]}})
    for p in arithmetic_problems(n_gen, seed):
        items.append({"prompt": format_gen(p["question"]), "answer": str(p["answer"]),
                      "meta": {"source": "arithmetic", "kind": p.get("kind")}})
    return items


def read_prompts_file(path: Path, n: int) -> list[dict]:
    """The first ``n`` items of a prompts JSONL file; a malformed one raises ValueError (one line)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str, "options": [str, ...]}}')
            if not d["prompt"].strip():
                raise ValueError(f"{path}:{lineno}: the prompt is empty")
            options = d.get("options")
            if options is not None:
                if not isinstance(options, list) or not all(isinstance(o, str) and o for o in options):
                    raise ValueError(f"{path}:{lineno}: options must be a list of non-empty strings")
                if len(options) < 2 or len(set(options)) != len(options):
                    raise ValueError(f"{path}:{lineno}: options must be two or more distinct strings")
            items.append(d)
            if len(items) >= n:
                break
    return items


def _option_ids(tokenizer, options: list[str], where: str) -> tuple[int, ...]:
    ids = []
    for opt in options:
        toks = tokenizer.encode(opt, add_special_tokens=False)
        if not toks:
            raise ValueError(f"{where}: option {opt!r} encodes to no token")
        if len(toks) > 1:
            log.debug("%s: option %r is %d tokens; its first token stands for it", where, opt, len(toks))
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: options {options!r} do not start with distinct tokens")
    return tuple(ids)


def load_prompts(tokenizer, source: str, n: int, seed: int, max_len: int, chat_template=False) -> list[Prompt]:
    """The first ``n`` probe prompts of ``source`` (``offline`` or a JSONL file), tokenised and cut to
    their last ``max_len`` tokens; deterministic given ``seed`` (probe.prompts, n_prompts, seed,
    max_prompt_tokens). ``chat_template`` (probe.chat_template: auto, True, False): each prompt as
    the user turn of the tokenizer's chat template (its text, and so the dense cache's key, then
    holds the template)."""
    if n <= 0:
        return []
    if source == OFFLINE:
        items = _offline_items(n, seed)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"probe.prompts={source!r}: use 'offline' or a readable .jsonl file")
        items = read_prompts_file(path, n)
    templated = chat.resolve(chat_template, tokenizer, "probe.chat_template")
    prompts = []
    for i, item in enumerate(items):
        text = chat.as_user_turn(tokenizer, item["prompt"]) if templated else item["prompt"]
        # the template already holds the special tokens the model's chat format starts with
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if templated else tokenizer(text)["input_ids"]
        if len(ids) > max_len:
            log.warning("probe prompt %d has %d tokens; keeping its last %d (probe.max_prompt_tokens)",
                        i, len(ids), max_len)
            ids = ids[-max_len:]
        options = list(item.get("options") or [])
        prompts.append(Prompt(
            id=i, kind="mc" if options else "gen", text=text, ids=tuple(int(t) for t in ids),
            options=tuple(options), option_ids=_option_ids(tokenizer, options, f"prompt {i}") if options else (),
            answer=item.get("answer"), meta=dict(item.get("meta") or {})))
    return prompts


def scored_requests(dense_scores: dict | None) -> list[tuple[str, str, list[dict], bool]]:
    """``(task, family, requests, several leaves)`` of every multiple-choice and generative dense
    entry that kept the requests of its scored items (:func:`prunerep.evals.harness.item_requests`).
    A multiple-choice entry of several leaves is left out: those are the rotations of a permuted
    task, whose items are not the scored ones."""
    out = []
    for name, entry in (dense_scores or {}).items():
        family, recs = entry.get("type"), entry.get("items")
        if family not in (MULTIPLE_CHOICE, GENERATIVE) or entry.get("skipped") or not recs:
            continue
        several = len({r["task"] for r in recs}) > 1
        if not (family == MULTIPLE_CHOICE and several):
            out.append((name, family, recs, several))
    return out


def context_ids(tokenizer, context: str, max_len: int) -> tuple[int, ...]:
    """An item's context tokenised as lm-eval did (no special tokens added: the context holds the
    chat template when the evaluation used one), cut to its last ``max_len`` tokens."""
    return tuple(int(t) for t in tokenizer(context, add_special_tokens=False)["input_ids"][-max_len:])


def _first_tokens(tokenizer, options: list[str]) -> tuple[int, ...] | None:
    try:
        return _option_ids(tokenizer, options, "item")
    except ValueError:  # options that start alike (or encode to nothing) have no option subspace
        return None


def task_prompts(tokenizer, dense_scores: dict, n: int, max_len: int) -> list[Prompt]:
    """``probe.prompts=tasks``: ``n`` of the evaluated items (:func:`scored_requests`), half
    multiple choice and half generative (all of one family where the other has none), taken in
    turn from each task in document order, tokenised by :func:`context_ids`; one item per source
    document where the items name one (word_cloze's passages of one pydoc topic share their text).
    A multiple-choice item whose options do not start with distinct tokens is passed over: the
    probes' option subspace is the options' first tokens (numbers such as " 56" and " 58" share
    " 5" in many vocabularies; the item probes' option distribution, from the summed
    log-likelihoods, covers those items)."""
    per_family: dict[str, list[list[Prompt]]] = {MULTIPLE_CHOICE: [], GENERATIVE: []}
    for name, family, recs, several in scored_requests(dense_scores):
        got, passed_over, sources = [], 0, set()
        for rec in recs:
            if "source" in rec:  # items cut from one document are not independent units: one per document
                if rec["source"] in sources:
                    continue
                sources.add(rec["source"])
            options = list(rec.get("continuations") or []) if family == MULTIPLE_CHOICE else []
            option_ids = _first_tokens(tokenizer, options) if options else ()
            if family == MULTIPLE_CHOICE and not option_ids:
                passed_over += 1
                continue
            ids = context_ids(tokenizer, rec["context"], max_len)
            if ids:
                got.append(Prompt(id=0, kind="mc" if options else "gen", text=rec["context"], ids=ids,
                                  options=tuple(options), option_ids=option_ids,
                                  meta={"task": rec["task"] if several else name, "doc_id": int(rec["doc_id"])}))
        if passed_over:
            log.info("probe.prompts=tasks: %d of %s's %d items passed over: their options do not start with "
                     "distinct tokens (items.parquet keeps their option distribution)", passed_over, name, len(recs))
        if got:
            per_family[family].append(got)
    mc, gen = (_in_turn(per_family[f]) for f in (MULTIPLE_CHOICE, GENERATIVE))
    n_mc = min(n // 2 if gen else n, len(mc))
    return [dataclasses.replace(pr, id=i) for i, pr in enumerate(mc[:n_mc] + gen[:n - n_mc])]


def _in_turn(tasks: list[list[Prompt]]) -> list[Prompt]:
    """The items of several tasks taken one from each task in turn."""
    out = []
    for i in range(max((len(t) for t in tasks), default=0)):
        out += [t[i] for t in tasks if i < len(t)]
    return out


def probe_prompts(tokenizer, source: str, n: int, seed: int, max_len: int, chat_template=False,
                  dense_scores: dict | None = None) -> list[Prompt]:
    """The prompts ``probe.prompts=source`` names: :func:`task_prompts` of ``dense_scores`` for
    ``tasks`` (none is bad input) and for ``auto`` where there are some, else :func:`load_prompts`
    (the offline prompts for ``auto``). The choice is logged, the evaluated items by task and document."""
    if source in (AUTO, FROM_TASKS):
        prompts = task_prompts(tokenizer, dense_scores or {}, n, max_len)
        if prompts:
            log.info("probe prompts: the evaluated items %s (prompt id: task:document)",
                     ", ".join(f"{pr.id}={pr.meta['task']}:{pr.meta['doc_id']}" for pr in prompts))
            return prompts
        if source == FROM_TASKS:
            raise ConfigError(f"probe.prompts={FROM_TASKS}: the tasks {sorted(dense_scores or {})} kept no multiple-"
                              f"choice or generative item to probe; use probe.prompts={OFFLINE}")
        log.info("probe prompts: the offline prompts (probe.prompts=auto: no evaluated multiple-choice or "
                 "generative item)")
        source = OFFLINE
    return load_prompts(tokenizer, source, n, seed, max_len, chat_template)
