"""The story's claims, each with a bootstrap interval and a verdict (:mod:`prunerep.results.bootstrap`).

The paper's argument, claim by claim, on this run's own units: the probe prompts (the probe table,
one unit per ``prompt_id``) and the evaluated items (per-item outcomes of the dense and the pruned
entries, :func:`prunerep.evals.compare.item_scores`). Every number is read at the final layer, in
the story's context (the prompt context, else teacher-forced, else free-running) and at the
reference temperature, from per-prompt means (positions and steps averaged within a prompt, so
every prompt weighs the same, as in probes_summary.json).

========================================  ==============================================  ===========
claim                                     statistic                                       holds when
========================================  ==============================================  ===========
``a_h_z_below_p``                         min(1−cos p − 1−cos h, 1−cos p − 1−cos z_c)     > 0
                                          (z_c: the centred logits, what the softmax sees)
``b_kl_estimate``                         mean Var_p(Δz)/2T² / mean KL                    in [1/2, 2]
``c_accumulation``                        mean free-running KL / mean teacher-forced KL   > 1
                                          (generative prompts)
``d_options_stable``                      top-1 agreement options − full vocabulary,      > 0
                                          the same answer rows (multiple-choice prompts)
``e_retrieval_kept``                      retrieval retained above chance (queries)       > 0.9
``order_<a>_<b>``                         family <a> − family <b> in retained above       > 0
                                          chance (items; the paper's order)
``pair_<mc>_<gen>``                       retained above chance, the multiple-choice      > 0
                                          task − the generative one on the same questions
========================================  ==============================================  ===========

The units resampled: prompts for a-d; for e, the order and the pairs, the evaluated items, each
task on its own (a stratum), a multiple-choice task and the generative one over the same questions
resampled together (the question is the unit), and items cut from one document (word_cloze's
pydoc topics: the item requests' ``source``) drawn together (the document is the unit). A claim
whose units are missing is left out. Claims a and d are also measured on the evaluated items
(items.parquet, at each item's answer position): ``a_h_z_below_p_items``, ``d_options_stable_items``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import pandas as pd

from prunerep.evals.compare import item_scores
from prunerep.evals.retrieval import unpack_embeddings
from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL
from prunerep.results import bootstrap as bs
from prunerep.results.schema import EvalsReport, reference_temperature

CONTEXT_PREFERENCE = ("prompt", "teacher_forced", "free_running")
#: b: "KL ≈ its estimate" within a factor of 2
ESTIMATE_BAND = (0.5, 2.0)
#: e: "retrieval is kept": at least this share of the dense model's advantage over a random ranking
RETRIEVAL_KEPT = 0.9
#: a "large" full-vocabulary KL at a multiple-choice answer position (nats)
KL_LARGE = 0.5
#: the paper's order of what pruning keeps, most first
ORDER = (RETRIEVAL, MULTIPLE_CHOICE, GENERATIVE)

#: what each claim says (console, report), and the bounds of :func:`prunerep.results.bootstrap.verdict`
STATEMENTS = {
    "a_h_z_below_p": "(a) h and z move less than p (1-cos p - max(h, z centred))",
    "b_kl_estimate": "(b) KL ~ its estimate Var_p(dz)/2T^2 (ratio within 1/2..2)",
    "c_accumulation": "(c) free-running KL exceeds teacher-forced (ratio > 1)",
    "d_options_stable": "(d) option subspace more stable than the full vocabulary (top-1 agreement difference)",
    "e_retrieval_kept": f"(e) retrieval kept (retained above chance > {RETRIEVAL_KEPT:g})",
    "mc/kept_large_kl": f"multiple-choice answers kept where the full-vocabulary KL >= {KL_LARGE:g}",
}


#: the suffix of a claim measured on the evaluated items (items.parquet) instead of the probe prompts
ON_ITEMS = "_items"


def bounds(name: str) -> tuple[Optional[float], Optional[float]]:
    """(above, below): the claim holds when its statistic lies above ``above`` and below ``below``
    (an AUROC is held against chance, 1/2)."""
    if name.startswith("auroc/"):
        return 0.5, None
    base = name[: -len(ON_ITEMS)] if name.endswith(ON_ITEMS) else name
    return {"b_kl_estimate": ESTIMATE_BAND, "c_accumulation": (1.0, None),
            "e_retrieval_kept": (RETRIEVAL_KEPT, None)}.get(base, (0.0, None))


def statement(name: str) -> str:
    """What claim ``name`` says, in words."""
    if name in STATEMENTS:
        return STATEMENTS[name]
    if name.endswith(ON_ITEMS) and name[: -len(ON_ITEMS)] in STATEMENTS:
        return STATEMENTS[name[: -len(ON_ITEMS)]] + ", on the evaluated items at their answer position"
    kind, _, rest = name.partition("_")
    if kind == "order":
        a, b = next((a, b) for a, b in zip(ORDER, ORDER[1:]) if rest == f"{a}_{b}")
        return f"family order: {a} keeps more than {b} (retained above chance, difference)"
    if name.startswith("auroc/"):
        _, family, measure = name.split("/")
        return f"AUROC of {measure} for 'the pruned model loses a dense-right {family} item'"
    if kind == "pair":
        return f"the same questions ({rest}): multiple choice keeps more than generation (retained above chance)"
    return name


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    interval: bs.Interval
    verdict: str
    unit: str  # what was resampled: prompts, items, queries

    def to_json(self) -> dict:
        return {"statement": self.statement, **self.interval.to_json(), "unit": self.unit, "verdict": self.verdict}


def _claim(name: str, iv: bs.Interval, unit: str) -> Claim:
    above, below = bounds(name)
    return Claim(name, statement(name), iv, bs.verdict(iv, above=above, below=below), unit)


# --------------------------------------------------------------------------- the probe prompts

def _final(table: pd.DataFrame) -> pd.DataFrame:
    final = int(table["layer"].max())
    df = table[(table["layer"] == final) & (table["sublayer"] == "block")]
    t = reference_temperature(df["temperature"].dropna().unique())
    return df if t != t else df[df["temperature"].isna() | (df["temperature"] == t)]


def per_prompt(df: pd.DataFrame, context: str, space: str, metric: str) -> pd.Series:
    """The mean over a prompt's rows (positions, steps) of one context/space/metric, per prompt_id."""
    sel = df[(df["context"] == context) & (df["space"] == space) & (df["metric"] == metric)]
    return sel.groupby("prompt_id", sort=True)["value"].mean()


