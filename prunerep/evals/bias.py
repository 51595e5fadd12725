"""Option bias in multiple choice: which option each model picks, and a debiased score.

A small model can answer multiple-choice questions by preferring one option whatever the
question: SmolLM2-135M-Instruct answers " A" to every ``mmlu_dev`` question, dense and pruned
alike, so their scores agree without either knowing anything. Two tools:

* :func:`option_picks` -- from lm-eval's per-sample log-likelihoods, the option each document's
  score picks (the argmax of the log-likelihoods for ``acc``, of the log-likelihoods over the
  options' character lengths for ``acc_norm``, as lm-eval computes them), counted per option
  position. ``top_frac >= BIAS_THRESHOLD`` flags the model as biased (``biased: true``).
* ``task.mc_debias=permute`` -- for a LETTERED task (the options listed under fixed labels
  A, B, C, D and the label scored), :func:`rotations` makes one copy of the documents per cyclic
  rotation of the options: the contents move, the letters stay, the gold letter follows its
  content. lm-eval scores the copies as the subtasks of a group, and the group's accuracy is
  the mean over the k rotations of the accuracy. Every question then has its right answer once
  under each letter, so a model that always picks the same letter scores exactly 1/k.
  (A cloze task -- the options are the answer texts, no list in the prompt -- does not show the
  order to the model: nothing to debias there.)

Picks are counted by position (option 1..k of the document), labelled with the option texts
when every document has the same options (the letters of a lettered task), else ``#1``..``#k``.
"""
from __future__ import annotations

import math
from collections import Counter

from prunerep.results.schema import OptionPicks, SidePicks

#: a model that picks one option this often (or more) is flagged as biased
BIAS_THRESHOLD = 0.8
DEBIAS_MODES = ("none", "permute")
#: suffix of the generated subtask of rotation r (``mmlu_dev`` -> ``mmlu_dev_rot1``)
ROTATION_SUFFIX = "_rot"


def rotation_task(name: str, r: int) -> str:
    return f"{name}{ROTATION_SUFFIX}{r}"


def is_rotation(leaf: str, name: str) -> bool:
    """Whether lm-eval task ``leaf`` is a rotation subtask of ``name`` (``<name>_rot<r>``)."""
    head, sep, r = leaf.rpartition(ROTATION_SUFFIX)
    return bool(sep) and head == name and r.isdigit()


def rotate(rows: list[dict], r: int, choices_key: str = "choices", answer_key: str = "answer") -> list[dict]:
    """``rows`` with their options rotated cyclically by ``r``: under label j the content
    ``choices[(j + r) % k]``, the gold index ``(answer - r) % k``; each row gets ``rotation``.
    Rotation 0 is the rows as they are."""
    out = []
    for row in rows:
        c = list(row[choices_key])
        k = len(c)
        s = r % k
        out.append({**row, choices_key: c[s:] + c[:s], answer_key: (int(row[answer_key]) - s) % k, "rotation": r})
    return out


def rotations(rows: list[dict], choices_key: str = "choices", answer_key: str = "answer") -> list[list[dict]]:
    """The k cyclic rotations of the options of ``rows`` (k: their number of options, the same
    in every row), :func:`rotate` 0 .. k-1: every document has its right answer once under each
    label."""
    ks = {len(r[choices_key]) for r in rows}
    if len(ks) != 1:
        raise ValueError(f"option permutation needs the same number of options in every document, got {sorted(ks)}")
    return [rotate(rows, r, choices_key, answer_key) for r in range(ks.pop())]


def option_scores(sample: dict) -> tuple[list[float], list[str]] | None:
    """(log-likelihood per option, option continuation) of one lm-eval multiple-choice sample."""
    resps = sample.get("filtered_resps")
    args = sample.get("arguments") or []
    if not resps:
        return None
    lls = []
    for r in resps:
        v = r[0] if isinstance(r, (list, tuple)) else r
        try:
            lls.append(float(v))
        except (TypeError, ValueError):
            return None
    conts = [str(a[1]) if isinstance(a, (list, tuple)) and len(a) > 1 else "" for a in args]
    if len(conts) != len(lls):
        conts = [""] * len(lls)
    # acc_mutual_info appends the unconditional ("", continuation) requests: keep the conditional half
    half = len(lls) // 2
    if len(lls) % 2 == 0 and half and all(isinstance(a, (list, tuple)) and a[0] == "" for a in args[half:]):
        lls, conts = lls[:half], conts[:half]
    return lls, conts


