"""Probe cost, as ratios taken in one run (these machines are noisy; ratios travel).

  probe / floor        compare_to_reference (the pruned side of probe=all: forwards, logit lens,
                       every metric, the table) over the time of its floor   (target <= 1.3),
                       for each probe.kernel: eager, compiled (torch.compile) and fused (the
                       numba kernel of prunerep/probes/fused.py; on CUDA it is compiled). The floor is
                       the LM-head matmuls the logit lens cannot avoid, 2 sides x (lens rows) x d x V,
                       timed as the probe runs them (token_chunk row pairs, both sides in one matmul, into one buffer),
                       where the lens rows are every prompt position, teacher-forced step and
                       free-running step at every probed layer. It EXCLUDES the pruned model's own
                       forwards (prompt, teacher-forced, free-running decode with its per-step LM
                       head), the final norm, the metrics, the option subspace, the table and the
                       top-token table (probe.top_tokens: one more forward per prompt). Each
                       repetition times the probe and then its floor, back to back. Printed: the
                       least probe time over the least floor time (other jobs on the machine only
                       ever add time, so each least time is the least disturbed; the least of the
                       per-repetition ratios would not be: a disturbed floor lowers it), and the
                       median of the per-repetition ratios
  where the time goes  (--breakdown) exclusive wall time per stage of one probe run of the
                       fastest kernel run here (fused, else eager): metrics, lens, forwards...
  the machine          CPU model, cores, BLAS, torch / numba threads, printed beside the ratios
  peak extra memory    of probing a T-token prompt beyond a plain forward that returns the same
                       hidden states, for T = 256 .. 4096 (flat once the token chunk is full),
                       next to what a [layers x T x V] float32 tensor would take

    python benchmarks/bench_probes.py                      # embedded SmolLM2 + a Qwen2.5-7B-shaped head
    python benchmarks/bench_probes.py --skip-7b-head       # quicker
    python benchmarks/bench_probes.py --quick              # eager and fused, 2 repetitions, no 7B head, no memory curve
    python benchmarks/bench_probes.py --kernels fused      # one kernel
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prunerep import probes  # noqa: E402
from prunerep.probes import fused  # noqa: E402
from prunerep.results.store import atomic_write_json  # noqa: E402
from prunerep.model.anatomy import lens_buffer  # noqa: E402
from prunerep.model.load import load_model  # noqa: E402
from prunerep.model.placement import input_device as model_device  # noqa: E402
from prunerep.registry import compose  # noqa: E402

CACHE = os.environ.get("PRUNEREP_CACHE", os.path.expanduser("~/.cache/prunerep"))


def model_cfg(name: str, arch: dict | None = None, **over):
    overrides = [f"model={name}", *(f"model.{k}={v}" for k, v in over.items()),
                 *(f"model.arch.{k}={v}" for k, v in (arch or {}).items())]
    return OmegaConf.to_object(compose(*overrides).model)


def probe_plan(**over) -> probes.ProbePlan:
    """The plan of ``probe=all`` with these settings changed."""
    return probes.build_plan(OmegaConf.merge(compose("probe=all").probe, over))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def perturb_(model, scale=0.02, seed=0):
    """A stand-in for pruning: small relative noise on the decoder weights (not the head)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p) * p.std() * scale)


@torch.inference_mode()
def floor_seconds(model, rows: int, chunk: int) -> float:
    """The LM-head matmuls of `rows` lens rows per side, as the probe does them: a chunk of
    `chunk` row pairs, both sides in one matmul, into one reused buffer
    (prunerep.model.anatomy.lens_rows, lens_buffer)."""
    head = model.get_output_embeddings()
    device = model_device(model)
    h = torch.randn(2 * chunk, model.config.hidden_size, device=device, dtype=head.weight.dtype)
    out = lens_buffer(model, chunk, sides=2)
    torch.mm(h, head.weight.t(), out=out)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        torch.mm(h[:2 * n], head.weight.t(), out=out[:2 * n])
        done += n
    sync(device)
    return time.perf_counter() - t0


def lens_row_count(df) -> int:
    """Rows that went through the logit lens on ONE side: (context, prompt, layer, step) cells
    of the logit/probability spaces at sublayer block."""
    sel = df[(df["space"].isin(["logit", "probability"])) & (df["sublayer"] == "block")]
    per = sel.groupby(["context", "prompt_id", "layer"])["step"]
    n = 0
    for (ctx, _pid, _layer), steps in per:
        n += steps.max() + 1 if ctx != "prompt" else 0
    return int(n)


