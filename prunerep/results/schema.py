"""The results contract: every file a run writes, and the probe table's schema. Outputs,
tracking and the sweep report read it from here and nowhere else; the README points here.

Files of a run directory (each written atomically; summary.json last):

    config.yaml          the resolved config
    pruning.json         what the pruner did, measured on the weights
    compression.json     per perturbation (pruning, quantization) its method, bits, group size, sym and
                         the effective bits per weight after it (prunerep/compress/accounting.py)
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
    eval_items.parquet   (a task with per-item outcomes evaluated) dense vs pruned per document: answers,
                         generations, correctness (:data:`prunerep.evals.items.COLUMNS`); not in
                         :data:`RESULT_FILES` (not always written)
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
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import pandas as pd

# --------------------------------------------------------------------------- files
CONFIG_FILE = "config.yaml"
PRUNING_FILE = "pruning.json"
COMPRESSION_FILE = "compression.json"
PROBES_FILE = "probes.parquet"
PROBES_SUMMARY_FILE = "probes_summary.json"
EVALS_FILE = "evals.json"
SUMMARY_FILE = "summary.json"
#: the result files of a run (evals.json when it evaluated something)
RESULT_FILES = (CONFIG_FILE, PRUNING_FILE, COMPRESSION_FILE, PROBES_FILE, PROBES_SUMMARY_FILE, EVALS_FILE)
#: the files every complete run has (its manifest lists them and whatever else it wrote); a run
#: that probed has PROBE_FILES too, one that evaluated evals.json
RUN_FILES = (CONFIG_FILE, PRUNING_FILE, COMPRESSION_FILE, SUMMARY_FILE)
PROBE_FILES = (PROBES_FILE, PROBES_SUMMARY_FILE)
#: the plots of one run
PROBE_PLOTS = ("probes_similarity.png", "probes_kl.png", "probes_steps.png", "probes_estimates.png",
               "probes_answer.png")
#: written when there is something to show: sublayer transitions (probe.transitions), top tokens
TRANSITIONS_PLOT = "probes_transitions.png"
TOP_TOKENS_FILE = "top_tokens.parquet"
TOP_TOKENS_PLOT = "probes_top_tokens.png"
#: written when a task has per-item outcomes: dense vs pruned per document (prunerep.evals.items.COLUMNS)
EVAL_ITEMS_FILE = "eval_items.parquet"

#: summary.json of a completed run has exactly these keys (a failed one: status, error,
#: traceback, timings_s, peak_memory_mb and the identity)
SUMMARY_KEYS = ("config_hash", "model_key", "model", "pruner", "sparsity", "quant", "run_dir", "slurm_job_id",
                "device_slot", "status", "loaded_model", "error", "achieved_sparsity", "effective_bits", "timings_s",
                "peak_memory_mb", "probes", "mc_vs_gen_gap", "story")
#: the environment variable that tells a point its device slot (launcher=local_gpu sets it; the
#: identity's ``device_slot``)
DEVICE_SLOT_ENV = "PRUNEREP_DEVICE_SLOT"
IDENTITY_KEYS = ("config_hash", "model_key", "model", "pruner", "sparsity", "quant", "run_dir", "slurm_job_id",
                 "device_slot")

def failure_summary(identity: dict, error: BaseException | str, **fields: Any) -> dict:
    """The summary.json of a point that failed, wherever it failed (the pipeline, bad input in a
    sweep, a job the scheduler killed): its identity, ``status: failed``, the error in one line and
    what else is known (``traceback``, ``timings_s``, ``peak_memory_mb``, ``scheduler_state``...)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {**{k: None for k in IDENTITY_KEYS}, "achieved_sparsity": None, "timings_s": {}, "peak_memory_mb": {},
            **identity, **fields, "status": "failed", "error": message}


