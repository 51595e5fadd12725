"""lm-eval's HFLM around the in-memory model, with log-likelihood batches bounded by memory.

lm-eval scores a batch of log-likelihood requests from the logits and their log-softmax over the
whole vocabulary at every position (``[batch, length, vocab]`` each): 1.2 GB per 2k-token sequence
for a 150k vocabulary in float32, so a fixed batch of 16 can need more memory than the model. Each
call here lowers the batch size to what :func:`logits_budget` allows for its longest request (the
batch lm-eval pads every request of a batch to); where the budget allows the configured size, the
batches -- and so the numbers -- are lm-eval's own.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM

from prunerep.model.placement import input_device, lens_device

log = logging.getLogger(__name__)

#: a batch's logits are held about this many times (the logits, their log-softmax, a float32 copy)
LOGIT_COPIES = 3
#: the default budget: this share of the free memory of the device holding the logits, at most
FREE_SHARE, MAX_BUDGET_BYTES = 0.25, 1 << 30


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate (CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration, ValueError):
        return MAX_BUDGET_BYTES / FREE_SHARE


def logits_budget(device: torch.device, budget_mb: int | None) -> int:
    """Bytes a batch's logits may take: ``task.logits_memory_mb``, else a quarter of the free
    memory, at most 1 GiB."""
    if budget_mb is not None:
        return int(budget_mb) << 20
    return int(min(MAX_BUDGET_BYTES, FREE_SHARE * free_memory(device)))


def fitting_batch(length: int, vocab: int, budget: int, batch_size: int) -> int:
    """The largest batch <= ``batch_size`` whose logits (``LOGIT_COPIES`` float32 copies of
    ``[batch, length, vocab]``) fit in ``budget`` bytes; at least 1."""
    per_sequence = LOGIT_COPIES * 4 * max(1, length) * max(1, vocab)
    return max(1, min(batch_size, budget // per_sequence))


class BoundedHFLM(HFLM):
    """HFLM on the in-memory model (never reloaded), its log-likelihood batches bounded by memory."""

    def __init__(self, model, tokenizer, batch_size: int, logits_memory_mb: int | None = None):
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        disabled, hf_log.disabled = hf_log.disabled, True  # its two warnings about being handed a model
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            hf_log.disabled = disabled
        self._device = input_device(model)  # HFLM takes model.device: meta for an offloaded model
        self._budget = logits_budget(lens_device(model), logits_memory_mb)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        configured = self.batch_size_per_gpu
        longest = min(max((len(ctx) + len(cont) for _, ctx, cont in requests), default=1), self.max_length + 1)
        fits = fitting_batch(longest, self._vocab, self._budget, int(configured))
        if fits < configured:
            log.info("log-likelihood batches of %d (not %d): %d tokens x %d vocabulary within %.0f MB", fits,
                     configured, longest, self._vocab, self._budget / 2**20)
        self.batch_size_per_gpu = fits
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=None if override_bs is None else min(override_bs, fits))
        finally:
            self.batch_size_per_gpu = configured
