"""From the tidy table (:func:`prunerep.report.load.load_sweep`) to what the report shows: the
headline points at the last layer, the eval scores, the 1-pp thresholds and the per-step curves.
Pure pandas in, pandas / dicts out; nothing here reads or writes files."""
from __future__ import annotations

from typing import Any

import pandas as pd

from prunerep.results import (DIVERGENCE_METRICS, SIMILARITY_METRICS, STEP_CONTEXTS, at_reference_temperature,
                              pick_metric)
from prunerep.sparsity import sparsity_key

#: spaces drawn against sparsity (h, z, p and p on the MC options) and against decoding step (h, z, p);
#: the "tokens" space (free-running token agreement) stays in the table
SPARSITY_SPACES = ("embedding", "logit", "probability", "options")
STEP_SPACES = ("embedding", "logit", "probability")
MC, GEN = "multiple_choice", "generative"

POINT_COLUMNS = ["run", "model", "pruner", "sparsity", "space", "metric", "value"]
SCORE_COLUMNS = ["run", "model", "pruner", "sparsity", "task", "task_type", "dense", "pruned"]
CURVE_COLUMNS = ["run", "model", "pruner", "sparsity", "space", "metric", "context", "step", "value"]


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
    for (run, space), g in p.groupby(["run", "space"], sort=False):
        metric = pick_metric(g["metric"].unique(), prefs)
        if metric is None:
            continue
        g = g[g["metric"] == metric]
        ctxs = [str(c) for c in g["context"].dropna().unique()]
        if ctxs:
            ctx = "prompt" if "prompt" in ctxs else sorted(ctxs)[0]
            g = g[g["context"] == ctx]
        g = _residual_at_reference_temperature(g)
        if g["layer"].notna().any():
            g = g[g["layer"] == g["layer"].max()]
        first = g.iloc[0]
        out.append({"run": run, "model": first["model"], "pruner": first["pruner"], "sparsity": first["sparsity"],
                    "space": space, "metric": metric, "value": float(g["value"].mean())})
    return pd.DataFrame(out, columns=POINT_COLUMNS)


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
        first = g.iloc[0]
        for k in ("model", "pruner", "sparsity"):
            c[k] = first[k]
        c["run"], c["space"], c["metric"] = run, space, metric
        out.append(c)
    return pd.concat(out, ignore_index=True)[CURVE_COLUMNS] if out else pd.DataFrame(columns=CURVE_COLUMNS)


def eval_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and task: dense and pruned scores in percentage points."""
    e = table[(table["source"] == "eval") & table["metric"].isin(["dense", "pruned"])
              & table["task_type"].isin([MC, GEN])]
    if e.empty:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    w = e.pivot_table(index=["run", "model", "pruner", "sparsity", "task", "task_type"], columns="metric",
                      values="value", aggfunc="mean").reset_index()
    w.columns.name = None
    # scores in [0, 1] (accuracy, exact match, pass@1) are fractions: report percentage points
    scale = 100.0 if (w[["dense", "pruned"]].abs().max().max() <= 1.0) else 1.0
    w["dense"] *= scale
    w["pruned"] *= scale
    return w


def thresholds(scores: pd.DataFrame, tol_pp: float = 1.0) -> dict:
    """Per model/pruner and task type: the highest sparsity up to which every task of that type stays
    within `tol_pp` percentage points of dense (a gain counts as within). Unstructured ratios and N:M
    patterns are two families, each walked in increasing order; a family stops at its first miss.

    ``{model: {pruner: {"mc" | "generative": {"unstructured": sp | None, "nm": sp | None,
    "tested": [{"sparsity": sp, "worst_drop_pp": x}, ...]}}}}``"""
    out: dict = {}
    if scores.empty:
        return out
    for (model, pruner), g in scores.groupby(["model", "pruner"], sort=True):
        res = {}
        for ttype, name in ((MC, "mc"), (GEN, "generative")):
            gt = g[g["task_type"] == ttype]
            entry: dict[str, Any] = {"unstructured": None, "nm": None, "tested": []}
            if gt.empty:
                res[name] = entry
                continue
            by_sp = {}
            for sp, gs in gt.groupby("sparsity"):
                drop = (gs["dense"] - gs["pruned"]).max()  # worst task
                by_sp[str(sp)] = float(drop)
            entry["tested"] = [{"sparsity": sp, "worst_drop_pp": round(by_sp[sp], 3)}
                               for sp in sorted(by_sp, key=sparsity_key)]
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
        return "no eval scores in this sweep (task=none?): no MC / generation thresholds"
    lines = [f"highest sparsity with every task within {tol_pp:g} pp of dense:",
             f"{'model':<14} {'pruner':<12} {'MC':<16} {'generation':<16}"]

    def fmt(e):
        if not e or not e.get("tested"):
            return "-"
        s = e["unstructured"] or "none"
        if any(sparsity_key(t["sparsity"])[1] == 1 for t in e["tested"]):
            s += f" (N:M {e['nm'] or 'none'})"
        return s

    for model, pr in th.items():
        for pruner, res in pr.items():
            lines.append(f"{model:<14} {pruner:<12} {fmt(res.get('mc')):<16} {fmt(res.get('generative')):<16}")
    return "\n".join(lines)
