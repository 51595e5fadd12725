"""LLM-Drop (He et al., 2024): drop the attention sublayers, MLP sublayers or whole blocks
that change their input least on calibration data, importance = mean 1 − cos(input, output)
of the residual stream across the sublayer. A dropped sublayer becomes the identity on the
residual stream: its output projection (o_proj / down_proj, and bias) is zeroed, so it adds
exactly nothing, and the model saves and reloads with `from_pretrained` unchanged.

Importance is measured on the dense model (one pass, block by block) and the k least
important candidates are dropped at once. k = round(sparsity · candidates), or
`pruner.count` when given. Sublayer outputs are taken as the Llama/Qwen2/Mistral-style
residual update (h_mid = h + attn(h), h_out = h_mid + mlp(h_mid))."""
from __future__ import annotations

import torch
from torch import nn

from prunerep.config import ConfigError
from prunerep.models import decoder_layers
from prunerep.pruners.common import calibrated_blocks, mean_cos_distance, run_block


def _out_proj(sub: nn.Module) -> nn.Linear:
    for name in ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "fc2", "dense_4h_to_h"):
        lin = getattr(sub, name, None)
        if isinstance(lin, nn.Linear):
            return lin
    raise TypeError(f"cannot find the output projection of {type(sub).__name__}")


def sublayers(block: nn.Module) -> dict[str, nn.Module]:
    attn = getattr(block, "self_attn", None) or getattr(block, "attention", None) or getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
    if attn is None or mlp is None:
        raise TypeError(f"{type(block).__name__}: no self_attn/mlp sublayers found")
    return {"attn": attn, "mlp": mlp}


@torch.no_grad()
def make_identity(sub: nn.Module) -> None:
    """The sublayer adds zero to the residual stream from now on."""
    lin = _out_proj(sub)
    lin.weight.zero_()
    if lin.bias is not None:
        lin.bias.zero_()


def n_to_drop(n_candidates: int, cfg) -> int:
    if cfg.pruner.count is not None:
        k = int(cfg.pruner.count)
        if k > n_candidates:
            raise ConfigError(f"pruner.count={k} but the model has only {n_candidates} "
                              f"{cfg.pruner.target} candidates")
        return k
    return int(round(cfg.spec.ratio * n_candidates))


def check(model, cfg) -> None:
    """Raise before any work when `count` exceeds what the model has (see check_pruner)."""
    n_candidates = len(decoder_layers(model)) * (2 if cfg.pruner.target == "both" else 1)
    n_to_drop(n_candidates, cfg)


@torch.no_grad()
def importance(model, calib, cfg) -> dict[str, float]:
    """1 − cos(input, output) for every candidate ("layers.3.attn", "layers.3.mlp", "layers.3")."""
    scores: dict[str, float] = {}
    for step in calibrated_blocks(model, calib, cfg, desc="layer_drop importance"):
        i, block, inputs, kwargs = step.index, step.block, step.inputs, step.kwargs
        subs = sublayers(block)
        upd: dict[str, list] = {"attn": [], "mlp": []}
        hooks = [subs[k].register_forward_hook(
            lambda m, a, out, k=k: upd[k].append(out[0] if isinstance(out, tuple) else out)) for k in upd]
        try:
            outputs = run_block(block, inputs, kwargs, cfg.batch_size)
        finally:
            for h in hooks:
                h.remove()
        step.outputs = outputs  # nothing is pruned while measuring: the dense outputs go on
        attn_upd, mlp_upd = torch.cat(upd["attn"]), torch.cat(upd["mlp"])
        mid = inputs + attn_upd
        scores[f"layers.{i}.attn"] = mean_cos_distance(inputs, mid)
        scores[f"layers.{i}.mlp"] = mean_cos_distance(mid, mid + mlp_upd)
        scores[f"layers.{i}"] = mean_cos_distance(inputs, outputs)
    return scores


def prune(model, calib, cfg) -> dict:
    target = cfg.pruner.target
    scores = importance(model, calib, cfg)
    if target == "block":
        candidates = {k: v for k, v in scores.items() if k.count(".") == 1}
    elif target == "both":
        candidates = {k: v for k, v in scores.items() if k.endswith((".attn", ".mlp"))}
    else:
        candidates = {k: v for k, v in scores.items() if k.endswith("." + target)}
    k = n_to_drop(len(candidates), cfg)
    dropped = sorted(candidates, key=candidates.get)[:k]
    layers = decoder_layers(model)
    for name in dropped:
        parts = name.split(".")
        block = layers[int(parts[1])]
        for sub_name, sub in sublayers(block).items():
            if len(parts) == 2 or parts[2] == sub_name:
                make_identity(sub)
    return {"method": "layer_drop", "calibration": True, "target": target, "n_candidates": len(candidates),
            "n_dropped": len(dropped), "dropped": sorted(dropped, key=lambda s: [int(p) if p.isdigit() else p
                                                                               for p in s.split(".")]),
            "importance": scores}
