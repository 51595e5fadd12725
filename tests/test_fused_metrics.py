"""The fused vocabulary-metric kernel (prunerep.probes.fused, ``probe.kernel=fused``) against the
eager torch path as the oracle.

The stated tolerance: the fused kernel takes every element to float64 and sums in float64, so on
float32 (or bf16/fp16) logits it agrees with the eager path run on the same logits in float64 to
1e-6 relative (the metrics come back in float32, 6e-8 of that). Values that are exactly 0 in
the oracle are exactly 0 (equal rows) or below 1e-12."""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch

from conftest import make_tiny
from helpers import probe_plan, pruned_copy
from prunerep.probes import compare_to_reference, dense_reference, fused
from prunerep.probes import metrics as M

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")

RTOL, ATOL = 1e-6, 1e-12
TEMPS = (0.5, 1.0, 2.0)
PROMPTS = [
    {"prompt": "What is the capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:",
     "options": [" A", " B", " C", " D"]},
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"},
]


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _assert_agrees(got: dict, want: dict, rtol=RTOL, atol=ATOL):
    assert got.keys() == want.keys()
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _oracle(zd, zp, temps=TEMPS, topk=(5, 10), **kw):
    """The eager path on the same logits in float64."""
    return M.vocab_metrics(zd.double(), zp.double(), temps, topk, **kw)


def _fused(zd, zp, temps=TEMPS, topk=(5, 10), **kw):
    return M.vocab_metrics(zd, zp, temps, topk, fused=True, **kw)


@pytest.mark.parametrize("eps", [1e-3, 0.3, 3.0])
def test_random_rows_agree_with_the_eager_oracle(eps):
    zd = _rand(9, 3001, seed=1, scale=3.0)
    zd, zp = zd.float(), (zd + _rand(9, 3001, seed=2, scale=eps)).float()
    got = _fused(zd, zp)
    assert {v.dtype for v in got.values()} == {torch.float32}
    _assert_agrees(got, _oracle(zd, zp))
    # and each space alone (the kernel skips the other space's passes)
    _assert_agrees(_fused(zd, zp, logit=False), _oracle(zd, zp, logit=False))
    _assert_agrees(_fused(zd, zp, probability=False), _oracle(zd, zp, probability=False))


