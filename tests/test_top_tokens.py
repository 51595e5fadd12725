"""The top-token table (prunerep/probes/top_tokens.py): the dense top-k at each answer / first-step
position with both models' probabilities, against the models' own logits and a softmax taken here."""
from __future__ import annotations

from functools import partial

import pandas as pd
import pytest
import torch

from helpers import CHAR_PROMPTS, probe_plan, prune_modules
from prunerep.probes import compare_to_reference, dense_reference
from prunerep.probes import top_tokens as TT
from prunerep.viz.probes import write_probe_outputs

PROMPTS = CHAR_PROMPTS
TINY_TOKENIZER, TINY_LAYERS = "char_tok", 2  # conftest's tiny
TEMPS = [0.5, 1.0]

plan = partial(probe_plan, n_prompts=2, max_new_tokens=3, temperatures=TEMPS,
               contexts=["prompt", "teacher_forced", "free_running"])


@torch.no_grad()
def next_token_logits(model, ids) -> torch.Tensor:
    return model(torch.tensor(ids).unsqueeze(0)).logits[0, -1]


def test_the_dense_top_30_in_order_with_both_probabilities(tiny, char_tok, prompts_file, tmp_path):
    pruned = prune_modules(prune_modules(tiny, 0, "mlp"), 1, "attn")
    cfg = plan(prompts_file)
    ref = dense_reference(tiny, char_tok, cfg, tmp_path / "cache", model_key="tiny")
    result = compare_to_reference(pruned, char_tok, cfg, ref)
    table = result.top_tokens
    assert list(table.columns) == TT.COLUMNS
    assert set(table["where"]) == {"answer", "first_step"}
    for prompt in ref.prompts:
        zd, zp = next_token_logits(tiny, prompt.ids), next_token_logits(pruned, prompt.ids)
        want_ids = zd.double().argsort(descending=True)[:30].tolist()
        for t in TEMPS:
            got = table[(table["prompt_id"] == prompt.id) & (table["temperature"] == t)].sort_values("rank")
            assert got["rank"].tolist() == list(range(30))
            assert got["token_id"].tolist() == want_ids  # the dense top-30, in the dense order
            assert got["token"].tolist() == [char_tok.decode([i]) for i in want_ids]
            assert (got["position"] == len(prompt.ids) - 1).all()
            assert (got["where"] == ("answer" if prompt.kind == "mc" else "first_step")).all()
            p_dense = torch.softmax(zd.double() / t, dim=-1)[want_ids]
            p_pruned = torch.softmax(zp.double() / t, dim=-1)[want_ids]
            torch.testing.assert_close(torch.tensor(got["p_dense"].to_numpy()), p_dense, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(torch.tensor(got["p_pruned"].to_numpy()), p_pruned, rtol=1e-5, atol=1e-9)
            assert got["p_dense"].is_monotonic_decreasing
            assert not got["p_pruned"].equals(got["p_dense"])  # the pruned model is a real test

    run = tmp_path / "run"
    write_probe_outputs(result, run)
    back = pd.read_parquet(run / "top_tokens.parquet")
    pd.testing.assert_frame_equal(back, table)
    assert (run / "probes_top_tokens.png").stat().st_size > 0
    assert "top_tokens" not in pd.read_parquet(run / "probes.parquet").attrs


@pytest.mark.parametrize("contexts", [["teacher_forced"], ["free_running"]])
def test_without_the_prompt_context_the_first_step_still_has_its_top_tokens(tiny, char_tok, prompts_file, tmp_path,
                                                                           contexts):
    pruned = prune_modules(tiny, 0, "mlp")
    cfg = plan(prompts_file, contexts=contexts, max_new_tokens=2)
    table = compare_to_reference(pruned, char_tok, cfg, dense_reference(tiny, char_tok, cfg, tmp_path, model_key="tiny")
                                 ).top_tokens
    assert set(table["where"]) == {"first_step"}  # the MC prompt has no generated steps here
    gen = next(p for p in PROMPTS if "options" not in p)
    ids = char_tok(gen["prompt"])["input_ids"]
    got = table[table["temperature"] == 1.0].sort_values("rank")
    zd, zp = next_token_logits(tiny, ids), next_token_logits(pruned, ids)
    assert got["token_id"].tolist() == zd.argsort(descending=True)[:30].tolist()
    torch.testing.assert_close(torch.tensor(got["p_pruned"].to_numpy()),
                               torch.softmax(zp.double(), -1)[got["token_id"].tolist()], rtol=1e-5, atol=1e-9)


def test_off_switches(tiny, char_tok, prompts_file, tmp_path):
    for cfg in (plan(prompts_file, top_tokens=0), plan(prompts_file, spaces=["embedding", "logit"])):
        ref = dense_reference(tiny, char_tok, cfg, tmp_path, model_key="tiny")
        result = compare_to_reference(tiny, char_tok, cfg, ref)
        assert result.top_tokens.empty
        write_probe_outputs(result, tmp_path / "run")
        assert not (tmp_path / "run" / "top_tokens.parquet").exists()
    with pytest.raises(ValueError, match="top_tokens"):
        plan(prompts_file, top_tokens=-1)
    small = plan(prompts_file, top_tokens=5, contexts=["prompt"])
    ref = dense_reference(tiny, char_tok, small, tmp_path, model_key="tiny")
    table = compare_to_reference(tiny, char_tok, small, ref).top_tokens
    assert table.groupby(["prompt_id", "temperature"]).size().eq(5).all()
    assert (table["p_dense"] == table["p_pruned"]).all()  # dense vs dense


def test_top_probabilities_by_hand():
    zd = torch.tensor([0.0, 3.0, 1.0, 2.0])
    zp = torch.tensor([1.0, 0.0, 2.0, 2.0])
    ids, probs = TT.top_probabilities(zd, zp, 3, [1.0])
    assert ids.tolist() == [1, 3, 2]
    e = torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64).exp()
    torch.testing.assert_close(probs[1.0][0], (e / e.sum())[[1, 3, 2]])
    ids, _ = TT.top_probabilities(zd, zp, 30, [1.0])  # k capped at the vocabulary
    assert ids.tolist() == [1, 3, 2, 0]
