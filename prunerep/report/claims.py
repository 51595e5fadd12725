"""The claims over sparsity: each claim's statistic with its bootstrap interval as a band, one line
per pruner / quantizer, and the bound it is held against (:mod:`prunerep.results.claims`). The
rows are the sweep table's ``source == "claim"`` rows (summary.json's story)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from prunerep.report.plots import _empty, _panels, _save, _sparsity_axis, _x_positions
from prunerep.results.claims import bounds, statement
from prunerep.sparsity import sparsity_key

BAND_COLUMNS = ["claim", "pruner", "sparsity", "value", "lo", "hi"]


def claim_bands(table: pd.DataFrame) -> pd.DataFrame:
    """Per claim, pruner (method) and sparsity: the statistic and its bounds (the mean over runs
    where a point was run more than once)."""
    c = table[table["source"] == "claim"]
    if c.empty:
        return pd.DataFrame(columns=BAND_COLUMNS)
    name, kind = c["metric"].astype(str), pd.Series("value", index=c.index)
    for bound in ("lo", "hi"):
        at = name.str.endswith(f"/{bound}")
        kind[at] = bound
        name = name.where(~at, name.str[: -len(bound) - 1])
    w = c.assign(claim=name, kind=kind).pivot_table(index=["claim", "pruner", "sparsity"], columns="kind",
                                                     values="value", aggfunc="mean").reset_index()
    for k in ("value", "lo", "hi"):
        if k not in w:
            w[k] = float("nan")
    w.columns.name = None
    return w[BAND_COLUMNS]


def plot_claims(bands: pd.DataFrame, path: Path) -> Path:
    """One panel per claim: its statistic vs sparsity per pruner, the 95% interval shaded, the
    bound dotted (holds: the band clear of it on the claimed side)."""
    names = list(dict.fromkeys(bands["claim"])) if not bands.empty else []
    fig, axes = _panels(max(1, len(names)), "the story's claims vs sparsity: statistic and bootstrap interval "
                                            "(band); dotted: the bound the claim is held against")
    if not names:
        _empty(axes[0], "no claims (runs without probes and evals?)")
        return _save(fig, path)
    pos, labels = _x_positions(bands["sparsity"])
    for ax, name in zip(axes, names):
        g = bands[bands["claim"] == name]
        for i, (pruner, gp) in enumerate(g.groupby("pruner")):
            gp = gp.sort_values("sparsity", key=lambda col: col.map(sparsity_key))
            x = [pos[s] for s in gp["sparsity"]]
            ax.plot(x, gp["value"], marker="o", color=f"C{i}", label=str(pruner))
            ax.fill_between(x, gp["lo"], gp["hi"], color=f"C{i}", alpha=0.2)
        for b in bounds(name):
            if b is not None:
                ax.axhline(b, ls=":", color="gray")
        _sparsity_axis(ax, statement(name), labels, name)
        ax.title.set_fontsize(8)
    return _save(fig, path)
