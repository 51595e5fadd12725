"""The report's figures, each written atomically as a PNG, and the helpers the report's other figures
share. Inputs are the frames of :mod:`prunerep.report.analysis`; an empty input gives a figure that
says so. Figures are :class:`matplotlib.figure.Figure` objects, as in :mod:`prunerep.viz.probes`: no
pyplot, so no backend to choose and no global figure registry to close them in."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from prunerep.evals.taskspec import FAMILIES, GENERATIVE as GEN, MULTIPLE_CHOICE as MC
from prunerep.results.schema import SPACE_ORDER
from prunerep.results.store import atomic_write_with
from prunerep.sparsity import sparsity_key


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def _colors(keys) -> dict:
    """A viridis colour per key, in the order given."""
    keys = list(keys)
    return {k: colormaps["viridis"](i / max(1, len(keys) - 1)) for i, k in enumerate(keys)}


def _log_if_wide(ax, values: pd.Series) -> None:
    """A log y axis for positive values spanning over two decades."""
    if (values > 0).all() and values.max() / max(values.min(), 1e-12) > 100:
        ax.set_yscale("log")


def _sparsity_axis(ax, title: str, labels: list[str], ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _in_order(values, order) -> list[str]:
    """``values`` sorted as in ``order``, the others after them, by name."""
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def _spaces(values) -> list[str]:
    """The spaces present, in :data:`prunerep.results.schema.SPACE_ORDER`."""
    return _in_order([str(v) for v in pd.unique(values) if pd.notna(v)], SPACE_ORDER)


def _x_positions(sparsities) -> tuple[dict, list[str]]:
    labels = sorted({str(s) for s in sparsities}, key=sparsity_key)
    return {s: i for i, s in enumerate(labels)}, labels


def _panels(n: int, title: str, ncols_max: int = 4):
    ncols = max(1, min(n, ncols_max))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(4.3 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_vs_sparsity(points: pd.DataFrame, kind: str, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.final_layer_points` vs sparsity: one panel per pruner, one
    line per space (and model); a log y axis for divergences spanning over two decades."""
    pruners = sorted(points["pruner"].dropna().unique()) or ["(no probe results)"]
    fig, axes = _panels(len(pruners), f"{kind} to dense at the last layer vs sparsity")
    pos, labels = _x_positions(points["sparsity"].dropna())
    for ax, pruner in zip(axes, pruners):
        g = points[points["pruner"] == pruner]
        if g.empty:
            _empty(ax, "no probe results")
            continue
        for (model, space), gs in g.groupby(["model", "space"], sort=False):
            gs = gs.groupby("sparsity", as_index=False).agg(value=("value", "mean"), metric=("metric", "first"))
            gs = gs.sort_values("sparsity", key=lambda c: c.map(sparsity_key))
            lbl = f"{space} ({gs['metric'].iloc[0]})" + (f" {model}" if points["model"].nunique() > 1 else "")
            ax.plot([pos[s] for s in gs["sparsity"]], gs["value"], marker="o", label=lbl)
        if kind == "divergence":
            _log_if_wide(ax, g["value"])
        _sparsity_axis(ax, str(pruner), labels, kind)
    return _save(fig, path)


