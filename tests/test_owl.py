"""OWL (outlier-weighed layerwise sparsity) as a profile of magnitude, wanda and sparsegpt: the
reference's mapping from outlier ratios to block ratios, the global target kept, blocks with more
outliers pruned less, and ``profile=uniform`` exactly today's masks (computed here by hand)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from conftest import CACHE_DIR, REPO, make_tiny
from helpers import prune_settings
from prunerep.errors import ConfigError
from prunerep.model.anatomy import decoder_layers
from prunerep.compress.profile import owl_layer_ratios, owl_outlier_ratios
from prunerep.compress.measure import measure_sparsity
from prunerep.compress.method import targets_of
from prunerep.registry import method_class
from prunerep.sparsity import parse_sparsity


settings = partial(prune_settings, sparsity="0.6")  # batch_size 8


def reference_owl(outlier_ratios, target, lam):
    """OWL's lib/prune.py (prune_wanda_outlier), written out: all_layer_ratio are densities."""
    a = np.array(outlier_ratios, dtype=np.float64)
    a = (a - a.min()) * (1 / (a.max() - a.min()) * lam * 2)
    a = a - np.mean(a) + (1 - target)
    return 1 - a  # the per-block sparsity


def block_sparsity(model, pruner) -> list[float]:
    out = []
    for block in decoder_layers(model):
        lins = targets_of(block, pruner).values()
        out.append(sum(int((l.weight == 0).sum()) for l in lins) / sum(l.weight.numel() for l in lins))
    return out


# --------------------------------------------------------------------------- the mapping

@pytest.mark.parametrize("target,lam", [(0.7, 0.08), (0.5, 0.08), (0.6, 0.2)])
def test_layer_targets_are_the_reference_formula(target, lam):
    d = [3.1, 7.4, 1.2, 5.0, 2.2, 2.2]  # outlier ratios, in percent
    got = owl_layer_ratios(d, target, lam)
    np.testing.assert_allclose(got, reference_owl(d, target, lam), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, owl_layer_ratios(d, target, lam, weights=[7] * len(d)), rtol=0, atol=1e-12)
    assert np.mean(got) == pytest.approx(target, abs=1e-12)
    # by hand for this d: normalised r = (d - 1.2) / 6.2 * 2 lam, sparsity = target + mean(r) - r
    r = [(x - 1.2) / 6.2 * 2 * lam for x in d]
    assert got == pytest.approx([target + sum(r) / len(r) - x for x in r], abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)
    assert got[1] == min(got) and got[2] == max(got)  # most outliers: pruned least


def test_layer_targets_keep_the_mean_where_the_reference_leaves_0_1():
    d = [0.0, 0.1, 0.2, 9.0]
    ref = reference_owl(d, 0.1, 0.2)
    assert ref.min() < 0  # the reference would clip this block to 0.01 and miss the target
    got = owl_layer_ratios(d, 0.1, 0.2)
    assert min(got) >= 0 and max(got) <= 1
    assert np.mean(got) == pytest.approx(0.1, abs=1e-12)
    assert got == sorted(got, reverse=True)  # still: more outliers, less pruning
    assert owl_layer_ratios([2.0, 2.0, 2.0], 0.6, 0.08) == [0.6, 0.6, 0.6]  # no spread: uniform


def test_unequal_blocks_keep_the_weighted_mean():
    got = owl_layer_ratios([1.0, 4.0, 2.0], 0.5, 0.1, weights=[1, 2, 1])
    assert (got[0] * 1 + got[1] * 2 + got[2] * 1) / 4 == pytest.approx(0.5, abs=1e-12)
    assert got[1] < got[2] < got[0]


# --------------------------------------------------------------------------- outlier ratios

#: the block given outlier weights: the last one, since outlier weights in block l make outlier
#: activations (and so outlier scores) in the blocks after it too
OUTLIER_BLOCK = 3


