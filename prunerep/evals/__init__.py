"""Evaluation stage: lm-evaluation-harness on the in-memory model, dense vs pruned.

Public API (what the pipeline calls)::

    validate_tasks(task_cfg) -> None                      # before any heavy work
    evaluate_model(model, tokenizer, task_cfg, workdir) -> dict
    dense_scores(model, tokenizer, task_cfg, cache_dir, model_key) -> dict   # cached on disk
    compare_evals(dense, pruned) -> dict                  # the contents of evals.json
    format_evals_table(evals) -> str

``evaluate_model`` returns, per requested task name::

    {"type": "generative" | "multiple_choice" | "perplexity" | "retrieval", "metric": "acc", "filter": "none",
     "score": float, "stderr": float | None, "n": int, "num_fewshot": int,
     "all_metrics": {"acc,none": ..}, "eval_seconds": float,
     "chance": float,                     # multiple choice: mean 1/#options
     "generations": [{"doc_id", "text", "tokens", "extracted", "target", <metric>}]}  # generative
    # or, for a task that did not run:
    {"type": .., "metric": .., "skipped": True, "reason": "..."}

Offline tasks (``task=offline``, no network): ``mmlu_dev``, ``arith_mc``, ``arith_gen``,
``pydoc_ppl`` (perplexity), ``code_retrieval`` (retrieval), ``humaneval`` (opt-in code
execution); see :mod:`prunerep.evals.taskdefs` and :mod:`prunerep.evals.direct`. Perplexity
entries (type ``"perplexity"``) are lower-is-better (``higher_is_better: false``); retrieval
entries (type ``"retrieval"``) carry nDCG@10 / recall@1 / recall@10 and their embeddings.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from prunerep.evals.compare import compare_evals, format_evals_table
from prunerep.evals.validate import validate_tasks
from prunerep.results.store import ABSENT, CacheInvalid, cache_lock, read_checked_json, stable_hash, write_checked_json

log = logging.getLogger(__name__)

__all__ = ["evaluate_model", "dense_scores", "compare_evals", "format_evals_table", "validate_tasks",
           "task_settings"]

# bump when the result format or the offline tasks change: old dense caches are then ignored
EVAL_FORMAT_VERSION = 3  # 2: checksummed cache entries; 3: option_picks of multiple-choice tasks


def evaluate_model(model, tokenizer, task_cfg, workdir) -> dict:
    """Evaluate the in-memory ``model`` on ``task_cfg.tasks``; {} for ``task=none`` / no tasks.

    lm-eval tasks run in one ``simple_evaluate``; the tasks lm-eval cannot express (retrieval
    from embeddings, the reference perplexity protocol: :mod:`prunerep.evals.direct`) run on the
    model directly. The entries come back in the requested order. Generated task YAMLs and data
    go to ``<workdir>/tasks`` and ``<workdir>/data``."""
    from prunerep.evals import direct, harness

    names = harness.requested_tasks(task_cfg)
    if not names:
        return {}
    direct_names = [n for n in names if direct.is_direct(n, task_cfg)]
    lm_names = [n for n in names if n not in direct_names]
    done: dict[str, dict] = {}
    if lm_names:
        done.update(_evaluate_lm_eval(model, tokenizer, _with_tasks(task_cfg, lm_names), workdir))
    for name in direct_names:
        with harness.hub_offline(bool(task_cfg.offline)):
            done[name] = {name: direct.run_direct(name, model, tokenizer, task_cfg)}
    return {k: v for n in names for k, v in done[n].items()}


def _with_tasks(task_cfg, tasks: list[str]):
    """A copy of ``task_cfg`` with ``tasks`` replaced."""
    if dataclasses.is_dataclass(task_cfg):
        return dataclasses.replace(task_cfg, tasks=list(tasks))
    import copy

    cfg = copy.deepcopy(task_cfg)
    try:
        cfg.tasks = list(tasks)
    except Exception:  # a read-only OmegaConf node
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=True), {"tasks": list(tasks)})
    return cfg


def _evaluate_lm_eval(model, tokenizer, task_cfg, workdir) -> dict[str, dict]:
    """lm-eval's part: {requested name: {result key: entry}} (a group expands to its tasks)."""
    from prunerep.evals import harness

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
            out[p.name] = {p.name: harness.skipped_entry(p)}
        else:
            out[p.name] = {k: results[k] for k in keys[p.name]}
    _note_debias(out, task_cfg)
    return out


def _note_debias(out: dict[str, dict], task_cfg) -> None:
    """Under task.mc_debias=permute, say on each multiple-choice entry that was NOT permuted why."""
    from prunerep.evals.taskdefs import OFFLINE_TASKS, debias_mode

    if debias_mode(task_cfg) != "permute":
        return
    hub = []
    for name, entries in out.items():
        for key, e in entries.items():
            if e.get("type") != "multiple_choice" or e.get("skipped") or e.get("debias"):
                continue
            if key in OFFLINE_TASKS:
                reason = "cloze: the options are the answer texts, their order is not shown to the model"
            else:
                reason = "an lm-eval task: scored as lm-eval defines it (only prunerep's lettered tasks are permuted)"
                hub.append(key)
            e["debias"] = {"mode": "none", "reason": reason}
    if hub:
        log.warning("task.mc_debias=permute: %s scored as lm-eval defines them; only prunerep's lettered "
                    "offline tasks are permuted", ", ".join(hub))


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
    the dense model once. Pass a ``model_key`` that changes when the dense weights change.

    The file holds ``{"sha256", "payload"}``: an entry that does not match its checksum (edited,
    truncated, replaced by ``{}``) is never used; it is named in a warning and recomputed.
    Processes needing the same entry at once take its lock (``<hash>.json.lock``): one
    evaluates, the others wait and read its result."""
    from importlib.metadata import version

    from prunerep.evals import harness

    if not harness.requested_tasks(task_cfg):
        return {}
    key = stable_hash(model_key, task_settings(task_cfg), version("lm_eval"), EVAL_FORMAT_VERSION)
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
        scores = evaluate_model(model, tokenizer, task_cfg, path.parent / "work" / key)
        write_checked_json(path, scores)
    log.info("dense scores computed in %.1fs, cached at %s", time.perf_counter() - t0, path)
    return scores


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
