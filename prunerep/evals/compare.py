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

Direction, chance and the four families
---------------------------------------
* Perplexity rows (type ``perplexity``, ``higher_is_better: false``) keep the sign convention
  above: ``abs_change = dense - pruned`` and ``rel_change = (dense - pruned) / dense``, so a
  perplexity that rises is a NEGATIVE change and a positive relative drop, like a score that
  falls; ``pruned_over_dense`` is the plain ratio of the two perplexities.
* ``chance`` per row: multiple choice mean 1/#options (lm-eval's options), generative 0,
  retrieval each metric's expectation under a random ranking, perplexity the vocabulary size
  (a uniform next-token distribution).
* ``retained = pruned / dense`` (perplexity: dense / pruned), 1 = unchanged.
* ``retained_above_chance = (pruned - chance) / (dense - chance)``; for perplexity in log space,
  ``(log V - log ppl_pruned) / (log V - log ppl_dense)`` (the share of the dense model's
  advantage over a uniform guess that is kept). Its stderr is the delta method with the dense
  and pruned stderrs taken as independent (they are scored on the same items, positively
  correlated, so this is conservative). ``excluded_at_chance`` is true where the dense score is
  NOT above chance by more than its stderr: such a task is left out of every above-chance mean
  (a retention ratio near 0/0 is noise) and flagged in the table.
* ``gap_above_chance``: mean retained_above_chance over multiple-choice tasks minus the mean over
  generative tasks (excluded tasks left out), with its stderr. POSITIVE: generation kept less
  (the sign of ``mc_vs_gen_gap``, which stays as it was).
* ``families``: per family (retrieval, multiple_choice, generative, perplexity) its tasks, mean
  ``rel_change``, mean ``retained`` and mean ``retained_above_chance`` (+ stderr, excluded
  tasks). ``headline`` checks the paper's ordering of what pruning keeps: retrieval >=
  multiple_choice >= generative in retained_above_chance (perplexity is reported, not ranked):
  ``holds``, ``beyond_stderr`` (every step by more than its stderr) and ``fails_beyond_stderr``
  (some step reversed by more than its stderr).
  These keys (and ``conventions_families``) are present whenever at least one task is compared.
