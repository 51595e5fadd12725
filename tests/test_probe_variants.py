"""Which number is compared with which (issue #13): the full vocabulary at the MC answer rows next to
the option subspace, centred logits, the post-norm h, where the second-order estimates hold (their
per-row ratio percentiles against numpy over independently computed rows) and every stop token.
Tiny random decoders in float64, so the probe and the oracle agree to rounding."""
from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

import oracle as O
from conftest import make_tiny
from helpers import probe_plan
from prunerep.model.anatomy import final_norm, lens_logits
from prunerep.probes import capture, compare_to_reference, dense_reference
from prunerep.probes import metrics as M, top_tokens
from prunerep.probes.contexts import greedy_decode, stop_token_ids
from prunerep.results.schema import RATIO_METRICS, RATIO_PERCENTILES
from prunerep.viz.probes import write_probe_outputs

PROMPTS = [
    {"prompt": "What is the capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:",
     "options": [" A", " B", " C", " D"]},
    {"prompt": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"},
    {"prompt": "2 + 2 =\nA. 3\nB. 4\nAnswer:", "options": [" A", " B"]},
]
NAN = math.nan


@pytest.fixture(scope="module")
def models(smollm2_tok):
    """(dense, pruned): a float64 tiny Llama and a copy with half of each decoder row zeroed."""
    dense = make_tiny("llama", vocab_size=len(smollm2_tok), num_hidden_layers=2).double()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for name, w in pruned.named_parameters():
            if "layers." in name and w.dim() == 2:
                w.scatter_(1, w.abs().argsort(dim=1)[:, : w.shape[1] // 2], 0.0)
    return dense, pruned


plan = partial(probe_plan, n_prompts=len(PROMPTS), max_new_tokens=4, temperatures=[1.0], sublayers=["block"],
               contexts=["prompt"], top_tokens=0, max_prompt_tokens=20)


def states(model, ids, layers):
    with capture(model, layers, ["block"]) as acts, torch.no_grad():
        model(torch.tensor(ids).unsqueeze(0))
    return {layer: acts[(layer, "block")][0] for layer in layers}


# --------------------------------------------------------------------------- 1. the answer rows

def test_answer_rows_compare_the_full_vocabulary_on_the_option_rows(models, smollm2_tok, prompts_file, tmp_path):
    dense, pruned = models
    cfg = plan(prompts_file, spaces=["probability"], temperatures=[0.5, 1.0], n_prompts=1)
    ref = dense_reference(dense, smollm2_tok, cfg, tmp_path, model_key="tiny64")
    result = compare_to_reference(pruned, smollm2_tok, cfg, ref)
    df = result.table
    opts, ans = df[df["space"] == "options"], df[df["space"] == "answer"]
    keys = ["prompt_id", "layer", "step"]
    # the same rows on both sides: the MC prompts' last position, at every layer
    assert set(map(tuple, opts[keys].to_numpy())) == set(map(tuple, ans[keys].to_numpy()))
    assert set(ans["prompt_id"]) == {p.id for p in ref.prompts if p.kind == "mc"}
    assert set(ans["metric"]) == {"top1_agree", "kl"} and (ans["context"] == "prompt").all()
    checked = 0
    for prompt in (p for p in ref.prompts if p.kind == "mc"):
        last = len(prompt.ids) - 1
        hd, hp = states(dense, prompt.ids, ref.layers), states(pruned, prompt.ids, ref.layers)
        for layer in ref.layers:
            zd, zp = lens_logits(pruned, hd[layer][last:]), lens_logits(pruned, hp[layer][last:])
            ids = list(prompt.option_ids)
            want = {("options", "top1_agree", NAN): O.top1_agree(zd[:, ids], zp[:, ids]),
                    ("answer", "top1_agree", NAN): O.top1_agree(zd, zp)}
            for t in (0.5, 1.0):
                want[("options", "kl", t)] = O.option_metrics(zd, zp, ids, t)["kl"]
                want[("answer", "kl", t)] = O.kl(O.log_probs(zd, t), O.log_probs(zp, t))
            got = df[(df["prompt_id"] == prompt.id) & (df["layer"] == layer) & (df["step"] == last)]
            for (space, metric, t), v in want.items():
                row = got[(got["space"] == space) & (got["metric"] == metric)
                          & (got["temperature"].isna() if t != t else got["temperature"] == t)]
                assert row["value"].item() == pytest.approx(v.item(), rel=1e-9, abs=1e-15), (space, metric, t)
                checked += 1
    assert checked == 1 * 3 * 6
    # the final-layer full-vocabulary agreement at the answer rows is not the all-position one
    s = write_probe_outputs(result, tmp_path / "run")
    assert {"prompt/answer/top1_agree", "prompt/answer/kl@T=1", "prompt/options/top1_agree",
            "prompt/probability/top1_agree"} <= set(s)
    assert (tmp_path / "run" / "probes_answer.png").stat().st_size > 0


# --------------------------------------------------------------------------- 2. centred logits

def test_centred_logit_metrics_ignore_a_constant_added_to_every_logit_of_a_row():
    g = torch.Generator().manual_seed(3)
    zd = torch.randn(6, 700, generator=g, dtype=torch.float64) * 3 - 2
    zp = zd + 0.4 * torch.randn(6, 700, generator=g, dtype=torch.float64)
    shift_d = 40 * torch.randn(6, 1, generator=g, dtype=torch.float64)  # a different constant per row and side
    shift_p = 40 * torch.randn(6, 1, generator=g, dtype=torch.float64)
    base = M.vocab_metrics(zd, zp, (1.0,), probability=False)
    moved = M.vocab_metrics(zd + shift_d, zp + shift_p, (1.0,), probability=False)
    centred = [k for k in base if k[1].endswith(M.CENTRED)] + [("logit", "var_uniform", NAN)]
    assert len(centred) == 7
    for k in base:
        if k in centred:
            torch.testing.assert_close(moved[k], base[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
        else:  # the raw geometry is not shift-invariant
            assert not torch.allclose(moved[k], base[k], rtol=1e-3), k
    # and they are the oracle's geometry of z − mean_V(z)
    want = O.geometry(O.centred(zd + shift_d), O.centred(zp + shift_p))
    for m, v in want.items():
        torch.testing.assert_close(moved[("logit", m + M.CENTRED, NAN)], v, rtol=1e-9, atol=1e-12)
    # a pruned row that is a constant (all logits equal) is the centred zero vector: cos 0
    flat = M.vocab_metrics(zd[:2], torch.full_like(zd[:2], 7.0), (1.0,), probability=False)
    assert flat[("logit", "cos_centred", NAN)].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- 3. which h

def test_h_normed_compares_the_final_norm_output_at_the_last_layer_only(models, smollm2_tok, prompts_file, tmp_path):
    dense, pruned = models
    with pytest.raises(ValueError, match="probe.h"):
        plan(prompts_file, h="post")
    runs = {}
    for h in ("residual", "normed"):
        cfg = plan(prompts_file, spaces=["embedding"], contexts=["prompt", "teacher_forced", "free_running"], h=h)
        ref = dense_reference(dense, smollm2_tok, cfg, tmp_path, model_key="tiny64")
        runs[h] = compare_to_reference(pruned, smollm2_tok, cfg, ref)
    last = ref.n_layers
    res, nor = runs["residual"].table, runs["normed"].table
    below = res["layer"] < last
    np.testing.assert_array_equal(res.loc[below, "value"], nor.loc[below, "value"])  # other layers: unchanged
    assert (res.loc[~below, "value"].to_numpy() != nor.loc[~below, "value"].to_numpy()).any()
    assert set(nor.loc[nor["layer"] == last, "context"]) == {"prompt", "teacher_forced", "free_running"}
    norm = final_norm(pruned)
    for prompt in ref.prompts:
        hd, hp = states(dense, prompt.ids, [last])[last], states(pruned, prompt.ids, [last])[last]
        with torch.no_grad():
            want = O.geometry(norm(hd), norm(hp))
        got = nor[(nor["prompt_id"] == prompt.id) & (nor["layer"] == last) & (nor["context"] == "prompt")]
        for m, v in want.items():
            assert got.loc[got["metric"] == m, "value"].item() == pytest.approx(v.mean().item(), rel=1e-9, abs=1e-15)
    assert write_probe_outputs(runs["normed"], tmp_path / "run")["h"] == "normed"
    assert pd.read_parquet(tmp_path / "run" / "probes.parquet").attrs == {"probe_h": "normed"}


# --------------------------------------------------------------------------- 4. where the estimates hold

def test_estimate_ratio_percentiles_equal_numpy_over_independent_rows(models, smollm2_tok, prompts_file, tmp_path):
    dense, pruned = models
    temps = (1.0,)
    cfg = plan(prompts_file, spaces=["probability"], temperatures=list(temps), n_prompts=2)
    ref = dense_reference(dense, smollm2_tok, cfg, tmp_path, model_key="tiny64")
    summary = write_probe_outputs(compare_to_reference(pruned, smollm2_tok, cfg, ref), tmp_path / "run")
    # the per-row values, from the oracle on both models' hooked states
    per_layer: dict = {}
    for prompt in ref.prompts:
        hd, hp = states(dense, prompt.ids, ref.layers), states(pruned, prompt.ids, ref.layers)
        for layer in ref.layers:
            zd, zp = lens_logits(pruned, hd[layer]), lens_logits(pruned, hp[layer])
            for t in temps:
                logp, logq = O.log_probs(zd, t), O.log_probs(zp, t)
                pairs = {"kl_est_ratio": (O.kl_estimate(zd, zp - zd, t), O.kl(logp, logq)),
                         "cos_est_ratio": (O.cos_estimate(zd, zp - zd, t),
                                           O.geometry(logp.exp(), logq.exp())["one_minus_cos"])}
                for name, (est, exact) in pairs.items():
                    keep = exact != 0
                    per_layer.setdefault((name, t, layer), []).append((est[keep] / exact[keep]).numpy())
    ratios = summary["estimate_ratios"]
    for name in RATIO_METRICS:
        for t in temps:
            entry = ratios[f"prompt/probability/{name}@T={t:g}"]
            layers = [layer for layer in ref.layers if sum(map(len, per_layer[(name, t, layer)]))]
            assert entry["layer"] == layers and 0 not in layers  # layer 0: both sides equal, no ratio
            for i, layer in enumerate(layers):
                values = np.concatenate(per_layer[(name, t, layer)])
                assert entry["n"][i] == len(values)
                want = np.percentile(values, RATIO_PERCENTILES)
                got = [entry[f"p{q}"][i] for q in RATIO_PERCENTILES]
                np.testing.assert_allclose(got, want, rtol=1e-9)
            # the final layer's, flat
            assert [summary[f"prompt/probability/{name}_p{q}@T={t:g}"] for q in RATIO_PERCENTILES] == \
                [entry[f"p{q}"][-1] for q in RATIO_PERCENTILES]
    assert (tmp_path / "run" / "probes_estimates.png").stat().st_size > 0


# --------------------------------------------------------------------------- 6. stop tokens

def test_every_eos_id_of_the_generation_config_and_the_tokenizer_stops_decoding(smollm2_tok, prompts_file, tmp_path):
    model = make_tiny("llama", vocab_size=len(smollm2_tok), num_hidden_layers=1, seed=5)
    ids = torch.tensor(smollm2_tok(PROMPTS[1]["prompt"])["input_ids"])
    free = greedy_decode(model, ids, 8).tokens.tolist()  # no stop token
    second = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i] and t != smollm2_tok.eos_token_id)
    unused = next(t for t in range(len(smollm2_tok)) if t not in free and t != smollm2_tok.eos_token_id)
    model.generation_config.eos_token_id = [unused, free[second]]  # a list of two ids, as Llama 3's
    assert stop_token_ids(model, smollm2_tok) == sorted({unused, free[second], smollm2_tok.eos_token_id})
    assert greedy_decode(model, ids, 8, stop_token_ids(model, smollm2_tok)).tokens.tolist() == free[:second + 1]
    # the dense reference decodes with them: the trajectory ends at the second id, kept
    cfg = plan(prompts_file, spaces=["embedding"], contexts=["teacher_forced"], max_new_tokens=8,
               max_prompt_tokens=256, chat_template=False)  # the prompt as the ids above
    ref = dense_reference(model, smollm2_tok, cfg, tmp_path, model_key="tiny-eos")
    gen = ref.load(next(p.id for p in ref.prompts if p.text == PROMPTS[1]["prompt"]))["gen_ids"]
    assert gen.tolist() == free[:second + 1]


# --------------------------------------------------------------------------- reuse within the comparison

def test_top_token_table_reuses_the_comparisons_rows_bit_for_bit(models, smollm2_tok, prompts_file, tmp_path):
    """The comparison keeps the last layer's states and the logits at P − 1 for the top-token table
    (no second forward, no second LM-head read): the table equals one computed from scratch."""
    dense, pruned = models
    cfg = plan(prompts_file, spaces=["probability"], contexts=["prompt", "teacher_forced"], top_tokens=5)
    ref = dense_reference(dense, smollm2_tok, cfg, tmp_path, model_key="tiny64")
    result = compare_to_reference(pruned, smollm2_tok, cfg, ref)
    fresh = top_tokens.top_tokens_table(pruned, smollm2_tok, cfg, ref)  # outside the comparison: new forwards
    pd.testing.assert_frame_equal(result.top_tokens, fresh)
    memo: dict = {}  # a memo answers only what it holds
    assert top_tokens.top_tokens_table(pruned, smollm2_tok, cfg, ref, memo).equals(fresh) and memo
