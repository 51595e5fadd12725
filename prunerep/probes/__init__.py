"""Follow a pruner's damage through the representation hierarchy h -> z -> p.

Pipeline API (one model in memory; the dense side is cached on disk)::

    plan = build_plan(probe_cfg)                                               # before the model loads
    ref = dense_reference(model, tokenizer, plan, cache_dir, model_key=key)   # dense model
    # ... prune `model` in place ...
    df = compare_to_reference(model, tokenizer, plan, ref)                    # pruned model
    summary = write_probe_outputs(df, run_dir)

Modules: :mod:`.metrics` (pure tensor math), :mod:`.capture` (hooks, logit lens),
:mod:`.contexts` (prompt / teacher-forced / free-running), :mod:`.prompts`,
:mod:`.reference` (plan, cache, comparison), :mod:`.outputs` (files), :mod:`.transitions`
(sublayer transitions and local damage, ``probe.transitions``), :mod:`.top_tokens` (the dense
top tokens with both models' probabilities). The table's schema is :mod:`prunerep.results.schema`.
"""
from prunerep.probes.capture import capture, resolve_layers
from prunerep.probes.outputs import summarize, write_probe_outputs
from prunerep.probes.prompts import Prompt, load_prompts
from prunerep.probes.reference import (DenseReference, ProbePlan, build_plan, compare_to_reference,
                                       dense_reference)
from prunerep.probes.top_tokens import detach as detach_top_tokens

__all__ = ["build_plan", "ProbePlan", "dense_reference", "compare_to_reference", "write_probe_outputs",
           "load_prompts", "DenseReference", "Prompt", "capture", "resolve_layers", "summarize",
           "detach_top_tokens"]
