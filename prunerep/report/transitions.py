"""The sweep's sublayer transitions (runs with ``probe.transitions=true``): ``transitions_vs_layer.png``.

Per space (rows: h and z 1 − cos, p KL at the reference temperature, prompt context, else the
teacher-forced steps averaged) and sublayer kind (columns: attention, MLP), against the layer: the
dense model's own transition (black, dashed: one line per model), each run's pruned transition
(solid) and its local damage (dotted, same colour). What the rows are: :mod:`prunerep.probes.transitions`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from prunerep.report.plots import _colors, _empty, _save
from prunerep.results.schema import TRANSITION_SUBLAYERS, at_reference_temperature
from prunerep.sparsity import sparsity_key

#: (space, metric, label) per row of the figure
ROWS = (("embedding", "one_minus_cos", "h: 1 − cos(in, out)"), ("logit", "one_minus_cos", "z: 1 − cos(in, out)"),
        ("probability", "kl", "p: KL"))
KINDS = (("attn", "attention"), ("mlp", "MLP"))
POINT_COLUMNS = ["run", "model", "pruner", "sparsity", "kind", "comparison", "space", "metric", "layer", "value"]


def transition_points(table: pd.DataFrame) -> pd.DataFrame:
    """The transition rows of the sweep table (:func:`prunerep.report.load.load_sweep`), one value per
    run, kind, comparison, space, metric and layer (prompt context; else teacher-forced, mean over steps)."""
    p = table[(table["source"] == "probe") & table["sublayer"].isin(list(TRANSITION_SUBLAYERS))
              & table["value"].notna()]
    if p.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    wanted = {(s, m) for s, m, _ in ROWS}
    p = p[[(s, m) in wanted for s, m in zip(p["space"], p["metric"])]]
    out = []
    for run, g in p.groupby("run", sort=False):
        ctx = "prompt" if (g["context"] == "prompt").any() else "teacher_forced"
        g = at_reference_temperature(g[g["context"] == ctx])
        m = g.groupby(["model", "pruner", "sparsity", "sublayer", "space", "metric", "layer"], as_index=False,
                      dropna=False)["value"].mean()
        split = m["sublayer"].str.split("_", n=1)
        out.append(m.assign(run=run, kind=split.str[0], comparison=split.str[1]))
    return pd.concat(out, ignore_index=True)[POINT_COLUMNS] if out else pd.DataFrame(columns=POINT_COLUMNS)


def plot_sweep_transitions(points: pd.DataFrame, path: Path) -> Path:
    """``transitions_vs_layer.png`` from :func:`transition_points`."""
    fig = Figure(figsize=(5.2 * len(KINDS), 3.3 * len(ROWS)))
    axes = fig.subplots(len(ROWS), len(KINDS), squeeze=False)
    fig.suptitle("sublayer transitions vs layer: dense (black dashed), pruned (solid), local damage (dotted)")
    fig.subplots_adjust(hspace=0.4, wspace=0.25, top=0.93)
    runs = points[["run", "pruner", "sparsity"]].drop_duplicates()
    runs = runs.iloc[sorted(range(len(runs)), key=lambda i: (str(runs.iloc[i]["pruner"]),
                                                            sparsity_key(runs.iloc[i]["sparsity"])))]
    color = _colors(runs["run"])
    label = dict(zip(runs["run"], [f"{p} {s}" for p, s in zip(runs["pruner"], runs["sparsity"])]))
    models = sorted(points["model"].dropna().unique())
    for r, (space, metric, ylabel) in enumerate(ROWS):
        for c, (kind, title) in enumerate(KINDS):
            ax = axes[r][c]
            g = points[(points["space"] == space) & (points["metric"] == metric) & (points["kind"] == kind)]
            if g.empty:
                _empty(ax, "no transition rows (probe.transitions=true)")
                continue
            for model in models:  # the dense transition does not depend on the run: one line per model
                d = g[(g["comparison"] == "transition_dense") & (g["model"] == model)]
                d = d.groupby("layer", as_index=False)["value"].mean()
                ax.plot(d["layer"], d["value"], "--", color="black", lw=1.2,
                        label="dense" + (f" {model}" if len(models) > 1 else ""))
            for run in runs["run"]:
                for comparison, style, what in (("transition_pruned", "-", "pruned"), ("local", ":", "local")):
                    d = g[(g["run"] == run) & (g["comparison"] == comparison)].sort_values("layer")
                    if len(d):
                        ax.plot(d["layer"], d["value"], style, color=color[run], label=f"{label[run]} {what}")
            if (g["value"] > 0).all():
                ax.set_yscale("log")
            ax.set(xlabel="layer (block + 1)", ylabel=ylabel, title=title if r == 0 else None)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