class Breakdown:
    """Exclusive wall time per stage: the probe's entry points wrapped by timers (a stage's time
    excludes the stages it calls)."""

    STAGES = (("metrics (vocabulary passes)", "prunerep.probes.metrics", "vocab_metrics"),
              ("logit lens (LM-head matmuls + final norm)", "prunerep.probes.stream", "lens_pair"),
              ("logit lens (LM-head matmuls + final norm)", "prunerep.probes.top_tokens", "lens_pair"),
              ("pruned forwards: prompt, teacher-forced, followed", "prunerep.probes.compare", "run_contexts"),
              ("pruned forwards: decode after parting", "prunerep.probes.contexts", "_decode"),
              ("embedding geometry", "prunerep.probes.metrics", "geometry"),
              ("option subspace", "prunerep.probes.metrics", "option_metrics"),
              ("table", "prunerep.probes.table", "Rows.frame"),
              ("top-token table (probe.top_tokens)", "prunerep.probes.compare", "top_tokens_table"))

    def __init__(self):
        self.times: dict[str, float] = {}
        self.stack: list[list] = []
        self.patched: list = []

    def __enter__(self):
        import importlib

        for label, module, attr in self.STAGES:
            try:
                owner = importlib.import_module(module)
            except ImportError:  # a stage this version does not have
                continue
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            if not hasattr(owner, name):
                continue
            fn = getattr(owner, name)
            self.patched.append((owner, name, fn))
            setattr(owner, name, self._timed(label, fn))
        return self

    def _timed(self, label, fn):
        def wrapper(*a, **k):
            self.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                start, inner = self.stack.pop()
                total = time.perf_counter() - start
                self.times[label] = self.times.get(label, 0.0) + total - inner
                if self.stack:
                    self.stack[-1][1] += total
        return wrapper

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self.patched):
            setattr(owner, name, fn)
        return False


def machine() -> dict:
    """What the ratios were measured on: the memory-bound metric passes and the compute-bound
    LM-head floor scale differently from one machine to the next."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "blas": blas.group(1) if blas else "unknown", "torch_threads": torch.get_num_threads(),
            "numba_threads": (min(torch.get_num_threads(), fused.numba.config.NUMBA_NUM_THREADS)
                              if fused.AVAILABLE else None),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "numba": fused.numba.__version__ if fused.AVAILABLE else None}


def time_probe(name: str, mcfg, plan, modes=("eager", "compiled", "fused"), repeat: int = 1,
               breakdown: bool = False) -> dict:
    """probe / floor with each metric kernel (probe.kernel; compiled beforehand), ``repeat``
    times each, the floor timed right after each probe run."""
    model, tok = load_model(mcfg, CACHE)
    device = model_device(model)
    ratios: dict[str, list] = {m: [] for m in modes}
    t_probe: dict[str, list] = {m: [] for m in modes}
    floors: dict[str, list] = {m: [] for m in modes}
    rows = None
    parts: dict = {}
    with tempfile.TemporaryDirectory() as d:
        ref = probes.dense_reference(model, tok, plan, d)
        perturb_(model)
        for mode in modes:
            cfg = dataclasses.replace(plan, kernel=mode)
            warm = dataclasses.replace(cfg, n_prompts=1)
            probes.compare_to_reference(model, tok, warm, probes.dense_reference(model, tok, warm, d))  # warm-up
        for _ in range(repeat):
            for mode in modes:
                cfg = dataclasses.replace(plan, kernel=mode)
                sync(device)
                t0 = time.perf_counter()
                df = probes.compare_to_reference(model, tok, cfg, ref).table
                sync(device)
                t = time.perf_counter() - t0
                if rows is None:
                    prompt_tokens = sum(len(p.ids) for p in ref.prompts)
                    n_lens_layers = df[(df["context"] == "prompt") & (df["space"] == "logit")]["layer"].nunique()
                    rows = lens_row_count(df) + n_lens_layers * prompt_tokens
                floor = floor_seconds(model, rows, plan.token_chunk)
                floors[mode].append(floor)
                t_probe[mode].append(t)
                ratios[mode].append(t / floor)
        if breakdown:
            kernel = "fused" if "fused" in modes else "eager"
            with Breakdown() as b:
                sync(device)
                t0 = time.perf_counter()
                probes.compare_to_reference(model, tok, dataclasses.replace(plan, kernel=kernel), ref)
                sync(device)
                total = time.perf_counter() - t0
            floor = floor_seconds(model, rows, plan.token_chunk)
            parts = {"kernel": kernel, "total_s": total, "floor_s": floor, "stages_s": dict(b.times),
                     "other_s": total - sum(b.times.values())}
    out = {"model": name, "device": str(device), "hidden": model.config.hidden_size,
           "vocab": model.config.vocab_size, "layers_probed": int(n_lens_layers), "lens_rows_per_side": rows,
           "floor_s": min(min(f) for f in floors.values()), "table_rows": len(df), "repeat": repeat,
           "torch_threads": torch.get_num_threads()}
    # the pruned side decodes only after its trajectory parts from the dense one
    tokens = df[(df["context"] == "free_running") & (df["space"] == "tokens")]
    out["free_running_steps"] = int((tokens["metric"] == "token_agree").sum())
    out["free_running_steps_on_dense_trajectory"] = int(tokens.loc[tokens["metric"] == "first_divergence", "value"].sum())
    for mode in modes:
        r = sorted(ratios[mode])
        out[f"probe_{mode}_s"] = min(t_probe[mode])
        out[f"probe_{mode}_over_floor"] = min(t_probe[mode]) / min(floors[mode])  # least time over least time
        out[f"probe_{mode}_over_floor_median"] = r[len(r) // 2]
        out[f"probe_{mode}_s_all"] = t_probe[mode]
        out[f"floor_{mode}_s_all"] = floors[mode]
        out[f"probe_{mode}_over_floor_all"] = ratios[mode]
    if parts:
        out["breakdown"] = parts
    del model
    return out


MEMORY_CHILD = r"""
import json, os, sys, threading, time, torch
sys.path.insert(0, {repo!r})
from omegaconf import OmegaConf
from prunerep import probes
from prunerep.model.load import load_model
from prunerep.registry import compose
mode, T, chunk, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

