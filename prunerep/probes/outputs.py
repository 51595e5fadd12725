"""Write the probe table, its headline summary and three plots (all atomically).

What each file holds is the results contract, :mod:`prunerep.results.schema`. The plots:

* ``probes_similarity.png`` — 1 − cos vs layer, one line per space (prompt context), the logit
  space raw and centred;
* ``probes_kl.png`` — exact KL and 1 − cos(p) vs layer next to their Δz estimates;
* ``probes_estimates.png`` — each estimate against its exact value, one point per table row
  (prompt: a prompt's mean at one layer; decoding contexts: one step), with the y = x line;
* ``probes_answer.png`` — at the MC answer positions, per layer: top-1 agreement and KL on the
  option subspace next to the full vocabulary at the same rows (and top-1 over every position);
* ``probes_steps.png`` — final-layer KL vs decoding step, teacher-forced vs free-running;
* ``probes_transitions.png`` (``probe.transitions``) and ``probes_top_tokens.png`` with
  ``top_tokens.parquet``: :mod:`.transitions`, :mod:`.top_tokens`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from prunerep.results.store import atomic_write_json, atomic_write_with
from prunerep.probes.reference import warn_nonfinite
from prunerep.probes.top_tokens import detach as detach_top_tokens, plot_top_tokens
from prunerep.probes.transitions import plot_transitions
from prunerep.results.schema import (CONTEXTS as CONTEXT_ORDER, ESTIMATE_RATIOS_KEY, HEADLINE, PROBE_PLOTS, PROBES_FILE,
                              PROBES_SUMMARY_FILE, RATIO_METRICS, RATIO_PERCENTILES,
                              mean_or_nan as _mean, per_prompt_mean, reference_temperature, summary_key,
                              temperature_label as _t, TOP_TOKENS_FILE, TOP_TOKENS_PLOT, TRANSITIONS_PLOT)

log = logging.getLogger(__name__)


def summarize(df: pd.DataFrame) -> dict:
    if df.empty:
        return {}
    final = int(df["layer"].max())
    head = df[(df["layer"] == final) & (df["sublayer"] == "block")]
    head = head[[m in HEADLINE.get(s, ()) for s, m in zip(head["space"], head["metric"])]]
    summary: dict = {"final_layer": final, "n_prompts": int(df["prompt_id"].nunique()), "n_rows": len(df),
                     "nonfinite_values": int((~np.isfinite(df["value"].to_numpy())).sum()),
                     "h": str(df.attrs.get("probe_h", "residual"))}
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
    ratios = estimate_ratio_percentiles(df)
    for key, entry in ratios.items():  # the final layer's, flat
        if entry["layer"] and entry["layer"][-1] == final:
            base, _, at = key.partition("@")
            for q in RATIO_PERCENTILES:
                summary[f"{base}_p{q}{'@' + at if at else ''}"] = entry[f"p{q}"][-1]
    if ratios:
        summary[ESTIMATE_RATIOS_KEY] = ratios
    return summary


def estimate_ratio_percentiles(df: pd.DataFrame) -> dict:
    """Where the second-order estimates hold: per context, ratio (:data:`RATIO_METRICS`) and
    temperature, per layer, the 10th/50th/90th percentiles (numpy's default, linear) of the
    per-row ratios over every row of every prompt (prompt positions, decoding steps), and their
    number. ``{"<context>/probability/<ratio>@T=<t>": {"layer": [...], "p10": [...], ...}}``"""
    sel = df[(df["space"] == "probability") & df["metric"].isin(RATIO_METRICS) & (df["sublayer"] == "block")]
    out: dict = {}
    order = {c: i for i, c in enumerate(CONTEXT_ORDER)}
    groups = sorted(sel.groupby(["context", "metric", "temperature"], sort=False),
                    key=lambda kv: (order.get(kv[0][0], 9), RATIO_METRICS.index(kv[0][1]), kv[0][2]))
    for (c, m, t), g in groups:
        entry: dict = {"layer": [], **{f"p{q}": [] for q in RATIO_PERCENTILES}, "n": []}
        for layer, gl in g.groupby("layer", sort=True):
            values = gl["value"].to_numpy()
            entry["layer"].append(int(layer))
            for q, v in zip(RATIO_PERCENTILES, np.percentile(values, RATIO_PERCENTILES)):
                entry[f"p{q}"].append(float(v))
            entry["n"].append(int(len(values)))
        out[summary_key(c, "probability", m, t)] = entry
    return out


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
    for space, metric, style, label in (("embedding", "one_minus_cos", "-", "embedding"),
                                        ("logit", "one_minus_cos", "-", "logit (raw)"),
                                        ("logit", "one_minus_cos_centred", "--", "logit (centred)"),
                                        ("probability", "one_minus_cos", "-", f"probability{_t(t_ref)}")):
        c = curves[(curves["space"] == space) & (curves["metric"] == metric)]
        if space == "probability":
            c = c[c["temperature"] == t_ref]
        if len(c):
            ax.plot(c["layer"], c["value"], style, marker=".", label=label)
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
    if shown:
        axes[0].legend()
    agree = sel[(sel["space"] == "tokens") & (sel["metric"] == "token_agree")].groupby("step")["value"].agg(_mean)
    axes[1].plot(agree.index, agree.values, marker=".", color="C1")
    axes[1].set(xlabel="decoding step", ylabel="token agreement (free-running)", ylim=(-0.05, 1.05),
                title="same token as the dense model")
    _save(fig, path)


def estimate_pairs(df: pd.DataFrame, exact: str, estimate: str, t_ref: float) -> pd.DataFrame:
    """(exact, estimate, layer) per table row that has both at ``t_ref`` (sublayer block): in the
    prompt context a prompt's mean over its positions at one layer, in the decoding contexts one step."""
    sel = df[(df["space"] == "probability") & df["metric"].isin([exact, estimate]) & (df["sublayer"] == "block")
             & (df["temperature"] == t_ref)]
    keys = ["context", "prompt_id", "layer", "step"]
    wide = sel.pivot_table(index=keys, columns="metric", values="value", aggfunc="first")
    if exact not in wide or estimate not in wide:
        return pd.DataFrame(columns=["exact", "estimate", "layer"])
    wide = wide.dropna(subset=[exact, estimate]).reset_index()
    return pd.DataFrame({"exact": wide[exact], "estimate": wide[estimate], "layer": wide["layer"]})


def plot_estimates(df: pd.DataFrame, t_ref: float, path: Path) -> bool:
    """Each second-order estimate against its exact value (log-log, coloured by layer) with
    y = x: points on the line are rows where the estimate holds."""
    panels = (("kl", "kl_est", "KL(dense ‖ pruned)", "Var_p(Δz)/(2T²)"),
              ("one_minus_cos", "cos_est", "1 − cos(p)", "Var_r(Δz)/(2T²)"))
    pairs = [estimate_pairs(df, exact, est, t_ref) for exact, est, _, _ in panels]
    if all(p.empty for p in pairs):
        return False
    fig, axes = _figure(2)
    layers = df["layer"].max()
    for ax, (exact, est, xlabel, ylabel), pts in zip(axes, panels, pairs):
        pts = pts[(pts["exact"] > 0) & (pts["estimate"] > 0) & np.isfinite(pts["exact"]) & np.isfinite(pts["estimate"])]
        if len(pts):
            sc = ax.scatter(pts["exact"], pts["estimate"], c=pts["layer"], cmap="viridis", vmin=0,
                            vmax=max(1, int(layers)), s=6, alpha=0.6)
            lo = float(min(pts["exact"].min(), pts["estimate"].min()))
            hi = float(max(pts["exact"].max(), pts["estimate"].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            fig.colorbar(sc, ax=ax, label="layer")
            ax.legend(fontsize=7)
        ax.set(xlabel=f"exact {xlabel}{_t(t_ref)}", ylabel=f"estimate {ylabel}",
               title=f"{xlabel}: estimate vs exact ({len(pts)} rows)")
    _save(fig, path)
    return True


def answer_curves(df: pd.DataFrame, t_ref: float) -> pd.DataFrame:
    """Per layer, mean over the MC prompts: top-1 agreement and KL (at ``t_ref``) on the option
    subspace (``options``) and on the full vocabulary at the same answer rows (``answer``), and the
    full-vocabulary top-1 agreement over every prompt position (``all_positions``) of the same prompts."""
    mc = df[(df["context"] == "prompt") & (df["prompt_kind"] == "mc") & (df["sublayer"] == "block")]
    prompts = mc.loc[mc["space"] == "options", "prompt_id"].unique()
    mc = mc[mc["prompt_id"].isin(prompts)]
    at_t = mc["temperature"].isna() | (mc["temperature"] == t_ref)
    sel = mc[at_t & (((mc["space"].isin(["options", "answer"])) & mc["metric"].isin(["top1_agree", "kl"]))
                     | ((mc["space"] == "probability") & (mc["metric"] == "top1_agree") & (mc["step"] == -1)))]
    curves = per_prompt_mean(sel, ["space", "metric", "layer"]).sort_values("layer")
    return curves.assign(space=curves["space"].replace({"probability": "all_positions"}))


def plot_answer(df: pd.DataFrame, t_ref: float, path: Path) -> bool:
    """``probes_answer.png``: the option subspace vs the full vocabulary at the same answer rows."""
    curves = answer_curves(df, t_ref)
    if curves.empty or not (curves["space"] == "options").any():
        return False
    fig, axes = _figure(2)
    style = {"options": ("C0", "-", "option subspace"), "answer": ("C1", "-", "full vocabulary, same rows"),
             "all_positions": ("C1", ":", "full vocabulary, every position")}
    for ax, metric, ylabel in ((axes[0], "top1_agree", "top-1 agreement"), (axes[1], "kl", f"KL{_t(t_ref)}")):
        shown = []
        for space, (color, ls, label) in style.items():
            c = curves[(curves["space"] == space) & (curves["metric"] == metric)]
            if len(c):
                ax.plot(c["layer"], c["value"], ls, color=color, marker=".", label=label)
                shown += list(c["value"])
        if metric == "kl":
            _set_scale(ax, shown)
        ax.set(xlabel="layer", ylabel=ylabel, title=f"MC answer position: {ylabel}")
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def write_probe_outputs(df: pd.DataFrame, run_dir: str | Path, top_tokens: pd.DataFrame | None = None) -> dict:
    """Write ``probes.parquet``, ``probes_summary.json`` and the PNGs; return the summary.

    ``top_tokens``: the top-token table, else the one riding in ``df.attrs``
    (:func:`prunerep.probes.top_tokens.detach`). An empty table (``probe=none``) writes nothing
    and returns ``{}``."""
    if df is None or df.empty:
        return {}
    run_dir = Path(run_dir)
    riding = detach_top_tokens(df)  # out of df.attrs either way: parquet cannot hold a table there
    top = riding if top_tokens is None else top_tokens
    warn_nonfinite(df)
    atomic_write_with(run_dir / PROBES_FILE, lambda tmp: df.to_parquet(tmp, index=False))
    if top is not None:
        atomic_write_with(run_dir / TOP_TOKENS_FILE, lambda tmp: top.to_parquet(tmp, index=False))
    summary = summarize(df)
    atomic_write_json(run_dir / PROBES_SUMMARY_FILE, summary)
    t_ref = reference_temperature(df["temperature"].dropna().unique())
    similarity_png, kl_png, steps_png, estimates_png, answer_png = (run_dir / name for name in PROBE_PLOTS)
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
    for plot, name in ((plot_estimates, estimates_png), (plot_answer, answer_png)):
        try:
            plot(df, t_ref, name)
        except Exception as e:
            log.warning("probe plot %s failed: %s: %s", name.name, type(e).__name__, e)
    for plot, data, name in ((plot_transitions, df, TRANSITIONS_PLOT), (plot_top_tokens, top, TOP_TOKENS_PLOT)):
        try:
            plot(data, run_dir / name)
        except Exception as e:
            log.warning("probe plot %s failed: %s: %s", name, type(e).__name__, e)
    return summary
