"""The pins of the sweep machinery: resilient_launch matches the installed hydra-submitit-launcher,
and the completed-points index is locked across processes (a dead holder blocks nobody)."""
from __future__ import annotations

import logging
import multiprocessing
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from prunerep.results import index
from prunerep.results.index import config_hash, index_path, mark_completed
from prunerep.results.store import read_json
from prunerep.launcher import ADAPTED_FROM_LAUNCH_SHA256, ADAPTED_FROM_VERSION

REPO = Path(__file__).resolve().parents[1]
CFG = {"model": {"name": "tiny"}, "pruner": {"name": "wanda"}, "sparsity": 0.5}


# --------------------------------------------------------------------------- the plugin pin

def test_installed_plugin_launch_is_the_one_resilient_launch_was_adapted_from():
    # a fresh interpreter: in this one, install_resilient_launch may have replaced the stock launch
    code = ("import hashlib, inspect\n"
            "from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher\n"
            "print(hashlib.sha256(inspect.getsource(BaseSubmititLauncher.launch).encode()).hexdigest())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ADAPTED_FROM_LAUNCH_SHA256, (
        "hydra-submitit-launcher's BaseSubmititLauncher.launch changed: re-adapt resilient_launch "
        "(prunerep/launcher.py) to it, then update ADAPTED_FROM_VERSION, ADAPTED_FROM_LAUNCH_SHA256 "
        "and the pin in pyproject.toml")


def test_installed_plugin_version_is_the_pinned_one():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hydra-submitit-launcher=={ADAPTED_FROM_VERSION}" in deps
    assert version("hydra-submitit-launcher") == ADAPTED_FROM_VERSION


# --------------------------------------------------------------------------- the index lock

def _mark_many(root: str, run_dirs: list[str], start) -> None:
    start.wait()
    for d in run_dirs:
        mark_completed(config_hash(CFG), d, root)


def test_index_updates_from_concurrent_processes_are_all_kept(tmp_path):
    """Processes recording different run dirs of one config at once: every dir ends up in the entry
    (an unlocked read-modify-write loses some)."""
    n_procs, per_proc = 4, 25
    dirs = [[tmp_path / f"sweep{i}" / f"p{j}" for j in range(per_proc)] for i in range(n_procs)]
    for d in sum(dirs, []):
        d.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n_procs)
    procs = [ctx.Process(target=_mark_many, args=(str(tmp_path / "outputs"), [str(d) for d in ds], start))
             for ds in dirs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * n_procs
    runs = read_json(index_path(config_hash(CFG), tmp_path / "outputs"))["runs"]
    assert sorted(runs) == sorted(str(d.resolve()) for d in sum(dirs, []))


def _hold_lock(lock_file: Path) -> subprocess.Popen:
    """A process that takes the entry's lock, says so on stdout, and sleeps holding it."""
    code = ("import sys, time\nfrom filelock import FileLock\n"
            "lock = FileLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _unlocked_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "without its lock" in r.getMessage()]


def test_a_held_lock_times_out_into_an_unlocked_update(tmp_path, monkeypatch, caplog):
    root, run_dir = tmp_path / "outputs", tmp_path / "s" / "p"
    run_dir.mkdir(parents=True)
    entry = index_path(config_hash(CFG), root)
    entry.parent.mkdir(parents=True)
    holder = _hold_lock(entry.with_name(f"{entry.name}.lock"))
    try:
        monkeypatch.setattr(index, "LOCK_TIMEOUT_S", 0.2)
        with caplog.at_level(logging.WARNING, logger="prunerep.index"):
            assert mark_completed(config_hash(CFG), run_dir, root) == entry
    finally:
        holder.kill()
        holder.communicate()
    assert len(_unlocked_warnings(caplog)) == 1
    assert read_json(entry)["runs"] == [str(run_dir.resolve())]


def test_a_lock_file_left_by_a_killed_holder_blocks_nobody(tmp_path, monkeypatch, caplog):
    root, run_dir = tmp_path / "outputs", tmp_path / "s" / "p"
    run_dir.mkdir(parents=True)
    entry = index_path(config_hash(CFG), root)
    entry.parent.mkdir(parents=True)
    lock_file = entry.with_name(f"{entry.name}.lock")
    holder = _hold_lock(lock_file)
    holder.kill()  # SIGKILL: no clean-up of its own; the OS drops its lock
    holder.communicate()
    assert lock_file.exists()
    monkeypatch.setattr(index, "LOCK_TIMEOUT_S", 5.0)  # a blocked acquire would fall back and warn
    with caplog.at_level(logging.WARNING, logger="prunerep.index"):
        mark_completed(config_hash(CFG), run_dir, root)
    assert _unlocked_warnings(caplog) == []
    assert read_json(entry)["runs"] == [str(run_dir.resolve())]