#: compression.json: the effective bits per weight (prunerep/compress/accounting.py) and, per
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
#: the contexts whose rows are per decoding step
STEP_CONTEXTS = CONTEXTS[1:]
#: the contexts with transition rows: free-running has none (each model runs its own sequence, so
#: there is no dense input to patch in)
TRANSITION_CONTEXTS = CONTEXTS[:2]
#: ``sublayer`` values of the residual-stream rows: the stream itself and the two sublayers' updates
SUBLAYERS = ("block", "attn", "mlp")
#: ``sublayer`` values of the transition rows (probe.transitions): ``<attn|mlp>_<comparison>``
TRANSITION_COMPARISONS = ("transition_dense", "transition_pruned", "local")
TRANSITION_SUBLAYERS = tuple(f"{kind}_{c}" for c in TRANSITION_COMPARISONS for kind in ("attn", "mlp"))
SPACES = ("embedding", "logit", "probability")
#: every value of the ``space`` column, in the order tables and plots show them
SPACE_ORDER = ("embedding", "logit", "probability", "options", "answer", "tokens")
#: the "answer" space: the full-vocabulary metrics at the MC answer positions, the rows of the "options" space
ANSWER_METRICS = ("top1_agree", "kl")
#: per-row ratios of the second-order estimates to the exact values they estimate (space probability,
#: at every position / step): ``{ratio: (estimate, exact)}``; rows where the exact value is 0 are left out
ESTIMATE_RATIOS = {"kl_est_ratio": ("kl_est", "kl"), "cos_est_ratio": ("cos_est", "one_minus_cos")}
RATIO_METRICS = tuple(ESTIMATE_RATIOS)
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
#: probes.parquet's pandas metadata (``DataFrame.attrs``): which h the last layer's embedding rows are
PROBE_H_ATTR = "probe_h"

#: preferred similarity / divergence metric per plot, first one present wins (report and W&B)
SIMILARITY_METRICS = ("cos", "top1_agree", "token_agree", "top5_overlap", "topk_overlap_5")
DIVERGENCE_METRICS = ("kl", "kl_est", "js", "reverse_kl", "one_minus_cos", "rel_l2")


# --------------------------------------------------------------------------- items.parquet
ITEMS_FILE = "items.parquet"
#: items.parquet (prunerep/probes/items.py): one row per evaluated item, its outcome dense and pruned
#: (``dense_score``, ``pruned_score``: 1/0 for multiple choice and exact match, nDCG@10 for a query;
#: ``lost``: right dense, not right pruned) beside its representation measures, dense vs pruned at
#: the answer position (the context's last token): the option distribution (the option
#: log-likelihoods, normalised), the full vocabulary, h and the centred z at the last probed layer
#: and per probed layer (``layers``, ``*_by_layer``); generative: ``teacher_forced_kl``,
#: ``first_divergence``, ``diverged``; retrieval: the query embedding's ``embedding_one_minus_cos``.
#: NaN where an item has no such measure.
ITEM_MEASURES = ("options_kl", "options_top1_agree", "options_one_minus_cos", "answer_kl", "answer_top1_agree",
                 "answer_one_minus_cos", "h_one_minus_cos", "z_one_minus_cos_centred", "teacher_forced_kl",
                 "first_divergence", "diverged", "embedding_one_minus_cos")
ITEM_LIST_COLUMNS = ("layers", "h_one_minus_cos_by_layer", "z_one_minus_cos_centred_by_layer")
ITEM_COLUMNS = ("task", "item", "family", "dense_score", "pruned_score", "lost", *ITEM_MEASURES, *ITEM_LIST_COLUMNS)
ITEM_DTYPES = {"task": "object", "item": "object", "family": "object", "dense_score": "float64",
               "pruned_score": "float64", "lost": "bool", **{m: "float64" for m in ITEM_MEASURES},
               **{c: "object" for c in ITEM_LIST_COLUMNS}}


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


# =========================================================================== evals.json
# Written by :func:`prunerep.evals.compare.compare_evals`: :class:`EvalsReport` and its parts, each
# ``to_json`` the file's layout. The conventions (signs, chance, families) are the docstring of
# :mod:`prunerep.evals.compare` and the two strings every file carries.

EVALS_CONVENTIONS = ("rel_change=(pruned-dense)/dense; relative drop=-rel_change; "
                     "mc_vs_gen_gap=mean drop(generative)-mean drop(multiple_choice), "
                     ">0: generation hurt more; fidelity at token level, first divergence = "
                     "common-prefix length averaged over diverging docs")
FAMILY_CONVENTIONS = (
    "perplexity: lower is better, abs_change=dense-pruned, rel_change=(dense-pruned)/dense (negative: worse); "
    "retained=pruned/dense (perplexity dense/pruned); retained_above_chance=(pruned-chance)/(dense-chance) "
    "(perplexity: log-space vs a uniform guess, chance=vocab size); excluded_at_chance: dense-chance <= "
    "stderr(dense); gap_above_chance=mean retained_above_chance(multiple_choice)-mean(generative), >0: "
    "generation kept less; headline: retrieval >= multiple_choice >= generative in retained_above_chance")


