"""Everything one run needs, validated and built once from the composed config, before the
model loads: the typed methods (pruner, quantizer), the sparsity target, the probe plan, the run's identity. The
pipeline passes these objects to its stages; no stage reads the raw config."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from prunerep.compress.method import PruneSettings, Pruner, Quantizer
from prunerep.config import CalibConfig, ModelConfig, TaskConfig, WandbConfig
from prunerep.errors import ConfigError
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, TASKS, requested
from prunerep.evals.validate import validate_tasks
from prunerep.model.anatomy import EXPERT_TOKENS
from prunerep.model.placement import Placement, placement
from prunerep.probes.plan import ProbePlan, build_plan
from prunerep.probes.prompts import FROM_TASKS, OFFLINE
from prunerep.registry import build_method
from prunerep.results.index import config_hash, slurm_job_id
from prunerep.results.schema import DEVICE_SLOT_ENV, quant_label as label
from prunerep.sparsity import SparsitySpec, parse_sparsity, sparsity_label


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is, as summary.json, the index and the tracker record it."""

    config_hash: str
    model: str
    pruner: str
    sparsity: Any  # as given: 0.5, "2:4"
    run_dir: Path
    slurm_job_id: Optional[str]
    name: str  # <model>/<pruner>/<sparsity>[/<quant>], or wandb.name
    group: Optional[str]  # wandb.group, else the name of the multirun's sweep directory
    model_key: Optional[str] = None  # the dense model's files as they are now (None: not established)
    quant: str = "none"  # the quantizer applied after the pruner
    device_slot: Optional[str] = None  # launcher=local_gpu: the GPU slot the point ran on

    def summary_fields(self) -> dict:
        return {"config_hash": self.config_hash, "model_key": self.model_key, "model": self.model,
                "pruner": self.pruner, "sparsity": self.sparsity, "quant": self.quant, "run_dir": str(self.run_dir),
                "slurm_job_id": self.slurm_job_id, "device_slot": self.device_slot}


@dataclass(frozen=True)
class RunSpec:
    identity: RunIdentity
    config: dict  # the resolved config, for config.yaml and the tracker
    model: ModelConfig
    placement: Placement  # device, dtype, device map / offload
    sparsity: SparsitySpec
    pruner: Pruner
    quant: Quantizer  # applied after the pruner (NoQuant: nothing)
    prune: PruneSettings
    calib: CalibConfig
    probe: ProbePlan
    task: TaskConfig
    wandb: WandbConfig
    cache_dir: Path
    index_root: Path  # the completed-points index lives in <index_root>/index
    save_model: bool
    skip_completed: bool
    # set by prunerep.preflight.check, which reads the model's files:
    model_key: Optional[str] = None  # identity of the dense model, for the dense-side caches
    checked_before_loading: bool = False  # False: the model's shape was unknown (a hub id not cached)

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are loaded: the pruner or the quantizer reads activations."""
        return self.pruner.needs_calibration or self.quant.needs_calibration


def identity(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None,
             model_key: Optional[str] = None) -> RunIdentity:
    """The run's identity; needs nothing validated (a bad point is recorded under it too)."""
    w = cfg.wandb
    quant = quant_label(cfg)
    model_name = str(cfg.model.name)
    name = w.name or "/".join([model_name, str(cfg.pruner.name), sparsity_label(cfg.sparsity)]
                              + ([quant] if quant != "none" else []))
    group = w.group or (Path(sweep_dir).name if sweep_dir is not None else None)
    return RunIdentity(config_hash=config_hash(cfg), model=model_name, pruner=cfg.pruner.name,
                       sparsity=cfg.sparsity, run_dir=Path(run_dir), slurm_job_id=slurm_job_id(),
                       name=str(name), group=None if group is None else str(group), model_key=model_key,
                       quant=str(OmegaConf.select(cfg, "quant.name", default="none")),
                       device_slot=os.environ.get(DEVICE_SLOT_ENV))


def identity_fields(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None) -> dict:
    """summary.json's identity fields of a point whatever is wrong with its config (what can be read)."""
    try:
        return identity(cfg, run_dir, sweep_dir).summary_fields()
    except Exception:  # the identity itself is what is bad: the values that can be read
        fields = {"run_dir": str(run_dir), "slurm_job_id": slurm_job_id()}
        for key, dotted in (("model", "model.name"), ("pruner", "pruner.name"), ("sparsity", "sparsity"),
                            ("quant", "quant.name")):
            try:
                fields[key] = OmegaConf.select(cfg, dotted, default=None)
            except Exception:
                fields[key] = None
        return fields


def quant_label(cfg: DictConfig) -> str:
    """``none``, or the quantizer and its format: ``gptq-w4g64`` (:func:`prunerep.results.schema.quant_label`)."""
    return label(*(OmegaConf.select(cfg, f"quant.{k}", default=None) for k in ("name", "bits", "group_size", "sym")))


