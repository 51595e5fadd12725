"""The report's figures (matplotlib, Agg backend), each written atomically as a PNG. Inputs are the
frames of :mod:`prunerep.report.analysis`; an empty input gives a figure that says so."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from prunerep.io import atomic_write_with
from prunerep.report.analysis import GEN, MC
from prunerep.results import SPACE_ORDER
from prunerep.sparsity import sparsity_key


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    def writer(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")

    atomic_write_with(path, writer)
    _plt().close(fig)
    return path


def _spaces(values) -> list[str]:
    """The spaces present, in :data:`prunerep.results.SPACE_ORDER` (unknown ones last, by name)."""
    vals = [str(v) for v in pd.unique(values) if pd.notna(v)]
    return sorted(vals, key=lambda s: (SPACE_ORDER.index(s) if s in SPACE_ORDER else len(SPACE_ORDER), s))


def _x_positions(sparsities) -> tuple[dict, list[str]]:
    labels = sorted({str(s) for s in sparsities}, key=sparsity_key)
    return {s: i for i, s in enumerate(labels)}, labels


def _panels(n: int, title: str, ncols_max: int = 4, height: float = 3.4, width: float = 4.3):
    plt = _plt()
    ncols = max(1, min(n, ncols_max))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
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
        ax.set_title(str(pruner))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(kind)
        if kind == "divergence" and (g["value"] > 0).all() and g["value"].max() / max(g["value"].min(), 1e-12) > 100:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_scores(scores: pd.DataFrame, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.eval_scores` vs sparsity: one panel per pruner, the mean
    pruned score per task type, its dense baseline dashed."""
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
        ax.set_title(str(pruner))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_steps(curves: pd.DataFrame, path: Path) -> Path:
    """:func:`~prunerep.report.analysis.step_curves`: a grid of pruner x space, one line per
    sparsity (colour) and context (teacher-forced solid, free-running dashed)."""
    plt = _plt()
    if curves.empty:
        fig, axes = _panels(1, "divergence vs decoding step")
        _empty(axes[0], "no per-step probe results (probe contexts teacher_forced / free_running)")
        return _save(fig, path)
    pruners = sorted(curves["pruner"].dropna().unique())
    spaces = _spaces(curves["space"])
    fig, axes = plt.subplots(len(pruners), len(spaces), figsize=(4.3 * len(spaces), 3.4 * len(pruners)),
                             squeeze=False, layout="constrained")
    fig.suptitle("divergence vs decoding step (teacher-forced solid, free-running dashed)")
    sps = sorted(curves["sparsity"].dropna().unique(), key=sparsity_key)
    cmap = plt.get_cmap("viridis")
    color = {s: cmap(i / max(1, len(sps) - 1)) for i, s in enumerate(sps)}
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
