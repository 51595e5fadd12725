"""Write the probe table, its headline summary and three plots (all atomically).

What each file holds is the results contract, :mod:`prunerep.results`. The plots:

* ``probes_similarity.png`` — 1 − cos vs layer, one line per space (prompt context);
* ``probes_kl.png`` — exact KL and 1 − cos(p) vs layer next to their Δz estimates;
* ``probes_steps.png`` — final-layer KL vs decoding step, teacher-forced vs free-running.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from prunerep.io import atomic_write_json, atomic_write_with
from prunerep.probes.reference import warn_nonfinite
from prunerep.results import (CONTEXTS as CONTEXT_ORDER, HEADLINE, PROBE_PLOTS, PROBES_FILE, PROBES_SUMMARY_FILE,
                              mean_or_nan as _mean, per_prompt_mean, reference_temperature, summary_key,
                              temperature_label as _t)

log = logging.getLogger(__name__)


def summarize(df: pd.DataFrame) -> dict:
    if df.empty:
        return {}
    final = int(df["layer"].max())
    head = df[(df["layer"] == final) & (df["sublayer"] == "block")]
    head = head[[m in HEADLINE.get(s, ()) for s, m in zip(head["space"], head["metric"])]]
    summary: dict = {"final_layer": final, "n_prompts": int(df["prompt_id"].nunique()), "n_rows": len(df),
                     "nonfinite_values": int((~np.isfinite(df["value"].to_numpy())).sum())}
    means = per_prompt_mean(head, ["context", "space", "metric", "temperature"])
    order = {c: i for i, c in enumerate(CONTEXT_ORDER)}
    rank = {(s, m): (i, j) for i, (s, ms) in enumerate(HEADLINE.items()) for j, m in enumerate(ms)}
    means = means.assign(_k=[(order.get(c, 9), *rank[(s, m)], 0 if t != t else t)
                             for c, s, m, t in zip(means.context, means.space, means.metric, means.temperature)])
    for c, s, m, t, v in means.sort_values("_k")[["context", "space", "metric", "temperature", "value"]].itertuples(
            index=False):
        summary[summary_key(c, s, m, t)] = v
    # error accumulation: same prompts, same steps, KL at the final layer
    kl = head[(head["space"] == "probability") & (head["metric"] == "kl")]
    for t in sorted(kl["temperature"].dropna().unique()):
        by_ctx = {c: _mean(per_prompt_mean(kl[(kl["context"] == c) & (kl["temperature"] == t)], ["context"])["value"])
                  for c in ("teacher_forced", "free_running")}
        if all(np.isfinite(v) for v in by_ctx.values()) and by_ctx["teacher_forced"] > 0:
            summary[f"error_accumulation/kl{_t(t)}"] = by_ctx["free_running"] / by_ctx["teacher_forced"]
    return summary


# --------------------------------------------------------------------------- plots

def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: Path) -> None:
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _set_scale(ax, values) -> None:
    v = np.asarray([x for x in values if np.isfinite(x)])
    if len(v) and (v > 0).all():
        ax.set_yscale("log")


def _layer_curves(df: pd.DataFrame, context: str) -> pd.DataFrame:
    sel = df[(df["context"] == context) & (df["sublayer"] == "block")]
    return per_prompt_mean(sel, ["space", "metric", "temperature", "layer"]).sort_values("layer")


def plot_similarity(curves: pd.DataFrame, t_ref: float, context: str, path: Path) -> None:
    fig, (ax,) = _figure()
    shown = []
    for space in ("embedding", "logit", "probability"):
        c = curves[(curves["space"] == space) & (curves["metric"] == "one_minus_cos")]
        if space == "probability":
            c = c[c["temperature"] == t_ref]
        if len(c):
            ax.plot(c["layer"], c["value"], marker=".", label=f"{space}{_t(t_ref) if space == 'probability' else ''}")
            shown += list(c["value"])
    _set_scale(ax, shown)
    ax.set(xlabel="layer (0 = embeddings)", ylabel="1 − cos(dense, pruned)", title=f"dissimilarity per space ({context})")
    ax.legend()
    _save(fig, path)


def plot_kl(curves: pd.DataFrame, context: str, path: Path) -> None:
    fig, axes = _figure(2)
    prob = curves[curves["space"] == "probability"]
    for ax, (exact, est, label) in zip(axes, (("kl", "kl_est", "KL(dense ‖ pruned)"),
                                              ("one_minus_cos", "cos_est", "1 − cos(p)"))):
        shown = []
        for i, t in enumerate(sorted(prob["temperature"].dropna().unique())):
            color = f"C{i}"
            for metric, style, name in ((exact, "-", "exact"), (est, "--", "Var/(2T²) estimate")):
                c = prob[(prob["metric"] == metric) & (prob["temperature"] == t)]
                ax.plot(c["layer"], c["value"], style, color=color, label=f"{name} T={t:g}")
                shown += list(c["value"])
        _set_scale(ax, shown)
        ax.set(xlabel="layer", ylabel=label, title=f"{label}: exact vs estimate ({context})")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_steps(df: pd.DataFrame, t_ref: float, path: Path) -> None:
    fig, axes = _figure(2)
    final = int(df["layer"].max())
    sel = df[(df["layer"] == final) & (df["sublayer"] == "block") & (df["step"] >= 0)]
    shown = []
    for ctx in ("teacher_forced", "free_running"):
        c = sel[(sel["context"] == ctx) & (sel["metric"] == "kl") & (sel["temperature"] == t_ref)]
        c = c.groupby("step")["value"].agg(_mean).reset_index()
        if len(c):
            axes[0].plot(c["step"], c["value"], marker=".", label=ctx.replace("_", "-"))
            shown += list(c["value"])
    _set_scale(axes[0], shown)
    axes[0].set(xlabel="decoding step", ylabel=f"KL{_t(t_ref)} at the final layer",
                title="error accumulation in decoding")
    axes[0].legend()
    agree = sel[(sel["space"] == "tokens") & (sel["metric"] == "token_agree")].groupby("step")["value"].agg(_mean)
    axes[1].plot(agree.index, agree.values, marker=".", color="C1")
    axes[1].set(xlabel="decoding step", ylabel="token agreement (free-running)", ylim=(-0.05, 1.05),
                title="same token as the dense model")
    _save(fig, path)


def write_probe_outputs(df: pd.DataFrame, run_dir: str | Path) -> dict:
    """Write ``probes.parquet``, ``probes_summary.json`` and the PNGs; return the summary.

    An empty table (``probe=none``) writes nothing and returns ``{}``."""
    if df is None or df.empty:
        return {}
    run_dir = Path(run_dir)
    warn_nonfinite(df)
    atomic_write_with(run_dir / PROBES_FILE, lambda tmp: df.to_parquet(tmp, index=False))
    summary = summarize(df)
    atomic_write_json(run_dir / PROBES_SUMMARY_FILE, summary)
    t_ref = reference_temperature(df["temperature"].dropna().unique())
    similarity_png, kl_png, steps_png = (run_dir / name for name in PROBE_PLOTS)
    context = next((c for c in CONTEXT_ORDER if (df["context"] == c).any() and c != "free_running"), None)
    try:
        if context is not None:
            curves = _layer_curves(df, context)
            plot_similarity(curves, t_ref, context, similarity_png)
            if (curves["space"] == "probability").any():
                plot_kl(curves, context, kl_png)
        if df["context"].isin(["teacher_forced", "free_running"]).any():
            plot_steps(df, t_ref, steps_png)
    except Exception as e:  # a plot must never cost the numbers
        log.warning("probe plots failed: %s: %s", type(e).__name__, e)
    return summary
