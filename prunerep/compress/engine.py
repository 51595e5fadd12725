"""Block-by-block calibration, shared by the pruners and the quantizers.

As in the Wanda, SparseGPT and GPTQ reference code, the inputs of block i+1 are the outputs of the
already compressed block i, so peak memory is one block plus its calibration activations. A block's
weights are on its compute device for its turn (:func:`prunerep.model.placement.onloaded`): a model
sharded over GPUs, offloaded to CPU memory or to disk is compressed one block at a time and its
changed weights are written back where they live. Each target's inputs reach the method through
:func:`prunerep.model.anatomy.feeding` (an expert: the tokens routed to it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from prunerep.compress.method import PruneSettings
from prunerep.model.anatomy import Target, decoder_layers, feeding, first_output
from prunerep.model.placement import input_device, onloaded


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first decoder block; return that block's hidden-state inputs
    for every calibration sample and the keyword arguments (mask, position embeddings...)
    it is called with. Samples share one length, so sample 0's kwargs serve all of them."""
    layers = decoder_layers(model)
    captured: dict = {}

    def grab(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.setdefault("inputs", []).append(hs.detach())
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = input_device(model)
    try:
        for row in calib:
            try:
                model(row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(captured["inputs"], dim=0), kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """The block's outputs for all calibration inputs, in micro-batches."""
    outs = [first_output(block(inputs[i:i + batch_size], **kwargs)) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs, dim=0)


@dataclass
class BlockStep:
    index: int
    block: nn.Module
    inputs: torch.Tensor
    kwargs: dict
    outputs: torch.Tensor | None = None  # set by the caller when its own pass already computed them


def calibrated_blocks(model: nn.Module, calib: torch.Tensor, cfg: PruneSettings,
                      desc: str = "pruning") -> Iterator[BlockStep]:
    """Yield one BlockStep per decoder block, its weights on its compute device.

    The caller gathers statistics and prunes the block. If it leaves `step.outputs` unset,
    the pruned block is run once more here; either way those outputs become the next
    block's inputs, and the block's changed weights go back where they live."""
    layers = decoder_layers(model)
    inputs, kwargs = capture_block_inputs(model, calib)
    for i, block in enumerate(tqdm(layers, desc=desc, unit="block", leave=False)):
        with onloaded(block):
            step = BlockStep(i, block, inputs, kwargs)
            yield step
            inputs = step.outputs if step.outputs is not None else run_block(block, inputs, kwargs, cfg.batch_size)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def prune_block(step: BlockStep, targets: dict[str, Target], cfg: PruneSettings, sequential: bool,
                accumulate: Callable[[str, torch.Tensor], None], prune_target: Callable[[str, Target], None],
                dense_outputs: bool = False) -> None:
    """Gather statistics with `accumulate(name, x)` and prune with `prune_target(name, target)`,
    in the order ``sequential`` asks for (see :class:`CalibratedPruner`).

    Sequential: with the whole batch in one forward, one pass does both (each target is pruned
    right before it computes); with micro-batches, one pass over all of them per group of targets
    that read the same input (q/k/v, o, gate/up, down), pruning each group before the next
    group's statistics are gathered. Not sequential: one pass over the dense block gathers
    every target's statistics, then all are pruned, then the pruned block is run again for the
    next block's inputs. ``dense_outputs``: the next block reads the block's outputs from before it
    was compressed (llm-awq's order) instead."""
    batch = cfg.batch_size
    feed = dict(expert_tokens=cfg.expert_tokens)
    dense = None
    if not sequential:
        with feeding(targets, accumulate, **feed):
            dense = run_block(step.block, step.inputs, step.kwargs, batch)
        for name, t in targets.items():
            prune_target(name, t)
    elif batch >= len(step.inputs):
        if dense_outputs:
            dense = run_block(step.block, step.inputs, step.kwargs, batch)

        def once(name, x):
            accumulate(name, x)
            prune_target(name, targets[name])

        with feeding(targets, once, **feed):
            step.outputs = run_block(step.block, step.inputs, step.kwargs, len(step.inputs))
    else:
        if dense_outputs:
            dense = run_block(step.block, step.inputs, step.kwargs, batch)
        for group in input_groups(step, targets, cfg):
            with feeding({n: targets[n] for n in group}, accumulate, **feed):
                run_block(step.block, step.inputs, step.kwargs, batch)
            for name in group:
                prune_target(name, targets[name])
    if dense_outputs:
        step.outputs = dense


@torch.no_grad()
def input_groups(step: BlockStep, targets: dict[str, Target], cfg: PruneSettings) -> list[list[str]]:
    """The block's targets in the order they compute, grouped by shared input tensor (q/k/v read
    one tensor, gate/up another; each expert its own tokens), found by running one sample through
    the block; targets that one sample does not reach come last, one group each."""
    calls: list[tuple[str, torch.Tensor]] = []
    with feeding(targets, lambda name, x: calls.append((name, x)), expert_tokens=cfg.expert_tokens):
        run_block(step.block, step.inputs[:1], step.kwargs, 1)
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups + [[n] for n in targets if n not in seen]
