"""Sublayer transitions and local damage (prunerep/probes/transitions.py) on tiny random decoders,
checked against the sublayers run by hand on captured inputs."""
from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import oracle as O
from helpers import CHAR_PROMPTS, probe_plan, prune_modules
from prunerep.config import ProbeConfig
from prunerep.model.anatomy import decoder_layers, final_norm, lens_logits, output_head, output_targets, sublayer
from prunerep.probes import compare_to_reference, dense_reference, summarize
from prunerep.results.schema import PROBE_COLUMNS, TRANSITION_SUBLAYERS
from prunerep.viz.probes import plot_transitions, transition_curves, write_probe_outputs

PROMPTS = CHAR_PROMPTS
TINY_TOKENIZER, TINY_LAYERS = "char_tok", 3  # conftest's tiny
IDENTICAL_ONE = {"cos", "cos_centred", "top1_agree", "top5_overlap", "top10_overlap"}
NOT_A_DIFFERENCE = {"entropy_dense", "entropy_pruned"}

plan = partial(probe_plan, n_prompts=2, max_new_tokens=4, temperatures=[1.0], transitions=True,
               contexts=["prompt", "teacher_forced"], sublayers=["block"], token_chunk=256)


def run(dense, pruned, tok, cfg, tmp_path):
    ref = dense_reference(dense, tok, cfg, tmp_path / "cache", model_key="tiny")
    return compare_to_reference(pruned, tok, cfg, ref).table, ref


def transition_rows(df, sublayer_name, layer=None):
    sel = df[df["sublayer"] == sublayer_name]
    return sel if layer is None else sel[sel["layer"] == layer]


def assert_identical(rows: pd.DataFrame, what):
    """Every metric of ``rows`` says "the two sides are the same vector / distribution"."""
    assert len(rows), what
    for metric, values in rows.groupby("metric")["value"]:
        if metric in IDENTICAL_ONE:
            assert (values == 1.0).all(), (what, metric)
        elif metric not in NOT_A_DIFFERENCE:
            assert (values == 0.0).all(), (what, metric, values.abs().max())


def assert_changed(rows: pd.DataFrame, what):
    kl = rows[(rows["space"] == "probability") & (rows["metric"] == "kl")]["value"]
    assert len(kl) and (kl > 0).all(), what


# --------------------------------------------------------------------------- exact zeros

def test_zeroed_output_projection_is_exactly_no_transition(tiny, char_tok, prompts_file, tmp_path):
    dense = copy.deepcopy(tiny)
    with torch.no_grad():
        output_targets(decoder_layers(dense)[1], "attn")[0].weight.zero_()  # block 1: attn adds 0
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        output_targets(decoder_layers(pruned)[0], "mlp")[0].weight.zero_()  # block 0: mlp adds 0 too
    df, _ = run(dense, pruned, char_tok, plan(prompts_file), tmp_path)
    assert list(df.columns) == list(PROBE_COLUMNS)
    assert set(df["sublayer"]) == {"block", *TRANSITION_SUBLAYERS}
    assert set(df.loc[df["sublayer"].isin(TRANSITION_SUBLAYERS), "context"]) == {"prompt", "teacher_forced"}
    assert set(df.loc[df["sublayer"].isin(TRANSITION_SUBLAYERS), "space"]) == {"embedding", "logit", "probability"}
    for name in ("attn_transition_dense", "attn_transition_pruned"):
        assert_identical(transition_rows(df, name, 2), name)  # cos 1, KL 0, ... in h, z and p
        assert_changed(transition_rows(df, name, 1), name)
    assert_identical(transition_rows(df, "mlp_transition_pruned", 1), "pruned mlp of block 0")
    assert_changed(transition_rows(df, "mlp_transition_dense", 1), "dense mlp of block 0")
    assert_changed(transition_rows(df, "mlp_local", 1), "local damage where the mlp was removed")
    assert_identical(transition_rows(df, "attn_local", 2), "zeroed attention on both sides")
    tf = df[(df["context"] == "teacher_forced") & df["sublayer"].isin(TRANSITION_SUBLAYERS)]
    assert sorted(tf["step"].unique()) == [0, 1, 2, 3]  # one row per decoding step
    assert (df.loc[(df["context"] == "prompt") & df["sublayer"].isin(TRANSITION_SUBLAYERS), "step"] == -1).all()


