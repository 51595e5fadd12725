"""Run model-written code: only on opt-in, only in a limited subprocess.

Policy: nothing runs unless the caller passes ``allow=True`` (the pipeline does so only
with ``task.allow_code_execution=true``); otherwise :class:`CodeExecutionRefused` is raised.

Each program runs as ``python -I -S <file>`` in a fresh temporary directory, in a NEW
PROCESS GROUP (session), with stdin closed, a minimal environment, and resource limits set
in the child before exec: ``RLIMIT_AS`` (address space, ``memory_mb``), ``RLIMIT_CPU``
(``timeout_s`` rounded up, +1), ``RLIMIT_FSIZE`` (16 MiB) and ``RLIMIT_CORE`` (0). The
wall-clock ``timeout_s`` is enforced by the parent, which kills the whole process group with
SIGKILL. A short prelude disables the obvious destructive calls (process spawning, file
removal, sockets). This limits accidents by a buggy completion; it is NOT a security
boundary against hostile code -- run untrusted models in a container.
"""
from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class CodeExecutionRefused(RuntimeError):
    """Code execution was requested without the user's opt-in."""


REFUSAL = ("code execution is disabled: task.allow_code_execution=false (set it to true to run "
           "model-written code in a limited subprocess)")

_PRELUDE = '''\
import builtins, os, shutil, socket, subprocess
def _blocked(*a, **k):
    raise PermissionError("blocked by the prunerep sandbox")
for _m, _names in ((os, ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir",
                          "removedirs", "rename", "renames", "truncate", "putenv", "chmod", "chown",
                          "setuid", "execv", "execve", "execvp", "spawnv", "popen")),
                   (shutil, ("rmtree", "move", "chown")),
                   (subprocess, ("Popen", "run", "call", "check_call", "check_output")),
                   (socket, ("socket", "create_connection"))):
    for _n in _names:
        if hasattr(_m, _n):
            setattr(_m, _n, _blocked)
del _m, _names, _n
'''


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    pid: int  # also the id of the process group that was killed on timeout
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(timeout_s: float, memory_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        mem = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(math.ceil(timeout_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source: str, *, allow: bool, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``source`` (a complete Python program) in the sandbox; exit status 0 means passed.

    Raises :class:`CodeExecutionRefused` unless ``allow`` is true."""
    if not allow:
        raise CodeExecutionRefused(REFUSAL)
    with tempfile.TemporaryDirectory(prefix="prunerep-exec-") as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(_PRELUDE + "\n" + source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(prog)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_limits(timeout_s, memory_mb), close_fds=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
            # RLIMIT_CPU delivers SIGXCPU: the program ran out of time, report it as such
            if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
                status = "timeout"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            _, err = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - t0
    return ExecResult(status, proc.returncode, seconds, proc.pid, (err or b"").decode("utf-8", "replace")[-2000:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: pgid == pid
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- HumanEval

# set by the harness for the duration of an opted-in evaluation (see `execution_allowed`)
_ALLOWED = False


class execution_allowed:
    """``with execution_allowed(True): ...`` -- the opt-in seen by the lm-eval scoring hook,
    which lm-eval calls with ``(doc, results)`` only."""

    def __init__(self, allow: bool):
        self.allow = bool(allow)

    def __enter__(self):
        global _ALLOWED
        self._prev, _ALLOWED = _ALLOWED, self.allow
        return self

    def __exit__(self, *exc):
        global _ALLOWED
        _ALLOWED = self._prev
        return False


def humaneval_program(doc: dict, completion: str) -> str:
    """The program whose exit status is the pass/fail of a HumanEval completion."""
    return (doc["prompt"] + completion + "\n\n" + doc["test"] + "\n\n"
            + f"check({doc['entry_point']})\n")


def humaneval_process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` hook of the offline ``humaneval`` task (pass@1, greedy)."""
    res = run_program(humaneval_program(doc, results[0]), allow=_ALLOWED,
                      timeout_s=float(doc.get("timeout_s", 5.0)), memory_mb=int(doc.get("memory_mb", 1024)))
    return {"pass@1": 1.0 if res.passed else 0.0}
