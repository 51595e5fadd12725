"""Calibration token windows for pruners that look at activations.

Offline default: English prose that ships with CPython (`pydoc_data.topics`, the text of
the language reference's help topics) -- minus the topics of :data:`PYDOC_EVAL_TOPICS`, which
are held out as the offline perplexity text (``pydoc_ppl``, :mod:`prunerep.evals.perplexity`)
so that no calibration window is ever evaluated on. Online: C4's validation shard through `datasets`
(as in the Wanda and SparseGPT papers). Or any UTF-8 text file. Windows of `seqlen`
tokens are drawn at seeded random offsets from the tokenised corpus."""
from __future__ import annotations

import random

import torch
from pydoc_data.topics import topics

from prunerep.errors import ConfigError


#: pydoc topics held out of calibration: the offline perplexity text. Prose topics that share
#: no 8-word span with any other topic (tests/test_evals_families.py checks it against every
#: calibration window).
PYDOC_EVAL_TOPICS = ("conversions", "global", "import", "lambda", "numbers", "objects", "slicings", "truth",
                     "yield")


def pydoc_topics(split: str = "calibration") -> dict[str, str]:
    """``{topic: text}`` in sorted order: the calibration topics, or the held-out ``"eval"`` ones."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', not {split!r}")
    held = set(PYDOC_EVAL_TOPICS)
    return {k: topics[k] for k in sorted(topics) if (k in held) == (split == "eval")}


def pydoc_text() -> str:
    """The calibration text: every pydoc topic except the held-out :data:`PYDOC_EVAL_TOPICS`."""
    return "\n\n".join(pydoc_topics("calibration").values())


def load_hub_dataset(*args, **kwargs):
    """``datasets.load_dataset``: C4 here; WikiText and BEIR SciFact for the evaluations."""
    from datasets import load_dataset  # ~1 s to import: only where the Hugging Face Hub is used

    return load_dataset(*args, **kwargs)


def c4_text(max_docs: int = 2000) -> str:
    ds = load_hub_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
    return "\n\n".join(ds[i]["text"] for i in range(min(max_docs, len(ds))))


def calibration_text(ccfg) -> str:
    if ccfg.source == "pydoc":
        return pydoc_text()
    if ccfg.source == "c4":
        return c4_text()
    with open(ccfg.path, encoding="utf-8") as f:
        return f.read()


def calibration_windows(token_ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` consecutive tokens at seeded random offsets: [nsamples, seqlen]."""
    if len(token_ids) <= seqlen:
        raise ValueError(f"calibration corpus has {len(token_ids)} tokens, fewer than calib.seqlen={seqlen}")
    rng = random.Random(seed)
    ids = torch.tensor(token_ids, dtype=torch.long)
    starts = [rng.randrange(0, len(token_ids) - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def calibration_batch(ccfg, tokenizer) -> torch.Tensor:
    text = calibration_text(ccfg)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        return calibration_windows(ids, ccfg.nsamples, ccfg.seqlen, ccfg.seed)
    except ValueError as e:
        raise ConfigError(f"calib.source={ccfg.source}: {e}") from None