def plot_scores(scores: pd.DataFrame, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.eval_scores` vs sparsity: one panel per pruner, the mean
    pruned score per task type, its dense baseline dashed."""
    scores = scores[scores["task_type"].isin([MC, GEN])]
    pruners = sorted(scores["pruner"].dropna().unique()) if not scores.empty else []
    fig, axes = _panels(max(1, len(pruners)), "MC vs generative scores vs sparsity (dense dashed)")
    if not pruners:
        _empty(axes[0], "no eval scores (task=none?)")
        return _save(fig, path)
    pos, labels = _x_positions(scores["sparsity"])
    colors = {MC: "tab:blue", GEN: "tab:orange"}
    for ax, pruner in zip(axes, pruners):
        g = scores[scores["pruner"] == pruner]
        for ttype, gt in g.groupby("task_type"):
            m = gt.groupby("sparsity", as_index=False)[["dense", "pruned"]].mean()
            m = m.sort_values("sparsity", key=lambda c: c.map(sparsity_key))
            name = "MC" if ttype == MC else "generative"
            ax.plot([pos[s] for s in m["sparsity"]], m["pruned"], marker="o", color=colors.get(ttype),
                    label=f"{name} (mean of {gt['task'].nunique()} task(s))")
            ax.axhline(float(m["dense"].mean()), ls="--", color=colors.get(ttype), alpha=0.8,
                       label=f"{name} dense")
        _sparsity_axis(ax, str(pruner), labels, "score (%)")
    return _save(fig, path)


def retained_lines(scores: pd.DataFrame) -> pd.DataFrame:
    """The lines of :func:`plot_retained`: per family, pruner and sparsity the mean over tasks of
    ``kept_above_chance`` (the tasks the family keeps, as in evals.json) and of ``retained`` (every
    task), with the number of tasks in each mean."""
    cols = ["task_type", "pruner", "sparsity", "kept_above_chance", "n_kept", "retained", "n_tasks"]
    if scores.empty:
        return pd.DataFrame(columns=cols)
    g = scores.groupby(["task_type", "pruner", "sparsity"], as_index=False)
    out = g.agg(kept_above_chance=("kept_above_chance", "mean"), n_kept=("kept_above_chance", "count"),
                retained=("retained", "mean"), n_tasks=("task", "nunique"))
    return out[cols]


def plot_retained(scores: pd.DataFrame, path: Path) -> Path:
    """Score kept vs sparsity, one panel per task family (retrieval, multiple choice, generative,
    perplexity), per pruner: solid, kept above chance, (pruned − chance) / (dense − chance) over the
    tasks the family keeps (evals.json leaves out a task at chance or picking one option whatever the
    question: there, agreement is bias, not knowledge); dashed, pruned / dense over every task
    (perplexity dense / pruned). 1 = as dense."""
    fams = [f for f in FAMILIES if not scores.empty and f in set(scores["task_type"])]
    fig, axes = _panels(max(1, len(fams)), "score kept vs sparsity, per task family (1 = dense): solid = kept "
                                           "above chance (tasks at chance or letter-biased left out), "
                                           "dashed = pruned / dense, every task")
    if not fams:
        _empty(axes[0], "no eval scores (task=none?)")
        return _save(fig, path)
    pos, labels = _x_positions(scores["sparsity"])
    lines = retained_lines(scores)
    for ax, fam in zip(axes, fams):
        g = lines[lines["task_type"] == fam]
        for i, (pruner, gp) in enumerate(g.groupby("pruner")):
            gp = gp.sort_values("sparsity", key=lambda c: c.map(sparsity_key))
            x = [pos[s] for s in gp["sparsity"]]
            color = f"C{i}"
            kept = gp["n_kept"] > 0
            if kept.any():
                ax.plot([xi for xi, k in zip(x, kept) if k], gp.loc[kept, "kept_above_chance"], marker="o",
                        color=color, label=f"{pruner} above chance ({int(gp['n_kept'].max())} task(s))")
            ax.plot(x, gp["retained"], ls="--", marker=".", color=color, alpha=0.6,
                    label=f"{pruner} pruned/dense ({int(gp['n_tasks'].max())} task(s))")
        ax.axhline(1.0, ls="--", color="gray", alpha=0.7)
        _sparsity_axis(ax, fam + (" (dense / pruned)" if fam == "perplexity" else ""), labels, "kept")
    return _save(fig, path)


def plot_estimates(points: pd.DataFrame, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.estimate_points`: each second-order estimate against its exact
    value (log-log), one point per run and layer, coloured by sparsity, one marker per pruner, with
    y = x: where the points leave the line, the estimate stops holding."""
    panels = (("kl", "KL(dense ‖ pruned)", "Var_p(Δz)/(2T²)"), ("one_minus_cos", "1 − cos(p)", "Var_r(Δz)/(2T²)"))
    fig, axes = _panels(2, "second-order estimates vs exact values (every layer, every run)")
    if points.empty:
        for ax in axes:
            _empty(ax, "no probability-space probe results")
        return _save(fig, path)
    color = _colors(sorted(points["sparsity"].dropna().unique(), key=sparsity_key))
    markers = dict(zip(sorted(points["pruner"].dropna().unique()), "osd^v<>ph*"))
    for ax, (exact, xlabel, ylabel) in zip(axes, panels):
        g = points[(points["exact_metric"] == exact) & (points["exact"] > 0) & (points["estimate"] > 0)]
        if g.empty:
            _empty(ax, "no positive values")
            continue
        for (pruner, sp), gs in g.groupby(["pruner", "sparsity"], sort=False):
            ax.scatter(gs["exact"], gs["estimate"], s=14, color=color[sp], marker=markers.get(pruner, "o"),
                       label=f"{pruner} {sp}", alpha=0.8)
        lo, hi = float(min(g["exact"].min(), g["estimate"].min())), float(max(g["exact"].max(), g["estimate"].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel=f"exact {xlabel}", ylabel=f"estimate {ylabel}", title=xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_steps(curves: pd.DataFrame, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.step_curves`: a grid of pruner x space, one line per
    sparsity (colour) and context (teacher-forced solid, free-running dashed)."""
    if curves.empty:
        fig, axes = _panels(1, "divergence vs decoding step")
        _empty(axes[0], "no per-step probe results (probe contexts teacher_forced / free_running)")
        return _save(fig, path)
    pruners = sorted(curves["pruner"].dropna().unique())
    spaces = _spaces(curves["space"])
    fig = Figure(figsize=(4.3 * len(spaces), 3.4 * len(pruners)), layout="constrained")
    axes = fig.subplots(len(pruners), len(spaces), squeeze=False)
    fig.suptitle("divergence vs decoding step (teacher-forced solid, free-running dashed)")
    color = _colors(sorted(curves["sparsity"].dropna().unique(), key=sparsity_key))
    styles = {"teacher_forced": "-", "free_running": "--", "prompt": ":"}
    for i, pruner in enumerate(pruners):
        for j, space in enumerate(spaces):
            ax = axes[i][j]
            g = curves[(curves["pruner"] == pruner) & (curves["space"] == space)]
            if g.empty:
                _empty(ax, "no data")
                continue
            for (sp, ctx), gc in g.groupby(["sparsity", "context"], sort=False):
                gc = gc.groupby("step", as_index=False)["value"].mean().sort_values("step")
                ax.plot(gc["step"], gc["value"], ls=styles.get(str(ctx), "-."), color=color[sp],
                        label=f"{sp} {ctx}")
            ax.set_title(f"{pruner} - {space} ({g['metric'].iloc[0]})")
            ax.set_xlabel("decoding step")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
