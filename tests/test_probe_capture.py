"""Hooks, logit lens, contexts, the dense-reference cache and the probe outputs, on tiny
random decoders (the embedded SmolLM2 tokenizer, so the vocabulary is the real one)."""
from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

import oracle as O
from conftest import make_tiny
from helpers import probe_plan, pruned_copy
from prunerep.config import ProbeConfig
from prunerep.model.anatomy import decoder_layers, final_norm
from prunerep.model.anatomy import lens_buffer, lens_logits, lens_rows, output_head
from prunerep.probes import build_plan, capture, compare_to_reference, dense_reference, load_prompts, resolve_layers
from prunerep.probes import contexts
from prunerep.probes.contexts import run_contexts
from prunerep.viz.probes import write_probe_outputs
from prunerep.results.schema import PROBE_COLUMNS as COLUMNS, RATIO_METRICS

PROMPTS = [
    {"prompt": "What is the capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:",
     "options": [" A", " B", " C", " D"]},
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"},
    {"prompt": "2 + 2 =\nA. 3\nB. 4\nAnswer:", "options": [" A", " B"]},
    {"prompt": "Question: A train travels 60 km in 2 hours. What is its speed?\nAnswer:"},
]
TINY_TOKENIZER, TINY_LAYERS = "smollm2_tok", 3  # conftest's tiny

probe_cfg = partial(probe_plan, n_prompts=4, max_new_tokens=5, temperatures=[0.5, 1.0],
                    sublayers=["block", "attn", "mlp"], token_chunk=256)


def prompts_of(plan, tok):
    return load_prompts(tok, plan.prompts, plan.n_prompts, plan.seed, plan.max_prompt_tokens)


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextmanager
def count_forwards(model):
    """Yields a list that gets one entry per forward through the model's first block."""
    calls: list = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------- hooks and lens

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lens_into_a_reused_buffer_is_bit_identical_and_a_hooked_head_keeps_its_call(dtype):
    """The logit lens writes into one reused buffer where the head is a plain Linear: the
    logits are those of the head's own call bit for bit, whatever was in the buffer. A head with
    a hook (offload, a user's) is called as a module, with its hook, and gets no buffer."""
    model = make_tiny("llama", num_hidden_layers=2).to(dtype)
    g = torch.Generator().manual_seed(3)
    hd, hp = (torch.randn(n, model.config.hidden_size, generator=g).to(dtype) for n in (13, 13))
    want = [output_head(model)(final_norm(model)(h)) for h in (hd, hp)]
    buf = lens_buffer(model, 32)
    assert buf.shape == (32, model.config.vocab_size) and buf.dtype == dtype
    buf.fill_(float("nan"))
    got = lens_rows(model, [hd, hp], out=buf)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].data_ptr() == buf.data_ptr()  # written into the buffer, not fresh memory
    calls = []
    handle = output_head(model).register_forward_hook(lambda *_: calls.append(1))
    try:
        assert lens_buffer(model, 32) is None
        got = lens_rows(model, [hd, hp], out=buf)
    finally:
        handle.remove()
    assert calls == [1] and got[0].data_ptr() != buf.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a head that autograd tracks keeps its own call too (out= takes no gradient)
    output_head(model).weight.requires_grad_(True)
    with torch.enable_grad():
        got = lens_rows(model, [hd, hp], out=buf)
    assert got[0].requires_grad and got[0].data_ptr() != buf.data_ptr()
    assert all(torch.equal(a.detach(), b) for a, b in zip(got, want))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hooks_match_output_hidden_states_and_lens_matches_logits(model_type):
    model = make_tiny(model_type)
    n = len(decoder_layers(model))
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    with capture(model, range(n + 1), ["block", "attn", "mlp"]) as acts:
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    for i in range(n):
        assert torch.equal(acts[(i, "block")], hs[i]), i
    assert not torch.equal(acts[(n, "block")], hs[n])  # the raw last state, before the final norm
    assert torch.equal(final_norm(model)(acts[(n, "block")]), hs[n])
    assert torch.equal(lens_logits(model, acts[(n, "block")]), out.logits)
    for i in range(1, n + 1):  # the sublayers are the updates of the residual stream
        assert torch.equal(acts[(i - 1, "block")] + acts[(i, "attn")] + acts[(i, "mlp")], acts[(i, "block")])
    assert (0, "attn") not in acts and (0, "mlp") not in acts


