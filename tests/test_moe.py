"""Mixture-of-experts models: every expert's slice of transformers' fused expert tensors is a weight
target of every method, calibrated on the tokens routed to it; the routers stay dense."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cli import run_cli
from conftest import make_tiny
from helpers import prune_settings as settings  # sparsity 0.5, batch_size 8
from prunerep.errors import ConfigError
from prunerep.model.anatomy import coverage, decoder_layers, model_targets, routers
from prunerep.compress.masks import mask_for
from prunerep.compress.measure import measure_sparsity
from prunerep.registry import method_class
from prunerep.sparsity import parse_sparsity

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def tiny_moe(family: str, **kw):
    return make_tiny(family, **{**FAMILIES[family], **kw})


def experts_of(model, block: int = 0):
    return decoder_layers(model)[block].mlp.experts


def dense_expert_inputs(model, calib) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's MoE input (hidden states) and the router's choices on a plain dense forward."""
    got = {}

    def hook(_mod, args, kwargs):
        got["hs"], got["idx"] = args[0].detach().clone(), args[1].detach().clone()

    h = experts_of(model).register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for row in calib:  # one forward per sample, as the calibration does
            model(row[None])
            got.setdefault("all", []).append((got["hs"], got["idx"]))
    h.remove()
    return torch.cat([a for a, _ in got["all"]]), torch.cat([b for _, b in got["all"]])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_expert_is_a_target_and_the_routers_are_not(family):
    model = tiny_moe(family)
    names = [n for n in model_targets(model) if n.startswith("layers.0.")]
    experts = [n for n in names if ".experts." in n]
    assert experts == [f"layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")]
    assert ("layers.0.mlp.shared_expert.down_proj" in names) == (family == "qwen2_moe")  # an ordinary MLP
    router_names = set(routers(decoder_layers(model)[0]))
    assert router_names == ({"mlp.gate", "mlp.shared_expert_gate"} if family == "qwen2_moe" else {"mlp.gate"})
    assert not router_names & {n.removeprefix("layers.0.") for n in names}
    t = model_targets(model)["layers.0.mlp.experts.2.down_proj"]
    assert t.weight.data_ptr() == experts_of(model).down_proj[2].data_ptr()  # a view: masking it prunes the model
    assert coverage(model)[0] > 0.99


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_every_expert_is_pruned_to_the_target_and_the_routers_stay_dense(family, pruner, calib_ids):
    model = tiny_moe(family)
    router_before = {n: m.weight.clone() for n, m in routers(decoder_layers(model)[0]).items()}
    cfg = settings(pruner)
    cfg.pruner.prune(model, calib_ids, cfg)
    for block in decoder_layers(model):
        ex = block.mlp.experts
        for e in range(4):
            for w in (ex.gate_up_proj[e], ex.down_proj[e]):
                assert abs(float((w == 0).float().mean()) - 0.5) <= 1 / w.numel() + 1e-9
    for n, m in routers(decoder_layers(model)[0]).items():
        assert torch.equal(m.weight, router_before[n])
    report = measure_sparsity(model, cfg)
    assert report["n_expert_matrices"] == 3 * 4 * 2
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("expert_tokens", ["routed", "all"])
def test_wanda_scores_each_expert_on_its_own_tokens(expert_tokens, calib_ids):
    """Block 0, sequential=false (statistics of the dense block): the mask of each expert's gate/up
    and down projection is Wanda's on the tokens the router sent to it (or on every token)."""
    model = tiny_moe("mixtral")
    hs, idx = dense_expert_inputs(model, calib_ids)
    ex = experts_of(model)
    expected = {}
    for e in range(4):
        x = hs if expert_tokens == "all" else hs[(idx == e).any(-1)]
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        down_in = F.silu(gate) * up
        for name, w, inp in (("gate_up_proj", ex.gate_up_proj[e], x), ("down_proj", ex.down_proj[e], down_in)):
            score = w.abs() * inp.pow(2).sum(0).sqrt()[None, :]
            expected[(e, name)] = mask_for(score, parse_sparsity("0.5"), per_row=True)
    cfg = settings("wanda", sequential=False, expert_tokens=expert_tokens)
    report = cfg.pruner.prune(model, calib_ids, cfg)
    for (e, name), mask in expected.items():
        assert torch.equal(getattr(ex, name)[e] == 0, mask), (e, name)
    tokens = report["experts"]["tokens"]
    routed = [int((idx == e).any(-1).sum()) for e in range(4)]
    want = [len(hs)] * 4 if expert_tokens == "all" else routed
    assert [tokens[f"layers.0.mlp.experts.{e}.gate_up_proj"] for e in range(4)] == want
    assert report["experts"]["starved"] == [] and report["experts"]["expert_tokens"] == expert_tokens


def never_routed_model():
    """Top-1 routing with router rows (v, −v, 0, 0): for every token max(v·x, −v·x) = |v·x| > 0, so
    experts 2 and 3 never receive a token."""
    model = tiny_moe("mixtral", num_experts_per_tok=1)
    g = torch.Generator().manual_seed(3)
    for block in decoder_layers(model):
        v = torch.randn(block.mlp.gate.weight.shape[1], generator=g)
        block.mlp.gate.weight.data = torch.stack([v, -v, torch.zeros_like(v), torch.zeros_like(v)])
    return model


