"""The story of a run in a few numbers: how far the pruned model drifts from the dense one in
each space of the representation hierarchy, h -> z -> p, how decoding accumulates that drift,
what the option subspace of a multiple-choice question sees of it, and what it costs on the
task families.

:func:`story` is pure: it reads ``probes_summary.json`` and ``evals.json`` (as dicts; the keys
are the results contract, :mod:`prunerep.results.schema` and :mod:`prunerep.evals.compare`) and
returns an ordered ``{name: value}`` of headline numbers, the same for the console
(:func:`format_story`), ``summary.json`` and the W&B run summary. A piece the run did not
measure (``probe=none``, ``task=none``, a context or space left out) is simply absent.

Keys (all at the final layer, at the reference temperature: 1, else the closest one):

* ``probes/final_layer``, ``probes/temperature``, ``probes/context`` (where h, z, p are read:
  the prompt context, else teacher_forced, else free_running)
* ``h/one_minus_cos``, ``z/one_minus_cos`` (raw logits) and ``z/one_minus_cos_centred`` (logits
  minus their mean over the vocabulary: what the softmax sees), ``p/one_minus_cos``, ``p/kl`` and
  ``p/kl_est`` (its estimate Var_p(Δz)/2T²); ``p/kl_est_ratio_p10``, ``_p50``, ``_p90``: the
  percentiles of the per-row ratio kl_est / KL (where the estimate holds)
* ``kl/teacher_forced``, ``kl/free_running``, ``kl/accumulation`` (free-running / teacher-forced)
* ``tokens/first_divergence`` (mean over prompts; a prompt that never diverges counts its
  length), ``tokens/agreement`` (free-running token agreement), ``tokens/diverged`` (fraction
  of prompts that diverged)
* at the MC answer positions, like for like: ``options/top1_agree`` and ``options/kl`` (the option
  subspace) and ``answer/top1_agree`` and ``answer/kl`` (the full vocabulary, the same rows); and
  ``vocab/top1_agree_all_positions`` (full vocabulary, mean over every prompt position of every
  prompt: not the same rows)
* ``family/<type>/dense``, ``family/<type>/pruned`` (mean scores over the family's tasks that
  have both), ``family/<type>/retained`` (mean of the tasks' ``retained``: pruned / dense,
  perplexity dense / pruned) and ``family/<type>/retained_above_chance`` (mean over the tasks
  not excluded at chance), for retrieval, multiple_choice, generative, perplexity (then any other)
* ``evals/mc_vs_gen_gap``, ``evals/gap_above_chance`` (+ ``_stderr``): see prunerep.evals.compare
* ``bias/<task>/option``, ``bias/<task>/dense``, ``bias/<task>/pruned``: a multiple-choice task
  where a side picks one option at least 80% of the time (the option, each side's share)
"""
from __future__ import annotations

import math
from typing import Any, Optional

from prunerep.results.schema import reference_temperature

CONTEXT_PREFERENCE = ("prompt", "teacher_forced", "free_running")
FAMILY_ORDER = ("retrieval", "multiple_choice", "generative", "perplexity")


def _num(x: Any) -> Optional[float]:
    """A float, or None for a missing / non-numeric value (NaN and inf are kept: they are news)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _temperatures(probes: dict) -> list[float]:
    temps = []
    for key in probes:
        _, sep, t = str(key).partition("@T=")
        if sep:
            try:
                temps.append(float(t))
            except ValueError:
                pass
    return sorted(set(temps))


def _t_label(t: float) -> str:
    return f"@T={t:g}" if t == t else ""


def _put(out: dict, name: str, value: Any) -> None:
    v = _num(value)
    if v is not None:
        out[name] = v


def story(probes_summary: Optional[dict], evals: Optional[dict]) -> dict:
    """The run's headline numbers, in reading order (see the module docstring for the keys)."""
    probes = probes_summary or {}
    out: dict[str, Any] = {}
    t = reference_temperature(_temperatures(probes))
    at = _t_label(t)

    context = next((c for c in CONTEXT_PREFERENCE
                    if any(str(k).startswith(f"{c}/") and "/tokens/" not in str(k) for k in probes)), None)
    if probes:
        if isinstance(probes.get("final_layer"), (int, float)) and not isinstance(probes["final_layer"], bool):
            out["probes/final_layer"] = int(probes["final_layer"])
        if t == t:
            out["probes/temperature"] = t
    if context is not None:
        out["probes/context"] = context
        _put(out, "h/one_minus_cos", probes.get(f"{context}/embedding/one_minus_cos"))
        _put(out, "z/one_minus_cos", probes.get(f"{context}/logit/one_minus_cos"))
        _put(out, "z/one_minus_cos_centred", probes.get(f"{context}/logit/one_minus_cos_centred"))
        _put(out, "p/one_minus_cos", probes.get(f"{context}/probability/one_minus_cos{at}"))
        _put(out, "p/kl", probes.get(f"{context}/probability/kl{at}"))
        _put(out, "p/kl_est", probes.get(f"{context}/probability/kl_est{at}"))
        for q in (10, 50, 90):
            _put(out, f"p/kl_est_ratio_p{q}", probes.get(f"{context}/probability/kl_est_ratio_p{q}{at}"))

    _put(out, "kl/teacher_forced", probes.get(f"teacher_forced/probability/kl{at}"))
    _put(out, "kl/free_running", probes.get(f"free_running/probability/kl{at}"))
    _put(out, "kl/accumulation", probes.get(f"error_accumulation/kl{at}"))

    _put(out, "tokens/first_divergence", probes.get("free_running/tokens/first_divergence"))
    _put(out, "tokens/agreement", probes.get("free_running/tokens/token_agree"))
    _put(out, "tokens/diverged", probes.get("free_running/tokens/diverged"))

    _put(out, "options/top1_agree", probes.get("prompt/options/top1_agree"))
    if "options/top1_agree" in out:  # the full-vocabulary numbers to hold it against
        _put(out, "answer/top1_agree", probes.get("prompt/answer/top1_agree"))
        _put(out, "options/kl", probes.get(f"prompt/options/kl{at}"))
        _put(out, "answer/kl", probes.get(f"prompt/answer/kl{at}"))
        _put(out, "vocab/top1_agree_all_positions", probes.get("prompt/probability/top1_agree"))

    out.update(_families(evals or {}))
    out.update(_option_bias(evals or {}))
    return out


