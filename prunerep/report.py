"""Aggregate a sweep into one table and a few figures.

    python -m prunerep.report outputs/multirun/2025-01-01_12-00-00          # -> <dir>/report/
    python -m prunerep.report <dir> --out report/ --format png

Writes
    sweep.parquet, sweep.csv   one row per run x metric (tidy): run identity (model, pruner, sparsity,
                               sparsity_ratio, status, ...), source (probe | eval | pruning | run), and
                               for probes context/space/metric/layer/step/temperature (mean over prompts),
                               for evals task/task_type/metric (dense | pruned | abs_change | rel_change)
    runs.csv                   one row per run: status, error, achieved sparsity, timings, reuse
    thresholds.json            per pruner: highest sparsity keeping MC / generative scores within 1 pp
    similarity_vs_sparsity.png per space, the similarity to dense at the last layer (one panel per pruner)
    kl_vs_sparsity.png         per space, the divergence (KL where defined) at the last layer
    mc_vs_gen_vs_sparsity.png  MC and generative scores vs sparsity, dense baseline dashed
    divergence_vs_step.png     divergence vs decoding step, one line per sparsity,
                               teacher-forced solid, free-running dashed
and prints the thresholds. Sparsities sort by their ratio (2:4 sits at 0.5, after unstructured 0.5).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from prunerep.config import sparsity_label
from prunerep.io import atomic_write_json, atomic_write_text, atomic_write_with, read_json

#: preferred similarity / divergence metric per plot, first one present wins (report and W&B)
SIMILARITY_METRICS = ("cos", "top1_agree", "token_agree", "top5_overlap", "topk_overlap_5")
DIVERGENCE_METRICS = ("kl", "kl_est", "js", "reverse_kl", "one_minus_cos", "rel_l2")
SPACE_ORDER = ("embedding", "logit", "probability", "options")
#: spaces drawn against sparsity (h, z, p and p on the MC options) and against decoding step (h, z, p);
#: the "tokens" space (free-running token agreement) stays in the table
SPARSITY_SPACES = ("embedding", "logit", "probability", "options")
STEP_SPACES = ("embedding", "logit", "probability")
RUN_COLUMNS = ["run", "run_dir", "model", "pruner", "sparsity", "sparsity_ratio", "sparsity_nm", "seed",
               "status", "config_hash", "achieved_sparsity"]
ROW_COLUMNS = ["source", "context", "space", "metric", "layer", "sublayer", "step", "temperature", "task",
               "task_type", "value"]
MC, GEN = "multiple_choice", "generative"


class ReportError(RuntimeError):
    """Bad input, reported as one line."""


# --------------------------------------------------------------------------- sparsity order

def sparsity_key(value: Any) -> tuple[float, int, str]:
    """Sort key: the ratio, unstructured before N:M at the same ratio, then the text."""
    s = str(value).strip()
    if ":" in s:
        try:
            n, m = (int(x) for x in s.split(":"))
            return (n / m, 1, s)
        except ValueError:
            return (math.inf, 2, s)
    try:
        return (float(s), 0, s)
    except ValueError:
        return (math.inf, 2, s)


# --------------------------------------------------------------------------- loading

def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories under `sweep_dir` (itself included): those holding summary.json, or a
    config.yaml next to Hydra's .hydra/ (a point that started but never finished)."""
    found = {p.parent for p in sweep_dir.rglob("summary.json")}
    found |= {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")}
    skip = {"wandb", ".submitit", "report", "index"}
    return sorted(d for d in found if not (set(d.relative_to(sweep_dir).parts) & skip))


def _read_json(path: Path) -> Optional[dict]:
    try:
        d = read_json(path)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _run_identity(run_dir: Path, sweep_dir: Path) -> dict:
    summary = _read_json(run_dir / "summary.json") or {}
    cfg = {}
    for p in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if p.is_file():
            try:
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
                break
            except Exception:
                pass

    def pick(key, dotted):
        if summary.get(key) is not None:
            return summary[key]
        d: Any = cfg
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    sparsity = sparsity_label(pick("sparsity", "sparsity"))
    ratio, nm, _ = sparsity_key(sparsity)
    status = summary.get("status") or ("missing" if not summary else "unknown")
    rel = run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name
    return {
        "run": rel, "run_dir": str(run_dir), "model": pick("model", "model.name"),
        "pruner": pick("pruner", "pruner.name"), "sparsity": sparsity,
        "sparsity_ratio": ratio if math.isfinite(ratio) else None, "sparsity_nm": bool(nm == 1),
        "seed": pick("seed", "seed"), "status": status, "config_hash": summary.get("config_hash"),
        "achieved_sparsity": summary.get("achieved_sparsity"), "_summary": summary,
    }


def _probe_rows(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "probes.parquet"
    if not path.is_file():
        return pd.DataFrame(columns=ROW_COLUMNS)
    df = pd.read_parquet(path)
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    keys = [c for c in ("context", "space", "metric", "layer", "sublayer", "step", "temperature") if c in df]
    df = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))
    agg = df.groupby(keys, dropna=False, as_index=False, sort=True)["value"].mean()  # over prompts
    agg["source"] = "probe"
    for c in ROW_COLUMNS:
        if c not in agg:
            agg[c] = None
    return agg[ROW_COLUMNS]


