"""pruner=external: a model compressed elsewhere, analysed as prunerep's own pruners are. A checkpoint
saved by prunerep, one written by compressed-tensors' own compressor (llm-compressor's save path)
and a depth-pruned one with fewer blocks give the numbers of the in-process model; bad checkpoints
are one line and exit code 2 before the model loads."""
from __future__ import annotations

import copy
import json
from functools import partial

import pandas as pd
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config)
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from cli import run_cli
from conftest import CACHE_DIR, make_tiny
from helpers import CHAR_PROMPTS, CharTokenizer, probe_plan, prune_settings
from prunerep import preflight, spec
from prunerep.compress.accounting import model_compression
from prunerep.compress.grid import rtn_params
from prunerep.compress.measure import measure_sparsity
from prunerep.errors import ConfigError
from prunerep.model.anatomy import decoder_layers
from prunerep.model.load import load_model
from prunerep.pipeline import TargetMissed, check_target
from prunerep.probes import compare_to_reference, dense_reference
from prunerep.registry import compose, method_class

PROMPTS = CHAR_PROMPTS
plan = partial(probe_plan, n_prompts=2, max_new_tokens=4, temperatures=[1.0])
#: a short probe on the CLI: two prompts, four decoding steps, no evaluations
QUICK = ["model=tiny", "task=none", "probe.n_prompts=2", "probe.max_new_tokens=4", "wandb.mode=disabled"]


