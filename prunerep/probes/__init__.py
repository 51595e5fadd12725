"""Follow a pruner's damage through the representation hierarchy h -> z -> p.

Pipeline API (one model in memory; the dense side is cached on disk)::

    ref = dense_reference(model, tokenizer, probe_cfg, cache_dir, model_key=key)  # dense model
    # ... prune `model` in place ...
    df = compare_to_reference(model, tokenizer, probe_cfg, ref)                   # pruned model
    summary = write_probe_outputs(df, run_dir)

Modules: :mod:`.metrics` (pure tensor math), :mod:`.capture` (hooks, logit lens),
:mod:`.contexts` (prompt / teacher-forced / free-running), :mod:`.prompts`,
:mod:`.reference` (cache + comparison, table layout), :mod:`.outputs` (files).
"""
from prunerep.probes.capture import capture, lens_logits, resolve_layers
from prunerep.probes.outputs import summarize, write_probe_outputs
from prunerep.probes.prompts import Prompt, load_prompts
from prunerep.probes.reference import (COLUMNS, DenseReference, check_probe_config, compare_to_reference,
                                       dense_reference, empty_table)

__all__ = ["check_probe_config", "dense_reference", "compare_to_reference", "write_probe_outputs", "load_prompts",
           "DenseReference",
           "Prompt", "capture", "lens_logits", "resolve_layers", "summarize", "COLUMNS", "empty_table"]
