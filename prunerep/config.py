"""Typed schema of the Hydra config (a leaf: imports nothing from prunerep).

Every YAML file in ``conf/`` is merged onto these dataclasses, so a misspelt key
(``model.pth=...``) fails at composition time, before any model is loaded. The ``pruner``
and ``quant`` nodes are typed by the chosen method's own dataclass (``prunerep/compress/pruners/<name>.py``,
``prunerep/compress/quant/<name>.py``, stored in Hydra's ConfigStore by
:func:`prunerep.registry.register_configs`), so a setting the chosen method does not have fails
too. What a type cannot express (sparsity range, paths that must exist) is checked by
:func:`prunerep.spec.build` before the model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf


def model_name(group_name: str, group_path: Optional[str], path: Optional[str]) -> str:
    """``model.name`` of conf/model/*.yaml: the group's name while ``model.path`` is the group's own,
    else the name of what ``model.path`` names (``/data/Llama-7B`` and ``org/Llama-7B`` -> ``Llama-7B``,
    ``/x/y.Q4.gguf`` -> ``y.Q4``), so that a run is never labelled with another model's name. An
    explicit ``model.name=...`` replaces the interpolation and wins."""
    if not path or path == group_path:
        return group_name
    name = PurePosixPath(str(path).rstrip("/")).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name or group_name


# Registered on import, not in a setup call: Hydra's SLURM and local_gpu workers resolve
# hydra.sweep.subdir (${model.name}) before prunerep's task function runs, and importing the task
# function imports this module.
OmegaConf.register_new_resolver("model_name", model_name, replace=True)


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
    # accelerate's device map: auto | balanced | balanced_low_0 | sequential | {module: device};
    # devices are GPU indices, cpu (offloaded to CPU memory) or disk. null: the whole model on `device`
    device_map: Any = None
    max_memory: Any = None  # with a device_map strategy: {device: size}, e.g. {0: 70GiB, cpu: 200GiB}
    trust_remote_code: bool = False
    cache_dequantized: bool = True
    arch: dict[str, Any] = field(default_factory=dict)  # for source=random


@dataclass
class CalibConfig:
    source: str = "pydoc"  # pydoc (offline, ships with CPython) | c4 (hub) | file
    path: Optional[str] = None  # for source=file: a UTF-8 text file
    nsamples: int = 32
    seqlen: int = 128
    seed: int = 0
    # samples per block forward (a memory setting only; null = all at once). The pruning order
    # is the method's own setting (pruner.sequential), whatever the batch size.
    batch_size: Optional[int] = None
    # mixture-of-experts: an expert's calibration tokens are those routed to it (routed) or every
    # token of the block (all); an expert that saw fewer than expert_min_tokens is treated as if its
    # inputs were isotropic (Wanda: |W|; SparseGPT, GPTQ: H = I; AWQ: no scale)
    expert_tokens: str = "routed"
    expert_min_tokens: int = 16


@dataclass
class TaskConfig:
    name: str = "none"
    # lm-eval task names, or names of prunerep's offline tasks
    tasks: list[str] = field(default_factory=list)
    offline: bool = True
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    # log-likelihood batches hold at most this much of logits (lm-eval keeps [batch, length, vocab]
    # twice); null: a quarter of the free memory, at most 1 GiB. Smaller batches only where needed
    logits_memory_mb: Optional[int] = None
    max_gen_toks: int = 64
    allow_code_execution: bool = False
    code_timeout_s: float = 5.0
    code_memory_mb: int = 1024  # RLIMIT_AS of each sandboxed test program
    code_max_gen_toks: int = 384  # generation length of code tasks (humaneval)
    seed: int = 1234
    n_arith: int = 100
    # kinds of generated arithmetic problems (prunerep.evals.offline.ARITH_KINDS)
    arith_kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    # perplexity tasks (pydoc_ppl offline, wikitext on the Hub; prunerep.evals.perplexity):
    # lm_eval = lm-eval's loglikelihood_rolling per document (token and word perplexity);
    # reference = Wanda's / SparseGPT's eval_ppl: the text concatenated, non-overlapping windows
    # of ppl_seqlen tokens (the tail dropped), exp(mean NLL) -- the protocol of published tables
    ppl_protocol: str = "lm_eval"
    ppl_seqlen: Optional[int] = None  # reference window; null: the model's max_position_embeddings
    ppl_chars: Optional[int] = None  # pydoc_ppl: characters of held-out text used (null: all, ~20k)
    # retrieval tasks (code_retrieval offline, beir_scifact on the Hub; prunerep.evals.retrieval)
    retrieval_pooling: str = "last"  # last (last token, instructed queries, E5-Mistral) | mean
    retrieval_n: int = 24  # code_retrieval: passages in the corpus (task.limit caps the queries)
    retrieval_max_tokens: int = 256  # longer texts keep their first tokens
    # multiple choice with the options listed under letters (mmlu_dev): none = as given;
    # permute = the mean accuracy over the cyclic rotations of the options (the contents rotate
    # under fixed letters), which a model that always picks one letter scores at chance exactly
    mc_debias: str = "none"
    # lm-eval's apply_chat_template: auto (on when the tokenizer has a chat template) | true | false
    # (prunerep/model/chat.py); with it, few-shot examples as alternating turns (fewshot_as_multiturn)
    apply_chat_template: Any = "auto"
    fewshot_as_multiturn: bool = True
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
    prompts: str = "auto"  # auto (tasks when a task has items, else offline) | tasks | offline | path/to/prompts.jsonl
    n_prompts: int = 8  # offline: half multiple choice, half generative
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    max_new_tokens: int = 32  # greedy continuation (teacher_forced / free_running)
    token_chunk: int = 256  # rows through the LM head at once: bounds memory to ~token_chunk x vocab
    # torch's intra-op threads for the vocabulary-sized metric passes; null = torch's thread
    # count. 1 on a CPU that other jobs keep busy
    metric_threads: Optional[int] = None
    # how the vocabulary-sized metric passes run: auto | eager | compiled | fused. auto = fused
    # (one numba kernel, a few passes per row pair) on CPU, torch.compile on CUDA, where ~45
    # eager passes over [tokens x vocab] would dwarf the LM head (prunerep.probes.plan.KERNELS)
    kernel: str = "auto"
    seed: int = 0
    # the last layer's embedding-space (h) rows: residual = the residual stream before the final
    # norm (what the logit lens reads); normed = after the final norm (what transformers'
    # output_hidden_states[-1] is). Every other layer is the residual stream either way
    h: str = "residual"
    # sublayer transitions (prunerep/probes/transitions.py): per block, attention and MLP, x vs x + F(x)
    # on the dense and on the pruned model, and the local damage x + F_dense(x) vs x + F_pruned(x) with x
    # the dense input, in h, z and p (prompt and teacher-forced contexts); costs ~5x the other probes
    transitions: bool = False
    # the logit lens of the transition rows: final_norm (the model's final norm, then the LM head) |
    # raw (the LM head on h without the final norm, as the paper's released code does)
    lens: str = "final_norm"
    top_tokens: int = 30  # top_tokens.parquet: the dense top-k tokens at each answer / first-step position (0: off)
    # items.parquet (prunerep/probes/items.py): the evaluated items probed at their answer position, at most
    # this many per multiple-choice / generative task (0: off); one forward per item and side
    n_items: int = 16
    # each prompt as the user turn of the tokenizer's chat template: auto (on when it has one) | true | false
    chat_template: Any = "auto"


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
    pruner: Any = MISSING  # typed by the chosen method's dataclass (prunerep/compress/pruners/<name>.py)
    quant: Any = MISSING  # typed by the chosen quantizer's dataclass (prunerep/compress/quant/<name>.py)
    task: TaskConfig = field(default_factory=TaskConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # a ratio in [0, 1) ("0.5", "0.37") or an N:M pattern ("2:4", "4:8");
    # for layer_drop: the fraction of candidate sublayers dropped
    sparsity: Any = 0.5
    seed: int = 0
    offload: bool = False
    save_model: bool = False
    skip_completed: bool = True
    verbose: bool = False  # third-party INFO (lm-eval, datasets, transformers) on the console too
    cache_dir: str = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
