"""What every pruner shares: the base of the method classes, block-by-block calibration,
masks, measurement.

Calibration runs as in the Wanda and SparseGPT reference code: the inputs of block i+1
are the outputs of the already-pruned block i, so peak memory is one block plus its
calibration activations. A block's weights are on its compute device for its turn
(:func:`prunerep.model.placement.onloaded`): a model sharded over GPUs, offloaded to CPU
memory or to disk is pruned one block at a time and written back where it lives.

A method works on weight targets (:class:`prunerep.model.anatomy.Target`): every Linear of a
block and every expert's matrices of a mixture-of-experts block (the routers stay dense unless
``routers=true``). An expert is calibrated on the tokens the router sent to it
(``calib.expert_tokens=routed``) or on every token (``all``, llm-compressor's choice); an expert
that saw fewer than ``calib.expert_min_tokens`` tokens has no usable statistics and is treated as
if its inputs were isotropic (Wanda: magnitude per row; SparseGPT, GPTQ: H = I; AWQ: no scale),
which pruning.json records under ``experts.starved``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional

import torch
from torch import nn

from prunerep.errors import ConfigError
from prunerep.model.anatomy import Target, block_targets, decoder_layers, feeding, first_output, output_head
from prunerep.model.placement import input_device, onloaded
from prunerep.registry import Method
from prunerep.sparsity import SparsitySpec


@dataclass
class PruneSettings:
    """What a run asks of its pruner, besides the method's own settings: the target, where
    to compute and how many calibration samples go through a block at once."""

    spec: SparsitySpec
    pruner: "Pruner"
    device: torch.device
    batch_size: int = 1 << 30  # calibration samples per block forward; default: all at once
    seed: int = 0
    expert_tokens: str = "routed"  # routed | all: an expert's calibration tokens
    expert_min_tokens: int = 16  # fewer: the expert's statistics are isotropic


def check_target_patterns(method, group: str) -> None:
    """``include`` / ``exclude`` of a pruner or quantizer must be regular expressions (one line)."""
    for key in ("include", "exclude"):
        pattern = getattr(method, key)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{group}.{key}={pattern!r} is not a valid regular expression: {e}") from None


def method_targets(model: nn.Module, method, group: str) -> dict[str, Target]:
    """The targets a method's ``include`` / ``exclude`` / ``routers`` select, by model-wide name;
    a ConfigError (one line) when they select none."""
    found = {f"layers.{i}.{n}": t for i, block in enumerate(decoder_layers(model))
             for n, t in targets_of(block, method).items()}
    if not found:
        raise ConfigError(f"{group}.include={method.include!r} / {group}.exclude={method.exclude!r} match no weight "
                          f"of the model's decoder blocks")
    return found


def targets_of(block: nn.Module, method) -> dict[str, Target]:
    """The targets of one block that ``method`` (a pruner or quantizer) works on, by name in the block."""
    return block_targets(block, method.include, method.exclude, bool(getattr(method, "routers", False)))


@dataclass
class Pruner(Method):
    """Base of every pruning method (``conf/pruner/<name>.yaml`` + ``prunerep/pruners/<name>.py``).

    Settings shared by all: ``include``/``exclude``, regexes on the weight targets' names inside
    a decoder block (``self_attn.q_proj``, ``mlp.experts.3.down_proj``), and ``routers``, whether a
    mixture-of-experts block's routers are pruned too, choose what is pruned and what sparsity is
    measured on. Capabilities are class flags, read by the pipeline and the checks;
    :meth:`validate` runs before the model loads, :meth:`check` on its skeleton (or, for a hub
    model not cached here, on the loaded model) before any heavy work."""

    include: str = r".*"
    exclude: Optional[str] = None
    routers: bool = False

    supports_nm: ClassVar[bool] = True  # takes an N:M pattern as its target
    zeroes_weights: ClassVar[bool] = True  # sets single weights to zero, to the target (the run fails otherwise)
    prunes_weights: ClassVar[bool] = True  # works on weight targets (layer_drop works on whole sublayers)

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are loaded for it."""
        return False

    def validate(self, spec: SparsitySpec) -> None:
        """Checks that need no model. Raise ConfigError (one line)."""
        if spec.is_nm and not self.supports_nm:
            raise ConfigError(f"the {self.name} pruner does not take an N:M pattern (sparsity={spec})")
        check_target_patterns(self, "pruner")

    def check_depth(self, n_layers: int) -> None:
        """Checks against the model's number of decoder blocks. Raise ConfigError (one line)."""

    def check(self, model: nn.Module, settings: PruneSettings) -> None:
        """Checks against the model (its skeleton on the meta device will do): the patterns must
        select weights, and an N:M pattern must divide their input features."""
        self.check_depth(len(decoder_layers(model)))
        if not self.prunes_weights:
            return
        targets = method_targets(model, self, "pruner")
        if settings.spec.is_nm:
            for name, t in targets.items():
                if t.in_features % settings.spec.m:
                    raise ConfigError(f"N:M sparsity {settings.spec}: {name} has {t.in_features} "
                                      f"input features, not a multiple of {settings.spec.m}")

    def prune(self, model: nn.Module, calib: Optional[torch.Tensor], settings: PruneSettings) -> dict:
        """Prune ``model`` in place; return what the method reports about itself."""
        raise NotImplementedError


