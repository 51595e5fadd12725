"""What every pruner shares: the base of the method classes, block-by-block calibration,
masks, measurement.

Calibration runs as in the Wanda and SparseGPT reference code: the inputs of block i+1
are the outputs of the already-pruned block i, so peak memory is one block plus its
calibration activations; with ``offload`` the model stays in CPU memory and only the
block being pruned visits the accelerator.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional

import torch
from torch import nn

from prunerep.errors import ConfigError
from prunerep.models import base_model, decoder_layers, output_head
from prunerep.registry import Method
from prunerep.sparsity import SparsitySpec


@dataclass
class PruneSettings:
    """What a run asks of its pruner, besides the method's own settings: the target, where
    to compute and how many calibration samples go through a block at once."""

    spec: SparsitySpec
    pruner: "Pruner"
    device: torch.device
    offload: bool = False
    batch_size: int = 1 << 30  # calibration samples per block forward; default: all at once
    seed: int = 0


def check_target_patterns(method, group: str) -> None:
    """``include`` / ``exclude`` of a pruner or quantizer must be regular expressions (one line)."""
    for key in ("include", "exclude"):
        pattern = getattr(method, key)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{group}.{key}={pattern!r} is not a valid regular expression: {e}") from None


@dataclass
class Pruner(Method):
    """Base of every pruning method (``conf/pruner/<name>.yaml`` + ``prunerep/pruners/<name>.py``).

    Settings shared by all: ``include``/``exclude``, regexes on the Linear layers' names inside
    a decoder block, choose what is pruned and what sparsity is measured on. Capabilities are
    class flags, read by the pipeline and the checks; :meth:`validate` runs before the model
    loads, :meth:`check` after it loads and before any heavy work."""

    include: str = r".*"
    exclude: Optional[str] = None

    needs_calibration: ClassVar[bool] = False  # calibration samples are loaded for it
    supports_nm: ClassVar[bool] = True  # takes an N:M pattern as its target
    supports_lm_head: ClassVar[bool] = False  # has a prune_lm_head setting
    meets_target: ClassVar[bool] = True  # achieved sparsity == target (the run fails otherwise)

    def validate(self, spec: SparsitySpec) -> None:
        """Checks that need no model. Raise ConfigError (one line)."""
        if spec.is_nm and not self.supports_nm:
            raise ConfigError(f"the {self.name} pruner does not take an N:M pattern (sparsity={spec})")
        check_target_patterns(self, "pruner")

    def check_depth(self, n_layers: int) -> None:
        """Checks against the model's number of decoder blocks, read before the model loads
        (:func:`prunerep.spec.check_against_the_model`). Raise ConfigError (one line)."""

    def check(self, model: nn.Module, settings: PruneSettings) -> None:
        """Checks against the loaded model: the pattern must match Linear layers, and an N:M
        pattern must divide their input features."""
        targets = {f"layers.{i}.{name}": lin for i, block in enumerate(decoder_layers(model))
                   for name, lin in prunable_linears(block, self).items()}
        if not targets:
            raise ConfigError(f"pruner.include={self.include!r} / pruner.exclude={self.exclude!r} match no Linear "
                              f"layer of the model's decoder blocks")
        if settings.spec.is_nm:
            for name, lin in targets.items():
                if lin.in_features % settings.spec.m:
                    raise ConfigError(f"N:M sparsity {settings.spec}: {name} has {lin.in_features} "
                                      f"input features, not a multiple of {settings.spec.m}")

    def prune(self, model: nn.Module, calib: Optional[torch.Tensor], settings: PruneSettings) -> dict:
        """Prune ``model`` in place; return what the method reports about itself."""
        raise NotImplementedError


@dataclass
class CalibratedPruner(Pruner):
    """A pruner that reads calibration activations block by block (Wanda, SparseGPT).

    ``sequential``: inside a block, each Linear layer's statistics come from the block with
    the layers before it already pruned (o_proj sees the pruned q/k/v, the MLP the pruned
    attention) -- GPTQ/SparseGPT's ``--true-sequential``. ``false``: every layer's statistics
    come from the dense block, as in Wanda's reference code (``lib/prune.py``: prune_wanda and
    prune_sparsegpt). Independent of ``calib.batch_size``, which only bounds memory."""

    sequential: bool = True
    needs_calibration: ClassVar[bool] = True


# --------------------------------------------------------------------------- targets

def prunable_linears(block: nn.Module, pruner: Pruner) -> dict[str, nn.Linear]:
    """The Linear layers of one decoder block that the pruner may touch, by name in the block."""
    inc = re.compile(pruner.include)
    exc = re.compile(pruner.exclude) if pruner.exclude else None
    return {name: mod for name, mod in block.named_modules()
            if isinstance(mod, nn.Linear) and inc.search(name) and not (exc and exc.search(name))}


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
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0)


# --------------------------------------------------------------------------- calibration

class _StopForward(Exception):
    pass


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, device: torch.device,
                         offload: bool) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first decoder block; return that block's hidden-state inputs
    for every calibration sample and the keyword arguments (mask, position embeddings...)
    it is called with. Samples share one length, so sample 0's kwargs serve all of them."""
    layers = decoder_layers(model)
    moved = []
    if offload:  # everything but the decoder blocks (embeddings, rotary tables) goes over
        for child in base_model(model).children():
            if child is not layers:
                child.to(device)
                moved.append(child)
    captured: dict = {}

    def grab(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.setdefault("inputs", []).append(hs.detach())
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in calib:
            try:
                model(row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for child in moved:
            child.to("cpu")
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(captured["inputs"], dim=0), kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """The block's outputs for all calibration inputs, in micro-batches."""
    outs = [_block_output(block(inputs[i:i + batch_size], **kwargs)) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs, dim=0)


@contextmanager
def removing(handles: list):
    """Remove the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, input activations [tokens, in_features]) on every forward of each module."""
    handles = [mod.register_forward_hook(lambda m, args, out, name=name: fn(name, args[0].detach().flatten(0, -2)))
               for name, mod in modules.items()]
    with removing(handles):
        yield


@contextmanager
def prune_on_first_call(modules: dict[str, nn.Module], prune_fn: Callable[[str, nn.Module, torch.Tensor], None]):
    """Forward pre-hooks: when a module runs, `prune_fn(name, module, inputs [tokens, in])`
    prunes its weights *before* it computes its output. With the whole calibration batch in
    one forward, one pass through the block both gathers every layer's statistics and yields
    the pruned block's outputs (the inputs of o_proj then come from the pruned q/k/v, and the
    MLP's from the pruned attention: SparseGPT's "true sequential" order)."""
    def hook(mod, args, name):
        prune_fn(name, mod, args[0].detach().flatten(0, -2))

    handles = [mod.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name, mod in modules.items()]
    with removing(handles):
        yield


@dataclass
class BlockStep:
    index: int
    block: nn.Module
    inputs: torch.Tensor
    kwargs: dict
    outputs: torch.Tensor | None = None  # set by the caller when its own pass already computed them


def calibrated_blocks(model: nn.Module, calib: torch.Tensor, cfg: PruneSettings,
                      desc: str = "pruning") -> Iterator[BlockStep]:
    """Yield one BlockStep per decoder block, on the compute device.

    The caller gathers statistics and prunes the block. If it leaves `step.outputs` unset,
    the pruned block is run once more here; either way those outputs become the next
    block's inputs."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    inputs, kwargs = capture_block_inputs(model, calib, cfg.device, cfg.offload)
    for i, block in enumerate(tqdm(layers, desc=desc, unit="block", leave=False)):
        if cfg.offload:
            block.to(cfg.device)
        step = BlockStep(i, block, inputs, kwargs)
        yield step
        inputs = step.outputs if step.outputs is not None else run_block(block, inputs, kwargs, cfg.batch_size)
        if cfg.offload:
            block.to("cpu")
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()


def prune_block(step: BlockStep, linears: dict[str, nn.Linear], cfg: PruneSettings,
                accumulate: Callable[[str, torch.Tensor], None], prune_linear: Callable[[str, nn.Linear], None]) -> None:
    """Gather statistics with `accumulate(name, x)` and prune with `prune_linear(name, linear)`,
    in the order ``cfg.pruner.sequential`` asks for (see :class:`CalibratedPruner`).

    Sequential: with the whole batch in one forward, one pass does both (see
    prune_on_first_call); with micro-batches, one pass over all of them per group of layers
    that read the same input (q/k/v, o, gate/up, down), pruning each group before the next
    group's statistics are gathered. Not sequential: one pass over the dense block gathers
    every layer's statistics, then all are pruned, then the pruned block is run again for the
    next block's inputs."""
    batch = cfg.batch_size
    if not cfg.pruner.sequential:
        with input_hooks(linears, accumulate):
            run_block(step.block, step.inputs, step.kwargs, batch)
        for name, lin in linears.items():
            prune_linear(name, lin)
        return
    if batch >= len(step.inputs):
        def once(name, lin, x):
            accumulate(name, x)
            prune_linear(name, lin)

        with prune_on_first_call(linears, once):
            step.outputs = run_block(step.block, step.inputs, step.kwargs, len(step.inputs))
        return
    for group in input_groups(step, linears):
        with input_hooks({n: linears[n] for n in group}, accumulate):
            run_block(step.block, step.inputs, step.kwargs, batch)
        for name in group:
            prune_linear(name, linears[name])


@torch.no_grad()
def input_groups(step: BlockStep, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """The block's Linear layers in the order they run, grouped by shared input tensor
    (q/k/v read one tensor, gate/up another), found by running one sample through the block."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, a[0])))
               for name, mod in linears.items()]
    with removing(handles):
        run_block(step.block, step.inputs[:1], step.kwargs, 1)
    groups: list[list[str]] = []
    last = None
    for name, x in calls:
        if name in {n for g in groups for n in g}:
            continue
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


# --------------------------------------------------------------------------- second-order statistics
# Shared by SparseGPT (prunerep/pruners/sparsegpt.py) and GPTQ (prunerep/quant/gptq.py): the same
# Hessian of the layer-wise reconstruction error, the same damped inverse.

class RunningHessians:
    """H = (2/n)·Σ x xᵀ over the n calibration tokens seen so far, one per Linear layer (float32),
    kept as a running mean (the reference code's ``add_batch``). Pass it as the ``accumulate`` of
    :func:`prune_block`; :meth:`pop` hands a layer's H over and frees it."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.hess = {n: torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device, dtype=torch.float32)
                     for n, lin in linears.items()}
        self.seen = {n: 0 for n in linears}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        t = x.shape[0]
        self.hess[name] *= self.seen[name] / (self.seen[name] + t)
        self.seen[name] += t
        x = x * (2.0 / self.seen[name]) ** 0.5
        self.hess[name] += x.T @ x

    def pop(self, name: str) -> torch.Tensor:
        return self.hess.pop(name)


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
    """Zero fraction of every prunable module and overall, the N:M check, the embedding/head
    untouched check. This is what was done, measured on the weights, not what was asked."""
    modules, total, zeros = {}, 0, 0
    nm_ok = True
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(block, cfg.pruner).items():
            w = lin.weight
            z = int((w == 0).sum())
            modules[f"layers.{i}.{name}"] = z / w.numel()
            total += w.numel()
            zeros += z
            if cfg.spec.is_nm and w.shape[1] % cfg.spec.m == 0:
                groups = (w == 0).reshape(w.shape[0], -1, cfg.spec.m).sum(-1)
                nm_ok &= bool((groups >= cfg.spec.n).all())
    head = output_head(model).weight
    report = {
        "target": str(cfg.spec),
        "target_ratio": cfg.spec.ratio,
        "achieved_sparsity": zeros / total if total else 0.0,
        "n_params_prunable": total,
        "n_zeros": zeros,
        "max_abs_deviation_pp": 100 * max((abs(v - cfg.spec.ratio) for v in modules.values()), default=0.0),
        "lm_head_sparsity": float((head == 0).float().mean()),
        "modules": modules,
    }
    if cfg.spec.is_nm:
        report["nm_check"] = {"pattern": str(cfg.spec), "holds": nm_ok}
    return report


def mean_cos_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of 1 − cos(a, b) (LLM-Drop's importance)."""
    cos = torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return float((1 - cos).mean())


__all__ = ["PruneSettings", "Pruner", "CalibratedPruner", "prunable_linears", "mask_for", "per_row_mask", "nm_mask",
           "lowest_k_mask", "apply_mask", "capture_block_inputs", "run_block", "input_hooks", "input_groups",
           "calibrated_blocks", "prune_block", "prune_on_first_call", "BlockStep", "measure_sparsity",
           "mean_cos_distance", "n_pruned", "RunningHessians", "inverse_hessian_cholesky"]
