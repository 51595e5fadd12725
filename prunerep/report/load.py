"""Find the run directories of a sweep and read them into two tables: the tidy table (one row per
run x metric, :data:`RUN_COLUMNS` + :data:`ROW_COLUMNS`) and the runs table (one row per run).
The files read and their schema are :mod:`prunerep.results.schema`.

A run's compression is its pruner and its quantizer (``quant``: the method, ``quant_bits``,
``quant_group_size``, ``quant_sym``; ``none`` for runs from before quantization existed), named by
``method`` (``wanda``, ``gptq-w4g64``, ``wanda+gptq-w4g64``: what the figures and thresholds keep
apart) and ``family`` (``wanda``, ``gptq``, ``wanda+gptq``: a line of the equal-memory figure);
``effective_bits`` / ``dense_bits`` come from summary.json / compression.json."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import OmegaConf

from prunerep.results.rundir import MARKER, is_prunerep_dir, marker, verify
from prunerep.results.store import read_json
from prunerep.results.schema import (COMPRESSION_FILE, CONFIG_FILE, EVALS_FILE, PROBES_FILE, PRUNING_FILE, SUMMARY_FILE,
                              compression_label, quant_label)
from prunerep.sparsity import sparsity_key, sparsity_label

RUN_COLUMNS = ["run", "run_dir", "model", "pruner", "sparsity", "sparsity_ratio", "sparsity_nm", "seed",
               "status", "config_hash", "achieved_sparsity", "quant", "quant_bits", "quant_group_size", "quant_sym",
               "method", "family", "effective_bits", "dense_bits"]
ROW_COLUMNS = ["source", "context", "space", "metric", "layer", "sublayer", "step", "temperature", "task",
               "task_type", "value"]
#: the probe table's columns a probe row keeps (the mean over prompts is taken per combination),
#: in the order the rows are sorted
PROBE_KEYS = ("context", "space", "metric", "layer", "sublayer", "step", "temperature")
#: folders under a sweep that hold no runs
SKIP_DIRS = {"wandb", ".submitit", "report", "index"}
EVAL_VALUES = ("dense", "pruned", "abs_change", "rel_change", "retained_above_chance")
#: evals.json's flags that leave a task out of its family's above-chance mean (read as the 0/1 row
#: ``excluded``): its dense score is at chance, or the model picks one option whatever the question
EXCLUSION_FLAGS = ("excluded_at_chance", "excluded_option_bias")


class ReportError(RuntimeError):
    """Bad input, reported as one line."""


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories under `sweep_dir` (itself included): those holding summary.json, or
    prunerep's marker of a run (a point that started but never finished)."""
    found = {p.parent for p in sweep_dir.rglob(SUMMARY_FILE)}
    found |= {p.parent for p in sweep_dir.rglob(MARKER) if (marker(p.parent) or {}).get("kind") == "run"}
    return sorted(d for d in found if not (set(d.relative_to(sweep_dir).parts) & SKIP_DIRS))


