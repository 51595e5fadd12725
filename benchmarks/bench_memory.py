"""Peak host memory per stage of a run, as a multiple of the model's own bytes.

Two runs of the whole pipeline, each in its own process (the peak resident set of every stage is
in summary.json, ``peak_memory_mb.stages``):

  embedded   the default run on the embedded SmolLM2-135M, float32 (task=offline, probe=all)
  qwen1.5b   a random Qwen2.5-1.5B-shaped model in bfloat16 (hidden 1536, 28 blocks, vocabulary
             151,936: the embeddings and LM head hold 30% of its 1.5 B parameters), wanda 0.5,
             a few calibration samples, probes and offline items so that it runs in minutes on a CPU

Printed per stage: peak RSS, peak RSS / model bytes, and the bound RSS <= 1.5 x model bytes + 1.5 GB.

    python benchmarks/bench_memory.py                    # both runs
    python benchmarks/bench_memory.py --only embedded
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = os.environ.get("PRUNEREP_CACHE", os.path.expanduser("~/.cache/prunerep"))
GB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

RUNS = {
    "embedded": ["model=smollm2", "model.dtype=float32"],
    "qwen1.5b": ["model=qwen2.5-shape", "model.dtype=bfloat16", "model.device=cpu", "model.arch.hidden_size=1536",
                 "model.arch.intermediate_size=8960", "model.arch.num_attention_heads=12",
                 "model.arch.num_key_value_heads=2", "model.arch.vocab_size=151936", "model.arch.tie_word_embeddings=true",
                 "calib.nsamples=8", "probe.n_prompts=2", "probe.max_new_tokens=8", "task.limit=8",
                 "task.tasks=[arith_cloze,arith_gen,pydoc_ppl]", "task.ppl_chars=2000"],
}


def run(name: str, args: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "prunerep", *args, "wandb.mode=disabled", "skip_completed=false",
           f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PRUNEREP_CACHE=CACHE, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PRUNEREP_OUTPUTS=str(out / "outputs"))
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{name}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def report(name: str, summary: dict) -> dict:
    loaded = summary["loaded_model"]
    model_bytes = loaded["parameters"] * BYTES[loaded["dtype"]]
    bound = 1.5 * model_bytes + 1.5 * GB
    stages = {k: v["cpu_rss"] * 2**20 for k, v in summary["peak_memory_mb"]["stages"].items()}
    print(f"\n{name}: {loaded['parameters'] / 1e6:.0f} M parameters, {loaded['dtype']}, model {model_bytes / GB:.2f} GB, "
          f"bound 1.5 x model + 1.5 GB = {bound / GB:.2f} GB")
    print(f"  {'stage':<18} {'peak RSS GB':>11} {'/ model':>8} {'within':>7}")
    for stage, rss in stages.items():
        print(f"  {stage:<18} {rss / GB:>11.2f} {rss / model_bytes:>8.2f} {'yes' if rss <= bound else 'NO':>7}")
    return {"model_bytes": model_bytes, "bound_bytes": bound,
            "stages": {k: {"peak_rss_bytes": v, "over_model": v / model_bytes, "within_bound": v <= bound}
                       for k, v in stages.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(RUNS))
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "memory.json"))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for name, run_args in RUNS.items():
            if args.only in (None, name):
                results[name] = report(name, run(name, run_args, Path(tmp)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    ok = all(s["within_bound"] for r in results.values() for s in r["stages"].values())
    print(f"\nevery stage within the bound: {ok}  ({args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
