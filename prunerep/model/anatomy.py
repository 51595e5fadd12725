"""A causal LM's parts, found on an unmodified Hugging Face model: the decoder blocks, their
attention and MLP sublayers, the final norm and LM head (the logit lens), and the weight
matrices a pruner or quantizer works on. Every pruner, quantizer and probe reads the model
through this vocabulary, so a new architecture is taught here once.

Weight targets (:class:`Target`) are the 2-D matrices ``[out, in]`` that a ``F.linear`` applies
inside a decoder block:

* every ``nn.Linear`` (attention and MLP projections, a shared expert's projections);
* every expert of a mixture-of-experts block, one target per expert and matrix. transformers 5
  stores experts fused, ``experts.gate_up_proj`` ``[E, 2I, d]`` and ``experts.down_proj``
  ``[E, d, I]`` (``[E, in, out]`` where the class says ``is_transposed``); target
  ``mlp.experts.<e>.gate_up_proj`` is the view ``gate_up_proj[e]``, so masking it prunes that
  expert in place;
* the routers (``mlp.gate``, ``mlp.shared_expert_gate``) only when asked: they stay dense by
  default (a few thousand weights that decide which expert runs).

:func:`feeding` calls a function with each target's input activations right before the target
computes, from forward pre-hooks: a Linear's input, and for an expert the tokens the router sent
to it (``routed``) or every token of the block (``all``), with the down projection's input
computed from the expert's gate/up projection as it is at that moment (so pruning gate/up in the
callback changes what down sees, as a sequential order wants). All hooks are removed on exit.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

SUBLAYER_KINDS = ("attn", "mlp")
_SUBLAYER_NAMES = {"attn": ("self_attn", "attention", "attn", "self_attention"),
                   "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe")}
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "fc2", "dense_4h_to_h", "w2")
#: names of a mixture-of-experts block's routers (children with a [experts or 1, d] weight)
_ROUTER = re.compile(r"(^|_)(gate|router)$")
#: how an expert's calibration tokens are chosen: those the router sent to it, or every token
EXPERT_TOKENS = ("routed", "all")
#: rows of a lens matmul come in multiples of this: a BLAS takes another code path for 1-3 rows
#: (gemv), so padding keeps each row's logits bit-identical however the rows are batched
LENS_ROW_MULTIPLE = 8


# --------------------------------------------------------------------------- blocks and sublayers

def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (LlamaModel inside LlamaForCausalLM, ...); the model
    itself when it has no such part."""
    base = getattr(model, "model", None) or getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF decoder (Llama, Qwen2, Mistral, Gemma, GPT-NeoX, MoE...)."""
    base = base_model(model)
    for attr in ("layers", "h", "blocks", "decoder.layers"):
        obj = base
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    """L, the number of decoder blocks (probe layer indices run 0..L)."""
    return len(decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module:
    base = base_model(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(base, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise TypeError(f"cannot find the final norm of {type(model).__name__}")


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no LM head")
    return head


def sublayer(block: nn.Module, kind: str) -> nn.Module:
    """The attention (``attn``) or MLP (``mlp``) sublayer of a decoder block."""
    if kind not in _SUBLAYER_NAMES:
        raise ValueError(f"unknown sublayer {kind!r}; choose from {SUBLAYER_KINDS}")
    for name in _SUBLAYER_NAMES[kind]:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise TypeError(f"cannot find the {kind} sublayer of {type(block).__name__} "
                    f"(looked for {list(_SUBLAYER_NAMES[kind])})")


def residual_update(block: nn.Module, kind: str) -> nn.Module:
    """The module whose output is the sublayer's update to the residual stream, so that
    ``block_out = block_in + update(attn) + update(mlp)``. Llama/Qwen2/Mistral/Gemma(1): the
    sublayer itself. Gemma2/3-style "sandwich" blocks normalise each update before adding it
    (``post_attention_layernorm``, ``post_feedforward_layernorm``): those norms."""
    sandwich = hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")
    if sandwich:
        return block.post_attention_layernorm if kind == "attn" else block.post_feedforward_layernorm
    return sublayer(block, kind)


def first_output(output: Any) -> Tensor:
    """The hidden states of a module's output (modules may return a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_first_output(output: Any, value: Tensor) -> Any:
    """``output`` with its hidden states replaced."""
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


