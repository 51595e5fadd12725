"""A model compressed elsewhere: the dense model comes from ``model=`` as usual, and its weights are
replaced by a checkpoint's (``pruner.path``: a local directory or a hub id) -- prunerep's own
``save_model=true`` output, the reference Wanda/SparseGPT scripts' ``save_pretrained`` output, or
llm-compressor's compressed-tensors format (decompressed by the ``compressed-tensors`` package:
:mod:`prunerep.model.checkpoint`). Everything after the prune stage (sparsity and bits measured
on the weights, probes, evaluations) runs as for prunerep's own pruners.

A depth-pruned checkpoint (fewer blocks) puts each kept block at its dense index and makes every
other block the identity on the residual stream (its weight targets zeroed: it adds exactly
nothing, so the model computes what the shorter one does), so each probed layer compares the
dense block with the block that replaced it. The dense index of each kept block is
``pruner.layer_map``, or is matched by weights: the assignment, in order, that minimises the
relative distance between a sample of the checkpoint block's weights and the dense block's."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from prunerep.compress.method import Pruner
from prunerep.errors import ConfigError
from prunerep.model.anatomy import SUBLAYER_KINDS, block_targets, decoder_layers, make_identity
from prunerep.model.checkpoint import (Checkpoint, layer_index, open_checkpoint, renumbered, stored_shapes,
                                       to_model_format)
from prunerep.model.identity import dir_identity
from prunerep.model.placement import onloaded
from prunerep.results.store import stable_hash

log = logging.getLogger(__name__)

#: a checkpoint block whose weights are further than this (relative squared distance of the
#: samples) from every dense block cannot be placed: two unrelated matrices are at ~2
MAX_MATCH_DISTANCE = 1.0
#: weights per matrix sampled to match blocks
MATCH_SAMPLES = 4096


@dataclass
class External(Pruner):
    name: str = "external"
    path: Optional[str] = None  # a local directory or hub id of the compressed weights
    revision: Optional[str] = None  # of a hub id
    layer_map: Optional[List[int]] = None  # fewer blocks: the dense index of each kept block; null: matched by weights

    prunes_weights: ClassVar[bool] = False  # it reads weights; it reaches no targets of its own
    meets_target: ClassVar[bool] = False  # the checkpoint's sparsity is what it is: measured, not promised

    def validate(self, spec) -> None:
        super().validate(spec)
        if not self.path:
            raise ConfigError("pruner=external needs pruner.path: a local directory or hub id of the compressed weights")
        if self.layer_map is not None:
            m = list(self.layer_map)
            if not m or any(i < 0 for i in m) or any(b <= a for a, b in zip(m, m[1:])):
                raise ConfigError(f"pruner.layer_map={m} must list the dense index of each kept block, increasing, "
                                  f"from 0")

    def checkpoint(self) -> Checkpoint:
        """The checkpoint's headers and config, read once (a hub id not cached is downloaded)."""
        if getattr(self, "_checkpoint", None) is None:
            self._checkpoint = open_checkpoint(self.path, self.revision)
        return self._checkpoint

    def files_identity(self) -> Optional[str]:
        return stable_hash(dir_identity(self.checkpoint().dir))

    def storage(self) -> Optional[dict]:
        return self.checkpoint().storage()

    def check(self, model, settings) -> None:
        """The checkpoint against the dense model (its skeleton will do): the same architecture and
        vocabulary, no more blocks, and every tensor where the dense model has it, in its shape."""
        ckpt, what = self.checkpoint(), f"pruner.path={self.path!r}"
        dense = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        theirs = ckpt.text_config
        guessed = getattr(model.config, "vocab_guessed", False)  # a random model's skeleton: known at loading
        for key in ("model_type",) + (() if guessed else ("vocab_size",)) + ("hidden_size",):
            if key in theirs and theirs[key] != getattr(dense, key, None):
                raise ConfigError(f"{what} is a model with {key}={theirs[key]!r}; the dense model has "
                                  f"{key}={getattr(dense, key, None)!r}")
        n_dense, n_kept = len(decoder_layers(model)), ckpt.n_layers
        if n_kept > n_dense:
            raise ConfigError(f"{what} has {n_kept} blocks; the dense model has {n_dense}")
        if self.layer_map is not None:
            if len(self.layer_map) != n_kept or max(self.layer_map) >= n_dense:
                raise ConfigError(f"pruner.layer_map={list(self.layer_map)} must give one dense index in 0..{n_dense - 1} "
                                  f"for each of the checkpoint's {n_kept} blocks")
        # the names and shapes a checkpoint of the dense model holds, as transformers saves it (fused
        # experts one matrix per expert), or in the model's own format
        stored = stored_shapes(model.config)
        shapes = {**{n: tuple(t.shape) for n, t in model.state_dict().items()}, **stored}
        at = dict(enumerate(self.layer_map)) if self.layer_map is not None else {j: j for j in range(n_kept)}
        given = ckpt.weight_shapes()
        for name, shape in given.items():
            p = layer_index(name)
            if p is not None and p[1] >= n_kept:
                raise ConfigError(f"{what}: {name} is in block {p[1]}, but the checkpoint has {n_kept} blocks")
            theirs_name = renumbered(name, at)
            if theirs_name not in shapes:
                raise ConfigError(f"{what}: {name} is not a tensor of the dense model ({type(model).__name__})")
            if tuple(shape) != shapes[theirs_name] and not (guessed and shape[0] == theirs.get("vocab_size")):
                raise ConfigError(f"{what}: {name} is {list(shape)} in the checkpoint, {list(shapes[theirs_name])} in "
                                  f"the dense model")
        kept = {renumbered(n, at) for n in given}
        blocks_kept = set(at.values())
        tied = set(model.state_dict()) - {n for n, _ in model.named_parameters()} - {n for n, _ in model.named_buffers()}
        if not kept & stored.keys():  # the model's own format
            stored = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        for name in stored:
            p = layer_index(name)
            if name not in kept and name not in tied and (p is None or p[1] in blocks_kept):
                raise ConfigError(f"{what} has no {name}, which the dense model has")

    @torch.no_grad()
    def prune(self, model, calib, settings) -> dict:
        ckpt = self.checkpoint()
        dtype = next(model.parameters()).dtype
        layers = decoder_layers(model)
        at, how, distances = self.place_blocks(model, ckpt, dtype)
        quantized: list[str] = []
        for j, names in ckpt.block_names():
            tensors, modules = ckpt.read(names, dtype)
            for module in modules:
                p = layer_index(module + ".")
                if p is not None:
                    quantized.append(f"layers.{at[p[1]]}.{p[2][1:-1]}")
            for name, t in to_model_format(model.config, tensors, j, dtype).items():
                dense_name = renumbered(name, at)
                owner_name, _, attr = dense_name.rpartition(".")
                owner = model.get_submodule(owner_name)
                with onloaded(owner):
                    target = getattr(owner, attr)
                    if target.shape != t.shape:  # only a vocabulary not known before loading gets here
                        raise ConfigError(f"pruner.path={self.path!r}: {name} is {list(t.shape)} in the checkpoint, "
                                          f"{list(target.shape)} in the dense model")
                    target.copy_(t)
        dropped = sorted(set(range(len(layers))) - set(at.values()))
        for i in dropped:  # the identity on the residual stream, and nothing of it stored
            with onloaded(layers[i]):
                for t in block_targets(layers[i], r".*", None, True).values():
                    t.weight.zero_()
                for kind in SUBLAYER_KINDS:
                    make_identity(layers[i], kind)
        report = {"method": self.name, "calibration": False, "path": self.path, "revision": self.revision,
                  "files": self.files_identity(), "format": self.format_name(ckpt), "n_tensors": len(ckpt.files),
                  "layer_map": {str(j): i for j, i in at.items()}, "layer_map_from": how, "dropped_blocks": dropped}
        if distances is not None:
            report["layer_match_distance"] = {str(j): round(d, 6) for j, d in distances.items()}
        if ckpt.storage() is not None:
            report["quantization"] = {**ckpt.storage(), "modules": sorted(quantized)}
        return report

    @staticmethod
    def format_name(ckpt: Checkpoint) -> str:
        if ckpt.quant is None:
            return "safetensors"
        return "compressed-tensors:" + ",".join(sorted(set(ckpt.formats.values())))

    def place_blocks(self, model, ckpt: Checkpoint, dtype) -> tuple[dict[int, int], str, Optional[dict]]:
        """``({checkpoint block: dense block}, how it was found, the match distances or None)``."""
        n_dense, n_kept = len(decoder_layers(model)), ckpt.n_layers
        if self.layer_map is not None:
            return dict(enumerate(self.layer_map)), "pruner.layer_map", None
        if n_kept == n_dense:
            return {j: j for j in range(n_kept)}, "same depth", None
        cost = self.match_costs(model, ckpt, dtype)
        at = monotone_assignment(cost)
        distances = {j: float(cost[j][i]) for j, i in at.items()}
        worst = max(distances, key=distances.get)
        if distances[worst] > MAX_MATCH_DISTANCE:
            raise ConfigError(f"pruner.path={self.path!r}: block {worst} of the checkpoint matches no dense block (its "
                              f"weights' relative distance to the nearest in order is {distances[worst]:.2f}); give "
                              f"pruner.layer_map (the dense index of each kept block)")
        log.info("external checkpoint: %d of %d blocks kept, matched to dense blocks %s", n_kept, n_dense,
                 list(at.values()))
        return at, "matched", distances

    def match_costs(self, model, ckpt: Checkpoint, dtype) -> list[list[float]]:
        """Relative squared distance ``|s_ckpt - s_dense|^2 / |s_dense|^2`` between samples of the
        2-D weights of every checkpoint block and every dense block."""
        layers = decoder_layers(model)
        blocks = dict(ckpt.block_names())
        theirs = []
        for j in range(ckpt.n_layers):
            tensors, _ = ckpt.read(blocks.get(j, []), dtype)
            tensors = to_model_format(model.config, tensors, j, dtype)
            theirs.append({layer_index(n)[2]: sample(t) for n, t in tensors.items() if t.dim() >= 2})
        cost = [[0.0] * len(layers) for _ in theirs]
        for i, block in enumerate(layers):
            with onloaded(block):
                params = {"." + n: p for n, p in block.named_parameters()}
                for j, mine in enumerate(theirs):
                    num = den = 0.0
                    for suffix, s in mine.items():
                        ref = sample(params[suffix])
                        num += float((s - ref).square().sum())
                        den += float(ref.square().sum())
                    cost[j][i] = num / den if den else float("inf")
        return cost


def sample(w: torch.Tensor) -> torch.Tensor:
    """A fixed strided sample of a matrix's entries (float32, on the CPU)."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // MATCH_SAMPLES)
    return flat[::step][:MATCH_SAMPLES].float().cpu()


def monotone_assignment(cost: list[list[float]]) -> dict[int, int]:
    """Kept block j -> dense block i, increasing in j, minimising the summed cost (dynamic programming)."""
    k, n = len(cost), len(cost[0])
    inf = float("inf")
    best = [[inf] * n for _ in range(k)]
    back = [[-1] * n for _ in range(k)]
    for i in range(n):
        best[0][i] = cost[0][i]
    for j in range(1, k):
        run, arg = inf, -1
        for i in range(n):
            if i >= 1 and best[j - 1][i - 1] < run:
                run, arg = best[j - 1][i - 1], i - 1
            best[j][i] = run + cost[j][i]
            back[j][i] = arg
    i = min(range(n), key=lambda x: best[k - 1][x])
    out = {}
    for j in range(k - 1, -1, -1):
        out[j] = i
        i = back[j][i]
    return dict(sorted(out.items()))