@dataclass(frozen=True)
class DensePruned:
    dense: float | None
    pruned: float | None


@dataclass(frozen=True)
class MetricChange:
    dense: float | None
    pruned: float | None
    rel_change: float | None


@dataclass(frozen=True)
class Fidelity:
    """Token-level agreement of the pruned generations with the dense ones (the same documents)."""
    n_compared: int
    identical_frac: float | None
    mean_first_divergence: float | None  # over the diverging documents: the common prefix's length
    unit: str = "token"


@dataclass(frozen=True)
class SidePicks:
    counts: list[int]  # per option position
    n: int
    top: str
    top_frac: float
    biased: bool  # top_frac >= the threshold


@dataclass(frozen=True)
class OptionPicks:
    """Which option each side of a multiple-choice task picks (prunerep.evals.bias)."""
    labels: list[str]
    threshold: float
    dense: SidePicks | None
    pruned: SidePicks | None
    agreement: float | None  # how often pruned picks what dense picked (written when both sides are)

    @property
    def sides(self) -> dict[str, SidePicks]:
        """``{"dense": .., "pruned": ..}``: the sides with picks."""
        return {side: p for side, p in (("dense", self.dense), ("pruned", self.pruned)) if p is not None}

    @property
    def biased(self) -> list[str]:
        """The sides that pick one option at least ``threshold`` of the time."""
        return [side for side, p in self.sides.items() if p.biased]

    def to_json(self) -> dict:
        both = {"agreement": self.agreement} if len(self.sides) == 2 else {}
        return {"labels": self.labels, "threshold": self.threshold, **{s: asdict(p) for s, p in self.sides.items()},
                "biased": self.biased, **both}


