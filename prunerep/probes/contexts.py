"""The three contexts in which a model's hidden states are read.

* ``prompt`` — one forward over the prompt; every prompt position is compared.
* ``teacher_forced`` — one forward over ``prompt + dense greedy continuation``; the
  positions ``P−1 … P+n−2`` (those that predict generated tokens ``0 … n−1``) are
  compared, so both models are scored along the *dense* model's trajectory.
* ``free_running`` — each model decodes greedily on its own (KV cache); step t compares the
  two next-token distributions, each conditioned on its own history. The dense trajectory
  stops after an end-of-sequence token (kept) or ``max_new_tokens``; the pruned model decodes
  exactly as many steps, whatever it emits.

The gap between ``teacher_forced`` and ``free_running`` is the measured error
accumulation of autoregressive decoding.

:func:`run_contexts` reads a prompt once for all three (its forward's KV cache, copied, starts the
teacher-forced continuation and the decode). A model's free-running steps are read off its
teacher-forced continuation for as long as its greedy tokens are the dense ones (the history is
then the same), so only the steps after the two trajectories part are decoded: a lightly
compressed model that keeps the dense trajectory costs one forward, not one per token. The
decode feeds each token with a prompt-lookup draft of the next ones and keeps the steps the
model's greedy tokens confirm (:func:`_decode`), so a generation collapsed into repetition costs
one forward per few tokens. All functions run one unbatched sequence (no padding, so no masking
subtleties) and are deterministic: the same model on the same ids gives bit-identical states,
which is what makes a dense-vs-dense comparison exactly zero.

A ``memo`` (a dict the caller owns, for as long as the model does not change) lets a later call
reuse what an earlier one computed: :func:`run_contexts`, :func:`prompt_states` and
:func:`teacher_forced_states` keep the last layer's residual-stream states of each sequence they
run there, and a call that asks for nothing else is answered from them without a forward.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prunerep.model.anatomy import base_model, lens_logits, num_layers
from prunerep.model.placement import input_device, lens_device
from prunerep.probes.capture import Key, capture


def _forward(model: nn.Module, ids: Tensor, keep: int = 1, **kw):
    # the logits of the last ``keep`` positions: the probes recompute logits through the lens
    return model(input_ids=ids.to(input_device(model)).unsqueeze(0), logits_to_keep=keep, **kw)


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


def states_forward(model: nn.Module, ids: Tensor, cache=None) -> None:
    """A forward for its hidden states only: through the decoder without the LM head where
    the model exposes it (the head of a 7B model is ~1 GB read per call, even for one row);
    ``cache``: a KV cache the forward continues (and extends)."""
    decoder = base_model(model)
    kw = {"use_cache": True, _cache_kwarg(type(decoder)): cache} if cache is not None else {"use_cache": False}
    if decoder is not model:
        decoder(input_ids=ids.to(input_device(model)).unsqueeze(0), **kw)
    else:
        _forward(model, ids, **kw)


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


@dataclass
class Contexts:
    """One prompt's states in the contexts asked for (None: not asked)."""
    prompt: dict[Key, Tensor] | None = None  # [P, d] per (layer, sublayer)
    teacher_forced: dict[Key, Tensor] | None = None  # [n, d]
    free_running: Trajectory | None = None
    continuation: Tensor | None = None  # the tokens the teacher-forced continuation follows (the dense trajectory)


