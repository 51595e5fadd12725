"""Evaluation stage: lm-evaluation-harness on the in-memory model, dense vs pruned.

Public API (what the pipeline calls)::

    validate_tasks(task_cfg) -> None                      # before any heavy work
    evaluate_model(model, tokenizer, task_cfg, workdir) -> dict
    dense_scores(model, tokenizer, task_cfg, cache_dir, model_key) -> dict   # cached on disk
    compare_evals(dense, pruned) -> dict                  # the contents of evals.json
    format_evals_table(evals) -> str

``evaluate_model`` returns, per requested task name::

    {"type": "generative" | "multiple_choice", "metric": "acc", "filter": "none",
     "score": float, "stderr": float | None, "n": int, "num_fewshot": int,
     "all_metrics": {"acc,none": ..}, "eval_seconds": float,
     "chance": float,                     # multiple choice: mean 1/#options
     "generations": [{"doc_id", "text", "tokens", "extracted", "target", <metric>}]}  # generative
    # or, for a task that did not run:
    {"type": .., "metric": .., "skipped": True, "reason": "..."}

Offline tasks (``task=offline``, no network): ``mmlu_dev``, ``arith_mc``, ``arith_gen``,
``humaneval`` (opt-in code execution); see :mod:`prunerep.evals.taskdefs`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from prunerep.evals.compare import compare_evals, format_evals_table
from prunerep.evals.validate import validate_tasks
from prunerep.io import atomic_write_json, read_json, stable_hash

log = logging.getLogger(__name__)

__all__ = ["evaluate_model", "dense_scores", "compare_evals", "format_evals_table", "validate_tasks",
           "task_settings"]

# bump when the result format or the offline tasks change: old dense caches are then ignored
EVAL_FORMAT_VERSION = 1


def evaluate_model(model, tokenizer, task_cfg, workdir) -> dict:
    """Evaluate the in-memory ``model`` on ``task_cfg.tasks``; {} for ``task=none`` / no tasks.

    Generated task YAMLs and data go to ``<workdir>/tasks`` and ``<workdir>/data``."""
    from prunerep.evals import harness

    names = harness.requested_tasks(task_cfg)
    if not names:
        return {}
    plans = harness.plan_tasks(task_cfg)
    tm = None
    if any(p.source == "hub" for p in plans):
        tm = harness.make_task_manager(workdir, include_defaults=True)
        plans = harness.plan_tasks(task_cfg, tm)
    out: dict[str, dict] = {}
    for p in plans:
        if p.skip_reason:
            log.warning("skipping task %s: %s", p.name, p.skip_reason)
    runnable = [p for p in plans if not p.skip_reason]
    results, keys, seconds = {}, {}, 0.0
    if runnable:
        res, keys, seconds = harness.run_lm_eval(model, tokenizer, runnable, task_cfg, workdir, tm)
        results = {k: harness.summarize(res, k, tokenizer, seconds) for ks in keys.values() for k in ks}
        log.info("evaluated %s in %.1fs", ", ".join(results), seconds)
    for p in plans:
        if p.skip_reason:
            out[p.name] = harness.skipped_entry(p)
        else:
            out.update({k: results[k] for k in keys[p.name]})
    return out


def task_settings(task_cfg) -> dict:
    """The task settings as a plain dict (OmegaConf node or dataclass)."""
    if dataclasses.is_dataclass(task_cfg):
        return dataclasses.asdict(task_cfg)
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(task_cfg, resolve=True)
    except Exception:  # a plain mapping
        return dict(task_cfg)


def dense_scores(model, tokenizer, task_cfg, cache_dir, model_key: str) -> dict:
    """:func:`evaluate_model`, cached as ``<cache_dir>/evals/<hash>.json`` (atomic write).

    The hash covers ``model_key`` (say, the model config and its weights' identity), every
    task setting, lm-eval's version and :data:`EVAL_FORMAT_VERSION`, so a sweep evaluates
    the dense model once. Pass a ``model_key`` that changes when the dense weights change."""
    from importlib.metadata import version

    from prunerep.evals import harness

    if not harness.requested_tasks(task_cfg):
        return {}
    key = stable_hash(model_key, task_settings(task_cfg), version("lm_eval"), EVAL_FORMAT_VERSION)
    path = Path(cache_dir).expanduser() / "evals" / f"{key}.json"
    if path.is_file():
        log.info("dense scores from %s", path)
        return read_json(path)
    t0 = time.perf_counter()
    scores = evaluate_model(model, tokenizer, task_cfg, path.parent / "work" / key)
    atomic_write_json(path, scores)
    log.info("dense scores computed in %.1fs, cached at %s", time.perf_counter() - t0, path)
    return scores
