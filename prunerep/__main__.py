"""Hydra entrypoint: ``python -m prunerep model=qwen2.5 pruner=wanda sparsity=0.5``.

Bad input fails fast with one line on stderr and exit code 2, and leaves nothing behind:
unknown config-group options and keys the chosen config does not have are caught here,
before Hydra composes anything; Hydra's own composition errors are turned into one line;
values (sparsity, paths, task names) are checked by the pipeline before the model loads.
In a multirun a bad point is recorded as failed in its own summary.json and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import time
import typing
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: the config groups are the folders of conf/ (model, pruner, quant, task, probe, launcher); those
#: whose options are typed methods (pruner, quant) are prunerep.registry.GROUPS
GROUPS = tuple(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))))
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    print(f"prunerep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _override(arg: str) -> tuple[str, str] | None:
    key, sep, value = arg.partition("=")
    return (key, value) if sep else None


def chosen_options(argv: list[str]) -> dict[str, list[str]]:
    """The option of every group this command runs: the default of conf/config.yaml, or the
    override's (every value of a sweep list); unknown ones fail with the close matches."""
    from omegaconf import OmegaConf

    chosen = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            chosen.update({k: [str(v)] for k, v in entry.items()})
    for arg in argv:
        kv = _override(arg)
        if kv is None or kv[0].lstrip("+~") not in GROUPS:
            continue
        key, value = kv[0].lstrip("+~"), kv[1]
        if value.startswith(("choice(", "glob(", "range(")):
            chosen[key] = []  # Hydra's sweep functions: Hydra checks those options itself
            continue
        options = group_options(key)
        chosen[key] = [c.strip() for c in value.split(",") if c.strip()]
        for choice in chosen[key]:
            if choice not in options:
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                fail(f"unknown {key} {choice!r}{hint} (available: {', '.join(options)})")
    return chosen


