"""Equal memory: pruning and quantization on one axis, the effective bits per weight of the
compressed decoder Linear weights (``compression.json``, :mod:`prunerep.compress.accounting`).

:func:`equal_memory_points` joins each complete run's effective bits with its final-layer KL(p)
(probability space, prompt context, T = 1: :func:`prunerep.report.analysis.final_layer_points`) and
its mean pruned score per task family (:func:`prunerep.report.analysis.eval_scores`);
:func:`plot_equal_memory` draws ``equal_memory.png``: one panel with the KL, one per task family,
x = effective bits per weight (log scale), one line per ``family`` (a pruner, a quantizer, or a
pruner + quantizer, over the sweep's sparsities and bit widths), the dense model at its dtype's
bits. Runs without an effective-bits number (written before compression.json existed) are left
out."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from prunerep.evals.taskspec import FAMILIES, PERPLEXITY
from prunerep.report.analysis import eval_scores, final_layer_points
from prunerep.report.plots import _empty, _in_order, _log_if_wide, _panels, _save

POINT_COLUMNS = ["run", "model", "family", "method", "pruner", "quant", "sparsity", "effective_bits", "dense_bits",
                 "panel", "value", "dense"]
KL_PANEL = "final-layer KL(p)"
RUN_KEYS = ["run", "model", "family", "method", "pruner", "quant", "sparsity", "effective_bits", "dense_bits"]


def _runs(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in RUN_KEYS if c in table]
    runs = table[cols].drop_duplicates("run").copy()
    for c in RUN_KEYS:
        if c not in runs:
            runs[c] = None
    runs["family"] = runs["family"].fillna(runs["pruner"])
    runs["method"] = runs["method"].fillna(runs["pruner"])
    return runs[pd.to_numeric(runs["effective_bits"], errors="coerce").notna()][RUN_KEYS]


def equal_memory_points(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run and panel (:data:`KL_PANEL` or a task family): ``value`` (the KL, or the
    mean pruned score over the family's tasks) and ``dense`` (0, or the mean dense score)."""
    runs = _runs(table)
    if runs.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    parts = []
    kl = final_layer_points(table, "divergence")
    kl = kl[(kl["space"] == "probability") & (kl["metric"] == "kl")][["run", "value"]]
    if not kl.empty:
        parts.append(kl.assign(panel=KL_PANEL, dense=0.0))
    scores = eval_scores(table)
    if not scores.empty:
        m = scores.groupby(["run", "task_type"], as_index=False)[["pruned", "dense"]].mean()
        parts.append(m.rename(columns={"task_type": "panel", "pruned": "value"}))
    if not parts:
        return pd.DataFrame(columns=POINT_COLUMNS)
    values = pd.concat(parts, ignore_index=True)
    out = runs.merge(values, on="run", how="inner")
    out["effective_bits"] = out["effective_bits"].astype("float64")
    return out[POINT_COLUMNS].reset_index(drop=True)


def _panel_names(points: pd.DataFrame) -> list[str]:
    present = [str(p) for p in pd.unique(points["panel"])]
    fams = _in_order((p for p in present if p != KL_PANEL), FAMILIES)  # the families' order, others by name
    return ([KL_PANEL] if KL_PANEL in present else []) + fams


def _marker(pruner, quant) -> str:
    pruned, quantized = str(pruner) not in ("none", "nan", "None"), str(quant) not in ("none", "nan", "None")
    return "^" if pruned and quantized else ("s" if quantized else "o")


def plot_equal_memory(points: pd.DataFrame, path: Path) -> Path:
    """The KL and the task scores against effective bits per weight, every method on one figure
    (pruners o, quantizers s, both ^), the dense model at its dtype's bits (KL: a dotted line;
    scores: a star and a dashed line)."""
    panels = _panel_names(points) if not points.empty else []
    fig, axes = _panels(max(1, len(panels)), "KL and task scores vs effective bits per weight (equal memory)")
    if not panels:
        _empty(axes[0], "no run with compression.json and probe or eval results")
        return _save(fig, path)
    multi_model = points["model"].nunique() > 1
    xs = pd.concat([points["effective_bits"], points["dense_bits"].dropna()]).astype(float)
    for ax, panel in zip(axes, panels):
        g = points[points["panel"] == panel]
        for (model, family), gf in g.groupby(["model", "family"], sort=True):
            gf = gf.groupby(["effective_bits", "pruner", "quant"], as_index=False)["value"].mean()
            gf = gf.sort_values("effective_bits")
            label = f"{family}" + (f" ({model})" if multi_model else "")
            ax.plot(gf["effective_bits"], gf["value"], ls="-", alpha=0.6, label=label,
                    marker=_marker(gf["pruner"].iloc[0], gf["quant"].iloc[0]))
        for model, gm in g.groupby("model"):
            dense_bits = gm["dense_bits"].dropna()
            if dense_bits.empty:
                continue
            x = float(dense_bits.iloc[0])
            if panel == KL_PANEL:
                ax.axvline(x, ls=":", color="gray", label=f"dense ({x:g} bits)")
            else:
                y = float(gm["dense"].mean())
                ax.axhline(y, ls="--", color="gray", alpha=0.7)
                ax.plot([x], [y], marker="*", ms=11, color="black", ls="none", label=f"dense ({x:g} bits)")
        ax.set_xscale("log", base=2)
        lo, hi = float(xs.min()), float(xs.max())
        ticks = [t for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32) if lo / 1.2 <= t <= hi * 1.2]
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("effective bits per weight")
        vals = g["value"].astype(float)
        if panel == KL_PANEL:
            ax.set_ylabel("KL(p_dense || p) at the last layer")
            _log_if_wide(ax, vals)
        elif panel == PERPLEXITY:
            ax.set_ylabel("perplexity (lower is better)")
            if (vals > 0).all() and math.isfinite(vals.max()):
                ax.set_yscale("log")
        else:
            ax.set_ylabel("score (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


__all__ = ["equal_memory_points", "plot_equal_memory", "KL_PANEL", "POINT_COLUMNS"]
