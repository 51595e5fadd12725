"""Quantization as a comparison perturbation (issue #9): the grid (RTN), GPTQ and AWQ against RTN on
one layer with real correlated / outlier inputs, composition with the pruners (zeros stay zero), the
effective-bits accounting on worked examples, the config group and its one-line errors, the pipeline's
compression.json and the report's equal-memory figure. Tiny tensors and models, seconds each."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny
from prunerep.errors import ConfigError
from prunerep.compress.accounting import bits_per_weight, compression_report, mean_bits
from prunerep.compress.quant.awq import awq_quantize_weight, awq_scales, awq_search_scale, scaled_quantize
from prunerep.compress.grid import grid_params, rtn_params, rtn_quantize
from prunerep.compress.quant.gptq import gptq_quantize_weight
from prunerep.registry import compose


# --------------------------------------------------------------------------- RTN: the grid

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_rtn_values_lie_on_the_grid(bits, sym, group_size):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 64, generator=g) * torch.logspace(-2, 0, 64)  # groups of very different ranges
    out = rtn_quantize(w, bits, group_size, sym)
    gs = 64 if group_size == -1 else group_size
    groups = out.reshape(12, -1, gs)
    for row in groups.reshape(-1, gs):
        assert len(torch.unique(row)) <= 2 ** bits
    scale, zero = rtn_params(w, bits, group_size, sym)
    q = torch.round(groups / scale) + zero  # every value is (q - z) * s with an integer q in [0, 2^b - 1]
    assert torch.equal((q - zero) * scale, groups)
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1
    assert torch.equal(scale, scale.half().float())  # scales as stored: fp16
    # nearest grid point: half a step at most inside the grid; at its ends (the integer zero point
    # shifts the grid by up to half a step) one step at most
    err = (out - w).abs().reshape(12, -1, gs)
    inside = (q > 0) & (q < 2 ** bits - 1)
    assert (err[inside] <= (scale / 2 * 1.001).expand_as(err)[inside]).all()
    assert (err <= scale * 1.001).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_reconstructs_grid_points_exactly(bits):
    maxq = 2 ** bits - 1
    s = 2.0 ** -5  # exact in fp16
    q = torch.arange(maxq + 1, dtype=torch.float32)
    # asymmetric: a group spanning the whole grid with zero point 1 is its own quantization
    w = ((q - 1) * s).repeat(3, 1)
    assert torch.equal(rtn_quantize(w, bits, maxq + 1, sym=False), w)
    scale, zero = grid_params(w, bits, sym=False)
    assert torch.equal(scale, torch.full((3, 1), s)) and torch.equal(zero, torch.ones(3, 1))
    half = 2 ** (bits - 1)
    # symmetric, llm-awq's (zero_point=False): s = max|w| / (2^(b-1) - 1), the levels -(2^(b-1)-1)..2^(b-1)-1 times s
    w = (torch.arange(-(half - 1), half, dtype=torch.float32) * s)[None]
    assert torch.equal(rtn_quantize(w, bits, w.shape[1], sym=True, grid="awq"), w)
    # symmetric, GPTQ's (--sym): max|w| = m gives s = 2m / (2^b - 1), zero point 2^(b-1): the levels
    # -2^(b-1)..2^(b-1)-1 times s; m = (2^b - 1)/2 * s itself lies half a step outside the grid
    m = (maxq / 2) * s
    w = torch.cat([torch.tensor([-m]), torch.arange(-(half - 1), half, dtype=torch.float32) * s])[None]
    scale, zero = grid_params(w, bits, sym=True, grid="gptq")
    assert torch.equal(scale, torch.full((1, 1), s)) and torch.equal(zero, torch.full((1, 1), float(half)))
    out = rtn_quantize(w, bits, w.shape[1], sym=True, grid="gptq")
    assert torch.equal(out[:, 1:], w[:, 1:]) and out[0, 0] == -half * s
    # and zero is always a grid point: pruned weights stay exactly zero
    w = torch.randn(4, 32)
    w[:, ::3] = 0
    for sym, grid in ((False, "gptq"), (True, "gptq"), (True, "awq")):
        assert (rtn_quantize(w, bits, 16, sym, grid)[:, ::3] == 0).all()


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(4, 24), 4, 16, False)


# --------------------------------------------------------------------------- GPTQ and AWQ against RTN

def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Activations with correlated features and a decaying spectrum, like a real layer's inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(123))
    return (torch.randn(n, d, generator=g) * torch.logspace(0, -2, d)) @ mix


def layer_error(w, new, x) -> float:
    """‖W Xᵀ − Ŵ Xᵀ‖_F on the given inputs."""
    return float(((w - new) @ x.T).norm())


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(3, 32, False, False), (4, -1, True, False),
                                                           (3, 32, False, True), (2, 64, False, False)])
def test_gptq_reconstruction_beats_rtn(bits, group_size, sym, act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    x = correlated_inputs(2048, 128, seed=1)
    held_out = correlated_inputs(2048, 128, seed=2)
    h = 2 * x.T @ x / len(x)
    gptq = gptq_quantize_weight(w, h, bits, group_size, sym, blocksize=64, act_order=act_order)
    rtn = rtn_quantize(w, bits, group_size, sym)
    for inputs in (x, held_out):
        assert layer_error(w, gptq, inputs) < 0.8 * layer_error(w, rtn, inputs)
    # GPTQ's weights are on a b-bit grid too: at most 2^b values per group
    gs = 128 if group_size == -1 else group_size
    for row in gptq.reshape(-1, gs):
        assert len(torch.unique(row)) <= 2 ** bits


def test_gptq_keeps_zeros_and_compensates_them():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.05
    w[torch.rand_like(w) < 0.5] = 0  # a pruned layer
    x = correlated_inputs(1024, 64, seed=3)
    h = 2 * x.T @ x / len(x)
    new = gptq_quantize_weight(w, h, 4, 16, False)
    assert (new[w == 0] == 0).all()
    assert layer_error(w, new, x) < layer_error(w, rtn_quantize(w, 4, 16, False), x)


def outlier_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """A few input channels carry activations 20-50x larger than the rest (AWQ's salient channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [3, 17, 40, 77, 101]] *= torch.tensor([50.0, 30.0, 20.0, 40.0, 25.0])
    return x


def test_awq_beats_rtn_with_activation_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x, held_out = outlier_inputs(2048, 128, 1), outlier_inputs(2048, 128, 2)
    gram = 2 * x.T @ x / len(x)
    s, alpha, losses = awq_search_scale([w], x.abs().mean(0), gram, 3, 32, False, n_grid=20)
    assert alpha > 0 and losses[0] > min(losses)  # α = 0 (plain RTN) is not the best
    for clip in (False, True):
        awq = awq_quantize_weight(w, s, gram, 3, 32, False, clip=clip)
        assert (layer_error(w, awq, held_out) < 0.8 * layer_error(w, rtn_quantize(w, 3, 32, False), held_out))
    # α = 0 is RTN exactly
    assert torch.equal(awq_scales(x.abs().mean(0), 0.0), torch.ones(128))
    assert torch.equal(scaled_quantize(w, torch.ones(128), 3, 32, False), rtn_quantize(w, 3, 32, False))


# --------------------------------------------------------------------------- composition with a pruner

def _settings(pruner, sparsity="0.5", batch_size=8):
    """The run's settings around ``pruner`` (a quantizer quantizes after it; a quantizer passed here
    stands for ``pruner=none``)."""
    from prunerep.compress.method import PruneSettings, Quantizer
    from prunerep.registry import method_class
    from prunerep.sparsity import parse_sparsity

    if isinstance(pruner, Quantizer):
        pruner = method_class("pruner", "none")()
    return PruneSettings(spec=parse_sparsity(sparsity), pruner=pruner, device=torch.device("cpu"),
                         batch_size=batch_size)


def _quantizer(name, **kw):
    from prunerep.registry import method_class

    q = method_class("quant", name)(**kw)
    q.validate()
    return q


def _linears(model):
    from prunerep.compress.method import method_targets

    return method_targets(model, _quantizer("rtn"), "quant")


@pytest.mark.parametrize("pruner,sparsity", [("magnitude", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5")])
@pytest.mark.parametrize("quant", ["rtn", "gptq", "awq"])
def test_quantizing_a_pruned_model_keeps_its_zeros(pruner, sparsity, quant, calib_ids):
    from prunerep.registry import method_class

    model = make_tiny("llama")
    p = method_class("pruner", pruner)()
    p.prune(model, calib_ids, _settings(p, sparsity))
    before = {n: lin.weight.detach().clone() for n, lin in _linears(model).items()}
    q = _quantizer(quant, bits=3, group_size=32)
    q.check(model)
    report = q.quantize(model, calib_ids, _settings(p, sparsity))
    assert report["method"] == quant and report["n_layers"] == len(before) == 21
    for name, lin in _linears(model).items():
        w, old = lin.weight, before[name]
        assert (w[old == 0] == 0).all(), name  # the pruned weights stay exactly zero
        assert not torch.equal(w, old), name  # and the kept ones moved onto the grid
        if quant != "awq":  # AWQ's grid is that of W·diag(s); the weight it computes with is Q(W·s)/s
            for row in w.reshape(-1, 32):
                assert len(torch.unique(row)) <= 2 ** 3, name
    if sparsity == "2:4":
        from prunerep.compress.measure import measure_sparsity

        assert measure_sparsity(model, _settings(p, sparsity))["nm_check"]["holds"]


def test_awq_in_micro_batches_and_sequential_order(calib_ids):
    """The shared-input groups are found and quantized once, whatever the calibration order."""
    results = []
    for sequential, batch in ((False, 8), (True, 8), (True, 3)):
        model = make_tiny("llama")
        q = _quantizer("awq", bits=4, group_size=32, sequential=sequential)
        report = q.quantize(model, calib_ids, _settings(q, batch_size=batch))
        assert report["n_layers"] == 21 and set(report["alpha"]) == set(_linears(model))
        # o_proj under grouped-query attention (4 heads, 2 kv heads) has no fold for its scale
        assert all(a is None for n, a in report["alpha"].items() if n.endswith("o_proj"))
        results.append({n: lin.weight.clone() for n, lin in _linears(model).items()})
    # micro-batches change nothing but memory: same layers, same statistics, same weights
    for n in results[1]:
        assert torch.allclose(results[1][n], results[2][n], atol=1e-5), n


def test_bad_settings_fail_with_one_line(calib_ids):
    for kw, needle in (({"bits": 1}, "quant.bits=1 is outside 2..8"), ({"bits": 9}, "outside 2..8"),
                       ({"group_size": 0}, "must be >= 1, or -1"), ({"include": "("}, "not a valid regular")):
        with pytest.raises(ConfigError, match=needle):
            _quantizer("gptq", **kw)
    q = _quantizer("rtn", group_size=48)
    with pytest.raises(ConfigError, match="does not divide the 64 input features of layers.0"):
        q.check(make_tiny("llama"))
    with pytest.raises(ConfigError, match="match no weight"):
        _quantizer("rtn", include="nomatch").check(make_tiny("llama"))


# --------------------------------------------------------------------------- effective bits: worked examples

def test_effective_bits_worked_examples():
    # dense: the dtype's bits
    assert bits_per_weight(16) == 16 and bits_per_weight(32) == 32
    # 4-bit, groups of 128, fp16 scale + fp16 zero per group: 4 + 32/128; symmetric: no zero, 4 + 16/128
    assert bits_per_weight(16, bits=4, group_size=128) == 4.25
    assert bits_per_weight(32, bits=4, group_size=128, sym=True) == 4.125
    # per output row (group_size -1): the 32 bits spread over the row, 8 + 32/576
    assert bits_per_weight(16, bits=8, group_size=-1, in_features=576) == pytest.approx(8 + 32 / 576)
    # 50% unstructured, fp16 values + a 1-bit-per-position bitmask: 0.5*16 + 1
    assert bits_per_weight(16, layout="bitmask", kept=0.5) == 9
    # 2:4 as NVIDIA stores it: 2 fp16 values + a 2-bit index for each, per 4 weights: (32 + 4) / 4
    assert bits_per_weight(16, layout="nm", n=2, m=4) == 9
    # 4:8: 4 values + 3-bit indices per 8 weights: (64 + 12) / 8
    assert bits_per_weight(16, layout="nm", n=4, m=8) == 9.5
    # pruning then quantization: 2:4 + 4-bit g128 asymmetric: 0.5*4 + 1 + 32/128
    assert bits_per_weight(16, layout="nm", n=2, m=4, bits=4, group_size=128) == 3.25
    # 50% unstructured + 3-bit g64 symmetric, on an fp32 model: 0.5*3 + 1 + 16/64
    assert bits_per_weight(32, layout="bitmask", kept=0.5, bits=3, group_size=64, sym=True) == 2.75
    # a matrix that is not stored (a dropped sublayer's zeroed projection)
    assert bits_per_weight(16, layout="absent") == 0
    # a model: matrices weighted by size, (32 * 7 + 128 * 9) / 160
    assert mean_bits([(32, 7.0), (128, 9.0)]) == 8.6


def test_compression_report_on_hand_made_shapes():
    from prunerep.sparsity import parse_sparsity

    shapes = {"layers.0.a": (4, 8), "layers.0.b": (8, 16)}  # 32 and 128 weights
    zeros = {"layers.0.a": 0.5, "layers.0.b": 0.5}
    # wanda 50% (fp16), then RTN 4-bit g8 asymmetric on `a` only:
    # a: 0.5*4 + 1 + 32/8 = 7, b: 0.5*16 + 1 = 9 -> (32*7 + 128*9) / 160 = 8.6; after pruning alone 9
    rep = compression_report(shapes, 16, pruner="wanda", sparsity=parse_sparsity(0.5), weight_sparsity=True,
                             zero_fractions=zeros, achieved_sparsity=0.5, quant="rtn",
                             storage={"bits": 4, "group_size": 8, "sym": False}, quantized=["layers.0.a"])
    assert rep["effective_bits"] == pytest.approx(8.6) and rep["dense_bits"] == 16 and rep["n_weights"] == 160
    prune, quant = rep["perturbations"]
    assert (prune["kind"], prune["method"], prune["effective_bits"], prune["layouts"]) == ("pruning", "wanda", 9.0,
                                                                                          ["bitmask"])
    assert {k: quant[k] for k in ("kind", "method", "bits", "group_size", "sym", "zero_bits", "n_layers")} == {
        "kind": "quantization", "method": "rtn", "bits": 4, "group_size": 8, "sym": False, "zero_bits": 16,
        "n_layers": 1}
    assert quant["effective_bits"] == pytest.approx(8.6)
    assert rep["modules"] == {"layers.0.a": 7.0, "layers.0.b": 9.0}
    # dense: no perturbation, the dtype's bits
    dense = compression_report(shapes, 32, pruner="none", zero_fractions={"layers.0.a": 0.0})
    assert dense["effective_bits"] == 32 and dense["perturbations"] == []
    # layer_drop zeroed `a` entirely (not stored); `b` stays dense: 128*16 / 160
    drop = compression_report(shapes, 16, pruner="layer_drop", weight_sparsity=False,
                              zero_fractions={"layers.0.a": 1.0, "layers.0.b": 0.0})
    assert drop["effective_bits"] == pytest.approx(12.8)
    # quantization alone, 2:4 and the N:M layout
    nm = compression_report(shapes, 16, pruner="sparsegpt", sparsity=parse_sparsity("2:4"), weight_sparsity=True,
                            zero_fractions=zeros, quant="gptq", storage={"bits": 4, "group_size": 8, "sym": True},
                            quantized=list(shapes))
    assert nm["effective_bits"] == pytest.approx(0.5 * 4 + 1 + 16 / 8)


# --------------------------------------------------------------------------- the config group

def test_every_quant_option_composes_to_its_typed_method():
    from prunerep.registry import build_method, discover

    methods = discover("quant")
    assert set(methods) == {"none", "rtn", "gptq", "awq"}
    for name, cls in methods.items():
        cfg = compose(f"quant={name}")
        q = build_method("quant", cfg.quant)
        assert type(q) is cls and set(cfg.quant) == {"name", *cls.settings()}
    assert compose().quant.name == "none"  # the default
    cfg = compose("pruner=sparsegpt", "sparsity=0.5", "quant=gptq", "quant.bits=3")
    assert (cfg.pruner.name, cfg.quant.name, cfg.quant.bits) == ("sparsegpt", "gptq", 3)


def test_the_run_spec_builds_the_quantizer_before_the_model_loads(tmp_path):
    from prunerep import preflight, spec

    base = ["model=tiny", "task=none", "probe=none", f"cache_dir={tmp_path / 'cache'}", "wandb.mode=disabled"]
    rs = spec.build(compose(*base, "pruner=none", "sparsity=0", "quant=gptq", "quant.bits=4"), tmp_path / "run")
    assert rs.quant.name == "gptq" and rs.quant.bits == 4 and rs.sparsity.ratio == 0
    assert rs.identity.summary_fields()["quant"] == "gptq" and rs.identity.name == "tiny/none/0/gptq-w4g64"
    for args, needle in ((["quant=rtn", "quant.bits=9"], "outside 2..8"),
                         (["quant=awq", "quant.group_size=48"], "does not divide the 64 input features of layers.0.self_attn.q_proj"),
                         (["quant=gptq", "quant.percdamp=-1"], "quant.percdamp=-1.0 >= 0")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            preflight.check(spec.build(compose(*base, *args), tmp_path / "run"))


def test_unknown_quant_options_and_keys_fail_with_one_line():
    from prunerep.cli import BadInput, check_override_keys, chosen_options

    for argv, needle in ((["quant=gtpq"], "unknown quant 'gtpq'; did you mean gptq?"),
                         (["quant=rtn", "quant.blocksize=7"], "quant.blocksize: the rtn quant has no setting"),
                         (["quant=none", "quant.bits=4"], "the none quant has no setting 'bits'"),
                         (["quant=rtn,gptq", "quant.act_order=true"], "the rtn quant has no setting 'act_order'")):
        with pytest.raises(BadInput) as e:
            check_override_keys(argv, chosen_options(argv))
        assert e.value.args[0].count("\n") == 0 and needle in e.value.args[0]
    check_override_keys(["quant=gptq", "quant.act_order=true"], chosen_options(["quant=gptq"]))  # fine


def test_bad_quant_input_exits_2_with_one_line_via_the_entrypoint(tmp_path):
    from cli import run_cli

    run_dir = tmp_path / "run"
    res = run_cli("model=tiny", "task=none", "probe=none", "quant=gptq", "quant.bits=9", "wandb.mode=disabled",
                  f"hydra.run.dir={run_dir}", timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert lines == ["prunerep: error: quant.bits=9 is outside 2..8"], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not run_dir.exists()


# --------------------------------------------------------------------------- the pipeline: compression.json

def test_the_pipeline_quantizes_after_pruning_and_writes_compression_json(tmp_path, monkeypatch):
    """pruner=magnitude sparsity=0.5 quant=rtn on a tiny model (loading stubbed: no tokenizer needed
    with probe=none task=none); compression.json and summary.json carry the effective bits."""
    from prunerep import pipeline
    from prunerep.cli import run_config
    from prunerep.results.store import read_json
    from prunerep.results.schema import COMPRESSION_FILE, SUMMARY_FILE

    from helpers import SUMMARY_KEYS

    monkeypatch.setenv("PRUNEREP_OUTPUTS", str(tmp_path / "outputs"))
    holder = {}

    def load(mcfg, cache_dir, where=None, offload_dir=None):
        holder["model"] = make_tiny("llama")  # hidden 64, intermediate 160, 3 blocks x 7 Linear
        return holder["model"], None

    monkeypatch.setattr(pipeline, "load_model", load)
    cfg = compose("model=tiny", "task=none", "probe=none", "pruner=magnitude", "sparsity=0.5", "quant=rtn",
                  "quant.group_size=32", "wandb.mode=disabled", "skip_completed=false",
                  f"cache_dir={tmp_path / 'cache'}")
    summary = run_config(cfg, tmp_path / "run")
    comp = read_json(tmp_path / "run" / COMPRESSION_FILE)
    # fp32 model, 50% bitmask, 4-bit g32 asymmetric: 0.5*4 + 1 + 32/32 = 4 (after pruning: 0.5*32 + 1 = 17)
    assert comp["dense_bits"] == 32 and comp["effective_bits"] == pytest.approx(4.0)
    assert [p["effective_bits"] for p in comp["perturbations"]] == [pytest.approx(17.0), pytest.approx(4.0)]
    assert [(p["kind"], p["method"]) for p in comp["perturbations"]] == [("pruning", "magnitude"),
                                                                         ("quantization", "rtn")]
    s = read_json(tmp_path / "run" / SUMMARY_FILE)
    assert set(s) == SUMMARY_KEYS and s["quant"] == "rtn" and s["effective_bits"] == comp["effective_bits"]
    assert summary["timings_s"]["quantize"] >= 0 and s["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    zero = sum(int((lin.weight == 0).sum()) for lin in _linears(holder["model"]).values())
    assert zero / sum(lin.weight.numel() for lin in _linears(holder["model"]).values()) >= 0.5


# --------------------------------------------------------------------------- the report: equal_memory.png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_point(root, name, *, pruner, sparsity, quant=None, bits=None, group_size=64, kl, mc, gen, dense_bits=16):
    """A complete run directory with the files a real run writes (the real compression.json writer)."""
    from prunerep.results.store import atomic_write_json
    from prunerep.results.schema import PROBE_DTYPES
    from prunerep.sparsity import parse_sparsity

    d = root / name
    d.mkdir(parents=True)
    spec = parse_sparsity(sparsity)
    shapes = {"layers.0.q_proj": (64, 64), "layers.0.down_proj": (64, 128)}
    zeros = {n: spec.ratio for n in shapes}
    storage = {"bits": bits, "group_size": group_size, "sym": False} if quant else None
    comp = compression_report(shapes, dense_bits, pruner=pruner, sparsity=spec, weight_sparsity=pruner != "none",
                              zero_fractions=zeros, achieved_sparsity=spec.ratio, quant=quant or "none",
                              storage=storage, quantized=list(shapes) if quant else [])
    atomic_write_json(d / "compression.json", comp)
    rows = [("prompt", pid, "gen", layer, "block", -1, "probability", "kl", 1.0, kl * (layer + 1) / 3 + 0.01 * pid)
            for pid in range(2) for layer in range(3)]
    df = pd.DataFrame(rows, columns=list(PROBE_DTYPES)).astype(PROBE_DTYPES)
    df.to_parquet(d / "probes.parquet")
    tasks = {"mmlu_dev": {"type": "multiple_choice", "metric": "acc", "dense": 0.5, "pruned": mc},
             "arith_gen": {"type": "generative", "metric": "exact_match", "dense": 0.4, "pruned": gen}}
    atomic_write_json(d / "evals.json", {"tasks": tasks})
    atomic_write_json(d / "pruning.json", {"achieved_sparsity": spec.ratio, "modules": zeros})
    OmegaConf.save(OmegaConf.create({"model": {"name": "tiny"}, "pruner": {"name": pruner}, "sparsity": sparsity,
                                     "quant": {"name": quant or "none", **(storage or {})}}), d / "config.yaml")
    atomic_write_json(d / "summary.json", {
        "status": "complete", "error": None, "config_hash": name, "model": "tiny", "pruner": pruner,
        "sparsity": sparsity, "quant": quant or "none", "achieved_sparsity": spec.ratio,
        "effective_bits": comp["effective_bits"], "timings_s": {"total": 1.0}, "run_dir": str(d)})
    return comp["effective_bits"]


def test_report_draws_pruners_and_quantizers_at_equal_memory(tmp_path, monkeypatch):
    import prunerep.report as report
    from prunerep.report.memory import KL_PANEL, equal_memory_points

    for other in ("plot_vs_sparsity", "plot_scores", "plot_retained", "plot_steps"):  # tests/test_report.py's
        monkeypatch.setattr(report, other, lambda *a, **k: None, raising=False)

    sweep = tmp_path / "multirun"
    bits = {
        "w3": write_point(sweep, "w3", pruner="wanda", sparsity="0.3", kl=0.05, mc=0.49, gen=0.35),
        "w5": write_point(sweep, "w5", pruner="wanda", sparsity="0.5", kl=0.3, mc=0.45, gen=0.2),
        "r4": write_point(sweep, "r4", pruner="none", sparsity="0", quant="rtn", bits=4, kl=0.02, mc=0.5, gen=0.38),
        "r3": write_point(sweep, "r3", pruner="none", sparsity="0", quant="rtn", bits=3, kl=0.2, mc=0.47, gen=0.3),
        "g4": write_point(sweep, "g4", pruner="none", sparsity="0", quant="gptq", bits=4, kl=0.01, mc=0.5,
                          gen=0.39),
        "w5r4": write_point(sweep, "w5r4", pruner="wanda", sparsity="0.5", quant="rtn", bits=4, kl=0.4, mc=0.44,
                            gen=0.15),
    }
    # the accounting by hand (fp16, 4-bit g64 asymmetric = 4.5): wanda 0.5: 9; rtn 4: 4.5; wanda 0.5 + rtn 4: 3.5
    assert (bits["w5"], bits["r4"], bits["w5r4"], bits["r3"]) == (9.0, 4.5, 3.5, 3.5)
    res = report.make_report(sweep)
    png = (sweep / "report" / "equal_memory.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    table = res["table"]
    # the loader tells the sweep points apart: the same pruner and sparsity with and without quantization
    methods = dict(zip(table["run"], table["method"]))
    assert methods == {"w3": "wanda", "w5": "wanda", "r4": "rtn-w4g64", "r3": "rtn-w3g64", "g4": "gptq-w4g64",
                       "w5r4": "wanda+rtn-w4g64"}
    assert dict(zip(table["run"], table["quant"]))["w5r4"] == "rtn"
    assert set(res["thresholds"]["tiny"]) == {"wanda", "rtn-w4g64", "rtn-w3g64", "gptq-w4g64", "wanda+rtn-w4g64"}
    points = equal_memory_points(table)
    kl = points[points["panel"] == KL_PANEL].set_index("run")
    for run, b in bits.items():
        assert kl.loc[run, "effective_bits"] == b
    assert kl.loc["w5", "value"] == pytest.approx(0.3 + 0.005)  # last layer, mean over the 2 prompts
    assert dict(zip(kl.index, kl["family"]))["w5r4"] == "wanda+rtn" and kl.loc["g4", "family"] == "gptq"
    mc = points[points["panel"] == "multiple_choice"].set_index("run")
    assert mc.loc["r3", "value"] == pytest.approx(47.0) and mc.loc["r3", "dense"] == pytest.approx(50.0)
    assert set(points["panel"]) == {KL_PANEL, "multiple_choice", "generative"}
    assert (points["dense_bits"] == 16).all()


def test_a_real_pruner_by_quantizer_sweep_ends_in_the_equal_memory_figure(tmp_path):
    """Issue #9's command on the tiny model: `-m pruner=wanda,none sparsity=0.5 quant=none,rtn`, then the
    report: four real points on one effective-bits axis (fp32 tiny model, 4-bit RTN in groups of 64)."""
    import subprocess
    import sys

    from cli import run_cli
    from prunerep.report.load import load_sweep
    from prunerep.report.memory import KL_PANEL, equal_memory_points

    sweep = tmp_path / "multirun"
    p = run_cli("-m", "model=tiny", "task=none", "probe.n_prompts=2", "probe.max_new_tokens=4",
                "probe.max_prompt_tokens=32", "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled",
                "pruner=wanda,none", "sparsity=0.5", "quant=none,rtn", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                timeout=1200, env={"PRUNEREP_OUTPUTS": str(tmp_path / "outputs")})
    assert p.returncode == 0, p.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "prunerep.report", str(sweep)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    png = (sweep / "report" / "equal_memory.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    kl = equal_memory_points(load_sweep(sweep)[0])
    kl = kl[kl["panel"] == KL_PANEL]
    # by hand: dense fp32 32 bits; wanda 50% = 16 + a 1-bit mask = 17; 4-bit g64 asym = 4 + 32/64 = 4.5;
    # both = 2 + 1 + 0.5 = 3.5
    assert dict(zip(kl["method"], kl["effective_bits"])) == {"none": 32.0, "wanda": 17.0, "rtn-w4g64": 4.5,
                                                             "wanda+rtn-w4g64": 3.5}
    by_method = dict(zip(kl["method"], kl["value"]))
    assert by_method["none"] == 0.0 and min(by_method["wanda"], by_method["rtn-w4g64"]) > 0.0


# --------------------------------------------------------------------------- the references' conventions

@pytest.mark.parametrize("sym", [False, True])
def test_gptq_dynamic_groups_are_the_references(sym):
    """Groups of 32 in blocks of 128 columns: the grid of a group that starts inside a block comes
    from the weights as the earlier blocks left them (GPTQ's fasterquant), not from the block's
    updated working copy."""
    from oracle import gptq_fasterquant
    from prunerep.compress.quant.gptq import gptq_quantize_weight

    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 256, generator=g)
    x = torch.randn(600, 256, generator=g) * torch.linspace(0.2, 3, 256)
    h = 2 * x.T @ x / 600
    ours = gptq_quantize_weight(w, h, 4, 32, sym, blocksize=128, hold_zeros=False)
    assert torch.equal(ours, gptq_fasterquant(w, h, 4, 32, sym, blocksize=128))


def test_gptq_keeps_a_dense_models_own_zeros_only_after_a_pruner():
    """pruner=none: a weight that is exactly zero in the dense model is a weight like any other
    (the rounding errors before it move it); after a pruner every zero is held."""
    from prunerep.compress.quant.gptq import gptq_quantize_weight

    g = torch.Generator().manual_seed(6)
    w = torch.randn(16, 64, generator=g)
    w[:, 40:44] = 0
    x = torch.randn(300, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = 2 * x.T @ x / 300
    free = gptq_quantize_weight(w, h, 8, 32, False, hold_zeros=False)
    held = gptq_quantize_weight(w, h, 8, 32, False, hold_zeros=True)
    assert bool((held[:, 40:44] == 0).all())
    assert bool((free[:, 40:44] != 0).any())


@pytest.mark.parametrize("block_inputs", ["quantized", "dense"])
def test_awq_calibrates_the_next_block_on_what_block_inputs_says(block_inputs, calib_ids):
    """block_inputs=dense (llm-awq's run_awq): block 1 is calibrated on the dense block 0's
    outputs; quantized: on the quantized block 0's."""
    from prunerep.model.anatomy import decoder_layers

    model = make_tiny("llama")
    seen = []
    dense_out = []
    hook = decoder_layers(model)[0].register_forward_hook(
        lambda m, a, out: dense_out.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for row in calib_ids:
            model(row[None])
    hook.remove()
    dense_out = torch.cat(dense_out)
    spy = decoder_layers(model)[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    q = _quantizer("awq", bits=3, group_size=32, block_inputs=block_inputs)
    q.quantize(model, calib_ids, _settings(q))
    spy.remove()
    first = next(x for x in seen if x.shape[0] == len(calib_ids))  # block 1's statistics pass (not the 1-sample probe)
    assert first.shape == dense_out.shape
    assert torch.equal(first, dense_out) == (block_inputs == "dense")