def _paired(*series: pd.Series) -> list[np.ndarray]:
    """The values of the prompts every series has, all finite, aligned."""
    joined = pd.concat(series, axis=1, join="inner").replace([np.inf, -np.inf], np.nan).dropna()
    return [joined.iloc[:, i].to_numpy() for i in range(joined.shape[1])]


def probe_claims(table: Optional[pd.DataFrame], n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED) -> dict:
    """Claims a-d from the probe table (prompts resampled)."""
    if table is None or table.empty:
        return {}
    df = _final(table)
    out: dict[str, Claim] = {}
    context = next((c for c in CONTEXT_PREFERENCE
                    if ((df["context"] == c) & df["space"].isin(("embedding", "logit", "probability"))).any()), None)
    kw = dict(n_resamples=n_resamples, seed=seed)
    if context is not None:
        h, z, p = _paired(per_prompt(df, context, "embedding", "one_minus_cos"),
                          per_prompt(df, context, "logit", "one_minus_cos_centred"),
                          per_prompt(df, context, "probability", "one_minus_cos"))
        if len(p):
            def a(w):
                s = w.sum(axis=1)
                return np.minimum(w @ (p - h), w @ (p - z)) / s
            out["a_h_z_below_p"] = _claim("a_h_z_below_p", bs.bootstrap(a, len(p), **kw),
                                          "prompts")
        est, kl = _paired(per_prompt(df, context, "probability", "kl_est"),
                          per_prompt(df, context, "probability", "kl"))
        if len(kl):
            out["b_kl_estimate"] = _claim("b_kl_estimate", bs.bootstrap(bs.ratio_of_means(est, kl), len(kl), **kw),
                                          "prompts")
    fr, tf = _paired(per_prompt(df, "free_running", "probability", "kl"),
                     per_prompt(df, "teacher_forced", "probability", "kl"))
    if len(tf):
        c = _claim("c_accumulation", bs.bootstrap(bs.ratio_of_means(fr, tf), len(tf), **kw), "prompts")
        if not _any_diverged(df):  # same contexts both ways: the ratio is float noise around 1, not a finding
            c = replace(c, verdict=f"{bs.NOT_MEASURED}: no free-running trajectory diverged")
        out["c_accumulation"] = c
    opt, ans = _paired(per_prompt(df, "prompt", "options", "top1_agree"),
                       per_prompt(df, "prompt", "answer", "top1_agree"))
    if len(opt):
        out["d_options_stable"] = _claim("d_options_stable", bs.bootstrap(bs.mean_difference(opt, ans), len(opt), **kw),
                                         "prompts")
    return out


