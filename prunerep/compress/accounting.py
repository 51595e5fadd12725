"""Effective bits per weight: what storing the compressed model's decoder Linear weights costs,
per weight position of the dense matrix (so pruning and quantization sit on one axis).

One matrix (:func:`bits_per_weight`) = values + index + group metadata, per weight position:

* values: ``kept × b``, b = the quantizer's ``bits``, else the model dtype's bits (16 for
  bf16/fp16, 32 for fp32); ``kept`` = 1 − the zero fraction the pruner left (measured);
* index of the kept values: dense 0; unstructured sparsity a 1-bit-per-position bitmask (1);
  N:M a ⌈log₂ M⌉-bit position per kept value, NVIDIA's 2:4 layout (2 bits for each of the 2
  kept values of every 4: 1 bit per weight position), so ``kept × ⌈log₂ M⌉``;
* groups (quantized): one fp16 scale per group of ``group_size`` consecutive input weights
  (16 bits), plus one zero point stored as fp16 when asymmetric (16 bits), over the group's
  positions: ``(16 + 16) / group_size``; ``group_size=-1``: over the whole row (``in_features``).

A matrix the pruner left entirely zero (layer_drop's output projections) costs 0: it is not
stored. Worked examples (tests/test_quant.py): dense fp16 16, fp32 32; 4-bit, groups of 128,
asymmetric 4 + 32/128 = 4.25, symmetric 4 + 16/128 = 4.125; 50% unstructured fp16
0.5·16 + 1 = 9; 2:4 fp16 0.5·16 + 0.5·2 = 9; 2:4 then 4-bit g128 asymmetric 0.5·4 + 1 + 0.25 =
3.25. The model's number is the mean over its decoder Linear weights weighted by their sizes
(embeddings, norms and the LM head are neither pruned nor quantized and are left out).

Not counted: packing an asymmetric zero point into ``bits`` bits (GPTQ's qzeros: 4 + 20/128 =
4.16 at 4 bits) and dropping a group's scale when all its weights are pruned. A bitmask is
counted whenever a pruner zeroed weights, even where a dense layout would be cheaper (10% at
4 bits: 0.9·4 + 1 = 4.6 > 4)."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from prunerep.compress.method import targets_of
from prunerep.model.anatomy import decoder_layers, model_targets

SCALE_BITS = 16  # one fp16 scale per group
ZERO_BITS = 16  # one fp16 zero point per group (asymmetric grids only)
BITMASK_BITS = 1  # per weight position (unstructured sparsity)
LAYOUTS = ("dense", "bitmask", "nm", "absent")


def nm_index_bits(m: int) -> int:
    """Bits that say where a kept value sits in its group of M: ⌈log₂ M⌉ (2:4 -> 2)."""
    return max(1, math.ceil(math.log2(m)))


def bits_per_weight(dense_bits: float, *, layout: str = "dense", kept: float = 1.0, n: int = 0, m: int = 0,
                    bits: Optional[int] = None, group_size: Optional[int] = None, sym: bool = False,
                    in_features: Optional[int] = None) -> float:
    """Storage bits per weight position of one matrix (module docstring). ``layout``: ``dense``,
    ``bitmask`` (unstructured, ``kept`` of the positions hold values), ``nm`` (N zeros in every M:
    ``n``, ``m``), ``absent`` (not stored). ``bits`` / ``group_size`` / ``sym``: the quantized
    format, None for the model's dtype; ``in_features`` for ``group_size=-1``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "absent":
        return 0.0
    value_bits = float(dense_bits if bits is None else bits)
    if layout == "dense":
        values, index = value_bits, 0.0
    elif layout == "bitmask":
        values, index = kept * value_bits, float(BITMASK_BITS)
    else:
        kept = (m - n) / m
        values, index = kept * value_bits, kept * nm_index_bits(m)
    groups = 0.0
    if bits is not None:
        g = in_features if group_size in (None, -1) else group_size
        if not g:
            raise ValueError("group_size=-1 needs in_features")
        groups = (SCALE_BITS + (0 if sym else ZERO_BITS)) / g
    return values + index + groups


