"""Evaluation stage: the in-memory model on its tasks, dense vs pruned.

Public API (what the pipeline calls)::

    validate_tasks(task) -> None                          # before any heavy work
    evaluate_model(model, tokenizer, task, workdir) -> dict
    dense_scores(model, tokenizer, task, cache_dir, model_key) -> dict   # cached on disk
    compare_evals(dense, pruned) -> EvalsReport           # evals.json (prunerep.results.schema)

``task`` is a :class:`prunerep.config.TaskConfig` (a structured OmegaConf node of one is
converted). ``evaluate_model`` returns, per requested task name::

    {"type": <family, prunerep.evals.taskspec>, "metric": "acc", "filter": "none",
     "score": float, "stderr": float | None, "n": int, "num_fewshot": int,
     "all_metrics": {"acc,none": ..}, "eval_seconds": float,
     "chance": float,                     # multiple choice: mean 1/#options
     "generations": [{"doc_id", "text", "tokens", "extracted", "target", <metric>}]}  # generative
    # or, for a task that did not run:
    {"type": .., "metric": .., "skipped": True, "reason": "..."}

Tasks are :data:`prunerep.evals.taskspec.TASKS` or lm-eval's. lm-eval runs the lm-eval tasks
(:mod:`prunerep.evals.harness`); perplexity under the reference protocol
(:mod:`prunerep.evals.perplexity`) and retrieval from the model's embeddings
(:mod:`prunerep.evals.retrieval`), which lm-eval cannot express, run on the model directly.
Perplexity entries are lower-is-better (``higher_is_better: false``); retrieval entries carry
nDCG@10 / recall@1 / recall@10 and their embeddings.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from importlib.metadata import version
from pathlib import Path

from omegaconf import OmegaConf

from prunerep.config import TaskConfig
from prunerep.evals.compare import compare_evals
from prunerep.evals.perplexity import run_reference
from prunerep.evals.retrieval import run_task
from prunerep.evals.taskspec import EMBEDDING_RETRIEVAL, LM_EVAL, REFERENCE_PPL, requested, runner
from prunerep.evals.validate import validate_tasks
from prunerep.model import chat
from prunerep.results.store import ABSENT, CacheInvalid, cache_lock, read_checked_json, stable_hash, write_checked_json

log = logging.getLogger(__name__)

__all__ = ["evaluate_model", "dense_scores", "compare_evals", "validate_tasks"]

# bump when the result format or the offline tasks change: old dense caches are then ignored
EVAL_FORMAT_VERSION = 5  # 2: checksummed cache entries; 3: option_picks of multiple-choice tasks;
# 4: per_query (retrieval) and items (requests); 5: the items' source


def _task_config(task) -> TaskConfig:
    """``task`` as a TaskConfig: callers may hand the structured OmegaConf node of one."""
    return task if task is None or isinstance(task, TaskConfig) else OmegaConf.to_object(task)


def evaluate_model(model, tokenizer, task: TaskConfig, workdir) -> dict:
    """Evaluate the in-memory ``model`` on ``task.tasks``; {} for ``task=none`` / no tasks.

    lm-eval's tasks run in one ``simple_evaluate``; the others on the model directly. The entries
    come back in the requested order. Generated task YAMLs and data go to ``<workdir>/tasks`` and
    ``<workdir>/data``."""
    task = _task_config(task)
    if not (names := requested(task)):
        return {}
    from prunerep.evals import harness  # imports lm-eval (seconds): not on `import prunerep.evals`, nor for task=none

    how = {n: runner(n, task) for n in names}
    lm_names = [n for n in names if how[n] == LM_EVAL]
    done = harness.evaluate(model, tokenizer, dataclasses.replace(task, tasks=lm_names), workdir) if lm_names else {}
    run = {REFERENCE_PPL: run_reference, EMBEDDING_RETRIEVAL: run_task}
    for name in (n for n in names if how[n] != LM_EVAL):
        with harness.hub_offline(task.offline):
            done[name] = {name: run[how[name]](name, model, tokenizer, task)}
    return {k: v for n in names for k, v in done[n].items()}


def dense_scores(model, tokenizer, task: TaskConfig, cache_dir, model_key: str) -> dict:
    """:func:`evaluate_model`, cached as ``<cache_dir>/evals/<hash>.json`` (atomic write).

    The hash (:func:`dense_key`) covers ``model_key`` (say, the model config and its weights'
    identity), every task setting, lm-eval's version and :data:`EVAL_FORMAT_VERSION`, so a sweep evaluates
    the dense model once. Pass a ``model_key`` that changes when the dense weights change.

    The file holds ``{"sha256", "payload"}``: an entry that does not match its checksum (edited,
    truncated, replaced by ``{}``) is never used; it is named in a warning and recomputed.
    Processes needing the same entry at once take its lock (``<hash>.json.lock``): one
    evaluates, the others wait and read its result."""
    task = _task_config(task)
    if not requested(task):
        return {}
    key = dense_key(task, tokenizer, model_key)
    path = Path(cache_dir).expanduser() / "evals" / f"{key}.json"
    scores, problem = _read_cached(path)
    if problem is None:
        log.info("dense scores from %s", path)
        return scores
    with cache_lock(path, what=f"dense scores {key}"):
        scores, problem = _read_cached(path)  # another process may have computed them while this one waited
        if problem is None:
            log.info("dense scores from %s (computed by another process)", path)
            return scores
        if problem != ABSENT:
            log.warning("dense scores cache %s is not intact (%s): not used, recomputing it", path, problem)
        t0 = time.perf_counter()
        scores = evaluate_model(model, tokenizer, task, path.parent / "work" / key)
        write_checked_json(path, scores)
    log.info("dense scores computed in %.1fs, cached at %s", time.perf_counter() - t0, path)
    return scores


def dense_key(task: TaskConfig, tokenizer, model_key: str) -> str:
    """The dense scores' cache key: ``model_key``, the task settings, lm-eval's version and
    :data:`EVAL_FORMAT_VERSION`. The chat-template settings enter as what is done
    (:func:`prunerep.model.chat.resolve`): with the template off, the key is the one the settings
    had before they existed, so no cached entry of a model without a template is computed again."""
    settings = dataclasses.asdict(task)
    settings.pop("apply_chat_template")
    multiturn = settings.pop("fewshot_as_multiturn")
    if chat.resolve(task.apply_chat_template, tokenizer, "task.apply_chat_template"):
        settings["chat_template"] = {"fewshot_as_multiturn": bool(multiturn)}
    return stable_hash(model_key, settings, version("lm_eval"), EVAL_FORMAT_VERSION)


def _read_cached(path: Path) -> tuple[dict | None, str | None]:
    """(scores, None) from an intact cache entry; else (None, ABSENT or what is wrong with it)."""
    try:
        scores = read_checked_json(path)
    except FileNotFoundError:
        return None, ABSENT
    except (OSError, CacheInvalid) as e:
        return None, str(e)
    if not isinstance(scores, dict):
        return None, "not a mapping of task scores"
    return scores, None
