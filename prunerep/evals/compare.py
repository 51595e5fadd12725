"""Dense vs pruned: the statistics of ``evals.json`` (typed in :mod:`prunerep.results.schema`).

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

from prunerep.evals.bias import compare_picks
from prunerep.evals.retrieval import embedding_cosine
from prunerep.evals.taskspec import FAMILIES, GENERATIVE, MULTIPLE_CHOICE, PERPLEXITY, RETRIEVAL
from prunerep.results.schema import (Debias, DensePruned, EvalsReport, Family, Fidelity, GapAboveChance, Headline,
                                     HeadlineStep, MetricChange, Pair, RetrievalChange, SameDocs, TaskRow)

#: the paper's ordering of what pruning keeps (most first), checked on retained_above_chance
HEADLINE_ORDER = (RETRIEVAL, MULTIPLE_CHOICE, GENERATIVE)
#: the families of mc_vs_gen_gap
GAP_FAMILIES = (GENERATIVE, MULTIPLE_CHOICE)


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


def generation_fidelity(dense_gens: list[dict], pruned_gens: list[dict]) -> Fidelity:
    """Token-level agreement of the pruned generations with the dense ones (same docs)."""
    def key(r):
        return (r.get("task", ""), int(r["doc_id"]))

    def toks(r):
        return list(r["tokens"]) if r.get("tokens") is not None else list(r.get("text", ""))

    dense = {key(r): r for r in dense_gens}
    pairs = [(dense[key(r)], r) for r in pruned_gens if key(r) in dense]
    if not pairs:
        return Fidelity(0, None, None)
    identical, diverge = 0, []
    for d, p in pairs:
        td, tp = toks(d), toks(p)
        if td == tp:
            identical += 1
        else:
            diverge.append(common_prefix_len(td, tp))
    return Fidelity(len(pairs), identical / len(pairs), sum(diverge) / len(diverge) if diverge else None)


def compare_task(dense: dict | None, pruned: dict | None) -> TaskRow:
    """One task's row of evals.json, from its dense and its pruned entry (prunerep.evals.evaluate_model)."""
    dense, pruned = dense or {}, pruned or {}
    ref = dense or pruned
    ttype, metric = ref.get("type"), ref.get("metric")
    skipped = [r.get("reason") for r in (dense, pruned) if r.get("skipped")]
    missing = [w for w, r in (("dense", dense), ("pruned", pruned)) if not r]
    if skipped or missing:
        return TaskRow(ttype, metric, skipped=True, reason=skipped[0] if skipped else f"no {missing[0]} result")
    d, p = finite_or_none(dense.get("score")), finite_or_none(pruned.get("score"))
    higher = _higher_is_better(ref)
    stderr = DensePruned(finite_or_none(dense.get("stderr")), finite_or_none(pruned.get("stderr")))
    chance = finite_or_none(ref.get("chance"))
    if chance is None and ttype == GENERATIVE:
        chance = 0.0  # exact match / pass@k of a random guess
    metrics = None
    if isinstance(dense.get("metrics"), dict) and isinstance(pruned.get("metrics"), dict):
        metrics = {k: MetricChange(finite_or_none(v), finite_or_none(pruned["metrics"].get(k)),
                                   _rel_change(finite_or_none(v), finite_or_none(pruned["metrics"].get(k)),
                                               higher and not k.endswith(("perplexity", "bits_per_byte",
                                                                          "nll_per_token"))))
                   for k, v in dense["metrics"].items() if k != "n_tokens"}
    retrieval = None
    if ttype == RETRIEVAL:
        retrieval = RetrievalChange(ref.get("metrics_chance"),
                                    embedding_cosine(dense.get("embeddings"), pruned.get("embeddings")))
    return TaskRow(
        ttype, metric, dense=d, pruned=p, abs_change=_abs_change(d, p, higher), rel_change=_rel_change(d, p, higher),
        stderr=stderr, n=pruned.get("n"), higher_is_better=higher,
        pruned_over_dense=None if d is None or p is None or d == 0 else p / d,
        chance=ref.get("chance", chance),
        **_retention(d, p, stderr.dense, stderr.pruned, chance, higher),
        fidelity=generation_fidelity(dense.get("generations") or [], pruned.get("generations") or [])
        if ttype == GENERATIVE else None,
        **(_option_bias(dense, pruned) if ttype == MULTIPLE_CHOICE else {}),
        pairs_with=ref.get("pairs_with"), metrics=metrics, retrieval=retrieval, protocol=ref.get("protocol"))