def _any_diverged(df: pd.DataFrame) -> bool:
    d = df[(df["context"] == "free_running") & (df["space"] == "tokens") & (df["metric"] == "diverged")]
    return bool((d["value"] > 0).any())


def free_running_split(table: Optional[pd.DataFrame]) -> dict:
    """The free-running KL at the final layer split at each trajectory's first divergence: the
    steps before it (the two models at the same context: these equal the teacher-forced steps) and
    the steps from it on (each model at its own context). ``{"matched": .., "after_divergence": ..}``,
    means over the prompts that have such steps (per-prompt means first)."""
    if table is None or table.empty:
        return {}
    df = _final(table)
    fr = df[(df["context"] == "free_running") & (df["space"] == "probability") & (df["metric"] == "kl")
            & (df["step"] >= 0)]
    first = df[(df["context"] == "free_running") & (df["space"] == "tokens") & (df["metric"] == "first_divergence")]
    if fr.empty or first.empty:
        return {}
    at = first.groupby("prompt_id")["value"].first()
    fr = fr[fr["prompt_id"].isin(at.index)]
    before = fr["step"].to_numpy() < at.reindex(fr["prompt_id"]).to_numpy()
    out = {}
    for name, part in (("matched", fr[before]), ("after_divergence", fr[~before])):
        if not part.empty:
            out[name] = float(part.groupby("prompt_id")["value"].mean().mean())
    return out


# --------------------------------------------------------------------------- the evaluated items

@dataclass(frozen=True)
class _Task:
    name: str
    family: str
    chance: float
    dense: np.ndarray
    pruned: np.ndarray
    docs: list  # the unit of each item: the question (shared with a paired task) within its stratum
    stratum: str


def _tasks(evals: EvalsReport, dense: dict, pruned: dict) -> list[_Task]:
    """The tasks counted in the above-chance means (evals.json's families less the excluded), with
    per-item outcomes on both sides."""
    out = []
    for fam in ORDER:
        f = (evals.families or {}).get(fam)
        if f is None:
            continue
        skip = set(f.excluded_at_chance) | set(f.excluded_option_bias or ())
        for name in f.tasks:
            row = evals.tasks[name]
            if name in skip or row.chance is None or row.retained_above_chance is None:
                continue
            d, p = item_scores(dense.get(name)), item_scores(pruned.get(name))
            docs = [k for k in d if k in p]
            if len(docs) < 2:
                continue
            root = row.pairs_with if row.pairs_with and row.pairs_with in evals.tasks else name
            src = sources(dense.get(name))
            units = [f"{root}:source:{src[k]}" if k in src else f"{root}:{k}" for k in docs]
            out.append(_Task(name, fam, float(row.chance), np.array([d[k] for k in docs], dtype=float),
                             np.array([p[k] for k in docs], dtype=float), units, root))
    return out


