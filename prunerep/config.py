"""Typed schema of the Hydra config.

Every YAML file in ``conf/`` is merged onto these dataclasses, so a misspelt key
(``pruner.blocksze=64``) fails at composition time, before any model is loaded.
Values are validated again in :func:`validate` for what a type cannot express
(sparsity range, N:M pattern, paths that must exist).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """Bad user input, reported as one line before any heavy work starts."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # where the weights come from: "hub" (an id or a local HF directory),
    # "gguf" (a .gguf file, optionally dequantised once into the cache),
    # "package" (a GGUF file shipped inside an installed Python package),
    # "random" (random initialisation from `arch`, for tests and benchmarks)
    source: str = "hub"
    path: Optional[str] = None  # hub id, local directory, or .gguf file
    gguf_file: Optional[str] = None
    package: Optional[str] = None  # importable distribution that ships the gguf
    tokenizer: Optional[str] = None  # tokenizer source when it differs from `path`
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    trust_remote_code: bool = False
    cache_dequantized: bool = True
    arch: dict[str, Any] = field(default_factory=dict)  # for source=random
    chat_template: bool = False


@dataclass
class PrunerConfig:
    name: str = MISSING
    # which Linear layers are candidates (regex on the module name inside a block)
    include: str = r".*"
    exclude: Optional[str] = None
    prune_lm_head: bool = False
    # sparsegpt
    blocksize: int = 128
    percdamp: float = 0.01
    # layer_drop: what to drop and how many; `count` overrides the sparsity ratio
    target: str = "attn"  # attn | mlp | block
    count: Optional[int] = None
    # random baseline
    seed: Optional[int] = None


@dataclass
class CalibConfig:
    source: str = "pydoc"  # pydoc (offline, ships with CPython) | c4 (hub) | file
    path: Optional[str] = None  # for source=file: a UTF-8 text file
    nsamples: int = 32
    seqlen: int = 128
    seed: int = 0
    # samples per block forward; null = all at once, which lets wanda/sparsegpt gather
    # statistics and prune in one sequential pass per block (see pruners/common.py)
    batch_size: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = "none"
    # lm-eval task names, or names of prunerep's offline tasks
    tasks: list[str] = field(default_factory=list)
    offline: bool = True
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    max_gen_toks: int = 64
    allow_code_execution: bool = False
    code_timeout_s: float = 5.0
    code_memory_mb: int = 1024  # RLIMIT_AS of each sandboxed test program
    code_max_gen_toks: int = 384  # generation length of code tasks (humaneval)
    seed: int = 1234
    n_arith: int = 100
    # kinds of generated arithmetic problems (prunerep.evals.offline.ARITH_KINDS)
    arith_kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeConfig:
    """Representation probes (prunerep.probes): dense vs pruned in h, z = lens(h), p = softmax(z/T)."""

    name: str = "all"
    spaces: list[str] = field(default_factory=lambda: ["embedding", "logit", "probability"])
    contexts: list[str] = field(default_factory=lambda: ["prompt", "teacher_forced", "free_running"])
    layers: Any = "all"  # "all" | list of indices (-1 = last) | {every: k}; the last layer is always probed
    sublayers: list[str] = field(default_factory=lambda: ["block"])  # block | attn | mlp
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    topk: list[int] = field(default_factory=lambda: [5, 10])
    prompts: str = "offline"  # offline | path/to/prompts.jsonl
    n_prompts: int = 8  # offline: half multiple choice, half generative
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    max_new_tokens: int = 32  # greedy continuation (teacher_forced / free_running)
    token_chunk: int = 256  # rows through the LM head at once: bounds memory to ~token_chunk x vocab
    # CPU threads for the vocabulary-sized metric passes; null = torch's setting. Set 1 on a
    # shared, oversubscribed CPU, where many small threaded passes stall.
    metric_threads: Optional[int] = None
    # fuse the vocabulary-sized metric passes with torch.compile (compiled once per process);
    # null: on CUDA only, where ~50 eager passes over [tokens x vocab] would dwarf the LM head
    compile: Optional[bool] = None
    seed: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "prunerep"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # where wandb writes; null: inside the run directory
    name: Optional[str] = None  # run name; null: <model>/<pruner>/<sparsity>
    init_timeout: float = 60.0  # seconds wandb.init may take before tracking is given up
    finish_timeout: float = 300.0  # seconds run.finish may spend uploading (online); 0 = no limit


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # a ratio in [0, 1) ("0.5", "0.37") or an N:M pattern ("2:4", "4:8");
    # for layer_drop: the fraction of candidate sublayers dropped
    sparsity: Any = 0.5
    seed: int = 0
    offload: bool = False
    save_model: bool = False
    skip_completed: bool = True
    cache_dir: str = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    # the group files merge into the typed nodes of `Config`, so they are checked too
    cs.store(name="config_schema", node=Config)