def cli_run(run_dir, *args):
    res = run_cli(*QUICK, *args, f"hydra.run.dir={run_dir}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def probes_of(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "probes.parquet")


def tiny_dense():
    """conftest's model=tiny as the CLI builds it (same seed, same vocabulary)."""
    return load_model(OmegaConf.to_object(compose("model=tiny", "model.device=cpu").model), CACHE_DIR)[0]


def probe_table(dense, pruned, prompts_file, tmp_path):
    cfg = plan(prompts_file)
    tok = CharTokenizer()
    ref = dense_reference(dense, tok, cfg, tmp_path / "cache", model_key="external-tiny")
    return compare_to_reference(pruned, tok, cfg, ref).table


# --------------------------------------------------------------------------- prunerep's own checkpoint

def test_a_checkpoint_saved_by_prunerep_round_trips_to_identical_probe_numbers(tmp_path):
    a = cli_run(tmp_path / "a", "pruner=magnitude", "sparsity=0.5", "save_model=true")
    b = cli_run(tmp_path / "b", "pruner=external", f"pruner.path={a / 'model'}", "sparsity=0.5")
    pa, pb = probes_of(a), probes_of(b)
    assert len(pa) > 1000 and pa.equals(pb)  # every probe number, bit for bit
    ja, jb = (json.loads((d / "pruning.json").read_text()) for d in (a, b))
    assert ja["modules"] == jb["modules"] and jb["achieved_sparsity"] == 0.5
    assert jb["method"]["format"] == "safetensors" and jb["method"]["layer_map_from"] == "same depth"
    ca, cb = (json.loads((d / "compression.json").read_text()) for d in (a, b))
    assert ca["effective_bits"] == cb["effective_bits"] == 0.5 * 32 + 1  # fp32 values kept + a bitmask
    assert json.loads((b / "summary.json").read_text())["pruner"] == "external"


def test_the_run_identity_follows_the_checkpoint_files(tmp_path):
    """A different checkpoint under the same pruner.path is another point (the completed-points index
    must not reuse the first one's results)."""
    ckpt = tmp_path / "ckpt"
    tiny_dense().save_pretrained(ckpt)
    cfg = compose(*QUICK, "pruner=external", f"pruner.path={ckpt}", f"cache_dir={tmp_path / 'cache'}")
    first = preflight.check(spec.build(cfg, tmp_path / "run")).identity.config_hash
    again = preflight.check(spec.build(cfg, tmp_path / "run")).identity.config_hash
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 0.0
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    changed = preflight.check(spec.build(cfg, tmp_path / "run")).identity.config_hash
    plain = spec.build(cfg, tmp_path / "run").identity.config_hash  # the config alone
    assert first == again and changed != first and plain not in (first, changed)


def test_the_declared_sparsity_labels_the_run_and_is_not_enforced(tmp_path):
    """A checkpoint's sparsity is measured, not promised: a label that differs does not fail the run."""
    external = spec.build(compose(*QUICK, "pruner=external", "pruner.path=/x", "sparsity=0.3"), tmp_path / "r")
    check_target(external, 0.5)
    own = spec.build(compose(*QUICK, "pruner=magnitude", "sparsity=0.3"), tmp_path / "r")
    with pytest.raises(TargetMissed):
        check_target(own, 0.5)


def test_a_mixture_of_experts_checkpoint_is_read_through_transformers_conversions(tmp_path):
    """transformers 5 keeps experts fused ([E, 2I, d]) but saves them one matrix per expert; the
    checkpoint is converted back by transformers' own loading conversions, block by block."""
    dense = make_tiny("qwen2_moe", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32)
    s = prune_settings("magnitude", sparsity="0.5")
    pruned = copy.deepcopy(dense)
    s.pruner.prune(pruned, None, s)
    pruned.save_pretrained(tmp_path / "moe")
    stored = load_file(tmp_path / "moe" / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in stored  # not the model's fused names
    assert "model.layers.0.mlp.experts.down_proj" not in stored
    e = prune_settings("external", sparsity="0.5", path=str(tmp_path / "moe"))
    with torch.device("meta"):
        e.pruner.check(type(dense)(dense.config), e)
    external = copy.deepcopy(dense)
    e.pruner.prune(external, None, e)
    mine, theirs = pruned.state_dict(), external.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert measure_sparsity(external, e)["n_expert_matrices"] == 3 * 4 * 2


# --------------------------------------------------------------------------- compressed-tensors

def compressed_tensors_checkpoint(pruned, path, bits=4, group_size=32):
    """llm-compressor's save path: a quantization config applied to the model, its scales and zero
    points set to prunerep's RTN grid (asymmetric: compressed-tensors' signed codes are prunerep's
    minus 2^(b-1)), compressed by compressed-tensors' ModelCompressor, saved and its config updated."""
    model = copy.deepcopy(pruned)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "weight_scale"):
                scale, zero = rtn_params(mod.weight, bits, group_size, sym=False)
                mod.weight_scale.data = scale.squeeze(-1)
                mod.weight_zero_point.data = (zero.squeeze(-1) - 2 ** (bits - 1)).to(mod.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


def test_a_compressed_tensors_checkpoint_gives_the_in_process_sparse_quantized_numbers(tmp_path, prompts_file):
    dense = make_tiny("llama", num_hidden_layers=3)
    s = prune_settings("magnitude", sparsity="0.5")
    pruned = copy.deepcopy(dense)
    s.pruner.prune(pruned, None, s)
    ckpt = compressed_tensors_checkpoint(pruned, tmp_path / "ct")
    stored = load_file(ckpt / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in stored  # really compressed
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    in_process = copy.deepcopy(pruned)
    method_class("quant", "rtn")(bits=4, group_size=32, sym=False).quantize(in_process, None, s)

    e = prune_settings("external", sparsity="0.5", path=str(ckpt))
    external = copy.deepcopy(dense)
    report = e.pruner.prune(external, None, e)
    mine, theirs = in_process.state_dict(), external.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a, b = (probe_table(dense, m, prompts_file, tmp_path) for m in (in_process, external))
    assert len(a) > 100 and a.equals(b)
    assert report["format"] == "compressed-tensors:pack-quantized"
    assert len(report["quantization"]["modules"]) == 3 * 7 and report["quantization"]["bits"] == 4

    # bits: 4-bit values where a weight is kept, a bitmask, an fp16 scale and zero per 32 weights
    pruning = dict(measure_sparsity(external, e), method=report)
    comp = model_compression(external, pruner=e.pruner, spec=e.spec, pruning=pruning,
                             quant=method_class("quant", "none")(), quant_report=None)
    w = decoder_layers(external)[1].mlp.down_proj.weight
    kept = float((w != 0).sum()) / w.numel()
    assert comp["modules"]["layers.1.mlp.down_proj"] == pytest.approx(kept * 4 + 1 + 32 / 32, abs=1e-6)
    assert comp["perturbations"][-1]["method"] == "external-quantized"


def test_a_quantizer_after_an_already_quantized_checkpoint_is_refused(tmp_path):
    dense = make_tiny("llama", vocab_size=49152, intermediate_size=128, num_hidden_layers=4, tie_word_embeddings=True)
    ckpt = compressed_tensors_checkpoint(dense, tmp_path / "ct")
    cfg = compose(*QUICK, "pruner=external", f"pruner.path={ckpt}", "quant=rtn", f"cache_dir={tmp_path / 'c'}")
    with pytest.raises(ConfigError, match="already quantized"):
        preflight.check(spec.build(cfg, tmp_path / "run"))


# --------------------------------------------------------------------------- fewer blocks

def test_a_layer_dropped_checkpoint_is_probed_with_its_layer_map(tmp_path):
    """Blocks 1 and 2 of the 4-block tiny model removed, saved with 2 blocks: its blocks go back to
    dense indices 0 and 3 (found by their weights), and every probe number is that of
    layer_drop dropping those two blocks in-process."""
    short = tiny_dense()
    del short.model.layers[2]
    del short.model.layers[1]
    short.config.num_hidden_layers = 2
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:2]
    short.save_pretrained(tmp_path / "short")

    a = cli_run(tmp_path / "a", "pruner=layer_drop", "pruner.target=block", "pruner.layers=[1,2]")
    b = cli_run(tmp_path / "b", "pruner=external", f"pruner.path={tmp_path / 'short'}")
    assert probes_of(a).equals(probes_of(b))
    method = json.loads((b / "pruning.json").read_text())["method"]
    assert method["layer_map"] == {"0": 0, "1": 3} and method["layer_map_from"] == "matched"
    assert method["dropped_blocks"] == [1, 2] and max(method["layer_match_distance"].values()) == 0.0
    # the same blocks given by hand; another map gives other numbers
    c = cli_run(tmp_path / "c", "pruner=external", f"pruner.path={tmp_path / 'short'}", "pruner.layer_map=[0,3]")
    d = cli_run(tmp_path / "d", "pruner=external", f"pruner.path={tmp_path / 'short'}", "pruner.layer_map=[0,1]")
    assert probes_of(c).equals(probes_of(a)) and not probes_of(d)["value"].equals(probes_of(a)["value"])
    assert json.loads((c / "pruning.json").read_text())["method"]["layer_map_from"] == "pruner.layer_map"


def test_blocks_of_another_model_are_not_matched(tmp_path):
    dense = make_tiny("llama", num_hidden_layers=4, seed=0)
    other = make_tiny("llama", num_hidden_layers=2, seed=1)
    other.save_pretrained(tmp_path / "other")
    e = prune_settings("external", path=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="matches no dense block.*pruner.layer_map"):
        e.pruner.prune(copy.deepcopy(dense), None, e)


# --------------------------------------------------------------------------- bad input

def _bad_checkpoints(d):
    """name -> (overrides, the line's needle); each checkpoint beside a dense model directory shaped
    like model=tiny (llama, 64 wide, 128 MLP, 4 blocks, the SmolLM2 vocabulary of 49152), whose
    config is read before it loads."""
    like_tiny = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     tie_word_embeddings=True)
    make_tiny("llama", **like_tiny).save_pretrained(d / "dense")
    make_tiny("llama", **{**like_tiny, "intermediate_size": 96}).save_pretrained(d / "mlp96")
    make_tiny("qwen2", **like_tiny).save_pretrained(d / "qwen2")
    make_tiny("llama", **{**like_tiny, "vocab_size": 256}).save_pretrained(d / "vocab256")
    make_tiny("llama", **{**like_tiny, "num_hidden_layers": 6}).save_pretrained(d / "deeper")
    (d / "empty").mkdir()
    return {
        "missing": ([f"pruner.path={d / 'nowhere'}"], "no such directory"),
        "no-path": ([], "pruner=external needs pruner.path"),
        "shape": ([f"pruner.path={d / 'mlp96'}"], "mlp.down_proj.weight is [64, 96] in the checkpoint, [64, 128] in the dense model"),
        "architecture": ([f"pruner.path={d / 'qwen2'}"], "model_type='qwen2'; the dense model has model_type='llama'"),
        "vocabulary": ([f"pruner.path={d / 'vocab256'}"], "vocab_size=256; the dense model has vocab_size=49152"),
        "deeper": ([f"pruner.path={d / 'deeper'}"], "has 6 blocks; the dense model has 4"),
        "not-a-checkpoint": ([f"pruner.path={d / 'empty'}"], "has no config.json"),
        "layer-map": ([f"pruner.path={d / 'mlp96'}", "pruner.layer_map=[0,2,1]"], "increasing"),
    }


@pytest.mark.parametrize("case", ["missing", "no-path", "shape", "architecture", "vocabulary", "deeper",
                                  "not-a-checkpoint", "layer-map"])
def test_bad_checkpoints_fail_in_one_line_before_loading(tmp_path, case):
    args, needle = _bad_checkpoints(tmp_path)[case]
    run_dir = tmp_path / "run"
    res = run_cli(*QUICK, f"model.path={tmp_path / 'dense'}", "pruner=external", *args, f"hydra.run.dir={run_dir}",
                  timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "stage load" not in res.stdout + res.stderr
    assert not run_dir.exists()