def build(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None) -> RunSpec:
    """The composed config, checked value by value, as the typed RunSpec (no file, network or
    model is touched: :func:`prunerep.preflight.check` does that). Raises ConfigError (one line)."""
    spec = parse_sparsity(cfg.sparsity)
    pruner = build_method("pruner", cfg.pruner)
    pruner.validate(spec)
    quant = build_method("quant", cfg.quant)
    quant.validate()
    model: ModelConfig = resolve_source(OmegaConf.to_object(cfg.model))
    calib: CalibConfig = OmegaConf.to_object(cfg.calib)
    wandb: WandbConfig = OmegaConf.to_object(cfg.wandb)
    task: TaskConfig = OmegaConf.to_object(cfg.task)
    check_model(model)
    check_calib(calib)
    check_wandb(wandb)
    where = placement(model.device, model.dtype, model.device_map, model.max_memory, bool(cfg.offload))
    validate_tasks(task)
    try:
        plan = build_plan(cfg.probe)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_task_prompts(plan, task)
    settings = PruneSettings(spec=spec, pruner=pruner, device=where.device,
                             batch_size=calib.batch_size or calib.nsamples, seed=int(cfg.seed),
                             expert_tokens=calib.expert_tokens, expert_min_tokens=calib.expert_min_tokens)
    return RunSpec(identity=identity(cfg, run_dir, sweep_dir), config=OmegaConf.to_container(cfg, resolve=True),
                   model=model, placement=where, sparsity=spec, pruner=pruner, quant=quant, prune=settings, calib=calib,
                   probe=plan, task=task, wandb=wandb, cache_dir=Path(os.path.expanduser(cfg.cache_dir)),
                   index_root=index_root(run_dir, sweep_dir), save_model=bool(cfg.save_model),
                   skip_completed=bool(cfg.skip_completed))


def check_task_prompts(plan: ProbePlan, task: TaskConfig) -> None:
    """``probe.prompts=tasks`` needs a multiple-choice or generative task to take its items from
    (a task lm-eval names may be either: it is found out when its items come back)."""
    if plan.empty or plan.prompts != FROM_TASKS:
        return
    names = requested(task)
    if not any(n not in TASKS or TASKS[n].family in (MULTIPLE_CHOICE, GENERATIVE) for n in names):
        raise ConfigError(f"probe.prompts={FROM_TASKS} probes the evaluated multiple-choice and generative items, "
                          f"but the tasks are {names or 'none'}; add such a task or use probe.prompts={OFFLINE}")


def index_root(run_dir: Path, sweep_dir: Optional[Path] = None) -> Path:
    """Where the completed-points index lives: beside the results, whatever the working directory.
    ``$PRUNEREP_OUTPUTS`` when set; else the directory holding the sweep directories (a multirun:
    ``outputs/multirun``, so re-running a sweep into a new dated directory reuses what an earlier
    one completed) or the run directories (a single run: ``outputs/runs``)."""
    env = os.environ.get("PRUNEREP_OUTPUTS")
    if env:
        return Path(env).expanduser().resolve()
    return Path(sweep_dir if sweep_dir is not None else run_dir).expanduser().resolve().parent


def resolve_source(m: ModelConfig) -> ModelConfig:
    """``model.path`` always means that model: its source is read from the path (a .gguf file, a
    local directory, else a hub id), whatever source the chosen model group had (its name follows
    the path too: :func:`prunerep.config.model_name`)."""
    if not m.path:
        return m
    path = os.path.expanduser(m.path)
    gguf = path.endswith(".gguf") or (Path(path).is_dir() and bool(m.gguf_file) and m.source == "gguf")
    source = "gguf" if gguf else "hub"
    if source == m.source:
        return m
    return dataclasses.replace(m, source=source)


def check_model(m: ModelConfig) -> None:
    if m.source not in ("hub", "gguf", "package", "random"):
        raise ConfigError(f"model.source={m.source!r}; choose hub, gguf, package or random")


def check_calib(c: CalibConfig) -> None:
    if c.nsamples < 1 or c.seqlen < 2:
        raise ConfigError("calib.nsamples must be >= 1 and calib.seqlen >= 2")
    if c.source not in ("pydoc", "c4", "file"):
        raise ConfigError(f"calib.source={c.source!r}; choose pydoc, c4 or file")
    if c.source == "file" and not c.path:
        raise ConfigError("calib.source=file needs calib.path (a UTF-8 text file)")
    if c.batch_size is not None and c.batch_size < 1:
        raise ConfigError(f"calib.batch_size={c.batch_size} must be >= 1 or null")
    if c.expert_tokens not in EXPERT_TOKENS:
        raise ConfigError(f"calib.expert_tokens={c.expert_tokens!r}; choose {' or '.join(EXPERT_TOKENS)}")
    if c.expert_min_tokens < 0:
        raise ConfigError(f"calib.expert_min_tokens={c.expert_min_tokens} must be >= 0")


def check_wandb(w: WandbConfig) -> None:
    if w.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={w.mode!r}; choose offline, online or disabled")
    if not (w.init_timeout > 0 and w.finish_timeout >= 0):
        raise ConfigError(f"wandb.init_timeout={w.init_timeout} must be > 0 and wandb.finish_timeout="
                          f"{w.finish_timeout} >= 0 (0: no limit)")