def test_local_damage_is_zero_unpruned_and_only_where_pruned(tiny, char_tok, prompts_file, tmp_path):
    cfg = plan(prompts_file)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    same, _ = run(tiny, tiny, char_tok, cfg, tmp_path)
    for name in ("attn_local", "mlp_local"):
        assert_identical(transition_rows(same, name), f"{name}, unpruned")
    dense_t = transition_rows(same, "attn_transition_dense")["value"].to_numpy()
    np.testing.assert_array_equal(dense_t, transition_rows(same, "attn_transition_pruned")["value"].to_numpy())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # the hooks rewrote nothing
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules()) == 0

    pruned = prune_modules(tiny, block=1, kind="mlp")
    df, _ = run(tiny, pruned, char_tok, cfg, tmp_path)
    assert_changed(transition_rows(df, "mlp_local", 2), "the pruned mlp (block 1)")
    for layer in (1, 3):
        assert_identical(transition_rows(df, "mlp_local", layer), f"mlp_local at layer {layer}")
    assert_identical(transition_rows(df, "attn_local"), "attn_local (no attention pruned)")
    # downstream, the pruned model's own transitions see the drift, the local damage does not
    drift = df[(df["sublayer"] == "block") & (df["layer"] == 3) & (df["metric"] == "kl")]["value"]
    assert (drift > 0).all()
    a = transition_rows(df, "attn_transition_dense", 3)
    b = transition_rows(df, "attn_transition_pruned", 3)
    assert not np.array_equal(a["value"].to_numpy(), b["value"].to_numpy())
    pd.testing.assert_frame_equal(a.drop(columns=["sublayer", "value"]).reset_index(drop=True),
                                  b.drop(columns=["sublayer", "value"]).reset_index(drop=True))


# --------------------------------------------------------------------------- against a computation by hand

def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), -math.inf).triu(1)[None, None]


@torch.no_grad()
def by_hand(dense, pruned, ids, raw=False):
    """Per block b: the residual-stream states of the transitions and the local damage, with the
    sublayers run by hand (their own modules, called directly) on inputs captured with
    ``output_hidden_states``."""
    ids = torch.as_tensor(ids).unsqueeze(0)
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    hd = dense(ids, output_hidden_states=True).hidden_states
    hp = pruned(ids, output_hidden_states=True).hidden_states
    rot = dense.model.rotary_emb

    def attn(block, x):
        return sublayer(block, "attn")(hidden_states=block.input_layernorm(x), attention_mask=_causal(n),
                                       position_embeddings=rot(x, pos))[0]

    def mlp(block, x):
        return sublayer(block, "mlp")(block.post_attention_layernorm(x))

    out = {}
    for b, (bd, bp) in enumerate(zip(decoder_layers(dense), decoder_layers(pruned))):
        x, xp = hd[b], hp[b]
        mid = x + attn(bd, x)
        mid_p = xp + attn(bp, xp)
        out[b + 1] = {
            "attn_transition_dense": (x, mid), "mlp_transition_dense": (mid, mid + mlp(bd, mid)),
            "attn_transition_pruned": (xp, mid_p), "mlp_transition_pruned": (mid_p, mid_p + mlp(bp, mid_p)),
            "attn_local": (mid, x + attn(bp, x)), "mlp_local": (mid + mlp(bd, mid), mid + mlp(bp, mid))}
    return {layer: {k: (a[0], c[0]) for k, (a, c) in d.items()} for layer, d in out.items()}


def hand_lens(model, h, raw):
    return output_head(model)(h if raw else final_norm(model)(h))


def hand_kl(za, zb):
    """KL(softmax(za) ‖ softmax(zb)) per row, straight from torch."""
    la, lb = F.log_softmax(za.double(), -1), F.log_softmax(zb.double(), -1)
    return (la.exp() * (la - lb)).sum(-1)