@dataclass
class CalibratedPruner(Pruner):
    """A pruner that reads calibration activations block by block (Wanda, SparseGPT).

    ``sequential``: inside a block, each layer's statistics come from the block with the layers
    before it already pruned (o_proj sees the pruned q/k/v, the MLP the pruned attention, an
    expert's down projection its pruned gate/up) -- GPTQ/SparseGPT's ``--true-sequential``.
    ``false``: every layer's statistics come from the dense block, as in Wanda's reference code
    (``lib/prune.py``: prune_wanda and prune_sparsegpt). Independent of ``calib.batch_size``, which
    only bounds memory."""

    sequential: bool = True

    @property
    def needs_calibration(self) -> bool:
        return True


# --------------------------------------------------------------------------- masks
# A mask is a bool tensor shaped like the weight: True = this weight is set to zero.

def n_pruned(numel: int, ratio: float) -> int:
    return int(round(numel * ratio))


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the k lowest-scored entries of the whole matrix. Selection (kthvalue,
    linear time), not a sort; entries tied at the cut are taken in index order."""
    flat = score.flatten()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    cut = torch.kthvalue(flat, k).values
    mask = flat < cut
    short = k - int(mask.sum())
    if short:
        mask[(flat == cut).nonzero().squeeze(1)[:short]] = True
    return mask.view_as(score)


def per_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the lowest-scored weights of each output row (Wanda's comparison group).

    Every row loses k = floor(cols·ratio) weights; the remaining round(numel·ratio) − k·rows
    prunes go, one each, to the rows whose next-lowest score is smallest. The layer thus
    hits its target to within one weight, and each row still keeps exactly its top scores.
    Selection (kthvalue, linear time) replaces a full sort; rows with tied scores at the
    cut fall back to a sort, so counts stay exact."""
    rows, cols = score.shape
    k, extra = divmod(n_pruned(score.numel(), ratio), rows)
    prune_count = torch.full((rows,), k, dtype=torch.long, device=score.device)
    if extra:
        nxt = torch.kthvalue(score, k + 1, dim=1).values
        prune_count[torch.topk(nxt, extra, largest=False).indices] += 1
    if k == 0 and not extra:
        return torch.zeros_like(score, dtype=torch.bool)
    if not extra:
        return _lowest_per_row(score, k)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for count in prune_count.unique().tolist():
        if count == 0:
            continue
        sel = (prune_count == count).nonzero().squeeze(1)
        mask[sel] = _lowest_per_row(score[sel], count)
    return mask