def sources(entry: Optional[dict]) -> dict:
    """{item: the document it was cut from} where the entry's item requests name one (word_cloze:
    many items per pydoc topic), keyed as :func:`prunerep.evals.compare.item_scores` keys items."""
    recs = (entry or {}).get("items") or []
    several = len({r["task"] for r in recs}) > 1
    return {(f"{r['task']}:{r['doc_id']}" if several else int(r["doc_id"])): r["source"]
            for r in recs if r.get("source") is not None}


def _interval(tasks: list[_Task], statistic, n_resamples: int, seed: int) -> bs.Interval:
    """The interval of ``statistic(w, cols)`` over the items of ``tasks`` laid side by side (``cols``:
    each task's column slice), each stratum resampled on its own, questions shared by paired tasks
    drawn together."""
    cols, groups, strata, start = {}, [], [], 0
    for t in tasks:
        cols[t.name] = slice(start, start + len(t.docs))
        groups += t.docs
        strata += [t.stratum] * len(t.docs)
        start += len(t.docs)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample with dense at chance: left out
        return bs.bootstrap(lambda w: statistic(w, cols), len(groups), groups=groups, strata=strata,
                            n_resamples=n_resamples, seed=seed)


def _retained(t: _Task, w: np.ndarray) -> np.ndarray:
    """(mean pruned − chance) / (mean dense − chance) per resample."""
    s = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ t.pruned / s - t.chance) / (w @ t.dense / s - t.chance)


def item_claims(evals: Optional[EvalsReport], dense: Optional[dict], pruned: Optional[dict],
                n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED) -> dict:
    """Claim e, the family order and the same-question pairs, from the per-item outcomes; each
    claim resamples the items of the tasks it compares."""
    if evals is None or not evals.tasks or not dense or not pruned:
        return {}
    tasks = _tasks(evals, dense, pruned)
    by_family: dict[str, list[_Task]] = {}
    for t in tasks:
        by_family.setdefault(t.family, []).append(t)

    def family_mean(fam: str, w: np.ndarray, cols: dict) -> np.ndarray:
        return np.mean([_retained(t, w[:, cols[t.name]]) for t in by_family[fam]], axis=0)

    out: dict[str, Claim] = {}
    if RETRIEVAL in by_family:
        iv = _interval(by_family[RETRIEVAL], lambda w, cols: family_mean(RETRIEVAL, w, cols), n_resamples, seed)
        out["e_retrieval_kept"] = _claim("e_retrieval_kept", iv, "queries")
    present = [f for f in ORDER if f in by_family]
    for a, b in zip(present, present[1:]):
        iv = _interval(by_family[a] + by_family[b],
                       lambda w, cols, a=a, b=b: family_mean(a, w, cols) - family_mean(b, w, cols), n_resamples, seed)
        out[f"order_{a}_{b}"] = _claim(f"order_{a}_{b}", iv, "items")
    named = {t.name: t for t in tasks}
    for t in tasks:
        g = named.get(evals.tasks[t.name].pairs_with or "")
        if t.family != MULTIPLE_CHOICE or g is None:
            continue
        def gap(w, cols, t=t, g=g):
            return _retained(t, w[:, cols[t.name]]) - _retained(g, w[:, cols[g.name]])
        iv = _interval([t, g], gap, n_resamples, seed)
        out[f"pair_{t.name}_{g.name}"] = _claim(f"pair_{t.name}_{g.name}", iv, "questions")
    return out


def retrieval_drift(dense: Optional[dict], pruned: Optional[dict], n_resamples: int = bs.N_RESAMPLES,
                    seed: int = bs.SEED) -> Optional[bs.Interval]:
    """1 − cos between the dense and the pruned embedding of each retrieval text (queries and
    passages, the first task that has both), with its interval over the texts: h at the place
    retrieval reads it."""
    for name, d in (dense or {}).items():
        p = (pruned or {}).get(name) or {}
        if d.get("type") != RETRIEVAL or not d.get("embeddings") or not p.get("embeddings"):
            continue
        if d["embeddings"].get("texts") != p["embeddings"].get("texts"):
            continue
        a, b = unpack_embeddings(d["embeddings"]).numpy(), unpack_embeddings(p["embeddings"]).numpy()
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return bs.bootstrap(bs.mean(1.0 - cos), len(cos), n_resamples=n_resamples, seed=seed)
    return None


