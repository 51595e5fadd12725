"""The probe plan: a probe config (:class:`prunerep.config.ProbeConfig`, which owns every default)
validated once, before the model loads, into the typed settings every probe stage reads."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunerep.model import chat
from prunerep.probes import fused
from prunerep.probes.prompts import AUTO, FROM_TASKS, OFFLINE, read_prompts_file
from prunerep.results.schema import CONTEXTS, SPACES, SUBLAYERS

#: probe.h: which state the last layer's embedding-space rows compare: the residual stream
#: before the final norm (what the hooks capture and the lens reads) or after it (what
#: transformers' ``output_hidden_states[-1]`` returns)
H_STATES = ("residual", "normed")
#: probe.lens, the transition rows' lens: the final norm then the LM head, or the LM head alone
LENSES = ("final_norm", "raw")
#: probe.kernel, how the vocabulary-sized metrics run: auto = fused on CPU where numba imports
#: (else eager), compiled on CUDA; fused on CUDA is torch.compile's (Triton)
KERNELS = ("auto", "eager", "compiled", "fused")


@dataclass(frozen=True)
class ProbePlan:
    """What the probes will do (the fields of :class:`~prunerep.config.ProbeConfig`, checked and
    typed). ``ProbePlan()`` is the empty plan, ``probe=none``: nothing is probed."""

    spaces: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()
    sublayers: tuple[str, ...] = ()
    temperatures: tuple[float, ...] = ()
    topk: tuple[int, ...] = ()
    layers: Any = ()  # "all" | tuple of indices | {"every": k}; resolved against the model
    prompts: str = ""
    n_prompts: int = 0
    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    token_chunk: int = 0
    metric_threads: int | None = None
    kernel: str = "auto"  # KERNELS
    seed: int = 0
    h: str = ""  # H_STATES
    transitions: bool = False
    lens: str = ""  # LENSES
    top_tokens: int = 0
    n_items: int = 0  # items.parquet: evaluated items probed per task (prunerep.probes.items)
    chat_template: Any = False  # auto | True | False (prunerep.model.chat): the prompts as a chat's user turn

    @property
    def empty(self) -> bool:
        return not self.spaces or not self.contexts

    def kernel_on(self, device: torch.device) -> str:
        """eager | compiled | fused: how the vocabulary-sized metric passes run on ``device``
        (:func:`~prunerep.probes.metrics.vocab_metrics`; fused is a CPU kernel, so on CUDA it is
        torch.compile)."""
        if device.type == "cuda":
            return "eager" if self.kernel == "eager" else "compiled"
        if self.kernel == "auto":
            return "fused" if fused.AVAILABLE else "eager"
        return self.kernel


def _choices(values, allowed, what: str) -> tuple[str, ...]:
    values = tuple(str(v) for v in values)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"probe.{what}: unknown {bad}; choose from {list(allowed)}")
    return tuple(dict.fromkeys(values))


def _choice(value, allowed, what: str) -> str:
    if str(value) not in allowed:
        raise ValueError(f"probe.{what}={value!r}: choose from {list(allowed)}")
    return str(value)


def build_plan(cfg) -> ProbePlan:
    """Validate a probe config (a :class:`~prunerep.config.ProbeConfig` or its OmegaConf node) into a
    plan; ``name: none`` or empty spaces/contexts is an empty plan. Raises ValueError (one line)."""
    if str(cfg.name) == "none":
        return ProbePlan()
    temps = tuple(float(t) for t in cfg.temperatures)
    if any(not (t > 0 and math.isfinite(t)) for t in temps):
        raise ValueError(f"probe.temperatures={list(temps)}: temperatures must be finite and > 0")
    spaces = _choices(cfg.spaces, SPACES, "spaces")
    if "probability" in spaces and not temps:
        raise ValueError("probe.temperatures is empty but the probability space is probed")
    topk = tuple(int(k) for k in cfg.topk)
    if any(k < 1 for k in topk):
        raise ValueError(f"probe.topk={list(topk)}: k must be >= 1")
    if int(cfg.n_prompts) < 1 or int(cfg.max_prompt_tokens) < 1:
        raise ValueError(f"probe.n_prompts={cfg.n_prompts} and probe.max_prompt_tokens={cfg.max_prompt_tokens} must "
                         f"be >= 1 (probe=none probes nothing)")
    if int(cfg.token_chunk) < 1 or int(cfg.max_new_tokens) < 0:
        raise ValueError("probe.token_chunk must be >= 1 and probe.max_new_tokens >= 0")
    threads = cfg.metric_threads
    if threads is not None and int(threads) < 1:
        raise ValueError(f"probe.metric_threads={threads} must be >= 1 or null")
    layers = cfg.layers
    if isinstance(layers, str) and layers != "all":
        raise ValueError(f"probe.layers={layers!r}: use all, a list of indices or {{every: k}}")
    if hasattr(layers, "get") and "every" in layers:
        if int(layers["every"]) < 1:
            raise ValueError(f"probe.layers.every={layers['every']} must be >= 1")
        layers = {"every": int(layers["every"])}
    elif not isinstance(layers, (str, int)) and layers is not None:
        layers = tuple(int(i) for i in layers)
    sublayers = _choices(cfg.sublayers, SUBLAYERS, "sublayers")
    if not sublayers:
        raise ValueError(f"probe.sublayers is empty; choose from {list(SUBLAYERS)}")
    if int(cfg.n_items) < 0:
        raise ValueError(f"probe.n_items={cfg.n_items} must be >= 0 (0: off)")
    if int(cfg.top_tokens) < 0:
        raise ValueError(f"probe.top_tokens={cfg.top_tokens} must be >= 0 (0: off)")
    h, lens = _choice(cfg.h, H_STATES, "h"), _choice(cfg.lens, LENSES, "lens")
    src = str(cfg.prompts)
    contexts = _choices(cfg.contexts, CONTEXTS, "contexts")
    if spaces and contexts and src not in (AUTO, FROM_TASKS, OFFLINE):
        if not Path(src).expanduser().is_file():
            raise ValueError(f"probe.prompts={src!r}: use '{AUTO}', '{FROM_TASKS}', '{OFFLINE}' or a readable .jsonl file")
        if not read_prompts_file(Path(src).expanduser(), int(cfg.n_prompts)):
            raise ValueError(f"probe.prompts={src!r} holds no prompt")
    return ProbePlan(spaces=spaces, contexts=contexts, sublayers=sublayers, temperatures=temps, topk=topk,
                     layers=layers, prompts=src, n_prompts=int(cfg.n_prompts),
                     max_prompt_tokens=int(cfg.max_prompt_tokens), max_new_tokens=int(cfg.max_new_tokens),
                     token_chunk=int(cfg.token_chunk), metric_threads=None if threads is None else int(threads),
                     kernel=_choice(cfg.kernel, KERNELS, "kernel"), seed=int(cfg.seed), h=h, transitions=bool(cfg.transitions), lens=lens,
                     top_tokens=int(cfg.top_tokens), n_items=int(cfg.n_items),
                     chat_template=chat.check(cfg.chat_template, "probe.chat_template"))