def _option_bias(dense: dict, pruned: dict) -> dict:
    """``option_picks`` (which option each side picks, the flag, dense-pruned agreement), ``debias``
    and ``excluded_option_bias``: a dense model flagged on a score that is not debiased answers by
    its preferred option, so its retention says nothing about knowledge; the task is then left
    out of the above-chance means (a debiased score, task.mc_debias=permute, stays in)."""
    picks = compare_picks(dense.get("option_picks"), pruned.get("option_picks"))
    if picks is None:
        return {}
    d_deb, p_deb = dense.get("debias") or {}, pruned.get("debias") or {}
    debiased = d_deb.get("mode") == "permute"
    debias = None
    if d_deb or p_deb:
        debias = Debias("permute" if debiased else "none", d_deb.get("score_unpermuted"),
                        p_deb.get("score_unpermuted"), d_deb.get("reason") or None)
    return {"option_picks": picks, "debias": debias, "excluded_option_bias": "dense" in picks.biased and not debiased}


def _kept(row: TaskRow) -> bool:
    """Whether a row counts in the above-chance means (not at chance, not a biased dense side)."""
    return row.retained_above_chance is not None and not row.excluded_option_bias


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


def _retention(d, p, se_d, se_p, chance, higher) -> dict:
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


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_with_stderr(rows: list[TaskRow]) -> tuple[float | None, float | None]:
    """Mean retained_above_chance of ``rows`` and its stderr (tasks independent)."""
    if not rows:
        return None, None
    ses = [r.retained_above_chance_stderr for r in rows]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(ses)
    return _mean([r.retained_above_chance for r in rows]), se


def family_summary(tasks: dict[str, TaskRow]) -> tuple[dict[str, Family], GapAboveChance, Headline]:
    """``families``, ``gap_above_chance`` and ``headline`` of evals.json (see module docstring)."""
    fams: dict[str, Family] = {}
    for fam in FAMILIES:
        rows = {n: r for n, r in tasks.items() if r.type == fam and not r.skipped
                and r.dense is not None and r.pruned is not None}
        mean, se = _mean_with_stderr([r for r in rows.values() if _kept(r)])
        fams[fam] = Family(
            list(rows), _mean([r.rel_change for r in rows.values() if r.rel_change is not None]),
            _mean([r.retained for r in rows.values() if r.retained is not None]), mean, se,
            [n for n, r in rows.items() if r.excluded_at_chance],
            [n for n, r in rows.items() if r.excluded_option_bias] if fam == MULTIPLE_CHOICE else None)
    (m_mc, se_mc), (m_gen, se_gen) = (_mean_with_stderr([r for r in tasks.values() if r.type == fam and _kept(r)])
                                      for fam in (MULTIPLE_CHOICE, GENERATIVE))
    gap = GapAboveChance(
        None if m_mc is None or m_gen is None else m_mc - m_gen,
        None if se_mc is None or se_gen is None or m_mc is None or m_gen is None else math.sqrt(se_mc ** 2 + se_gen ** 2),
        [n for n, r in tasks.items() if r.excluded_at_chance and r.type in (MULTIPLE_CHOICE, GENERATIVE)],
        [n for n, r in tasks.items() if r.excluded_option_bias])
    present = [f for f in HEADLINE_ORDER if fams[f].retained_above_chance is not None]
    steps = []
    for a, b in zip(present, present[1:]):
        ra, rb = fams[a].retained_above_chance, fams[b].retained_above_chance
        sa, sb = fams[a].retained_above_chance_stderr, fams[b].retained_above_chance_stderr
        se = None if sa is None or sb is None else math.sqrt(sa ** 2 + sb ** 2)
        steps.append(HeadlineStep(a, b, ra - rb, se, ra >= rb))
    headline = Headline(
        list(HEADLINE_ORDER), present, {f: fams[f].retained_above_chance for f in HEADLINE_ORDER}, steps,
        holds=all(s.holds for s in steps) if steps else None,
        beyond_stderr=all(s.holds and s.stderr is not None and s.difference > s.stderr for s in steps)
        if steps else None,
        # a failing step by more than its stderr: the ordering is contradicted, not just unresolved
        fails_beyond_stderr=any(not s.holds and s.stderr is not None and -s.difference > s.stderr for s in steps)
        if steps else None)
    return fams, gap, headline


