"""The results contract: every file a run writes, and the probe table's schema. Outputs,
tracking and the sweep report read it from here and nowhere else; the README points here.

Files of a run directory (each written atomically; summary.json last):

    config.yaml          the resolved config
    pruning.json         what the pruner did, measured on the weights
    probes.parquet       the tidy probe table, one row per value (:data:`PROBE_COLUMNS`)
    probes_summary.json  headline numbers at the final layer (:data:`HEADLINE`), flat
                         ``{"<context>/<space>/<metric>[@T=<t>]": value}`` plus
                         :data:`PROBE_SUMMARY_FIELDS` and ``error_accumulation/kl@T=<t>``
    evals.json           dense vs pruned per task, mc_vs_gen_gap
    summary.json         :data:`SUMMARY_KEYS`: status, identity, achieved sparsity, timings, memory

The probe table (:data:`PROBE_COLUMNS`, dtypes :data:`PROBE_DTYPES`):

* ``context``: prompt | teacher_forced | free_running; ``prompt_id``, ``prompt_kind`` (mc | gen)
* ``layer`` (0 = embeddings … L = last block, before the final norm), ``sublayer`` (block | attn | mlp)
* ``step``: prompt context: ``-1`` = mean over all prompt positions (the option-subspace rows
  sit at the answer position ``P−1``); teacher_forced / free_running: the decoding step t
  (0 = first generated token); ``-1`` for per-trajectory values
* ``space``: embedding (h) | logit (z) | probability (p) | options (p on the MC option tokens,
  renormalised) | tokens (free-running token agreement)
* ``metric``, ``temperature`` (NaN when the metric does not depend on it), ``value`` (float64;
  NaN/inf are kept and reported by a warning, never dropped).

Averages over prompts are two-stage (:func:`per_prompt_mean`): the mean over positions or steps
within a prompt, then over prompts, so every prompt weighs the same.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import pandas as pd

# --------------------------------------------------------------------------- files
CONFIG_FILE = "config.yaml"
PRUNING_FILE = "pruning.json"
PROBES_FILE = "probes.parquet"
PROBES_SUMMARY_FILE = "probes_summary.json"
EVALS_FILE = "evals.json"
SUMMARY_FILE = "summary.json"
#: the result files, copied when a completed point is reused
RESULT_FILES = (CONFIG_FILE, PRUNING_FILE, PROBES_FILE, PROBES_SUMMARY_FILE, EVALS_FILE)
#: the plots of one run
PROBE_PLOTS = ("probes_similarity.png", "probes_kl.png", "probes_steps.png")

#: summary.json of a completed run has exactly these keys (a failed one: status, error,
#: traceback, timings_s, peak_memory_mb and the identity)
SUMMARY_KEYS = ("config_hash", "model", "pruner", "sparsity", "run_dir", "slurm_job_id", "status", "loaded_model",
                "error", "achieved_sparsity", "timings_s", "peak_memory_mb", "probes", "mc_vs_gen_gap", "story")
IDENTITY_KEYS = ("config_hash", "model", "pruner", "sparsity", "run_dir", "slurm_job_id")

# --------------------------------------------------------------------------- the probe table
PROBE_COLUMNS = ("context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space", "metric",
                 "temperature", "value")
PROBE_DTYPES = {"context": "object", "prompt_id": "int32", "prompt_kind": "object", "layer": "int16",
                "sublayer": "object", "step": "int32", "space": "object", "metric": "object",
                "temperature": "float64", "value": "float64"}
CONTEXTS = ("prompt", "teacher_forced", "free_running")
STEP_CONTEXTS = ("teacher_forced", "free_running")
SPACES = ("embedding", "logit", "probability")
#: every value of the ``space`` column, in the order tables and plots show them
SPACE_ORDER = ("embedding", "logit", "probability", "options", "tokens")

#: probes_summary.json: the metrics reported per space at the final layer, in this order
HEADLINE = {
    "embedding": ("cos", "one_minus_cos", "rel_l2", "orth_par_ratio"),
    "logit": ("cos", "one_minus_cos", "rel_l2", "var_uniform"),
    "probability": ("kl", "kl_est", "one_minus_cos", "cos_est", "reverse_kl", "js", "top1_agree", "top5_overlap",
                    "top10_overlap"),
    "options": ("kl", "top1_agree", "margin_dense", "margin_pruned"),
    "tokens": ("token_agree", "first_divergence", "diverged"),
}
PROBE_SUMMARY_FIELDS = ("final_layer", "n_prompts", "n_rows", "nonfinite_values")

#: preferred similarity / divergence metric per plot, first one present wins (report and W&B)
SIMILARITY_METRICS = ("cos", "top1_agree", "token_agree", "top5_overlap", "topk_overlap_5")
DIVERGENCE_METRICS = ("kl", "kl_est", "js", "reverse_kl", "one_minus_cos", "rel_l2")


def empty_probe_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=PROBE_DTYPES[c]) for c in PROBE_COLUMNS})


def temperature_label(t: float) -> str:
    """``@T=1`` for a temperature, "" for NaN (a temperature-independent metric)."""
    return "" if t != t else f"@T={t:g}"


def summary_key(context: str, space: str, metric: str, temperature: float = math.nan) -> str:
    """The key of a headline number in probes_summary.json."""
    return f"{context}/{space}/{metric}{temperature_label(temperature)}"


def pick_metric(available: Iterable, prefs: Iterable[str]) -> Optional[str]:
    """The first metric of ``prefs`` that is among ``available``."""
    avail = set(map(str, available))
    return next((m for m in prefs if m in avail), None)


def reference_temperature(temperatures: Iterable[float]) -> float:
    """The temperature headline curves are drawn at: 1, else the closest to 1 on a log scale."""
    temps = [float(t) for t in temperatures if t == t and t > 0]
    return min(temps, key=lambda t: abs(math.log(t))) if temps else math.nan


def at_reference_temperature(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at :func:`reference_temperature`, plus the temperature-independent (NaN) rows."""
    t = reference_temperature(df["temperature"].dropna().unique())
    return df if t != t else df[df["temperature"].isna() | (df["temperature"] == t)]


def mean_or_nan(s: pd.Series) -> float:
    """The mean, NaN if any value is NaN or there is none."""
    return float(s.mean(skipna=False)) if len(s) else math.nan


def per_prompt_mean(df: pd.DataFrame, by: list[str], skipna: bool = False) -> pd.DataFrame:
    """Mean over steps/positions within each prompt, then over prompts (NaN propagates unless
    ``skipna``). Rows with step -1 in per-step contexts (per-trajectory values) are kept apart
    by ``by``."""
    agg = "mean" if skipna else mean_or_nan
    keys = [*by, "prompt_id"]
    inner = df.groupby(keys, dropna=False, sort=False)["value"].agg(agg).reset_index()
    return inner.groupby(by, dropna=False, sort=True)["value"].agg(agg).reset_index()
