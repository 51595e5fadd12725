"""What a run prints: the evals table (evals.json, :class:`prunerep.results.schema.EvalsReport`)
and the story block (:func:`prunerep.results.story.story`). Formatting only: every number comes
computed from :mod:`prunerep.evals.compare` and :mod:`prunerep.results.story`."""
from __future__ import annotations

import math
from typing import Any, Optional

from prunerep.evals.taskspec import GENERATIVE, MULTIPLE_CHOICE, PERPLEXITY, RETRIEVAL
from prunerep.results.claims import KL_LARGE, statement
from prunerep.results.schema import EvalsReport, OptionPicks

_KIND = {GENERATIVE: "gen", MULTIPLE_CHOICE: "mc", PERPLEXITY: "ppl", RETRIEVAL: "ret"}


# --------------------------------------------------------------------------- the evals table

def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.1%}" if pct else f"{x:.3f}"


def _top_picks(picks: OptionPicks) -> str:
    """``A 1.00 / A 0.97``: each side's most picked option and how often (``!`` when flagged)."""
    return " / ".join(f"{p.top} {p.top_frac:.2f}" + ("!" if p.biased else "") for p in picks.sides.values())


def format_evals_table(evals: EvalsReport) -> str:
    """A small fixed-width console table of evals.json."""
    picks_col = any(r.option_picks for r in evals.tasks.values())
    rows = [("task", "type", "metric", "dense", "pruned", "rel", "kept>chance", "identical", "1st-div")
            + (("top pick d/p",) if picks_col else ())]
    flagged = False
    for name, r in evals.tasks.items():
        kind = _KIND.get(r.type, str(r.type))
        metric = str(r.metric or "-") + (" (lower better)" if not r.higher_is_better else "")
        if r.skipped:
            rows.append((name, kind, metric, "skipped", "", "", "", "", "") + (("",) if picks_col else ()))
            continue
        if r.debias and r.debias.mode == "permute":
            metric += " (permuted)"
        fid = r.fidelity
        if r.excluded_at_chance:
            kept, flagged = "at chance*", True
        elif r.excluded_option_bias:
            kept = "biased!"
        elif r.retained_above_chance is not None:
            se = r.retained_above_chance_stderr
            kept = f"{r.retained_above_chance:.2f}" + (f"+-{se:.2f}" if se is not None else "")
        else:
            kept = "-"
        first_div = "" if fid is None else "-" if fid.mean_first_divergence is None else f"{fid.mean_first_divergence:.1f}"
        rows.append((name, kind, metric, _fmt(r.dense), _fmt(r.pruned), _fmt(r.rel_change, pct=True), kept,
                     "" if fid is None else _fmt(fid.identical_frac), first_div)
                    + ((_top_picks(r.option_picks) if r.option_picks else "",) if picks_col else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if flagged:
        lines.append("* at chance: dense not above chance by more than its stderr; left out of the "
                     "above-chance means and gap")
    for name, r in evals.tasks.items():
        picks = r.option_picks
        if r.skipped or picks is None or not picks.biased:
            continue
        sides = ", ".join(f"{side} picks {picks.sides[side].top} in "
                          f"{round(picks.sides[side].top_frac * picks.sides[side].n)}/{picks.sides[side].n}"
                          for side in picks.biased)
        if r.debias and r.debias.mode == "permute":
            note = "; the score is debiased: the mean over the options' rotations"
        elif r.excluded_option_bias:
            note = "; left out of the above-chance means; task.mc_debias=permute debiases it"
        else:
            note = ""
        lines.append(f"! option bias {name}: {sides} (>= {picks.threshold:.0%}: agreement is bias, "
                     f"not knowledge{note})")
    for key, pr in (evals.pairs or {}).items():
        same = pr.same_docs
        if same and not pr.excluded:
            lines.append(f"same questions {key}: of the {same.n} the dense model gets right both ways, the pruned "
                         f"one keeps {same.kept[MULTIPLE_CHOICE]:.0%} as multiple choice vs "
                         f"{same.kept[GENERATIVE]:.0%} generated (difference {same.difference:+.2f}"
                         + (f" +- {same.stderr:.2f}" if same.stderr is not None else "") + ")")
    lines.append(f"mc_vs_gen_gap = {_fmt(evals.mc_vs_gen_gap, pct=True)}  (mean relative drop generative - "
                 f"multiple choice; >0: generation hurt more)")
    gac = evals.gap_above_chance
    if gac:
        lines.append(f"gap above chance = {_fmt(gac.value)}" + (f" +- {gac.stderr:.3f}" if gac.stderr is not None else "")
                     + "  (mean kept-above-chance multiple choice - generative; >0: generation kept less)")
    parts = []
    for fam, f in (evals.families or {}).items():
        if f.tasks:
            se = f.retained_above_chance_stderr
            parts.append(f"{fam} {_fmt(f.retained_above_chance)}" + (f"+-{se:.3f}" if se is not None else "")
                         + f" (rel {_fmt(f.rel_change, pct=True)})")
    if parts:
        lines.append("families, kept above chance: " + "; ".join(parts))
    head = evals.headline
    if head and head.holds is not None:
        if head.holds:
            verdict = "holds beyond stderr" if head.beyond_stderr else "holds (within stderr)"
        else:
            verdict = "FAILS beyond stderr" if head.fails_beyond_stderr else "FAILS (within stderr)"
        lines.append(f"headline order {' >= '.join(head.compared)}: {verdict}")
    lines += [f"skipped {n}: {r.reason}" for n, r in evals.tasks.items() if r.skipped]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the story

def sig(x: Any) -> str:
    """3 significant digits, trailing zeros kept (``0.107``, ``4.25``, ``1.00``); "-" for none."""
    if x is None or isinstance(x, bool):
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:#.3g}".rstrip(".")


def _steps(x: float) -> str:
    """A step count: an integer as such, a mean over prompts to 3 significant digits."""
    return str(int(x)) if float(x).is_integer() else sig(x)


def format_story(s: dict, label: Optional[str] = None) -> str:
    """A short console block of :func:`prunerep.results.story.story`; "" when there is nothing to tell. ``label``
    (say ``"wanda 0.5"``) goes in the heading."""
    if not s:
        return ""
    has = s.__contains__
    lines = []
    where = []
    if has("probes/final_layer"):
        where.append(f"final layer {int(s['probes/final_layer'])}")
    if has("probes/temperature"):
        where.append(f"T={s['probes/temperature']:g}")
    if has("probes/context") and s["probes/context"] != "prompt":
        where.append(f"{str(s['probes/context']).replace('_', '-')} context")
    if label:
        where.append(str(label))
    heading = "representation hierarchy" if any(k.startswith(("h/", "z/", "p/", "kl/", "tokens/", "options/"))
                                                 for k in s) else "summary"
    lines.append(f"{heading} ({', '.join(where)}):" if where else f"{heading}:")

    chain = [f"{name} {sig(s[key])}" for name, key in (("h", "h/one_minus_cos"), ("z", "z/one_minus_cos"),
                                                      ("p", "p/one_minus_cos")) if has(key)]
    if has("z/one_minus_cos_centred") and has("z/one_minus_cos"):
        i = 1 if has("h/one_minus_cos") else 0
        chain[i] += f" (centred {sig(s['z/one_minus_cos_centred'])})"
    line = f"1-cos  {' -> '.join(chain)}" if chain else ""
    if has("p/kl"):
        line += f"{'   ' if line else ''}KL {sig(s['p/kl'])}"
        if has("p/kl_est"):
            line += f" (estimate Var_p(dz)/2T^2 {sig(s['p/kl_est'])})"
    if line:
        lines.append(f"  {line}")
    if has("p/kl_est_ratio_p50"):
        line = f"estimate / exact KL per row: median {sig(s['p/kl_est_ratio_p50'])}"
        if has("p/kl_est_ratio_p10") and has("p/kl_est_ratio_p90"):
            line += f" (10-90%: {sig(s['p/kl_est_ratio_p10'])} to {sig(s['p/kl_est_ratio_p90'])})"
        lines.append(f"  {line}")

    if has("kl/teacher_forced") or has("kl/free_running"):
        parts = [f"{name} {sig(s[key])}" for name, key in (("teacher-forced", "kl/teacher_forced"),
                                                           ("free-running", "kl/free_running")) if has(key)]
        line = f"decoding: KL {' -> '.join(parts)}"
        if has("kl/accumulation"):
            line += f" (x{sig(s['kl/accumulation'])} accumulated)"
        split = [f"{what} {sig(s[key])}" for what, key in (("before the first divergence", "kl/free_running_matched"),
                 ("after it", "kl/free_running_after_divergence")) if has(key)]
        if split:
            line += f"; free-running {', '.join(split)}"
        lines.append(f"  {line}")

    if has("tokens/first_divergence") or has("tokens/agreement"):
        parts = []
        if has("tokens/first_divergence"):
            if has("tokens/diverged") and s["tokens/diverged"] == 0:
                parts.append(f"no divergence in {_steps(s['tokens/first_divergence'])} steps")
            else:
                first = f"first divergence at step {_steps(s['tokens/first_divergence'])}"
                if has("tokens/diverged"):
                    first += f" ({s['tokens/diverged']:.0%} of prompts diverged)"
                parts.append(first)
        if has("tokens/agreement"):
            parts.append(f"token agreement {sig(s['tokens/agreement'])}")
        lines.append(f"  free-running tokens: {', '.join(parts)}")

    if has("options/top1_agree"):
        line = f"multiple choice, answer position: top-1 agreement options {sig(s['options/top1_agree'])}"
        if has("answer/top1_agree"):
            line += f" vs full vocabulary {sig(s['answer/top1_agree'])}"
        if has("vocab/top1_agree_all_positions"):
            line += f" (every position {sig(s['vocab/top1_agree_all_positions'])})"
        if has("options/kl") and has("answer/kl"):
            line += f"; KL options {sig(s['options/kl'])} vs full vocabulary {sig(s['answer/kl'])}"
        lines.append(f"  {line}")

    fams = list(dict.fromkeys(k.split("/")[1] for k in s if k.startswith("family/")))
    if fams:
        parts = []
        for kind in fams:
            part = f"{kind} {sig(s[f'family/{kind}/dense'])} -> {sig(s[f'family/{kind}/pruned'])}"
            kept = [f"{sig(s[k])} {what}" for k, what in ((f"family/{kind}/retained", "retained"),
                    (f"family/{kind}/retained_above_chance", "above chance")) if has(k)]
            if kept:
                part += f" ({', '.join(kept)})"
            parts.append(part)
        lines.append(f"  scores dense -> pruned: {'; '.join(parts)}")
        gaps = []
        if has("evals/mc_vs_gen_gap"):
            gaps.append(f"mc_vs_gen_gap {s['evals/mc_vs_gen_gap']:+.1%}")
        if has("evals/gap_above_chance"):
            g = f"gap above chance {s['evals/gap_above_chance']:+.2f}"
            if has("evals/gap_above_chance_stderr"):
                g += f" ± {s['evals/gap_above_chance_stderr']:.2f}"
            gaps.append(g + " (>0: generation kept less)")
        if gaps:
            lines.append(f"  {'; '.join(gaps)}")
    for task in dict.fromkeys(k.split("/")[1] for k in s if k.startswith("bias/")):
        fracs = [f"{s[f'bias/{task}/{side}']:.0%} {side}" for side in ("dense", "pruned") if has(f"bias/{task}/{side}")]
        lines.append(f"  option bias: {task} picks {s[f'bias/{task}/option']} ({', '.join(fracs)}): "
                     f"its dense-pruned agreement is bias, not knowledge")
    if has("retrieval/embedding_one_minus_cos"):
        lines.append(f"  retrieval embeddings: 1-cos to dense {_with_interval(s, 'retrieval/embedding_one_minus_cos')}")
    lines += format_claims(s)
    lines += format_aurocs(s)
    return "\n".join(lines) if len(lines) > 1 else ""


def format_aurocs(s: dict) -> list[str]:
    """Which space predicts which failure: per family the AUROC of each measure for "the pruned
    model loses a dense-right item", and the multiple-choice answers kept under a large KL."""
    lines = []
    keys = [k for k in s if k.startswith("auroc/") and k.count("/") == 2]
    for family in dict.fromkeys(k.split("/")[1] for k in keys):
        mine = [k for k in keys if k.split("/")[1] == family]
        first = mine[0]
        n = f" ({int(s[first + '/n_lost'])} of {int(s[first + '/n'])} dense-right items lost)" \
            if first + "/n_lost" in s and first + "/n" in s else ""
        counts = {k: (s.get(k + "/n_lost"), s.get(k + "/n")) for k in mine}
        parts = [f"{k.split('/')[2]} {_with_interval(s, k)}"  # items without the measure are not ranked
                 + (f" ({int(counts[k][0])} of {int(counts[k][1])})" if counts[k] != counts[first] else "")
                 for k in mine]
        lines.append(f"  AUROC for a lost {family.replace('_', ' ')} item{n}: {'; '.join(parts)}")
    if "mc/kept_large_kl" in s:
        n = f" of {int(s['mc/kept_large_kl/n'])}" if "mc/kept_large_kl/n" in s else ""
        lines.append(f"  multiple-choice items with full-vocabulary KL >= {KL_LARGE:g} whose answer is kept: "
                     f"{_with_interval(s, 'mc/kept_large_kl')}{n}")
    return lines


def _with_interval(s: dict, key: str) -> str:
    """``0.123 [0.100, 0.150]``: a number and, where the story has them, its bounds."""
    text = sig(s[key])
    if f"{key}/lo" in s and f"{key}/hi" in s:
        text += f" [{sig(s[f'{key}/lo'])}, {sig(s[f'{key}/hi'])}]"
    return text


def format_claims(s: dict) -> list[str]:
    """The claims block of the story: each claim's statistic, interval, units and verdict."""
    names = [k.split("/", 1)[1] for k in s if k.startswith("claim/") and k.count("/") == 1]
    if not names:
        return []
    head = "  claims"
    if "claims/level" in s and "claims/n_resamples" in s:
        head += f" ({s['claims/level']:.0%} bootstrap intervals, {int(s['claims/n_resamples'])} resamples)"
    lines = [head + ":"]
    for name in names:
        key = f"claim/{name}"
        n = f", n = {int(s[key + '/n'])} {s.get(key + '/unit', '')}".rstrip() if key + "/n" in s else ""
        lines.append(f"    {statement(name)}: {_with_interval(s, key)}{n}: {s.get(key + '/verdict', '-')}")
    return lines