@pytest.mark.parametrize("raw", [False, True], ids=["final_norm", "raw"])
def test_values_match_the_sublayers_run_by_hand(tiny, char_tok, prompts_file, tmp_path, raw):
    pruned = prune_modules(prune_modules(tiny, 0, "attn"), 2, "mlp")
    cfg = plan(prompts_file, lens="raw" if raw else "final_norm", temperatures=[0.5, 1.0])
    df, ref = run(tiny, pruned, char_tok, cfg, tmp_path)
    table = {key: g.sort_values("step")["value"].to_numpy() for key, g in df.fillna({"temperature": -1.0}).groupby(
        ["prompt_id", "context", "layer", "sublayer", "space", "metric", "temperature"])}
    checked = 0
    for prompt in ref.prompts:
        cached = ref.load(prompt.id)
        contexts = [("prompt", torch.tensor(prompt.ids), slice(None))]
        gen = cached.get("gen_ids")
        if gen is not None:
            p, n = len(prompt.ids), len(gen)
            contexts.append(("teacher_forced", torch.cat([torch.tensor(prompt.ids), gen[: n - 1]]),
                             slice(p - 1, p - 1 + n)))
        for context, seq, sel in contexts:
            for layer, pairs in by_hand(tiny, pruned, seq).items():
                for name, (a, b) in pairs.items():
                    a, b = a[sel], b[sel]
                    za, zb = hand_lens(tiny, a, raw), hand_lens(tiny, b, raw)
                    want = {("embedding", "cos", math.nan): F.cosine_similarity(a.double(), b.double(), dim=-1),
                            ("probability", "kl", 1.0): hand_kl(za, zb),
                            ("probability", "kl", 0.5): hand_kl(za / 0.5, zb / 0.5),
                            ("probability", "reverse_kl", 1.0): hand_kl(zb, za),
                            ("probability", "kl_est", 0.5): O.kl_estimate(za, zb - za, 0.5),
                            ("probability", "cos_est", 1.0): O.cos_estimate(za, zb - za, 1.0),
                            ("logit", "one_minus_cos", math.nan): O.geometry(za, zb)["one_minus_cos"],
                            ("embedding", "orth_rel", math.nan): O.geometry(a, b)["orth_rel"]}
                    for (space, metric, t), v in want.items():
                        values = table[(prompt.id, context, layer, name, space, metric, -1.0 if t != t else t)]
                        expect = v.double().numpy()
                        expect = expect.mean(keepdims=True) if context == "prompt" else expect
                        np.testing.assert_allclose(values, expect, rtol=2e-4, atol=1e-7,
                                                   err_msg=f"{prompt.id} {context} {layer} {name} {space} {metric} {t}")
                        checked += 1
    assert checked == 3 * 3 * 6 * 8  # (prompt, context) x layer x comparison x metric
    local = transition_rows(df, "attn_local", 1)
    assert (local[local["metric"] == "kl"]["value"] > 0).all()  # the pruned sublayer is a real test


def test_raw_lens_skips_the_final_norm(tiny, char_tok, prompts_file, tmp_path):
    pruned = prune_modules(tiny, 1, "attn")
    normed, _ = run(tiny, pruned, char_tok, plan(prompts_file, contexts=["prompt"]), tmp_path)
    raw, _ = run(tiny, pruned, char_tok, plan(prompts_file, contexts=["prompt"], lens="raw"), tmp_path)
    # the lens changes the transition rows in z and p only; h and the residual-stream rows stay
    pd.testing.assert_frame_equal(normed.drop(columns="value"), raw.drop(columns="value"))
    same = (normed["sublayer"] == "block") | (normed["space"] == "embedding")
    np.testing.assert_array_equal(normed.loc[same, "value"].to_numpy(), raw.loc[same, "value"].to_numpy())
    kl = (normed["metric"] == "kl") & ~same
    assert not np.allclose(normed.loc[kl, "value"].to_numpy(), raw.loc[kl, "value"].to_numpy())
    h = torch.randn(5, tiny.config.hidden_size)
    torch.testing.assert_close(lens_logits(tiny, h, raw=True), output_head(tiny)(h))
    torch.testing.assert_close(lens_logits(tiny, h), output_head(tiny)(final_norm(tiny)(h)))
    with pytest.raises(ValueError, match="probe.lens"):
        plan(prompts_file, lens="norm")


# --------------------------------------------------------------------------- settings, cache, chunking, outputs