@pytest.mark.parametrize("model_type, kw, dtype", [
    ("llama", {}, torch.float32), ("qwen2", {}, torch.float32), ("gemma2", {"sliding_window": 4}, torch.float32),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.float32),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16),
    ("qwen2_moe", {}, torch.float16)])
def test_one_prefill_gives_each_context_what_its_own_forward_gives(model_type, kw, dtype):
    """run_contexts reads the prompt once, and each context's states are those of a plain forward
    over that context's whole sequence (to the dtype's rounding: a KV cache sums in another order);
    the free-running tokens are those of greedy decoding without a cache."""
    model = make_tiny(model_type, **kw).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 5 * torch.finfo(dtype).eps
    n = len(decoder_layers(model))
    g = torch.Generator().manual_seed(2)
    ids, forced = torch.randint(0, 256, (9,), generator=g), torch.randint(0, 256, (5,), generator=g)
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, range(n + 1), ["block"], prompt=True, decode_steps=5, teacher_forced=True,
                           forced=forced)
    assert len(calls) == 1 + 4 + 1  # the prefill, 4 decoding steps, one teacher-forced continuation

    def assert_states(states, seq, rows):  # layers 0..L-1 raw; transformers gives L after the final norm
        with torch.inference_mode():
            hs = model(seq.unsqueeze(0), output_hidden_states=True).hidden_states
        for layer, h in states.items():
            h = final_norm(model)(h) if layer == n else h
            torch.testing.assert_close(h, hs[layer][0, rows], rtol=tol, atol=tol)

    assert_states({la: got.prompt[(la, "block")] for la in range(n + 1)}, ids, slice(0, 9))
    assert_states({la: got.teacher_forced[(la, "block")] for la in range(n + 1)}, torch.cat([ids, forced[:4]]),
                  slice(8, 13))
    seq = ids
    with torch.inference_mode():
        for _ in range(5):
            seq = torch.cat([seq, model(seq.unsqueeze(0)).logits[0, -1].argmax().view(1)])
    assert got.free_running.tokens.tolist() == seq[9:].tolist()
    assert_states({n: got.free_running.h_last}, seq[:13], slice(8, 13))


def _greedy_without_cache(model, ids, n):
    seq = ids
    with torch.inference_mode():
        for _ in range(n):
            seq = torch.cat([seq, model(seq.unsqueeze(0)).logits[0, -1].argmax().view(1)])
    return seq[len(ids):]


@pytest.mark.parametrize("model_type, kw, dtype", [
    ("llama", {}, torch.float32), ("qwen2", {}, torch.float32), ("gemma2", {"sliding_window": 4}, torch.float32),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.float32),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16),
    ("qwen2_moe", {}, torch.float16)])
