"""Layer position: task scores and the final-layer KL against *where* the dropped blocks sit, for
sweeps of ``pruner=layer_drop`` that choose the blocks by position (``pruner.window`` +
``pruner.window_start``, or ``pruner.layers``) -- e.g. ``-m pruner.window=4 pruner.window_start=0,4,8``.

:func:`layer_positions` reads each complete run's position (``pruning.json``'s ``method.blocks``,
the blocks actually dropped, else its config), :func:`position_points` joins it with the headline
numbers of :mod:`prunerep.report.analysis`, :func:`plot_layer_position` draws
``layer_position.png``: one panel per task family (pruned score per task, dense dashed) and one
with the KL at the last layer (probability space, prompt context, T = 1), x = the first dropped
block, one line per window size / target / model. :func:`varies` decides whether a sweep has a
position axis at all (the figure is drawn only then)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from prunerep.report.analysis import eval_scores, final_layer_points
from prunerep.report.load import read_config, read_dict
from prunerep.report.plots import _empty, _log_if_wide, _panels, _save
from prunerep.results.schema import PRUNING_FILE

POSITION_COLUMNS = ["run", "model", "target", "selection", "width", "position", "blocks", "label"]
#: the lines of the figure: runs that differ only in where their blocks sit
SERIES = ["model", "target", "selection", "width"]
POINT_COLUMNS = ["run", *SERIES, "position", "label", "kind", "family", "task", "metric", "dense", "value"]


def _label(blocks: list[int]) -> str:
    if len(blocks) > 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


def run_position(run_dir: Path) -> Optional[dict]:
    """Where a run's dropped blocks sit, or None when its blocks were not chosen by position."""
    pr = read_config(run_dir).get("pruner") or {}  # no config: the run's position is unknown
    if not isinstance(pr, dict) or (pr.get("layers") is None and pr.get("window_start") is None):
        return None
    method = (read_dict(run_dir / PRUNING_FILE) or {}).get("method") or {}
    blocks = method.get("blocks") if isinstance(method, dict) else None
    if not blocks:  # no pruning.json: what the config asked for (negative indices stay as written)
        if pr.get("layers") is not None:
            blocks = sorted(int(i) for i in pr["layers"])
        else:
            blocks = list(range(int(pr["window_start"]), int(pr["window_start"]) + int(pr.get("window") or 1)))
    blocks = [int(b) for b in blocks]
    selection = "layers" if pr.get("layers") is not None else "window"
    return {"target": str(pr.get("target", "")), "selection": selection, "width": len(blocks),
            "position": min(blocks), "blocks": blocks, "label": _label(blocks)}


def layer_positions(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per complete run whose dropped blocks were chosen by position (:data:`POSITION_COLUMNS`)."""
    rows = []
    for r in runs.to_dict("records"):
        if r.get("status") != "complete" or not r.get("run_dir"):
            continue
        pos = run_position(Path(r["run_dir"]))
        if pos is not None:
            rows.append({"run": r["run"], "model": r.get("model"), **pos})
    return pd.DataFrame(rows, columns=POSITION_COLUMNS)


def varies(positions: pd.DataFrame) -> bool:
    """True when some line of the figure has two runs or more at different positions."""
    return bool((positions.groupby(SERIES, dropna=False)["label"].nunique() > 1).any())


def position_points(table: pd.DataFrame, positions: pd.DataFrame) -> pd.DataFrame:
    """Per positioned run: its eval scores (``kind`` score: one row per task, ``value`` = pruned,
    ``dense`` beside it) and its KL at the last layer (``kind`` kl, probability space)."""
    if positions.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    keep = ["run", *SERIES, "position", "label"]
    pos = positions[keep]
    sub = table[table["run"].isin(pos["run"])]
    parts = []
    scores = eval_scores(sub)
    if not scores.empty:
        s = scores.merge(pos, on="run", suffixes=("_score", ""))
        parts.append(pd.DataFrame({**{k: s[k] for k in keep}, "kind": "score", "family": s["task_type"],
                                   "task": s["task"], "metric": None, "dense": s["dense"], "value": s["pruned"]}))
    kl = final_layer_points(sub, "divergence")
    kl = kl[kl["space"] == "probability"]
    if not kl.empty:
        k = kl.merge(pos, on="run", suffixes=("_kl", ""))
        parts.append(pd.DataFrame({**{c: k[c] for c in keep}, "kind": "kl", "family": None, "task": None,
                                   "metric": k["metric"], "dense": None, "value": k["value"]}))
    if not parts:
        return pd.DataFrame(columns=POINT_COLUMNS)
    return pd.concat(parts, ignore_index=True)[POINT_COLUMNS]


def _series_name(key, multi: dict) -> str:
    model, target, selection, width = key
    bits = [f"{width} block(s)" if selection == "window" else f"{width} listed block(s)"]
    if multi["target"]:
        bits.append(str(target))
    if multi["model"]:
        bits.append(str(model))
    return " ".join(bits)


def plot_layer_position(points: pd.DataFrame, path: Path) -> Path:
    """``layer_position.png``: task scores per family and the final-layer KL vs the first dropped block."""
    scores = points[points["kind"] == "score"]
    kls = points[points["kind"] == "kl"]
    families = [str(f) for f in pd.unique(scores["family"].dropna())]
    title = ("layer_drop: " + ("scores (dense dashed) and " if families else "") + "final-layer KL vs the position "
             "of the dropped blocks")
    fig, axes = _panels(len(families) + 1, title, ncols_max=3)
    multi = {"target": points["target"].nunique() > 1, "model": points["model"].nunique() > 1}
    ticks = points.drop_duplicates("position").sort_values("position")
    many = points.groupby(SERIES, dropna=False).ngroups > 1 or points["label"].nunique() > points["position"].nunique()

    def xaxis(ax):
        if not many:  # one line: label each position with its blocks
            ax.set_xticks(ticks["position"].tolist(), ticks["label"].tolist(), rotation=30, fontsize=7)
        ax.set_xlabel("dropped blocks (first block)" if many else "dropped blocks")
        ax.grid(alpha=0.3)

    for ax, fam in zip(axes, families):
        g = scores[scores["family"] == fam]
        for (*key, task), gt in g.groupby([*SERIES, "task"], dropna=False, sort=True):
            gt = gt.groupby("position", as_index=False).agg(value=("value", "mean"), dense=("dense", "mean"))
            line, = ax.plot(gt["position"], gt["value"], marker="o", label=f"{task} {_series_name(key, multi)}")
            ax.axhline(float(gt["dense"].mean()), ls="--", color=line.get_color(), alpha=0.7)
        ax.set_title(fam)
        ax.set_ylabel("score" + (" (%)" if fam != "perplexity" else " (perplexity)"))
        xaxis(ax)
        ax.legend(fontsize=6)
    ax = axes[len(families)]
    if kls.empty:
        _empty(ax, "no probe results (probe=none?)")
    else:
        for key, gk in kls.groupby(SERIES, dropna=False, sort=True):
            gk = gk.groupby("position", as_index=False)["value"].mean()
            ax.plot(gk["position"], gk["value"], marker="o", label=_series_name(key, multi))
        ax.set_title(f"final layer, probability space ({kls['metric'].iloc[0]})")
        ax.set_ylabel(str(kls["metric"].iloc[0]))
        _log_if_wide(ax, kls["value"])
        xaxis(ax)
        ax.legend(fontsize=6)
    return _save(fig, path)
