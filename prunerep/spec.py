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

from prunerep.config import CalibConfig, ModelConfig, TaskConfig, WandbConfig
from prunerep.errors import ConfigError
from prunerep.results.index import config_hash, slurm_job_id
from prunerep.local_gpu import SLOT_ENV as DEVICE_SLOT_ENV
from prunerep.model.anatomy import EXPERT_TOKENS, coverage, decoder_layers
from prunerep.model.identity import model_key
from prunerep.model.placement import Placement, placement
from prunerep.model.skeleton import context_length, model_config, skeleton
from prunerep.model.sources import hub_reachable, looks_local
from prunerep.probes.capture import resolve_layers
from prunerep.probes.reference import ProbePlan, build_plan
from prunerep.pruners.common import PruneSettings, Pruner
from prunerep.quant.common import Quantizer
from prunerep.registry import build_method
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
    model_key: str  # identity of the dense model, for the dense-side caches
    checked_before_loading: bool  # False: the model's shape was unknown (a hub id not cached); check after loading
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


def identity(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None,
             model_key: Optional[str] = None) -> RunIdentity:
    """The run's identity; needs nothing validated (a bad point is recorded under it too)."""
    w = cfg.wandb
    quant = quant_label(cfg)
    name = w.name or "/".join([str(cfg.model.name), str(cfg.pruner.name), sparsity_label(cfg.sparsity)]
                              + ([quant] if quant != "none" else []))
    group = w.group or (Path(sweep_dir).name if sweep_dir is not None else None)
    return RunIdentity(config_hash=config_hash(cfg), model=cfg.model.name, pruner=cfg.pruner.name,
                       sparsity=cfg.sparsity, run_dir=Path(run_dir), slurm_job_id=slurm_job_id(),
                       name=str(name), group=None if group is None else str(group), model_key=model_key,
                       quant=str(OmegaConf.select(cfg, "quant.name", default="none")),
                       device_slot=os.environ.get(DEVICE_SLOT_ENV))


def quant_label(cfg: DictConfig) -> str:
    """``none``, or the quantizer and its format: ``gptq-w4g64`` (:func:`prunerep.results.schema.quant_label`)."""
    from prunerep.results.schema import quant_label as label

    return label(*(OmegaConf.select(cfg, f"quant.{k}", default=None) for k in ("name", "bits", "group_size", "sym")))


