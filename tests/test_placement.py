"""Placement: device maps with CPU and disk offload, and offload=true, give the same numbers as the
model in memory, bit for bit; a checkpoint read for disk offload is never written."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch

from cli import run_cli
from conftest import make_tiny
from prunerep.errors import ConfigError
from prunerep.model.anatomy import decoder_layers
from prunerep.model.placement import (dispatch, is_offloaded, iter_parameters, onloaded, placement,
                                      resolved_device_map)
from prunerep.compress.measure import measure_sparsity
from prunerep.compress.method import PruneSettings
from prunerep.registry import method_class
from prunerep.sparsity import parse_sparsity


@pytest.mark.parametrize("kw,needle", [
    (dict(device_map="fastest"), "model.device_map='fastest'; choose auto"),
    (dict(device_map={"model.layers.0": "gpu7"}), "is not a device"),
    (dict(device_map={"model.layers.0": 0}), "GPU 0 is not visible"),
    (dict(device_map={}), "places no module"),
    (dict(max_memory={"cpu": "1GB"}), "model.max_memory needs model.device_map"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "is not a size"),
    (dict(device_map="auto", offload=True), "give one"),
])
def test_bad_placements_are_one_line(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        placement("cpu", "float32", **kw)


def test_bad_device_and_dtype_are_one_line():
    with pytest.raises(ConfigError, match="model.device='bogus' is not a device"):
        placement("bogus", "float32")
    with pytest.raises(ConfigError, match="no CUDA device"):
        placement("cuda", "float32")
    with pytest.raises(ConfigError, match="model.dtype='float8'"):
        placement("cpu", "float8")


def _half_on_disk(model) -> dict:
    """max_memory that leaves about half the blocks to disk (the embedding and the rest stay)."""
    emb = model.get_input_embeddings().weight.numel() * 4
    blk = sum(p.numel() * 4 for p in decoder_layers(model)[0].parameters())
    return {"cpu": emb + 3 * blk}


def test_disk_offloaded_weights_are_written_to_the_runs_folder_never_to_the_checkpoint(tmp_path, calib_ids):
    """A model loaded with a device map reads its disk-offloaded weights straight from the checkpoint's
    safetensors file; pruning writes the changed weights into the run's offload folder instead."""
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ckpt"
    source = make_tiny("llama", num_hidden_layers=4)
    source.save_pretrained(ckpt)
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    where = placement("cpu", "float32", "auto", _half_on_disk(make_tiny("llama", num_hidden_layers=4)))
    device_map = resolved_device_map(source, where)
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert is_offloaded(model) and decoder_layers(model)[3].self_attn.q_proj.weight.device.type == "meta"
    cfg = PruneSettings(spec=parse_sparsity("0.5"), pruner=method_class("pruner", "wanda")(),
                        device=torch.device("cpu"), batch_size=8)
    cfg.pruner.prune(model, calib_ids, cfg)
    reference = make_tiny("llama", num_hidden_layers=4)
    cfg.pruner.prune(reference, calib_ids, cfg)
    got = dict(iter_parameters(model))
    for name, p in reference.named_parameters():
        assert torch.equal(got[name], p), name
    assert measure_sparsity(model, cfg)["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest() == digest
    assert any(p.suffix == ".dat" for p in (tmp_path / "off").iterdir())  # the pruned blocks' own files
    with torch.no_grad():  # the forward through accelerate's hooks computes with the pruned weights
        ids = torch.arange(1, 9)[None]
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_onloaded_writes_back_only_what_changed(calib_ids):
    model = dispatch(make_tiny("llama"), placement("cpu", "float32", offload=True), None)
    block = decoder_layers(model)[1]
    with onloaded(block):
        block.mlp.down_proj.weight.zero_()
    assert block.mlp.down_proj.weight.device.type == "meta"
    with onloaded(block):
        assert bool((block.mlp.down_proj.weight == 0).all())
        assert not bool((block.mlp.up_proj.weight == 0).all())


def test_disk_offloaded_weights_can_be_read_inside_inference_mode(tmp_path):
    """Probes run under torch.inference_mode; reading disk-offloaded weights there (to fingerprint
    them for a cache key) must give the same values as outside it."""
    where = placement("cpu", "float32", "auto", _half_on_disk(make_tiny("llama", num_hidden_layers=4)))
    model = dispatch(make_tiny("llama", num_hidden_layers=4), where, tmp_path)
    assert decoder_layers(model)[3].self_attn.q_proj.weight.device.type == "meta"
    plain = make_tiny("llama", num_hidden_layers=4)
    with torch.inference_mode():
        got = {n: p.clone() for n, p in iter_parameters(model)}
    assert got.keys() == dict(plain.named_parameters()).keys()
    for name, p in plain.named_parameters():
        assert torch.equal(got[name], p), name


TINY_RUN = ["model=tiny", "pruner=wanda", "task=offline", "task.tasks=[arith_cloze,arith_gen]", "task.limit=4",
            "probe.n_prompts=2", "probe.max_new_tokens=4", "wandb.mode=disabled", "skip_completed=false"]


def test_a_run_with_half_its_blocks_on_disk_is_bit_identical_to_the_run_in_memory(tmp_path):
    """model=tiny in memory, with half its blocks offloaded to disk by max_memory, and offloaded to CPU
    memory (offload=true): each with its own cache, so the dense side is computed each way too."""
    budget = _half_on_disk(make_tiny("llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=4, tie_word_embeddings=True))["cpu"]
    runs = {"memory": [], "disk": ["model.device_map=auto", f"model.max_memory={{cpu:{budget}}}"],
            "offload": ["offload=true"]}
    for name, extra in runs.items():
        res = run_cli(*TINY_RUN, *extra, f"cache_dir={tmp_path / name / 'cache'}",
                      f"hydra.run.dir={tmp_path / name / 'run'}", env={"PRUNEREP_OUTPUTS": str(tmp_path / name)},
                      timeout=600)
        assert res.returncode == 0, (name, res.stderr[-3000:])
    loaded = json.loads((tmp_path / "disk" / "run" / "summary.json").read_text())["loaded_model"]
    on_disk = [k for k, v in loaded["device_map"].items() if k.startswith("model.layers.") and v == "disk"]
    assert on_disk == ["model.layers.2", "model.layers.3"]
    base = tmp_path / "memory" / "run"
    for name in ("disk", "offload"):
        run = tmp_path / name / "run"
        pd.testing.assert_frame_equal(pd.read_parquet(run / "probes.parquet"), pd.read_parquet(base / "probes.parquet"))
        for f in ("pruning.json", "evals.json"):
            a, b = (json.loads((d / f).read_text()) for d in (base, run))
            if f == "evals.json":
                a, b = ({t: (r["dense"], r["pruned"]) for t, r in x["tasks"].items()} for x in (a, b))
            assert a == b, (name, f)