@pytest.mark.parametrize("part_at", [None, 0, 3])
def test_free_running_follows_the_teacher_forced_forward_until_the_tokens_part(model_type, kw, dtype, part_at,
                                                                              monkeypatch):
    """The free-running decode is read off the teacher-forced forward for as long as the model's
    greedy tokens are the forced ones, and decoded one token at a time only after they part
    (drafts off): a forced trajectory that is the model's own costs 2 forwards (prefill,
    continuation) for any length; one that parts at step k costs 2 + 1 + (n − k − 2) forwards.
    Either way the tokens are greedy decoding without a cache and the states those of a plain
    forward (the dtype's rounding)."""
    monkeypatch.setattr(contexts, "DRAFT_TOKENS", 0)
    model = make_tiny(model_type, **kw).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 5 * torch.finfo(dtype).eps
    n_layers, n = len(decoder_layers(model)), 6
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3))
    own = _greedy_without_cache(model, ids, n)
    forced = own.clone()
    if part_at is not None:
        forced[part_at] = (own[part_at] + 1) % 256
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, teacher_forced=True, forced=forced)
    want_calls = {None: 2, 0: 2 + 1 + 4, 3: 2 + 1 + 1}[part_at]
    assert len(calls) == want_calls
    assert got.free_running.tokens.tolist() == own.tolist()
    seq = torch.cat([ids, own[: n - 1]])
    with torch.inference_mode():
        hs = model(seq.unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(final_norm(model)(got.free_running.h_last), hs[n_layers][0, 8:14], rtol=tol, atol=tol)
    tf_seq = torch.cat([ids, forced[: n - 1]])
    with torch.inference_mode():
        hs = model(tf_seq.unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(final_norm(model)(got.teacher_forced[(n_layers, "block")]), hs[n_layers][0, 8:14],
                               rtol=tol, atol=tol)
    assert got.continuation.tolist() == forced.tolist()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_the_dense_trajectory_is_its_own_greedy_decode_followed_in_one_forward(model_type, monkeypatch):
    """Without a forced trajectory (the dense reference), the model decodes its own greedy tokens
    step by step (drafts off: one prefill, n − 1 steps), then follows them in one continuation
    forward; a stop token ends the trajectory (kept) and the continuation is along what was decoded."""
    monkeypatch.setattr(contexts, "DRAFT_TOKENS", 0)
    model = make_tiny(model_type)
    n_layers, n = len(decoder_layers(model)), 6
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(4))
    own = _greedy_without_cache(model, ids, n)
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, teacher_forced=True)
    assert len(calls) == 1 + (n - 1) + 1
    assert got.free_running.tokens.tolist() == own.tolist() == got.continuation.tolist()
    stop = int(own[2])
    got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, stop_ids=[stop], teacher_forced=True)
    first = own.tolist().index(stop)
    assert got.free_running.tokens.tolist() == own[: first + 1].tolist() == got.continuation.tolist()
    assert got.teacher_forced[(n_layers, "block")].shape[0] == first + 1


@pytest.mark.parametrize("model_type, kw, dtype", [
    ("llama", {}, torch.float32), ("gemma2", {"sliding_window": 4}, torch.float32),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16),
    ("qwen2_moe", {}, torch.float16)])
@pytest.mark.parametrize("draft_tokens, wrong_at, want_calls", [
    (4, None, 1 + 3 + 1),  # 4 draft tokens confirmed per forward: steps 1-5, 6-10, then 11 alone
    (4, 1, 1 + 6 + 1),  # the draft's second token wrong: 2 steps per forward (5 of them), then step 11 alone
    (4, 0, 1 + 11 + 1),  # every draft wrong at once: one step per forward, the cache cropped by 4 each time
    (2, None, 1 + 4 + 1)])  # 2 draft tokens: steps 1-3, 4-6, 7-9, 10-11
