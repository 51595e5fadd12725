"""Check ``task.*`` before any heavy work: one-line :class:`~prunerep.config.ConfigError`s.

* Unknown task names are reported with close matches (difflib) among prunerep's offline
  tasks and lm-eval's registry. The registry is listed cheaply by scanning lm-eval's YAML
  files for ``task:``/``group:``/``tag:`` (~0.3 s); only a name that scan does not know is
  checked against lm-eval's full ``TaskManager`` index (~15 s, rare: error path or exotic
  generated names).
* Tasks computed on the model directly (retrieval, reference perplexity) are offline or hub
  tasks like the others; the registry (:mod:`prunerep.evals.taskspec`) names their datasets.
* Hub tasks (``task.offline=false``, ``task=paper``) need huggingface.co: a short TCP connect
  (:func:`prunerep.model.sources.hub_reachable`, immediate where DNS fails) decides, and the
  error names the dataset that could not be reached and points at ``task=offline``.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path

from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals.bias import DEBIAS_MODES
from prunerep.evals.offline import ARITH_KINDS, package_dir
from prunerep.evals.taskspec import LM_EVAL, OFFLINE_NAMES, POOLINGS, PPL_PROTOCOLS, TASKS, hub_dataset, requested, runner
from prunerep.model import chat
from prunerep.model.sources import hub_reachable

_NAME_RX = re.compile(r"^(task|group|tag):\s*(.*)$")
_DATASET_RX = re.compile(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", re.M)
_ITEM_RX = re.compile(r"^\s*-\s*['\"]?([A-Za-z0-9_.\-]+)['\"]?\s*$")


@functools.lru_cache(maxsize=1)
def lm_eval_task_names() -> dict[str, str | None]:
    """Cheap listing of lm-eval's registry: ``{task/group/tag name: dataset_path or None}``."""
    try:
        root = package_dir("lm_eval") / "tasks"
    except FileNotFoundError:
        return {}
    names: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for fn in filenames:
            if not (fn.endswith((".yaml", ".yml")) or fn.endswith("_yaml")):
                continue
            try:
                text = (Path(dirpath) / fn).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            ds = _DATASET_RX.search(text)
            lines = text.splitlines()
            for i, line in enumerate(lines):
                m = _NAME_RX.match(line)
                if not m:
                    continue
                key, value = m.group(1), m.group(2).strip().strip("'\"")
                found = [value] if value and not value.startswith(("[", "{", "!")) else []
                if not value and key == "tag":  # "tag:\n  - a\n  - b"
                    for nxt in lines[i + 1:]:
                        item = _ITEM_RX.match(nxt)
                        if not item:
                            break
                        found.append(item.group(1))
                for name in found:
                    if re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                        names.setdefault(name, ds.group(1) if ds and key == "task" else None)
    return names


@functools.lru_cache(maxsize=1)
def _full_index_names() -> frozenset[str]:
    from lm_eval.tasks import TaskManager  # seconds to import, ~15 s to index: only for a name the scan missed

    return frozenset(TaskManager().all_tasks)


def _close(name: str, candidates) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.6)


def unknown_task_error(name: str, hub_names=()) -> ConfigError:
    offline = OFFLINE_NAMES
    hub_names = set(hub_names) | {n for n, t in TASKS.items() if not t.offline}
    close = _close(name, offline) + [c for c in _close(name, hub_names) if c not in offline]
    hint = f"did you mean: {', '.join(close[:6])}?" if close else \
        f"offline tasks: {', '.join(offline)}; or any lm-eval task name with task.offline=false"
    return ConfigError(f"unknown task {name!r} in task.tasks; {hint}")


#: task settings with a least value: {key: (least, what null means; None: null is not allowed)}
_LEAST = {"limit": (1, " for every document"), "num_fewshot": (0, " for each task's default"),
          **dict.fromkeys(("batch_size", "max_gen_toks", "code_max_gen_toks", "n_arith", "code_memory_mb"), (1, None)),
          "logits_memory_mb": (1, ": from the free memory"), "ppl_seqlen": (2, " for the model's length"),
          "ppl_chars": (1, " for all the held-out text"), "retrieval_n": (2, None), "retrieval_max_tokens": (2, None)}


def _check_settings(t: TaskConfig) -> None:
    chat.check(t.apply_chat_template, "task.apply_chat_template")
    for key, (least, null) in _LEAST.items():
        v = getattr(t, key)
        if (v is not None or null is None) and int(v) < least:
            raise ConfigError(f"task.{key}={v} must be >= {least}" + (f" (or null{null})" if null else ""))
    bad = [k for k in t.arith_kinds if k not in ARITH_KINDS] or ([] if len(t.arith_kinds) else ["(empty)"])
    if bad:
        raise ConfigError(f"task.arith_kinds: unknown {bad[0]!r}; choose from {', '.join(ARITH_KINDS)}")
    if not float(t.code_timeout_s) > 0:
        raise ConfigError(f"task.code_timeout_s={t.code_timeout_s} must be > 0 seconds")
    for key, choices in (("ppl_protocol", PPL_PROTOCOLS), ("mc_debias", DEBIAS_MODES),
                         ("retrieval_pooling", POOLINGS)):
        if getattr(t, key) not in choices:
            raise ConfigError(f"task.{key}={getattr(t, key)!r}; choose {' or '.join(choices)}")


def validate_tasks(task: TaskConfig) -> None:
    """Raise a one-line ConfigError for unknown names, bad settings, or hub tasks without network."""
    names = requested(task)
    if not names:
        return
    _check_settings(task)
    hub = [n for n in names if not (n in TASKS and TASKS[n].offline)]
    if not hub:
        return
    listed = lm_eval_task_names()
    for name in hub:
        if name in listed or runner(name, task) != LM_EVAL:
            continue
        if task.offline:  # cannot run anyway: answer at once, without the 15 s full index
            raise unknown_task_error(name, listed)
        if name not in _full_index_names():
            raise unknown_task_error(name, set(listed) | _full_index_names())
    if task.offline:
        raise ConfigError(
            f"task {hub[0]!r} is {'an lm-eval hub' if runner(hub[0], task) == LM_EVAL else 'a Hugging Face Hub'} "
            f"task but task.offline=true; set task.offline=false (or task=paper) where the Hugging Face Hub is "
            f"reachable, or use offline tasks: {', '.join(OFFLINE_NAMES)}")
    if not hub_reachable(timeout=2.0):
        dataset = hub_dataset(hub[0], task) or listed.get(hub[0]) or "its Hugging Face dataset"
        raise ConfigError(
            f"task {hub[0]!r} needs dataset {dataset!r} from huggingface.co, which cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1); use task=offline here, or run where there is network")
