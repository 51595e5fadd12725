"""What a probe comparison gives: :class:`ProbeResult` (the probe table, the top-token table and
which h was compared) and its headline numbers, :func:`summarize` (``probes_summary.json``).
What each holds is the results contract, :mod:`prunerep.results.schema`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from prunerep.results.schema import (CONTEXTS, ESTIMATE_RATIOS_KEY, HEADLINE, RATIO_METRICS, RATIO_PERCENTILES,
                                     mean_or_nan, per_prompt_mean, summary_key, temperature_label)


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """The comparison of a pruned model with its dense reference."""

    table: pd.DataFrame  # the probe table (schema.PROBE_COLUMNS)
    top_tokens: pd.DataFrame  # top_tokens.COLUMNS; empty when off
    h: str  # probe.h: which state the last layer's embedding rows compare


def summarize(result: ProbeResult | pd.DataFrame) -> dict:
    """The headline numbers of ``probes_summary.json``; a bare probe table (e.g. a probes.parquet
    read back) counts as ``h = residual``. ``{}`` for an empty table."""
    df, h = (result.table, result.h) if isinstance(result, ProbeResult) else (result, "residual")
    if df.empty:
        return {}
    final = int(df["layer"].max())
    head = df[(df["layer"] == final) & (df["sublayer"] == "block")]
    head = head[[m in HEADLINE.get(s, ()) for s, m in zip(head["space"], head["metric"])]]
    summary: dict = {"final_layer": final, "n_prompts": int(df["prompt_id"].nunique()), "n_rows": len(df),
                     "nonfinite_values": int((~np.isfinite(df["value"].to_numpy())).sum()), "h": h}
    means = per_prompt_mean(head, ["context", "space", "metric", "temperature"])
    order = {c: i for i, c in enumerate(CONTEXTS)}
    rank = {(s, m): (i, j) for i, (s, ms) in enumerate(HEADLINE.items()) for j, m in enumerate(ms)}
    means = means.assign(_k=[(order.get(c, 9), *rank[(s, m)], 0 if t != t else t)
                             for c, s, m, t in zip(means.context, means.space, means.metric, means.temperature)])
    for c, s, m, t, v in means.sort_values("_k")[["context", "space", "metric", "temperature", "value"]].itertuples(
            index=False):
        summary[summary_key(c, s, m, t)] = v
    # error accumulation: same prompts, same steps, KL at the final layer
    kl = head[(head["space"] == "probability") & (head["metric"] == "kl")]
    for t in sorted(kl["temperature"].dropna().unique()):
        by_ctx = {c: mean_or_nan(per_prompt_mean(kl[(kl["context"] == c) & (kl["temperature"] == t)],
                                                 ["context"])["value"])
                  for c in ("teacher_forced", "free_running")}
        if all(np.isfinite(v) for v in by_ctx.values()) and by_ctx["teacher_forced"] > 0:
            summary[f"error_accumulation/kl{temperature_label(t)}"] = by_ctx["free_running"] / by_ctx["teacher_forced"]
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
    order = {c: i for i, c in enumerate(CONTEXTS)}
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
