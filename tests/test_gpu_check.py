"""scripts/gpu_check.sh --cpu: the GPU check's dry run, every step on the CPU with tiny shapes, so that
the script a lent GPU machine runs once (15 minutes, no second try) is known to work up to the device."""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

from cli import CLI_ENV

from prunerep.results.store import read_json

REPO = Path(__file__).resolve().parents[1]
STEPS = ["1_pipeline_bf16", "2_probe_7b_shape", "3_local_gpu_sweep", "4_probe_bench", "5_peak_memory"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_gpu_check_cpu_dry_run(tmp_path):
    env = dict(os.environ, **CLI_ENV, TRANSFORMERS_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    d = read_json(tmp_path / "gpu_check.json")
    assert d["mode"] == "cpu" and list(d["steps"]) == STEPS
    for name, s in d["steps"].items():
        assert s["status"] in ("ok", "failed", "timeout", "skipped", "not_run"), (name, s["status"])
    assert d["env"]["torch"] and d["env"]["transformers"] and d["gpu"] is None
    assert (tmp_path / "gpu_check_logs.tar.gz").is_file()

    def why(name):
        return name, d["steps"][name].get("log_tail")

    one = d["steps"]["1_pipeline_bf16"]
    assert one["status"] == "ok" and one["rc"] == 0 and finite(one["wall_s"]), why("1_pipeline_bf16")
    n = one["numbers"]
    assert n["status"] == "complete" and n["loaded_model"]["dtype"] == "bfloat16"
    assert finite(n["story"]["p/kl"]) and n["story"]["p/kl"] > 0
    assert finite(n["probes"]["prompt/probability/kl@T=1"]) and n["probes"]["nonfinite_values"] == 0
    assert set(n["evals"]) == {"arith_gen", "arith_cloze"}, n["evals"]
    assert all(finite(t["dense"]) and finite(t["pruned"]) for t in n["evals"].values()), n["evals"]
    assert finite(n["peak_memory_mb"]["total"]["cpu_rss"])

    three = d["steps"]["3_local_gpu_sweep"]
    assert three["status"] == "ok" and three["rc"] == 0, why("3_local_gpu_sweep")
    t = three["numbers"]
    assert len(t["points"]) == 2 and all(v["status"] == "complete" for v in t["points"].values())
    assert t["devices"] == [0, 1] and t["slots_used"] == [0, 1] and t["workers_saw_their_slot"]
    assert 1 <= t["most_at_once"] <= 2
    assert all(finite(v["story"]["p/kl"]) for v in t["points"].values())

    # the others ran too here (on the GPU they may fail; their failure is recorded, not fatal)
    assert d["steps"]["2_probe_7b_shape"]["status"] == "ok", why("2_probe_7b_shape")
    assert d["steps"]["4_probe_bench"]["status"] in ("ok", "timeout"), why("4_probe_bench")
    assert d["steps"]["5_peak_memory"]["status"] == "ok"