def pick_of(lls: list[float], conts: list[str], metric: str) -> int:
    """lm-eval's prediction: argmax of the log-likelihoods (acc), or of log-likelihood / character
    length of the option without the target delimiter (acc_norm); the first one on a tie."""
    if metric == "acc_norm":
        lens = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in conts]
        scores = [ll / n for ll, n in zip(lls, lens)]
    else:
        scores = lls
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def option_picks(samples: list[tuple[str, dict]], metric: str) -> dict | None:
    """How often each option position was picked over ``samples`` ([(task, lm-eval sample)]).

    ``{"metric", "labels", "counts", "n", "top", "top_frac", "biased", "threshold", "docs"}``;
    ``docs``: per document ``[task, doc_id, picked position, gold position]`` (for the dense vs
    pruned agreement). None when the samples carry no option scores."""
    picks, conts_seen, k = [], [], 0
    for task, s in samples:
        got = option_scores(s)
        if got is None:
            return None
        lls, conts = got
        p = pick_of(lls, conts, metric)
        gold = s.get("target")
        picks.append([task, int(s["doc_id"]), p, int(gold) if isinstance(gold, int) else None])
        conts_seen.append(tuple(c.strip() for c in conts))
        k = max(k, len(lls))
    if not picks:
        return None
    counts = Counter(p[2] for p in picks)
    same = len(set(conts_seen)) == 1 and all(conts_seen[0])
    labels = list(conts_seen[0]) if same else [f"#{i + 1}" for i in range(k)]
    top = max(range(k), key=lambda i: (counts.get(i, 0), -i))
    top_frac = counts.get(top, 0) / len(picks)
    return {"metric": metric, "labels": labels, "counts": [counts.get(i, 0) for i in range(k)], "n": len(picks),
            "top": labels[top], "top_frac": top_frac, "biased": top_frac >= BIAS_THRESHOLD,
            "threshold": BIAS_THRESHOLD, "docs": sorted(picks, key=lambda p: (p[0], p[1]))}


def compare_picks(dense: dict | None, pruned: dict | None) -> OptionPicks | None:
    """The ``option_picks`` block of an evals.json row from each side's :func:`option_picks`: both
    sides' counts, top option and flag, and how often the pruned model picks what the dense one
    picked (``agreement``)."""
    if not dense and not pruned:
        return None
    sides = [SidePicks(**{k: p[k] for k in ("counts", "n", "top", "top_frac", "biased")}) if p else None
             for p in (dense, pruned)]
    agreement = None
    if dense and pruned:
        d = {(t, i): p for t, i, p, _ in dense["docs"]}
        both = [(d[(t, i)], p) for t, i, p, _ in pruned["docs"] if (t, i) in d]
        agreement = sum(a == b for a, b in both) / len(both) if both else None
    return OptionPicks((dense or pruned)["labels"], BIAS_THRESHOLD, *sides, agreement)


def debiased_score(samples: list[tuple[str, dict]], metric: str) -> dict:
    """Score of a rotation group: the mean over every (rotation, document) of ``metric`` -- equal
    to the mean over rotations of each rotation's accuracy -- with the stderr over documents of
    their mean over rotations (the rotations of a document are not independent), the accuracy
    per rotation and that of rotation 0 (the documents as given)."""
    per_doc: dict[int, list[float]] = {}
    per_rot: dict[str, list[float]] = {}
    for task, s in samples:
        v = float(s.get(metric, float("nan")))
        per_doc.setdefault(int(s["doc_id"]), []).append(v)
        per_rot.setdefault(task, []).append(v)
    means = [sum(v) / len(v) for v in per_doc.values()]
    n = len(means)
    score = sum(sum(v) for v in per_doc.values()) / sum(len(v) for v in per_doc.values())
    se = math.sqrt(sum((m - score) ** 2 for m in means) / (n - 1) / n) if n > 1 else None
    rots = sorted(per_rot, key=lambda t: int(t.rsplit(ROTATION_SUFFIX, 1)[-1]))
    acc = [sum(per_rot[t]) / len(per_rot[t]) for t in rots]
    return {"score": score, "stderr": se, "n": n, "n_permutations": len(rots), "per_rotation": acc,
            "score_unpermuted": acc[0] if acc else None}