def _eval_rows(run_dir: Path) -> pd.DataFrame:
    ev = _read_json(run_dir / "evals.json") or {}
    rows = []
    for task, t in (ev.get("tasks") or {}).items():
        if not isinstance(t, dict):
            continue
        for k in ("dense", "pruned", "abs_change", "rel_change"):
            v = t.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append({"source": "eval", "task": task, "task_type": t.get("type"),
                             "context": t.get("metric"), "metric": k, "value": float(v)})
    gap = ev.get("mc_vs_gen_gap")
    if isinstance(gap, (int, float)) and not isinstance(gap, bool):
        rows.append({"source": "eval", "task": "mc_vs_gen_gap", "metric": "mc_vs_gen_gap", "value": float(gap)})
    elif isinstance(gap, dict):
        for k, v in gap.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append({"source": "eval", "task": "mc_vs_gen_gap", "metric": str(k), "value": float(v)})
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _run_rows(ident: dict, run_dir: Path) -> pd.DataFrame:
    s = ident["_summary"]
    rows = []
    if isinstance(ident.get("achieved_sparsity"), (int, float)):
        rows.append({"source": "pruning", "metric": "achieved_sparsity", "value": float(ident["achieved_sparsity"])})
    pr = _read_json(run_dir / "pruning.json") or {}
    for k in ("max_abs_deviation_pp", "lm_head_sparsity"):
        if isinstance(pr.get(k), (int, float)):
            rows.append({"source": "pruning", "metric": k, "value": float(pr[k])})
    for stage, sec in (s.get("timings_s") or {}).items():
        if isinstance(sec, (int, float)):
            rows.append({"source": "run", "metric": f"time_s/{stage}", "value": float(sec)})
    for kind, mb in (s.get("peak_memory_mb") or {}).items():
        if isinstance(mb, (int, float)):
            rows.append({"source": "run", "metric": f"peak_memory_mb/{kind}", "value": float(mb)})
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def load_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, runs): the tidy table (one row per run x metric) and one row per run."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such directory")
    dirs = find_runs(sweep_dir)
    if not dirs:
        raise ReportError(f"{sweep_dir}: no runs found (no run directory with a summary.json or .hydra/config.yaml)")
    parts, runs = [], []
    for d in dirs:
        ident = _run_identity(d, sweep_dir)
        s = ident.pop("_summary")
        runs.append(dict(ident, error=s.get("error"), reused_from=s.get("reused_from"),
                         slurm_job_id=s.get("slurm_job_id"),
                         total_s=(s.get("timings_s") or {}).get("total")))
        if ident["status"] != "complete":
            continue
        ident["_summary"] = s
        rows = pd.concat([x for x in (_probe_rows(d), _eval_rows(d), _run_rows(ident, d)) if not x.empty]
                         or [pd.DataFrame(columns=ROW_COLUMNS)], ignore_index=True)
        for k in RUN_COLUMNS:
            rows[k] = ident.get(k)
        parts.append(rows[RUN_COLUMNS + ROW_COLUMNS])
    runs_df = pd.DataFrame(runs)
    runs_df = runs_df.iloc[sorted(range(len(runs_df)), key=lambda i: (
        str(runs_df.iloc[i]["model"]), str(runs_df.iloc[i]["pruner"]), sparsity_key(runs_df.iloc[i]["sparsity"]),
        str(runs_df.iloc[i]["run"])))].reset_index(drop=True)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=RUN_COLUMNS + ROW_COLUMNS)
    table = _typed(table)
    return table, runs_df


