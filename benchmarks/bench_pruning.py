"""Pruning cost, as ratios taken in one run (these machines are noisy; ratios travel).

  wanda / calibration forward     Wanda = one calibration forward + a per-row sort (target <= 1.5)
  sparsegpt / wanda               the price of OBS reconstruction, same model and calibration set
  load from cache / from GGUF     the embedded model, dequantised once into safetensors

    python benchmarks/bench_pruning.py                         # embedded SmolLM2, CPU
    python benchmarks/bench_pruning.py --model qwen2.5-shape   # Qwen2.5-7B's shape, random weights (GPU)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prunerep.results.store import atomic_write_json  # noqa: E402
from prunerep.model.load import load_model  # noqa: E402
from prunerep.model.placement import resolve_device  # noqa: E402
from prunerep.compress.engine import calibrated_blocks, run_block  # noqa: E402
from prunerep.compress.method import PruneSettings
from prunerep.registry import build_method, compose  # noqa: E402
from prunerep.sparsity import parse_sparsity  # noqa: E402


def model_cfg(name: str, **over):
    return OmegaConf.to_object(compose(f"model={name}", *(f"model.{k}={v}" for k, v in over.items())).model)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def calibration_forward(model, calib, cfg):
    for step in calibrated_blocks(model, calib, cfg, desc="forward"):
        step.outputs = run_block(step.block, step.inputs, step.kwargs, cfg.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "pruning.json"))
    args = ap.parse_args()
    cache = os.environ.get("PRUNEREP_CACHE", os.path.expanduser("~/.cache/prunerep"))
    torch.manual_seed(0)
    mcfg = model_cfg(args.model)
    device = resolve_device(mcfg.device)
    results = {"model": args.model, "device": str(device), "nsamples": args.nsamples, "seqlen": args.seqlen,
               "torch_threads": torch.get_num_threads()}

    if mcfg.source == "package":
        load_model(mcfg, cache)  # make sure the cache exists (first run dequantises)
        t_cache, _ = timed(lambda: load_model(mcfg, cache), device)
        t_gguf, _ = timed(lambda: load_model(model_cfg(args.model, cache_dequantized=False), cache), device)
        results.update(load_cache_s=t_cache, load_gguf_s=t_gguf, load_cache_over_gguf=t_cache / t_gguf)

    model, tok = load_model(mcfg, cache)
    calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))

    def settings(name):
        return PruneSettings(spec=parse_sparsity(args.sparsity), pruner=build_method("pruner", compose(
            f"pruner={name}").pruner), device=device, batch_size=args.nsamples)

    def prune(name):
        cfg = settings(name)
        return cfg.pruner.prune(model, calib, cfg)

    dense_state = {k: v.clone() for k, v in model.state_dict().items()} if device.type == "cpu" else None
    snapshot = copy.deepcopy(model.state_dict()) if dense_state is None else dense_state

    def restore():
        model.load_state_dict(snapshot)

    calibration_forward(model, calib[:2], settings("wanda"))  # warm-up
    # write every weight once before timing: weights loaded from safetensors are mapped from the
    # file, and the first write to each page (any pruner's) is a copy-on-write fault, not the method
    restore()
    t_fwd, _ = timed(lambda: calibration_forward(model, calib, settings("wanda")), device)
    t_wanda, _ = timed(lambda: prune("wanda"), device)
    restore()
    t_sgpt, _ = timed(lambda: prune("sparsegpt"), device)
    restore()
    t_mag, _ = timed(lambda: prune("magnitude"), device)
    results.update(calib_forward_s=t_fwd, wanda_s=t_wanda, sparsegpt_s=t_sgpt, magnitude_s=t_mag,
                   wanda_over_forward=t_wanda / t_fwd, sparsegpt_over_wanda=t_sgpt / t_wanda)
    if device.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    print(f"\npruning bench ({args.model} on {device}, calib {args.nsamples}x{args.seqlen})")
    rows = [("wanda / calibration forward", "wanda_over_forward", "target <= 1.5"),
            ("sparsegpt / wanda", "sparsegpt_over_wanda", ""),
            ("load from cache / from GGUF", "load_cache_over_gguf", "")]
    for label, key, note in rows:
        if key in results:
            print(f"  {label:32s} {results[key]:8.3f}   {note}")
    for key in ("calib_forward_s", "wanda_s", "sparsegpt_s", "magnitude_s", "load_cache_s", "load_gguf_s"):
        if key in results:
            print(f"  {key:32s} {results[key]:8.3f} s")
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