def compare_evals(dense: dict, pruned: dict) -> EvalsReport:
    """evals.json from the dense and the pruned entries of :func:`prunerep.evals.evaluate_model`
    (see module docstring)."""
    names = list(dict.fromkeys([*dense, *pruned]))
    tasks = {n: compare_task(dense.get(n), pruned.get(n)) for n in names}
    mean = {fam: _mean([-r.rel_change for r in tasks.values() if r.type == fam and r.rel_change is not None])
            for fam in GAP_FAMILIES}
    gap = None
    if mean[GENERATIVE] is not None and mean[MULTIPLE_CHOICE] is not None:
        gap = mean[GENERATIVE] - mean[MULTIPLE_CHOICE]
    summary = family_summary(tasks) if tasks else (None, None, None)
    return EvalsReport(tasks, gap, mean, *summary, pairs=pair_summary(tasks, dense, pruned))


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


def item_scores(entry: dict | None) -> dict:
    """{item: score} of one side of a task, the items the task's score averages: multiple choice
    1.0 / 0.0 (the picked option is the gold one; rotation 0 only, so nothing under
    task.mc_debias=permute), generative the per-document metric, retrieval the per-query headline
    metric. Items are doc ids (``<task>:<doc id>`` for the tasks of a group), retrieval queries
    their index. {} when the entry carries no per-item outcome."""
    entry = entry or {}
    if entry.get("type") == MULTIPLE_CHOICE:
        docs = (entry.get("option_picks") or {}).get("docs") or []
        if (entry.get("debias") or {}).get("mode") == "permute":
            return {}
        several = len({t for t, *_ in docs}) > 1
        return {f"{t}:{i}" if several else int(i): float(pick == gold) for t, i, pick, gold in docs if gold is not None}
    if entry.get("type") == RETRIEVAL:
        values = (entry.get("per_query") or {}).get(entry.get("metric")) or []
        return {i: float(v) for i, v in enumerate(values)}
    metric = entry.get("metric")
    out = {}
    for g in entry.get("generations") or []:
        v = finite_or_none(g.get(metric))
        if v is not None:
            out[f"{g['task']}:{g['doc_id']}" if "task" in g else int(g["doc_id"])] = v
    return out


def pair_summary(tasks: dict[str, TaskRow], dense: dict | None = None, pruned: dict | None = None) -> dict[str, Pair]:
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
        gen_name = r.pairs_with
        g = tasks.get(gen_name) if gen_name else None
        if r.type != MULTIPLE_CHOICE or g is None or g.skipped or r.skipped:
            continue
        ra, rb = r.retained_above_chance, g.retained_above_chance
        sa, sb = r.retained_above_chance_stderr, g.retained_above_chance_stderr
        both = ra is not None and rb is not None and not r.excluded_option_bias
        same = None
        dm, pm = _per_doc_correct(dense.get(name)), _per_doc_correct(pruned.get(name))
        dg, pg = _per_doc_correct(dense.get(gen_name)), _per_doc_correct(pruned.get(gen_name))
        docs = [i for i in dm if dm[i] and dg.get(i) and i in pm and i in pg]
        if docs:
            diffs = [float(pm[i]) - float(pg[i]) for i in docs]
            n, mean = len(diffs), sum(diffs) / len(diffs)
            same = SameDocs(n, {MULTIPLE_CHOICE: sum(pm[i] for i in docs) / n, GENERATIVE: sum(pg[i] for i in docs) / n},
                            mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None)
        excluded = None
        if r.excluded_at_chance or r.excluded_option_bias:
            excluded = "option_bias" if r.excluded_option_bias else "at_chance"
        out[f"{name}/{gen_name}"] = Pair(
            name, gen_name, {MULTIPLE_CHOICE: r.rel_change, GENERATIVE: g.rel_change},
            {MULTIPLE_CHOICE: ra, GENERATIVE: rb}, ra - rb if both else None,
            math.sqrt(sa ** 2 + sb ** 2) if both and sa is not None and sb is not None else None, same, excluded)
    return out
