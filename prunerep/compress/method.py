"""A compression method is a typed dataclass: its fields are its settings, its class flags and
properties its capabilities, its methods its checks and its algorithm. This module holds the bases
of the two config groups that are methods, ``pruner`` and ``quant`` (the registry finds the concrete
classes in :mod:`prunerep.compress.pruners` and :mod:`prunerep.compress.quant`), and what a run asks
of a method besides its own settings (:class:`PruneSettings`).

Capabilities, read by the pipeline and the checks and defined nowhere else:

* ``needs_calibration`` (property): calibration samples are loaded for it;
* ``supports_nm``: takes an N:M pattern as its target;
* ``zeroes_weights``: sets single weights to zero -- the bits accounting stores its matrices with a
  bitmask;
* ``meets_target``: prunes to the run's ``sparsity`` -- with ``zeroes_weights``, the run fails when it
  misses it (``external`` reads a checkpoint's sparsity: measured, not promised);
* ``sets_zeros`` (property): a quantizer after it holds the zeros it left at zero;
* ``prunes_weights``: works on weight targets (layer_drop works on whole sublayers), so the targets
  it reaches must cover the model;
* ``quantizes`` (quantizers): changes the weights (``none`` does not).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from omegaconf import MISSING
from torch import nn

from prunerep.errors import ConfigError
from prunerep.model.anatomy import Target, block_targets, decoder_layers
from prunerep.sparsity import SparsitySpec

MIN_BITS, MAX_BITS = 2, 8


@dataclass
class Method:
    """Base of every method. A concrete method gives ``name`` a default (its registry key and
    the stem of its YAML file); bases leave it MISSING and are never registered."""

    name: str = MISSING

    @classmethod
    def settings(cls) -> list[str]:
        """The keys a user may set on this method (its dataclass fields)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "name"]


@dataclass
class PruneSettings:
    """What a run asks of its pruner, besides the method's own settings: the target, where
    to compute and how many calibration samples go through a block at once."""

    spec: SparsitySpec
    pruner: "Pruner"
    device: torch.device
    batch_size: int = 1 << 30  # calibration samples per block forward; default: all at once
    seed: int = 0
    expert_tokens: str = "routed"  # routed | all: an expert's calibration tokens
    expert_min_tokens: int = 16  # fewer: the expert's statistics are isotropic


def check_target_patterns(method, group: str) -> None:
    """``include`` / ``exclude`` of a pruner or quantizer must be regular expressions (one line)."""
    for key in ("include", "exclude"):
        pattern = getattr(method, key)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{group}.{key}={pattern!r} is not a valid regular expression: {e}") from None


def method_targets(model: nn.Module, method, group: str) -> dict[str, Target]:
    """The targets a method's ``include`` / ``exclude`` / ``routers`` select, by model-wide name;
    a ConfigError (one line) when they select none."""
    found = {f"layers.{i}.{n}": t for i, block in enumerate(decoder_layers(model))
             for n, t in targets_of(block, method).items()}
    if not found:
        raise ConfigError(f"{group}.include={method.include!r} / {group}.exclude={method.exclude!r} match no weight "
                          f"of the model's decoder blocks")
    return found


def targets_of(block: nn.Module, method) -> dict[str, Target]:
    """The targets of one block that ``method`` (a pruner or quantizer) works on, by name in the block."""
    return block_targets(block, method.include, method.exclude, bool(getattr(method, "routers", False)))


@dataclass
class Pruner(Method):
    """Base of every pruning method (``conf/pruner/<name>.yaml`` + ``prunerep/compress/pruners/<name>.py``).

    Settings shared by all: ``include``/``exclude``, regexes on the weight targets' names inside
    a decoder block (``self_attn.q_proj``, ``mlp.experts.3.down_proj``), and ``routers``, whether a
    mixture-of-experts block's routers are pruned too, choose what is pruned and what sparsity is
    measured on. Capabilities are class flags, read by the pipeline and the checks;
    :meth:`validate` runs before the model loads, :meth:`check` on its skeleton (or, for a hub
    model not cached here, on the loaded model) before any heavy work."""

    include: str = r".*"
    exclude: Optional[str] = None
    routers: bool = False

    supports_nm: ClassVar[bool] = True  # takes an N:M pattern as its target
    zeroes_weights: ClassVar[bool] = True  # sets single weights to zero (stored with a bitmask)
    meets_target: ClassVar[bool] = True  # prunes to the run's sparsity (the run fails otherwise)
    prunes_weights: ClassVar[bool] = True  # works on weight targets (layer_drop works on whole sublayers)

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are loaded for it."""
        return False

    @property
    def sets_zeros(self) -> bool:
        """It sets weights to zero (single weights or whole matrices), so a quantizer after it holds
        every zero at zero; without a pruner a dense model's own zeros are weights like any other."""
        return True

    def validate(self, spec: SparsitySpec) -> None:
        """Checks that need no model. Raise ConfigError (one line)."""
        if spec.is_nm and not self.supports_nm:
            raise ConfigError(f"the {self.name} pruner does not take an N:M pattern (sparsity={spec})")
        check_target_patterns(self, "pruner")

    def check_depth(self, n_layers: int) -> None:
        """Checks against the model's number of decoder blocks. Raise ConfigError (one line)."""

    def files_identity(self) -> Optional[str]:
        """The identity of the files it reads besides the dense model (an external checkpoint), once
        they are found to be there (ConfigError otherwise): part of the run's identity. None: none."""
        return None

    def storage(self) -> Optional[dict]:
        """The quantized format its weights come in (``bits``, ``group_size``, ``sym``), for the bits
        accounting: a checkpoint quantized elsewhere. None: the model's dtype."""
        return None

    def check(self, model: nn.Module, settings: PruneSettings) -> None:
        """Checks against the model (its skeleton on the meta device will do): the patterns must
        select weights, and an N:M pattern must divide their input features."""
        self.check_depth(len(decoder_layers(model)))
        if not self.prunes_weights:
            return
        targets = method_targets(model, self, "pruner")
        if settings.spec.is_nm:
            for name, t in targets.items():
                if t.in_features % settings.spec.m:
                    raise ConfigError(f"N:M sparsity {settings.spec}: {name} has {t.in_features} "
                                      f"input features, not a multiple of {settings.spec.m}")

    def prune(self, model: nn.Module, calib: Optional[torch.Tensor], settings: PruneSettings) -> dict:
        """Prune ``model`` in place; return what the method reports about itself."""
        raise NotImplementedError


