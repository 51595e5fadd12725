"""The results contract: every file a run writes, and the probe table's schema. Outputs,
tracking and the sweep report read it from here and nowhere else; the README points here.

Files of a run directory (each written atomically; summary.json last):

    config.yaml          the resolved config
    pruning.json         what the pruner did, measured on the weights
    compression.json     per perturbation (pruning, quantization) its method, bits, group size, sym and
                         the effective bits per weight after it (prunerep/quant/accounting.py)
    probes.parquet       the tidy probe table, one row per value (:data:`PROBE_COLUMNS`)
    probes_summary.json  headline numbers at the final layer (:data:`HEADLINE`), flat
                         ``{"<context>/<space>/<metric>[@T=<t>]": value}`` plus
                         :data:`PROBE_SUMMARY_FIELDS`, ``error_accumulation/kl@T=<t>``, the final
                         layer's estimate-ratio percentiles ``<context>/probability/<ratio>_p<q>@T=<t>``
                         and, per layer, :data:`ESTIMATE_RATIOS_KEY` (:data:`RATIO_METRICS`)
    evals.json           dense vs pruned per task, mc_vs_gen_gap
    top_tokens.parquet   (probability space probed, probe.top_tokens > 0) the dense top-k tokens at each MC
                         answer position / first decoding step with p_dense and p_pruned
                         (:data:`prunerep.probes.top_tokens.COLUMNS`); not in :data:`RESULT_FILES`
                         (not always written)
    summary.json         :data:`SUMMARY_KEYS`: status, identity, achieved sparsity, effective bits, timings,
                         memory

The probe table (:data:`PROBE_COLUMNS`, dtypes :data:`PROBE_DTYPES`):

* ``context``: prompt | teacher_forced | free_running; ``prompt_id``, ``prompt_kind`` (mc | gen)
* ``layer`` (0 = embeddings … L = last block, before the final norm), ``sublayer`` (block | attn | mlp,
  and with ``probe.transitions`` the :data:`TRANSITION_SUBLAYERS` ``<attn|mlp>_<comparison>`` at
  layer i = block i − 1: ``transition_dense`` / ``transition_pruned`` = the sublayer's input x vs its
  output x + F(x) on that model, ``local`` = x + F_dense(x) vs x + F_pruned(x) with x the dense input;
  the base (x, resp. x + F_dense(x)) is the "dense" side of every metric: prunerep/probes/transitions.py)
* ``step``: prompt context: ``-1`` = mean over all prompt positions; the option-subspace and
  answer rows sit at the answer position ``P−1``, the estimate-ratio rows (:data:`RATIO_METRICS`)
  at every position ``0 … P−1``; teacher_forced / free_running: the decoding step t
  (0 = first generated token); ``-1`` for per-trajectory values
* ``space``: embedding (h; at the last layer the residual stream before the final norm, or after
  it with ``probe.h=normed``) | logit (z) | probability (p) | options (p on the MC option tokens,
  renormalised, at the answer position) | answer (p over the full vocabulary at the same answer
  positions: :data:`ANSWER_METRICS`) | tokens (free-running token agreement)
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
COMPRESSION_FILE = "compression.json"
PROBES_FILE = "probes.parquet"
PROBES_SUMMARY_FILE = "probes_summary.json"
EVALS_FILE = "evals.json"
SUMMARY_FILE = "summary.json"
#: the result files, copied when a completed point is reused
RESULT_FILES = (CONFIG_FILE, PRUNING_FILE, COMPRESSION_FILE, PROBES_FILE, PROBES_SUMMARY_FILE, EVALS_FILE)
#: the plots of one run
PROBE_PLOTS = ("probes_similarity.png", "probes_kl.png", "probes_steps.png", "probes_estimates.png",
               "probes_answer.png")
#: written when there is something to show: sublayer transitions (probe.transitions), top tokens
TRANSITIONS_PLOT = "probes_transitions.png"
TOP_TOKENS_FILE = "top_tokens.parquet"
TOP_TOKENS_PLOT = "probes_top_tokens.png"

#: summary.json of a completed run has exactly these keys (a failed one: status, error,
#: traceback, timings_s, peak_memory_mb and the identity)
SUMMARY_KEYS = ("config_hash", "model_key", "model", "pruner", "sparsity", "quant", "run_dir", "slurm_job_id",
                "device_slot", "status", "loaded_model", "error", "achieved_sparsity", "effective_bits", "timings_s",
                "peak_memory_mb", "probes", "mc_vs_gen_gap", "story")
IDENTITY_KEYS = ("config_hash", "model_key", "model", "pruner", "sparsity", "quant", "run_dir", "slurm_job_id",
                 "device_slot")

#: compression.json: the effective bits per weight (prunerep/quant/accounting.py) and, per
#: perturbation in the order applied, these keys (pruning: bits = the dtype's, group_size/sym None)
COMPRESSION_KEYS = ("dense_bits", "effective_bits", "n_weights", "perturbations", "modules", "accounting")
PERTURBATION_KEYS = ("kind", "method", "bits", "group_size", "sym", "effective_bits")


def quant_label(quant, bits=None, group_size=None, sym=None) -> str:
    """``none``, or a quantizer with its format: ``gptq-w4g64``, ``rtn-w3g128s`` (s: symmetric)."""
    quant = "none" if quant is None else str(quant)
    if quant == "none" or bits is None:
        return quant
    return f"{quant}-w{int(bits)}g{'' if group_size is None else int(group_size)}{'s' if sym else ''}"


def compression_label(pruner, quant_lbl: str = "none") -> str:
    """How a run's compression is named in reports and trackers: the pruner (``wanda``), the
    quantizer alone (``gptq-w4g64``, pruner ``none``), or both (``wanda+gptq-w4g64``)."""
    if quant_lbl in (None, "none"):
        return str(pruner)
    return str(quant_lbl) if pruner in (None, "none") else f"{pruner}+{quant_lbl}"


# --------------------------------------------------------------------------- the probe table
PROBE_COLUMNS = ("context", "prompt_id", "prompt_kind", "layer", "sublayer", "step", "space", "metric",
                 "temperature", "value")
PROBE_DTYPES = {"context": "object", "prompt_id": "int32", "prompt_kind": "object", "layer": "int16",
                "sublayer": "object", "step": "int32", "space": "object", "metric": "object",
                "temperature": "float64", "value": "float64"}
CONTEXTS = ("prompt", "teacher_forced", "free_running")
STEP_CONTEXTS = ("teacher_forced", "free_running")
#: ``sublayer`` values of the transition rows (probe.transitions): ``<attn|mlp>_<comparison>``
TRANSITION_COMPARISONS = ("transition_dense", "transition_pruned", "local")
TRANSITION_SUBLAYERS = tuple(f"{kind}_{c}" for c in TRANSITION_COMPARISONS for kind in ("attn", "mlp"))
SPACES = ("embedding", "logit", "probability")
#: every value of the ``space`` column, in the order tables and plots show them
SPACE_ORDER = ("embedding", "logit", "probability", "options", "answer", "tokens")
#: the "answer" space: the full-vocabulary metrics at the MC answer positions, the rows of the "options" space
ANSWER_METRICS = ("top1_agree", "kl")
#: per-row ratios of the second-order estimates to the exact values (space probability, at every
#: position / step): kl_est / kl and cos_est / (1 − cos p); rows where the exact value is 0 are left out
RATIO_METRICS = ("kl_est_ratio", "cos_est_ratio")
#: their percentiles in probes_summary.json
RATIO_PERCENTILES = (10, 50, 90)
#: probes_summary.json: ``{"<context>/probability/<ratio>@T=<t>": {"layer": [...], "p10": [...],
#: "p50": [...], "p90": [...], "n": [...]}}``, the distribution over rows (prompts x positions or steps)
ESTIMATE_RATIOS_KEY = "estimate_ratios"

#: probes_summary.json: the metrics reported per space at the final layer, in this order
HEADLINE = {
    "embedding": ("cos", "one_minus_cos", "rel_l2", "orth_par_ratio"),
    "logit": ("cos", "one_minus_cos", "rel_l2", "cos_centred", "one_minus_cos_centred", "rel_l2_centred",
              "var_uniform"),
    "probability": ("kl", "kl_est", "one_minus_cos", "cos_est", "reverse_kl", "js", "top1_agree", "top5_overlap",
                    "top10_overlap"),
    "options": ("kl", "top1_agree", "margin_dense", "margin_pruned"),
    "answer": ANSWER_METRICS,
    "tokens": ("token_agree", "first_divergence", "diverged"),
}
PROBE_SUMMARY_FIELDS = ("final_layer", "n_prompts", "n_rows", "nonfinite_values", "h")

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
