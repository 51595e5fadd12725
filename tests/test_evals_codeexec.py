"""The code-execution sandbox: opt-in only, limited, killed at its time limit."""
from __future__ import annotations

import os
import time

import pytest

from prunerep.evals import codeexec
from prunerep.evals.offline import load_humaneval


@pytest.fixture(scope="module")
def problem():
    return load_humaneval()[0]


def test_refuses_without_opt_in(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(codeexec.CodeExecutionRefused, match="allow_code_execution"):
        codeexec.run_program(f"open({str(marker)!r}, 'w').write('x')", allow=False)
    assert not marker.exists()
    # the lm-eval scoring hook refuses too unless the harness opted in
    doc = load_humaneval()[0]
    with pytest.raises(codeexec.CodeExecutionRefused):
        codeexec.humaneval_process_results(doc, [doc["canonical_solution"]])


def test_passes_a_correct_solution_and_fails_a_wrong_one(problem):
    ok = codeexec.run_program(codeexec.humaneval_program(problem, problem["canonical_solution"]),
                              allow=True, timeout_s=10)
    assert ok.status == "passed", ok.stderr_tail
    bad = codeexec.run_program(codeexec.humaneval_program(problem, "    return not True\n"),
                               allow=True, timeout_s=10)
    assert bad.status == "failed" and "AssertionError" in bad.stderr_tail
    with codeexec.execution_allowed(True):
        assert codeexec.humaneval_process_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
        assert codeexec.humaneval_process_results(problem, ["    return None\n"]) == {"pass@1": 0.0}


def test_kills_a_looping_program_at_its_time_limit():
    t0 = time.perf_counter()
    res = codeexec.run_program("import time\nwhile True:\n    time.sleep(0.01)\n", allow=True, timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert res.status == "timeout"
    assert 0.9 <= elapsed < 5.0
    with pytest.raises(ProcessLookupError):  # its whole process group is gone
        os.killpg(res.pid, 0)
    # a busy loop is stopped too (wall clock, or RLIMIT_CPU's SIGXCPU)
    busy = codeexec.run_program("while True:\n    pass\n", allow=True, timeout_s=1.0)
    assert busy.status == "timeout" and busy.seconds < 5.0


def test_limits_memory_and_blocks_destructive_calls(tmp_path):
    mem = codeexec.run_program("x = bytearray(600 * 1024 * 1024)\n", allow=True, timeout_s=10, memory_mb=256)
    assert mem.status == "failed" and "MemoryError" in mem.stderr_tail
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    res = codeexec.run_program(f"import os\nos.remove({str(victim)!r})\n", allow=True, timeout_s=10)
    assert res.status == "failed" and victim.exists()