# --------------------------------------------------------------------------- which space predicts which failure

#: per family, the items.parquet measures whose AUROC for "the pruned model loses this item" is
#: reported, ``{name: (column, sign)}``: sign -1 where a smaller value means more damage
AUROC_MEASURES = {
    MULTIPLE_CHOICE: {"h": ("h_one_minus_cos", 1), "z": ("z_one_minus_cos_centred", 1),
                      "p_vocab": ("answer_kl", 1), "p_options": ("options_kl", 1)},
    GENERATIVE: {"teacher_forced_kl": ("teacher_forced_kl", 1), "first_divergence": ("first_divergence", -1),
                 "prompt_kl": ("answer_kl", 1)},
}
def item_aurocs(items: Optional[pd.DataFrame], n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED) -> dict:
    """``{"auroc/<family>/<measure>": (Interval, n_lost)}``: among the items the dense model gets
    right (score 1) that have the measure, the AUROC of the measure for the label "the pruned
    model does not" (items resampled within each task). Absent where no item, or every item, is
    lost: there is nothing to rank."""
    out: dict = {}
    if items is None or items.empty:
        return out
    for family, measures in AUROC_MEASURES.items():
        right = items[(items["family"] == family) & (items["dense_score"] == 1.0)]
        for name, (col, sign) in measures.items():
            if col not in right:
                continue
            sel = right[np.isfinite(right[col].to_numpy(dtype=float))]
            lost = sel["lost"].to_numpy(dtype=bool)
            if not 0 < lost.sum() < len(lost):
                continue
            iv = bs.bootstrap(bs.auroc(sign * sel[col].to_numpy(dtype=float), lost), len(sel),
                              strata=sel["task"].tolist(), n_resamples=n_resamples, seed=seed)
            out[f"auroc/{family}/{name}"] = (iv, int(lost.sum()))
    return out


def kept_with_large_kl(items: Optional[pd.DataFrame], n_resamples: int = bs.N_RESAMPLES,
                       seed: int = bs.SEED) -> Optional[bs.Interval]:
    """Among the multiple-choice items whose full-vocabulary KL at the answer position is at least
    :data:`KL_LARGE`, the share whose answer is kept (the pruned model picks the option the dense
    one picked): the paper's mechanism, counted. None without such items."""
    if items is None or items.empty:
        return None
    mc = items[(items["family"] == MULTIPLE_CHOICE) & (items["answer_kl"] >= KL_LARGE)
               & np.isfinite(items["options_top1_agree"].to_numpy(dtype=float))]
    if mc.empty:
        return None
    return bs.bootstrap(bs.mean(mc["options_top1_agree"].to_numpy(dtype=float)), len(mc),
                        strata=mc["task"].tolist(), n_resamples=n_resamples, seed=seed)


def items_probe_claims(items: Optional[pd.DataFrame], n_resamples: int = bs.N_RESAMPLES,
                       seed: int = bs.SEED) -> dict:
    """Claims a and d on the evaluated items (items.parquet), at each item's answer position:
    ``a_h_z_below_p_items`` (every probed item: 1−cos of p there against h and the centred z) and
    ``d_options_stable_items`` (multiple-choice items: the option distribution's top-1 agreement
    against the full vocabulary's); items resampled within each task."""
    out: dict[str, Claim] = {}
    if items is None or items.empty:
        return out
    kw = dict(n_resamples=n_resamples, seed=seed)
    cols = ["answer_one_minus_cos", "h_one_minus_cos", "z_one_minus_cos_centred"]
    sel = items.dropna(subset=cols)
    if len(sel):
        p, h, z = (sel[c].to_numpy(dtype=float) for c in cols)

        def a(w):
            return np.minimum(w @ (p - h), w @ (p - z)) / w.sum(axis=1)
        out["a_h_z_below_p" + ON_ITEMS] = _claim("a_h_z_below_p" + ON_ITEMS,
                                                 bs.bootstrap(a, len(sel), strata=sel["task"].tolist(), **kw), "items")
    mc = items[items["family"] == MULTIPLE_CHOICE].dropna(subset=["options_top1_agree", "answer_top1_agree"])
    if len(mc):
        iv = bs.bootstrap(bs.mean_difference(mc["options_top1_agree"], mc["answer_top1_agree"]), len(mc),
                          strata=mc["task"].tolist(), **kw)
        out["d_options_stable" + ON_ITEMS] = _claim("d_options_stable" + ON_ITEMS, iv, "items")
    return out


