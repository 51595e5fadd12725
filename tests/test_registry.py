"""The registry is the package: the README's toy method, dropped in as one module and one YAML
file, is found, composes with its own typed settings and runs end to end."""
from __future__ import annotations

import json
import re

import pytest

from conftest import REPO
from cli import run_cli


def readme_blocks() -> dict[str, str]:
    """``{target path: code}`` of every block marked ``<!-- toy-method: PATH -->`` in the README."""
    text = (REPO / "README.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- toy-method: (\S+) -->\s*```\w+\n(.*?)```", text, re.S)}


@pytest.fixture
def toy_method():
    blocks = readme_blocks()
    assert set(blocks) == {"prunerep/pruners/column_norm.py", "conf/pruner/column_norm.yaml"}
    written = []
    try:
        for rel, code in blocks.items():
            path = REPO / rel
            assert not path.exists(), f"{rel} already exists; this test drops it in and removes it"
            path.write_text(code)
            written.append(path)
        yield
    finally:
        for path in written:
            path.unlink()


def test_a_method_module_dropped_into_the_package_is_found(toy_method):
    from prunerep.registry import discover

    methods = discover("pruner")
    assert "column_norm" in methods and methods["column_norm"].settings() == ["include", "exclude", "per_row"]


def test_the_dropped_in_method_runs_end_to_end(toy_method, tmp_path):
    res = run_cli("model=tiny", "task=none", "probe=none", "pruner=column_norm", "pruner.per_row=false",
                  "sparsity=0.6", "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}", "skip_completed=false",
                  timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pruning = json.loads((tmp_path / "run" / "pruning.json").read_text())
    assert pruning["method"] == {"method": "column_norm", "calibration": False}
    assert abs(pruning["achieved_sparsity"] - 0.6) < 1e-3
    bad = run_cli("pruner=column_norm", "pruner.blocksize=7", timeout=120)
    assert bad.returncode == 2
    assert "pruner.blocksize: the column_norm pruner has no setting 'blocksize'" in bad.stderr
