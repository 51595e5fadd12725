"""Sweeps: config hashes, the completed-points index, reuse; and real local multiruns of the tiny model
(2 pruners x 2 sparsities), resumed after a point's results are lost."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from cli import run_cli
from omegaconf import OmegaConf

from prunerep.config import Config
from prunerep.results.index import (config_hash, find_completed, index_path, is_complete, mark_completed,
                            reuse_completed)
from prunerep.results.rundir import RunDirectory, verify
from prunerep.results.store import atomic_write_json, read_json

REPO = Path(__file__).resolve().parents[1]

# a tiny point: random-init 4-layer model, few prompts, few decoding steps, small calibration set
SMALL = ["model=tiny", "task=none", "probe.n_prompts=2", "probe.max_new_tokens=4", "probe.max_prompt_tokens=32",
         "calib.nsamples=4", "calib.seqlen=32", "wandb.mode=disabled"]


def cfg_of(**over):
    base = {"model": {"name": "tiny"}, "pruner": {"name": "wanda"}, "sparsity": 0.5, "cache_dir": "/tmp/a"}
    return OmegaConf.merge(OmegaConf.structured(Config), base, over)


# --------------------------------------------------------------------------- unit

def test_config_hash_ignores_volatile_keys_only():
    h = config_hash(cfg_of())
    assert h == config_hash(cfg_of(wandb={"mode": "online", "group": "g", "project": "other"}))
    assert h == config_hash(cfg_of(cache_dir="/elsewhere", skip_completed=False))
    assert h == config_hash(cfg_of(sparsity="0.5")) == config_hash(cfg_of(sparsity="0.50"))
    assert h != config_hash(cfg_of(sparsity=0.6))
    assert h != config_hash(cfg_of(sparsity="2:4"))
    assert h != config_hash(cfg_of(pruner={"name": "magnitude"}))
    assert h != config_hash(cfg_of(seed=1))
    assert h != config_hash(cfg_of(probe={"n_prompts": 3}))
    assert re.fullmatch("[0-9a-f]{16}", h), h


def _complete(run_dir: Path, cfg, status="complete"):
    """A run directory as a run leaves it: staged files moved into place, the manifest last."""
    with RunDirectory(run_dir).open() as rd:
        atomic_write_json(rd.staging / "pruning.json", {"achieved_sparsity": 0.5})
        (rd.staging / "model").mkdir()
        (rd.staging / "model" / "config.json").write_text("{}")
        atomic_write_json(rd.staging / "summary.json", {"status": status, "error": None, "config_hash": config_hash(cfg),
                                                        "run_dir": str(run_dir), "reused_from": None})
        rd.complete()
    (run_dir / "prunerep.log").write_text("log of the original run\n")


def test_index_find_mark_reuse(tmp_path):
    root = tmp_path / "outputs"
    cfg = cfg_of()
    a = tmp_path / "sweep1" / "p0"
    assert find_completed(config_hash(cfg), root) is None
    _complete(a, cfg)
    idx = mark_completed(config_hash(cfg), a, root)
    assert idx == index_path(config_hash(cfg), root) and idx.is_file()
    assert find_completed(config_hash(cfg), root) == a.resolve()
    assert find_completed(config_hash(cfg_of(sparsity=0.7)), root) is None

    b = tmp_path / "sweep2" / "p0"
    with RunDirectory(b).open() as rd:
        (b / "prunerep.log").write_text("new run's own log\n")
        summary = reuse_completed(a, rd, root)
    assert summary["reused_from"] == str(a.resolve()) and summary["run_dir"] == str(b.resolve())
    assert read_json(b / "summary.json") == json.loads(json.dumps(summary))
    assert read_json(b / "pruning.json") == read_json(a / "pruning.json")
    assert (b / "prunerep.log").read_text() == "new run's own log\n"  # per-run files are not copied
    assert (b / "model" / "config.json").read_text() == "{}" and verify(b) is None and is_complete(b)
    # the original stays first; when it disappears, the copy serves
    assert read_json(idx)["runs"][:2] == [str(a.resolve()), str(b.resolve())]
    import shutil

    shutil.rmtree(a)
    assert find_completed(config_hash(cfg), root) == b.resolve()
    with RunDirectory(tmp_path / "sweep3" / "p0").open() as rd:
        assert reuse_completed(b, rd, root)["reused_from"] == str(a.resolve())  # the origin is kept


def test_stale_and_failed_entries_are_ignored(tmp_path):
    root = tmp_path / "outputs"
    cfg = cfg_of()
    a = tmp_path / "s" / "p"
    _complete(a, cfg)
    mark_completed(config_hash(cfg), a, root)
    atomic_write_json(a / "summary.json", {"status": "failed", "error": "OOM", "config_hash": config_hash(cfg)})
    assert find_completed(config_hash(cfg), root) is None
    _complete(a, cfg)
    (a / "pruning.json").write_text("{}")  # a result file changed since: its manifest no longer holds
    assert find_completed(config_hash(cfg), root) is None and not is_complete(a)
    _complete(a, cfg)
    (a / "summary.json").unlink()
    assert find_completed(config_hash(cfg), root) is None and not is_complete(a)
    # a summary of another config in the listed dir does not count either
    _complete(a, cfg_of(seed=3))
    assert find_completed(config_hash(cfg), root) is None


def test_reuse_in_place_copies_nothing(tmp_path):
    cfg = cfg_of()
    a = tmp_path / "p"
    _complete(a, cfg)
    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir() if not p.name.startswith(".")}
    with RunDirectory(a).open() as rd:
        assert reuse_completed(a, rd, tmp_path / "outputs")["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir() if not p.name.startswith(".")} == before


# --------------------------------------------------------------------------- real local multiruns

def run_sweep(tmp_path: Path, sweep_dir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`python -m prunerep -m ...` in `tmp_path` (forked from the preloaded CLI server: tests/cli.py)."""
    return run_cli("-m", *SMALL, *args, f"hydra.sweep.dir={sweep_dir}", timeout=timeout, cwd=tmp_path,
                   env={"PRUNEREP_OUTPUTS": str(tmp_path / "outputs"), "HYDRA_FULL_ERROR": "1"})


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_json(p) for p in sorted(sweep_dir.glob("*/summary.json"))}


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep2x2")
    sweep = tmp / "multirun"
    t0 = time.time()
    p = run_sweep(tmp, sweep, "pruner=magnitude,wanda", "sparsity=0.3,0.5")
    return {"tmp": tmp, "sweep": sweep, "proc": p, "seconds": time.time() - t0}


