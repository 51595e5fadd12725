"""Dense vs pruned: the contents of ``evals.json`` and its console table.

Conventions
-----------
* ``abs_change = pruned - dense`` and ``rel_change = (pruned - dense) / dense`` (null when
  dense is 0 or missing). Both are negative when pruning hurts.
* The RELATIVE DROP of a task is ``-rel_change = (dense - pruned) / dense``: positive when
  pruning hurts.
* ``mc_vs_gen_gap = mean relative drop over generative tasks - mean relative drop over
  multiple-choice tasks``. POSITIVE means generation was hurt more than multiple choice
  (the pattern of He et al. 2026). Tasks that were skipped, failed, or have a dense score
  of 0 are left out of the means; the gap is null unless both kinds have a task left.
* Generation fidelity (generative tasks), at TOKEN level: each generation is stored as
  token ids (the generated text re-tokenised by the model's tokenizer, no special tokens).
  ``identical_frac`` is the fraction of docs whose pruned generation equals the dense one
  token for token. The first-divergence step of a doc is the length of the common token
  prefix (0 = the very first generated token differs); ``mean_first_divergence`` averages
  it over the docs that DO diverge (identical pairs are excluded, since they have no
  divergence step; null when all are identical).
"""
from __future__ import annotations

import math
from typing import Any

GENERATIVE = "generative"
MULTIPLE_CHOICE = "multiple_choice"


def finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def common_prefix_len(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generation_fidelity(dense_gens: list[dict], pruned_gens: list[dict]) -> dict:
    """Token-level agreement of the pruned generations with the dense ones (same docs)."""
    def key(r):
        return (r.get("task", ""), int(r["doc_id"]))

    def toks(r):
        return list(r["tokens"]) if r.get("tokens") is not None else list(r.get("text", ""))

    dense = {key(r): r for r in dense_gens}
    pairs = [(dense[key(r)], r) for r in pruned_gens if key(r) in dense]
    if not pairs:
        return {"n_compared": 0, "identical_frac": None, "mean_first_divergence": None, "unit": "token"}
    identical, diverge = 0, []
    for d, p in pairs:
        td, tp = toks(d), toks(p)
        if td == tp:
            identical += 1
        else:
            diverge.append(common_prefix_len(td, tp))
    return {
        "n_compared": len(pairs),
        "identical_frac": identical / len(pairs),
        "mean_first_divergence": sum(diverge) / len(diverge) if diverge else None,
        "unit": "token",
    }


def compare_task(dense: dict | None, pruned: dict | None) -> dict:
    """One task's row of evals.json."""
    dense, pruned = dense or {}, pruned or {}
    ref = dense or pruned
    row: dict[str, Any] = {"type": ref.get("type"), "metric": ref.get("metric")}
    skipped = [r.get("reason") for r in (dense, pruned) if r.get("skipped")]
    missing = [w for w, r in (("dense", dense), ("pruned", pruned)) if not r]
    if skipped or missing:
        row.update(skipped=True, reason=skipped[0] if skipped else f"no {missing[0]} result",
                   dense=None, pruned=None, abs_change=None, rel_change=None)
        return row
    d, p = finite_or_none(dense.get("score")), finite_or_none(pruned.get("score"))
    row.update(
        dense=d, pruned=p,
        abs_change=None if d is None or p is None else p - d,
        rel_change=None if d is None or p is None or d == 0 else (p - d) / d,
        stderr={"dense": finite_or_none(dense.get("stderr")), "pruned": finite_or_none(pruned.get("stderr"))},
        n=pruned.get("n"),
    )
    if "chance" in ref:
        row["chance"] = ref["chance"]
    if row["type"] == GENERATIVE:
        row["fidelity"] = generation_fidelity(dense.get("generations") or [], pruned.get("generations") or [])
    return row


def compare_evals(dense: dict, pruned: dict) -> dict:
    """evals.json: ``{"tasks": {name: row}, "mc_vs_gen_gap": float|None, "mean_rel_drop":
    {"generative": .., "multiple_choice": ..}, "conventions": str}`` (see module docstring)."""
    names = list(dict.fromkeys([*dense, *pruned]))
    tasks = {n: compare_task(dense.get(n), pruned.get(n)) for n in names}
    drops: dict[str, list[float]] = {GENERATIVE: [], MULTIPLE_CHOICE: []}
    for row in tasks.values():
        if row.get("rel_change") is not None and row.get("type") in drops:
            drops[row["type"]].append(-row["rel_change"])
    mean = {k: (sum(v) / len(v) if v else None) for k, v in drops.items()}
    gap = None
    if mean[GENERATIVE] is not None and mean[MULTIPLE_CHOICE] is not None:
        gap = mean[GENERATIVE] - mean[MULTIPLE_CHOICE]
    return {
        "tasks": tasks,
        "mc_vs_gen_gap": gap,
        "mean_rel_drop": mean,
        "conventions": ("rel_change=(pruned-dense)/dense; relative drop=-rel_change; "
                        "mc_vs_gen_gap=mean drop(generative)-mean drop(multiple_choice), "
                        ">0: generation hurt more; fidelity at token level, first divergence = "
                        "common-prefix length averaged over diverging docs"),
    }


def _fmt(x: Any, pct: bool = False) -> str:
    f = finite_or_none(x)
    if f is None:
        return "-"
    return f"{f:+.1%}" if pct else f"{f:.3f}"


def format_evals_table(evals: dict) -> str:
    """A small fixed-width console table of :func:`compare_evals`' output."""
    rows = [("task", "type", "metric", "dense", "pruned", "rel", "identical", "1st-div")]
    for name, r in evals.get("tasks", {}).items():
        kind = {GENERATIVE: "gen", MULTIPLE_CHOICE: "mc"}.get(r.get("type"), str(r.get("type")))
        if r.get("skipped"):
            rows.append((name, kind, str(r.get("metric") or "-"), "skipped", "", "", "", ""))
            continue
        fid = r.get("fidelity") or {}
        rows.append((name, kind, str(r.get("metric")), _fmt(r.get("dense")), _fmt(r.get("pruned")),
                     _fmt(r.get("rel_change"), pct=True),
                     _fmt(fid.get("identical_frac")) if fid else "",
                     (f"{fid['mean_first_divergence']:.1f}" if fid.get("mean_first_divergence") is not None
                      else "-") if fid else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gap = evals.get("mc_vs_gen_gap")
    lines.append(f"mc_vs_gen_gap = {_fmt(gap, pct=True)}  (mean relative drop generative - multiple choice; "
                 f">0: generation hurt more)")
    skipped = [f"{n}: {r.get('reason')}" for n, r in evals.get("tasks", {}).items() if r.get("skipped")]
    lines += [f"skipped {s}" for s in skipped]
    return "\n".join(lines)
