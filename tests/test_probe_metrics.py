"""prunerep.probes.metrics (the fast path) against the plain definitions in tests/oracle.py,
and the oracle itself against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

import oracle as O
from prunerep.probes import metrics as M

NAN = math.nan


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _logits_pair(n=6, v=50, eps=0.3, seed=0, dtype=torch.float64):
    zd = _rand(n, v, seed=seed, scale=3.0, dtype=dtype)
    return zd, zd + _rand(n, v, seed=seed + 1, scale=eps, dtype=dtype)


def _key(k):
    """A sortable, comparable key: NaN temperatures (temperature-free metrics) as -1."""
    return (k[0], k[1], -1.0 if k[2] != k[2] else k[2])


def _assert_matches_oracle(got: dict, want: dict, rtol: float, atol: float = 0.0, keys=None, space=None):
    """Every oracle value (or those of the metrics ``keys`` in ``space``) is in ``got`` and close."""
    got = {_key(k): v for k, v in got.items()}
    for k, v in want.items():
        if (keys is None or k[1] in keys) and (space is None or k[0] == space):
            torch.testing.assert_close(got[_key(k)].double(), v, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- the oracle, by hand

def test_oracle_on_values_worked_out_by_hand():
    """p = (½, ½), q = (¼, ¾): KL(p‖q) = ½ log 2 + ½ log ⅔, ... (checks the checker)."""
    logp = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    logq = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    assert O.kl(logp, logq).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-14)
    assert O.reverse_kl(logp, logq).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-14)
    m = (0.375, 0.625)
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert O.js(logp, logq).item() == pytest.approx(js, rel=1e-14)
    assert O.entropy(logp).item() == pytest.approx(math.log(2), rel=1e-14)
    # mean 2.5 under w = (¼, ¾) of x = (1, 3): Var = ¼·1.5² + ¾·0.5² = 0.75
    assert O.weighted_var(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(0.75)
    assert O.uniform_var(torch.tensor([[1.0, 3.0]])).item() == 1.0
    g = O.geometry(torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 1.0]]))  # Δ = (1, 1): a = ½, o = (0, 1)
    want = {"cos": 3 / math.sqrt(10), "rel_l2": math.sqrt(2) / 2, "par_rel": 0.5, "orth_rel": 0.5,
            "orth_par_ratio": 1.0}
    assert {k: pytest.approx(want[k], rel=1e-14) for k in want} == {k: g[k].item() for k in want}
    assert O.topk_overlap(torch.tensor([[4.0, 3, 2, 1]]), torch.tensor([[1.0, 3, 2, 4]]), 2).item() == 0.5


# --------------------------------------------------------------------------- geometry

def test_geometry_matches_oracle():
    x, y = _rand(7, 33, seed=1), _rand(7, 33, seed=2)
    y[0] = 2.5 * x[0] + 1e-3 * y[0]  # nearly parallel row
    y[1] = -x[1]  # anti-parallel row
    got = M.geometry(x, y)
    assert set(got) == set(M.GEOMETRY_METRICS)
    want = O.geometry(x, y)
    for k in M.GEOMETRY_METRICS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    assert want["cos"][1].item() == pytest.approx(-1.0) and want["one_minus_cos"][0].item() < 1e-6


def test_one_minus_cos_is_accurate_for_tiny_angles_in_float32():
    x = _rand(4, 256, seed=3).float()
    y = x + 1e-5 * _rand(4, 256, seed=4).float()
    exact = O.geometry(x, y)["one_minus_cos"]  # float64 on the same (float32) values
    got = M.geometry(x, y)["one_minus_cos"].double()
    assert (exact > 0).all() and (exact < 1e-9).all()
    assert torch.allclose(got, exact, rtol=1e-3)  # 1 - dot/(|x||y|) in float32 would give 0 or noise


def test_geometry_batched_leading_dims_and_identity():
    x = _rand(2, 3, 16, seed=5)
    got = M.geometry(x, x.clone())
    assert got["cos"].shape == (2, 3)
    assert torch.equal(got["cos"], torch.ones(2, 3, dtype=x.dtype))
    for k in ("one_minus_cos", "rel_l2", "par_rel", "orth_rel", "orth_par_ratio"):
        assert torch.equal(got[k], torch.zeros(2, 3, dtype=x.dtype)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_vectors_follow_the_documented_conventions(dtype):
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.3, -1.7, 0.9]], dtype=dtype)
    y = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    g = M.geometry(x, y)
    assert g["cos"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert g["one_minus_cos"].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert g["rel_l2"].tolist() == pytest.approx([0.0, math.inf, 1.0, 1.0], rel=1e-6)
    assert not torch.isnan(torch.stack(list(g.values()))).any()
    # the same through the hot path, a pruned logit vector of zeros
    z = _rand(3, 500, seed=22, scale=2.0, dtype=dtype)
    out = M.vocab_metrics(z, torch.zeros_like(z), (1.0,), logit=True, probability=False)
    assert out[("logit", "cos", NAN)].tolist() == [0.0, 0.0, 0.0]


def test_nonfinite_rows_stay_nonfinite():
    x, y = _rand(3, 8, seed=6, dtype=torch.float32), _rand(3, 8, seed=7, dtype=torch.float32)
    y[1, 2] = math.nan
    x[2, 0] = math.inf
    g = M.geometry(x, y)
    for k, v in g.items():
        assert torch.isfinite(v[0]), k
        assert not torch.isfinite(v[1]) and not torch.isfinite(v[2]), k
    z = _rand(2, 10, seed=8)
    z[0, 3] = math.nan
    out = M.vocab_metrics(z, z + 0.1, [1.0])
    assert all(not torch.isfinite(v[0]) for (s, m, t), v in out.items() if "agree" not in m and "overlap" not in m)
    assert all(torch.isfinite(v[1]) for v in out.values())


def test_half_precision_is_computed_in_float32():
    x, y = _rand(4, 64, seed=9, dtype=torch.float32), _rand(4, 64, seed=10, dtype=torch.float32)
    xb, yb = x.bfloat16(), y.bfloat16()
    got = M.geometry(xb, yb)
    assert got["cos"].dtype == torch.float32
    want = M.geometry(xb.float(), yb.float())
    assert all(torch.equal(got[k], want[k]) for k in got)
    out = M.vocab_metrics(xb, yb, [1.0])
    assert {v.dtype for v in out.values()} == {torch.float32}
    _assert_matches_oracle(out, O.vocab_metrics(xb, yb, [1.0]), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- probabilities

@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_divergences_match_oracle(t):
    zd, zp = _logits_pair(seed=11, eps=0.7)
    got = M.vocab_metrics(zd, zp, [t], logit=False)
    _assert_matches_oracle(got, O.vocab_metrics(zd, zp, [t]), rtol=1e-9, atol=1e-14,
                           keys={"kl", "reverse_kl", "js", "entropy_dense", "entropy_pruned"}, space="probability")
    js = got[("probability", "js", t)]
    assert (js > 0).all() and (js <= math.log(2)).all()
    swapped = M.vocab_metrics(zp, zd, [t], logit=False)
    assert torch.allclose(swapped[("probability", "js", t)], js, rtol=1e-12)  # symmetric
    assert torch.allclose(swapped[("probability", "kl", t)], got[("probability", "reverse_kl", t)], rtol=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_masked_logits_count_as_zero_probability(compiled):
    zd, zp = _logits_pair(n=3, v=20, seed=12)
    zd_m, zp_m = zd.clone(), zp.clone()
    zd_m[:, :5] = -math.inf  # tokens masked on both sides
    zp_m[:, :5] = -math.inf
    out = M.vocab_metrics(zd_m, zp_m, [1.0], logit=False, compiled=compiled)
    assert not M.compile_once(M._block_sums).failed, "torch.compile fell back to eager"
    # the masked tokens change nothing: the oracle on the 15 unmasked tokens
    _assert_matches_oracle(out, O.vocab_metrics(zd[:, 5:], zp[:, 5:], [1.0]), rtol=1e-12, atol=1e-15,
                           keys={"kl", "reverse_kl", "js", "entropy_dense", "entropy_pruned", "cos",
                                 "one_minus_cos", "rel_l2", "top1_agree", "top5_overlap", "top10_overlap"},
                           space="probability")
    # a token only the pruned model masks: KL(dense‖pruned) = inf, the others stay finite
    zp_m[1, 7] = -math.inf
    zd_m[2, 8] = -math.inf  # and one only the dense model masks: KL(pruned‖dense) = inf
    out = M.vocab_metrics(zd_m, zp_m, [1.0], logit=False, compiled=compiled)
    want = O.vocab_metrics(zd_m, zp_m, [1.0])
    assert out[("probability", "kl", 1.0)][1] == math.inf and out[("probability", "reverse_kl", 1.0)][2] == math.inf
    _assert_matches_oracle(out, want, rtol=1e-12, atol=1e-15, keys={"kl", "reverse_kl", "js", "entropy_dense",
                                                                   "entropy_pruned"}, space="probability")
    assert torch.isfinite(out[("probability", "js", 1.0)]).all()


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_estimates_converge_to_exact_as_perturbation_vanishes(t):
    """Δz = ε·u: KL = Var_p(Δz)/(2T²) + O(ε³) and 1 − cos(p) = Var_r(Δz)/(2T²) + O(ε³),
    so the relative error of each estimate shrinks linearly with ε."""
    zd = _rand(16, 200, seed=16, scale=2.0)
    u = _rand(16, 200, seed=17)
    errs_kl, errs_cos = [], []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        zp = zd + eps * u
        got = {m: v for (_, m, _), v in M.vocab_metrics(zd, zp, [t], topk=(), logit=False).items()}
        torch.testing.assert_close(got["kl_est"], O.kl_estimate(zd, zp - zd, t), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(got["cos_est"], O.cos_estimate(zd, zp - zd, t), rtol=1e-6, atol=0.0)
        errs_kl.append(((got["kl_est"] - got["kl"]).abs() / got["kl"]).max().item())
        errs_cos.append(((got["cos_est"] - got["one_minus_cos"]).abs() / got["one_minus_cos"]).max().item())
    for errs in (errs_kl, errs_cos):
        assert all(b < a / 5 for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 1e-3, errs


def test_probability_metrics_ignore_a_constant_logit_shift_in_float32():
    """softmax(z + c) = softmax(z) and Var(Δz + c) = Var(Δz): a pruned model whose logits are
    all up by 50 changes no probability metric, even in float32 (the one-pass variances
    are taken around Δz at the dense top token, not around 0)."""
    zd, zp = _logits_pair(n=4, v=5000, eps=0.3, seed=24, dtype=torch.float32)
    base = M.vocab_metrics(zd, zp, (0.5, 1.0), logit=False)
    shifted = M.vocab_metrics(zd, zp + 50.0, (0.5, 1.0), logit=False)
    for k, v in base.items():
        torch.testing.assert_close(shifted[k], v, rtol=2e-3, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    _assert_matches_oracle(shifted, O.vocab_metrics(zd, zp + 50.0, (0.5, 1.0)), rtol=2e-3, atol=1e-6,
                           keys={"var_p", "var_r", "kl_est", "cos_est", "unif_est"})


# --------------------------------------------------------------------------- predictions

def test_top1_and_topk_overlap_match_sets():
    zd, zp = _logits_pair(n=20, v=40, eps=1.5, seed=18)
    out = M.vocab_metrics(zd, zp, [1.0], topk=(5, 10, 1000), logit=False)
    for k in (5, 10, 40):  # k is capped at the vocabulary
        torch.testing.assert_close(out[("probability", f"top{k}_overlap", NAN)], O.topk_overlap(zd, zp, k))
    assert ("probability", "top1000_overlap", NAN) not in out
    assert out[("probability", "top40_overlap", NAN)].tolist() == [1.0] * 20
    agree = out[("probability", "top1_agree", NAN)]
    assert agree.tolist() == [float(zd[i].argmax() == zp[i].argmax()) for i in range(20)]
    assert 0 < agree.mean() < 1  # the test data exercises both outcomes


def test_option_metrics_match_oracle():
    zd, zp = _logits_pair(n=5, v=60, eps=2.0, seed=19)
    opts = [7, 3, 42, 11]
    for t in (0.5, 1.0):
        got, want = M.option_metrics(zd, zp, opts, t), O.option_metrics(zd, zp, opts, t)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-13, msg=lambda m, k=k: f"{k}: {m}")
        assert 0 < got["top1_agree"].mean() < 1


# --------------------------------------------------------------------------- the hot path

@pytest.mark.parametrize("dtype,rtol,compiled", [(torch.float64, 1e-9, False), (torch.float32, 2e-3, False),
                                                 (torch.float64, 1e-9, True)])
def test_vocab_metrics_matches_oracle(dtype, rtol, compiled, monkeypatch):
    """The hot path (eager, or the same function through torch.compile) against the
    oracle's one-metric-at-a-time definitions, over several row blocks."""
    zd, zp = _logits_pair(n=9, v=3000, eps=0.5, seed=20, dtype=dtype)
    temps = (0.5, 1.0, 2.0)
    monkeypatch.setattr(M, "ROW_BLOCK_ELEMENTS", 4 * 3000)  # blocks of 4 rows: 3 blocks, the last padded
    out = M.vocab_metrics(zd, zp, temps, topk=(5, 10), compiled=compiled)
    assert not M.compile_once(M._block_sums).failed, "torch.compile fell back to eager"
    want = O.vocab_metrics(zd, zp, temps, topk=(5, 10))  # float64 of the same values
    assert sorted(map(_key, out)) == sorted(map(_key, want))
    assert {v.dtype for v in out.values()} == {dtype}
    _assert_matches_oracle(out, want, rtol=rtol, atol=1e-7)


