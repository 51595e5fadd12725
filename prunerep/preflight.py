"""The checks of a run that read files or the network, before the model loads: the cache directory
is writable, the model's and the calibration data's files are there and readable, the Hub answers
where it is needed, and the model's skeleton (built on the meta device from its config) agrees
with what the run asks of it. Each failure is one line (:class:`~prunerep.errors.ConfigError`).
:func:`check` also establishes the identity of the model's files, the key of the dense caches."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from torch import nn

from prunerep.config import CalibConfig, ModelConfig
from prunerep.errors import ConfigError
from prunerep.model.anatomy import coverage, decoder_layers
from prunerep.model.identity import model_key
from prunerep.model.skeleton import context_length, model_config, skeleton
from prunerep.model.sources import hub_reachable, looks_local
from prunerep.probes.capture import resolve_layers
from prunerep.results.store import stable_hash
from prunerep.spec import RunSpec

#: a weight pruner or quantizer must reach at least this share of the decoder blocks' parameters
MIN_COVERAGE = 0.95


def check(rs: RunSpec) -> RunSpec:
    """``rs`` checked against the files it names, with its model key and whether the model's shape
    was checked before loading (a hub model not in the local cache: only after)."""
    writable_dir(rs.cache_dir, "cache_dir")
    model_files(rs.model)
    calibration_files(rs.calib)
    # the files a method reads besides the dense model (pruner=external): a new checkpoint under the
    # same path is another point
    extra = rs.pruner.files_identity()
    config = model_config(rs.model, rs.cache_dir)
    if config is not None:
        against_the_model(skeleton(config), context_length(config), rs)
    key = model_key(rs.model, rs.placement)
    chash = rs.identity.config_hash if extra is None else stable_hash(rs.identity.config_hash, extra)
    return dataclasses.replace(rs, model_key=key, checked_before_loading=config is not None,
                               identity=dataclasses.replace(rs.identity, model_key=key, config_hash=chash))


def writable_dir(d: Path, what: str) -> None:
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{what}={str(d)!r} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}={str(d)!r} cannot be created: {e.strerror}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={str(d)!r} is not writable")


def model_files(m: ModelConfig) -> None:
    if m.source == "gguf" and not (m.path and Path(m.path).exists()):
        raise ConfigError(f"model.path={m.path!r}: no such .gguf file")
    if m.source == "hub" and m.path and looks_local(m.path) and not Path(m.path).exists():
        raise ConfigError(f"model.path={m.path!r}: no such local directory")


def calibration_files(c: CalibConfig) -> None:
    if c.source == "file":
        path = Path(os.path.expanduser(c.path))
        if not path.is_file():
            raise ConfigError(f"calib.path={c.path!r} is not a readable file")
        try:
            chars = len(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"calib.path={c.path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"calib.path={c.path!r} cannot be read: {e.strerror}") from None
        if chars <= c.seqlen:  # a token spans at least one character
            raise ConfigError(f"calib.path={c.path!r} has {chars} characters: too short for one window of "
                              f"calib.seqlen={c.seqlen} tokens")
    if c.source == "c4" and not hub_reachable():
        raise ConfigError("calib.source=c4 reads allenai/c4 from the Hugging Face Hub, which cannot be reached "
                          "here; use calib.source=pydoc (offline) or calib.source=file calib.path=...")


def against_the_model(model: nn.Module, context: Optional[int], rs: RunSpec) -> None:
    """What the model's shape decides, on its skeleton (meta device) before it loads, or on the
    loaded model when no skeleton could be had: probed layers in range, the pruner's and the
    quantizer's own checks (targets selected, N:M and group widths, depth), that the weight targets
    cover the blocks (never a silently half-pruned model), prompts and calibration windows within
    its context."""
    plan, pruner, quant = rs.probe, rs.pruner, rs.quant
    n_layers = len(decoder_layers(model))
    if not plan.empty:
        try:
            resolve_layers(plan.layers, n_layers)
        except ValueError as e:
            raise ConfigError(f"{e} (the model has {n_layers} blocks)") from None
    if pruner.prunes_weights or quant.quantizes:
        share, missing = coverage(model)
        if share < MIN_COVERAGE:
            top = sorted(missing.items(), key=lambda kv: -kv[1])[:3]
            what = ", ".join(f"{k} ({v:,} parameters)" for k, v in top) or "parameters of no known kind"
            raise ConfigError(f"the weights prunerep can prune or quantize hold {100 * share:.1f}% of the decoder "
                              f"blocks' parameters (< {100 * MIN_COVERAGE:.0f}%); not covered: {what}. This "
                              f"architecture ({type(model).__name__}) is not supported")
    pruner.check(model, rs.prune)
    quant.check(model)
    if quant.quantizes and pruner.storage() is not None:
        raise ConfigError(f"the {pruner.name} pruner's weights are already quantized ({pruner.storage()['bits']} bits); "
                          f"quant={quant.name} would quantize them again: use quant=none")
    if context:
        if rs.needs_calibration and rs.calib.seqlen > context:
            raise ConfigError(f"calib.seqlen={rs.calib.seqlen} is longer than the model's context ({context} tokens)")
        if not plan.empty and plan.max_prompt_tokens + plan.max_new_tokens > context:
            raise ConfigError(f"probe.max_prompt_tokens + probe.max_new_tokens = "
                              f"{plan.max_prompt_tokens + plan.max_new_tokens} is longer than the model's context "
                              f"({context} tokens)")
