"""The pipeline's own promises, in process on a tiny random model: bookkeeping never changes a
result, and a pruner that misses its target fails the run."""
from __future__ import annotations

import json

import pytest

from conftest import CACHE_DIR
from prunerep import pipeline
from prunerep.cli import run_config
from prunerep.registry import compose

TINY = ("model=tiny", "task=none", "probe=none", "pruner=magnitude", "wandb.mode=disabled", "skip_completed=false",
        f"cache_dir={CACHE_DIR}")


def test_a_failed_index_write_does_not_flip_a_complete_run(tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "mark_completed", broken)
    summary = run_config(compose(*TINY), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == on_disk["status"] == "complete"
    assert any("completed-points index" in r.getMessage() for r in caplog.records)


def test_a_pruner_that_misses_its_target_fails_the_run(tmp_path, monkeypatch):
    from prunerep.compress.pruners.magnitude import Magnitude

    monkeypatch.setattr(Magnitude, "prune", lambda self, model, calib, settings: {"method": "magnitude"})
    with pytest.raises(pipeline.TargetMissed, match="achieved sparsity 0.0000 is 50.00 points from the target 0.5"):
        run_config(compose(*TINY), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "TargetMissed" in summary["error"]


def test_layer_drop_and_none_are_not_held_to_a_weight_target(tmp_path):
    for name in ("none", "layer_drop"):
        cfg = compose(*TINY[:3], f"pruner={name}", *TINY[4:], "sparsity=0.5")
        assert run_config(cfg, tmp_path / name)["status"] == "complete"


def test_the_index_lives_beside_the_results_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNEREP_OUTPUTS", raising=False)
    cfg = compose(*(o for o in TINY if not o.startswith("skip_completed")), "skip_completed=true")
    for d in ("cwd1", "cwd2"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "cwd1")
    first = run_config(cfg, tmp_path / "runs" / "a")
    assert first["status"] == "complete" and first.get("reused_from") is None
    assert (tmp_path / "runs" / "index" / f"{first['config_hash']}.json").is_file()
    assert not (tmp_path / "cwd1" / "outputs").exists()
    monkeypatch.chdir(tmp_path / "cwd2")
    second = run_config(cfg, tmp_path / "runs" / "b")
    assert second["reused_from"] == str((tmp_path / "runs" / "a").resolve())