# --------------------------------------------------------------------------- sparsity

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsitySpec:
    """What a pruner is asked to do: a ratio, or n zeros in every m consecutive weights."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"


def parse_sparsity(value: Any) -> SparsitySpec:
    """`0.5`, `"0.37"`, `"2:4"` -> SparsitySpec; anything else raises ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"sparsity={value!r} is not a number or an N:M pattern")
    if isinstance(value, str):
        mt = _NM.match(value)
        if mt:
            n, m = int(mt.group(1)), int(mt.group(2))
            if not (0 < n < m):
                raise ConfigError(
                    f"sparsity={value!r}: an N:M pattern needs 0 < N < M (N zeros in every M weights), e.g. 2:4")
            return SparsitySpec(ratio=n / m, n=n, m=m)
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"sparsity={value!r} is neither a ratio in [0, 1) nor an N:M pattern like 2:4") from None
    if isinstance(value, (int, float)):
        ratio = float(value)
        if not (0.0 <= ratio < 1.0):
            raise ConfigError(f"sparsity={value!r} is outside [0, 1): it is the fraction of weights set to zero")
        return SparsitySpec(ratio=ratio)
    raise ConfigError(f"sparsity={value!r} is neither a ratio in [0, 1) nor an N:M pattern like 2:4")


def sparsity_label(value: Any) -> str:
    """Canonical text of a sparsity value: 0.5, "0.50" and "5e-1" read "0.5"; " 2 : 4 " reads
    "2:4". A value that is not a valid sparsity comes back as its text."""
    try:
        return str(parse_sparsity(value))
    except ConfigError:
        return str(value).strip()


def validate(cfg) -> SparsitySpec:
    """Checks that need more than types. Runs before any model is loaded."""
    from prunerep.pruners import PRUNERS  # registry of pruning methods

    if cfg.pruner.name not in PRUNERS:
        raise ConfigError(
            f"unknown pruner {cfg.pruner.name!r}; choose one of: {', '.join(sorted(PRUNERS))}")
    spec = parse_sparsity(cfg.sparsity)
    if spec.is_nm and cfg.pruner.name in ("layer_drop",):
        raise ConfigError("layer_drop removes whole sublayers; an N:M pattern does not apply to it")
    if cfg.pruner.count is not None and cfg.pruner.count < 0:
        raise ConfigError(f"pruner.count={cfg.pruner.count} must be >= 0")
    if cfg.pruner.target not in ("attn", "mlp", "block", "both"):
        raise ConfigError(f"pruner.target={cfg.pruner.target!r}; choose attn, mlp, block or both")
    if cfg.calib.nsamples < 1 or cfg.calib.seqlen < 2:
        raise ConfigError("calib.nsamples must be >= 1 and calib.seqlen >= 2")
    if cfg.calib.source not in ("pydoc", "c4", "file"):
        raise ConfigError(f"calib.source={cfg.calib.source!r}; choose pydoc, c4 or file")
    if cfg.calib.source == "file" and not (cfg.calib.path and Path(cfg.calib.path).is_file()):
        raise ConfigError(f"calib.path={cfg.calib.path!r} is not a readable file")
    m = cfg.model
    if m.source not in ("hub", "gguf", "package", "random"):
        raise ConfigError(f"model.source={m.source!r}; choose hub, gguf, package or random")
    if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}; choose auto, float32, bfloat16 or float16")
    if m.source == "gguf" and not (m.path and Path(m.path).exists()):
        raise ConfigError(f"model.path={m.path!r}: no such .gguf file")
    if m.source == "hub" and m.path and _looks_local(m.path) and not Path(m.path).exists():
        raise ConfigError(f"model.path={m.path!r}: no such local directory")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; choose offline, online or disabled")
    return spec


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or Path(path).exists()
