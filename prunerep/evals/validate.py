"""Check ``task.*`` before any heavy work: one-line :class:`~prunerep.config.ConfigError`s.

* Unknown task names are reported with close matches (difflib) among prunerep's offline
  tasks and lm-eval's registry. The registry is listed cheaply by scanning lm-eval's YAML
  files for ``task:``/``group:``/``tag:`` (~0.3 s); only a name that scan does not know is
  checked against lm-eval's full ``TaskManager`` index (~15 s, rare: error path or exotic
  generated names).
* Tasks computed on the model directly (retrieval, reference perplexity) are offline or hub
  tasks like the others; the registry (:mod:`prunerep.evals.taskspec`) names their datasets.
* Hub tasks (``task.offline=false``, ``task=paper``) need huggingface.co: a TCP connect to
  ``huggingface.co:443`` with a short timeout (immediate where DNS fails) decides, and the
  error names the dataset that could not be reached and points at ``task=offline``.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
import socket
from pathlib import Path

from prunerep.config import TaskConfig
from prunerep.errors import ConfigError
from prunerep.evals.bias import DEBIAS_MODES
from prunerep.evals.offline import ARITH_KINDS
from prunerep.evals.taskspec import LM_EVAL, OFFLINE_NAMES, POOLINGS, PPL_PROTOCOLS, TASKS, hub_dataset, requested, runner

HUB_HOST = ("huggingface.co", 443)
_NAME_RX = re.compile(r"^(task|group|tag):\s*(.*)$")
_DATASET_RX = re.compile(r"^dataset_path:\s*['\"]?([^'\"\s#]+)", re.M)
_ITEM_RX = re.compile(r"^\s*-\s*['\"]?([A-Za-z0-9_.\-]+)['\"]?\s*$")


@functools.lru_cache(maxsize=1)
def lm_eval_task_names() -> dict[str, str | None]:
    """Cheap listing of lm-eval's registry: ``{task/group/tag name: dataset_path or None}``."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        return {}
    root = Path(spec.origin).parent / "tasks"
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


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether huggingface.co:443 accepts a TCP connection (False at once where DNS fails)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_settings(t: TaskConfig) -> None:
    if t.limit is not None and int(t.limit) < 1:
        raise ConfigError(f"task.limit={t.limit} must be >= 1 (or null for every document)")
    if t.num_fewshot is not None and int(t.num_fewshot) < 0:
        raise ConfigError(f"task.num_fewshot={t.num_fewshot} must be >= 0 (or null for each task's default)")
    for key in ("batch_size", "max_gen_toks", "code_max_gen_toks", "n_arith", "code_memory_mb"):
        if int(getattr(t, key)) < 1:
            raise ConfigError(f"task.{key}={getattr(t, key)} must be >= 1")
    bad = [k for k in t.arith_kinds if k not in ARITH_KINDS] or ([] if len(t.arith_kinds) else ["(empty)"])
    if bad:
        raise ConfigError(f"task.arith_kinds: unknown {bad[0]!r}; choose from {', '.join(ARITH_KINDS)}")
    if t.logits_memory_mb is not None and int(t.logits_memory_mb) < 1:
        raise ConfigError(f"task.logits_memory_mb={t.logits_memory_mb} must be >= 1 (or null: from the free memory)")
    if not float(t.code_timeout_s) > 0:
        raise ConfigError(f"task.code_timeout_s={t.code_timeout_s} must be > 0 seconds")
    for key, choices in (("ppl_protocol", PPL_PROTOCOLS), ("mc_debias", DEBIAS_MODES),
                         ("retrieval_pooling", POOLINGS)):
        if getattr(t, key) not in choices:
            raise ConfigError(f"task.{key}={getattr(t, key)!r}; choose {' or '.join(choices)}")
    if t.ppl_seqlen is not None and int(t.ppl_seqlen) < 2:
        raise ConfigError(f"task.ppl_seqlen={t.ppl_seqlen} must be >= 2 (or null for the model's length)")
    if t.ppl_chars is not None and int(t.ppl_chars) < 1:
        raise ConfigError(f"task.ppl_chars={t.ppl_chars} must be >= 1 (or null for all the held-out text)")
    for key in ("retrieval_n", "retrieval_max_tokens"):
        if int(getattr(t, key)) < 2:
            raise ConfigError(f"task.{key}={getattr(t, key)} must be >= 2")


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
    if not hub_reachable():
        dataset = hub_dataset(hub[0], task) or listed.get(hub[0]) or "its Hugging Face dataset"
        raise ConfigError(
            f"task {hub[0]!r} needs dataset {dataset!r} from huggingface.co, which cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1); use task=offline here, or run where there is network")
