"""From the tidy table (:func:`prunerep.report.load.load_sweep`) to what the report shows: the
headline points at the last layer, the eval scores, the 1-pp thresholds and the per-step curves.
Pure pandas in, pandas / dicts out; nothing here reads or writes files."""
from __future__ import annotations

from typing import Any

import pandas as pd

from prunerep.results.schema import (DIVERGENCE_METRICS, SIMILARITY_METRICS, STEP_CONTEXTS, at_reference_temperature,
                              pick_metric)
from prunerep.evals.taskspec import FAMILIES, GENERATIVE as GEN, MULTIPLE_CHOICE as MC, PERPLEXITY as PPL, RETRIEVAL as RET
from prunerep.sparsity import sparsity_key

#: spaces drawn against sparsity (h, z, p, p on the MC options and the full-vocabulary p at the same
#: answer rows) and against decoding step (h, z, p); the "tokens" space (free-running token agreement)
#: stays in the table
SPARSITY_SPACES = ("embedding", "logit", "probability", "options", "answer")
#: a space's variant drawn as its own line: the centred logits (z − mean_V z), as "logit_centred"
SPACE_VARIANTS = {"logit": ("_centred", "logit_centred")}
#: the second-order estimates drawn against their exact values (exact, estimate)
ESTIMATES = (("kl", "kl_est"), ("one_minus_cos", "cos_est"))
STEP_SPACES = ("embedding", "logit", "probability")
#: the families with a 1-pp threshold: scores that are fractions. Perplexity has no "point"
#: (its retained, dense / pruned, is drawn instead)
THRESHOLD_FAMILIES = (("retrieval", RET), ("mc", MC), ("generative", GEN))

POINT_COLUMNS = ["run", "model", "pruner", "sparsity", "space", "metric", "value"]
ESTIMATE_COLUMNS = ["run", "model", "pruner", "sparsity", "context", "layer", "exact_metric", "exact", "estimate"]
SCORE_COLUMNS = ["run", "model", "pruner", "sparsity", "task", "task_type", "dense", "pruned"]
CURVE_COLUMNS = ["run", "model", "pruner", "sparsity", "space", "metric", "context", "step", "value"]


def _run_identity(g: pd.DataFrame) -> dict:
    return {k: g[k].iloc[0] for k in ("model", "pruner", "sparsity")}