def _families(evals: dict) -> dict:
    fams: dict[str, dict[str, list[float]]] = {}
    for row in (evals.get("tasks") or {}).values():
        if not isinstance(row, dict) or row.get("skipped") or not row.get("type"):
            continue
        d, p = _num(row.get("dense")), _num(row.get("pruned"))
        if d is None or p is None:
            continue
        f = fams.setdefault(str(row["type"]), {"dense": [], "pruned": [], "ratio": [], "above": []})
        f["dense"].append(d)
        f["pruned"].append(p)
        # retained as evals.json states it (perplexity: dense / pruned); older files: 1 + rel_change
        ratio = _num(row.get("retained")) if "retained" in row else _num(row.get("rel_change"))
        if ratio is not None:
            f["ratio"].append(ratio if "retained" in row else 1.0 + ratio)
        if _num(row.get("retained_above_chance")) is not None:
            f["above"].append(_num(row["retained_above_chance"]))
    out: dict[str, float] = {}
    order = [k for k in FAMILY_ORDER if k in fams] + sorted(k for k in fams if k not in FAMILY_ORDER)
    for kind in order:
        f = fams[kind]
        out[f"family/{kind}/dense"] = sum(f["dense"]) / len(f["dense"])
        out[f"family/{kind}/pruned"] = sum(f["pruned"]) / len(f["pruned"])
        if f["ratio"]:
            out[f"family/{kind}/retained"] = sum(f["ratio"]) / len(f["ratio"])
        if f["above"]:
            out[f"family/{kind}/retained_above_chance"] = sum(f["above"]) / len(f["above"])
    gap = _num(evals.get("mc_vs_gen_gap"))
    if gap is not None:
        out["evals/mc_vs_gen_gap"] = gap
    above = evals.get("gap_above_chance") or {}
    if _num(above.get("value")) is not None:
        out["evals/gap_above_chance"] = _num(above["value"])
        _put(out, "evals/gap_above_chance_stderr", above.get("stderr"))
    return out


def _option_bias(evals: dict) -> dict:
    """``bias/<task>/option`` (the option picked), ``bias/<task>/dense`` and ``/pruned`` (how often),
    for each multiple-choice task where a side picks one option >= the threshold of the time
    (evals.json ``option_picks``, :mod:`prunerep.evals.bias`)."""
    out: dict[str, Any] = {}
    for name, row in (evals.get("tasks") or {}).items():
        picks = row.get("option_picks") if isinstance(row, dict) else None
        if not isinstance(picks, dict) or not picks.get("biased"):
            continue
        out[f"bias/{name}/option"] = str(picks[picks["biased"][0]]["top"])
        for side in ("dense", "pruned"):
            if isinstance(picks.get(side), dict):
                _put(out, f"bias/{name}/{side}", picks[side].get("top_frac"))
    return out


# --------------------------------------------------------------------------- console

def sig(x: Any) -> str:
    """3 significant digits, trailing zeros kept (``0.107``, ``4.25``, ``1.00``); "-" for none."""
    v = _num(x)
    if v is None:
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
    """A short console block of :func:`story`; "" when there is nothing to tell. ``label``
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
    return "\n".join(lines) if len(lines) > 1 else ""