def test_a_smollm2_sized_vocabulary_agrees():
    zd = _rand(5, 49152, seed=3, scale=3.0)
    zd, zp = zd.float(), (zd + _rand(5, 49152, seed=4, scale=0.5)).float()
    _assert_agrees(_fused(zd, zp, (1.0,)), _oracle(zd, zp, (1.0,)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_agree(dtype):
    zd = _rand(6, 2000, seed=5, scale=3.0)
    zd, zp = zd.to(dtype), (zd + _rand(6, 2000, seed=6, scale=0.3)).to(dtype)
    got = _fused(zd, zp)
    assert {v.dtype for v in got.values()} == {torch.float32}
    _assert_agrees(got, _oracle(zd, zp))


def test_float64_logits_agree_to_1e_9():
    zd = _rand(4, 1500, seed=7, scale=3.0)
    zp = zd + _rand(4, 1500, seed=8, scale=1e-4)
    got = _fused(zd, zp)
    assert {v.dtype for v in got.values()} == {torch.float64}
    _assert_agrees(got, _oracle(zd, zp), rtol=1e-9, atol=1e-15)


def test_equal_rows_give_exact_zeros_and_ones():
    zd = _rand(5, 1000, seed=9, scale=4.0).float()
    out = _fused(zd, zd.clone())
    for (space, metric, t), v in out.items():
        if metric in ("cos", "cos_centred") or "agree" in metric or "overlap" in metric:
            assert torch.equal(v, torch.ones_like(v)), (space, metric, t)
        elif not metric.startswith("entropy"):
            assert torch.equal(v, torch.zeros_like(v)), (space, metric, t)
            assert not torch.signbit(v).any(), (space, metric, t)


def test_one_hot_and_near_one_hot_probabilities():
    """A dense top logit 30 or 200 above the rest: p is one-hot to float64 (200) or nearly so."""
    zd = _rand(4, 1000, seed=10)
    zd[0, 17] = 30.0
    zd[1, 17] = 200.0
    zd[2, 17], zd[2, 400], zd[2, 5] = 200.0, 200.0, 199.0  # a tie at the top: the first maximum is the argmax
    zp = zd + _rand(4, 1000, seed=11, scale=0.2)
    zp[3, 999] = 200.0  # the pruned model's p is one-hot on another token
    zd, zp = zd.float(), zp.float()
    got, want = _fused(zd, zp), _oracle(zd, zp)
    _assert_agrees(got, want)
    assert got[("probability", "top1_agree", math.nan)].tolist() == [1.0, 1.0, want[(
        "probability", "top1_agree", math.nan)][2].item(), 0.0]
    assert got[("probability", "kl", 1.0)][3] > 100  # KL(dense‖pruned): the pruned p misses everything


def test_exact_zero_and_constant_rows():
    """A pruned row of zeros, constant rows on either side, exact zeros inside rows."""
    zd = _rand(5, 700, seed=12, scale=2.0)
    zp = zd + _rand(5, 700, seed=13, scale=0.3)
    zp[0] = 0.0  # the zero vector
    zd[1] = 1.5  # constant dense row: the centred zero vector, p uniform
    zp[2] = -4.0  # constant pruned row
    zd[3, ::3] = 0.0
    zp[3, ::2] = 0.0
    zd[4], zp[4] = 0.0, 0.0  # both zero: equal
    zd, zp = zd.float(), zp.float()
    got, want = _fused(zd, zp), _oracle(zd, zp)
    # p uniform (row 1): the parallel part of Δ = q − p is a = Σq − 1 = 0 exactly, so |a| is rounding
    # noise in either implementation, and orth_par_ratio = ‖o‖/|a| a ratio of noise: left out there
    for t in TEMPS:
        got[("probability", "orth_par_ratio", t)][1] = want[("probability", "orth_par_ratio", t)][1]
    _assert_agrees(got, want)
    assert want[("probability", "par_rel", 1.0)][1] < 1e-12
    assert got[("logit", "cos", math.nan)][0] == 0.0 and got[("logit", "cos", math.nan)][4] == 1.0
    assert got[("logit", "cos_centred", math.nan)][1] == 0.0 and got[("logit", "cos_centred", math.nan)][2] == 0.0


def test_masked_and_soft_capped_logits():
    """−inf logits (masked tokens) send their rows to the general path, as on the eager path: the
    same values, bit for bit; under soft-capping (Gemma-2: z = c·tanh(z/c)) a −inf becomes −c,
    a finite row the kernel takes."""
    zd = _rand(4, 800, seed=14, scale=4.0)
    zp = zd + _rand(4, 800, seed=15, scale=0.5)
    zd[1, :50] = -math.inf
    zp[1, :50] = -math.inf
    zp[2, 7] = -math.inf  # only the pruned model masks: KL(dense‖pruned) = inf
    zd, zp = zd.float(), zp.float()
    got, eager = _fused(zd, zp), M.vocab_metrics(zd, zp, TEMPS, (5, 10))
    for k in got:
        assert torch.equal(got[k][1:3].nan_to_num(7.0), eager[k][1:3].nan_to_num(7.0)), k
    assert got[("probability", "kl", 1.0)][2] == math.inf
    _assert_agrees({k: v[[0, 3]] for k, v in got.items()}, {k: v[[0, 3]] for k, v in _oracle(zd, zp).items()})
    cap = 30.0
    capped_d, capped_p = cap * torch.tanh(zd.double() / cap), cap * torch.tanh(zp.double() / cap)
    assert capped_d[1, 0] == -cap
    _assert_agrees(_fused(capped_d.float(), capped_p.float()), _oracle(capped_d.float(), capped_p.float()))


def test_topk_overlaps_match_sets_counted_by_hand():
    """Rising logits (the top tokens are the last indices), some of the top ones pushed down
    ~120 places: the dense top-5 is 495..499 and the top-10 490..499 in every row."""
    v = 500
    base = torch.linspace(-5.0, -1.0, v)  # the top tokens are the last indices
    zd = base.repeat(3, 1)
    zp = zd.clone()
    top5 = [499, 498, 497, 496, 495]
    zp[0, top5] -= 0.95  # pruned top-5 490..494 (0 of 5 shared), top-10 485..494 (5 of 10)
    zp[1, [499, 498, 497]] -= 0.95  # pruned top-5 492..496 (2 of 5), top-10 487..496 (7 of 10)
    out = _fused(zd, zp, (1.0,))
    assert out[("probability", "top5_overlap", math.nan)].tolist() == pytest.approx([0.0, 0.4, 1.0], rel=1e-7)
    assert out[("probability", "top10_overlap", math.nan)].tolist() == pytest.approx([0.5, 0.7, 1.0], rel=1e-7)
    assert out[("probability", "top1_agree", math.nan)].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("v", [500, 64 * 48 + 7])  # a full selection, and group maxima first (k=10)
def test_topk_ties_keep_the_lower_index_in_both_kernels(v):
    """Ties at the k-th place (common in bf16 logits) keep the lower index, in the eager top-k
    and in the kernel's, so that both count the same overlaps; the first maximum is the argmax."""
    z = torch.zeros(3, v)
    tied = [v - 1, 17, v // 2 + 3, 64, 300, 5, v - 40, 48, 250, 1, v // 3, 333, 100, 2]  # 14 at the top
    z[0, tied] = 5.0
    z[1, 400] = 9.0  # a unique maximum, then 12 tied: the 9 lowest of those join it
    z[1, tied[:12]] = 4.0
    z[2, [v - 1, v - 2, 3]] = 7.0  # three tied maxima, then the 7 lowest-indexed zeros
    want = [sorted(tied)[:10], [400] + sorted(tied[:12])[:9], [3, v - 2, v - 1, 0, 1, 2, 4, 5, 6, 7]]
    idx, first = M._top(z, 10)
    assert idx.tolist() == want
    assert first.tolist() == [min(tied), 400, 3]
    sums = fused.block_sums(z, z.roll(1, dims=0), 10, (1.0,), logit=True, probability=True)
    assert sums["idx_d"].tolist() == want
    assert sums["first_d"].tolist() == [min(tied), 400, 3]
    assert sums["idx_p"].tolist() == [want[2], want[0], want[1]]


def test_rows_do_not_depend_on_batch_or_threads():
    zd = _rand(7, 5000, seed=16, scale=3.0)
    zd, zp = zd.float(), (zd + _rand(7, 5000, seed=17, scale=0.5)).float()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused(zd, zp)
        torch.set_num_threads(2)
        two = _fused(zd, zp)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(one[k], two[k]) for k in one)
    row = _fused(zd[3:4], zp[3:4])
    assert all(torch.equal(row[k][0], one[k][3]) for k in one)


def test_pruned_probe_table_fused_vs_eager_oracle(smollm2_tok, prompts_file, tmp_path, monkeypatch):
    """probe=all on a tiny model with the real vocabulary, 50% pruned: the table of the fused
    kernel against the eager path run on the same logits in float64, value by value."""
    model = make_tiny("llama", vocab_size=len(smollm2_tok), num_hidden_layers=2)
    plan = probe_plan(prompts_file, n_prompts=2, max_new_tokens=2, temperatures=[0.5, 1.0], kernel="eager")
    ref = dense_reference(model, smollm2_tok, plan, tmp_path, model_key="tiny")
    pruned = pruned_copy(model)
    table = partial(compare_to_reference, pruned, smollm2_tok, ref=ref)
    fused_df = table(dataclasses.replace(plan, kernel="fused")).table
    eager = M.vocab_metrics
    monkeypatch.setattr(M, "vocab_metrics", lambda zd, zp, *a, **kw: eager(zd.double(), zp.double(), *a, **kw))
    oracle_df = table(plan).table
    keys = ["context", "prompt_id", "layer", "sublayer", "step", "space", "metric", "temperature"]
    assert fused_df[keys].equals(oracle_df[keys])
    vocab = oracle_df["space"].isin(["logit", "probability", "answer"]).to_numpy()  # vocab_metrics' rows
    assert vocab.sum() > 1000
    got, want = torch.tensor(fused_df["value"].to_numpy(copy=True)), torch.tensor(oracle_df["value"].to_numpy(copy=True))
    vocab = torch.from_numpy(vocab.copy())
    torch.testing.assert_close(got[vocab], want[vocab], rtol=RTOL, atol=ATOL, equal_nan=True)
    assert torch.equal(got[~vocab].nan_to_num(7.0), want[~vocab].nan_to_num(7.0))  # the rest is not the kernel's
    assert (want[vocab].abs() > 1e-3).float().mean() > 0.5  # the pruning moved the values: a real comparison
