"""lm-evaluation-harness glue: evaluate the in-memory model, return a plain-JSON summary.

The model object is wrapped in ``HFLM(pretrained=model)`` -- never saved and reloaded -- so
weights pruned in place are what is evaluated. Both lm-eval caches stay off
(``use_cache=None``, ``cache_requests=False``): they are keyed on the model NAME and would
serve the dense model's answers to the pruned one.

Which task is what (:func:`plan_tasks`):

* a task with a YAML of prunerep's (:attr:`~prunerep.evals.taskspec.TaskSpec.yaml`) is prunerep's
  offline task, built from local data into ``<workdir>/tasks`` (with ``task=paper`` too: its
  ``humaneval`` is the offline one, whose code runs in prunerep's sandbox,
  :mod:`~prunerep.evals.codeexec`);
* any other name is an lm-eval task, group or tag from its registry (needs
  ``task.offline=false``: hub datasets).

Tasks that run model-written code (``unsafe_code`` in their config) are skipped unless
``task.allow_code_execution=true`` and the sandbox works on this machine; lm-eval's own code
tasks (which run code through ``evaluate``'s code_eval, outside any sandbox) are always skipped.
Skipped tasks are recorded as ``{"skipped": true, "reason": ...}``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals import bias, codeexec
from prunerep.evals.compare import finite_or_none
from prunerep.evals.hflm import BoundedHFLM
from prunerep.evals.perplexity import rolling_entry
from prunerep.evals.taskfiles import write_task_yaml
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, OFFLINE_NAMES, PERPLEXITY, TASKS, TaskSpec, requested
from prunerep.logs import quiet_third_party
from prunerep.model import chat

log = logging.getLogger(__name__)

# preference order when an lm-eval result carries several metrics / filters
_METRIC_PREFERENCE = ["acc_norm", "acc", "exact_match", "pass@1", "pass_at_1", "f1", "bleu"]
_FILTER_PREFERENCE = ["flexible-extract", "final-number", "strict-match", "none"]


@dataclass(frozen=True)
class TaskPlan:
    name: str
    source: str  # "offline" | "hub"
    skip_reason: str | None = None


def is_offline_task(name: str) -> bool:
    """True when ``name`` resolves to prunerep's offline lm-eval task (see module docstring)."""
    return name in TASKS and TASKS[name].yaml is not None


def plan_tasks(task_cfg: TaskConfig, task_manager=None) -> list[TaskPlan]:
    """Resolve every requested name to an offline or hub task and decide what is skipped."""
    plans = []
    for name in requested(task_cfg):
        if is_offline_task(name):
            unsafe = TASKS[name].unsafe
            source = "offline"
        else:
            if task_cfg.offline:
                raise ConfigError(
                    f"task {name!r} is an lm-eval hub task but task.offline=true; set task.offline=false "
                    f"(or task=paper) to evaluate it, or pick offline tasks: {', '.join(OFFLINE_NAMES)}")
            unsafe = task_manager is not None and _hub_unsafe(task_manager, name)
            source = "hub"
        reason = None
        if unsafe and source == "hub":  # never loaded: importing its utils already sets up code_eval
            reason = (f"{name} runs model-written code through lm-eval's code_eval, outside prunerep's sandbox; "
                      f"use the offline humaneval (task.tasks=[humaneval] task.allow_code_execution=true)")
        elif unsafe and not task_cfg.allow_code_execution:
            reason = f"{name} runs model-written code; {codeexec.REFUSAL}"
        elif unsafe:
            try:
                codeexec.isolation()
            except codeexec.CodeExecutionRefused as e:
                reason = f"{name}: {e}"
        plans.append(TaskPlan(name, source, reason))
    return plans


def _hub_unsafe(tm, name: str, depth: int = 0) -> bool:
    """Whether an lm-eval task, or any task of a group/tag, is marked ``unsafe_code``."""
    entry = tm.task_index.get(name)
    if entry is None or depth > 4:
        return False
    cfg = entry.cfg or {}
    if cfg.get("unsafe_code"):
        return True
    children = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    children += [n for n, e in tm.task_index.items() if name in getattr(e, "tags", ())] if depth == 0 else []
    return any(_hub_unsafe(tm, c if isinstance(c, str) else c.get("task", ""), depth + 1) for c in children)


