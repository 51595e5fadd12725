"""Gathers what scripts/gpu_check.sh's steps left into ONE JSON (standard library only, so that it
runs whatever else is broken). Called after every step, so a check cut short still leaves a JSON.

    python3 scripts/gpu_check_collect.py WORK_DIR OUT_JSON MODE

WORK_DIR holds ``env.json`` (the interpreter's versions and GPU), ``steps.tsv`` (one line per step
run: name, exit code, wall seconds, time limit; ``install`` too), ``logs/<step>.log`` and each step's
output: ``step1`` (a run dir), ``step2`` (a run dir), ``step3`` (a sweep dir), ``bench.json``."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

#: every step of the check, in order (the JSON has each, run or not)
STEPS = ("1_pipeline_bf16", "2_probe_7b_shape", "3_local_gpu_sweep", "4_probe_bench", "5_peak_memory")
#: probes_summary.json keys worth reading off a GPU (final-layer numbers)
PROBE_KEYS = ("final_layer", "n_prompts", "n_rows", "nonfinite_values", "prompt/probability/kl@T=1",
              "prompt/probability/kl_est@T=1", "prompt/probability/top1_agree", "teacher_forced/probability/kl@T=1",
              "free_running/probability/kl@T=1", "error_accumulation/kl@T=1", "free_running/tokens/token_agree",
              "prompt/embedding/one_minus_cos", "prompt/logit/one_minus_cos")


def read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def log_tail(work: Path, name: str, lines: int) -> list[str]:
    try:
        text = (work / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return []
    out = [ln.rstrip()[-400:] for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return out[-lines:]


def peak_memory(summary: dict | None) -> dict | None:
    """peak_memory_mb: the per-stage values when the pipeline records them
    (``peak_memory_mb["stages"][stage] = {"cpu_rss", "cuda"}``), and the totals."""
    if not isinstance(summary, dict) or not isinstance(summary.get("peak_memory_mb"), dict):
        return None
    pm = summary["peak_memory_mb"]
    out = {"total": {k: v for k, v in pm.items() if k != "stages"}}
    if isinstance(pm.get("stages"), dict):
        out["stages"] = pm["stages"]
    return out


def run_numbers(run_dir: Path) -> dict:
    """The numbers of one run directory (the pipeline's summary, probes summary and evals)."""
    s = read_json(run_dir / "summary.json")
    out: dict = {"run_dir": str(run_dir), "summary_found": isinstance(s, dict)}
    if not isinstance(s, dict):
        return out
    for k in ("status", "error", "achieved_sparsity", "timings_s", "loaded_model", "story", "device_slot"):
        if k in s:
            out[k] = s[k]
    out["peak_memory_mb"] = peak_memory(s)
    ps = read_json(run_dir / "probes_summary.json")
    if isinstance(ps, dict):
        out["probes"] = {k: ps[k] for k in PROBE_KEYS if k in ps}
    ev = read_json(run_dir / "evals.json")
    if isinstance(ev, dict) and isinstance(ev.get("tasks"), dict):
        out["evals"] = {name: {k: t.get(k) for k in ("type", "metric", "dense", "pruned", "n", "chance")}
                        for name, t in ev["tasks"].items() if isinstance(t, dict)}
    return out


def sweep_numbers(sweep: Path) -> dict:
    record = read_json(sweep / "local_gpu_slots.json")
    points = {}
    for p in sorted(sweep.glob("*/summary.json")):
        points[p.parent.name] = run_numbers(p.parent)
    out: dict = {"sweep_dir": str(sweep), "points": points, "record_found": isinstance(record, dict)}
    if isinstance(record, dict):
        pts = record.get("points") or []
        out["devices"] = record.get("devices")
        out["devices_from"] = record.get("devices_from")
        out["slots"] = [{k: q.get(k) for k in ("job_num", "slot", "status", "exit_code", "error", "start", "end",
                                                 "worker")} for q in pts]
        spans = [(q["start"], q["end"]) for q in pts if q.get("start") and q.get("end")]
        out["most_at_once"] = max((sum(s <= t < e for s, e in spans) for t, _ in spans), default=0)
        out["slots_used"] = sorted({q.get("slot") for q in pts if q.get("slot") is not None})
        out["workers_saw_their_slot"] = all(
            (q.get("worker") or {}).get("cuda_visible_devices") == str(q.get("slot")) for q in pts) and bool(pts)
    return out


def main() -> None:
    work, out_path, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    env = read_json(work / "env.json") or {}
    ran: dict[str, dict] = {}
    try:
        for line in (work / "steps.tsv").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                ran[parts[0]] = {"rc": int(parts[1]), "wall_s": float(parts[2]), "limit_s": float(parts[3]),
                                 "command": parts[4] if len(parts) > 4 else None}
    except OSError:
        pass

    def status(name: str, ok: bool) -> dict:
        r = ran.get(name)
        if r is None:
            return {"status": "not_run"}
        if r["rc"] == 97:  # the script's code for a step it skipped (the reason is in the log)
            st = "skipped"
        elif r["rc"] in (124, 137) and r["wall_s"] >= r["limit_s"] - 1:
            st = "timeout"
        else:
            st = "ok" if r["rc"] == 0 and ok else "failed"
        d = {"status": st, **r}
        d["log_tail"] = log_tail(work, name, 8 if st == "ok" else 40)
        return d

    steps: dict[str, dict] = {}
    n1 = run_numbers(work / "step1")
    steps["1_pipeline_bf16"] = {**status("1_pipeline_bf16", n1.get("status") == "complete" and bool(n1.get("evals"))),
                                "numbers": n1}
    n2 = run_numbers(work / "step2")
    steps["2_probe_7b_shape"] = {**status("2_probe_7b_shape", n2.get("status") == "complete"), "numbers": n2}
    n3 = sweep_numbers(work / "step3")
    ok3 = (n3.get("record_found") and len(n3["points"]) == 2
           and all(p.get("status") == "complete" for p in n3["points"].values()) and n3.get("workers_saw_their_slot"))
    steps["3_local_gpu_sweep"] = {**status("3_local_gpu_sweep", bool(ok3)), "numbers": n3}
    bench = read_json(work / "bench.json")
    nb: dict = {"found": isinstance(bench, dict)}
    if isinstance(bench, dict):
        nb.update(bench)
        nb["ratios"] = {m: {"probe_over_floor": r.get(f"probe_{m}_over_floor"),
                            "median": r.get(f"probe_{m}_over_floor_median"), "probe_s": r.get(f"probe_{m}_s"),
                            "floor_s": r.get("floor_s")}
                        for m, r in (bench.get("modes") or {}).items() if isinstance(r, dict)}
    steps["4_probe_bench"] = {**status("4_probe_bench", bool(nb.get("ratios"))), "numbers": nb}
    mem = {"1_pipeline_bf16": n1.get("peak_memory_mb"), "2_probe_7b_shape": n2.get("peak_memory_mb"),
           "3_local_gpu_sweep": {name: p.get("peak_memory_mb") for name, p in n3.get("points", {}).items()}}
    found = any(v for v in (mem["1_pipeline_bf16"], mem["2_probe_7b_shape"])) or any(mem["3_local_gpu_sweep"].values())
    steps["5_peak_memory"] = {"status": "ok" if found else "failed", "numbers": mem,
                              "per_stage": any(isinstance(v, dict) and "stages" in v for v in
                                               [mem["1_pipeline_bf16"], mem["2_probe_7b_shape"],
                                                *mem["3_local_gpu_sweep"].values()])}
    assert tuple(steps) == STEPS

    install = ran.get("install")
    doc = {
        "mode": mode, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "work_dir": str(work),
        "gpu": env.get("gpu"), "env": env,
        "install": ({"status": "ok" if install["rc"] == 0 else "failed", **install,
                     "log_tail": log_tail(work, "install", 5 if install["rc"] == 0 else 40)}
                    if install else {"status": "not_run" if mode != "cpu" else "skipped (--cpu: the packages are here)"}),
        "steps": steps,
        "ok": [n for n, s in steps.items() if s["status"] == "ok"],
        "not_ok": [n for n, s in steps.items() if s["status"] != "ok"],
        "wall_s": sum(r["wall_s"] for r in ran.values()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