def _typed(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    for c in ("run", "run_dir", "model", "pruner", "sparsity", "status", "config_hash", "source", "context",
              "space", "metric", "sublayer", "task", "task_type"):
        t[c] = t[c].astype("string")
    for c in ("sparsity_ratio", "achieved_sparsity", "temperature", "value"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype("float64")
    for c in ("layer", "step", "seed"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype("Int64")
    t["sparsity_nm"] = t["sparsity_nm"].astype("boolean")
    return t


# --------------------------------------------------------------------------- headline numbers

def pick_metric(available, prefs) -> Optional[str]:
    """The first metric of ``prefs`` that is among ``available``."""
    avail = set(map(str, available))
    return next((m for m in prefs if m in avail), None)


def _spaces(values) -> list[str]:
    vals = [str(v) for v in pd.unique(values) if pd.notna(v)]
    return sorted(vals, key=lambda s: (SPACE_ORDER.index(s) if s in SPACE_ORDER else len(SPACE_ORDER), s))


def final_layer_points(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Per run and space: the chosen similarity/divergence metric at the last layer, prompt context
    (else the first context), temperature 1 (else the lowest), averaged over decoding steps."""
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
    return pd.DataFrame(out, columns=["run", "model", "pruner", "sparsity", "space", "metric", "value"])


def _residual_at_reference_temperature(g: pd.DataFrame) -> pd.DataFrame:
    """The rows at the reference temperature, on the residual stream (sublayer block) if probed."""
    g = _at_reference_temperature(g)
    if g["sublayer"].notna().any() and (g["sublayer"] == "block").any():
        g = g[g["sublayer"] == "block"]
    return g


def _at_reference_temperature(g: pd.DataFrame) -> pd.DataFrame:
    """Rows at T=1, else at the temperature closest to 1 on a log scale; NaN (T-independent) kept."""
    temps = [t for t in g["temperature"].dropna().unique() if t > 0]
    if not temps:
        return g
    t = min(temps, key=lambda x: abs(math.log(x)))
    return g[g["temperature"].isna() | (g["temperature"] == t)]


def eval_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and task: dense and pruned scores in percentage points."""
    e = table[(table["source"] == "eval") & table["metric"].isin(["dense", "pruned"])
              & table["task_type"].isin([MC, GEN])]
    if e.empty:
        return pd.DataFrame(columns=["run", "model", "pruner", "sparsity", "task", "task_type", "dense", "pruned"])
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
    patterns are two families, each walked in increasing order; a family stops at its first miss."""
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
    if not th:
        return "no eval scores in this sweep (task=none?): no MC / generation thresholds"
    lines = [f"highest sparsity with every task within {tol_pp:g} pp of dense:",
             f"{'model':<14} {'pruner':<12} {'MC':<16} {'generation':<16}"]
    for model, pr in th.items():
        for pruner, res in pr.items():
            def fmt(e):
                if not e or not e.get("tested"):
                    return "-"
                s = e["unstructured"] or "none"
                if any(sparsity_key(t["sparsity"])[1] == 1 for t in e["tested"]):
                    s += f" (N:M {e['nm'] or 'none'})"
                return s
            lines.append(f"{model:<14} {pruner:<12} {fmt(res.get('mc')):<16} {fmt(res.get('generative')):<16}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures

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


def step_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, space and context: divergence vs decoding step at the last layer (mean over prompts)."""
    p = table[(table["source"] == "probe") & table["context"].isin(["teacher_forced", "free_running"])
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
    cols = ["run", "model", "pruner", "sparsity", "space", "metric", "context", "step", "value"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def plot_steps(curves: pd.DataFrame, path: Path) -> Path:
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


# --------------------------------------------------------------------------- main

def make_report(sweep_dir: str | Path, out_dir: str | Path | None = None, tol_pp: float = 1.0) -> dict:
    sweep_dir = Path(sweep_dir)
    table, runs = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    files["table_parquet"] = atomic_write_with(out / "sweep.parquet", lambda p: table.to_parquet(p, index=False))
    files["table_csv"] = atomic_write_with(out / "sweep.csv", lambda p: table.to_csv(p, index=False))
    files["runs_csv"] = atomic_write_with(out / "runs.csv", lambda p: runs.to_csv(p, index=False))
    scores = eval_scores(table)
    th = thresholds(scores, tol_pp)
    files["thresholds"] = atomic_write_json(out / "thresholds.json", {"tolerance_pp": tol_pp, "thresholds": th})
    files["similarity_png"] = plot_vs_sparsity(final_layer_points(table, "similarity"), "similarity",
                                               out / "similarity_vs_sparsity.png")
    files["kl_png"] = plot_vs_sparsity(final_layer_points(table, "divergence"), "divergence",
                                       out / "kl_vs_sparsity.png")
    files["scores_png"] = plot_scores(scores, out / "mc_vs_gen_vs_sparsity.png")
    files["steps_png"] = plot_steps(step_curves(table), out / "divergence_vs_step.png")
    text = format_thresholds(th, tol_pp)
    atomic_write_text(out / "thresholds.txt", text + "\n")
    counts = runs["status"].value_counts().to_dict()
    return {"out_dir": out, "files": files, "table": table, "runs": runs, "thresholds": th, "text": text,
            "counts": counts}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prunerep.report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", help="a multirun directory (outputs/multirun/<date>) or any folder of run dirs")
    ap.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    ap.add_argument("--tolerance-pp", type=float, default=1.0,
                    help="how far (percentage points) below dense a score may fall (default 1)")
    args = ap.parse_args(argv)
    try:
        res = make_report(args.sweep_dir, args.out, args.tolerance_pp)
    except ReportError as e:
        print(f"prunerep.report: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in sorted(res["counts"].items()))
    print(f"{len(res['runs'])} run(s): {counts}; {len(res['table'])} rows -> {res['out_dir']}")
    bad = res["runs"][res["runs"]["status"] != "complete"]
    for _, r in bad.iterrows():
        err = r.get("error") if isinstance(r.get("error"), str) and r.get("error") else "no summary.json"
        print(f"  {r['status']}: {r['run']}: {err.splitlines()[0]}")
    print(res["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
