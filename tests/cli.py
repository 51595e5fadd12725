"""`python -m prunerep ARGS` for the tests, without paying its imports on every call.

Most CLI tests check one line and an exit code; as separate interpreters each paid ~6 s of imports
(torch, transformers, lm-eval, hydra) -- minutes over the suite. Here a forkserver process imports
``prunerep.cli`` and its dependencies once, and every call forks a fresh child from it: its
own process (Hydra's global state, logging, cwd, environment, exit code), the same entrypoint as
``python -m prunerep``. The forkserver starts with :data:`CLI_ENV` (some libraries read the
environment at import: ``HF_HUB_OFFLINE``); no torch work runs in it before it forks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import CACHE_DIR, REPO
from prunerep.registry import GROUPS, method_modules

CLI_ENV = {"PRUNEREP_CACHE": str(CACHE_DIR), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}

# the method modules too: each compose imports them (prunerep.registry.discover), and left to the
# children, the external pruner's compressed-tensors import alone cost each call ~1.8 s of its ~2 s
_PRELOAD = ["prunerep.cli", "prunerep.pipeline", "torch", "transformers", "hydra", "lm_eval",
            *(module for group in GROUPS for module in method_modules(group))]
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        saved = dict(os.environ)
        os.environ.update(CLI_ENV)
        try:  # the server is spawned now, with CLI_ENV in its environment
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _ctx = ctx
    return _ctx


def _child(args: list[str], cwd: str, env: dict, umask: int, out: str, err: str) -> None:
    """In the forked child: the environment, cwd, umask and fds of a fresh `python -m prunerep ARGS`."""
    import atexit
    import traceback

    os.umask(umask)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [str(REPO / "prunerep" / "__main__.py"), *args]
    from prunerep.cli import entrypoint

    code = 0
    try:
        entrypoint()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # a forked child skips them otherwise (logging, W&B shutdown)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cli(*args: str, timeout: int = 600, cwd: Path | str = REPO, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, -m, prunerep, *args], capture_output=True, text=True)``."""
    full_env = dict(os.environ, **CLI_ENV, **(env or {}))
    umask = os.umask(0o022)
    os.umask(umask)
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        p = _context().Process(target=_child, args=(list(args), str(cwd), full_env, umask, out, err))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([sys.executable, "-m", "prunerep", *args], timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", "prunerep", *args], p.exitcode,
                                           Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))