def test_off_by_default_and_the_cache_keeps_its_key(tiny, char_tok, prompts_file, tmp_path):
    assert ProbeConfig().transitions is False
    off = plan(prompts_file, transitions=False)
    ref_off = dense_reference(tiny, char_tok, off, tmp_path, model_key="tiny")
    assert not [k for k in ref_off.load(0) if k.startswith("transitions/")]
    df = compare_to_reference(tiny, char_tok, off, ref_off).table
    assert set(df["sublayer"]) == {"block"}
    on = plan(prompts_file)
    ref_on = dense_reference(tiny, char_tok, on, tmp_path, model_key="tiny")
    assert ref_on.key != ref_off.key
    assert {k.split("/")[1] for k in ref_on.load(1) if k.startswith("transitions/")} == {"prompt", "teacher_forced"}
    with pytest.raises(ValueError, match="without transitions"):
        compare_to_reference(tiny, char_tok, on, ref_off)


def test_token_chunk_does_not_change_transition_values(tiny, char_tok, prompts_file, tmp_path):
    pruned = prune_modules(tiny, 1, "mlp")
    small, _ = run(tiny, pruned, char_tok, plan(prompts_file, token_chunk=128), tmp_path)  # 8 rows of each state
    large, _ = run(tiny, pruned, char_tok, plan(prompts_file, token_chunk=4096), tmp_path)
    labels = [c for c in PROBE_COLUMNS if c != "value"]
    pd.testing.assert_frame_equal(small[labels], large[labels])
    np.testing.assert_allclose(small["value"], large["value"], rtol=1e-12, atol=0)


def test_outputs_plot_the_transitions_and_leave_the_summary_alone(tiny, char_tok, prompts_file, tmp_path):
    pruned = prune_modules(tiny, 1, "mlp")
    cfg_on = plan(prompts_file)
    result = compare_to_reference(pruned, char_tok, cfg_on, dense_reference(tiny, char_tok, cfg_on, tmp_path / "cache",
                                                                       model_key="tiny"))
    on = result.table
    off, _ = run(tiny, pruned, char_tok, plan(prompts_file, transitions=False), tmp_path)
    s_on = write_probe_outputs(result, tmp_path / "on")
    s_off = summarize(off)
    assert (tmp_path / "on" / "probes_transitions.png").stat().st_size > 0
    assert not plot_transitions(off, tmp_path / "off.png") and not (tmp_path / "off.png").exists()
    assert s_on.pop("n_rows") > s_off.pop("n_rows")
    assert s_on == s_off  # the headline numbers are the residual stream's
    back = pd.read_parquet(tmp_path / "on" / "probes.parquet")
    pd.testing.assert_frame_equal(back, on)
    curves = transition_curves(on)
    assert set(curves["kind"]) == {"attn", "mlp"}
    assert set(curves["comparison"]) == {"transition_dense", "transition_pruned", "local"}


def test_sweep_report_draws_dense_pruned_and_local_per_layer(tiny, char_tok, prompts_file, tmp_path):
    from prunerep.results.store import atomic_write_json
    from prunerep.report import by_method, load_sweep
    from prunerep.report.transitions import plot_sweep_transitions, transition_points

    cfg = plan(prompts_file, contexts=["prompt"])
    for sp, model in (("0.3", prune_modules(tiny, 1, "mlp", 0.3)), ("0.6", prune_modules(tiny, 1, "mlp", 0.6))):
        d = tmp_path / "sweep" / f"tiny_magnitude_{sp}"
        d.mkdir(parents=True)
        df, _ = run(tiny, model, char_tok, cfg, tmp_path)
        df.to_parquet(d / "probes.parquet")
        atomic_write_json(d / "summary.json", {"status": "complete", "model": "tiny", "pruner": "magnitude",
                                               "sparsity": float(sp), "run_dir": str(d)})
    table, _ = load_sweep(tmp_path / "sweep")
    points = transition_points(by_method(table))
    assert set(points["comparison"]) == {"transition_dense", "transition_pruned", "local"}
    assert set(points["space"]) == {"embedding", "logit", "probability"}
    kl = points[points["metric"] == "kl"].set_index(["sparsity", "kind", "comparison", "layer"])["value"]
    assert kl["0.3", "mlp", "transition_dense", 2] == kl["0.6", "mlp", "transition_dense", 2]
    assert 0 < kl["0.3", "mlp", "local", 2] < kl["0.6", "mlp", "local", 2]  # more pruning, more damage
    assert kl["0.6", "mlp", "local", 3] == 0 and kl["0.6", "attn", "local", 2] == 0
    png = plot_sweep_transitions(points, tmp_path / "transitions_vs_layer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