def test_local_multirun_2x2(sweep_2x2):
    p, sweep = sweep_2x2["proc"], sweep_2x2["sweep"]
    assert p.returncode == 0, p.stderr[-4000:]
    s = summaries(sweep)
    assert len(s) == 4, sorted(s)
    points = {(v["pruner"], float(v["sparsity"])) for v in s.values()}
    assert points == {("magnitude", 0.3), ("magnitude", 0.5), ("wanda", 0.3), ("wanda", 0.5)}
    hashes = {v["config_hash"] for v in s.values()}
    assert len(hashes) == 4
    for name, v in s.items():
        assert v["status"] == "complete", (name, v.get("error"))
        assert v.get("reused_from") is None
        assert abs(v["achieved_sparsity"] - float(v["sparsity"])) < 0.02  # measured on the weights
        assert (sweep / name / "config.yaml").is_file() and (sweep / name / "pruning.json").is_file()
        # each completed point is in the index
        assert index_path(v["config_hash"], sweep_2x2["tmp"] / "outputs").is_file()


def test_resume_recomputes_only_the_lost_point(sweep_2x2):
    """Lose one point's results (as a job killed mid-run leaves it: no summary.json), re-run the same
    command into the same sweep dir: only that point is computed again."""
    tmp, sweep = sweep_2x2["tmp"], sweep_2x2["sweep"]
    assert sweep_2x2["proc"].returncode == 0
    before = summaries(sweep)
    victim = sorted(before)[1]
    for f in ("summary.json", "pruning.json", "probes.parquet", "probes_summary.json", "evals.json"):
        (sweep / victim / f).unlink(missing_ok=True)
    kept = {n: (sweep / n / "summary.json").read_bytes() for n in before if n != victim}
    mtimes = {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in kept}

    p = run_sweep(tmp, sweep, "pruner=magnitude,wanda", "sparsity=0.3,0.5")
    assert p.returncode == 0, p.stderr[-4000:]
    after = summaries(sweep)
    assert set(after) == set(before)
    assert after[victim]["status"] == "complete" and after[victim].get("reused_from") is None
    assert after[victim]["config_hash"] == before[victim]["config_hash"]
    assert after[victim]["achieved_sparsity"] == pytest.approx(before[victim]["achieved_sparsity"])
    for n, data in kept.items():  # untouched: neither recomputed nor rewritten
        assert (sweep / n / "summary.json").read_bytes() == data
        assert (sweep / n / "summary.json").stat().st_mtime_ns == mtimes[n]