@dataclass
class CalibratedPruner(Pruner):
    """A pruner that reads calibration activations block by block (Wanda, SparseGPT).

    ``sequential``: inside a block, each layer's statistics come from the block with the layers
    before it already pruned (o_proj sees the pruned q/k/v, the MLP the pruned attention, an
    expert's down projection its pruned gate/up) -- GPTQ/SparseGPT's ``--true-sequential``.
    ``false``: every layer's statistics come from the dense block, as in Wanda's reference code
    (``lib/prune.py``: prune_wanda and prune_sparsegpt). Independent of ``calib.batch_size``, which
    only bounds memory."""

    sequential: bool = True

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclass
class Quantizer(Method):
    """Base of every quantization method (``conf/quant/<name>.yaml`` + ``prunerep/compress/quant/<name>.py``).

    Capabilities are class flags; :meth:`validate` runs before the model loads (settings alone),
    :meth:`check` on its skeleton before it loads, :meth:`quantize` after the pruner."""

    quantizes: ClassVar[bool] = True  # False for ``none``: no quantize stage, no quantization entry

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are loaded for it."""
        return False

    def validate(self) -> None:
        """Checks that need no model. Raise ConfigError (one line)."""

    def check(self, model: nn.Module) -> None:
        """Checks against the model (its skeleton on the meta device will do). Raise ConfigError
        (one line)."""

    def quantize(self, model: nn.Module, calib: Optional[torch.Tensor], settings: PruneSettings) -> dict:
        """Quantize-dequantize ``model``'s weights in place; return what the method reports."""
        raise NotImplementedError

    def storage(self) -> Optional[dict]:
        """The storage format it gives its target weights (``bits``, ``group_size``, ``sym``), for
        the bits accounting; None when it quantizes nothing."""
        return None


@dataclass
class GroupQuantizer(Quantizer):
    """A quantizer to ``bits``-bit integers with one fp16 scale (and, asymmetric, one zero point)
    per group of ``group_size`` consecutive input weights of each output row (``-1``: one group
    per row). ``include`` / ``exclude`` / ``routers``: which weight targets of a decoder block, as
    for the pruners (the embeddings and the LM head are never quantized)."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    include: str = r".*"
    exclude: Optional[str] = None
    routers: bool = False

    def validate(self) -> None:
        if isinstance(self.bits, bool) or not (MIN_BITS <= int(self.bits) <= MAX_BITS):
            raise ConfigError(f"quant.bits={self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"quant.group_size={self.group_size} must be >= 1, or -1 (one group per output row)")
        check_target_patterns(self, "quant")

    def check(self, model: nn.Module) -> None:
        for name, t in method_targets(model, self, "quant").items():
            if self.group_size != -1 and t.in_features % self.group_size:
                raise ConfigError(f"quant.group_size={self.group_size} does not divide the {t.in_features} input "
                                  f"features of {name}; choose a divisor of every width (e.g. 64 or 32) or -1 "
                                  f"(one group per output row)")

    def storage(self) -> Optional[dict]:
        return {"bits": int(self.bits), "group_size": int(self.group_size), "sym": bool(self.sym)}

    def report(self, errors: dict[str, float], **extra) -> dict:
        """What every group quantizer reports (quantization entry of compression.json)."""
        return {"method": self.name, **self.storage(), "n_layers": len(errors),
                "mean_weight_rel_error": sum(errors.values()) / len(errors) if errors else 0.0, **extra}


@dataclass
class CalibratedQuantizer(GroupQuantizer):
    """A quantizer that reads calibration activations block by block (GPTQ, AWQ), through the
    pruners' machinery (:func:`prunerep.compress.engine.calibrated_blocks` /
    :func:`~prunerep.compress.engine.prune_block`): block i+1 sees the outputs of the already
    quantized block i. ``sequential`` as for the pruners: ``true``, each layer's statistics come
    from the block with the layers before it already quantized; ``false``, from the block as the
    pruner left it."""

    sequential: bool = True

    @property
    def needs_calibration(self) -> bool:
        return True
