"""Row pairs (h_dense, h_pruned) through the logit lens and the vocabulary-sized metrics, in full
chunks of ``plan.token_chunk`` rows: :class:`LensStream`, and :func:`lens_pair` for a single pair."""
from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor, nn

from prunerep.model.anatomy import lens_buffer, lens_rows
from prunerep.model.placement import lens_device
from prunerep.probes import metrics as M
from prunerep.probes.plan import ProbePlan

@contextmanager
def intra_op_threads(n: int | None, device: torch.device):
    """Temporarily use ``n`` CPU threads (None: leave torch's setting)."""
    if n is None or device.type != "cpu" or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _bits(t: Tensor) -> bytes:
    """The exact bytes of a tensor of any dtype (numpy has no bfloat16)."""
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def _lens_key(h_dense: Tensor, h_pruned: Tensor) -> tuple:
    """The memo key of one row pair's logits (the memo of :mod:`.contexts`, shared)."""
    return ("lens", _bits(h_dense), _bits(h_pruned))


def _row(parts: list[Tensor], i: int) -> Tensor:
    """Row ``i`` of the concatenation of ``parts``."""
    for t in parts:
        if i < t.shape[0]:
            return t[i]
        i -= t.shape[0]
    raise IndexError(i)


def lens_pair(model: nn.Module, hd: Tensor, hp: Tensor, memo: dict | None = None, out: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """:func:`~prunerep.model.anatomy.lens_rows` of both sides in ONE LM-head matmul (the [V, d]
    head, 2 GB for a 7B model in float32, is read once, not twice), into ``out`` where given
    (:func:`~prunerep.model.anatomy.lens_buffer`); a single row pair that :class:`LensStream`
    kept in ``memo`` comes from there."""
    if memo is not None and hd.shape[0] == 1 == hp.shape[0]:
        got = memo.get(_lens_key(hd[0], hp[0]))
        if got is not None:
            return got
    zd, zp = lens_rows(model, [hd, hp], out=out)
    return zd, zp


class LensStream:
    """Row pairs (h_dense, h_pruned) of any prompt, context and layer through the logit lens and
    :func:`~prunerep.probes.metrics.vocab_metrics`, in full chunks of ``token_chunk`` rows: the LM
    head (a multi-GB read for a 7B model) is read once per chunk, however short the prompts and
    contexts. Each segment (:meth:`add`) gets its rows' metrics (float64, CPU) through its
    callback once all of them are through, and callbacks (:meth:`then` too) run in the order they
    were registered, so the table comes out the same whatever the chunk size; each row's values do
    not depend on the chunking either (see :func:`lens_rows`). Rows asked to be kept go into
    ``memo``, where :func:`lens_pair` finds them."""

    def __init__(self, model: nn.Module, plan: ProbePlan, memo: dict | None = None):
        self.model, self.device, self.plan, self.memo = model, lens_device(model), plan, memo
        self.kernel = plan.kernel_on(self.device)
        self.blocks: deque = deque()  # pending [h_dense, h_pruned] row blocks, in order
        self.pending = 0
        self.added = self.done = 0  # rows registered / through the lens
        self.segments: deque = deque()  # [start, n, parts, callback, options, keep]
        # the LM head writes every chunk's logits into this one buffer (views of it live until the
        # chunk's metrics are taken); False: the head takes its own call (lens_buffer's None)
        self.buffer: Tensor | None | bool = False

    def add(self, h_dense: Tensor, h_pruned: Tensor, callback, options=None, keep: Sequence[int] = ()) -> None:
        """``callback(per_row)`` with ``{(space, metric, T): [n]}`` once the rows are through.
        ``options = (row, option_ids, into)``: the option subspace at that row (a multiple-choice
        answer position) from the same logits, ``into[(metric, T)] = value``. ``keep``: rows whose
        logits go into the memo."""
        n = h_dense.shape[0]
        if n == 0:
            return self.then(lambda: None)
        self.segments.append([self.added, n, [], callback, options, tuple(keep)])
        self.added += n
        self.blocks.append([h_dense, h_pruned])
        self.pending += n
        while self.pending >= self.plan.token_chunk:
            self._run(self.plan.token_chunk)

    def then(self, callback) -> None:
        """``callback()`` once every segment added before is done (right away if there is none)."""
        self.segments.append([self.added, 0, [], lambda _: callback(), None, ()])
        self._complete()

    def flush(self) -> None:
        while self.pending:
            self._run(min(self.pending, self.plan.token_chunk))
        self._complete()

    def release(self) -> None:
        """Copy the pending rows (views into one prompt's states), so those states can be freed."""
        for b in self.blocks:
            b[0], b[1] = b[0].clone(), b[1].clone()

    def _run(self, n: int) -> None:
        hd, hp = [], []
        while len(hd) == 0 or sum(x.shape[0] for x in hd) < n:
            bd, bp = self.blocks[0]
            k = min(n - sum(x.shape[0] for x in hd), bd.shape[0])
            hd.append(bd[:k])
            hp.append(bp[:k])
            if k == bd.shape[0]:
                self.blocks.popleft()
            else:
                self.blocks[0] = [bd[k:], bp[k:]]
        self.pending -= n
        start = self.done
        if self.buffer is False:
            self.buffer = lens_buffer(self.model, self.plan.token_chunk, sides=2)
        zd, zp = lens_pair(self.model, torch.cat(hd).to(self.device), torch.cat(hp).to(self.device), self.memo,
                           self.buffer)
        for seg_start, seg_n, _parts, _cb, options, keep in self.segments:
            if seg_start >= start + n:
                break
            if options is not None and start <= seg_start + options[0] < start + n:
                self._options(zd, zp, seg_start + options[0] - start, *options[1:])
            for r in keep:
                if self.memo is not None and start <= seg_start + r < start + n:
                    i = seg_start + r - start
                    self.memo[_lens_key(_row(hd, i), _row(hp, i))] = (zd[i:i + 1].clone(), zp[i:i + 1].clone())
        plan = self.plan
        with intra_op_threads(plan.metric_threads, self.device):
            per_row = M.vocab_metrics(zd, zp, plan.temperatures, plan.topk, logit="logit" in plan.spaces,
                                      probability="probability" in plan.spaces, compiled=self.kernel == "compiled",
                                      fused=self.kernel == "fused")
        per_row = {k: v.to("cpu", torch.float64) for k, v in per_row.items()}
        del zd, zp
        self.done += n
        for seg in self.segments:
            seg_start, seg_n, parts = seg[0], seg[1], seg[2]
            if seg_start >= start + n:
                break
            lo, hi = max(seg_start, start), min(seg_start + seg_n, start + n)
            if hi > lo:
                parts.append({k: v[lo - start:hi - start] for k, v in per_row.items()})
        self._complete()

    def _complete(self) -> None:
        while self.segments and self.segments[0][0] + self.segments[0][1] <= self.done:
            _start, _n, parts, callback, _options, _keep = self.segments.popleft()
            callback({k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {})

    def _options(self, zd: Tensor, zp: Tensor, i: int, option_ids, into: dict) -> None:
        got = {(m, math.nan): v for m, v in M.option_metrics(zd[i:i + 1], zp[i:i + 1], option_ids).items()
               if m == "top1_agree"}
        for t in self.plan.temperatures:
            got.update({(m, t): v for m, v in M.option_metrics(zd[i:i + 1], zp[i:i + 1], option_ids, t).items()
                        if m != "top1_agree"})
        into.update({k: float(v[0]) for k, v in got.items()})
