"""Tasks computed directly on the in-memory model (what lm-eval cannot express), beside lm-eval's.

* perplexity under the reference protocol (``task.ppl_protocol=reference``): ``pydoc_ppl``
  (offline) and ``wikitext`` (Hub) -- :mod:`prunerep.evals.perplexity`. Under the default
  ``lm_eval`` protocol the same names run through lm-eval instead (``pydoc_ppl`` is then an
  offline lm-eval YAML task, ``wikitext`` lm-eval's own).
* retrieval in the embedding space: ``code_retrieval`` (offline) and ``beir_scifact`` (Hub) --
  :mod:`prunerep.evals.retrieval`.

Their entries have the shape of lm-eval's (type, metric, score, stderr, n, ...), so
:func:`prunerep.evals.evaluate_model` merges them into the same dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PERPLEXITY = "perplexity"
RETRIEVAL = "retrieval"


@dataclass(frozen=True)
class DirectTask:
    name: str
    type: str  # "perplexity" | "retrieval"
    metric: str
    offline: bool  # runs without network
    dataset: str | None  # the Hub dataset a hub task needs (named when the Hub cannot be reached)
    description: str
    reference_only: bool = False  # direct only under task.ppl_protocol=reference (else lm-eval runs it)


DIRECT_TASKS: dict[str, DirectTask] = {t.name: t for t in [
    DirectTask("pydoc_ppl", PERPLEXITY, "token_perplexity", True, None,
               "pydoc topics held out of calibration, reference perplexity protocol", reference_only=True),
    DirectTask("wikitext", PERPLEXITY, "token_perplexity", False, "Salesforce/wikitext",
               "WikiText-2 raw test, reference perplexity protocol (Wanda / SparseGPT eval_ppl)",
               reference_only=True),
    DirectTask("code_retrieval", RETRIEVAL, "ndcg@10", True, None,
               "HumanEval descriptions -> signature + canonical solution, embedding retrieval"),
    DirectTask("beir_scifact", RETRIEVAL, "ndcg@10", False, "mteb/scifact",
               "BEIR SciFact (claims -> abstracts), embedding retrieval"),
]}


#: the task settings of these tasks and their defaults (prunerep.config.TaskConfig); read with
#: :func:`setting`, so a task config without them (an older TaskConfig) still works
DEFAULTS = {"ppl_protocol": "lm_eval", "ppl_seqlen": None, "ppl_chars": None, "retrieval_pooling": "last",
            "retrieval_n": 24, "retrieval_max_tokens": 256}


def setting(task_cfg, key: str):
    """``task_cfg.<key>``, or its default from :data:`DEFAULTS` where the config lacks it."""
    try:
        return getattr(task_cfg, key)
    except (AttributeError, KeyError):
        return DEFAULTS[key]
    except Exception:  # an OmegaConf node refusing an unknown key
        return DEFAULTS[key]


def is_direct(name: str, task_cfg) -> bool:
    """Whether ``name`` is computed here rather than by lm-eval, under ``task_cfg``."""
    spec = DIRECT_TASKS.get(name)
    if spec is None:
        return False
    return not spec.reference_only or str(setting(task_cfg, "ppl_protocol")) == "reference"


def run_direct(name: str, model, tokenizer, task_cfg) -> dict:
    """The entry of direct task ``name`` (hub datasets are loaded with the network as is)."""
    spec = DIRECT_TASKS[name]
    if spec.type == PERPLEXITY:
        from prunerep.evals.perplexity import run_reference

        return run_reference(name, model, tokenizer, task_cfg)
    from prunerep.evals.retrieval import run_task

    return run_task(name, model, tokenizer, task_cfg)