def claims(table: Optional[pd.DataFrame], evals: Optional[EvalsReport] = None, dense: Optional[dict] = None,
           pruned: Optional[dict] = None, n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED,
           items: Optional[pd.DataFrame] = None) -> dict:
    """Every claim the run's units allow, in reading order: ``{name: Claim}`` (``items``:
    items.parquet, for claims a and d on the evaluated items too)."""
    out = probe_claims(table, n_resamples, seed)
    out.update(items_probe_claims(items, n_resamples, seed))
    items = item_claims(evals, dense, pruned, n_resamples, seed)
    order = ["a_h_z_below_p", "a_h_z_below_p_items", "b_kl_estimate", "c_accumulation", "d_options_stable",
             "d_options_stable_items", "e_retrieval_kept"]
    merged = {**out, **items}
    return {k: merged[k] for k in [*order, *(k for k in merged if k not in order)] if k in merged}


def story_fields(found: dict, table: Optional[pd.DataFrame] = None, dense: Optional[dict] = None,
                 pruned: Optional[dict] = None, items: Optional[pd.DataFrame] = None,
                 n_resamples: int = bs.N_RESAMPLES, seed: int = bs.SEED) -> dict:
    """The claims as the story's flat keys: ``claim/<name>`` (the statistic), ``claim/<name>/lo``,
    ``/hi``, ``/n``, ``/unit``, ``/verdict``, and ``claims/n_resamples``, ``claims/level``; the free-running KL
    split (``kl/free_running_matched``, ``kl/free_running_after_divergence``) and the retrieval
    embeddings' drift (``retrieval/embedding_one_minus_cos`` with ``/lo``, ``/hi``); from items.parquet
    the AUROCs ``auroc/<family>/<measure>`` (+ ``/lo``, ``/hi``, ``/n``: dense-right items, ``/n_lost``)
    and ``mc/kept_large_kl`` (+ ``/lo``, ``/hi``, ``/n``)."""
    out: dict[str, Any] = {}
    for name, c in found.items():
        iv = c.interval
        out[f"claim/{name}"] = iv.value
        out[f"claim/{name}/lo"] = iv.lo
        out[f"claim/{name}/hi"] = iv.hi
        out[f"claim/{name}/n"] = iv.n
        out[f"claim/{name}/unit"] = c.unit
        out[f"claim/{name}/verdict"] = c.verdict
    if found:
        first = next(iter(found.values())).interval
        out["claims/n_resamples"] = first.n_resamples
        out["claims/level"] = first.level
    for k, v in free_running_split(table).items():
        if math.isfinite(v):
            out[f"kl/free_running_{k}"] = v
    for key, (iv, n_lost) in item_aurocs(items, n_resamples, seed).items():
        out.update({key: iv.value, f"{key}/lo": iv.lo, f"{key}/hi": iv.hi, f"{key}/n": iv.n, f"{key}/n_lost": n_lost})
    kept = kept_with_large_kl(items, n_resamples, seed)
    if kept is not None:
        out.update({"mc/kept_large_kl": kept.value, "mc/kept_large_kl/lo": kept.lo, "mc/kept_large_kl/hi": kept.hi,
                    "mc/kept_large_kl/n": kept.n})
    drift = retrieval_drift(dense, pruned, n_resamples, seed)
    if drift is not None and math.isfinite(drift.value):
        out.update({"retrieval/embedding_one_minus_cos": drift.value, "retrieval/embedding_one_minus_cos/lo": drift.lo,
                    "retrieval/embedding_one_minus_cos/hi": drift.hi})
    return out