def _lowest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest entries of every row."""
    cut = torch.kthvalue(score, count, dim=1).values
    mask = score <= cut[:, None]
    if bool((mask.sum(1) != count).any()):  # ties at the cut: exact, by sorting
        mask = torch.zeros_like(mask).scatter_(1, torch.argsort(score, dim=1)[:, :count], True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input weights of a row, prune the n lowest-scored."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def mask_for(score: torch.Tensor, spec: SparsitySpec, per_row: bool) -> torch.Tensor:
    if spec.is_nm:
        return nm_mask(score, spec.n, spec.m)
    if per_row:
        return per_row_mask(score, spec.ratio)
    return lowest_k_mask(score, n_pruned(score.numel(), spec.ratio))


@torch.no_grad()
def apply_mask(target: Target, mask: torch.Tensor) -> None:
    """Zero the target's weights where ``mask`` is True, in place."""
    w = target.weight
    w.masked_fill_(mask.to(w.device), 0)


@torch.no_grad()
def write_weight(target: Target, new: torch.Tensor) -> None:
    """Copy ``new`` into the target in place; the weights that are exactly zero in ``new`` (pruned)
    stay exactly zero in the model's dtype."""
    w = target.weight
    w.copy_(new.to(device=w.device, dtype=w.dtype))
    w.masked_fill_((new == 0).to(w.device), 0)


# --------------------------------------------------------------------------- calibration