def test_a_draft_of_the_next_tokens_is_checked_in_one_forward_and_cropped_past_the_first_wrong_one(
        model_type, kw, dtype, draft_tokens, wrong_at, want_calls, monkeypatch):
    """The stepwise decode feeds a draft of the next tokens with each token (here the model's own
    greedy tokens, one of them made wrong): the steps the model's greedy tokens confirm are read
    off that forward, and the cache is cropped back past the first wrong draft token, a sliding
    window's included. The tokens are greedy decoding without a cache and the states a plain
    forward's, whatever the draft; the forwards are the prefill, the decoding forwards and the
    continuation the dense trajectory is followed in."""
    monkeypatch.setattr(contexts, "DRAFT_TOKENS", draft_tokens)
    model = make_tiny(model_type, **kw).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 5 * torch.finfo(dtype).eps
    n_layers, n = len(decoder_layers(model)), 12
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(6))
    own = _greedy_without_cache(model, ids, n)
    drafts = []

    def oracle_draft(seq, k):
        done = len(seq) - len(ids)  # the prompt, then the tokens decoded so far
        draft = own[done: done + k].tolist()
        if wrong_at is not None and len(draft) > wrong_at:
            draft[wrong_at] = (draft[wrong_at] + 1) % 256
        drafts.append(draft)
        return draft

    monkeypatch.setattr(contexts, "_draft", oracle_draft)
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n)
    assert len(calls) == want_calls
    assert max(len(d) for d in drafts) == draft_tokens
    assert got.free_running.tokens.tolist() == own.tolist()
    with torch.inference_mode():
        hs = model(torch.cat([ids, own[: n - 1]]).unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(final_norm(model)(got.free_running.h_last), hs[n_layers][0, 8:8 + n],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("model_type, kw", [("llama", {}), ("gemma2", {"sliding_window": 4})])
def test_the_decode_after_a_parting_drafts_on_from_the_prompt_and_the_tokens_so_far(model_type, kw, monkeypatch):
    """A forced trajectory that parts at step 3 of 12: steps 0-2 are read off the continuation,
    step 3 comes from one forward over the forced tokens before it and the model's own token,
    and the 8 steps after it are decoded with drafts that see the prompt and all 4 tokens so far
    (the model's own here, all right): 4, 5-9 and 10-11, two decoding forwards."""
    model = make_tiny(model_type, **kw)
    n_layers, n = len(decoder_layers(model)), 12
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(7))
    own = _greedy_without_cache(model, ids, n)
    forced = own.clone()
    forced[3] = (own[3] + 1) % 256
    seen = []

    def oracle_draft(seq, k):
        seen.append(list(seq))
        done = len(seq) - len(ids)
        return own[done: done + k].tolist()

    monkeypatch.setattr(contexts, "DRAFT_TOKENS", 4)
    monkeypatch.setattr(contexts, "_draft", oracle_draft)
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, teacher_forced=True, forced=forced)
    assert len(calls) == 1 + 1 + 1 + 2  # prefill, continuation, the forward at the parting, 2 decoding forwards
    assert seen[0] == ids.tolist() + own[:5].tolist()
    assert got.free_running.tokens.tolist() == own.tolist()
    with torch.inference_mode():
        hs = model(torch.cat([ids, own[: n - 1]]).unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(final_norm(model)(got.free_running.h_last), hs[n_layers][0, 8:8 + n],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["not croppable", "a recurrent state"])
def test_a_cache_that_cannot_be_rolled_back_decodes_one_token_per_forward(monkeypatch, how):
    """A cache whose ``crop`` cannot restore it, or one holding a linear-attention layer's
    recurrent state, is never fed a draft."""
    import transformers
    if how == "not croppable":
        monkeypatch.setattr(transformers.DynamicCache, "is_croppable", property(lambda self: False))
    else:
        monkeypatch.setattr(transformers.cache_utils.DynamicLayer, "recurrent_states", None, raising=False)
    monkeypatch.setattr(contexts, "_draft", lambda seq, k: pytest.fail("drafted on a cache that cannot be cropped"))
    model = make_tiny("llama")
    n_layers, n = len(decoder_layers(model)), 8
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(6))
    with count_forwards(model) as calls:
        got = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n)
    assert len(calls) == 1 + (n - 1) + 1
    assert got.free_running.tokens.tolist() == _greedy_without_cache(model, ids, n).tolist()


@pytest.mark.parametrize("seq, k, want", [
    ([5, 1, 2, 3, 9, 8, 7, 1, 2, 3], 4, [9, 8, 7, 1]),  # the last 3-gram's earlier occurrence
    ([2, 3, 4, 0, 3, 6, 1, 2, 3], 4, [4, 0, 3, 6]),  # the longest suffix that occurred: [2, 3], not [3]
    ([1, 9, 1, 8, 1], 2, [8, 1]),  # the latest earlier occurrence
    ([7, 1, 2, 7], 4, [1, 2, 7]),  # fewer than k tokens follow it
    ([4, 5, 4, 5], 0, []),  # no room for a draft
    ([1, 2, 3], 4, []),  # no suffix occurred before
    ([1], 4, [])])
def test_a_draft_is_what_followed_the_last_n_gram_where_it_occurred_before(seq, k, want):
    assert contexts._draft(seq, k) == want