def inject_outliers(model, block: int = OUTLIER_BLOCK, frac=0.03, scale=30.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    for lin in targets_of(decoder_layers(model)[block], method_class("pruner", "wanda")()).values():
        w = lin.weight
        sel = torch.rand(w.shape, generator=g) < frac
        w[sel] *= scale


def hand_outlier_ratio(model, calib, block: int, m: float) -> float:
    """Percent of block `block`'s Wanda scores |W| * ||X|| above m x their mean, from a plain forward."""
    lins = {n: t.module for n, t in targets_of(decoder_layers(model)[block], method_class("pruner", "wanda")()).items()}
    xs = {}
    hooks = [l.register_forward_hook(lambda mod, a, o, n=n: xs.__setitem__(n, a[0].flatten(0, -2).double()))
             for n, l in lins.items()]
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    scores = torch.cat([(l.weight.double().abs() * xs[n].pow(2).sum(0).sqrt()[None, :]).flatten()
                        for n, l in lins.items()])
    return 100.0 * float((scores > m * scores.mean()).sum()) / scores.numel()


def test_outlier_ratios_are_the_wanda_metric_on_calibration_activations(calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    inject_outliers(model)
    cfg = settings("wanda", profile="owl")
    ratios, sizes = owl_outlier_ratios(model, calib_ids, cfg, cfg.pruner, 5.0)
    hand = [hand_outlier_ratio(model, calib_ids, i, 5.0) for i in range(4)]
    one = 100.0 / sizes[0]  # a score right at the cut may fall either way in float32
    assert ratios == pytest.approx(hand, abs=2 * one)
    assert len(set(sizes)) == 1 and ratios[OUTLIER_BLOCK] == max(ratios) and ratios[OUTLIER_BLOCK] > 1.0


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_owl_keeps_the_global_target_and_prunes_outlier_blocks_less(name, calib_ids):
    model = make_tiny("llama", num_hidden_layers=4)
    inject_outliers(model)
    dense = copy.deepcopy(model)
    cfg = settings(name, sparsity="0.6", profile="owl")
    assert cfg.pruner.needs_calibration  # even magnitude: the outlier ratios need activations
    report = cfg.pruner.prune(model, calib_ids, cfg)
    prof = report["profile"]
    assert prof["name"] == "owl" and report["calibration"] is True
    targets = list(prof["layer_targets"].values())
    outliers = list(prof["outlier_ratios_pct"].values())
    np.testing.assert_allclose(targets, reference_owl(outliers, 0.6, 0.08), atol=1e-12)
    measured = measure_sparsity(model, cfg)
    assert abs(measured["achieved_sparsity"] - 0.6) < 0.001  # within 0.1 percentage point
    achieved = block_sparsity(model, cfg.pruner)
    assert achieved == pytest.approx(targets, abs=1e-3)
    assert prof["max_abs_deviation_from_layer_targets_pp"] < 0.1
    assert achieved[OUTLIER_BLOCK] == min(achieved) and achieved[OUTLIER_BLOCK] < 0.6 - 0.05  # the outlier block is pruned least
    for i in range(4):
        for j in range(4):
            if outliers[i] > outliers[j]:
                assert achieved[i] < achieved[j]
    # nothing but the weights changed, and the dense model's outlier ratios are what it used
    ratios, _ = owl_outlier_ratios(dense, calib_ids, cfg, cfg.pruner, 5.0)
    assert ratios == outliers


# --------------------------------------------------------------------------- uniform: today's masks

LLAMA_ORDER = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def hand_wanda(model, calib, ratio: float, sequential: bool):
    """Wanda by hand on full-model forwards: each group of layers that read one input is scored on
    the model with everything before it pruned (sequential), or every layer of a block on the block
    before any of it is pruned; each row loses its floor(cols * ratio) lowest |W| * ||X||."""
    model = copy.deepcopy(model)
    masks = {}
    for i, block in enumerate(decoder_layers(model)):
        groups = LLAMA_ORDER if sequential else [[n for g in LLAMA_ORDER for n in g]]
        for group in groups:
            lins = {n: block.get_submodule(n) for n in group}
            sq = {}
            hooks = [l.register_forward_hook(lambda m, a, o, n=n: sq.__setitem__(n, a[0].flatten(0, -2).float()
                                                                                  .pow(2).sum(0)))
                     for n, l in lins.items()]
            with torch.no_grad():
                model(calib, use_cache=False)
            for h in hooks:
                h.remove()
            for n, lin in lins.items():
                score = lin.weight.abs().float() * sq[n].sqrt()[None, :]
                k = int(lin.weight.shape[1] * ratio)
                mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.argsort(score, dim=1)[:, :k], True)
                lin.weight.data[mask] = 0
                masks[f"layers.{i}.{n}"] = mask
    return masks


def masks_of(model) -> dict:
    return {f"layers.{i}.{n}": lin.weight == 0 for i, b in enumerate(decoder_layers(model))
            for g in LLAMA_ORDER for n, lin in ((n, b.get_submodule(n)) for n in g)}


@pytest.mark.parametrize("sequential", [True, False])
def test_uniform_wanda_masks_are_todays(sequential, calib_ids):
    model = make_tiny("llama")
    expected = hand_wanda(model, calib_ids, 0.5, sequential)
    cfg = settings("wanda", sparsity="0.5", profile="uniform", sequential=sequential)
    report = cfg.pruner.prune(model, calib_ids, cfg)
    assert report["profile"] == {"name": "uniform"}
    got = masks_of(model)
    for name, mask in expected.items():
        assert torch.equal(got[name], mask), name


def test_uniform_magnitude_masks_are_todays():
    model = make_tiny("llama")
    expected = {}
    for name, lin in ((f"layers.{i}.{n}", b.get_submodule(n)) for i, b in enumerate(decoder_layers(model))
                      for g in LLAMA_ORDER for n in g):
        k = int(round(lin.weight.numel() * 0.37))
        flat = torch.zeros(lin.weight.numel(), dtype=torch.bool)
        flat[torch.argsort(lin.weight.abs().flatten())[:k]] = True
        expected[name] = flat.view_as(lin.weight)
    cfg = settings("magnitude", sparsity="0.37")
    assert not cfg.pruner.needs_calibration
    report = cfg.pruner.prune(model, None, cfg)  # uniform magnitude needs no calibration data
    assert report == {"method": "magnitude", "calibration": False, "profile": {"name": "uniform"}}
    got = masks_of(model)
    for name, mask in expected.items():
        assert torch.equal(got[name], mask), name


# --------------------------------------------------------------------------- settings and the run

def test_owl_settings_are_checked_before_the_model_loads():
    for name in ("magnitude", "wanda", "sparsegpt"):
        cls = method_class("pruner", name)
        assert cls().needs_calibration == (name != "magnitude")  # the method's own need
        assert cls(profile="owl").needs_calibration
        with pytest.raises(ConfigError, match="N:M pattern"):
            cls(profile="owl").validate(parse_sparsity("2:4"))
        cls(profile="uniform").validate(parse_sparsity("2:4"))
        with pytest.raises(ConfigError, match="pruner.profile='lamp'; choose uniform or owl"):
            cls(profile="lamp").validate(parse_sparsity("0.5"))
        with pytest.raises(ConfigError, match="owl_lambda"):
            cls(profile="owl", owl_lambda=-0.1).validate(parse_sparsity("0.5"))
        with pytest.raises(ConfigError, match="owl_m"):
            cls(profile="owl", owl_m=0).validate(parse_sparsity("0.5"))


def test_owl_run_records_its_layer_targets_and_meets_the_target(tmp_path):
    """The whole pipeline on the tiny model: magnitude + owl loads calibration data, pruning.json
    has the per-block targets, and check_target (0.5 pp) lets it through."""
    from prunerep.cli import run_config
    from prunerep.registry import compose

    cfg = compose("model=tiny", "task=none", "probe=none", "pruner=magnitude", "pruner.profile=owl", "sparsity=0.6",
                  "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled", "skip_completed=false",
                  f"cache_dir={CACHE_DIR}")
    summary = run_config(cfg, tmp_path / "run")
    assert summary["status"] == "complete"
    pruning = json.loads((tmp_path / "run" / "pruning.json").read_text())
    prof = pruning["method"]["profile"]
    assert prof["name"] == "owl" and prof["lambda"] == 0.08 and prof["m"] == 5.0
    assert list(prof["layer_targets"]) == [f"layers.{i}" for i in range(4)]
    assert np.mean(list(prof["layer_targets"].values())) == pytest.approx(0.6, abs=1e-12)
    assert abs(pruning["achieved_sparsity"] - 0.6) < 0.001


def test_nm_with_owl_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, PRUNEREP_CACHE=CACHE_DIR, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "prunerep", "pruner=wanda", "pruner.profile=owl", "sparsity=2:4",
                          "wandb.mode=disabled", f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and "pruner.profile=owl" in lines[0] and "N:M" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not run_dir.exists()
