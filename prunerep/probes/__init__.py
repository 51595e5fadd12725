"""Follow a pruner's damage through the representation hierarchy h -> z -> p.

Pipeline API (one model in memory; the dense side is cached on disk)::

    plan = build_plan(probe_cfg)                                               # before the model loads
    ref = dense_reference(model, tokenizer, plan, cache_dir, model_key=key)   # dense model
    # ... prune `model` in place ...
    result = compare_to_reference(model, tokenizer, plan, ref)                # pruned model
    summary = prunerep.viz.probes.write_probe_outputs(result, run_dir)         # the files

Modules, each lower one knowing nothing of those above it: :mod:`.plan` (the validated settings),
:mod:`.prompts`, :mod:`.metrics` (pure tensor math), :mod:`.capture` (hooks), :mod:`.contexts`
(prompt / teacher-forced / free-running states), :mod:`.stream` (the logit lens and the
vocabulary metrics in chunks), :mod:`.table` (the table's rows), :mod:`.transitions` (sublayer
transitions and local damage), :mod:`.reference` (the cached dense reference), :mod:`.top_tokens`
(the dense top tokens with both models' probabilities), :mod:`.outputs` (the result and its
summary), :mod:`.compare` (the comparison). The table's schema is :mod:`prunerep.results.schema`.
"""
from prunerep.probes.capture import capture, resolve_layers
from prunerep.probes.compare import compare_to_reference
from prunerep.probes.outputs import ProbeResult, summarize
from prunerep.probes.plan import ProbePlan, build_plan
from prunerep.probes.prompts import Prompt, load_prompts
from prunerep.probes.reference import DenseReference, dense_reference

__all__ = ["build_plan", "ProbePlan", "dense_reference", "DenseReference", "compare_to_reference", "ProbeResult",
           "summarize", "load_prompts", "Prompt", "capture", "resolve_layers"]
