"""launcher=local_gpu: the points of a multirun at once, one worker process per device slot.

On this CPU machine the slots come from the launcher config (``hydra.launcher.devices=[0,1]``) and the
model stays on the CPU; what is checked is the scheduling (at most one point per slot, both slots used,
the next point on the freed slot), the pinning each worker saw (CUDA_VISIBLE_DEVICES and
$PRUNEREP_DEVICE_SLOT, reported by the worker process itself), the launcher's record, the dense
reference computed once under the cache locks, and failures named as in the other launchers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli import CLI_ENV
from conftest import CACHE_DIR

from prunerep.results.store import read_json
from prunerep.local_gpu import (RECORD_FILE, SLOT_ENV, NoDeviceSlots, resolve_slots, threads_per_point)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny", "model.device=cpu", "probe.n_prompts=1", "probe.max_new_tokens=4", "probe.max_prompt_tokens=32",
         "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled", "pruner=magnitude"]
TWO_SLOTS = ["launcher=local_gpu", "hydra.launcher.devices=[0,1]"]


def run_sweep(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m prunerep -m ...` in its own interpreter (the launcher starts its workers with the
    same sys.path: PYTHONPATH names the repository, where hydra_plugins/prunerep_launcher is)."""
    full = dict(os.environ, **CLI_ENV, PRUNEREP_OUTPUTS=str(tmp_path / "outputs"), HYDRA_FULL_ERROR="1")
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    full.pop("CUDA_VISIBLE_DEVICES", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "prunerep", "-m", *args], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=timeout)


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: read_json(p) for p in sorted(sweep.glob("*/summary.json"))}


def fresh_cache(tmp_path: Path) -> Path:
    """An empty cache but for the dequantised models of the shared one (the tokenizer's, linked in):
    the dense reference is what gets computed."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for d in Path(CACHE_DIR, "models").glob("*"):
        if d.is_dir():
            shutil.copytree(d, cache / "models" / d.name, copy_function=_link_or_copy)
    return cache


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that hold at one moment (each is [start, end))."""
    return max(sum(s <= t < e for s, e in intervals) for t, _ in intervals)


# --------------------------------------------------------------------------- the slots