def test_an_expert_without_tokens_is_pruned_on_its_magnitude_not_wiped_out(calib_ids):
    """SparseGPT on an expert that saw no token has H = 0: every input is 'dead' and the whole
    expert would be zeroed. Below calib.expert_min_tokens an expert's statistics are isotropic
    instead (H = I): it is pruned to the target like any other, and pruning.json names it."""
    model = never_routed_model()
    cfg = settings("sparsegpt")  # expert_min_tokens 16
    report = cfg.pruner.prune(model, calib_ids, cfg)
    ex = experts_of(model)
    for e in (2, 3):
        assert float((ex.gate_up_proj[e] == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
        assert report["experts"]["tokens"][f"layers.0.mlp.experts.{e}.gate_up_proj"] == 0
    assert {f"layers.0.mlp.experts.{e}.{p}" for e in (2, 3) for p in ("gate_up_proj", "down_proj")} <= set(
        report["experts"]["starved"])
    assert "layers.0.mlp.experts.0.gate_up_proj" not in report["experts"]["starved"]
    # without the fallback the expert is wiped out: the failure the fallback exists for
    bare = never_routed_model()
    cfg0 = settings("sparsegpt", expert_min_tokens=0)
    cfg0.pruner.prune(bare, calib_ids, cfg0)
    assert bool((experts_of(bare).gate_up_proj[2] == 0).all())


def test_a_starved_expert_is_pruned_by_magnitude_under_wanda(calib_ids):
    model = tiny_moe("qwen3_moe")
    w = experts_of(model, 1).down_proj[0].clone()
    cfg = settings("wanda", expert_min_tokens=10 ** 9)  # every expert starved
    cfg.pruner.prune(model, calib_ids, cfg)
    assert torch.equal(experts_of(model, 1).down_proj[0] == 0, mask_for(w.abs(), parse_sparsity("0.5"), per_row=True))


@pytest.mark.parametrize("quant", ["rtn", "gptq", "awq"])
def test_quantizers_quantize_every_expert(quant, calib_ids):
    model = tiny_moe("qwen2_moe")
    q = method_class("quant", quant)(bits=3, group_size=32)
    q.validate()
    q.check(model)
    before = experts_of(model).down_proj.clone()
    report = q.quantize(model, calib_ids, settings("none"))
    assert report["n_layers"] == len(model_targets(model))
    after = experts_of(model).down_proj
    for e in range(4):
        assert not torch.equal(after[e], before[e])
        if quant != "awq":  # AWQ's grid is that of W·diag(s)
            for row in after[e].reshape(-1, 32):
                assert len(torch.unique(row)) <= 2 ** 3


def test_layer_drop_of_a_moe_mlp_adds_nothing(calib_ids):
    from prunerep.model.anatomy import make_identity

    model = tiny_moe("qwen2_moe")
    block = decoder_layers(model)[1]
    make_identity(block, "mlp")
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(block.mlp(x), torch.zeros_like(x))


def test_an_architecture_prunerep_cannot_cover_fails_before_loading(tmp_path):
    """GPT-2 computes with Conv1D, not Linear: nothing of its blocks is a weight target."""
    model = make_tiny("gpt2", num_hidden_layers=2)
    with pytest.raises(ConfigError, match=r"hold 0\.0% of the decoder blocks' parameters.*not covered: layers\.\*\.mlp\.c_fc\.weight"):
        from prunerep.preflight import against_the_model
        from prunerep.registry import compose
        from prunerep.spec import build

        against_the_model(model, None, build(compose("model=tiny", "probe=none", "task=none"), tmp_path / "run"))
    res = run_cli("model=tiny", "model.arch.model_type=gpt2", "task=none", "probe=none", "wandb.mode=disabled",
                  f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert res.returncode == 2 and "stage load" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and "not covered" in lines[0] and "GPT2LMHeadModel" in lines[0]


MOE_ARCH = {"mixtral": ["+model.arch.num_local_experts=4", "+model.arch.num_experts_per_tok=2"],
            "qwen2_moe": ["+model.arch.num_experts=4", "+model.arch.num_experts_per_tok=2",
                          "+model.arch.moe_intermediate_size=32", "+model.arch.shared_expert_intermediate_size=64"],
            "qwen3_moe": ["+model.arch.num_experts=4", "+model.arch.num_experts_per_tok=2",
                          "+model.arch.moe_intermediate_size=32"]}


@pytest.mark.parametrize("family", list(MOE_ARCH))
def test_a_moe_run_prunes_its_experts_checked_from_the_saved_weights(family, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    extra = (["task=offline", "task.tasks=[arith_cloze,arith_gen]", "task.limit=4", "probe.n_prompts=2",
              "probe.max_new_tokens=4"] if family == "qwen2_moe" else ["task=none", "probe=none"])
    res = run_cli("model=tiny", f"model.arch.model_type={family}", *MOE_ARCH[family], "pruner=wanda",
                  "save_model=true", "wandb.mode=disabled", "skip_completed=false", f"hydra.run.dir={run_dir}",
                  *extra, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pruning = json.loads((run_dir / "pruning.json").read_text())
    n_layers = 4  # model=tiny
    listed = {k for k in pruning["modules"] if ".experts." in k}
    assert listed == {f"layers.{i}.mlp.experts.{e}.{p}" for i in range(n_layers) for e in range(4)
                      for p in ("gate_up_proj", "down_proj")}
    assert pruning["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    saved = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"))
    for block in decoder_layers(saved):
        for e in range(4):
            for w in (block.mlp.experts.gate_up_proj[e], block.mlp.experts.down_proj[e]):
                assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1 / w.shape[0])
    if family == "qwen2_moe":  # the probes and evals run on a MoE model as on any other
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["probes"]["n_prompts"] == 2
        evals = json.loads((run_dir / "evals.json").read_text())
        assert set(evals["tasks"]) == {"arith_cloze", "arith_gen"}
