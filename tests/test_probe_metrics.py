"""prunerep.probes.metrics against brute-force references (numpy, Python loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunerep.probes import metrics as M


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _logits_pair(n=6, v=50, eps=0.3, seed=0, dtype=torch.float64):
    zd = _rand(n, v, seed=seed, scale=3.0, dtype=dtype)
    return zd, zd + _rand(n, v, seed=seed + 1, scale=eps, dtype=dtype)


# --------------------------------------------------------------------------- references

def ref_softmax(z, t=1.0):
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_geometry(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = y - x
    nx = math.sqrt(sum(v * v for v in x))
    cos = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    a = float(np.dot(d, x) / (nx * nx))
    orth = d - a * x
    return {"cos": cos, "one_minus_cos": 1 - cos, "rel_l2": np.linalg.norm(d) / nx, "par_rel": abs(a),
            "orth_rel": np.linalg.norm(orth) / nx, "orth_par_ratio": np.linalg.norm(orth) / nx / abs(a)}


def ref_divergences(zd, zp, t):
    p, q = ref_softmax(zd, t), ref_softmax(zp, t)
    m = (p + q) / 2
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m))
    ent = lambda r: -sum(ri * math.log(ri) for ri in r)  # noqa: E731
    return {"kl": kl, "reverse_kl": rkl, "js": js, "entropy_dense": ent(p), "entropy_pruned": ent(q)}


def ref_wvar(x, w):
    w = np.asarray(w, np.float64) / np.sum(w)
    mu = sum(wi * xi for wi, xi in zip(w, x))
    return sum(wi * (xi - mu) ** 2 for wi, xi in zip(w, x))


# --------------------------------------------------------------------------- geometry

def test_geometry_matches_reference():
    x, y = _rand(7, 33, seed=1), _rand(7, 33, seed=2)
    y[0] = 2.5 * x[0] + 1e-3 * y[0]  # nearly parallel row
    y[1] = -x[1]  # anti-parallel row
    got = M.geometry(x, y)
    assert set(got) == set(M.GEOMETRY_METRICS)
    for i in range(7):
        ref = ref_geometry(x[i].numpy(), y[i].numpy())
        for k, v in ref.items():
            assert got[k][i].item() == pytest.approx(v, rel=1e-9, abs=1e-12), (i, k)
    assert torch.equal(M.cosine(x, y), got["cos"])
    assert torch.equal(M.one_minus_cos(x, y), got["one_minus_cos"])
    assert torch.allclose(M.rel_l2(x, y), got["rel_l2"], rtol=1e-12)
    assert set(M.decompose(x, y)) == {"par_rel", "orth_rel", "orth_par_ratio"}


def test_one_minus_cos_is_accurate_for_tiny_angles_in_float32():
    x = _rand(4, 256, seed=3)
    y = x + 1e-5 * _rand(4, 256, seed=4)
    exact = M.one_minus_cos(x, y)  # float64
    got = M.one_minus_cos(x.float(), y.float()).double()
    assert (exact > 0).all() and (exact < 1e-9).all()
    assert torch.allclose(got, exact, rtol=1e-3)  # 1 - dot/(|x||y|) in float32 would give 0 or noise


def test_geometry_batched_leading_dims_and_identity():
    x = _rand(2, 3, 16, seed=5)
    got = M.geometry(x, x.clone())
    assert got["cos"].shape == (2, 3)
    assert torch.equal(got["cos"], torch.ones(2, 3, dtype=x.dtype))
    for k in ("one_minus_cos", "rel_l2", "par_rel", "orth_rel", "orth_par_ratio"):
        assert torch.equal(got[k], torch.zeros(2, 3, dtype=x.dtype)), k


def test_zero_vectors_follow_the_documented_conventions():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    g = M.geometry(x, y)
    assert g["cos"].tolist() == [1.0, 0.0, 0.0]
    assert g["one_minus_cos"].tolist() == [0.0, 1.0, 1.0]
    assert g["rel_l2"].tolist() == [0.0, math.inf, 1.0]
    assert not torch.isnan(torch.stack(list(g.values()))).any()


def test_nonfinite_rows_stay_nonfinite_and_are_counted():
    x, y = _rand(3, 8, seed=6, dtype=torch.float32), _rand(3, 8, seed=7, dtype=torch.float32)
    y[1, 2] = math.nan
    x[2, 0] = math.inf
    g = M.geometry(x, y)
    for k, v in g.items():
        assert torch.isfinite(v[0]), k
        assert not torch.isfinite(v[1]) and not torch.isfinite(v[2]), k
    assert M.count_nonfinite(x, y) == 2
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
    assert M.kl(M.log_probs(xb), M.log_probs(yb)).dtype == torch.float32


# --------------------------------------------------------------------------- probabilities

@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_divergences_match_reference(t):
    zd, zp = _logits_pair(seed=11, eps=0.7)
    logp, logq = M.log_probs(zd, t), M.log_probs(zp, t)
    got = {"kl": M.kl(logp, logq), "reverse_kl": M.reverse_kl(logp, logq), "js": M.js(logp, logq),
           "entropy_dense": M.entropy(logp), "entropy_pruned": M.entropy(logq)}
    for i in range(zd.shape[0]):
        ref = ref_divergences(zd[i].numpy(), zp[i].numpy(), t)
        for k, v in ref.items():
            assert got[k][i].item() == pytest.approx(v, rel=1e-9, abs=1e-14), (i, k)
    assert (got["js"] <= math.log(2)).all()
    assert torch.allclose(M.js(logq, logp), got["js"], rtol=1e-12)  # symmetric


def test_masked_logits_count_as_zero_probability():
    zd, zp = _logits_pair(n=3, v=20, seed=12)
    zd_m, zp_m = zd.clone(), zp.clone()
    zd_m[:, :5] = -math.inf  # tokens masked on both sides
    zp_m[:, :5] = -math.inf
    logp, logq = M.log_probs(zd_m), M.log_probs(zp_m)
    for fn in (M.kl, M.reverse_kl, M.js):
        want = fn(M.log_probs(zd[:, 5:]), M.log_probs(zp[:, 5:]))
        assert torch.allclose(fn(logp, logq), want, rtol=1e-12), fn.__name__
    assert torch.allclose(M.entropy(logp), M.entropy(M.log_probs(zd[:, 5:])), rtol=1e-12)
    # the same through the hot path (its careful branch)
    out = M.vocab_metrics(zd_m, zp_m, [1.0], logit=False)
    assert torch.allclose(out[("probability", "kl", 1.0)], M.kl(logp, logq), rtol=1e-12)
    # a token the pruned model masks but the dense model does not: KL(dense || pruned) = inf
    zp_m[:, 7] = -math.inf
    assert torch.isinf(M.kl(logp, M.log_probs(zp_m))).all()


def test_weighted_and_uniform_variance_match_reference():
    x, w = _rand(4, 30, seed=13), _rand(4, 30, seed=14).abs()
    got = M.weighted_var(x, w)
    for i in range(4):
        assert got[i].item() == pytest.approx(ref_wvar(x[i].numpy(), w[i].numpy()), rel=1e-10)
        assert M.uniform_var(x)[i].item() == pytest.approx(float(np.var(x[i].numpy())), rel=1e-10)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_estimates_match_their_definition(t):
    zd, zp = _logits_pair(seed=15)
    dz = zp - zd
    kl_est, cos_est = M.kl_estimate(zd, dz, t), M.cos_estimate(zd, dz, t)
    for i in range(zd.shape[0]):
        p = ref_softmax(zd[i].numpy(), t)
        assert kl_est[i].item() == pytest.approx(ref_wvar(dz[i].numpy(), p) / (2 * t * t), rel=1e-9)
        assert cos_est[i].item() == pytest.approx(ref_wvar(dz[i].numpy(), p ** 2) / (2 * t * t), rel=1e-9)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_estimates_converge_to_exact_as_perturbation_vanishes(t):
    """Δz = ε·u: KL = Var_p(Δz)/(2T²) + O(ε³) and 1 − cos(p) = Var_r(Δz)/(2T²) + O(ε³),
    so the relative error of each estimate shrinks linearly with ε."""
    zd = _rand(16, 200, seed=16, scale=2.0)
    u = _rand(16, 200, seed=17)
    errs_kl, errs_cos = [], []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        zp = zd + eps * u
        exact = M.probability_metrics(zd, zp, t)
        kl_est, cos_est = M.kl_estimate(zd, zp - zd, t), M.cos_estimate(zd, zp - zd, t)
        assert torch.allclose(exact["kl_est"], kl_est, rtol=1e-6)
        assert torch.allclose(exact["cos_est"], cos_est, rtol=1e-6)
        errs_kl.append(((kl_est - exact["kl"]).abs() / exact["kl"]).max().item())
        errs_cos.append(((cos_est - exact["one_minus_cos"]).abs() / exact["one_minus_cos"]).max().item())
    for errs in (errs_kl, errs_cos):
        assert all(b < a / 5 for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 1e-3, errs


# --------------------------------------------------------------------------- predictions

def test_top1_and_topk_overlap_match_sets():
    zd, zp = _logits_pair(n=20, v=40, eps=1.5, seed=18)
    for k in (1, 5, 10):
        got = M.topk_overlap(zd, zp, k)
        for i in range(20):
            a = set(np.argsort(-zd[i].numpy())[:k])
            b = set(np.argsort(-zp[i].numpy())[:k])
            assert got[i].item() == pytest.approx(len(a & b) / k)
    agree = M.top1_agree(zd, zp)
    assert agree.tolist() == [float(zd[i].argmax() == zp[i].argmax()) for i in range(20)]
    pred = M.prediction_metrics(zd, zp, (5, 10))
    assert set(pred) == {"top1_agree", "top5_overlap", "top10_overlap"}
    assert torch.equal(pred["top10_overlap"], M.topk_overlap(zd, zp, 10))
    assert 0 < agree.mean() < 1  # the test data exercises both outcomes


def test_option_metrics_match_reference():
    zd, zp = _logits_pair(n=5, v=60, eps=2.0, seed=19)
    opts = [7, 3, 42, 11]
    for t in (0.5, 1.0):
        got = M.option_metrics(zd, zp, opts, t)
        for i in range(5):
            p, q = ref_softmax(zd[i, opts].numpy(), t), ref_softmax(zp[i, opts].numpy(), t)
            assert got["kl"][i].item() == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-9)
            assert got["top1_agree"][i].item() == float(np.argmax(p) == np.argmax(q))
            ps, qs = np.sort(p)[::-1], np.sort(q)[::-1]
            assert got["margin_dense"][i].item() == pytest.approx(ps[0] - ps[1], rel=1e-9)
            assert got["margin_pruned"][i].item() == pytest.approx(qs[0] - qs[1], rel=1e-9)


# --------------------------------------------------------------------------- the hot path

@pytest.mark.parametrize("dtype,rtol,compiled", [(torch.float64, 1e-9, False), (torch.float32, 2e-3, False),
                                                 (torch.float64, 1e-9, True)])
def test_vocab_metrics_equals_single_metric_functions(dtype, rtol, compiled):
    """The hot path (eager with scratch buffers, or fused by torch.compile) against the
    single-metric functions, over several row blocks."""
    zd, zp = _logits_pair(n=9, v=3000, eps=0.5, seed=20, dtype=dtype)
    temps = (0.5, 1.0, 2.0)
    M.ROW_BLOCK_ELEMENTS, saved = 4 * 3000, M.ROW_BLOCK_ELEMENTS  # force several row blocks
    try:
        out = M.vocab_metrics(zd, zp, temps, topk=(5, 10), compiled=compiled)
    finally:
        M.ROW_BLOCK_ELEMENTS = saved
    dz = zp - zd
    want = {("logit", k, math.nan): v for k, v in M.geometry(zd, zp).items()}
    want[("logit", "var_uniform", math.nan)] = M.uniform_var(dz)
    want.update({("probability", k, math.nan): v for k, v in M.prediction_metrics(zd, zp, (5, 10)).items()})
    for t in temps:
        logp, logq = M.log_probs(zd, t), M.log_probs(zp, t)
        ref = M.geometry(logp.exp(), logq.exp())
        ref.update(kl=M.kl(logp, logq), reverse_kl=M.reverse_kl(logp, logq), js=M.js(logp, logq),
                   entropy_dense=M.entropy(logp), entropy_pruned=M.entropy(logq),
                   var_p=M.weighted_var(dz, logp.exp()), var_r=M.weighted_var(dz, logp.exp() ** 2),
                   kl_est=M.kl_estimate(zd, dz, t), cos_est=M.cos_estimate(zd, dz, t),
                   unif_est=M.uniform_var(dz) / (2 * t * t))
        want.update({("probability", k, t): v for k, v in ref.items()})
    key = lambda k: (k[0], k[1], -1.0 if k[2] != k[2] else k[2])  # noqa: E731  (NaN != NaN)
    assert sorted(map(key, out)) == sorted(map(key, want))
    assert M._COMPILED.get("failed") is None, "torch.compile fell back to eager"
    got = {key(k): v for k, v in out.items()}
    for k, v in want.items():
        torch.testing.assert_close(got[key(k)], v, rtol=rtol, atol=1e-7, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("compiled", [False, True])
def test_identical_inputs_give_exact_zeros_in_float32(compiled):
    zd = _rand(5, 1000, seed=21, scale=4.0, dtype=torch.float32)
    out = M.vocab_metrics(zd, zd.clone(), (0.5, 1.0, 2.0), compiled=compiled)
    for (space, metric, t), v in out.items():
        if metric == "cos" or "agree" in metric or "overlap" in metric:
            assert torch.equal(v, torch.ones_like(v)), (space, metric, t)
        elif not metric.startswith("entropy"):
            assert torch.equal(v, torch.zeros_like(v)), (space, metric, t)
            assert not torch.signbit(v).any(), (space, metric, t)