"""
from __future__ import annotations

import math
from typing import Any

GENERATIVE = "generative"
MULTIPLE_CHOICE = "multiple_choice"
PERPLEXITY = "perplexity"
RETRIEVAL = "retrieval"
FAMILIES = (RETRIEVAL, MULTIPLE_CHOICE, GENERATIVE, PERPLEXITY)
#: the paper's ordering of what pruning keeps (most first), checked on retained_above_chance
HEADLINE_ORDER = (RETRIEVAL, MULTIPLE_CHOICE, GENERATIVE)
FAMILY_CONVENTIONS = (
    "perplexity: lower is better, abs_change=dense-pruned, rel_change=(dense-pruned)/dense (negative: worse); "
    "retained=pruned/dense (perplexity dense/pruned); retained_above_chance=(pruned-chance)/(dense-chance) "
    "(perplexity: log-space vs a uniform guess, chance=vocab size); excluded_at_chance: dense-chance <= "
    "stderr(dense); gap_above_chance=mean retained_above_chance(multiple_choice)-mean(generative), >0: "
    "generation kept less; headline: retrieval >= multiple_choice >= generative in retained_above_chance")


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
    higher = _higher_is_better(ref)
    row.update(
        dense=d, pruned=p,
        abs_change=_abs_change(d, p, higher),
        rel_change=_rel_change(d, p, higher),
        stderr={"dense": finite_or_none(dense.get("stderr")), "pruned": finite_or_none(pruned.get("stderr"))},
        n=pruned.get("n"),
    )
    if not higher:
        row["higher_is_better"] = False
        row["pruned_over_dense"] = None if d is None or p is None or d == 0 else p / d
    chance = finite_or_none(ref.get("chance"))
    if chance is None and row["type"] == GENERATIVE:
        chance = 0.0
    if "chance" in ref or chance is not None:
        row["chance"] = ref.get("chance", chance)
    row.update(_retention(row["type"], d, p, row["stderr"]["dense"], row["stderr"]["pruned"], chance, higher))
    if row["type"] == GENERATIVE:
        row["fidelity"] = generation_fidelity(dense.get("generations") or [], pruned.get("generations") or [])
    if row["type"] == MULTIPLE_CHOICE:
        row.update(_option_bias(dense, pruned, row))
    if ref.get("pairs_with"):
        row["pairs_with"] = ref["pairs_with"]
    if isinstance(dense.get("metrics"), dict) and isinstance(pruned.get("metrics"), dict):
        row["metrics"] = {k: {"dense": finite_or_none(v), "pruned": finite_or_none(pruned["metrics"].get(k)),
                              "rel_change": _rel_change(finite_or_none(v), finite_or_none(pruned["metrics"].get(k)),
                                                        higher and not k.endswith(("perplexity", "bits_per_byte",
                                                                                   "nll_per_token")))}
                          for k, v in dense["metrics"].items() if k != "n_tokens"}
    if row["type"] == RETRIEVAL:
        from prunerep.evals.retrieval import embedding_cosine

        row["metrics_chance"] = ref.get("metrics_chance")
        row["embedding_cosine"] = embedding_cosine(dense.get("embeddings"), pruned.get("embeddings"))
    if ref.get("protocol"):
        row["protocol"] = ref["protocol"]
    return row


def _option_bias(dense: dict, pruned: dict, row: dict) -> dict:
    """``option_picks`` (which option each side picks, the flag, dense-pruned agreement),
    ``option_bias`` (the sides picking one option >= BIAS_THRESHOLD of the time), ``debias`` and
    ``excluded_option_bias``: a dense model flagged on a score that is not debiased answers by
    its preferred option, so its retention says nothing about knowledge; the task is then left
    out of the above-chance means (a debiased score, task.mc_debias=permute, stays in)."""
    from prunerep.evals.bias import compare_picks

    out: dict[str, Any] = {}
    picks = compare_picks(dense.get("option_picks"), pruned.get("option_picks"))
    if picks is None:
        return out
    out["option_picks"] = picks
    out["option_bias"] = picks["biased"]
    debiased = (dense.get("debias") or {}).get("mode") == "permute"
    if dense.get("debias") or pruned.get("debias"):
        out["debias"] = {"mode": "permute" if debiased else "none",
                         **{f"{side}_unpermuted": (e.get("debias") or {}).get("score_unpermuted")
                            for side, e in (("dense", dense), ("pruned", pruned)) if debiased},
                         **({"reason": (dense.get("debias") or {}).get("reason")}
                            if (dense.get("debias") or {}).get("reason") else {})}
    out["excluded_option_bias"] = "dense" in picks["biased"] and not debiased
    return out


def _kept(row: dict) -> bool:
    """Whether a row counts in the above-chance means (not at chance, not a biased dense side)."""
    return row.get("retained_above_chance") is not None and not row.get("excluded_option_bias")


def _higher_is_better(entry: dict) -> bool:
    if "higher_is_better" in entry:
        return bool(entry["higher_is_better"])
    return entry.get("type") != PERPLEXITY


def _abs_change(d: float | None, p: float | None, higher: bool) -> float | None:
    """pruned - dense, or dense - pruned where lower is better: negative when pruning hurts."""
    if d is None or p is None:
        return None
    return p - d if higher else d - p


def _rel_change(d: float | None, p: float | None, higher: bool) -> float | None:
    """(pruned - dense) / dense, or (dense - pruned) / dense where lower is better."""
    if d is None or p is None or d == 0:
        return None
    return (p - d) / d if higher else (d - p) / d


def _retention(ttype, d, p, se_d, se_p, chance, higher) -> dict:
    """retained, retained_above_chance (+ stderr) and excluded_at_chance of one task."""
    out: dict[str, Any] = {"retained": None, "retained_above_chance": None,
                           "retained_above_chance_stderr": None, "excluded_at_chance": None}
    if d is None or p is None:
        return out
    if higher:
        out["retained"] = p / d if d != 0 else None
    else:
        out["retained"] = d / p if p > 0 else None
    if chance is None:
        return out
    if higher:  # (p - c) / (d - c)
        x, y, sx, sy = p - chance, d - chance, se_p, se_d
    else:  # perplexity, log space against a uniform guess: (log c - log p) / (log c - log d)
        if not (d > 0 and p > 0 and chance > 0):
            return out
        x, y = math.log(chance) - math.log(p), math.log(chance) - math.log(d)
        sx = None if se_p is None else se_p / p
        sy = None if se_d is None else se_d / d
    out["excluded_at_chance"] = bool(y <= (sy or 0.0))
    if out["excluded_at_chance"]:
        return out
    r = x / y
    out["retained_above_chance"] = r
    if sx is not None or sy is not None:
        out["retained_above_chance_stderr"] = math.sqrt((sx or 0.0) ** 2 + r ** 2 * (sy or 0.0) ** 2) / abs(y)
    return out


def _mean_with_stderr(rows: list[dict]) -> tuple[float | None, float | None]:
    """Mean retained_above_chance of ``rows`` and its stderr (tasks independent)."""
    vals = [r["retained_above_chance"] for r in rows]
    if not vals:
        return None, None
    ses = [r.get("retained_above_chance_stderr") for r in rows]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(ses)
    return sum(vals) / len(vals), se


def family_summary(tasks: dict[str, dict]) -> dict:
    """``families``, ``gap_above_chance`` and ``headline`` of evals.json (see module docstring)."""
    fams: dict[str, dict] = {}
    for fam in FAMILIES:
        rows = {n: r for n, r in tasks.items() if r.get("type") == fam and not r.get("skipped")
                and r.get("dense") is not None and r.get("pruned") is not None}
        rel = [r["rel_change"] for r in rows.values() if r.get("rel_change") is not None]
        ret = [r["retained"] for r in rows.values() if r.get("retained") is not None]
        kept = [r for r in rows.values() if _kept(r)]
        mean, se = _mean_with_stderr(kept)
        fams[fam] = {
            "tasks": list(rows), "n_tasks": len(rows),
            "rel_change": sum(rel) / len(rel) if rel else None,
            "retained": sum(ret) / len(ret) if ret else None,
            "retained_above_chance": mean, "retained_above_chance_stderr": se,
            "excluded_at_chance": [n for n, r in rows.items() if r.get("excluded_at_chance")],
            **({"excluded_option_bias": [n for n, r in rows.items() if r.get("excluded_option_bias")]}
               if fam == MULTIPLE_CHOICE else {}),
        }
    mc = [r for r in tasks.values() if r.get("type") == MULTIPLE_CHOICE and _kept(r)]
    gen = [r for r in tasks.values() if r.get("type") == GENERATIVE and _kept(r)]
    (m_mc, se_mc), (m_gen, se_gen) = _mean_with_stderr(mc), _mean_with_stderr(gen)
    gap = {"value": None if m_mc is None or m_gen is None else m_mc - m_gen,
           "stderr": None if se_mc is None or se_gen is None or m_mc is None or m_gen is None
           else math.sqrt(se_mc ** 2 + se_gen ** 2),
           "excluded_at_chance": [n for n, r in tasks.items() if r.get("excluded_at_chance")
                                  and r.get("type") in (MULTIPLE_CHOICE, GENERATIVE)],
           "excluded_option_bias": [n for n, r in tasks.items() if r.get("excluded_option_bias")]}
    present = [f for f in HEADLINE_ORDER if fams[f]["retained_above_chance"] is not None]
    steps = []
    for a, b in zip(present, present[1:]):
        ra, rb = fams[a]["retained_above_chance"], fams[b]["retained_above_chance"]
        sa, sb = fams[a]["retained_above_chance_stderr"], fams[b]["retained_above_chance_stderr"]
        se = None if sa is None or sb is None else math.sqrt(sa ** 2 + sb ** 2)
        steps.append({"higher": a, "lower": b, "difference": ra - rb, "stderr": se, "holds": ra >= rb})
    headline = {
        "expected_order": list(HEADLINE_ORDER), "compared": present,
        "retained_above_chance": {f: fams[f]["retained_above_chance"] for f in HEADLINE_ORDER},
        "steps": steps,
        "holds": all(s["holds"] for s in steps) if steps else None,
        "beyond_stderr": all(s["holds"] and s["stderr"] is not None and s["difference"] > s["stderr"]
                             for s in steps) if steps else None,
        # a failing step by more than its stderr: the ordering is contradicted, not just unresolved
        "fails_beyond_stderr": any(not s["holds"] and s["stderr"] is not None and -s["difference"] > s["stderr"]
                                   for s in steps) if steps else None,
    }
    return {"families": fams, "gap_above_chance": gap, "headline": headline}


def compare_evals(dense: dict, pruned: dict) -> dict:
    """evals.json: ``{"tasks": {name: row}, "mc_vs_gen_gap": float|None, "mean_rel_drop":
    {"generative": .., "multiple_choice": ..}, "conventions": str}``, plus ``families``,
    ``gap_above_chance``, ``headline`` and ``conventions_families`` when any task was compared
    (see module docstring)."""
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
    out = {
        "tasks": tasks,
        "mc_vs_gen_gap": gap,
        "mean_rel_drop": mean,
        "conventions": ("rel_change=(pruned-dense)/dense; relative drop=-rel_change; "
                        "mc_vs_gen_gap=mean drop(generative)-mean drop(multiple_choice), "
                        ">0: generation hurt more; fidelity at token level, first divergence = "
                        "common-prefix length averaged over diverging docs"),
    }
    if tasks:
        out.update(family_summary(tasks), conventions_families=FAMILY_CONVENTIONS)
    if pairs := pair_summary(tasks, dense, pruned):
        out["pairs"] = pairs
    return out


def _per_doc_correct(entry: dict | None) -> dict[int, bool]:
    """{doc_id: right?} of one side of a task: the picked option is the gold one (multiple choice,
    rotation 0 / unpermuted documents only), or the per-document metric is 1 (generative)."""
    entry = entry or {}
    out: dict[int, bool] = {}
    docs = (entry.get("option_picks") or {}).get("docs")
    if docs and not entry.get("debias", {}).get("mode") == "permute":
        for _, doc_id, pick, gold in docs:
            if gold is not None:
                out[int(doc_id)] = pick == gold
        return out
    metric = entry.get("metric")
    for g in entry.get("generations") or []:
        if "task" not in g and finite_or_none(g.get(metric)) is not None:
            out[int(g["doc_id"])] = float(g[metric]) == 1.0
    return out


def pair_summary(tasks: dict[str, dict], dense: dict | None = None, pruned: dict | None = None) -> dict:
    """``pairs``: each multiple-choice task scored on the same documents as a generative one
    (``pairs_with``: arith_cloze and arith_mc with arith_gen -- the same questions), side by side:
    each side's relative drop and retained above chance, ``gap_above_chance`` = MC - generative
    (>0: generation kept less) with its stderr, and ``same_docs``: over the documents the dense
    model gets right in BOTH formats, the share the pruned model still gets right in each
    (``kept``), their ``difference`` (MC - generative) and its paired stderr (the per-document
    differences, so it is much tighter than the unpaired gap); ``excluded`` (``at_chance`` /
    ``option_bias``) where the MC side is left out of the above-chance means. Keyed
    ``<mc task>/<generative task>``."""
    dense, pruned = dense or {}, pruned or {}
    out = {}
    for name, r in tasks.items():
        gen_name = r.get("pairs_with")
        g = tasks.get(gen_name) if gen_name else None
        if r.get("type") != MULTIPLE_CHOICE or g is None or g.get("skipped") or r.get("skipped"):
            continue
        ra, rb = r.get("retained_above_chance"), g.get("retained_above_chance")
        sa, sb = r.get("retained_above_chance_stderr"), g.get("retained_above_chance_stderr")
        both = ra is not None and rb is not None and not r.get("excluded_option_bias")
        pair = {
            "multiple_choice": name, "generative": gen_name,
            "rel_change": {"multiple_choice": r.get("rel_change"), "generative": g.get("rel_change")},
            "retained_above_chance": {"multiple_choice": ra, "generative": rb},
            "gap_above_chance": ra - rb if both else None,
            "stderr": math.sqrt(sa ** 2 + sb ** 2) if both and sa is not None and sb is not None else None,
        }
        dm, pm = _per_doc_correct(dense.get(name)), _per_doc_correct(pruned.get(name))
        dg, pg = _per_doc_correct(dense.get(gen_name)), _per_doc_correct(pruned.get(gen_name))
        docs = [i for i in dm if dm[i] and dg.get(i) and i in pm and i in pg]
        if docs:
            diffs = [float(pm[i]) - float(pg[i]) for i in docs]
            n, mean = len(diffs), sum(diffs) / len(diffs)
            pair["same_docs"] = {
                "n": n,
                "kept": {"multiple_choice": sum(pm[i] for i in docs) / n, "generative": sum(pg[i] for i in docs) / n},
                "difference": mean,
                "stderr": math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None,
            }
        if r.get("excluded_at_chance") or r.get("excluded_option_bias"):
            pair["excluded"] = "option_bias" if r.get("excluded_option_bias") else "at_chance"
        out[f"{name}/{gen_name}"] = pair
    return out


def _fmt(x: Any, pct: bool = False) -> str:
    f = finite_or_none(x)
    if f is None:
        return "-"
    return f"{f:+.1%}" if pct else f"{f:.3f}"


def _top_picks(picks: dict) -> str:
    """``A 1.00 / A 0.97``: each side's most picked option and how often (``!`` when flagged)."""
    parts = []
    for side in ("dense", "pruned"):
        p = picks.get(side)
        if p:
            parts.append(f"{p['top']} {p['top_frac']:.2f}" + ("!" if p.get("biased") else ""))
    return " / ".join(parts) if parts else ""