def _headline_context(g: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows of the prompt context, else of the first context by name (all rows when none is named)."""
    ctxs = [str(c) for c in g["context"].dropna().unique()]
    if not ctxs:
        return g, None
    ctx = "prompt" if "prompt" in ctxs else sorted(ctxs)[0]
    return g[g["context"] == ctx], ctx


def _residual_at_reference_temperature(g: pd.DataFrame) -> pd.DataFrame:
    """The rows at the reference temperature, on the residual stream (sublayer block) if probed."""
    g = at_reference_temperature(g)
    if g["sublayer"].notna().any() and (g["sublayer"] == "block").any():
        g = g[g["sublayer"] == "block"]
    return g


def final_layer_points(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Per run and space: the chosen similarity/divergence metric at the last layer, prompt context
    (else the first context), temperature 1 (else the closest), averaged over decoding steps."""
    prefs = SIMILARITY_METRICS if kind == "similarity" else DIVERGENCE_METRICS
    p = table[(table["source"] == "probe") & table["value"].notna() & table["space"].isin(SPARSITY_SPACES)]
    out = []
    for (run, space), g_all in p.groupby(["run", "space"], sort=False):
        metric = pick_metric(g_all["metric"].unique(), prefs)
        if metric is None:
            continue
        out.append(_final_point(g_all, run, space, metric))
        suffix, name = SPACE_VARIANTS.get(space, (None, None))
        if suffix and (g_all["metric"] == metric + suffix).any():
            out.append(_final_point(g_all, run, name, metric + suffix))
    return pd.DataFrame(out, columns=POINT_COLUMNS)


def _final_point(g: pd.DataFrame, run, space: str, metric: str) -> dict:
    """One run's ``metric`` at the last layer: prompt context (else the first), reference temperature."""
    g = _residual_at_reference_temperature(_headline_context(g[g["metric"] == metric])[0])
    if g["layer"].notna().any():
        g = g[g["layer"] == g["layer"].max()]
    return {"run": run, **_run_identity(g), "space": space, "metric": metric, "value": float(g["value"].mean())}


def estimate_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer: each second-order estimate and its exact value (:data:`ESTIMATES`), prompt
    context (else the first context), reference temperature, mean over prompts (and steps)."""
    metrics = [m for pair in ESTIMATES for m in pair]
    p = table[(table["source"] == "probe") & (table["space"] == "probability") & table["metric"].isin(metrics)
              & table["value"].notna()]
    out = []
    for run, g in p.groupby("run", sort=False):
        g, ctx = _headline_context(g)
        g = _residual_at_reference_temperature(g)
        ident = _run_identity(g)
        means = g.groupby(["layer", "metric"])["value"].mean()
        for exact, est in ESTIMATES:
            for layer in sorted({lay for lay, m in means.index if m == exact}):
                if (layer, est) in means.index:
                    out.append({"run": run, **ident, "context": ctx, "layer": layer, "exact_metric": exact,
                                "exact": float(means[(layer, exact)]), "estimate": float(means[(layer, est)])})
    return pd.DataFrame(out, columns=ESTIMATE_COLUMNS)


def step_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, space and context: divergence vs decoding step at the last layer (mean over prompts)."""
    p = table[(table["source"] == "probe") & table["context"].isin(list(STEP_CONTEXTS))
              & (table["step"].fillna(-1) >= 0) & table["value"].notna() & table["space"].isin(STEP_SPACES)]
    out = []
    for (run, space), g in p.groupby(["run", "space"], sort=False):
        metric = pick_metric(g["metric"].unique(), DIVERGENCE_METRICS)
        if metric is None:
            continue
        g = g[g["metric"] == metric]
        g = _residual_at_reference_temperature(g)
        if g["layer"].notna().any():
            g = g[g["layer"].isna() | (g["layer"] == g["layer"].max())]
        c = g.groupby(["context", "step"], as_index=False)["value"].mean()
        out.append(c.assign(**_run_identity(g), run=run, space=space, metric=metric))
    return pd.concat(out, ignore_index=True)[CURVE_COLUMNS] if out else pd.DataFrame(columns=CURVE_COLUMNS)


def eval_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and task: dense and pruned scores (percentage points where the family's scores are
    fractions; perplexity as is), ``retained``: pruned / dense, for perplexity dense / pruned
    (1 = unchanged, below 1 = worse, whatever the direction of the score), and
    ``kept_above_chance``: evals.json's (pruned − chance) / (dense − chance) (perplexity in log
    space), NaN for a task its family leaves out (dense at chance, or one option picked whatever
    the question) -- the like-for-like number of the families."""
    cols = SCORE_COLUMNS + ["retained", "kept_above_chance"]
    e = table[(table["source"] == "eval") & table["metric"].isin(["dense", "pruned", "retained_above_chance",
                                                                    "excluded"])
              & table["task_type"].isin(FAMILIES)]
    if e.empty:
        return pd.DataFrame(columns=cols)
    w = e.pivot_table(index=["run", "model", "pruner", "sparsity", "task", "task_type"], columns="metric",
                      values="value", aggfunc="mean").reset_index()
    w.columns.name = None
    for c in ("dense", "pruned", "retained_above_chance", "excluded"):
        if c not in w:
            w[c] = float("nan")
    w = w.dropna(subset=["dense", "pruned"])
    lower_better = w["task_type"] == PPL
    w["retained"] = (w["pruned"] / w["dense"]).where(~lower_better, w["dense"] / w["pruned"])
    w["kept_above_chance"] = w["retained_above_chance"].where(w["excluded"].fillna(0.0) == 0.0)
    w = w.drop(columns=["retained_above_chance", "excluded"])
    # scores in [0, 1] (accuracy, exact match, pass@1, nDCG) are fractions: report percentage points
    for ttype, g in w[~lower_better].groupby("task_type"):
        if g[["dense", "pruned"]].abs().max().max() <= 1.0:
            w.loc[g.index, ["dense", "pruned"]] *= 100.0
    return w


def thresholds(scores: pd.DataFrame, tol_pp: float = 1.0) -> dict:
    """Per model/pruner and task family: the highest sparsity up to which every task of that family
    stays within `tol_pp` percentage points of dense (a gain counts as within) -- the paper's
    practical guidance, extended to retrieval (perplexity has no points: see :func:`eval_scores`'s
    ``retained``). Unstructured ratios and N:M patterns are walked apart, each in increasing order;
    each stops at its first miss.

    ``{model: {pruner: {"retrieval" | "mc" | "generative": {"unstructured": sp | None, "nm": sp | None,
    "tested": [{"sparsity": sp, "worst_drop_pp": x}, ...]}}}}``"""
    out: dict = {}
    for (model, pruner), g in scores.groupby(["model", "pruner"], sort=True):
        res = {}
        for name, ttype in THRESHOLD_FAMILIES:
            gt = g[g["task_type"] == ttype]
            by_sp = {str(sp): float((gs["dense"] - gs["pruned"]).max())  # the worst task
                     for sp, gs in gt.groupby("sparsity")}
            entry: dict[str, Any] = {"unstructured": None, "nm": None, "tested": [
                {"sparsity": sp, "worst_drop_pp": round(by_sp[sp], 3)} for sp in sorted(by_sp, key=sparsity_key)]}
            for family, is_nm in (("unstructured", 0), ("nm", 1)):
                best = None
                for sp in sorted((s for s in by_sp if sparsity_key(s)[1] == is_nm), key=sparsity_key):
                    if by_sp[sp] <= tol_pp + 1e-9:
                        best = sp
                    else:
                        break
                entry[family] = best
            res[name] = entry
        out.setdefault(str(model), {})[str(pruner)] = res
    return out


def format_thresholds(th: dict, tol_pp: float = 1.0) -> str:
    """The thresholds as the table the CLI prints (one line per model and pruner)."""
    if not th:
        return "no eval scores in this sweep (task=none?): no retrieval / MC / generation thresholds"
    lines = [f"highest sparsity with every task within {tol_pp:g} pp of dense:",
             f"{'model':<14} {'pruner':<12} {'retrieval':<16} {'MC':<16} {'generation':<16}"]

    def fmt(e):
        if not e or not e.get("tested"):
            return "-"
        s = e["unstructured"] or "none"
        if any(sparsity_key(t["sparsity"])[1] == 1 for t in e["tested"]):
            s += f" (N:M {e['nm'] or 'none'})"
        return s

    for model, pr in th.items():
        for pruner, res in pr.items():
            lines.append(f"{model:<14} {pruner:<12} {fmt(res.get('retrieval')):<16} {fmt(res.get('mc')):<16} "
                         f"{fmt(res.get('generative')):<16}")
    return "\n".join(lines)