# --------------------------------------------------------------------------- guards

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def hub_offline(active: bool = True):
    """Force Hugging Face libraries offline for the duration (env vars AND the constants the
    libraries read at import time), so an offline evaluation cannot reach the Hub."""
    if not active:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    patched = []
    try:
        for k in _OFFLINE_ENV:
            os.environ[k] = "1"
        for modname, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                               ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
            try:
                mod = __import__(modname, fromlist=["_"])
            except ImportError:
                continue
            for a in attrs:
                if hasattr(mod, a):
                    patched.append((mod, a, getattr(mod, a)))
                    setattr(mod, a, True)
        yield
    finally:
        for mod, a, v in reversed(patched):
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _verbosity_kwargs() -> dict:
    """No ``verbosity`` for lm-eval releases where it defaults to None: passing one is deprecated
    there (an INFO line) and makes lm-eval reconfigure its logger (own handler and format, no
    propagation). Older releases, whose default is "INFO", get "WARNING"."""
    try:
        param = inspect.signature(simple_evaluate).parameters.get("verbosity")
    except (TypeError, ValueError):
        return {}
    return {} if param is None or param.default is None else {"verbosity": "WARNING"}


# --------------------------------------------------------------------------- running

def evaluate(model, tokenizer, task_cfg: TaskConfig, workdir: str | Path) -> dict[str, dict]:
    """Every task of ``task_cfg`` through lm-eval: {requested name: {result key: entry}} (a group
    or tag expands to its tasks; a skipped task is one entry saying why)."""
    plans = plan_tasks(task_cfg)
    tm = None
    if any(p.source == "hub" for p in plans):
        tm = make_task_manager(workdir, include_defaults=True)
        plans = plan_tasks(task_cfg, tm)
    for p in plans:
        if p.skip_reason:
            log.warning("skipping task %s: %s", p.name, p.skip_reason)
    runnable = [p for p in plans if not p.skip_reason]
    results, keys = {}, {}
    if runnable:
        res, keys, seconds = run_lm_eval(model, tokenizer, runnable, task_cfg, workdir, tm)
        results = {k: summarize(res, k, tokenizer, seconds) for ks in keys.values() for k in ks}
        log.info("evaluated %s in %.1fs", ", ".join(results), seconds)
    out = {p.name: {p.name: skipped_entry(p)} if p.skip_reason else {k: results[k] for k in keys[p.name]}
           for p in plans}
    if task_cfg.mc_debias == "permute":
        _note_unpermuted(out)
    return out


def _note_unpermuted(out: dict[str, dict]) -> None:
    """Under task.mc_debias=permute, say on each multiple-choice entry that was NOT permuted why."""
    hub = []
    for entries in out.values():
        for key, e in entries.items():
            if e.get("type") != MULTIPLE_CHOICE or e.get("skipped") or e.get("debias"):
                continue
            if is_offline_task(key):
                reason = "cloze: the options are the answer texts, their order is not shown to the model"
            else:
                reason = "an lm-eval task: scored as lm-eval defines it (only prunerep's lettered tasks are permuted)"
                hub.append(key)
            e["debias"] = {"mode": "none", "reason": reason}
    if hub:
        log.warning("task.mc_debias=permute: %s scored as lm-eval defines them; only prunerep's lettered "
                    "offline tasks are permuted", ", ".join(hub))


