"""Read hidden states out of an unmodified Hugging Face decoder with forward hooks.

Layer index convention: layer 0 is the embedding output (the input of block 0), layer
i ≥ 1 is the output of block i − 1, layer L (the number of blocks) is the last block's output
*before* the final norm. The indices are those of transformers' ``output_hidden_states``, and
so are the tensors at layers 0 … L − 1, but NOT at L: there transformers returns the state
*after* the final norm, ``final_norm(h_L)``, while :func:`capture` records the raw residual
stream h_L (what the logit lens :func:`prunerep.model.anatomy.lens_logits` reads). ``probe.h=normed`` compares the
normed state at L instead (:func:`prunerep.probes.compare.embedding_metrics`).

Sublayers at layer i ≥ 1 (block i − 1):

* ``block`` — the residual stream after the block (the decoder layer's output);
* ``attn``  — the attention sublayer's update to the residual stream;
* ``mlp``   — the MLP sublayer's update to the residual stream.

For Llama/Qwen2/Mistral/Gemma(1) the updates are the outputs of ``self_attn`` and ``mlp``,
so ``block_i = block_{i-1} + attn_i + mlp_i``. Gemma2/3-style blocks normalise each update
before adding it (``post_attention_layernorm``, ``post_feedforward_layernorm``); there the
hooks sit on those norms, so the same identity holds. Layer 0 has only ``block``.

The logit lens (:func:`prunerep.model.anatomy.lens_logits`) uses the model's own final norm
and LM head, unchanged: for the last layer it reproduces the model's logits exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from prunerep.model.anatomy import decoder_layers, first_output, hooked, residual_update
from prunerep.results.schema import SUBLAYERS

Key = tuple[int, str]


def resolve_layers(spec: Any, n_layers: int, include_last: bool = True) -> list[int]:
    """``"all"`` | list of indices (negative count from L, ``-1`` = L) | ``{every: k}``
    (0, k, 2k, ...) -> sorted unique layer indices in 0..L. The final layer L is always
    included (the headline numbers are read there) unless ``include_last`` is False."""
    if spec is None or spec == "all":
        layers = list(range(n_layers + 1))
    elif isinstance(spec, int):
        layers = [spec]
    elif hasattr(spec, "get") and "every" in spec:
        k = int(spec["every"])
        if k < 1:
            raise ValueError(f"probe.layers.every={k} must be >= 1")
        layers = list(range(0, n_layers + 1, k))
    elif isinstance(spec, str):
        raise ValueError(f"probe.layers={spec!r}: use all, a list of indices or {{every: k}}")
    else:
        layers = [int(i) for i in spec]
    out = set()
    for i in layers:
        j = i + n_layers + 1 if i < 0 else i
        if not 0 <= j <= n_layers:
            raise ValueError(f"probe.layers: index {i} is outside 0..{n_layers} (0 = embeddings, "
                             f"{n_layers} = last block)")
        out.add(j)
    if include_last:
        out.add(n_layers)
    return sorted(out)


@contextmanager
def capture(model: nn.Module, layers: Sequence[int], sublayers: Sequence[str] = ("block",)
            ) -> Iterator[dict[Key, Tensor]]:
    """Hooks that record ``acts[(layer, sublayer)]`` (shape ``[batch, seq, d]``) on every
    forward of ``model``; each forward overwrites the previous values. The tensors are the
    modules' own outputs, detached, not copies. All hooks are removed on exit.

    ``(0, "attn")`` and ``(0, "mlp")`` do not exist and are skipped."""
    blocks = decoder_layers(model)
    n = len(blocks)
    acts: dict[Key, Tensor] = {}

    def store(key: Key):
        def hook(_module, _inputs, output):
            acts[key] = first_output(output).detach()
        return hook

    def store_input(_module, args, kwargs):
        acts[(0, "block")] = (args[0] if args else kwargs["hidden_states"]).detach()

    post, pre = [], []
    for layer in layers:
        if not 0 <= layer <= n:
            raise ValueError(f"layer {layer} is outside 0..{n}")
        for sub in sublayers:
            if sub not in SUBLAYERS:
                raise ValueError(f"unknown sublayer {sub!r}; choose from {SUBLAYERS}")
            if layer > 0:
                block = blocks[layer - 1]
                post.append((block if sub == "block" else residual_update(block, sub), store((layer, sub))))
            elif sub == "block":
                pre.append((blocks[0], store_input))
    with hooked(post, pre):
        yield acts