def test_a_dense_trajectory_the_followed_lens_parts_from_is_followed_to_a_fixed_point(monkeypatch):
    """Where the lens's argmax of a followed state differs from the stepwise decode's (a near-tie
    in real models; here every followed step's lens is made to prefer one token), the dense
    trajectory becomes what following gives: its first token (the prefill's own logits), then
    that token at every later step. The model compared with itself along it gives the same tokens
    and bit-identical states."""
    model = make_tiny("llama")
    n_layers, n, boosted = len(decoder_layers(model)), 6, 7
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(5))
    own = _greedy_without_cache(model, ids, n)
    assert own[1:].tolist() != [boosted] * (n - 1)

    def preferring(model, h, **kw):
        z = lens_logits(model, h, **kw).clone()
        z[:, boosted] += 1e3
        return z

    monkeypatch.setattr(contexts, "lens_logits", preferring)
    dense = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, teacher_forced=True)
    again = run_contexts(model, ids, [n_layers], ["block"], decode_steps=n, teacher_forced=True,
                         forced=dense.continuation)
    assert dense.free_running.tokens.tolist() == dense.continuation.tolist() == [int(own[0])] + [boosted] * (n - 1)
    assert torch.equal(again.free_running.tokens, dense.free_running.tokens)
    assert torch.equal(again.free_running.h_last, dense.free_running.h_last)
    assert torch.equal(again.teacher_forced[(n_layers, "block")], dense.teacher_forced[(n_layers, "block")])


def test_hooks_are_removed_on_exit_even_after_an_error():
    model = make_tiny("qwen2")
    before = n_hooks(model)
    with capture(model, [0, 1, 3], ["block", "mlp"]):
        assert n_hooks(model) == before + 5
    assert n_hooks(model) == before
    with pytest.raises(RuntimeError):
        with capture(model, [2], ["attn"]):
            raise RuntimeError("boom")
    assert n_hooks(model) == before
    with pytest.raises(ValueError):
        with capture(model, [9], ["block"]):
            pass
    assert n_hooks(model) == before


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3, 4]
    assert resolve_layers({"every": 3}, 7) == [0, 3, 6, 7]  # the last layer is always probed
    assert resolve_layers([1, -1, 1], 5) == [1, 5]
    assert resolve_layers([2], 5, include_last=False) == [2]
    for bad in ([6], [-7], {"every": 0}, "some"):
        with pytest.raises(ValueError):
            resolve_layers(bad, 5)


# --------------------------------------------------------------------------- prompts

def test_offline_prompts_are_deterministic_and_half_multiple_choice(smollm2_tok):
    cfg = build_plan(ProbeConfig(prompts="offline", n_prompts=6, seed=3))
    prompts = prompts_of(cfg, smollm2_tok)
    assert [p.kind for p in prompts] == ["mc"] * 3 + ["gen"] * 3
    assert [p.ids for p in prompts] == [p.ids for p in prompts_of(cfg, smollm2_tok)]
    other = build_plan(ProbeConfig(prompts="offline", n_prompts=6, seed=4))
    assert [p.text for p in prompts] != [p.text for p in prompts_of(other, smollm2_tok)]
    mc = prompts[0]
    assert mc.text.endswith("\nD. " + mc.text.split("\nD. ")[1].split("\n")[0] + "\nAnswer:")
    assert mc.option_ids == tuple(smollm2_tok.encode(x, add_special_tokens=False)[0] for x in (" A", " B", " C", " D"))
    assert len(set(mc.option_ids)) == 4
    assert prompts[3].text.startswith("Question: ") and prompts[3].option_ids == ()