def _fields(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def check_override_keys(argv: list[str], chosen: dict[str, list[str]]) -> None:
    """``pruner=wanda pruner.blocksize=7`` (or ``quant=rtn quant.blocksize=7``) -> one line naming the
    key and the method: a key under a method group is checked against each chosen method's settings."""
    from prunerep.config import Config
    from prunerep.errors import ConfigError
    from prunerep.registry import GROUPS as METHOD_GROUPS, method_class

    for arg in argv:
        kv = _override(arg)
        if kv is None or kv[0].startswith("~"):
            continue
        key = kv[0].lstrip("+")
        parts = key.split(".")
        if parts[0] == "hydra" or key in GROUPS:
            continue
        if parts[0] in METHOD_GROUPS:
            if len(parts) < 2:
                continue
            for name in chosen.get(parts[0], []):
                try:
                    cls = method_class(parts[0], name)
                except ConfigError as e:
                    fail(str(e))
                if parts[1] not in _fields(cls):
                    fail(f"{parts[0]}.{parts[1]}: the {name} {parts[0]} has no setting {parts[1]!r} "
                         f"(its settings: {', '.join(cls.settings()) or 'none'})")
            continue
        node, where = Config, []
        for part in parts:
            fields = _fields(node)
            if part not in fields:
                scope = ".".join(where) or "the run"
                close = difflib.get_close_matches(part, list(fields), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join('.'.join([*where, c]) for c in close)}?" if close else ""
                fail(f"{key}: {scope} has no setting {part!r}{hint}")
            where.append(part)
            node = fields[part]
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # a value, a list or a free-form dict (model.arch, task.extra)


def check_run_dir(argv: list[str]) -> None:
    """An explicit ``hydra.run.dir`` that holds files prunerep did not write is refused: bad
    input there must never cost anything that was in it."""
    for arg in argv:
        kv = _override(arg)
        if kv is None or kv[0].lstrip("+") != "hydra.run.dir" or "${" in kv[1]:
            continue
        d = Path(kv[1]).expanduser()
        if d.is_dir() and any(d.iterdir()) and not ((d / ".hydra").is_dir() or (d / "summary.json").is_file()):
            fail(f"hydra.run.dir={kv[1]!r} is a non-empty directory that is not a prunerep run directory; "
                 f"choose a new or empty one")


_STARTED_AT = time.time()  # a coarse file-time resolution errs on the side of keeping a file


#: points of a multirun that failed in this process (the local launcher runs them all here;
#: a SLURM sweep reads them from each job's return value, see prunerep/launcher.py)
FAILED_POINTS: list[dict] = []


def _failed_point(run_dir: Path, error: BaseException) -> dict:
    point = {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": str(run_dir)}
    FAILED_POINTS.append(point)
    return point


class _JobStarted:
    """Set once Hydra has composed the config and handed it to the job (errors after that are
    the job's, not composition's)."""

    value = False


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from prunerep.errors import ConfigError, ModelUnavailable
    from prunerep.local_gpu import register_plugin
    from prunerep.registry import register_configs

    register_configs()
    register_plugin()  # launcher=local_gpu's Hydra launcher (entrypoint says so when it cannot be)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def main(cfg: DictConfig) -> None:
        from prunerep import logs
        from prunerep.pipeline import record_bad_input, run

        _JobStarted.value = True
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        sweep_dir = Path(str(hc.sweep.dir)) if multirun else None
        logs.configure(run_dir, verbose=bool(cfg.verbose))
        try:
            summary = run(cfg, run_dir, sweep_dir=sweep_dir)
        except (ConfigError, ModelUnavailable) as e:
            if multirun:  # recorded in the point's summary.json; the sweep goes on
                record_bad_input(cfg, run_dir, e)
                logging.getLogger("prunerep").error("point failed: %s", e)
                return _failed_point(run_dir, e)
            remove_what_this_invocation_wrote(run_dir, _STARTED_AT)
            fail(str(e))
        except Exception as e:
            if multirun:
                logging.getLogger("prunerep").exception("point failed (recorded in %s/summary.json)", run_dir)
                return _failed_point(run_dir, e)
            raise
        print(f"prunerep: {summary['status']}: results in {run_dir}", flush=True)
        return {"status": summary["status"], "run_dir": str(run_dir)}

    main()


def remove_what_this_invocation_wrote(run_dir: Path, since: float) -> None:
    """After bad input: remove the files written into the run directory since this invocation
    started (Hydra's .hydra/ configs and job log, anything the pipeline wrote before the check
    that failed), then the directories that this left empty. Nothing older is ever removed."""
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_symlink() or path.is_file():
                if path.lstat().st_mtime >= since:
                    path.unlink()
            elif path.is_dir():
                path.rmdir()  # only when empty
        except OSError:
            pass
    try:
        run_dir.rmdir()
    except OSError:
        pass


def entrypoint() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us; we print them as one line
    argv = sys.argv[1:]
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--shell-completion") or a.startswith(
            ("--cfg", "--info")) for a in argv):
        _run_hydra_cli()
        return
    chosen = chosen_options(argv)
    check_override_keys(argv, chosen)
    check_run_dir(argv)
    if "local_gpu" in chosen.get("launcher", []) and any(a in ("-m", "--multirun") for a in argv):
        from prunerep.local_gpu import register_plugin

        problem = register_plugin()
        if problem:
            fail(problem)
    _run_hydra_cli()
    if FAILED_POINTS:  # a local multirun ends like a SLURM one: non-zero, naming every failed point
        print(f"prunerep: {len(FAILED_POINTS)} point(s) failed (recorded in their summary.json; re-run the same "
              f"command to redo them):", file=sys.stderr)
        for p in FAILED_POINTS:
            print(f"  {p['run_dir']}: {p['error']}", file=sys.stderr)
        sys.exit(1)


def _run_hydra_cli() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from prunerep.launcher import JobsFailed

    try:
        _main()
    except JobsFailed as e:  # a SLURM sweep: every job ended, some points failed; the message names them
        print(f"prunerep: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (HydraException, OmegaConfBaseException) as e:
        if _JobStarted.value:
            raise
        fail(_one_line(e))


def _one_line(e: BaseException) -> str:
    """Hydra's message and the cause it wraps (``Value 'abc' could not be converted to Integer``),
    without OmegaConf's full_key/object_type detail lines."""
    parts = []
    while e is not None and len(parts) < 2:
        first = str(e).strip().split("\n")[0].strip()
        if first and first not in parts:
            parts.append(first)
        e = e.__cause__ or e.__context__
    return ": ".join(parts) or "bad configuration"


if __name__ == "__main__":
    entrypoint()
