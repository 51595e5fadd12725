"""layer_drop by position: explicit blocks (pruner.layers) and a window (pruner.window +
pruner.window_start) drop exactly those sublayers, bad positions fail before the model loads, and
the sweep report draws scores and final-layer KL against the position."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import partial

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import CACHE_DIR, REPO, make_tiny
from helpers import prune_settings
from prunerep.errors import ConfigError
from prunerep.results.store import atomic_write_json
from prunerep.registry import compose, method_class
from prunerep.sparsity import parse_sparsity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


settings = partial(prune_settings, "layer_drop")  # sparsity 0.5, batch_size 8


class Zero(nn.Module):
    """A sublayer that adds nothing: what a dropped attention / MLP is, built by hand."""

    def __init__(self, attn: bool):
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, *args, **kwargs):
        z = torch.zeros_like(hidden_states)
        return (z, None) if self.attn else z


def without(model, blocks: list[int], target: str):
    """The model with those blocks' sublayers removed by hand: blocks deleted from the stack, or
    their attention / MLP replaced by a module returning zeros."""
    m = copy.deepcopy(model)
    layers = m.model.layers
    if target == "block":
        m.model.layers = nn.ModuleList([b for i, b in enumerate(layers) if i not in blocks])
        return m
    for i in blocks:
        if target in ("attn", "both"):
            layers[i].self_attn = Zero(attn=True)
        if target in ("mlp", "both"):
            layers[i].mlp = Zero(attn=False)
    return m


@pytest.mark.parametrize("target", ["block", "attn", "mlp", "both"])
def test_explicit_layers_drop_exactly_those_sublayers(target, calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    hand = without(model, [1, 3], target)
    cfg = settings(target=target, layers=[-1, 1])  # -1: the last block
    cfg.pruner.validate(cfg.spec)
    cfg.pruner.check(model, cfg)
    report = cfg.pruner.prune(model, calib_ids, cfg)
    kinds = {"block": [""], "attn": [".attn"], "mlp": [".mlp"], "both": [".attn", ".mlp"]}[target]
    assert report["selection"] == "layers" and report["blocks"] == [1, 3]
    assert report["dropped"] == [f"layers.{i}{k}" for i in (1, 3) for k in kinds]
    assert set(report["importance"]) >= {"layers.0", "layers.0.attn", "layers.3.mlp"}  # still measured
    with torch.no_grad():
        torch.testing.assert_close(model(calib_ids).logits, hand(calib_ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(calib_ids).logits, without(model, [0, 2], target)(calib_ids).logits)


@pytest.mark.parametrize("start", [0, 1, 2])
def test_window_start_selects_the_window(start, calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    cfg = settings(target="attn", window=2, window_start=start)
    report = cfg.pruner.prune(model, calib_ids, cfg)
    want = [start, start + 1]
    assert report["selection"] == "window" and report["blocks"] == want
    assert (report["window"], report["window_start"]) == (2, start)
    assert report["dropped"] == [f"layers.{i}.attn" for i in want]
    for i, block in enumerate(model.model.layers):  # o_proj zero exactly in the window, the MLPs untouched
        assert bool((block.self_attn.o_proj.weight == 0).all()) == (i in want)
        assert not bool((block.mlp.down_proj.weight == 0).all())


@pytest.mark.parametrize("kw,needle", [
    (dict(layers=[1], window=2, window_start=0), "give one of them"),
    (dict(window=2), "needs both its size and its first block"),
    (dict(window_start=2), "needs both its size and its first block"),
    (dict(window=0, window_start=0), "pruner.window=0 must be >= 1"),
    (dict(layers=[]), "names no block"),
    (dict(layers=[2, 2]), "names a block twice"),
    (dict(layers=[1], count=1), "cannot be combined with pruner.layers"),
    (dict(window=2, window_start=0, count=1), "cannot be combined with pruner.window"),
])
def test_bad_positions_are_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        method_class("pruner", "layer_drop")(**kw).validate(parse_sparsity("0.5"))


@pytest.mark.parametrize("kw,needle", [
    (dict(layers=[0, 4]), r"block 4 is out of range; the model has 4 blocks \(0..3, or -4..-1\)"),
    (dict(layers=[-5]), "block -5 is out of range"),
    (dict(layers=[3, -1]), "names a block twice"),
    (dict(window=2, window_start=3), r"blocks 3..4 are out of range; the model has 4 blocks \(window_start <= 2\)"),
])
def test_positions_out_of_range_are_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        method_class("pruner", "layer_drop")(**kw).check_depth(4)
    method_class("pruner", "layer_drop")(layers=[0, -3, 3]).check_depth(4)  # -3 = block 1


def test_out_of_range_fails_before_the_model_loads(tmp_path, monkeypatch):
    from prunerep import pipeline
    from prunerep.cli import run_config

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    cfg = compose("model=tiny", "pruner=layer_drop", "pruner.layers=[0,9]", "task=none", "probe=none",
                  "wandb.mode=disabled", f"cache_dir={CACHE_DIR}")
    assert list(cfg.pruner.layers) == [0, 9]
    with pytest.raises(ConfigError, match="block 9 is out of range; the model has 4 blocks"):
        run_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_out_of_range_window_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, PRUNEREP_CACHE=CACHE_DIR, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "prunerep", "model=tiny", "pruner=layer_drop", "pruner.window=2",
                          "pruner.window_start=3", "task=none", "probe=none", "wandb.mode=disabled",
                          f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, text=True, capture_output=True, timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and "out of range" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "stage load" not in res.stderr and not run_dir.exists()


def test_window_run_records_the_dropped_blocks(tmp_path):
    from prunerep.cli import run_config

    cfg = compose("model=tiny", "pruner=layer_drop", "pruner.target=block", "pruner.window=2", "pruner.window_start=1",
                  "task=none", "probe=none", "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled",
                  "skip_completed=false", f"cache_dir={CACHE_DIR}")
    assert run_config(cfg, tmp_path / "run")["status"] == "complete"
    method = json.loads((tmp_path / "run" / "pruning.json").read_text())["method"]
    assert method["selection"] == "window" and method["blocks"] == [1, 2]
    assert method["dropped"] == ["layers.1", "layers.2"]


# --------------------------------------------------------------------------- the report

def write_run(root, start: int, kl: float, scores: dict, window=4, layers=None):
    """A complete run directory of a window sweep: config.yaml, pruning.json, probes.parquet, evals.json,
    summary.json, as the pipeline writes them."""
    from omegaconf import OmegaConf

    d = root / f"smollm2_layer_drop_0.5_{start}"
    d.mkdir(parents=True)
    blocks = layers if layers is not None else list(range(start, start + window))
    pruner = {"name": "layer_drop", "target": "block", "count": None, "layers": layers,
              "window": None if layers is not None else window, "window_start": None if layers is not None else start}
    OmegaConf.save(OmegaConf.create({"model": {"name": "smollm2"}, "pruner": pruner, "sparsity": 0.5}),
                   d / "config.yaml")
    atomic_write_json(d / "pruning.json", {"achieved_sparsity": 0.1, "modules": {},
                                           "method": {"method": "layer_drop", "blocks": blocks}})
    rows = []
    for pid in range(2):
        for layer in range(5):  # the last layer (4) holds the headline; earlier layers must not count
            v = kl * (1 + 0.5 * (pid - 0.5)) if layer == 4 else 99.0
            rows.append(("prompt", pid, "mc", layer, "block", -1, "probability", "kl", 1.0, v))
            rows.append(("prompt", pid, "mc", layer, "block", -1, "probability", "kl", 2.0, 77.0))  # not T=1
    df = pd.DataFrame(rows, columns=["context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space",
                                     "metric", "temperature", "value"])
    df.astype({"prompt_id": "int32", "layer": "int16", "step": "int32"}).to_parquet(d / "probes.parquet")
    tasks = {t: {"type": ty, "metric": "acc", "dense": dense, "pruned": pruned}
             for t, (ty, dense, pruned) in scores.items()}
    atomic_write_json(d / "evals.json", {"tasks": tasks})
    atomic_write_json(d / "summary.json", {"status": "complete", "model": "smollm2", "pruner": "layer_drop",
                                           "sparsity": 0.5, "achieved_sparsity": 0.1, "run_dir": str(d),
                                           "config_hash": f"h{start}", "timings_s": {"total": 1.0}})
    return d


def test_report_draws_scores_and_kl_against_the_window_position(tmp_path):
    from prunerep.report import make_report
    from prunerep.report.position import layer_positions, position_points

    sweep = tmp_path / "sweep"
    expect = {0: 0.9, 4: 0.3, 8: 0.5}
    for start, kl in expect.items():
        write_run(sweep, start, kl, {"mmlu_dev": ("multiple_choice", 0.5, 0.5 - kl / 10),
                                     "arith_gen": ("generative", 0.4, 0.4 - kl / 5)})
    res = make_report(sweep)
    png = res["files"]["layer_position_png"]
    assert png.name == "layer_position.png" and png.read_bytes().startswith(PNG_MAGIC)
    pos = layer_positions(res["runs"])
    assert sorted(pos["position"]) == [0, 4, 8] and set(pos["label"]) == {"0-3", "4-7", "8-11"}
    pts = position_points(res["table"], pos)
    kl = pts[pts["kind"] == "kl"].set_index("position")["value"].to_dict()
    assert kl == pytest.approx(expect)  # the last layer, T=1, mean over prompts
    gen = pts[(pts["kind"] == "score") & (pts["task"] == "arith_gen")].set_index("position")
    assert gen["value"].to_dict() == pytest.approx({s: 100 * (0.4 - k / 5) for s, k in expect.items()})
    assert gen["dense"].tolist() == pytest.approx([40.0] * 3)


def test_report_draws_explicit_layer_sets_and_skips_sweeps_without_a_position_axis(tmp_path):
    from prunerep.report import make_report

    sweep = tmp_path / "layers"
    write_run(sweep, 0, 0.2, {}, layers=[20, 21, 22, 23])
    write_run(sweep, 1, 0.4, {}, layers=[0, 1, 2, 3])
    res = make_report(sweep)  # no eval scores: the KL panel alone
    assert res["files"]["layer_position_png"].read_bytes().startswith(PNG_MAGIC)

    single = tmp_path / "single"
    write_run(single, 4, 0.2, {})
    res = make_report(single)
    assert "layer_position_png" not in res["files"] and not (single / "report" / "layer_position.png").exists()
