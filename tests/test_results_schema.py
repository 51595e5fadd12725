"""The results contract, written out by hand: a change to prunerep/results/schema.py that changes a
column, a file name or a summary key fails here (the integration test checks a real run). The probe
columns and summary keys are pinned in helpers.py, which those tests import too."""
from __future__ import annotations

from helpers import PROBE_COLUMNS, SUMMARY_KEYS  # shared with the end-to-end tests
from prunerep.results import schema as results

IDENTITY_KEYS = ["config_hash", "model_key", "model", "pruner", "sparsity", "quant", "run_dir", "slurm_job_id",
                 "device_slot"]
FILES = ["config.yaml", "pruning.json", "compression.json", "probes.parquet", "probes_summary.json", "evals.json"]


def test_the_schema_is_unchanged():
    assert list(results.PROBE_COLUMNS) == PROBE_COLUMNS
    assert set(results.SUMMARY_KEYS) == SUMMARY_KEYS
    assert list(results.RESULT_FILES) == FILES and results.SUMMARY_FILE == "summary.json"
    assert list(results.IDENTITY_KEYS) == IDENTITY_KEYS and set(IDENTITY_KEYS) <= SUMMARY_KEYS
    assert results.COMPRESSION_FILE == "compression.json"
    table = results.empty_probe_table()
    assert list(table.columns) == PROBE_COLUMNS
    assert [str(t) for t in table.dtypes] == ["object", "int32", "object", "int16", "object", "int32", "object",
                                              "object", "float64", "float64"]


def test_summary_keys_name_the_headline_numbers():
    assert results.summary_key("prompt", "probability", "kl", 1.0) == "prompt/probability/kl@T=1"
    assert results.summary_key("free_running", "tokens", "token_agree") == "free_running/tokens/token_agree"


def test_transition_sublayers_and_top_tokens_file():
    """Added by issue #9 (parts 1 and 5): the transition rows' ``sublayer`` values (same columns) and
    the top-token table, written only when there is something to put in it (not in RESULT_FILES)."""
    from prunerep.probes.top_tokens import COLUMNS, empty_table

    assert list(results.TRANSITION_SUBLAYERS) == ["attn_transition_dense", "mlp_transition_dense",
                                                  "attn_transition_pruned", "mlp_transition_pruned",
                                                  "attn_local", "mlp_local"]
    assert results.TOP_TOKENS_FILE == "top_tokens.parquet" and results.TOP_TOKENS_FILE not in results.RESULT_FILES
    assert (results.TRANSITIONS_PLOT, results.TOP_TOKENS_PLOT) == ("probes_transitions.png", "probes_top_tokens.png")
    assert COLUMNS == ["prompt_id", "prompt_kind", "where", "position", "rank", "token_id", "token", "temperature",
                       "p_dense", "p_pruned"]
    assert [str(t) for t in empty_table().dtypes] == ["int32", "object", "object", "int32", "int16", "int64", "object",
                                                       "float64", "float64", "float64"]


def test_probe_spaces_headline_and_estimate_ratios():
    """Added by issue #13: the "answer" space (the full vocabulary at the MC answer rows, next to
    "options"), the centred logit metrics in the headline, the per-row estimate ratios and their
    percentiles in probes_summary.json, which h the last layer's embedding rows are, two plots."""
    assert list(results.SPACES) == ["embedding", "logit", "probability"]
    assert list(results.SPACE_ORDER) == ["embedding", "logit", "probability", "options", "answer", "tokens"]
    assert list(results.ANSWER_METRICS) == ["top1_agree", "kl"]
    assert results.HEADLINE == {
        "embedding": ("cos", "one_minus_cos", "rel_l2", "orth_par_ratio"),
        "logit": ("cos", "one_minus_cos", "rel_l2", "cos_centred", "one_minus_cos_centred", "rel_l2_centred",
                  "var_uniform"),
        "probability": ("kl", "kl_est", "one_minus_cos", "cos_est", "reverse_kl", "js", "top1_agree",
                        "top5_overlap", "top10_overlap"),
        "options": ("kl", "top1_agree", "margin_dense", "margin_pruned"),
        "answer": ("top1_agree", "kl"),
        "tokens": ("token_agree", "first_divergence", "diverged"),
    }
    assert list(results.RATIO_METRICS) == ["kl_est_ratio", "cos_est_ratio"]
    assert list(results.RATIO_PERCENTILES) == [10, 50, 90] and results.ESTIMATE_RATIOS_KEY == "estimate_ratios"
    assert list(results.PROBE_SUMMARY_FIELDS) == ["final_layer", "n_prompts", "n_rows", "nonfinite_values", "h"]
    assert list(results.PROBE_PLOTS) == ["probes_similarity.png", "probes_kl.png", "probes_steps.png",
                                         "probes_estimates.png", "probes_answer.png"]


def test_items_table_columns():
    """items.parquet (prunerep/probes/items.py): written when a task ran, not in RESULT_FILES."""
    assert results.ITEMS_FILE == "items.parquet" and results.ITEMS_FILE not in results.RESULT_FILES
    assert list(results.ITEM_COLUMNS) == [
        "task", "item", "family", "dense_score", "pruned_score", "lost", "options_kl", "options_top1_agree",
        "options_one_minus_cos", "answer_kl", "answer_top1_agree", "answer_one_minus_cos", "h_one_minus_cos",
        "z_one_minus_cos_centred", "teacher_forced_kl", "first_divergence", "diverged", "embedding_one_minus_cos",
        "layers", "h_one_minus_cos_by_layer", "z_one_minus_cos_centred_by_layer"]
    assert set(results.ITEM_DTYPES) == set(results.ITEM_COLUMNS) and results.ITEM_DTYPES["lost"] == "bool"