def test_slots_come_from_the_config_then_cuda_visible_devices_then_the_gpu_count(monkeypatch):
    import prunerep.local_gpu as lg

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert resolve_slots([0, 1]) == ([0, 1], "hydra.launcher.devices")  # the config wins
    assert resolve_slots(None) == ([2, 3], "CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,0")  # CUDA stops at the first invalid index
    assert resolve_slots(None) == ([1], "CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(lg, "_cuda_device_count", lambda: 3)
    assert resolve_slots(None) == ([0, 1, 2], "torch.cuda.device_count()")

    monkeypatch.setattr(lg, "_cuda_device_count", lambda: 0)
    with pytest.raises(NoDeviceSlots, match="no GPU .*CUDA_VISIBLE_DEVICES is unset.*hydra.launcher.devices"):
        resolve_slots(None)
    for env in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        with pytest.raises(NoDeviceSlots, match="no GPU"):
            resolve_slots(None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d2b3c")
    with pytest.raises(NoDeviceSlots, match="not a device index"):
        resolve_slots(None)
    with pytest.raises(NoDeviceSlots, match="listed twice"):
        resolve_slots([0, 0])
    with pytest.raises(NoDeviceSlots, match="no GPU"):
        resolve_slots([])


def test_threads_per_point_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert threads_per_point(8) == 2 and threads_per_point(32) == 1 and threads_per_point(8, 5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_point(8) is None  # the user's setting stands


def test_the_profile_selects_the_slot_launcher():
    from hydra import compose, initialize_config_dir

    from prunerep.registry import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["launcher=local_gpu", "hydra.launcher.devices=[0,1]"],
                      return_hydra_config=True)
    assert cfg.model.device == "cuda"
    assert cfg.hydra.launcher._target_ == "hydra_plugins.prunerep_launcher.local_gpu.LocalGpuLauncher"
    assert list(cfg.hydra.launcher.devices) == [0, 1] and cfg.hydra.launcher.cpus_per_point is None


def test_no_gpu_and_no_device_list_stops_before_any_point(tmp_path):
    sweep = tmp_path / "multirun"
    p = run_sweep(tmp_path, *SMALL, "task=none", "launcher=local_gpu", "sparsity=0.3,0.5", f"hydra.sweep.dir={sweep}",
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunerep: error: launcher=local_gpu: no GPU"), p.stderr
    assert "hydra.launcher.devices" in lines[0]
    assert not sweep.exists()


# --------------------------------------------------------------------------- real sweeps on two slots

def test_four_points_on_two_slots(tmp_path):
    """4 points, 2 slots, a fresh cache: at most 2 run at once, each slot runs one point at a time and
    both are used, each worker saw its own slot, all complete, the dense reference is computed once."""
    cache = fresh_cache(tmp_path)
    sweep = tmp_path / "multirun"
    p = run_sweep(tmp_path, *SMALL, *TWO_SLOTS, "task=offline", "task.tasks=[arith_mc]", "task.limit=2",
                  "task.num_fewshot=0", "task.n_arith=4", "sparsity=0.2,0.3,0.4,0.5", f"cache_dir={cache}",
                  f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    s = summaries(sweep)
    assert len(s) == 4 and all(v["status"] == "complete" for v in s.values()), {k: v.get("error") for k, v in s.items()}

    record = read_json(sweep / RECORD_FILE)
    assert record["devices"] == [0, 1] and record["devices_from"] == "hydra.launcher.devices"
    points = record["points"]
    assert [q["job_num"] for q in points] == [0, 1, 2, 3]
    for q in points:
        run_dir = Path(q["run_dir"])
        assert q["status"] == "complete" and q["error"] is None and q["exit_code"] == 0, q
        assert q["slot"] in (0, 1) and q["start"] < q["end"]
        w = q["worker"]  # what the point's own process saw
        assert w["cuda_visible_devices"] == str(q["slot"]) and w[SLOT_ENV] == str(q["slot"]), q
        assert w["pid"] != os.getpid() and q["start"] <= w["start"] < w["end"] <= q["end"]
        summary = s[run_dir.name]
        assert str(summary["device_slot"]) == str(q["slot"])
    assert len({q["worker"]["pid"] for q in points}) == 4  # a process per point
    assert {q["slot"] for q in points} == {0, 1}
    for key in ("worker", None):  # the workers' own times, and the launcher's
        spans = [(q[key]["start"], q[key]["end"]) if key else (q["start"], q["end"]) for q in points]
        assert most_at_once(spans) == 2, spans  # in parallel, never more than the slots
        for slot in (0, 1):  # one point at a time on a slot; the next starts after the last ended
            mine = sorted((a, b) for (a, b), q in zip(spans, points) if q["slot"] == slot)
            assert all(a2 >= b1 for (_, b1), (a2, _) in zip(mine, mine[1:])), (slot, mine)
    # the third point starts on the slot the first finished point freed
    first_done = min(points[:2], key=lambda q: q["end"])
    assert points[2]["slot"] == first_done["slot"] and points[2]["start"] >= first_done["end"]

    logs = [f.read_text(errors="replace") for f in sorted(sweep.glob("*/prunerep.log"))]
    assert len(logs) == 4
    text = "\n".join(logs)
    assert text.count("prompts cached in") == 1 and text.count("loaded from cache") == 3, text[-4000:]
    assert text.count("dense scores computed") == 1 and text.count("dense scores from") == 3, text[-4000:]
    assert len(list((cache / "probes").glob("*/manifest.json"))) == 1
    assert len(list((cache / "evals").glob("*.json"))) == 1
    dense = {json.dumps(read_json(sweep / name / "evals.json")["tasks"]["arith_mc"]["dense"]) for name in s}
    assert len(dense) == 1


def test_a_bad_point_is_failed_and_named_the_others_complete(tmp_path):
    sweep = tmp_path / "multirun"
    p = run_sweep(tmp_path, *SMALL, *TWO_SLOTS, "task=none", "sparsity=0.3,1.5,0.5", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-4000:])
    by_sparsity = {str(v["sparsity"]): (name, v) for name, v in summaries(sweep).items()}
    assert set(by_sparsity) == {"0.3", "1.5", "0.5"}, p.stderr[-3000:]
    bad_name, bad = by_sparsity["1.5"]
    assert bad["status"] == "failed" and "outside [0, 1)" in bad["error"]
    assert by_sparsity["0.3"][1]["status"] == "complete" and by_sparsity["0.5"][1]["status"] == "complete"
    assert "1 of 3 point(s) failed" in p.stderr and str(sweep / bad_name) in p.stderr, p.stderr[-3000:]
    assert "outside [0, 1)" in p.stderr
    record = {Path(q["run_dir"]).name: q for q in read_json(sweep / RECORD_FILE)["points"]}
    assert record[bad_name]["status"] == "failed" and "outside [0, 1)" in record[bad_name]["error"]
    assert sorted(q["status"] for q in record.values()) == ["complete", "complete", "failed"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers' processes in /proc")
def test_stopping_the_sweep_stops_its_workers(tmp_path):
    """SIGTERM to the launching process (kill, `timeout`) while points run: the workers are stopped
    with it (not left running on their GPUs) and the record says which points were cancelled."""
    import signal
    import time

    sweep = tmp_path / "multirun"
    full = dict(os.environ, **CLI_ENV, PRUNEREP_OUTPUTS=str(tmp_path / "outputs"), HYDRA_FULL_ERROR="1")
    full["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prunerep", "-m", *SMALL, *TWO_SLOTS, "task=none",
                                 "probe.n_prompts=4", "probe.max_new_tokens=16", "sparsity=0.1,0.2,0.3",
                                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=full, stdout=log, stderr=log)
        try:
            t0 = time.time()
            while time.time() - t0 < 120:  # until both slots run a point
                rec = read_json(sweep / RECORD_FILE) if (sweep / RECORD_FILE).is_file() else None
                if rec and sum(q["state"] == "RUNNING" for q in rec["points"]) == 2:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError((tmp_path / "out.log").read_text()[-3000:])
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0
    rec = read_json(sweep / RECORD_FILE)
    states = sorted(q["state"] for q in rec["points"])
    assert states.count("CANCELLED") == 2 and rec["ended"] is not None, rec["points"]
    assert all(q["status"] in ("failed", "complete") for q in rec["points"] if q["state"] != "WAITING")

    def alive() -> list[str]:  # processes still working in this sweep (their command lines name it)
        found = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, ValueError, IndexError):
                continue
            if str(sweep) in cmd and not zombie:
                found.append(cmd)
        return found

    t0 = time.time()
    while alive() and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not alive(), alive()