def build(cfg: DictConfig, run_dir: Path, sweep_dir: Optional[Path] = None) -> RunSpec:
    """Validate the composed config into a RunSpec. Raises ConfigError (one line) on bad input."""
    from prunerep import evals

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
    where = placement(model.device, model.dtype, model.device_map, model.max_memory, bool(cfg.offload))
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    check_writable_dir(cache_dir, "cache_dir")
    if wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={wandb.mode!r}; choose offline, online or disabled")
    evals.validate_tasks(task)
    try:
        plan = build_plan(cfg.probe)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    settings = PruneSettings(spec=spec, pruner=pruner, device=where.device,
                             batch_size=calib.batch_size or calib.nsamples, seed=int(cfg.seed),
                             expert_tokens=calib.expert_tokens, expert_min_tokens=calib.expert_min_tokens)
    config = model_config(model, cache_dir)
    if config is not None:
        check_against_the_model(skeleton(config), context_length(config), plan, calib, settings, quant)
    key = model_key(model, where)
    return RunSpec(identity=identity(cfg, run_dir, sweep_dir, model_key=key),
                   config=OmegaConf.to_container(cfg, resolve=True), model=model, placement=where, model_key=key,
                   checked_before_loading=config is not None,
                   sparsity=spec, pruner=pruner, quant=quant, prune=settings, calib=calib, probe=plan, task=task,
                   wandb=wandb,
                   cache_dir=cache_dir, index_root=index_root(run_dir, sweep_dir),
                   save_model=bool(cfg.save_model),
                   skip_completed=bool(cfg.skip_completed))


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
    local directory, else a hub id), whatever source the chosen model group had. A model group
    that named another model (the embedded package, a random init) gives way, name included."""
    if not m.path:
        return m
    path = os.path.expanduser(m.path)
    gguf = path.endswith(".gguf") or (Path(path).is_dir() and bool(m.gguf_file) and m.source == "gguf")
    source = "gguf" if gguf else "hub"
    if source == m.source:
        return m
    name = m.name if m.source in ("hub", "gguf") else (Path(path.rstrip("/")).stem or m.name)
    return dataclasses.replace(m, source=source, name=name)


def check_writable_dir(d: Path, what: str) -> None:
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{what}={str(d)!r} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}={str(d)!r} cannot be created: {e.strerror}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={str(d)!r} is not writable")


#: a weight pruner or quantizer must reach at least this share of the decoder blocks' parameters
MIN_COVERAGE = 0.95


def check_against_the_model(model, context: Optional[int], plan: ProbePlan, calib: CalibConfig,
                            settings: PruneSettings, quant: Quantizer) -> None:
    """What the model's shape decides, on its skeleton (meta device) before it loads, or on the
    loaded model when no skeleton could be had: probed layers in range, the pruner's and the
    quantizer's own checks (targets selected, N:M and group widths, depth), that the weight targets
    cover the blocks (never a silently half-pruned model), prompts and calibration windows within
    its context."""
    pruner = settings.pruner
    n_layers = len(decoder_layers(model))
    if not plan.empty:
        try:
            resolve_layers(plan.layers, n_layers)
        except ValueError as e:
            raise ConfigError(f"{e} (the model has {n_layers} blocks)") from None
    if pruner.prunes_weights or quant.quantizes:
        share, missing = coverage(model)
        if share < MIN_COVERAGE:
            top = sorted(missing.items(), key=lambda kv: -kv[1])[:3]
            what = ", ".join(f"{k} ({v:,} parameters)" for k, v in top) or "parameters of no known kind"
            raise ConfigError(f"the weights prunerep can prune or quantize hold {100 * share:.1f}% of the decoder "
                              f"blocks' parameters (< {100 * MIN_COVERAGE:.0f}%); not covered: {what}. This "
                              f"architecture ({type(model).__name__}) is not supported")
    pruner.check(model, settings)
    quant.check(model)
    needs_calibration = pruner.needs_calibration or quant.needs_calibration
    if context:
        if needs_calibration and calib.seqlen > context:
            raise ConfigError(f"calib.seqlen={calib.seqlen} is longer than the model's context ({context} tokens)")
        if not plan.empty and plan.max_prompt_tokens + plan.max_new_tokens > context:
            raise ConfigError(f"probe.max_prompt_tokens + probe.max_new_tokens = "
                              f"{plan.max_prompt_tokens + plan.max_new_tokens} is longer than the model's context "
                              f"({context} tokens)")


def check_model(m: ModelConfig) -> None:
    if m.source not in ("hub", "gguf", "package", "random"):
        raise ConfigError(f"model.source={m.source!r}; choose hub, gguf, package or random")
    if m.source == "gguf" and not (m.path and Path(m.path).exists()):
        raise ConfigError(f"model.path={m.path!r}: no such .gguf file")
    if m.source == "hub" and m.path and looks_local(m.path) and not Path(m.path).exists():
        raise ConfigError(f"model.path={m.path!r}: no such local directory")


def check_calib(c: CalibConfig) -> None:
    if c.nsamples < 1 or c.seqlen < 2:
        raise ConfigError("calib.nsamples must be >= 1 and calib.seqlen >= 2")
    if c.source not in ("pydoc", "c4", "file"):
        raise ConfigError(f"calib.source={c.source!r}; choose pydoc, c4 or file")
    if c.source == "file":
        if not (c.path and Path(c.path).is_file()):
            raise ConfigError(f"calib.path={c.path!r} is not a readable file")
        chars = len(Path(c.path).read_text(encoding="utf-8", errors="replace"))
        if chars <= c.seqlen:  # a token spans at least one character
            raise ConfigError(f"calib.path={c.path!r} has {chars} characters: too short for one window of "
                              f"calib.seqlen={c.seqlen} tokens")
    if c.source == "c4":
        if not hub_reachable():
            raise ConfigError("calib.source=c4 reads allenai/c4 from the Hugging Face Hub, which cannot be reached "
                              "here; use calib.source=pydoc (offline) or calib.source=file calib.path=...")
    if c.batch_size is not None and c.batch_size < 1:
        raise ConfigError(f"calib.batch_size={c.batch_size} must be >= 1 or null")
    if c.expert_tokens not in EXPERT_TOKENS:
        raise ConfigError(f"calib.expert_tokens={c.expert_tokens!r}; choose {' or '.join(EXPERT_TOKENS)}")
    if c.expert_min_tokens < 0:
        raise ConfigError(f"calib.expert_min_tokens={c.expert_min_tokens} must be >= 0")