def test_jsonl_prompts_and_their_errors(smollm2_tok, prompts_file, tmp_path):
    prompts = prompts_of(probe_cfg(prompts_file, n_prompts=3, max_prompt_tokens=8), smollm2_tok)
    assert [p.kind for p in prompts] == ["mc", "gen", "mc"]
    assert all(len(p.ids) <= 8 for p in prompts)
    assert prompts[0].ids == tuple(smollm2_tok(PROMPTS[0]["prompt"])["input_ids"][-8:])  # keeps the answer end
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prompts_of(probe_cfg(bad), smollm2_tok)
    with pytest.raises(ValueError, match="missing.jsonl"):  # checked when the plan is built
        probe_cfg(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- reference and comparison

EXACT_ONE = {"cos", "cos_centred", "top1_agree", "top5_overlap", "top10_overlap", "token_agree"}
NOT_A_DIFFERENCE = {"entropy_dense", "entropy_pruned", "margin_dense", "margin_pruned", "first_divergence"}


def test_dense_vs_dense_is_exactly_identical_in_every_space_and_context(tiny, smollm2_tok, prompts_file, tmp_path):
    cfg = probe_cfg(prompts_file)
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    df = compare_to_reference(tiny, smollm2_tok, cfg, ref).table
    assert list(df.columns) == list(COLUMNS)
    assert set(df["context"]) == {"prompt", "teacher_forced", "free_running"}
    assert set(df["space"]) == {"embedding", "logit", "probability", "options", "answer", "tokens"}
    assert set(df["sublayer"]) == {"block", "attn", "mlp"}
    assert set(df["layer"]) == {0, 1, 2, 3}
    assert set(df.loc[df["sublayer"] != "block", "space"]) == {"embedding"}
    assert (df.loc[df["context"] == "teacher_forced", "step"] >= 0).all()
    for metric, values in df.groupby("metric")["value"]:
        if metric in EXACT_ONE:
            assert (values == 1.0).all(), metric
        elif metric == "first_divergence":
            steps = df[(df["context"] == "free_running") & (df["metric"] == "token_agree")]
            assert list(values) == list(steps.groupby("prompt_id").size())  # never diverged
        elif metric not in NOT_A_DIFFERENCE:
            assert (values == 0.0).all(), metric
    assert np.isfinite(df["value"]).all()


def test_second_dense_reference_is_a_cache_hit(tiny, smollm2_tok, prompts_file, tmp_path):
    cfg = probe_cfg(prompts_file, sublayers=["block"])
    with count_forwards(tiny) as calls:
        first = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    assert not first.from_cache and len(calls) > 0
    files = sorted(first.path.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    with count_forwards(tiny) as calls:  # other metric settings, same states: nothing is run again
        second = dense_reference(tiny, smollm2_tok, probe_cfg(prompts_file, sublayers=["block"], temperatures=[2.0],
                                                      token_chunk=7, spaces=["logit"]), tmp_path, model_key="tiny")
    assert second.from_cache and second.key == first.key
    assert calls == []
    assert [f.stat().st_mtime_ns for f in sorted(first.path.iterdir())] == stamps
    assert (first.path / "manifest.json").is_file() and first.path.parent.name == "probes"
    # another model identity, other weights or other prompts: another cache
    assert dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="other").key != first.key
    assert dense_reference(pruned_copy(tiny), smollm2_tok, cfg, tmp_path, model_key="tiny").key != first.key
    assert dense_reference(tiny, smollm2_tok, probe_cfg(prompts_file, sublayers=["block"], n_prompts=2), tmp_path,
                           model_key="tiny").key != first.key


def test_token_chunk_does_not_change_results(tiny, smollm2_tok, prompts_file, tmp_path):
    ref = dense_reference(tiny, smollm2_tok, probe_cfg(prompts_file), tmp_path, model_key="tiny")
    pruned = pruned_copy(tiny)
    small = compare_to_reference(pruned, smollm2_tok, probe_cfg(prompts_file, token_chunk=4), ref).table
    large = compare_to_reference(pruned, smollm2_tok, probe_cfg(prompts_file, token_chunk=4096), ref).table
    labels = [c for c in COLUMNS if c != "value"]
    pd.testing.assert_frame_equal(small[labels], large[labels])
    np.testing.assert_array_equal(small["value"], large["value"])  # bit-identical, not just close
    assert (small.loc[small["metric"] == "kl", "value"] > 0).any()  # the comparison is not trivial


def test_pruned_model_metrics_match_the_oracle(tiny, smollm2_tok, prompts_file, tmp_path):
    """The table's prompt-context values (means over the prompt positions) against the
    oracle's definitions applied to both models' states, captured here by hooks."""
    temps = (0.5, 1.0)
    cfg = probe_cfg(prompts_file, contexts=["prompt"], sublayers=["block", "mlp"], temperatures=list(temps))
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    pruned = pruned_copy(tiny)
    df = compare_to_reference(pruned, smollm2_tok, cfg, ref).table
    layers = ref.layers
    assert layers == [0, 1, 2, 3]
    n_checked = 0
    for prompt in ref.prompts:
        states = {}
        for side, model in (("dense", tiny), ("pruned", pruned)):
            with capture(model, layers, ["block", "mlp"]) as acts, torch.no_grad():
                model(torch.tensor(prompt.ids).unsqueeze(0))
            states[side] = {k: v[0] for k, v in acts.items()}
        for layer in layers:
            hd, hp = states["dense"][(layer, "block")], states["pruned"][(layer, "block")]
            zd, zp = lens_logits(pruned, hd), lens_logits(pruned, hp)  # the head is not pruned
            want = {("block", "embedding", m, math.nan): v for m, v in O.geometry(hd, hp).items()}
            want.update({("block", *k): v for k, v in O.vocab_metrics(zd, zp, temps, (5, 10)).items()})
            if layer > 0:
                mlp = O.geometry(states["dense"][(layer, "mlp")], states["pruned"][(layer, "mlp")])
                want.update({("mlp", "embedding", m, math.nan): v for m, v in mlp.items()})
            if prompt.option_ids:
                for t in temps:
                    opts = O.option_metrics(zd[-1:], zp[-1:], prompt.option_ids, t)
                    want.update({("block", "options", m, t): v for m, v in opts.items() if m != "top1_agree"})
                    want[("block", "answer", "kl", t)] = O.kl(O.log_probs(zd[-1:], t), O.log_probs(zp[-1:], t))
                want[("block", "options", "top1_agree", math.nan)] = O.top1_agree(zd[-1:, list(prompt.option_ids)],
                                                                                 zp[-1:, list(prompt.option_ids)])
                want[("block", "answer", "top1_agree", math.nan)] = O.top1_agree(zd[-1:], zp[-1:])
            got = df[(df["prompt_id"] == prompt.id) & (df["layer"] == layer) & ~df["metric"].isin(["kl_est_ratio", "cos_est_ratio"])]
            assert len(got) == len(want), (prompt.id, layer)
            for (sub, space, metric, t), v in want.items():
                row = got[(got["sublayer"] == sub) & (got["space"] == space) & (got["metric"] == metric)
                          & (got["temperature"].isna() if t != t else got["temperature"] == t)]
                assert len(row) == 1, (sub, space, metric, t)
                assert row["value"].item() == pytest.approx(v.mean().item(), rel=1e-4, abs=1e-6), \
                    (prompt.id, layer, sub, space, metric, t)
                n_checked += 1
    assert n_checked > 500
    final_kl = df[(df["layer"] == 3) & (df["metric"] == "kl") & (df["space"] == "probability")]["value"]
    assert (final_kl > 1e-3).all()  # the pruned model is far enough from the dense one to be a test


def test_compare_needs_a_matching_reference(tiny, smollm2_tok, prompts_file, tmp_path):
    ref = dense_reference(tiny, smollm2_tok, probe_cfg(prompts_file, layers=[1], contexts=["prompt"]), tmp_path,
                          model_key="tiny")
    assert ref.layers == [1, 3]
    with pytest.raises(ValueError, match="layers"):
        compare_to_reference(tiny, smollm2_tok, probe_cfg(prompts_file, layers=[2], contexts=["prompt"]), ref)
    with pytest.raises(ValueError, match="contexts"):
        compare_to_reference(tiny, smollm2_tok, probe_cfg(prompts_file, layers=[1]), ref)


def test_probe_none_and_empty_settings_run_no_model_and_write_nothing(tiny, smollm2_tok, prompts_file, tmp_path):
    for cfg in (build_plan(ProbeConfig(name="none")), probe_cfg(prompts_file, spaces=[]),
                probe_cfg(prompts_file, contexts=[])):
        assert cfg.empty
        with count_forwards(tiny) as calls:
            ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path / "cache", model_key="tiny")
            result = compare_to_reference(tiny, smollm2_tok, cfg, ref)
        assert calls == []
        assert result.table.empty and list(result.table.columns) == list(COLUMNS) and result.top_tokens.empty
        assert write_probe_outputs(result, tmp_path / "run") == {}
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_outputs_of_a_pruned_model(tiny, smollm2_tok, prompts_file, tmp_path):
    cfg = probe_cfg(prompts_file, sublayers=["block"])
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    result = compare_to_reference(pruned_copy(tiny), smollm2_tok, cfg, ref)
    df = result.table
    summary = write_probe_outputs(result, tmp_path / "run")
    for name in ("probes.parquet", "probes_summary.json", "probes_similarity.png", "probes_kl.png",
                 "probes_steps.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary left
    back = pd.read_parquet(tmp_path / "run" / "probes.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert json.loads((tmp_path / "run" / "probes_summary.json").read_text()) == summary
    assert summary["final_layer"] == 3 and summary["n_prompts"] == 4 and summary["nonfinite_values"] == 0
    keys = list(summary)
    for ctx in ("prompt", "teacher_forced", "free_running"):
        i = keys.index(f"{ctx}/probability/kl@T=1")
        assert keys[i + 2] == f"{ctx}/probability/kl_est@T=1"  # the estimate next to exact KL (T=0.5, T=1)
        assert 0 < summary[f"{ctx}/probability/kl@T=1"] < math.inf
        assert 0 < summary[f"{ctx}/embedding/one_minus_cos"] < 1
    assert "error_accumulation/kl@T=1" in summary and "prompt/options/kl@T=1" in summary
    assert 0 <= summary["free_running/tokens/token_agree"] <= 1
    # the summary is the mean over prompts of the final layer's per-prompt means
    sel = df[(df.context == "teacher_forced") & (df.layer == 3) & (df.metric == "kl") & (df.temperature == 1.0)]
    assert summary["teacher_forced/probability/kl@T=1"] == pytest.approx(
        sel.groupby("prompt_id")["value"].mean().mean(), rel=1e-12)


def test_nonfinite_values_are_kept_and_warned(tiny, smollm2_tok, prompts_file, tmp_path, caplog):
    cfg = probe_cfg(prompts_file, sublayers=["block"], contexts=["prompt", "teacher_forced"])
    ref = dense_reference(tiny, smollm2_tok, cfg, tmp_path, model_key="tiny")
    finite = compare_to_reference(pruned_copy(tiny), smollm2_tok, cfg, ref).table
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        decoder_layers(broken)[1].mlp.down_proj.weight[0, 0] = math.nan
    with caplog.at_level(logging.WARNING, logger="prunerep.probes"):
        df = compare_to_reference(broken, smollm2_tok, cfg, ref).table
    # nothing dropped (the estimate ratios leave out rows whose exact value is 0: the broken model
    # equals the dense one up to layer 1, the pruned copy does not)
    ratio = df["metric"].isin(RATIO_METRICS)
    assert len(df[~ratio]) == len(finite[~finite["metric"].isin(RATIO_METRICS)])
    assert ratio.any() and not np.isfinite(df.loc[ratio, "value"]).any()  # the ratios of NaNs: kept, NaN
    bad = ~np.isfinite(df["value"])
    assert bad.any() and not bad[df["layer"] <= 1].any()  # NaN from block 1's output (layer 2) on
    assert any("non-finite" in r.getMessage() and str(int(bad.sum())) in r.getMessage() for r in caplog.records)


def test_qwen2_dense_vs_dense_prompt_context(smollm2_tok, prompts_file, tmp_path):
    model = make_tiny("qwen2", vocab_size=len(smollm2_tok), num_hidden_layers=2)
    cfg = probe_cfg(prompts_file, contexts=["prompt"], temperatures=[1.0])
    df = compare_to_reference(model, smollm2_tok, cfg, dense_reference(model, smollm2_tok, cfg, tmp_path)).table
    kl = df[df["metric"] == "kl"]["value"]
    assert len(kl) and (kl == 0).all()
    assert (df[df["metric"] == "cos"]["value"] == 1).all()