def format_evals_table(evals: dict) -> str:
    """A small fixed-width console table of :func:`compare_evals`' output."""
    picks_col = any(r.get("option_picks") for r in evals.get("tasks", {}).values())
    rows = [("task", "type", "metric", "dense", "pruned", "rel", "kept>chance", "identical", "1st-div")
            + (("top pick d/p",) if picks_col else ())]
    flagged, biased = False, []
    for name, r in evals.get("tasks", {}).items():
        kind = {GENERATIVE: "gen", MULTIPLE_CHOICE: "mc", PERPLEXITY: "ppl", RETRIEVAL: "ret"}.get(
            r.get("type"), str(r.get("type")))
        metric = str(r.get("metric") or "-") + (" (lower better)" if r.get("higher_is_better") is False else "")
        if r.get("skipped"):
            rows.append((name, kind, metric, "skipped", "", "", "", "", "") + (("",) if picks_col else ()))
            continue
        if r.get("debias", {}).get("mode") == "permute":
            metric += " (permuted)"
        fid = r.get("fidelity") or {}
        picks = r.get("option_picks") or {}
        if picks.get("biased"):
            biased.append((name, picks))
        if r.get("excluded_at_chance"):
            kept, flagged = "at chance*", True
        elif r.get("excluded_option_bias"):
            kept = "biased!"
        elif r.get("retained_above_chance") is not None:
            se = r.get("retained_above_chance_stderr")
            kept = f"{r['retained_above_chance']:.2f}" + (f"+-{se:.2f}" if se is not None else "")
        else:
            kept = "-"
        rows.append((name, kind, metric, _fmt(r.get("dense")), _fmt(r.get("pruned")),
                     _fmt(r.get("rel_change"), pct=True), kept,
                     _fmt(fid.get("identical_frac")) if fid else "",
                     (f"{fid['mean_first_divergence']:.1f}" if fid.get("mean_first_divergence") is not None
                      else "-") if fid else "")
                    + ((_top_picks(picks),) if picks_col else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if flagged:
        lines.append("* at chance: dense not above chance by more than its stderr; left out of the "
                     "above-chance means and gap")
    for name, picks in biased:
        sides = ", ".join(f"{side} picks {picks[side]['top']} in {round(picks[side]['top_frac'] * picks[side]['n'])}"
                          f"/{picks[side]['n']}" for side in picks["biased"])
        row = evals["tasks"][name]
        if (row.get("debias") or {}).get("mode") == "permute":
            note = "; the score is debiased: the mean over the options' rotations"
        elif row.get("excluded_option_bias"):
            note = "; left out of the above-chance means; task.mc_debias=permute debiases it"
        else:
            note = ""
        lines.append(f"! option bias {name}: {sides} (>= {picks['threshold']:.0%}: agreement is bias, "
                     f"not knowledge{note})")
    for key, pr in (evals.get("pairs") or {}).items():
        same = pr.get("same_docs")
        if same and not pr.get("excluded"):
            se = same.get("stderr")
            lines.append(f"same questions {key}: of the {same['n']} the dense model gets right both ways, the pruned "
                         f"one keeps {same['kept']['multiple_choice']:.0%} as multiple choice vs "
                         f"{same['kept']['generative']:.0%} generated (difference {same['difference']:+.2f}"
                         + (f" +- {se:.2f}" if se is not None else "") + ")")
    gap = evals.get("mc_vs_gen_gap")
    lines.append(f"mc_vs_gen_gap = {_fmt(gap, pct=True)}  (mean relative drop generative - multiple choice; "
                 f">0: generation hurt more)")
    gac = evals.get("gap_above_chance") or {}
    if gac:
        se = gac.get("stderr")
        lines.append(f"gap above chance = {_fmt(gac.get('value'))}" + (f" +- {se:.3f}" if se is not None else "")
                     + "  (mean kept-above-chance multiple choice - generative; >0: generation kept less)")
    fams = evals.get("families") or {}
    if fams:
        parts = []
        for fam, f in fams.items():
            if not f.get("n_tasks"):
                continue
            se = f.get("retained_above_chance_stderr")
            kept = _fmt(f.get("retained_above_chance")) + (f"+-{se:.3f}" if se is not None else "")
            parts.append(f"{fam} {kept} (rel {_fmt(f.get('rel_change'), pct=True)})")
        if parts:
            lines.append("families, kept above chance: " + "; ".join(parts))
    head = evals.get("headline") or {}
    if head.get("holds") is not None:
        if head["holds"]:
            verdict = "holds beyond stderr" if head.get("beyond_stderr") else "holds (within stderr)"
        else:
            verdict = "FAILS beyond stderr" if head.get("fails_beyond_stderr") else "FAILS (within stderr)"
        lines.append(f"headline order {' >= '.join(head.get('compared') or [])}: {verdict}")
    skipped = [f"{n}: {r.get('reason')}" for n, r in evals.get("tasks", {}).items() if r.get("skipped")]
    lines += [f"skipped {s}" for s in skipped]
    return "\n".join(lines)
