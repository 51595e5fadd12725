"""The figures of one run's probes and the files they are written to (all atomically):

* ``probes_similarity.png`` — 1 − cos vs layer, one line per space (prompt context), the logit
  space raw and centred;
* ``probes_kl.png`` — exact KL and 1 − cos(p) vs layer next to their Δz estimates;
* ``probes_estimates.png`` — each estimate against its exact value, one point per table row
  (prompt: a prompt's mean at one layer; decoding contexts: one step), with the y = x line;
* ``probes_answer.png`` — at the MC answer positions, per layer: top-1 agreement and KL on the
  option subspace next to the full vocabulary at the same rows (and top-1 over every position);
* ``probes_steps.png`` — final-layer KL vs decoding step, teacher-forced vs free-running;
* ``probes_transitions.png`` (``probe.transitions``) — per space and comparison, attention vs MLP
  against the layer;
* ``probes_top_tokens.png`` — the dense top tokens of the first prompts, dense vs pruned bars.

:func:`write_probe_outputs` writes them with ``probes.parquet``, ``top_tokens.parquet`` and
``probes_summary.json`` (what each holds: :mod:`prunerep.results.schema`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from prunerep.probes.outputs import ProbeResult, summarize
from prunerep.results.schema import (CONTEXTS, PROBE_H_ATTR, PROBE_PLOTS, PROBES_FILE, PROBES_SUMMARY_FILE,
                                     STEP_CONTEXTS, TOP_TOKENS_FILE, TOP_TOKENS_PLOT, TRANSITION_SUBLAYERS,
                                     TRANSITIONS_PLOT, at_reference_temperature, mean_or_nan as _mean,
                                     per_prompt_mean, reference_temperature, temperature_label as _t)
from prunerep.results.store import atomic_write_json, atomic_write_with

log = logging.getLogger(__name__)


def _figure(ncols: int = 1):
    fig = Figure(figsize=(5.5 * ncols, 4), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: Path, dpi: int = 110) -> None:
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


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


def probe_curves(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The curves of the W&B run, ``{"layer": ..., "step": ...}``: one per (context, space, metric), the
    mean over prompts of the finite values at the reference temperature (and the temperature-independent
    rows), on the residual stream (sublayer block) where it was probed.

    layer: every context, averaged over positions / decoding steps. step: the decoding step of the
    teacher-forced and free-running contexts (step >= 0; -1 marks per-trajectory or all-position
    values), at each context's last layer."""
    df = df.assign(**{c: df[c].astype("string").fillna("") for c in ("context", "space", "metric", "sublayer")
                      if c in df}, value=pd.to_numeric(df["value"], errors="coerce"))
    df = at_reference_temperature(df[np.isfinite(df["value"])])
    return {axis: _curve(df, axis) for axis in ("layer", "step")}


def _curve(df: pd.DataFrame, axis: str) -> pd.DataFrame:
    cols = ["context", "space", "metric", axis, "value"]
    if axis not in df or df.empty:
        return pd.DataFrame(columns=cols)
    sub = df[df[axis].notna()]
    if axis == "step":
        sub = sub[sub["context"].isin(STEP_CONTEXTS) & (sub["step"] >= 0)]
        if "layer" in sub and sub["layer"].notna().any():
            sub = sub[sub["layer"] == sub.groupby(["context", "space"])["layer"].transform("max")]
    if "sublayer" in sub and (sub["sublayer"] == "block").any():
        sub = sub[sub["sublayer"] == "block"]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    out = per_prompt_mean(sub, ["context", "space", "metric", axis], skipna=True)
    return out.astype({axis: int})[cols]


#: (space, metric, label) per row of the transitions figure (and of their W&B plots)
TRANSITION_ROWS = (("embedding", "one_minus_cos", "h: 1 − cos"), ("logit", "one_minus_cos", "z: 1 − cos"),
                   ("probability", "one_minus_cos", "p: 1 − cos"), ("probability", "kl", "p: KL"))
#: (comparison, title) per column of the transitions figure
TRANSITION_COLUMNS = (("transition_dense", "transition, dense model"),
                      ("transition_pruned", "transition, pruned model"), ("local", "local damage (dense input)"))


def transition_curves(df: pd.DataFrame) -> pd.DataFrame:
    """The transition rows at the reference temperature, mean over positions/steps then prompts, per
    context, sublayer, space, metric and layer; with ``kind`` (attn | mlp) and ``comparison``."""
    sel = df[df["sublayer"].isin(TRANSITION_SUBLAYERS)]
    if sel.empty:
        return pd.DataFrame(columns=["context", "sublayer", "space", "metric", "layer", "value", "kind", "comparison"])
    sel = at_reference_temperature(sel)
    c = per_prompt_mean(sel, ["context", "sublayer", "space", "metric", "layer"])
    kind_cmp = c["sublayer"].str.split("_", n=1)
    return c.assign(kind=kind_cmp.str[0], comparison=kind_cmp.str[1]).sort_values("layer")