def test_new_sweep_dir_reuses_completed_points(sweep_2x2):
    """The same points launched into a new sweep dir are copied from the index, not recomputed;
    a new point (sparsity 0.4) is computed."""
    tmp = sweep_2x2["tmp"]
    assert sweep_2x2["proc"].returncode == 0
    sweep2 = tmp / "multirun_again"
    p = run_sweep(tmp, sweep2, "pruner=magnitude", "sparsity=0.3,0.4")
    assert p.returncode == 0, p.stderr[-4000:]
    s = {float(v["sparsity"]): v for v in summaries(sweep2).values()}
    assert set(s) == {0.3, 0.4}
    assert all(v["status"] == "complete" for v in s.values())
    assert s[0.3]["reused_from"] and Path(s[0.3]["reused_from"]).parent == sweep_2x2["sweep"].resolve()
    assert s[0.4].get("reused_from") is None
    orig = read_json(Path(s[0.3]["reused_from"]) / "summary.json")
    assert s[0.3]["achieved_sparsity"] == orig["achieved_sparsity"]
    assert s[0.3]["config_hash"] == orig["config_hash"]
    # skip_completed=false recomputes
    sweep3 = tmp / "multirun_forced"
    p = run_sweep(tmp, sweep3, "pruner=magnitude", "sparsity=0.3", "skip_completed=false")
    assert p.returncode == 0, p.stderr[-4000:]
    (v,) = summaries(sweep3).values()
    assert v["status"] == "complete" and v.get("reused_from") is None


def test_a_failing_point_does_not_stop_the_sweep(tmp_path):
    """sparsity=1.5 is invalid: that point is recorded as failed, the others complete, and a re-run
    redoes only the failed point (which fails again) while the complete one is reused in place."""
    sweep = tmp_path / "multirun"
    p = run_sweep(tmp_path, sweep, "pruner=magnitude", "sparsity=0.3,1.5")
    assert p.returncode == 1 and "1 point(s) failed" in p.stderr, p.stderr[-4000:]
    s = {str(v["sparsity"]): (name, v) for name, v in summaries(sweep).items()}
    assert set(s) == {"0.3", "1.5"}, p.stderr[-3000:]
    (done_name, done), (failed_name, failed) = s["0.3"], s["1.5"]
    assert done["status"] == "complete"
    assert failed["status"] == "failed" and "sparsity" in failed["error"]

    kept = (sweep / done_name / "summary.json").read_bytes()
    mtime = (sweep / done_name / "summary.json").stat().st_mtime_ns
    atomic_write_json(sweep / failed_name / "summary.json", dict(failed, error="left by the first run"))
    p = run_sweep(tmp_path, sweep, "pruner=magnitude", "sparsity=0.3,1.5")
    assert p.returncode == 1, p.stderr[-4000:]
    log = p.stdout + p.stderr
    assert f"already complete (config {done['config_hash']})" in log, log[-3000:]
    assert f"already complete (config {failed['config_hash']})" not in log
    assert (sweep / done_name / "summary.json").read_bytes() == kept  # reused, neither recomputed nor rewritten
    assert (sweep / done_name / "summary.json").stat().st_mtime_ns == mtime
    again = read_json(sweep / failed_name / "summary.json")  # redone: the first run's summary is replaced
    assert again["status"] == "failed" and "sparsity" in again["error"]
    assert set(summaries(sweep)) == {done_name, failed_name}


def test_results_are_readable_by_collaborators_and_synced(tmp_path):
    """Atomic writes used to leave results 0600 (mkstemp): now the umask decides, as for any file."""
    import stat

    from prunerep.results.store import atomic_write_json, atomic_write_with

    old = os.umask(0o022)
    try:
        a = atomic_write_json(tmp_path / "a.json", {"x": 1})
        b = atomic_write_with(tmp_path / "b.bin", lambda p: p.write_bytes(b"\0" * 10))
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o644
    assert stat.S_IMODE(b.stat().st_mode) == 0o644
