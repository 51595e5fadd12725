"""The three contexts in which a model's hidden states are read.

* ``prompt`` — one forward over the prompt; every prompt position is compared.
* ``teacher_forced`` — one forward over ``prompt + dense greedy continuation``; the
  positions ``P−1 … P+n−2`` (those that predict generated tokens ``0 … n−1``) are
  compared, so both models are scored along the *dense* model's trajectory.
* ``free_running`` — each model decodes greedily on its own (KV cache, one token per
  step); step t compares the two next-token distributions, each conditioned on its own
  history. The dense trajectory stops after an end-of-sequence token (kept) or
  ``max_new_tokens``; the pruned model decodes exactly as many steps, whatever it emits.

The gap between ``teacher_forced`` and ``free_running`` is the measured error
accumulation of autoregressive decoding.

All functions run one unbatched sequence (no padding, so no masking subtleties) and are
deterministic: the same model on the same ids gives bit-identical states, which is what
makes a dense-vs-dense comparison exactly zero.

A ``memo`` (a dict the caller owns, for as long as the model does not change) lets a later call
reuse what an earlier one computed: :func:`prompt_states` and :func:`teacher_forced_states` keep
the last layer's residual-stream states of each sequence they run there, and a call that asks
for nothing else is answered from them without a forward.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from prunerep.model.anatomy import base_model, num_layers
from prunerep.model.placement import input_device
from prunerep.probes.capture import Key, capture


def _forward(model: nn.Module, ids: Tensor, **kw):
    # logits_to_keep=1: the probes recompute logits through the lens where they need them
    return model(input_ids=ids.to(input_device(model)).unsqueeze(0), logits_to_keep=1, **kw)


@functools.cache  # inspect.signature once per model class, not at every decoding step
def _cache_kwarg(model_cls: type) -> str:
    """The name under which ``model_cls.forward`` takes (and its output returns) the KV cache:
    ``cache`` in current transformers (where ``past_key_values`` is deprecated and warns),
    ``past_key_values`` in releases before the rename."""
    try:
        params = inspect.signature(model_cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _kv_cache(model: nn.Module, out):
    """The KV cache an output carries, read under the model's own name for it (no warning)."""
    return getattr(out, _cache_kwarg(type(model)))


def states_forward(model: nn.Module, ids: Tensor) -> None:
    """A forward for its hidden states only: through the decoder without the LM head where
    the model exposes it (the head of a 7B model is ~1 GB read per call, even for one row)."""
    decoder = base_model(model)
    if decoder is not model:
        decoder(input_ids=ids.to(input_device(model)).unsqueeze(0), use_cache=False)
    else:
        _forward(model, ids, use_cache=False)


def _recall(memo: dict | None, key, layers: Sequence[int], sublayers: Sequence[str]) -> dict[Key, Tensor] | None:
    kept = memo.get(key) if memo is not None else None
    want = [(layer, sub) for layer in layers for sub in sublayers if layer > 0 or sub == "block"]
    if kept is None or not want or any(k not in kept for k in want):
        return None
    return {k: kept[k] for k in want}


def _remember(model: nn.Module, memo: dict | None, key, states: dict[Key, Tensor]) -> None:
    last = (num_layers(model), "block")
    if memo is not None and last in states:
        memo[key] = {last: states[last]}


@torch.inference_mode()
def prompt_states(model: nn.Module, ids: Tensor, layers: Sequence[int], sublayers: Sequence[str],
                  memo: dict | None = None) -> dict[Key, Tensor]:
    """Hidden states ``[T, d]`` at every prompt position, for each (layer, sublayer)."""
    key = ("prompt", tuple(int(t) for t in ids.tolist()))
    states = _recall(memo, key, layers, sublayers)
    if states is None:
        with capture(model, layers, sublayers) as acts:
            states_forward(model, ids)
        states = {k: v[0] for k, v in acts.items()}
        _remember(model, memo, key, states)
    return states


@torch.inference_mode()
def teacher_forced_states(model: nn.Module, prompt_ids: Tensor, gen_ids: Tensor, layers: Sequence[int],
                          sublayers: Sequence[str], memo: dict | None = None) -> dict[Key, Tensor]:
    """Hidden states ``[n, d]`` at the n positions predicting ``gen_ids`` (n = len(gen_ids))."""
    key = ("teacher_forced", tuple(int(t) for t in prompt_ids.tolist()), tuple(int(t) for t in gen_ids.tolist()))
    states = _recall(memo, key, layers, sublayers)
    if states is None:
        n, p = len(gen_ids), len(prompt_ids)
        seq = torch.cat([prompt_ids.cpu(), gen_ids.cpu()[: n - 1]])
        with capture(model, layers, sublayers) as acts:
            states_forward(model, seq)
        states = {k: v[0, p - 1: p - 1 + n] for k, v in acts.items()}
        _remember(model, memo, key, states)
    return states


@dataclass
class Trajectory:
    tokens: Tensor  # [n] int64, the greedy tokens
    h_last: Tensor  # [n, d] raw last-layer state (before the final norm) that predicted each token


@torch.inference_mode()
def greedy_decode(model: nn.Module, prompt_ids: Tensor, n_steps: int, stop_ids: Iterable[int] = ()
                  ) -> Trajectory:
    """Greedy decoding with the KV cache, recording the last layer's state at every step.

    Stops after ``n_steps`` tokens, or right after a token in ``stop_ids`` (kept)."""
    stop = set(int(t) for t in stop_ids)
    last = num_layers(model)
    tokens, states = [], []
    with capture(model, [last], ["block"]) as acts:
        out = _forward(model, prompt_ids, use_cache=True)
        for step in range(n_steps):
            states.append(acts[(last, "block")][0, -1])
            tok = out.logits[0, -1].argmax()
            tokens.append(tok)
            if step + 1 == n_steps or int(tok) in stop:
                break
            out = _forward(model, tok.view(1), use_cache=True, **{_cache_kwarg(type(model)): _kv_cache(model, out)})
    d = model.config.hidden_size
    if not tokens:
        return Trajectory(torch.empty(0, dtype=torch.long), torch.empty(0, d))
    return Trajectory(torch.stack(tokens).cpu(), torch.stack(states).cpu())


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return sorted(ids)