def test_rows_do_not_depend_on_the_batch():
    zd, zp = _logits_pair(n=7, v=777, eps=0.5, seed=23, dtype=torch.float32)
    whole = M.vocab_metrics(zd, zp, (1.0, 2.0))
    for i in (0, 3, 6):
        row = M.vocab_metrics(zd[i:i + 1], zp[i:i + 1], (1.0, 2.0))
        assert all(torch.equal(row[k][0], whole[k][i]) for k in whole), i


def test_rows_do_not_depend_on_the_thread_count():
    # the passes run on torch's intra-op threads (probe.metric_threads): splitting them must not
    # split a row's sums, so 1 and 2 threads give the same bits (a SmolLM2-sized vocabulary, 2 blocks)
    zd, zp = _logits_pair(n=13, v=49152, eps=0.5, seed=29, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = M.vocab_metrics(zd, zp, (1.0, 2.0))
        torch.set_num_threads(2)
        two = M.vocab_metrics(zd, zp, (1.0, 2.0))
    finally:
        torch.set_num_threads(old)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("compiled", [False, True])
def test_identical_inputs_give_exact_zeros_in_float32(compiled):
    zd = _rand(5, 1000, seed=21, scale=4.0, dtype=torch.float32)
    out = M.vocab_metrics(zd, zd.clone(), (0.5, 1.0, 2.0), compiled=compiled)
    for (space, metric, t), v in out.items():
        if metric in ("cos", "cos_centred") or "agree" in metric or "overlap" in metric:
            assert torch.equal(v, torch.ones_like(v)), (space, metric, t)
        elif not metric.startswith("entropy"):
            assert torch.equal(v, torch.zeros_like(v)), (space, metric, t)
            assert not torch.signbit(v).any(), (space, metric, t)