def run_lm_eval(model, tokenizer, plans: list[TaskPlan], task_cfg: TaskConfig, workdir: str | Path,
                task_manager=None):
    """One ``simple_evaluate`` over the runnable tasks.

    Returns (lm-eval results dict, {requested name: [result keys]}, seconds). A tag expands
    to its tasks, each reported under its own name."""
    workdir = Path(workdir)
    hub = any(p.source == "hub" for p in plans)
    for p in plans:
        if p.source == "offline":
            write_task_yaml(p.name, task_cfg, workdir)
    t0 = time.perf_counter()
    # quiet_third_party: lm-eval's and datasets' INFO lines and small progress bars stay off the
    # console, and whatever lm-eval does to the logging configuration is undone afterwards
    with quiet_third_party(), hub_offline(task_cfg.offline or not hub):
        tm = task_manager or make_task_manager(workdir, include_defaults=hub)
        objs, keys = [], {}
        for p in plans:  # build the tasks here (datasets load now) to set hub generation lengths
            loaded = tm.load([p.name])
            top = loaded["groups"].get(p.name) or loaded["tasks"].get(p.name)
            objs.extend([top] if top is not None else loaded["tasks"].values())
            keys[p.name] = [p.name] if top is not None else list(loaded["tasks"])
            if p.source == "hub":
                for t in loaded["tasks"].values():
                    if t.get_config("output_type") == "generate_until":
                        n = task_cfg.code_max_gen_toks if t.get_config("unsafe_code") else task_cfg.max_gen_toks
                        t.set_config(key="generation_kwargs", value={"max_gen_toks": int(n)}, update=True)
        lm = BoundedHFLM(model, tokenizer, int(task_cfg.batch_size), task_cfg.logits_memory_mb)
        templated = chat.resolve(task_cfg.apply_chat_template, tokenizer, "task.apply_chat_template")
        res = simple_evaluate(
            lm, tasks=objs, task_manager=tm,
            # offline YAMLs already carry task.num_fewshot; lm-eval never overrides a task set to 0
            num_fewshot=task_cfg.num_fewshot,
            limit=task_cfg.limit, use_cache=None, cache_requests=False, log_samples=True,
            apply_chat_template=templated, fewshot_as_multiturn=templated and bool(task_cfg.fewshot_as_multiturn),
            bootstrap_iters=1000, confirm_run_unsafe_code=bool(task_cfg.allow_code_execution),
            random_seed=int(task_cfg.seed), numpy_random_seed=int(task_cfg.seed),
            torch_random_seed=int(task_cfg.seed), fewshot_random_seed=int(task_cfg.seed),
            **_verbosity_kwargs())
    return res, keys, time.perf_counter() - t0


def make_task_manager(workdir: str | Path, include_defaults: bool):
    """TaskManager over ``<workdir>/tasks``; lm-eval's own registry (~15 s to index) only if asked."""
    tasks_dir = Path(workdir) / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    return TaskManager(include_path=str(tasks_dir), include_defaults=include_defaults)


# --------------------------------------------------------------------------- summary

def _leaves(res: dict, name: str) -> list[str]:
    """Leaf task names under a result key (itself for a task)."""
    sub = res.get("group_subtasks", {}).get(name)
    if not sub:
        return [name]
    return [leaf for s in sub for leaf in _leaves(res, s)]


def _type_of(output_type: str) -> str:
    return {"generate_until": GENERATIVE, "multiple_choice": MULTIPLE_CHOICE,
            "loglikelihood_rolling": PERPLEXITY}.get(output_type, output_type)


def _pick_metric(result: dict, spec: TaskSpec | None = None) -> tuple[str, str] | None:
    """(metric, filter) of the headline score among ``"<metric>,<filter>"`` keys: the registered
    task's, else the first of the preference lists."""
    pairs = [tuple(k.split(",", 1)) for k in result if "," in k and "_stderr" not in k]
    pairs = [(m, f) for m, f in pairs if finite_or_none(result[f"{m},{f}"]) is not None]
    if not pairs:
        return None

    def rank(p):
        m, f = p
        mi = 0 if spec and m == spec.metric else (1 + _METRIC_PREFERENCE.index(m) if m in _METRIC_PREFERENCE else 99)
        fi = 0 if spec and f == spec.filter else (1 + _FILTER_PREFERENCE.index(f) if f in _FILTER_PREFERENCE else 50)
        return mi, fi
    return min(pairs, key=rank)