def mean_bits(parts: Iterable[tuple[int, float]]) -> float:
    """The mean of ``(numel, bits)`` pairs weighted by numel."""
    parts = list(parts)
    total = sum(n for n, _ in parts)
    return sum(n * b for n, b in parts) / total if total else float("nan")


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{"layers.<i>.<name>": (out_features, in_features)}`` of every weight matrix of the decoder
    blocks (:func:`prunerep.model.anatomy.model_targets`: Linear layers, each expert's matrices, routers)."""
    return {name: t.shape for name, t in model_targets(model, with_routers=True).items()}


def pruning_layout(zero_fraction: Optional[float], weight_sparsity: bool, spec) -> dict:
    """How the pruner left one matrix, from its measured zero fraction (None: not a target).
    ``weight_sparsity``: the pruner zeroes individual weights (its ``zeroes_weights``); otherwise
    (none, layer_drop) only a matrix that is entirely zero changes its storage."""
    if zero_fraction is None:
        return {"layout": "dense"}
    if zero_fraction >= 1.0:
        return {"layout": "absent"}
    if not weight_sparsity or zero_fraction <= 0:
        return {"layout": "dense"}
    if spec is not None and spec.is_nm:
        return {"layout": "nm", "n": spec.n, "m": spec.m}
    return {"layout": "bitmask", "kept": 1.0 - zero_fraction}


def compression_report(shapes: dict[str, tuple[int, int]], dense_bits: int, *, pruner: Optional[str] = None,
                       sparsity=None, weight_sparsity: bool = False, zero_fractions: Optional[dict] = None,
                       achieved_sparsity: Optional[float] = None, quant: Optional[str] = None,
                       storage: Optional[dict] = None, quantized: Iterable[str] = (),
                       quant_report: Optional[dict] = None) -> dict:
    """compression.json from plain values: the decoder Linear shapes, the dtype's bits, the
    pruner (name, its :class:`~prunerep.sparsity.SparsitySpec`, whether it zeroes individual
    weights, the measured zero fraction per module) and the quantizer (name, its storage format,
    the modules it quantized, its report). Per perturbation, in the order applied, the
    effective bits of the model after it; ``effective_bits`` the final number."""
    zero_fractions = zero_fractions or {}
    quantized = set(quantized)
    after_pruning, final, per_module = [], [], {}
    for name, (out_f, in_f) in shapes.items():
        numel = out_f * in_f
        layout = pruning_layout(zero_fractions.get(name), weight_sparsity, sparsity)
        b_pruned = bits_per_weight(dense_bits, **layout)
        b = (bits_per_weight(dense_bits, **layout, **(storage or {}), in_features=in_f) if name in quantized
             else b_pruned)
        after_pruning.append((numel, b_pruned))
        final.append((numel, b))
        per_module[name] = round(b, 6)
    perturbations = []
    if pruner is not None and pruner != "none":
        layouts = sorted({pruning_layout(zero_fractions.get(n), weight_sparsity, sparsity)["layout"] for n in shapes})
        perturbations.append({"kind": "pruning", "method": pruner,
                              "sparsity": None if sparsity is None else str(sparsity),
                              "achieved_sparsity": achieved_sparsity, "layouts": layouts,
                              "bits": dense_bits, "group_size": None, "sym": None,
                              "effective_bits": mean_bits(after_pruning)})
    if quant is not None and quant != "none" and storage:
        perturbations.append({"kind": "quantization", "method": quant, **storage,
                              "scale_bits": SCALE_BITS, "zero_bits": 0 if storage.get("sym") else ZERO_BITS,
                              "n_layers": len(quantized & set(shapes)), "effective_bits": mean_bits(final),
                              "report": quant_report or {}})
    return {"dense_bits": dense_bits, "effective_bits": mean_bits(final), "n_weights": sum(n for n, _ in final),
            "perturbations": perturbations, "modules": per_module,
            "accounting": "bits per weight position of the decoder Linear weights: kept x value bits + index "
                          "(bitmask 1, N:M kept x ceil(log2 M)) + (16-bit scale [+ 16-bit zero]) / group size; "
                          "see prunerep/compress/accounting.py"}




def model_compression(model: nn.Module, *, pruner, spec, pruning: dict, quant, quant_report: Optional[dict]) -> dict:
    """:func:`compression_report` of a pruned (and quantized) model: the pruner's measured zero
    fractions from ``pruning`` (pruning.json, measured before quantization, whose rounding can add
    zeros that are stored like any other value), the quantizer's targets from the model."""
    targets = model_targets(model, with_routers=True)
    shapes = {name: t.shape for name, t in targets.items()}
    first = next(iter(targets.values()), None)
    dense = dtype_bits(getattr(first.module, first.param).dtype) if first is not None else 32
    quantized = [f"layers.{i}.{n}" for i, block in enumerate(decoder_layers(model))
                 for n in targets_of(block, quant)] if quant.quantizes else []
    quant_name, storage, weight_sparsity = quant.name, quant.storage(), bool(pruner.zeroes_weights)
    carried = (pruning.get("method") or {}).get("quantization") if pruner.storage() is not None else None
    if carried is not None:  # quantized before prunerep saw it (pruner=external): its own format
        quant_name, storage, quantized = f"{pruner.name}-quantized", pruner.storage(), carried["modules"]
        quant_report = {"source": "checkpoint", "n_modules": len(quantized)}
        # its zeros include weights rounded to zero: pruned weights (a bitmask) only where sparsity > 0 is declared
        weight_sparsity = weight_sparsity and spec.ratio > 0
    return compression_report(shapes, dense, pruner=pruner.name, sparsity=spec,
                              weight_sparsity=weight_sparsity, zero_fractions=pruning.get("modules"),
                              achieved_sparsity=pruning.get("achieved_sparsity"), quant=quant_name,
                              storage=storage, quantized=quantized, quant_report=quant_report)


__all__ = ["SCALE_BITS", "ZERO_BITS", "BITMASK_BITS", "nm_index_bits", "bits_per_weight", "mean_bits", "dtype_bits",
           "linear_shapes", "pruning_layout", "compression_report", "model_compression"]