class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first decoder block; return that block's hidden-state inputs
    for every calibration sample and the keyword arguments (mask, position embeddings...)
    it is called with. Samples share one length, so sample 0's kwargs serve all of them."""
    layers = decoder_layers(model)
    captured: dict = {}

    def grab(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.setdefault("inputs", []).append(hs.detach())
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = input_device(model)
    try:
        for row in calib:
            try:
                model(row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(captured["inputs"], dim=0), kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """The block's outputs for all calibration inputs, in micro-batches."""
    outs = [first_output(block(inputs[i:i + batch_size], **kwargs)) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs, dim=0)


@dataclass
class BlockStep:
    index: int
    block: nn.Module
    inputs: torch.Tensor
    kwargs: dict
    outputs: torch.Tensor | None = None  # set by the caller when its own pass already computed them


def calibrated_blocks(model: nn.Module, calib: torch.Tensor, cfg: PruneSettings,
                      desc: str = "pruning") -> Iterator[BlockStep]:
    """Yield one BlockStep per decoder block, its weights on its compute device.

    The caller gathers statistics and prunes the block. If it leaves `step.outputs` unset,
    the pruned block is run once more here; either way those outputs become the next
    block's inputs, and the block's changed weights go back where they live."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    inputs, kwargs = capture_block_inputs(model, calib)
    for i, block in enumerate(tqdm(layers, desc=desc, unit="block", leave=False)):
        with onloaded(block):
            step = BlockStep(i, block, inputs, kwargs)
            yield step
            inputs = step.outputs if step.outputs is not None else run_block(block, inputs, kwargs, cfg.batch_size)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def prune_block(step: BlockStep, targets: dict[str, Target], cfg: PruneSettings, sequential: bool,
                accumulate: Callable[[str, torch.Tensor], None], prune_target: Callable[[str, Target], None]) -> None:
    """Gather statistics with `accumulate(name, x)` and prune with `prune_target(name, target)`,
    in the order ``sequential`` asks for (see :class:`CalibratedPruner`).

    Sequential: with the whole batch in one forward, one pass does both (each target is pruned
    right before it computes); with micro-batches, one pass over all of them per group of targets
    that read the same input (q/k/v, o, gate/up, down), pruning each group before the next
    group's statistics are gathered. Not sequential: one pass over the dense block gathers
    every target's statistics, then all are pruned, then the pruned block is run again for the
    next block's inputs."""
    batch = cfg.batch_size
    feed = dict(expert_tokens=cfg.expert_tokens)
    if not sequential:
        with feeding(targets, accumulate, **feed):
            run_block(step.block, step.inputs, step.kwargs, batch)
        for name, t in targets.items():
            prune_target(name, t)
        return
    if batch >= len(step.inputs):
        def once(name, x):
            accumulate(name, x)
            prune_target(name, targets[name])

        with feeding(targets, once, **feed):
            step.outputs = run_block(step.block, step.inputs, step.kwargs, len(step.inputs))
        return
    for group in input_groups(step, targets, cfg):
        with feeding({n: targets[n] for n in group}, accumulate, **feed):
            run_block(step.block, step.inputs, step.kwargs, batch)
        for name in group:
            prune_target(name, targets[name])


@torch.no_grad()
def input_groups(step: BlockStep, targets: dict[str, Target], cfg: PruneSettings) -> list[list[str]]:
    """The block's targets in the order they compute, grouped by shared input tensor (q/k/v read
    one tensor, gate/up another; each expert its own tokens), found by running one sample through
    the block; targets that one sample does not reach come last, one group each."""
    calls: list[tuple[str, torch.Tensor]] = []
    with feeding(targets, lambda name, x: calls.append((name, x)), expert_tokens=cfg.expert_tokens):
        run_block(step.block, step.inputs[:1], step.kwargs, 1)
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups + [[n] for n in targets if n not in seen]


class InputCounts:
    """Calibration tokens seen per target, and which experts saw too few to be calibrated on."""

    def __init__(self, targets: dict[str, Target], min_tokens: int):
        self.kind = {n: t.kind for n, t in targets.items()}
        self.seen = {n: 0 for n in targets}
        self.min_tokens = min_tokens

    def add(self, name: str, x: torch.Tensor) -> None:
        self.seen[name] += x.shape[0]

    def starved(self, name: str) -> bool:
        return self.kind[name] == "expert" and self.seen[name] < self.min_tokens


class ExpertReport:
    """What pruning.json (and the quantizers' report) says about experts: the tokens each expert
    matrix was calibrated on and those that fell back to isotropic statistics."""

    def __init__(self, cfg: PruneSettings):
        self.cfg, self.tokens, self.starved = cfg, {}, []

    def record(self, block_index: int, counts: InputCounts) -> None:
        for name, n in counts.seen.items():
            if counts.kind[name] == "expert":
                self.tokens[f"layers.{block_index}.{name}"] = n
                if counts.starved(name):
                    self.starved.append(f"layers.{block_index}.{name}")

    def entry(self) -> dict:
        """``{"experts": {...}}`` for a method's report; {} for a model without experts."""
        if not self.tokens:
            return {}
        return {"experts": {"expert_tokens": self.cfg.expert_tokens, "min_tokens": self.cfg.expert_min_tokens,
                            "tokens": self.tokens, "starved": self.starved}}


# --------------------------------------------------------------------------- input statistics
# Wanda's input norms (Wanda, OWL's outlier ratios); the Hessian of the layer-wise reconstruction
# error and its damped inverse, shared by SparseGPT (prunerep/pruners/sparsegpt.py) and GPTQ
# (prunerep/quant/gptq.py).

def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖ for weight [out, in] and the per-input-feature sum of squares [in]."""
    return weight.abs().float() * input_sq_norm.float().sqrt()[None, :]


class InputSquares:
    """Σ x_j² per input feature of each target over the calibration tokens (Wanda's ‖X_j‖²); all
    ones for an expert that saw too few tokens (the score is then the magnitude)."""

    def __init__(self, targets, min_tokens: int = 0):
        self.sq = {n: torch.zeros(t.in_features, device=t.weight.device, dtype=torch.float32)
                   for n, t in targets.items()}
        self.counts = InputCounts(targets, min_tokens)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.sq[name] += x.float().pow(2).sum(0)
        self.counts.add(name, x)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.ones_like(self.sq[name]) if self.counts.starved(name) else self.sq[name]



class RunningHessians:
    """H = (2/n)·Σ x xᵀ over the n calibration tokens seen so far, one per target (float32),
    kept as a running mean (the reference code's ``add_batch``). Pass it as the ``accumulate`` of
    :func:`prune_block`; :meth:`pop` hands a target's H over and frees it: the identity for an
    expert that saw fewer than ``min_tokens`` tokens (no usable statistics)."""

    def __init__(self, targets: dict[str, Target], min_tokens: int = 0):
        self.hess = {n: torch.zeros(t.in_features, t.in_features, device=t.weight.device, dtype=torch.float32)
                     for n, t in targets.items()}
        self.counts = InputCounts(targets, min_tokens)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        t = x.shape[0]
        if t == 0:
            return
        x = x.float()
        seen = self.counts.seen[name]
        self.hess[name] *= seen / (seen + t)
        self.counts.add(name, x)
        x = x * (2.0 / self.counts.seen[name]) ** 0.5
        self.hess[name] += x.T @ x

    def pop(self, name: str) -> torch.Tensor:
        h = self.hess.pop(name)
        if self.counts.starved(name):
            return torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        return h


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)`` for H [in, in]: U is the upper Cholesky factor of (H + λI)⁻¹, λ = percdamp ×
    the mean of diag(H), after every input that never fired (``dead``: H_jj = 0; the caller zeroes
    those weight columns) got H_jj = 1 -- SparseGPT's and GPTQ's preparation, verbatim."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


# --------------------------------------------------------------------------- measurement

@torch.no_grad()
def measure_sparsity(model: nn.Module, cfg: PruneSettings) -> dict:
    """Zero fraction of every target and overall (experts one by one), the N:M check, the LM
    head's zero fraction. This is what was done, measured on the weights, not what was asked."""
    modules, total, zeros = {}, 0, 0
    nm_ok = True
    n_experts = 0
    for i, block in enumerate(decoder_layers(model)):
        with onloaded(block):
            for name, t in targets_of(block, cfg.pruner).items():
                w = t.weight
                z = int((w == 0).sum())
                modules[f"layers.{i}.{name}"] = z / w.numel()
                total += w.numel()
                zeros += z
                n_experts += t.kind == "expert"
                if cfg.spec.is_nm and w.shape[1] % cfg.spec.m == 0:
                    groups = (w == 0).reshape(w.shape[0], -1, cfg.spec.m).sum(-1)
                    nm_ok &= bool((groups >= cfg.spec.n).all())
    head = output_head(model)
    with onloaded(head):
        head_sparsity = float((head.weight == 0).float().mean())
    report = {
        "target": str(cfg.spec),
        "target_ratio": cfg.spec.ratio,
        "achieved_sparsity": zeros / total if total else 0.0,
        "n_params_prunable": total,
        "n_zeros": zeros,
        "max_abs_deviation_pp": 100 * max((abs(v - cfg.spec.ratio) for v in modules.values()), default=0.0),
        "lm_head_sparsity": head_sparsity,
        "modules": modules,
    }
    if n_experts:
        report["n_expert_matrices"] = n_experts
    if cfg.spec.is_nm:
        report["nm_check"] = {"pattern": str(cfg.spec), "holds": nm_ok}
    return report


def mean_cos_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of 1 − cos(a, b) (LLM-Drop's importance)."""
    cos = torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return float((1 - cos).mean())


__all__ = ["PruneSettings", "Pruner", "CalibratedPruner", "method_targets", "targets_of", "mask_for", "per_row_mask",
           "nm_mask", "lowest_k_mask", "apply_mask", "write_weight", "capture_block_inputs", "run_block",
           "input_groups", "calibrated_blocks", "prune_block", "BlockStep", "InputCounts", "ExpertReport",
           "measure_sparsity", "mean_cos_distance", "n_pruned", "wanda_score", "InputSquares", "RunningHessians",
           "inverse_hessian_cholesky"]