class Peak(threading.Thread):  # samples the resident set every 0.5 ms
    def __init__(self):
        super().__init__(daemon=True); self.peak = rss(); self.stop = False
    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss()); time.sleep(0.0005)

mcfg = OmegaConf.to_object(compose("model=tiny", "model.arch.num_hidden_layers=2").model)
model, tok = load_model(mcfg, cache)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, tok.vocab_size, (T,), generator=g)
with open(cache + "/p.jsonl", "w") as f:
    f.write(json.dumps({{"prompt": tok.decode(ids)}}) + "\n")
pc = probes.build_plan(OmegaConf.merge(compose("probe=all").probe, dict(n_prompts=1, contexts=["prompt"],
     prompts=cache + "/p.jsonl", max_prompt_tokens=T, token_chunk=chunk, metric_threads=1)))
ref = probes.dense_reference(model, tok, pc, cache)
x = torch.tensor([ref.prompts[0].ids])
before = rss(); mon = Peak(); mon.start()
with torch.inference_mode():
    if mode == "forward":
        out = model(x, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    else:
        probes.compare_to_reference(model, tok, pc, ref)
mon.stop = True; mon.join()
print(json.dumps({{"tokens": x.shape[1], "peak_mb": (mon.peak - before) / 2**20,
                  "layers": model.config.num_hidden_layers + 1, "vocab": model.config.vocab_size}}))
"""


def memory_curve(lengths, chunk: int) -> list[dict]:
    """Peak resident-set growth of probing vs of a plain forward that returns the same hidden
    states, each measured in a fresh process (glibc told to return freed blocks at once)."""
    code = MEMORY_CHILD.format(repo=str(REPO))
    env = {**os.environ, "PRUNEREP_CACHE": CACHE, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    for T in lengths:
        res = {}
        for mode in ("forward", "probe"):
            with tempfile.TemporaryDirectory() as d:
                out = subprocess.run([sys.executable, "-c", code, mode, str(T), str(chunk), d], capture_output=True,
                                     text=True, env=env)
                if out.returncode:
                    raise RuntimeError(out.stderr[-2000:])
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        full = res["probe"]["layers"] * res["probe"]["tokens"] * res["probe"]["vocab"] * 4 / 2**20
        rows.append({"tokens": res["probe"]["tokens"], "forward_growth_mb": res["forward"]["peak_mb"],
                     "probe_growth_mb": res["probe"]["peak_mb"],
                     "extra_mb": res["probe"]["peak_mb"] - res["forward"]["peak_mb"],
                     "layers_x_tokens_x_vocab_mb": full})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--skip-7b-head", action="store_true", help="only the embedded SmolLM2")
    ap.add_argument("--skip-smollm2", action="store_true", help="only the Qwen2.5-7B-shaped head")
    ap.add_argument("--kernels", default="eager,compiled,fused", help="the probe.kernel values to time")
    ap.add_argument("--repeat", type=int, default=3, help="probe + floor timings per mode (min and median printed)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each stage of one probe run (fused, else eager)")
    ap.add_argument("--lengths", default="256,1024,4096", help="prompt lengths of the memory curve ('' = none)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's intra-op threads for everything, probe and floor alike (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="eager and fused, 2 repetitions, with the breakdown, no 7B head, no memory curve")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "probes.json"))
    args = ap.parse_args()
    if args.quick:
        args.skip_7b_head, args.kernels, args.repeat, args.breakdown, args.lengths = True, "eager,fused", 2, True, ""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    modes = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    plan = probe_plan(n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens)
    results = {"torch_threads": torch.get_num_threads(), "machine": machine(), "speed": []}
    if not args.skip_smollm2:
        results["speed"].append(time_probe("smollm2", model_cfg("smollm2"), plan, modes, args.repeat, args.breakdown))
    if not args.skip_7b_head:
        # Qwen2.5-7B's hidden size and vocabulary (the LM head, where the probe's cost is), 2 blocks
        mcfg = model_cfg("qwen2.5-shape", arch=dict(num_hidden_layers=2, intermediate_size=1024), dtype="float32"
                         if not torch.cuda.is_available() else "bfloat16")
        results["speed"].append(time_probe("qwen2.5-7b-head (2 blocks)", mcfg,
                                           probe_plan(n_prompts=2, max_new_tokens=8), modes, args.repeat,
                                           args.breakdown))
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    results["memory"] = memory_curve(lengths, chunk=256) if lengths else []

    print("\nprobe bench: probe=all, pruned side (compare_to_reference) vs its LM-head floor")
    print("  floor = the LM-head matmuls of every lens row, both sides; it excludes the pruned forwards (and the")
    print("  free-running decode's own per-step LM head), the metrics, the options, the table and the top-token")
    print(f"  table. probe / floor: least probe time / least floor time of {args.repeat} repetitions (median of the")
    print("  per-repetition ratios); a busy machine only adds time;")
    print(f"  {results['torch_threads']} torch thread(s) for the probe and the floor alike")
    m = results["machine"]
    print(f"  machine: {m['cpu']}, {m['usable_cores']} of {m['cores']} cores, BLAS {m['blas']}, torch "
          f"{m['torch']} ({m['torch_threads']} threads), numba {m['numba']} ({m['numba_threads']} threads)"
          + (f", GPU {m['gpu']}" if m["gpu"] else ""))
    for r in results["speed"]:
        ratios = ", ".join(f"{m} {r[f'probe_{m}_over_floor']:.2f} ({r[f'probe_{m}_over_floor_median']:.2f})"
                           for m in modes)
        print(f"  {r['model']:28s} d={r['hidden']:5d} V={r['vocab']:6d} on {r['device']}: floor {r['floor_s']:.2f} s; "
              f"probe / floor: {ratios}   (target <= 1.3)")
        print(f"    free-running: the pruned side keeps the dense trajectory for "
              f"{r['free_running_steps_on_dense_trajectory']} of its {r['free_running_steps']} steps (read off the "
              f"teacher-forced forward; only the steps after a parting are decoded)")
        if "breakdown" in r:
            b = r["breakdown"]
            print(f"    where the time goes (one {b['kernel']} run, {b['total_s']:.2f} s; its floor {b['floor_s']:.2f} s):")
            for label, s in sorted(b["stages_s"].items(), key=lambda kv: -kv[1]):
                print(f"      {label:50s} {s:7.2f} s  {s / b['floor_s']:5.2f} x floor  {s / b['total_s']:4.0%} of the probe")
            print(f"      {'everything else':50s} {b['other_s']:7.2f} s  {b['other_s'] / b['floor_s']:5.2f} x floor  "
                  f"{b['other_s'] / b['total_s']:4.0%} of the probe")
    if results["memory"]:
        print("peak extra memory of probing one prompt (tiny model, V=49152, token_chunk=256):")
    for r in results["memory"]:
        print(f"  T={r['tokens']:5d}: probe +{r['probe_growth_mb']:7.1f} MB, forward +{r['forward_growth_mb']:7.1f} MB: "
              f"extra {r['extra_mb']:7.1f} MB "
              f"(a [layers x T x V] tensor would be {r['layers_x_tokens_x_vocab_mb']:8.1f} MB)")
    atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