@torch.inference_mode()
def run_contexts(model: nn.Module, ids: Tensor, layers: Sequence[int], sublayers: Sequence[str], *,
                 prompt: bool = False, decode_steps: int = 0, stop_ids: Iterable[int] = (),
                 teacher_forced: bool = False, forced: Tensor | None = None, memo: dict | None = None) -> Contexts:
    """The states of one prompt in each context, from ONE forward over the prompt.

    That prefill's states are the ``prompt`` context; its state at P − 1 is the first
    teacher-forced and the first free-running step. Its KV cache, copied, starts the
    teacher-forced continuation along ``forced`` (the dense trajectory); with ``decode_steps``,
    that continuation is also the free-running decode as far as the model's own greedy tokens
    follow ``forced`` (:func:`_follow`): only the steps after they part are decoded one token at
    a time. The dense model (``forced`` None) decodes its own trajectory first and is then
    followed along it in the same way, so a model compared with itself gives bit-identical
    states. A prompt with nothing to generate takes :func:`prompt_states`' forward, without the
    LM head or a cache."""
    n_forced = len(forced) if forced is not None else decode_steps
    teacher_forced = teacher_forced and n_forced > 0
    if not (decode_steps > 0 or teacher_forced):
        return Contexts(prompt=prompt_states(model, ids, layers, sublayers, memo) if prompt else None)
    last = num_layers(model)
    key = tuple(int(t) for t in ids.tolist())
    tf_layers = layers if teacher_forced else []
    with capture(model, [last], ["block"]) as last_acts:
        with capture(model, layers if prompt or teacher_forced else [], sublayers) as acts:
            out = _forward(model, ids, use_cache=True)
        states = {k: v[0] for k, v in acts.items()}
        h_prompt = last_acts[(last, "block")][0]  # later forwards overwrite last_acts
        prefill = _Prefill(ids.cpu(), out, _kv_cache(model, out), h_prompt[-1:])
        traj, tf = None, {}
        if decode_steps == 0:
            draft = forced
            tf = _continuation(model, prefill, draft, tf_layers, sublayers)
        elif forced is not None:
            draft = forced
            tf, traj = _follow(model, prefill, draft, decode_steps, stop_ids, tf_layers, sublayers, last_acts)
        else:
            # the dense trajectory is the fixed point of _follow: its stepwise greedy tokens, followed
            # again where the lens's argmax of the followed states parts from them (a near-tie that
            # rounding decides)
            draft = _decode(model, out, copy.deepcopy(prefill.cache), last_acts, decode_steps, stop_ids,
                            prefill.ids).tokens
            for passes in range(1, decode_steps + 1):  # each pass extends the agreement by at least one step
                tf, traj = _follow(model, prefill, draft, decode_steps, stop_ids, tf_layers, sublayers, last_acts)
                if torch.equal(traj.tokens, draft) or passes == decode_steps:
                    break
                draft = traj.tokens
    _remember(model, memo, ("prompt", key), {(last, "block"): h_prompt})
    result = Contexts(prompt=states if prompt else None, free_running=traj, continuation=draft.cpu())
    if teacher_forced:
        tf = {k: torch.cat([v[-1:], tf[k]]) if k in tf else v[-1:] for k, v in states.items()}
        _remember(model, memo, ("teacher_forced", key, tuple(int(t) for t in draft.tolist())), tf)
        result.teacher_forced = tf
    return result


@dataclass
class _Prefill:
    ids: Tensor  # the prompt
    out: object  # the prompt forward's output: logits at P − 1
    cache: object  # its KV cache (copied before each use: it is read again)
    h_last: Tensor  # [1, d] the last layer's state at P − 1


def _continuation(model: nn.Module, prefill: _Prefill, draft: Tensor, layers: Sequence[int],
                  sublayers: Sequence[str]) -> dict[Key, Tensor]:
    """The states ``[n − 1, d]`` of the forward over ``draft[:-1]`` on from the prompt (a copy of
    its cache), through the decoder without the LM head; empty for a draft of one token."""
    if len(draft) < 2:
        return {}
    with capture(model, layers, sublayers) as acts:
        states_forward(model, draft.cpu()[: len(draft) - 1], copy.deepcopy(prefill.cache))
    return {k: v[0] for k, v in acts.items()}


def _follow(model: nn.Module, prefill: _Prefill, draft: Tensor, n_steps: int, stop_ids: Iterable[int],
            tf_layers: Sequence[int], sublayers: Sequence[str], last_acts: dict) -> tuple[dict, Trajectory]:
    """The teacher-forced continuation along ``draft`` (states at ``tf_layers``) and the model's
    free-running trajectory, read off that one forward for as long as the model's greedy token
    at each step is the draft's (its history is then the draft's, so the continuation's state at
    that step is the decode's), and decoded (:func:`_decode`) from the first step where they
    part (the prompt's cache, then the draft up to that step and the model's own token, in one
    forward). The greedy tokens of the followed steps come from the logit lens of the last
    layer's states, which is the model's own LM head: for 1, 2, 4, ... rows at a time, so a
    trajectory that parts early costs a head call or none, and one followed to the end costs
    one forward instead of ``len(draft) − 1``."""
    stop = set(int(t) for t in stop_ids)
    last = num_layers(model)
    n = len(draft)
    tf, h_last = _continuation(model, prefill, draft, tf_layers, sublayers), prefill.h_last
    if n > 1:
        h_last = torch.cat([h_last, last_acts[(last, "block")][0]])
    greedy = prefill.out.logits[0, -1:].argmax(-1).cpu()
    for t in range(min(n_steps, n)):
        if t == len(greedy):
            rows = h_last[t: min(n, 2 * t)].to(lens_device(model))
            greedy = torch.cat([greedy, lens_logits(model, rows).argmax(-1).cpu()])
        if t + 1 == n_steps or int(greedy[t]) in stop:
            return tf, Trajectory(greedy[: t + 1], h_last[: t + 1].cpu())
        if t + 1 == n or greedy[t] != draft[t]:
            history = torch.cat([draft.cpu()[:t], greedy[t: t + 1]])
            out = _forward(model, history, use_cache=True, **{_cache_kwarg(type(model)): copy.deepcopy(prefill.cache)})
            rest = _decode(model, out, _kv_cache(model, out), last_acts, n_steps - t - 1, stop,
                           torch.cat([prefill.ids, history]))
            return tf, Trajectory(torch.cat([greedy[: t + 1], rest.tokens]),
                                  torch.cat([h_last[: t + 1].cpu(), rest.h_last]))
    raise AssertionError("unreachable: the last step returns")


