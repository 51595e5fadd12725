"""The results contract, written out by hand: a change to prunerep/results.py that changes a
column, a file name or a summary key fails here (the integration test checks a real run)."""
from __future__ import annotations

from prunerep import results

PROBE_COLUMNS = ["context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space", "metric",
                 "temperature", "value"]
SUMMARY_KEYS = {"config_hash", "model", "pruner", "sparsity", "run_dir", "slurm_job_id", "status", "error",
                "achieved_sparsity", "timings_s", "peak_memory_mb", "probes", "mc_vs_gen_gap",
                "loaded_model",  # added by the reliability issue (#11): what was actually loaded
                "story"}  # added by the first-hour issue (#12): the console summary's numbers
FILES = ["config.yaml", "pruning.json", "probes.parquet", "probes_summary.json", "evals.json"]


def test_the_schema_is_unchanged():
    assert list(results.PROBE_COLUMNS) == PROBE_COLUMNS
    assert set(results.SUMMARY_KEYS) == SUMMARY_KEYS
    assert list(results.RESULT_FILES) == FILES and results.SUMMARY_FILE == "summary.json"
    table = results.empty_probe_table()
    assert list(table.columns) == PROBE_COLUMNS
    assert [str(t) for t in table.dtypes] == ["object", "int32", "object", "int16", "object", "int32", "object",
                                              "object", "float64", "float64"]


def test_summary_keys_name_the_headline_numbers():
    assert results.summary_key("prompt", "probability", "kl", 1.0) == "prompt/probability/kl@T=1"
    assert results.summary_key("free_running", "tokens", "token_agree") == "free_running/tokens/token_agree"