def summarize(res: dict, name: str, tokenizer, seconds: float) -> dict:
    """One task's entry of :func:`prunerep.evals.evaluate_model`'s result."""
    result = res["results"][name]
    leaves = _leaves(res, name)
    output_types = {res["configs"][leaf]["output_type"] for leaf in leaves if leaf in res["configs"]}
    ttype = _type_of(sorted(output_types)[0]) if len(output_types) == 1 else "mixed"
    spec = TASKS.get(name)
    picked = _pick_metric(result, spec)
    if picked is None:
        raise RuntimeError(f"lm-eval returned no numeric metric for task {name!r}: {sorted(result)}")
    metric, filt = picked
    samples = [(leaf, s) for leaf in leaves for s in res.get("samples", {}).get(leaf, [])]
    entry: dict[str, Any] = {
        "type": ttype,
        "metric": metric,
        "filter": filt,
        "score": finite_or_none(result[f"{metric},{filt}"]),
        "stderr": finite_or_none(result.get(f"{metric}_stderr,{filt}")),
        "n": len({(leaf, s["doc_id"]) for leaf, s in samples}) or None,
        "num_fewshot": res.get("n-shot", {}).get(name, res.get("n-shot", {}).get(leaves[0])),
        "all_metrics": {k: finite_or_none(v) for k, v in result.items() if "," in k and finite_or_none(v) is not None},
        "eval_seconds": round(seconds, 2),  # the whole lm-eval call, shared by its tasks
    }
    if ttype == MULTIPLE_CHOICE and samples:
        entry["chance"] = sum(1.0 / max(1, len(s["filtered_resps"])) for _, s in samples) / len(samples)
        picks = bias.option_picks(samples, metric)
        if picks is not None:
            entry["option_picks"] = picks
        if len(leaves) > 1 and all(bias.is_rotation(leaf, name) for leaf in leaves):  # task.mc_debias=permute
            deb = bias.debiased_score(samples, metric)
            entry.update(score=deb["score"], stderr=deb["stderr"], n=deb["n"])
            entry["debias"] = {"mode": "permute", **{k: deb[k] for k in ("n_permutations", "per_rotation",
                                                                         "score_unpermuted")}}
    if spec and spec.pairs_with:
        entry["pairs_with"] = spec.pairs_with
    if ttype in (MULTIPLE_CHOICE, GENERATIVE) and samples:
        entry["items"] = item_requests(samples, ttype)
    if ttype == GENERATIVE:
        entry["generations"] = _generations(samples, metric, filt, tokenizer, several=len(leaves) > 1)
    if ttype == PERPLEXITY:  # lower is better; token perplexity from the per-document log-likelihoods
        rolling_entry(entry, result, [s for _, s in samples], tokenizer)
    return entry


def _generations(samples, metric: str, filt: str, tokenizer, several: bool) -> list[dict]:
    """Per doc: raw generation, its tokens (re-tokenised text, no special tokens), the
    filtered answer, the target and the per-doc metric value."""
    out = []
    for leaf, s in samples:
        if s.get("filter", filt) != filt:
            continue
        text = s["resps"][0][0] if s["resps"] and s["resps"][0] else ""
        text = text if isinstance(text, str) else str(text)
        rec = {"doc_id": int(s["doc_id"]), "text": text,
               "tokens": tokenizer(text, add_special_tokens=False)["input_ids"],
               "extracted": s["filtered_resps"][0] if s.get("filtered_resps") else None,
               "target": s.get("target"), metric: finite_or_none(s.get(metric))}
        if isinstance(rec["extracted"], (list, tuple)):
            rec["extracted"] = str(rec["extracted"][0]) if rec["extracted"] else None
        if isinstance(rec["target"], (list, tuple, dict)):
            rec["target"] = str(rec["target"])
        if several:
            rec["task"] = leaf
        out.append(rec)
    out.sort(key=lambda r: (r.get("task", ""), r["doc_id"]))
    return out


#: items per task whose request (context, options and their log-likelihoods) an entry keeps
MAX_ITEM_REQUESTS = 1000


def item_requests(samples, ttype: str) -> list[dict]:
    """What each document asked of the model, for the item probes (:mod:`prunerep.probes.items`):
    ``{"task", "doc_id", "context"}`` (``source`` where the document names one) and, for multiple
    choice, the option ``continuations`` and their log-likelihoods ``lls`` (what decides the pick); the first :data:`MAX_ITEM_REQUESTS` per
    task, in document order."""
    out = []
    for leaf, s in sorted(samples, key=lambda ls: (ls[0], int(ls[1]["doc_id"])))[:MAX_ITEM_REQUESTS]:
        args = s.get("arguments") or []
        if not args or not isinstance(args[0], (list, tuple)) or not isinstance(args[0][0], str):
            continue
        rec = {"task": leaf, "doc_id": int(s["doc_id"]), "context": args[0][0]}
        source = (s.get("doc") or {}).get("source") if isinstance(s.get("doc"), dict) else None
        if source is not None:  # the document the item was cut from: items of one source are not independent
            rec["source"] = str(source)
        if ttype == MULTIPLE_CHOICE:
            got = bias.option_scores(s)
            if got is None:
                continue
            rec["lls"], rec["continuations"] = got
        out.append(rec)
    return out


def skipped_entry(plan: TaskPlan) -> dict:
    spec = TASKS.get(plan.name) if plan.source == "offline" else None
    return {"type": spec.family if spec else GENERATIVE, "metric": spec.metric if spec else None,
            "skipped": True, "reason": plan.skip_reason}