#: prompt-lookup drafts (Saxena 2023, transformers' ``prompt_lookup_num_tokens``): up to this many
#: tokens, those that followed the latest earlier occurrence of the sequence's last n-gram (n <= DRAFT_NGRAM).
#: 2: a forward over 3 tokens costs 1.1x one over 1 token on a CPU (MKL), over 4 tokens 1.5x
DRAFT_TOKENS, DRAFT_NGRAM = 2, 3


def _draft(seq: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``seq`` of at most :data:`DRAFT_NGRAM` tokens that occurred before; [] where none did. Written
    here rather than taken from transformers' ``PromptLookupCandidateGenerator``, which is part
    of ``generate``'s internals (batched tensors, its own stopping rules)."""
    arr = np.asarray(seq, dtype=np.int64)
    for n in range(min(DRAFT_NGRAM, len(arr) - 1) if k > 0 else 0, 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every n-gram that has a successor
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start: start + k].tolist()
    return []


def _rolls_back(cache) -> bool:
    """Whether ``crop`` puts ``cache`` back as it was before a forward: attention keys and values
    (a sliding window's too, once it records its past). A linear-attention layer's recurrent state
    rolls back only from a history of states that ``generate`` sizes to its draft, so a cache
    holding one is decoded without drafts."""
    layers = getattr(cache, "layers", None)
    return (layers is not None and bool(getattr(cache, "is_croppable", False))
            and hasattr(cache, "activate_past_recording")
            and not any(hasattr(layer, "recurrent_states") for layer in layers))


def _decode(model: nn.Module, out, cache, last_acts: dict, n_steps: int, stop_ids: Iterable[int],
            history: Tensor) -> Trajectory:
    """Greedy decoding on from the output ``out`` of a forward over ``history``'s last tokens and
    its KV ``cache``, the last layer's state at every step read from ``last_acts`` (a
    :func:`capture` of it).

    Where the cache can be rolled back (:func:`_rolls_back`), each forward also feeds a
    prompt-lookup draft of the next tokens (:func:`_draft` of the history and the tokens so far):
    the draft tokens the model's own greedy tokens confirm are its next steps, read off that
    forward, and the cache is cropped back past the first wrong one. A compressed model whose
    generation has collapsed into repetition then costs one forward per few tokens; each state
    is, to rounding, the stepwise decode's (the same history, in a forward over several tokens)."""
    stop = set(int(t) for t in stop_ids)
    last = num_layers(model)
    drafting = n_steps > 1 and DRAFT_TOKENS > 0 and _rolls_back(cache)
    if drafting:
        cache.activate_past_recording()  # a sliding-window layer keeps what a crop may need back
    seen = [int(t) for t in history.tolist()]
    tokens, states, draft = [], [], []
    logits, h = out.logits[0, -1:], last_acts[(last, "block")][0, -1:]
    while True:
        greedy = logits.argmax(-1)
        for i in range(len(greedy)):  # row i predicts the step after the i-th fed token
            tokens.append(greedy[i])
            states.append(h[i])
            seen.append(int(greedy[i]))
            if len(tokens) >= n_steps or seen[-1] in stop:
                return Trajectory(torch.stack(tokens).cpu(), torch.stack(states).cpu())
            if i == len(draft) or seen[-1] != draft[i]:
                break
        if drafting:
            cache.crop(-(len(draft) - i))  # the fed draft tokens after the first wrong one
        draft = _draft(seen, min(DRAFT_TOKENS, n_steps - len(tokens) - 1)) if drafting else []
        feed = torch.tensor([seen[-1], *draft])
        out = _forward(model, feed, keep=len(feed), use_cache=True, **{_cache_kwarg(type(model)): cache})
        cache = _kv_cache(model, out)
        logits, h = out.logits[0], last_acts[(last, "block")][0]


def greedy_decode(model: nn.Module, prompt_ids: Tensor, n_steps: int, stop_ids: Iterable[int] = ()
                  ) -> Trajectory:
    """Greedy decoding with the KV cache, recording the last layer's state at every step.

    Stops after ``n_steps`` tokens, or right after a token in ``stop_ids`` (kept)."""
    if n_steps <= 0:
        return Trajectory(torch.empty(0, dtype=torch.long), torch.empty(0, model.config.hidden_size))
    return run_contexts(model, prompt_ids, [], ["block"], decode_steps=n_steps, stop_ids=stop_ids).free_running


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
