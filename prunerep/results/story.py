"""The story of a run in a few numbers: how far the pruned model drifts from the dense one in
each space of the representation hierarchy, h -> z -> p, how decoding accumulates that drift,
what the option subspace of a multiple-choice question sees of it, and what it costs on the
task families.

:func:`story` is pure: it reads ``probes_summary.json`` and ``evals.json`` (as dicts; the keys
are the results contract, :mod:`prunerep.results.schema` and :mod:`prunerep.evals.compare`) and
returns an ordered ``{name: value}`` of headline numbers, the same for the console
(:func:`prunerep.viz.console.format_story`), ``summary.json`` and the W&B run summary. A piece the run did not
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
* ``family/<family>/dense``, ``family/<family>/pruned`` (mean scores over the family's tasks, as
  evals.json lists them), ``family/<family>/retained`` and ``family/<family>/retained_above_chance``
  (evals.json's family means), for each family with a task, in evals.json's order
* ``evals/mc_vs_gen_gap``, ``evals/gap_above_chance`` (+ ``_stderr``): see prunerep.evals.compare
* ``bias/<task>/option``, ``bias/<task>/dense``, ``bias/<task>/pruned``: a multiple-choice task
  where a side picks one option at least 80% of the time (the option, each side's share)
* ``claim/<name>`` with ``/lo``, ``/hi``, ``/n``, ``/unit``, ``/verdict``, ``claims/n_resamples``,
  ``claims/level``, ``kl/free_running_matched``, ``kl/free_running_after_divergence`` and
  ``retrieval/embedding_one_minus_cos`` (+ ``/lo``, ``/hi``): the claims with their bootstrap intervals,
  :func:`prunerep.results.claims.story_fields`, passed in as ``claims``
"""
from __future__ import annotations

from typing import Any, Optional

from prunerep.results.schema import EvalsReport, reference_temperature

CONTEXT_PREFERENCE = ("prompt", "teacher_forced", "free_running")


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


def story(probes_summary: Optional[dict], evals: Optional[EvalsReport], claims: Optional[dict] = None) -> dict:
    """The run's headline numbers, in reading order (see the module docstring for the keys);
    ``claims``: :func:`prunerep.results.claims.story_fields`, appended as they are."""
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

    if evals is not None:
        out.update(_families(evals))
        out.update(_option_bias(evals))
    out.update(claims or {})
    return out


def _families(evals: EvalsReport) -> dict:
    out: dict[str, float] = {}
    for fam, f in (evals.families or {}).items():
        if not f.tasks:
            continue
        rows = [evals.tasks[n] for n in f.tasks]
        out[f"family/{fam}/dense"] = sum(r.dense for r in rows) / len(rows)
        out[f"family/{fam}/pruned"] = sum(r.pruned for r in rows) / len(rows)
        _put(out, f"family/{fam}/retained", f.retained)
        _put(out, f"family/{fam}/retained_above_chance", f.retained_above_chance)
    _put(out, "evals/mc_vs_gen_gap", evals.mc_vs_gen_gap)
    if evals.gap_above_chance is not None and evals.gap_above_chance.value is not None:
        out["evals/gap_above_chance"] = evals.gap_above_chance.value
        _put(out, "evals/gap_above_chance_stderr", evals.gap_above_chance.stderr)
    return out


def _option_bias(evals: EvalsReport) -> dict:
    """``bias/<task>/option`` (the option picked), ``bias/<task>/dense`` and ``/pruned`` (how often),
    for each multiple-choice task where a side picks one option >= the threshold of the time
    (evals.json ``option_picks``, :mod:`prunerep.evals.bias`)."""
    out: dict[str, Any] = {}
    for name, row in evals.tasks.items():
        picks = row.option_picks
        if picks is None or not picks.biased:
            continue
        out[f"bias/{name}/option"] = str(picks.sides[picks.biased[0]].top)
        for side, p in picks.sides.items():
            _put(out, f"bias/{name}/{side}", p.top_frac)
    return out
