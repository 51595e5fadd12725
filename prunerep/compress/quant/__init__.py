"""Quantization methods, one module each: a dataclass subclassing
:class:`~prunerep.compress.method.Quantizer` (settings as fields, capabilities as class flags,
``validate`` / ``check`` / ``quantize`` as methods), found by the registry
(:mod:`prunerep.registry`, group ``quant``) by scanning this package, exactly as the pruners are.

A quantizer runs after the pruner (``pruner=sparsegpt sparsity=0.5 quant=gptq quant.bits=4``) or
on its own (``pruner=none sparsity=0 quant=gptq``). It quantizes and dequantizes the weights in
place: they stay floating point, with exactly the values a ``bits``-bit group-wise format with
fp16 scales would give back, so the probes and evaluations measure the numerical effect.

Implemented from the papers (RTN; GPTQ: Frantar et al., 2022; AWQ: Lin et al., 2023) rather than
through a library: none of the maintained ones (auto-gptq / gptqmodel, autoawq, llm-compressor,
optimum-quanto, bitsandbytes) quantizes with calibration on a CPU, offline, with torch 2.13 and
transformers 5 without downloading kernels or models, and their packed formats would hide the
numerical effect behind a kernel. :mod:`prunerep.compress.accounting` says how many bits per weight
each format costs."""
from prunerep.compress.method import Quantizer as BASE

__all__ = ["BASE"]