@contextmanager
def hooked(post: Iterable[tuple[nn.Module, Callable]] = (), pre: Iterable[tuple[nn.Module, Callable]] = ()
           ) -> Iterator[None]:
    """Forward hooks ``hook(module, args, output)`` (``post``) and forward pre-hooks ``hook(module,
    args, kwargs)`` (``pre``) on the given modules while inside; removed on exit, whatever happens."""
    handles = []
    try:
        for module, hook in pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in post:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- the logit lens

def lens_logits(model: nn.Module, h: Tensor, raw: bool = False, out: Tensor | None = None) -> Tensor:
    """z = LM head(final norm(h)) with the model's own modules, or LM head(h) with ``raw`` (the
    paper's released code). For the last block's raw output this is exactly the model's logits;
    a final-logit soft-cap (Gemma2) applies either way. ``out`` (:func:`lens_buffer`, reused
    from call to call): where it holds h's rows on h's device and in its dtype, the head's matmul
    writes there (the module's own kernel, bit for bit) instead of into fresh memory, whose page
    faults cost ~25% of a CPU matmul of this shape; the logits are then a view of ``out``."""
    x = h if raw else final_norm(model)(h)
    head = output_head(model)
    if (out is not None and x.dim() == 2 and out.shape[0] >= x.shape[0] and _plain_linear(head)
            and out.shape[1] == head.weight.shape[0]
            and head.weight.device == x.device == out.device and head.weight.dtype == x.dtype == out.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or head.weight.requires_grad))):  # out=: no autograd
        z = torch.mm(x, head.weight.t(), out=out[:x.shape[0]])
    else:
        z = head(x)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def _plain_linear(head: nn.Module) -> bool:
    """``head(x)`` is ``x @ head.weight.T`` and nothing else: no bias, hook, offload or subclass."""
    return (type(head) is nn.Linear and head.bias is None and head.weight.device.type != "meta"
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")
                     or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks))


def lens_buffer(model: nn.Module, rows: int, sides: int = 1) -> Tensor | None:
    """A buffer for :func:`lens_rows`'s ``out``: room for ``sides`` matrices of up to ``rows`` rows
    each, padded as :func:`lens_rows` pads them, on the head's device and in its dtype; None where
    the head is not a plain ``nn.Linear`` (its own call is used then)."""
    head = output_head(model)
    if not _plain_linear(head):
        return None
    padded = sides * (rows + -rows % LENS_ROW_MULTIPLE)
    return torch.empty(padded, head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)


def lens_rows(model: nn.Module, states: Sequence[Tensor], raw: bool = False, out: Tensor | None = None
              ) -> list[Tensor]:
    """:func:`lens_logits` of several ``[n, d]`` matrices in ONE LM-head matmul (the head, a GB
    read for a 7B model, is read once), each zero-padded to a multiple of
    :data:`LENS_ROW_MULTIPLE` rows, so a row's logits never depend on what it was batched with.
    ``out``: as in :func:`lens_logits` (the rows returned are then views of it)."""
    parts, spans, at = [], [], 0
    for s in states:
        pad = -s.shape[0] % LENS_ROW_MULTIPLE
        parts += [s, s.new_zeros(pad, s.shape[-1])] if pad else [s]
        spans.append((at, at + s.shape[0]))
        at += s.shape[0] + pad
    z = lens_logits(model, torch.cat(parts), raw, out)
    return [z[a:b] for a, b in spans]


# --------------------------------------------------------------------------- weight targets