def plot_transitions(df: pd.DataFrame, path) -> bool:
    """``probes_transitions.png``: per space (rows) and comparison (columns), attention vs MLP
    against the layer; prompt context solid, teacher-forced dashed. False when there is nothing."""
    curves = transition_curves(df)
    if curves.empty:
        return False
    rows = [r for r in TRANSITION_ROWS if ((curves["space"] == r[0]) & (curves["metric"] == r[1])).any()]
    if not rows:
        return False
    height = 3.2 * len(rows) + 0.9
    fig = Figure(figsize=(4.6 * len(TRANSITION_COLUMNS), height))
    axes = fig.subplots(len(rows), len(TRANSITION_COLUMNS), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / height, top=1 - 0.9 / height, hspace=0.35,
                        wspace=0.25)  # (a constrained layout takes seconds)
    styles = {"prompt": "-", "teacher_forced": "--"}
    colors = {"attn": "C0", "mlp": "C1"}
    for r, (space, metric, label) in enumerate(rows):
        for c, (comparison, title) in enumerate(TRANSITION_COLUMNS):
            ax = axes[r][c]
            g = curves[(curves["space"] == space) & (curves["metric"] == metric) & (curves["comparison"] == comparison)]
            shown = []
            for (ctx, kind), gc in g.groupby(["context", "kind"], sort=True):
                ax.plot(gc["layer"], gc["value"], styles.get(ctx, ":"), color=colors.get(kind), marker=".",
                        markersize=3, label=f"{kind} ({ctx.replace('_', '-')})")
                shown += list(gc["value"])
            _set_scale(ax, shown)
            ax.set(xlabel="layer (block + 1)", ylabel=label, title=title if r == 0 else None)
            ax.grid(alpha=0.3)
            if shown and r == 0:
                ax.legend(fontsize=7)
    fig.suptitle("sublayer transitions: input vs output of each attention / MLP sublayer", y=1 - 0.2 / height)
    _save(fig, path, dpi=100)
    return True


def plot_top_tokens(table: pd.DataFrame, path, per_kind: int = 2, temperature: float | None = None) -> bool:
    """``probes_top_tokens.png``: for the first ``per_kind`` MC prompts and generative prompts, the
    dense top tokens (dense order) with p_dense and p_pruned as bars, at the reference temperature."""
    if table.empty:
        return False
    t = reference_temperature(table["temperature"].unique()) if temperature is None else temperature
    sel = table[table["temperature"] == t]
    picks = []
    for kind in ("mc", "gen"):
        picks += list(pd.unique(sel.loc[sel["prompt_kind"] == kind, "prompt_id"]))[:per_kind]
    if not picks:
        return False
    fig = Figure(figsize=(max(8.0, 0.32 * sel["rank"].max() + 3), 2.9 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), 1, squeeze=False)[:, 0]
    for ax, pid in zip(axes, picks):
        g = sel[sel["prompt_id"] == pid].sort_values("rank")
        x = np.arange(len(g))
        ax.bar(x - 0.2, g["p_dense"], width=0.4, label="dense", color="C0")
        ax.bar(x + 0.2, g["p_pruned"], width=0.4, label="pruned", color="C3")
        ax.set_xticks(x, [repr(s)[1:-1].replace(" ", "␣") for s in g["token"]], rotation=70, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"p (T={t:g})")
        first = g.iloc[0]
        ax.set_title(f"prompt {pid} ({first['prompt_kind']}, {first['where']}): the dense top-{len(g)}", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path, dpi=100)
    return True


def write_probe_outputs(result: ProbeResult, run_dir: str | Path) -> dict:
    """Write ``probes.parquet`` (its pandas metadata naming the h compared), ``top_tokens.parquet``
    (when there are top tokens), ``probes_summary.json`` and the PNGs; return the summary. An empty
    table (``probe=none``) writes nothing and returns ``{}``. A plot that fails is warned about: it
    never costs the numbers."""
    df = result.table
    if df.empty:
        return {}
    run_dir = Path(run_dir)
    table = df.copy(deep=False)
    table.attrs = {PROBE_H_ATTR: result.h}
    atomic_write_with(run_dir / PROBES_FILE, lambda tmp: table.to_parquet(tmp, index=False))
    if len(result.top_tokens):
        atomic_write_with(run_dir / TOP_TOKENS_FILE, lambda tmp: result.top_tokens.to_parquet(tmp, index=False))
    summary = summarize(result)
    atomic_write_json(run_dir / PROBES_SUMMARY_FILE, summary)
    t_ref = reference_temperature(df["temperature"].dropna().unique())
    similarity_png, kl_png, steps_png, estimates_png, answer_png = (run_dir / name for name in PROBE_PLOTS)
    context = next((c for c in CONTEXTS if (df["context"] == c).any() and c != "free_running"), None)
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
    for plot, *args in ((plot_estimates, df, t_ref, estimates_png), (plot_answer, df, t_ref, answer_png),
                        (plot_transitions, df, run_dir / TRANSITIONS_PLOT),
                        (plot_top_tokens, result.top_tokens, run_dir / TOP_TOKENS_PLOT)):
        try:
            plot(*args)
        except Exception as e:
            log.warning("probe plot %s failed: %s: %s", args[-1].name, type(e).__name__, e)
    return summary
