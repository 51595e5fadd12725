"""The story of a run in a few numbers: how far the pruned model drifts from the dense one in
each space of the representation hierarchy, h -> z -> p, how decoding accumulates that drift,
what the option subspace of a multiple-choice question sees of it, and what it costs on the
task families.

:func:`story` is pure: it reads ``probes_summary.json`` and ``evals.json`` (as dicts; the keys
are the results contract, :mod:`prunerep.results` and :mod:`prunerep.evals.compare`) and
returns an ordered ``{name: value}`` of headline numbers, the same for the console
(:func:`format_story`), ``summary.json`` and the W&B run summary. A piece the run did not
measure (``probe=none``, ``task=none``, a context or space left out) is simply absent.

Keys (all at the final layer, at the reference temperature: 1, else the closest one):

* ``probes/final_layer``, ``probes/temperature``, ``probes/context`` (where h, z, p are read:
  the prompt context, else teacher_forced, else free_running)
* ``h/one_minus_cos``, ``z/one_minus_cos``, ``p/one_minus_cos``, ``p/kl`` and ``p/kl_est``
  (its estimate Var_p(Δz)/2T²)
* ``kl/teacher_forced``, ``kl/free_running``, ``kl/accumulation`` (free-running / teacher-forced)
* ``tokens/first_divergence`` (mean over prompts; a prompt that never diverges counts its
  length), ``tokens/agreement`` (free-running token agreement), ``tokens/diverged`` (fraction
  of prompts that diverged)
* ``options/top1_agree`` (top-1 on the MC options, at the answer position) and
  ``vocab/top1_agree`` (top-1 over the full vocabulary, mean over prompt positions)
* ``family/<type>/dense``, ``family/<type>/pruned`` (mean scores over the family's tasks that
  have both), ``family/<type>/retained`` (1 − the family's mean relative drop, over tasks with
  a non-zero dense score), for type multiple_choice, generative (then any other)
* ``evals/mc_vs_gen_gap``
"""
from __future__ import annotations

import math
from typing import Any, Optional

from prunerep.results import reference_temperature

CONTEXT_PREFERENCE = ("prompt", "teacher_forced", "free_running")
FAMILY_ORDER = ("multiple_choice", "generative")


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
        _put(out, "p/one_minus_cos", probes.get(f"{context}/probability/one_minus_cos{at}"))
        _put(out, "p/kl", probes.get(f"{context}/probability/kl{at}"))
        _put(out, "p/kl_est", probes.get(f"{context}/probability/kl_est{at}"))

    _put(out, "kl/teacher_forced", probes.get(f"teacher_forced/probability/kl{at}"))
    _put(out, "kl/free_running", probes.get(f"free_running/probability/kl{at}"))
    _put(out, "kl/accumulation", probes.get(f"error_accumulation/kl{at}"))

    _put(out, "tokens/first_divergence", probes.get("free_running/tokens/first_divergence"))
    _put(out, "tokens/agreement", probes.get("free_running/tokens/token_agree"))
    _put(out, "tokens/diverged", probes.get("free_running/tokens/diverged"))

    _put(out, "options/top1_agree", probes.get("prompt/options/top1_agree"))
    if "options/top1_agree" in out:  # the full-vocabulary number to hold it against
        _put(out, "vocab/top1_agree", probes.get("prompt/probability/top1_agree"))

    out.update(_families(evals or {}))
    return out


def _families(evals: dict) -> dict:
    fams: dict[str, dict[str, list[float]]] = {}
    for row in (evals.get("tasks") or {}).values():
        if not isinstance(row, dict) or row.get("skipped") or not row.get("type"):
            continue
        d, p = _num(row.get("dense")), _num(row.get("pruned"))
        if d is None or p is None:
            continue
        f = fams.setdefault(str(row["type"]), {"dense": [], "pruned": [], "ratio": []})
        f["dense"].append(d)
        f["pruned"].append(p)
        rel = _num(row.get("rel_change"))
        if rel is not None:
            f["ratio"].append(1.0 + rel)
    out: dict[str, float] = {}
    order = [k for k in FAMILY_ORDER if k in fams] + sorted(k for k in fams if k not in FAMILY_ORDER)
    for kind in order:
        f = fams[kind]
        out[f"family/{kind}/dense"] = sum(f["dense"]) / len(f["dense"])
        out[f"family/{kind}/pruned"] = sum(f["pruned"]) / len(f["pruned"])
        if f["ratio"]:
            out[f"family/{kind}/retained"] = sum(f["ratio"]) / len(f["ratio"])
    gap = _num(evals.get("mc_vs_gen_gap"))
    if gap is not None:
        out["evals/mc_vs_gen_gap"] = gap
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
    line = f"1-cos  {' -> '.join(chain)}" if chain else ""
    if has("p/kl"):
        line += f"{'   ' if line else ''}KL {sig(s['p/kl'])}"
        if has("p/kl_est"):
            line += f" (estimate Var_p(dz)/2T^2 {sig(s['p/kl_est'])})"
    if line:
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
        line = f"multiple choice: top-1 agreement on the options {sig(s['options/top1_agree'])}"
        if has("vocab/top1_agree"):
            line += f" vs full vocabulary {sig(s['vocab/top1_agree'])}"
        lines.append(f"  {line}")

    fams = list(dict.fromkeys(k.split("/")[1] for k in s if k.startswith("family/")))
    if fams:
        parts = []
        for kind in fams:
            part = f"{kind} {sig(s[f'family/{kind}/dense'])} -> {sig(s[f'family/{kind}/pruned'])}"
            if has(f"family/{kind}/retained"):
                part += f" ({sig(s[f'family/{kind}/retained'])} retained)"
            parts.append(part)
        line = f"scores dense -> pruned: {'; '.join(parts)}"
        if has("evals/mc_vs_gen_gap"):
            line += f"; mc_vs_gen_gap {s['evals/mc_vs_gen_gap']:+.1%}"
        lines.append(f"  {line}")
    return "\n".join(lines) if len(lines) > 1 else ""