@dataclass(eq=False)
class Target:
    """One weight matrix ``[out, in]`` a pruner or quantizer works on (see the module doc)."""

    name: str  # in its block: "self_attn.q_proj", "mlp.experts.3.down_proj", "mlp.gate"
    module: nn.Module  # the Linear, router or experts module holding the parameter
    param: str = "weight"
    expert: Optional[int] = None
    transposed: bool = False  # the stored slice is [in, out]
    kind: str = "linear"  # linear | expert | router

    @property
    def weight(self) -> Tensor:
        """The live matrix ``[out, in]``: a view, so in-place changes reach the model."""
        w = getattr(self.module, self.param)
        if self.expert is not None:
            w = w[self.expert]
        return w.T if self.transposed else w

    @property
    def bias(self) -> Optional[Tensor]:
        if self.kind == "expert":
            b = getattr(self.module, f"{self.param}_bias", None) if getattr(self.module, "has_bias", False) else None
            return None if b is None else b[self.expert]
        return getattr(self.module, "bias", None)

    @property
    def shape(self) -> tuple[int, int]:
        w = getattr(self.module, self.param)
        out, inp = (w.shape[-2], w.shape[-1])
        return (inp, out) if self.transposed else (out, inp)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def is_experts(module: nn.Module) -> bool:
    """A fused experts module: 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` parameters."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 == down.dim()


def _up_param(experts: nn.Module) -> str:
    return "gate_up_proj" if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) else "up_proj"


def expert_targets(prefix: str, experts: nn.Module) -> list[Target]:
    """Per expert, its up (gate/up) and down matrices, in the order they compute."""
    t = bool(getattr(experts, "is_transposed", False))
    up = _up_param(experts)
    n = getattr(experts, up).shape[0]
    return [Target(f"{prefix}.{e}.{p}", experts, p, e, t, "expert") for e in range(n) for p in (up, "down_proj")]


def routers(block: nn.Module) -> dict[str, nn.Module]:
    """The routers of the block's mixture-of-experts sublayers, by name in the block."""
    found = {}
    for name, mod in block.named_modules():
        if any(is_experts(c) for c in mod.children()):
            for child_name, child in mod.named_children():
                w = getattr(child, "weight", None)
                if _ROUTER.search(child_name) and isinstance(w, nn.Parameter) and w.dim() == 2:
                    found[f"{name}.{child_name}" if name else child_name] = child
    return found


def all_targets(block: nn.Module, with_routers: bool = False) -> dict[str, Target]:
    """Every weight target of a decoder block, by name, in module order (see the module doc)."""
    router = routers(block)
    out: dict[str, Target] = {}
    for name, mod in block.named_modules():
        if name in router:
            if with_routers:
                out[name] = Target(name, mod, kind="router")
        elif isinstance(mod, nn.Linear):
            out[name] = Target(name, mod)
        elif is_experts(mod):
            out.update({t.name: t for t in expert_targets(name, mod)})
    return out


def select(targets: dict[str, Target], include: str = r".*", exclude: Optional[str] = None) -> dict[str, Target]:
    """The targets whose name matches ``include`` and not ``exclude`` (regexes, ``re.search``)."""
    inc = re.compile(include)
    exc = re.compile(exclude) if exclude else None
    return {n: t for n, t in targets.items() if inc.search(n) and not (exc and exc.search(n))}


def block_targets(block: nn.Module, include: str = r".*", exclude: Optional[str] = None,
                  with_routers: bool = False) -> dict[str, Target]:
    return select(all_targets(block, with_routers), include, exclude)


def model_targets(model: nn.Module, include: str = r".*", exclude: Optional[str] = None,
                  with_routers: bool = False) -> dict[str, Target]:
    """``{"layers.<i>.<name>": Target}`` over every decoder block."""
    return {f"layers.{i}.{n}": t for i, block in enumerate(decoder_layers(model))
            for n, t in block_targets(block, include, exclude, with_routers).items()}


def coverage(model: nn.Module) -> tuple[float, dict[str, int]]:
    """The share of the decoder blocks' parameters that weight targets hold (routers count as
    reachable: they are left dense by choice; biases go with their matrix), and the other
    matrices by name (``layers.*.<name>``: parameters). Works on a model on the meta device."""
    total = covered = 0
    missing: dict[str, int] = {}
    for block in decoder_layers(model):
        reach = {(id(t.module), t.param) for t in all_targets(block, with_routers=True).values()}
        for mname, mod in block.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                total += p.numel()
                if (id(mod), pname) in reach or (id(mod), pname.removesuffix("_bias")) in reach or (
                        pname == "bias" and (id(mod), "weight") in reach):
                    covered += p.numel()
                elif p.dim() >= 2:
                    key = f"layers.*.{mname}.{pname}" if mname else f"layers.*.{pname}"
                    missing[key] = missing.get(key, 0) + p.numel()
    return (covered / total if total else 1.0), missing


# --------------------------------------------------------------------------- calibration inputs

def _expert_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    hs = args[0] if args else kwargs["hidden_states"]
    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hs, idx


