"""Each pruner's defining property, on tiny random-initialised decoders built here."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from conftest import make_tiny
from helpers import prune_settings
from prunerep.errors import ConfigError
from prunerep.model.anatomy import block_targets, decoder_layers
from prunerep.compress.engine import BlockStep, calibrated_blocks, input_groups, run_block
from prunerep.compress.masks import per_row_mask
from prunerep.compress.measure import measure_sparsity
from prunerep.compress.method import PruneSettings
from prunerep.compress.pruners.sparsegpt import sparsegpt_prune_weight
from prunerep.compress.stats import wanda_score
from prunerep.registry import discover, method_class
from prunerep.sparsity import parse_sparsity


# batch_size=3 < 8 calibration samples: micro-batches; >= 8: the whole batch in one forward
settings = partial(prune_settings, batch_size=3)  # sparsity 0.5


def prune(model, calib, cfg: PruneSettings) -> dict:
    return cfg.pruner.prune(model, calib, cfg)


def linear_inputs(model, module, ids) -> torch.Tensor:
    """The activations [tokens, in_features] a Linear sees when the model runs on ids."""
    got = []
    h = module.register_forward_hook(lambda m, a, o: got.append(a[0].flatten(0, -2)))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    return torch.cat(got)


# --------------------------------------------------------------------------- sparsity spec

@pytest.mark.parametrize("value,ratio,nm", [(0.5, 0.5, None), ("0.37", 0.37, None), (0, 0.0, None),
                                            ("2:4", 0.5, (2, 4)), ("4:8", 0.5, (4, 8)), ("1:4", 0.25, (1, 4))])
def test_parse_sparsity_accepts(value, ratio, nm):
    spec = parse_sparsity(value)
    assert spec.ratio == pytest.approx(ratio)
    assert (spec.n, spec.m) == (nm or (0, 0))


@pytest.mark.parametrize("value", [1.5, 1.0, -0.1, "4:2", "2:2", "0:4", "abc", "2:4:8", True])
def test_parse_sparsity_rejects(value):
    with pytest.raises(ConfigError):
        parse_sparsity(value)


# --------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_blockwise_calibration_reproduces_the_models_hidden_states(family, calib_ids):
    """Block-by-block forward (captured kwargs: mask, position embeddings, GQA) == the real model."""
    model = make_tiny(family)
    with torch.no_grad():
        ref = model(calib_ids, output_hidden_states=True).hidden_states
    outs = []
    for step in calibrated_blocks(model, calib_ids, settings("none")):
        outs.append(run_block(step.block, step.inputs, step.kwargs, 3))
    for i, out in enumerate(outs[:-1]):
        torch.testing.assert_close(out, ref[i + 1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- unstructured targets

@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "random"])
@pytest.mark.parametrize("sparsity", ["0.5", "0.37"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_unstructured_hits_target_per_module(name, sparsity, batch_size, calib_ids):
    model = make_tiny("llama")
    cfg = settings(name, sparsity, batch_size=batch_size)
    prune(model, calib_ids, cfg)
    report = measure_sparsity(model, cfg)
    assert report["max_abs_deviation_pp"] < 0.1
    assert abs(report["achieved_sparsity"] - float(sparsity)) < 1e-3
    assert report["lm_head_sparsity"] == 0.0  # never the LM head (nor the tied embeddings)
    assert float((model.model.embed_tokens.weight == 0).float().mean()) == 0.0


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "random"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_structure_holds(name, pattern, calib_ids):
    model = make_tiny("qwen2")
    cfg = settings(name, pattern)
    prune(model, calib_ids, cfg)
    n, m = map(int, pattern.split(":"))
    for block in decoder_layers(model):
        for lin in [mod for mod in block.modules() if isinstance(mod, torch.nn.Linear)]:
            zeros_per_group = (lin.weight == 0).reshape(lin.out_features, -1, m).sum(-1)
            assert bool((zeros_per_group == n).all())  # random init: no accidental extra zeros
    assert measure_sparsity(model, cfg)["nm_check"]["holds"]


def test_nm_rejects_incompatible_width():
    model = make_tiny("llama", hidden_size=36, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="multiple of 8"):
        cfg = settings("wanda", "4:8")
        cfg.pruner.check(model, cfg)


# --------------------------------------------------------------------------- wanda

def test_per_row_mask_keeps_each_rows_top_scores():
    score = torch.rand(7, 13, generator=torch.Generator().manual_seed(3))
    mask = per_row_mask(score, 0.4)
    assert int(mask.sum()) == round(7 * 13 * 0.4)
    for r in range(7):
        pruned, kept = score[r][mask[r]], score[r][~mask[r]]
        assert pruned.max() < kept.min()
    assert set(mask.sum(1).tolist()) <= {5, 6}  # floor(13*0.4)=5, remainder spread one per row


@pytest.mark.parametrize("batch_size", [3, 8])
def test_wanda_keeps_exactly_the_top_scored_weights_per_row(batch_size, calib_ids):
    model = make_tiny("llama")
    dense = copy.deepcopy(model)
    prune(model, calib_ids, settings("wanda", "0.5", batch_size=batch_size))
    # block 0 sees the dense embeddings; block 1 sees the outputs of the pruned block 0
    for block_idx, source in ((0, dense), (1, model)):
        for name in ("self_attn.q_proj", "self_attn.k_proj"):
            lin_dense = dense.get_submodule(f"model.layers.{block_idx}.{name}")
            x = linear_inputs(source, source.get_submodule(f"model.layers.{block_idx}.{name}"), calib_ids)
            score = wanda_score(lin_dense.weight, x.pow(2).sum(0))
            pruned = model.get_submodule(f"model.layers.{block_idx}.{name}").weight == 0
            assert int(pruned.sum(1).min()) == int(pruned.sum(1).max()) == lin_dense.in_features // 2
            for r in range(score.shape[0]):
                assert score[r][pruned[r]].max() <= score[r][~pruned[r]].min()


def test_wanda_differs_from_magnitude(calib_ids):
    """The activation norm matters: Wanda's mask is not |W|'s mask."""
    a, b = make_tiny("llama"), make_tiny("llama")
    prune(a, calib_ids, settings("wanda"))
    prune(b, calib_ids, settings("magnitude"))
    wa = a.model.layers[0].mlp.down_proj.weight == 0
    wb = b.model.layers[0].mlp.down_proj.weight == 0
    assert (wa != wb).float().mean() > 0.05


# --------------------------------------------------------------------------- sparsegpt

@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(sparsity):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, tokens = 256, 48, 1024
    mix = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5 + torch.eye(d_in)
    scale = torch.linspace(0.2, 3, d_in)[torch.randperm(d_in, generator=g)]  # uneven features, scattered
    x = torch.randn(tokens, d_in, generator=g) @ mix * scale  # and correlated
    w = torch.randn(d_out, d_in, generator=g)
    spec = parse_sparsity(sparsity)
    H = 2 * x.T @ x / tokens
    w_sgpt = sparsegpt_prune_weight(w, H, spec, blocksize=128)  # two lazy-update blocks
    from prunerep.compress.masks import mask_for

    w_mag = w.masked_fill(mask_for(w.abs(), spec, per_row=False), 0)
    w_wanda = w.masked_fill(mask_for(wanda_score(w, x.pow(2).sum(0)), spec, per_row=True), 0)

    def err(v):
        return float(((w - v) @ x.T).norm())

    assert abs(float((w_sgpt == 0).float().mean()) - spec.ratio) < 1e-3
    assert err(w_sgpt) < err(w_wanda) < err(w_mag)


# --------------------------------------------------------------------------- layer drop

def test_dropped_attention_leaves_the_residual_unchanged(calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    cfg = settings("layer_drop", "0.25", target="attn")
    report = prune(model, calib_ids, cfg)
    assert report["n_dropped"] == 1
    i = int(report["dropped"][0].split(".")[1])
    block = model.model.layers[i]
    h = torch.randn(2, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        out = block(h, position_embeddings=model.model.rotary_emb(h, pos), attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        expected = h + block.mlp(block.post_attention_layernorm(h))  # attention adds exactly nothing
    assert torch.equal(out, expected)


@pytest.mark.parametrize("target", ["attn", "mlp", "block", "both"])
def test_layer_drop_drops_the_least_important(target, calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    dense = copy.deepcopy(model)
    cfg = settings("layer_drop", "0.5", target=target)
    report = prune(model, calib_ids, cfg)
    scores = cfg.pruner.importance(dense, calib_ids, cfg)
    suffix = {"attn": (".attn",), "mlp": (".mlp",), "both": (".attn", ".mlp")}.get(target)
    cands = {k: v for k, v in scores.items() if (k.endswith(suffix) if suffix else k.count(".") == 1)}
    assert report["n_dropped"] == round(0.5 * len(cands))
    kept = set(cands) - set(report["dropped"])
    assert max(cands[d] for d in report["dropped"]) <= min(cands[k] for k in kept)


def test_layer_drop_count_larger_than_model_is_rejected():
    model = make_tiny("llama", num_hidden_layers=3)
    with pytest.raises(ConfigError, match="only 3"):
        cfg = settings("layer_drop", "0.5", target="block", count=4)
        cfg.pruner.check(model, cfg)


# --------------------------------------------------------------------------- offload, registry, save

def test_sequential_and_reference_orders_agree_where_inputs_agree(calib_ids):
    """q/k/v of block 0 see the same inputs in both orders, so their masks are the same; o_proj
    sees the pruned q/k/v only in the sequential order, so its mask differs."""
    a, b = make_tiny("llama"), make_tiny("llama")
    prune(a, calib_ids, settings("wanda", batch_size=8, sequential=False))
    prune(b, calib_ids, settings("wanda", batch_size=8, sequential=True))
    attn_a, attn_b = a.model.layers[0].self_attn, b.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attn_a, name).weight, getattr(attn_b, name).weight)
    assert not torch.equal(attn_a.o_proj.weight == 0, attn_b.o_proj.weight == 0)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_the_pruning_order_does_not_depend_on_the_batch_size(name, sequential, calib_ids):
    """calib.batch_size is a memory setting: micro-batches of 3 and one batch of 8 prune alike
    (up to the float rounding of sums taken in another order)."""
    a, b = make_tiny("llama"), make_tiny("llama")
    prune(a, calib_ids, settings(name, batch_size=3, sequential=sequential))
    prune(b, calib_ids, settings(name, batch_size=8, sequential=sequential))
    for (pname, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.dim() == 2 and "layers" in pname:
            assert float(((pa == 0) != (pb == 0)).float().mean()) < 1e-3, pname
            torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


def test_input_groups_follow_the_blocks_dataflow(calib_ids):
    model = make_tiny("llama")
    cfg = settings("wanda")
    step = next(iter(calibrated_blocks(model, calib_ids, cfg)))
    targets = block_targets(step.block)
    assert input_groups(BlockStep(0, step.block, step.inputs, step.kwargs), targets, cfg) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_offload_gives_the_same_result(calib_ids):
    """The model offloaded to CPU memory (accelerate's hooks, meta tensors between forwards) is
    pruned block by block and written back: the same weights as in memory, bit for bit."""
    from prunerep.model.placement import dispatch, is_offloaded, iter_parameters, placement

    a = make_tiny("llama")
    b = dispatch(make_tiny("llama"), placement("cpu", "float32", offload=True), None)
    assert is_offloaded(b) and decoder_layers(b)[0].self_attn.q_proj.weight.device.type == "meta"
    prune(a, calib_ids, settings("sparsegpt"))
    prune(b, calib_ids, settings("sparsegpt"))
    got = dict(iter_parameters(b))
    assert got.keys() == dict(a.named_parameters()).keys()
    for name, pa in a.named_parameters():
        assert torch.equal(pa, got[name]), name
    assert measure_sparsity(b, settings("sparsegpt")) == measure_sparsity(a, settings("sparsegpt"))


def test_registry_is_the_set_of_method_modules():
    from pathlib import Path

    methods = discover("pruner")
    assert set(methods) == {"none", "magnitude", "wanda", "sparsegpt", "random", "layer_drop", "external"}
    conf = Path(__file__).resolve().parents[1] / "conf" / "pruner"
    assert {p.stem for p in conf.glob("*.yaml")} == set(methods)  # one YAML file per method
    with pytest.raises(ConfigError, match="unknown pruner 'wandaa'"):
        method_class("pruner", "wandaa")


def test_capabilities_are_read_from_the_method():
    methods = discover("pruner")
    assert {n for n, m in methods.items() if m().needs_calibration} == {"wanda", "sparsegpt", "layer_drop"}
    assert {n for n, m in methods.items() if not m.supports_nm} == {"layer_drop"}
    assert {n for n, m in methods.items() if m.zeroes_weights} == {"magnitude", "wanda", "sparsegpt", "random",
                                                                    "external"}
    assert {n for n, m in methods.items() if m.zeroes_weights and m.meets_target} == {"magnitude", "wanda", "sparsegpt",
                                                                                       "random"}
    with pytest.raises(ConfigError, match="does not take an N:M pattern"):
        methods["layer_drop"]().validate(parse_sparsity("2:4"))
    methods["wanda"]().validate(parse_sparsity("2:4"))


@pytest.mark.parametrize("include,exclude,match", [("nomatch", None, "match no weight"),
                                                     (".*", ".*", "match no weight"),
                                                     ("(", None, "not a valid regular expression")])
def test_a_pattern_that_selects_nothing_is_bad_input(include, exclude, match):
    model = make_tiny("llama")
    cfg = settings("magnitude", include=include, exclude=exclude)
    with pytest.raises(ConfigError, match=match):
        cfg.pruner.validate(cfg.spec)
        cfg.pruner.check(model, cfg)


def test_saved_pruned_model_reloads_with_from_pretrained(tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    from prunerep.pipeline import save_pruned_model

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    model = make_tiny("llama", num_hidden_layers=4)
    prune(model, calib_ids, settings("layer_drop", "0.5", target="block"))
    prune(model, calib_ids, settings("wanda", "0.5"))
    save_pruned_model(model, NoTokenizer(), tmp_path / "model")
    assert list((tmp_path / "model").glob("*.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, again(calib_ids).logits)


# --------------------------------------------------------------------------- Gemma-2 anatomy

def _gemma2_attn_update(block, inputs, kwargs):
    """Gemma-2's attention update written out by hand: post_attention_layernorm(attn(input_layernorm(h)))."""
    out = block.self_attn(hidden_states=block.input_layernorm(inputs), position_embeddings=kwargs["position_embeddings"],
                          attention_mask=kwargs.get("attention_mask"))[0]
    return block.post_attention_layernorm(out)


def test_layer_drop_importance_includes_gemma2s_post_sublayer_norms(calib_ids):
    model = make_tiny("gemma2", head_dim=16)
    cfg = settings("layer_drop", "0.5", target="attn")
    scores = cfg.pruner.importance(copy.deepcopy(model), calib_ids, cfg)
    step = next(iter(calibrated_blocks(model, calib_ids, cfg)))
    with torch.no_grad():
        mid = step.inputs + _gemma2_attn_update(step.block, step.inputs, step.kwargs)
    cos = torch.nn.functional.cosine_similarity(step.inputs.flatten(0, 1), mid.flatten(0, 1), dim=-1)
    assert scores["layers.0.attn"] == pytest.approx(float((1 - cos).mean()), rel=1e-5, abs=1e-7)


def test_a_dropped_gemma2_attention_adds_nothing(calib_ids):
    model = make_tiny("gemma2", head_dim=16, num_hidden_layers=2)
    cfg = settings("layer_drop", "0.5", target="attn", count=2)
    prune(model, calib_ids, cfg)
    step = next(iter(calibrated_blocks(model, calib_ids, cfg)))
    block = step.block
    with torch.no_grad():
        assert torch.equal(_gemma2_attn_update(block, step.inputs, step.kwargs), torch.zeros_like(step.inputs))
        out = run_block(block, step.inputs, step.kwargs, 8)
        mlp = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(step.inputs)))
    torch.testing.assert_close(out, step.inputs + mlp, rtol=0, atol=0)