@dataclass(frozen=True)
class Debias:
    mode: str  # "permute": scored over the rotations of the options; "none"
    dense_unpermuted: float | None = None  # permute: each side's score on the documents as given
    pruned_unpermuted: float | None = None
    reason: str | None = None  # none: why not

    def to_json(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "permute":
            out.update(dense_unpermuted=self.dense_unpermuted, pruned_unpermuted=self.pruned_unpermuted)
        return {**out, "reason": self.reason} if self.reason else out


@dataclass(frozen=True)
class RetrievalChange:
    metrics_chance: dict[str, float] | None  # each metric under a random ranking
    embedding_cosine: dict[str, float] | None  # mean / min cosine of the dense and pruned embedding of a text


@dataclass(frozen=True)
class TaskRow:
    """One task of evals.json: dense vs pruned on its headline metric (``skipped``: neither)."""
    type: str | None  # the family (prunerep.evals.taskspec), or lm-eval's output type
    metric: str | None
    skipped: bool = False
    reason: str | None = None  # why it was skipped
    dense: float | None = None
    pruned: float | None = None
    abs_change: float | None = None
    rel_change: float | None = None
    stderr: DensePruned | None = None
    n: int | None = None
    higher_is_better: bool = True
    pruned_over_dense: float | None = None  # lower is better: the plain ratio
    chance: float | None = None
    retained: float | None = None
    retained_above_chance: float | None = None
    retained_above_chance_stderr: float | None = None
    excluded_at_chance: bool | None = None
    fidelity: Fidelity | None = None  # generative
    option_picks: OptionPicks | None = None  # multiple choice
    debias: Debias | None = None
    excluded_option_bias: bool | None = None
    pairs_with: str | None = None
    metrics: dict[str, MetricChange] | None = None  # every metric the entries carry
    retrieval: RetrievalChange | None = None
    protocol: str | None = None  # perplexity

    def to_json(self) -> dict:
        out: dict[str, Any] = {"type": self.type, "metric": self.metric}
        if self.skipped:
            return {**out, "skipped": True, "reason": self.reason, "dense": None, "pruned": None, "abs_change": None,
                    "rel_change": None}
        out.update(dense=self.dense, pruned=self.pruned, abs_change=self.abs_change, rel_change=self.rel_change,
                   stderr=asdict(self.stderr) if self.stderr else None, n=self.n)
        if not self.higher_is_better:
            out.update(higher_is_better=False, pruned_over_dense=self.pruned_over_dense)
        if self.chance is not None:
            out["chance"] = self.chance
        out.update(retained=self.retained, retained_above_chance=self.retained_above_chance,
                   retained_above_chance_stderr=self.retained_above_chance_stderr,
                   excluded_at_chance=self.excluded_at_chance)
        if self.fidelity:
            out["fidelity"] = asdict(self.fidelity)
        if self.option_picks:
            out.update(option_picks=self.option_picks.to_json(), option_bias=self.option_picks.biased)
            if self.debias:
                out["debias"] = self.debias.to_json()
            out["excluded_option_bias"] = self.excluded_option_bias
        if self.pairs_with:
            out["pairs_with"] = self.pairs_with
        if self.metrics is not None:
            out["metrics"] = {k: asdict(v) for k, v in self.metrics.items()}
        if self.retrieval:
            out.update(asdict(self.retrieval))
        if self.protocol:
            out["protocol"] = self.protocol
        return out


@dataclass(frozen=True)
class Family:
    """A task family's compared tasks and their mean changes (above chance: the kept tasks only)."""
    tasks: list[str]
    rel_change: float | None
    retained: float | None
    retained_above_chance: float | None
    retained_above_chance_stderr: float | None
    excluded_at_chance: list[str]
    excluded_option_bias: list[str] | None = None  # multiple choice

    def to_json(self) -> dict:
        out = {"tasks": self.tasks, "n_tasks": len(self.tasks), "rel_change": self.rel_change,
               "retained": self.retained, "retained_above_chance": self.retained_above_chance,
               "retained_above_chance_stderr": self.retained_above_chance_stderr,
               "excluded_at_chance": self.excluded_at_chance}
        if self.excluded_option_bias is not None:
            out["excluded_option_bias"] = self.excluded_option_bias
        return out


@dataclass(frozen=True)
class GapAboveChance:
    value: float | None  # mean retained_above_chance multiple choice - generative
    stderr: float | None
    excluded_at_chance: list[str]
    excluded_option_bias: list[str]


@dataclass(frozen=True)
class HeadlineStep:
    higher: str
    lower: str
    difference: float
    stderr: float | None
    holds: bool


@dataclass(frozen=True)
class Headline:
    """The paper's ordering of what pruning keeps, checked on retained_above_chance."""
    expected_order: list[str]
    compared: list[str]
    retained_above_chance: dict[str, float | None]
    steps: list[HeadlineStep]
    holds: bool | None
    beyond_stderr: bool | None
    fails_beyond_stderr: bool | None


@dataclass(frozen=True)
class SameDocs:
    n: int
    kept: dict[str, float]
    difference: float
    stderr: float | None


@dataclass(frozen=True)
class Pair:
    """A multiple-choice task and the generative task over the same documents, side by side."""
    multiple_choice: str
    generative: str
    rel_change: dict[str, float | None]
    retained_above_chance: dict[str, float | None]
    gap_above_chance: float | None
    stderr: float | None
    same_docs: SameDocs | None = None
    excluded: str | None = None  # "at_chance" | "option_bias": the MC side is left out of the means

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("same_docs", "excluded")}


@dataclass(frozen=True)
class EvalsReport:
    """evals.json: per task dense vs pruned, the MC-vs-generative gap, and -- once any task is
    compared -- the families, the gap above chance and the headline ordering."""
    tasks: dict[str, TaskRow]
    mc_vs_gen_gap: float | None
    mean_rel_drop: dict[str, float | None]
    families: dict[str, Family] | None = None
    gap_above_chance: GapAboveChance | None = None
    headline: Headline | None = None
    pairs: dict[str, Pair] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"tasks": {n: r.to_json() for n, r in self.tasks.items()},
                               "mc_vs_gen_gap": self.mc_vs_gen_gap, "mean_rel_drop": self.mean_rel_drop,
                               "conventions": EVALS_CONVENTIONS}
        if self.families is not None:
            out.update(families={f: v.to_json() for f, v in self.families.items()},
                       gap_above_chance=asdict(self.gap_above_chance), headline=asdict(self.headline),
                       conventions_families=FAMILY_CONVENTIONS)
        if self.pairs:
            out["pairs"] = {k: p.to_json() for k, p in self.pairs.items()}
        return out