def read_dict(path: Path) -> Optional[dict]:
    """A JSON file's dict; None when absent, unreadable or not a dict."""
    try:
        d = read_json(path)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def read_config(run_dir: Path) -> dict:
    """A run's config.yaml, unresolved; {} when absent or unreadable."""
    try:
        c = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=False)
        return c if isinstance(c, dict) else {}
    except Exception:
        return {}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _run_identity(run_dir: Path, sweep_dir: Path) -> dict:
    summary = read_dict(run_dir / SUMMARY_FILE) or {}
    started = (marker(run_dir) or {}).get("point") or {}  # what a point that never ended was
    summary = {**started, **summary}
    cfg = read_config(run_dir)

    def pick(key, dotted):
        if summary.get(key) is not None:
            return summary[key]
        d: Any = cfg
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    sparsity = sparsity_label(pick("sparsity", "sparsity"))
    ratio, nm, _ = sparsity_key(sparsity)
    comp = read_dict(run_dir / COMPRESSION_FILE) or {}
    qentry = next((p for p in comp.get("perturbations") or [] if isinstance(p, dict)
                   and p.get("kind") == "quantization"), {})
    quant = str(pick("quant", "quant.name") or qentry.get("method") or "none")
    qfmt = {k: (qentry.get(k) if qentry.get(k) is not None else pick(f"_{k}", f"quant.{k}"))
            for k in ("bits", "group_size", "sym")} if quant != "none" else dict.fromkeys(("bits", "group_size", "sym"))
    pruner = pick("pruner", "pruner.name")
    effective = summary.get("effective_bits", comp.get("effective_bits"))
    status = summary.get("status") or "missing"  # started, never ended
    if status == "complete" and is_prunerep_dir(run_dir) and verify(run_dir) is not None:
        status = "incomplete"  # killed while its files were moved into place, or a file since removed
    rel = run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name
    return {
        "run": rel, "run_dir": str(run_dir), "model": pick("model", "model.name"),
        "pruner": pruner, "sparsity": sparsity,
        "sparsity_ratio": ratio if math.isfinite(ratio) else None, "sparsity_nm": bool(nm == 1),
        "seed": pick("seed", "seed"), "status": status, "config_hash": summary.get("config_hash"),
        "achieved_sparsity": summary.get("achieved_sparsity"), "quant": quant, "quant_bits": qfmt["bits"],
        "quant_group_size": qfmt["group_size"], "quant_sym": qfmt["sym"],
        "method": compression_label(pruner, quant_label(quant, **qfmt)),
        "family": compression_label(pruner, quant),
        "effective_bits": effective if _is_number(effective) else None,
        "dense_bits": comp.get("dense_bits") if _is_number(comp.get("dense_bits")) else None, "_summary": summary,
    }


def _probe_rows(run_dir: Path) -> pd.DataFrame:
    """The probe table, averaged over prompts per :data:`PROBE_KEYS` (NaN skipped)."""
    path = run_dir / PROBES_FILE
    if not path.is_file():
        return pd.DataFrame(columns=ROW_COLUMNS)
    df = pd.read_parquet(path)
    if df.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    keys = [c for c in PROBE_KEYS if c in df]
    df = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))
    agg = df.groupby(keys, dropna=False, as_index=False, sort=True)["value"].mean()  # over prompts
    agg["source"] = "probe"
    for c in ROW_COLUMNS:
        if c not in agg:
            agg[c] = None
    return agg[ROW_COLUMNS]