def expert_down_input(experts: nn.Module, expert: int, x: Tensor) -> Tensor:
    """What expert ``expert``'s down projection reads for its inputs ``x``: act(gate)·up of its
    gate/up projection as it is now."""
    up = Target("", experts, _up_param(experts), expert, bool(getattr(experts, "is_transposed", False)), "expert")
    h = F.linear(x, up.weight, up.bias)
    if up.param == "gate_up_proj":
        return experts._apply_gate(h) if hasattr(experts, "_apply_gate") else _chunked_gate(experts, h)
    return experts.act_fn(h)


def _chunked_gate(experts: nn.Module, h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


@contextmanager
def feeding(targets: dict[str, Target], fn: Callable[[str, Tensor], None], expert_tokens: str = "routed"
            ) -> Iterator[None]:
    """Forward pre-hooks: before a target computes, ``fn(name, x)`` with its inputs ``x`` ``[tokens,
    in_features]`` (see the module doc). An expert the router sent no token gets ``x`` with 0 rows
    (``routed``). Removed on exit, whatever happens inside."""
    if expert_tokens not in EXPERT_TOKENS:
        raise ValueError(f"expert_tokens={expert_tokens!r}; choose {' or '.join(EXPERT_TOKENS)}")
    by_module: dict[int, list[Target]] = {}
    modules: dict[int, nn.Module] = {}
    for t in targets.values():
        by_module.setdefault(id(t.module), []).append(t)
        modules[id(t.module)] = t.module
    names = {id(t): n for n, t in targets.items()}
    handles = []
    last: list = [None, None]  # the last input seen and its flattened view: modules reading one tensor get one x

    def plain(ts: list[Target]):
        def hook(_mod, args, kwargs):
            arg = args[0] if args else next(iter(kwargs.values()))
            if arg is not last[0]:
                last[:] = [arg, arg.detach().flatten(0, -2)]
            for t in ts:
                fn(names[id(t)], last[1])
        return hook

    def experts_hook(mod: nn.Module, ts: list[Target]):
        by_expert: dict[int, dict[str, Target]] = {}
        for t in ts:
            by_expert.setdefault(t.expert, {})[t.param] = t
        up_name = _up_param(mod)

        def hook(_mod, args, kwargs):
            hs, idx = _expert_call(args, kwargs)
            hs = hs.detach().flatten(0, -2)
            idx = idx.reshape(hs.shape[0], -1)
            for e in sorted(by_expert):
                mine = by_expert[e]
                x = hs if expert_tokens == "all" else hs[(idx == e).any(-1)]
                if up_name in mine:
                    fn(names[id(mine[up_name])], x)
                if "down_proj" in mine:
                    with torch.no_grad():
                        fn(names[id(mine["down_proj"])], expert_down_input(mod, e, x))
        return hook

    try:
        for key, ts in by_module.items():
            mod = modules[key]
            hook = experts_hook(mod, ts) if ts[0].kind == "expert" else plain(ts)
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- identity sublayers

def output_targets(block: nn.Module, kind: str) -> list[Target]:
    """The targets whose output is the sublayer's output: its output projection(s) (o_proj,
    down_proj; every expert's down projection and a shared expert's). Zeroed, with their biases,
    the sublayer adds nothing to the residual stream (a post-norm of zero is zero too)."""
    sub = sublayer(block, kind)
    found = [t for t in all_targets(sub).values()
             if t.name.rsplit(".", 1)[-1] in _OUTPUT_PROJECTIONS or (t.kind == "expert" and t.param == "down_proj")]
    if not found:
        raise TypeError(f"cannot find the output projection of {type(sub).__name__}")
    return found


@torch.no_grad()
def make_identity(block: nn.Module, kind: str) -> None:
    """The block's ``kind`` sublayer adds zero to the residual stream from now on."""
    for t in output_targets(block, kind):
        t.weight.zero_()
        if t.bias is not None:
            t.bias.zero_()


__all__ = ["SUBLAYER_KINDS", "EXPERT_TOKENS", "LENS_ROW_MULTIPLE", "base_model", "decoder_layers", "num_layers",
           "final_norm", "output_head", "sublayer", "residual_update", "first_output", "with_first_output", "hooked",
           "lens_logits", "lens_rows", "lens_buffer", "Target", "is_experts", "expert_targets", "routers", "all_targets", "select",
           "block_targets", "model_targets", "coverage", "expert_down_input", "feeding", "output_targets",
           "make_identity"]
