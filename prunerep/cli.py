"""The command line: ``python -m prunerep [overrides]`` runs one point, ``-m`` a sweep.

Bad input is one line on stderr and exit code 2, found before anything is written:

1. unknown config-group options and keys the chosen config does not have, from the arguments
   alone (:func:`chosen_options`, :func:`check_override_keys`);
2. the config is composed with Hydra and every value resolved (a bad interpolation, a deleted
   key, a value of the wrong type: one line);
3. a single run: the typed run is built and checked against the files it names
   (:mod:`prunerep.spec`, :mod:`prunerep.preflight`) *before* its directory is created; the
   directory is then taken (:class:`~prunerep.results.rundir.RunDirectory`: refused when it is a
   file, a directory prunerep did not create, unwritable or in use by another run). prunerep
   creates the directory itself; Hydra runs no job for a single run;
4. a sweep: ``hydra.sweep.dir`` is resolved once, checked and taken the same way before Hydra
   launches a point; each point then runs in its own run directory, and a bad point is recorded
   as failed in its summary.json while the sweep goes on. The command ends non-zero, naming every
   failed point.

Nothing is deleted to clean up after bad input: nothing was written.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import hydra
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from prunerep import logs, pipeline, preflight, spec as run_spec
from prunerep.config import Config
from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.launcher import JobsFailed
from prunerep.local_gpu import NoDeviceSlots, register_plugin, resolve_slots
from prunerep.registry import CONF_DIR, GROUPS as METHOD_GROUPS, config_groups, method_class, register_configs
from prunerep.results.rundir import RunDirectory, SweepDirectory
from prunerep.results.schema import failure_summary

log = logging.getLogger("prunerep")

EXIT_BAD_INPUT = 2
#: Hydra's own commands (help, the composed config, shell completion): handed to Hydra as they are
HYDRA_COMMANDS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc")


class BadInput(Exception):
    """One line for the user, exit code 2."""


def fail(message: str) -> typing.NoReturn:
    print(f"prunerep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------- the arguments alone

def _override(arg: str) -> tuple[str, str] | None:
    key, sep, value = arg.partition("=")
    return (key, value) if sep else None


def chosen_options(overrides: list[str]) -> dict[str, list[str]]:
    """The option of every group this command runs: the default of conf/config.yaml, or the
    override's (every value of a sweep list); unknown ones fail with the close matches."""
    groups = config_groups()
    chosen = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            chosen.update({k: [str(v)] for k, v in entry.items()})
    for arg in overrides:
        kv = _override(arg)
        if kv is None or kv[0].lstrip("+~") not in groups:
            continue
        key, value = kv[0].lstrip("+~"), kv[1]
        if value.startswith(("choice(", "glob(", "range(")):
            chosen[key] = []  # Hydra's sweep functions: Hydra checks those options itself
            continue
        chosen[key] = [c.strip() for c in value.split(",") if c.strip()]
        for choice in chosen[key]:
            if choice not in groups[key]:
                close = difflib.get_close_matches(choice, groups[key], n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise BadInput(f"unknown {key} {choice!r}{hint} (available: {', '.join(groups[key])})")
    return chosen


def _fields(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def check_override_keys(overrides: list[str], chosen: dict[str, list[str]]) -> None:
    """``pruner=wanda pruner.blocksize=7`` (or ``quant=rtn quant.blocksize=7``) -> one line naming the
    key and the method: a key under a method group is checked against each chosen method's settings."""
    groups = config_groups()
    for arg in overrides:
        kv = _override(arg)
        if kv is None or kv[0].startswith("~"):
            continue
        key = kv[0].lstrip("+")
        parts = key.split(".")
        if parts[0] == "hydra" or key in groups:
            continue
        if parts[0] in METHOD_GROUPS:
            if len(parts) < 2:
                continue
            for name in chosen.get(parts[0], []):
                try:
                    cls = method_class(parts[0], name)
                except ConfigError as e:
                    raise BadInput(str(e)) from None
                if parts[1] not in _fields(cls):
                    raise BadInput(f"{parts[0]}.{parts[1]}: the {name} {parts[0]} has no setting {parts[1]!r} "
                                   f"(its settings: {', '.join(cls.settings()) or 'none'})")
            continue
        node, where = Config, []
        for part in parts:
            fields = _fields(node)
            if part not in fields:
                scope = ".".join(where) or "the run"
                close = difflib.get_close_matches(part, list(fields), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join('.'.join([*where, c]) for c in close)}?" if close else ""
                raise BadInput(f"{key}: {scope} has no setting {part!r}{hint}")
            where.append(part)
            node = fields[part]
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # a value, a list or a free-form dict (model.arch, task.extra)


def one_line(e: BaseException) -> str:
    """Hydra's or OmegaConf's message and the cause it wraps (``Value 'abc' could not be converted
    to Integer``), without OmegaConf's full_key/object_type detail lines."""
    if isinstance(e, MissingMandatoryValue) and getattr(e, "full_key", None):
        return f"{e.full_key} has no value (was it removed with ~?)"
    parts: list[str] = []
    while e is not None and len(parts) < 2:
        first = str(e).strip().split("\n")[0].strip()
        if first and first not in parts:
            parts.append(first)
        e = e.__cause__ or e.__context__
    return ": ".join(parts) or "bad configuration"


# --------------------------------------------------------------------------- composition

@dataclasses.dataclass
class Command:
    overrides: list[str]
    multirun: bool
    config_name: str = "config"


def parse(argv: list[str]) -> Command:
    """Hydra's own argument parser, so that ``-m``, ``--config-dir`` and ``--config-name`` mean what
    they mean to Hydra; ``--config-dir`` becomes a search path of the composition."""
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise BadInput(f"cannot parse the arguments {' '.join(argv)!r} (python -m prunerep --help)") from None
    if args.config_path is not None or args.experimental_rerun is not None:
        raise BadInput("--config-path and --experimental-rerun are not supported; use --config-dir")
    overrides = list(args.overrides)
    if args.config_dir is not None:
        config_dir = Path(args.config_dir).expanduser().absolute()
        if not config_dir.is_dir():
            raise BadInput(f"--config-dir {args.config_dir!r}: no such directory")
        overrides.append(f"hydra.searchpath=[{_quoted('file://' + str(config_dir))}]")
    return Command(overrides=overrides, multirun=bool(args.multirun), config_name=args.config_name or "config")


def _quoted(value: str) -> str:
    """``value`` as one quoted override value (paths with spaces, commas, ``=``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(command: Command) -> DictConfig:
    """The full config (``hydra`` node included) as Hydra composes it for this command, every value
    of the task's config resolved once so that a bad interpolation is one line here."""
    register_configs()
    setup_globals()  # Hydra's resolvers: ${now:...}, ${hydra:...}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), job_name="prunerep", version_base="1.3"):
            mode = RunMode.MULTIRUN if command.multirun else RunMode.RUN
            cfg = GlobalHydra.instance().hydra.compose_config(command.config_name, command.overrides, run_mode=mode,
                                                              with_log_configuration=False)
    except (HydraException, OmegaConfBaseException) as e:
        raise BadInput(one_line(e)) from None
    if not command.multirun and cfg.hydra.mode == RunMode.MULTIRUN:
        raise BadInput("hydra.mode=MULTIRUN: run a sweep with -m")
    return cfg


def checked(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None) -> run_spec.RunSpec:
    """The typed run of a composed config (``hydra`` node or not), built and checked against the
    files it names before anything is written; every problem one line (ConfigError)."""
    try:
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.to_container(task, resolve=True, throw_on_missing=True)
        return preflight.check(run_spec.build(task, run_dir, sweep_dir))
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(e)) from None


# --------------------------------------------------------------------------- one run

def run_config(cfg: DictConfig, run_dir: Path) -> dict:
    """One run of a composed config (:func:`prunerep.registry.compose`, or the command line's) into
    ``run_dir``: checked before the directory is taken, run, the directory released. Bad input is a
    ConfigError or ModelUnavailable with nothing left behind; any other failure is raised after
    the run directory recorded it. Returns summary.json's contents."""
    rs = checked(cfg, run_dir)
    rd = RunDirectory(run_dir).open(point=rs.identity.summary_fields())
    try:
        logs.configure(rd.path, verbose=bool(rs.config.get("verbose")))
        log.info("run directory %s", rd.path)
        return pipeline.run(rs, rd)
    except (ConfigError, ModelUnavailable):  # bad input found once the model was there: nothing written
        rd.discard()
        raise
    finally:
        rd.close()
        logs.reset()


def single_run(command: Command) -> None:
    cfg = compose(command)
    run_dir = Path(os.path.expanduser(str(cfg.hydra.run.dir))).absolute()
    with open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the run's values
    summary = run_config(cfg, run_dir)
    print(f"prunerep: {summary['status']}: results in {run_dir}", flush=True)


# --------------------------------------------------------------------------- a sweep

def run_point(cfg: DictConfig) -> dict:
    """One point of a sweep, in the process the launcher gave it. Never raises: a failed point is
    recorded in its summary.json and returned as failed, so the sweep goes on."""
    hc = HydraConfig.get()
    run_dir, sweep_dir = Path(hc.runtime.output_dir), Path(str(hc.sweep.dir))
    failed = {"status": "failed", "run_dir": str(run_dir)}
    try:
        rd = RunDirectory(run_dir, what="the point's run directory").open(
            point=run_spec.identity_fields(cfg, run_dir, sweep_dir))
    except ConfigError as e:  # the point's directory cannot be used: nothing can be recorded in it
        log.error("point failed: %s", e)
        return dict(failed, error=f"ConfigError: {e}")
    try:
        logs.configure(rd.path, verbose=OmegaConf.select(cfg, "verbose", default=False,
                                                         throw_on_resolution_failure=False) is True)
        try:
            summary = pipeline.run(checked(cfg, run_dir, sweep_dir), rd)
        except (ConfigError, ModelUnavailable) as error:  # bad input of this point
            rd.fail(failure_summary(run_spec.identity_fields(cfg, run_dir, sweep_dir), error))
            log.error("point failed: %s", error)
            return dict(failed, error=f"{type(error).__name__}: {error}")
        except Exception as e:  # the pipeline recorded it
            log.exception("point failed (recorded in %s/summary.json)", run_dir)
            return dict(failed, error=f"{type(e).__name__}: {e}")
        print(f"prunerep: {summary['status']}: results in {rd.path}", flush=True)
        return {"status": summary["status"], "run_dir": str(rd.path)}
    finally:
        rd.close()


def sweep(command: Command) -> None:
    cfg = compose(command)
    sweep_dir = Path(os.path.expanduser(str(cfg.hydra.sweep.dir))).absolute()
    if str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith("LocalGpuLauncher"):
        if problem := register_plugin():
            raise BadInput(problem)
        try:  # the launcher checks again when Hydra sets it up: here, before the sweep directory exists
            resolve_slots(OmegaConf.to_container(cfg.hydra.launcher, resolve=True).get("devices"))
        except NoDeviceSlots as e:
            raise BadInput(str(e)) from None
    failed: list[dict] = []

    def point(task: DictConfig) -> dict:
        result = run_point(task)
        if result["status"] == "failed":
            failed.append(result)  # the local launcher runs its points in this process
        return result

    overrides = [*command.overrides, f"hydra.sweep.dir={_quoted(str(sweep_dir))}"]  # ${now:} resolved once
    with SweepDirectory(sweep_dir):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), job_name="prunerep", version_base="1.3"):
                GlobalHydra.instance().hydra.multirun(command.config_name, point, overrides)
        except (HydraException, OmegaConfBaseException) as e:  # a sweep value Hydra cannot compose
            raise BadInput(one_line(e)) from None
    if failed:  # a local sweep ends like a SLURM one: non-zero, naming every failed point
        print(f"prunerep: {len(failed)} point(s) failed (recorded in their summary.json; re-run the same command "
              f"to redo them):", file=sys.stderr)
        for p in failed:
            print(f"  {p['run_dir']}: {p['error']}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- the entry point

def hydra_command(argv: list[str]) -> None:
    """Hydra's own commands (``--help``, ``--cfg job``, ...), through Hydra's command line."""
    register_configs()
    register_plugin()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def show(cfg: DictConfig) -> None:  # --help and --cfg end before a job would run
        pass

    sys.argv = [sys.argv[0], *argv]
    show()


def entrypoint(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HYDRA_COMMANDS or a.startswith(("--cfg", "--info", "--shell-completion")) for a in argv):
        hydra_command(argv)
        return
    try:
        command = parse(argv)
        check_override_keys(command.overrides, chosen_options(command.overrides))
        (sweep if command.multirun else single_run)(command)
    except (BadInput, ConfigError, ModelUnavailable) as e:
        fail(str(e))
    except JobsFailed as e:  # a SLURM sweep: every job ended, some points failed; the message names them
        print(f"prunerep: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


__all__ = ["EXIT_BAD_INPUT", "entrypoint", "chosen_options", "check_override_keys", "compose", "run_config",
           "run_point"]