def _eval_rows(run_dir: Path) -> pd.DataFrame:
    ev = read_dict(run_dir / EVALS_FILE) or {}
    rows = []
    for task, t in (ev.get("tasks") or {}).items():
        if not isinstance(t, dict):
            continue
        row = {"source": "eval", "task": task, "task_type": t.get("type"), "context": t.get("metric")}
        rows += [dict(row, metric=k, value=float(t[k])) for k in EVAL_VALUES if _is_number(t.get(k))]
        if any(f in t for f in EXCLUSION_FLAGS):
            rows.append(dict(row, metric="excluded", value=float(any(bool(t.get(f)) for f in EXCLUSION_FLAGS))))
    gap = ev.get("mc_vs_gen_gap")
    rows += [{"source": "eval", "task": "mc_vs_gen_gap", "metric": str(k), "value": float(v)}
             for k, v in (gap if isinstance(gap, dict) else {"mc_vs_gen_gap": gap}).items() if _is_number(v)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _run_rows(run_dir: Path, ident: dict, summary: dict) -> pd.DataFrame:
    """Achieved sparsity, pruning.json's deviations, summary.json's timings and peak memory."""
    pr = read_dict(run_dir / PRUNING_FILE) or {}
    peak = summary.get("peak_memory_mb") or {}
    values = [("pruning", "achieved_sparsity", ident.get("achieved_sparsity"))]
    values += [("pruning", k, pr.get(k)) for k in ("max_abs_deviation_pp", "lm_head_sparsity")]
    values += [("run", f"time_s/{stage}", sec) for stage, sec in (summary.get("timings_s") or {}).items()]
    values += [("run", f"peak_memory_mb/{kind}", mb) for kind, mb in peak.items()]
    values += [("run", f"peak_memory_mb/{stage}/{kind}", mb)
               for stage, kinds in (peak.get("stages") or {}).items() for kind, mb in (kinds or {}).items()]
    return pd.DataFrame([{"source": src, "metric": m, "value": float(v)} for src, m, v in values
                         if isinstance(v, (int, float))], columns=ROW_COLUMNS)


def _claim_rows(summary: dict) -> pd.DataFrame:
    """summary.json's story: each claim's statistic (metric ``<name>``), the AUROCs (``auroc/<family>/<measure>``)
    and ``mc/kept_large_kl``, with their bounds (``<name>/lo``, ``<name>/hi``), source ``claim``
    (:mod:`prunerep.results.claims`)."""
    story = summary.get("story") or {}
    rows = [{"source": "claim", "metric": k.split("/", 1)[1] if k.startswith("claim/") else k, "value": float(v)}
            for k, v in story.items() if k.startswith(("claim/", "auroc/", "mc/kept_large_kl"))
            and not k.endswith(("/n", "/n_lost", "/unit", "/verdict")) and _is_number(v)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def load_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, runs): the tidy table (one row per run x metric, complete runs only) and one row
    per run (every status). Raises :class:`ReportError` when there is nothing to read."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such directory")
    dirs = find_runs(sweep_dir)
    if not dirs:
        raise ReportError(f"{sweep_dir}: no runs found (no run directory with a summary.json or prunerep's marker)")
    parts, runs = [], []
    for d in dirs:
        ident = _run_identity(d, sweep_dir)
        s = ident.pop("_summary")
        runs.append(dict(ident, error=s.get("error"), reused_from=s.get("reused_from"),
                         slurm_job_id=s.get("slurm_job_id"),
                         total_s=(s.get("timings_s") or {}).get("total")))
        if ident["status"] != "complete":
            continue
        rows = pd.concat([x for x in (_probe_rows(d), _eval_rows(d), _run_rows(d, ident, s), _claim_rows(s))
                          if not x.empty]
                         or [pd.DataFrame(columns=ROW_COLUMNS)], ignore_index=True)
        for k in RUN_COLUMNS:
            rows[k] = ident.get(k)
        parts.append(rows[RUN_COLUMNS + ROW_COLUMNS])
    runs.sort(key=lambda r: (str(r["model"]), str(r["pruner"]), sparsity_key(r["sparsity"]), str(r["method"]),
                             str(r["run"])))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=RUN_COLUMNS + ROW_COLUMNS)
    return _typed(table), pd.DataFrame(runs)


def _typed(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    for c in ("run", "run_dir", "model", "pruner", "sparsity", "status", "config_hash", "source", "context",
              "space", "metric", "sublayer", "task", "task_type", "quant", "method", "family"):
        t[c] = t[c].astype("string")
    for c in ("sparsity_ratio", "achieved_sparsity", "temperature", "value", "effective_bits", "dense_bits"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype("float64")
    for c in ("layer", "step", "seed", "quant_bits", "quant_group_size"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype("Int64")
    t["sparsity_nm"] = t["sparsity_nm"].astype("boolean")
    t["quant_sym"] = t["quant_sym"].astype("boolean")
    return t


def by_method(table: pd.DataFrame) -> pd.DataFrame:
    """The table with each run's ``pruner`` read as its compression ``method`` (``wanda+gptq-w4g64``),
    so the per-pruner figures and thresholds keep quantized runs apart (``quant=none,rtn``); an
    unquantized run's method is its pruner, so those read as before."""
    if "method" not in table:
        return table
    return table.assign(pruner=table["method"].fillna(table["pruner"]))
