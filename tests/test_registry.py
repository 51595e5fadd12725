"""The registry is the package: the README's toy method, dropped in as one module and one YAML
file, is found, composes with its own typed settings and runs end to end.

The toy method is dropped into a copy of the package and its configs (``prunerep/`` and ``conf/``
under a temporary directory, put first on ``PYTHONPATH``), never into the source tree: the other
tests run at the same time in other processes (pytest-xdist, SLURM jobs) and scan the real package."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cli import CLI_ENV
from conftest import REPO


def readme_blocks() -> dict[str, str]:
    """``{target path: code}`` of every block marked ``<!-- toy-method: PATH -->`` in docs/extending.md."""
    text = (REPO / "docs" / "extending.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- toy-method: (\S+) -->\s*```\w+\n(.*?)```", text, re.S)}


@pytest.fixture
def toy_repo(tmp_path):
    """A copy of the package and its configs with the README's toy method dropped in."""
    blocks = readme_blocks()
    assert set(blocks) == {"prunerep/compress/pruners/column_norm.py", "conf/pruner/column_norm.yaml"}
    repo = tmp_path / "repo"
    for part in ("prunerep", "conf", "launchers"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, code in blocks.items():
        assert not (repo / rel).exists(), f"{rel} already exists in the package"
        (repo / rel).write_text(code)
    return repo


def run_in(repo, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` with the copy first on the import path (before the editable install)."""
    env = dict(os.environ, **CLI_ENV, PYTHONPATH=str(repo))
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_method_module_dropped_into_the_package_is_found(toy_repo):
    code = ("import json, prunerep; from prunerep.registry import discover; m = discover('pruner'); "
            "print(json.dumps({'file': prunerep.__file__, 'names': sorted(m), "
            "'settings': m['column_norm'].settings() if 'column_norm' in m else None}))")
    res = run_in(toy_repo, "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(toy_repo))  # the copy, not the source tree
    assert "column_norm" in found["names"] and found["settings"] == ["include", "exclude", "routers", "per_row"]
    assert not (REPO / "prunerep" / "compress" / "pruners" / "column_norm.py").exists()


def test_the_dropped_in_method_runs_end_to_end(toy_repo, tmp_path):
    res = run_in(toy_repo, "-m", "prunerep", "model=tiny", "task=none", "probe=none", "pruner=column_norm",
                 "pruner.per_row=false", "sparsity=0.6", "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}",
                 "skip_completed=false")
    assert res.returncode == 0, res.stderr[-3000:]
    pruning = json.loads((tmp_path / "run" / "pruning.json").read_text())
    assert pruning["method"] == {"method": "column_norm", "calibration": False}
    assert abs(pruning["achieved_sparsity"] - 0.6) < 1e-3
    bad = run_in(toy_repo, "-m", "prunerep", "pruner=column_norm", "pruner.blocksize=7", timeout=120)
    assert bad.returncode == 2
    assert "pruner.blocksize: the column_norm pruner has no setting 'blocksize'" in bad.stderr
