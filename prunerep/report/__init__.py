"""Aggregate a sweep into one table and a few figures.

    python -m prunerep.report outputs/multirun/2025-01-01_12-00-00          # -> <dir>/report/
    python -m prunerep.report <dir> --out report/ --tolerance-pp 2

Writes
    sweep.parquet, sweep.csv   one row per run x metric (tidy): run identity (model, pruner, sparsity,
                               sparsity_ratio, status, ...), source (probe | eval | pruning | run), and
                               for probes context/space/metric/layer/step/temperature (mean over prompts),
                               for evals task/task_type/metric (dense | pruned | abs_change | rel_change)
    runs.csv                   one row per run: status, error, achieved sparsity, timings, reuse
    thresholds.json            per pruner: highest sparsity keeping MC / generative scores within 1 pp
    thresholds.txt             the thresholds as printed
    similarity_vs_sparsity.png per space, the similarity to dense at the last layer (one panel per pruner);
                               the logits raw and centred (logit_centred), the MC answer rows on the option
                               subspace (options) and on the full vocabulary (answer)
    kl_vs_sparsity.png         per space, the divergence (KL where defined) at the last layer
    estimates_vs_exact.png     KL and 1 − cos(p) against their second-order estimates, per run and layer,
                               with y = x
    mc_vs_gen_vs_sparsity.png  MC and generative scores vs sparsity, dense baseline dashed
    divergence_vs_step.png     divergence vs decoding step, one line per sparsity,
                               teacher-forced solid, free-running dashed
    equal_memory.png           final-layer KL(p) and the task scores vs effective bits per weight
                               (compression.json): pruners and quantizers on one figure
    transitions_vs_layer.png   (runs with probe.transitions=true only) per space, attention and MLP
                               transitions vs layer: dense, pruned, local damage (report/transitions.py)
    claims_vs_sparsity.png     each story claim's statistic vs sparsity with its bootstrap interval as a band,
                               one line per pruner / quantizer, and the bound it is held against
                               (report/claims.py; the claims: prunerep/results/claims.py)
    layer_position.png         (layer_drop sweeps over pruner.window_start or pruner.layers only) task
                               scores and final-layer KL vs the position of the dropped blocks
and prints the thresholds. Sparsities sort by their ratio (2:4 sits at 0.5, after unstructured 0.5).

The package: :mod:`.load` finds the runs and reads them into the tables, :mod:`.analysis` turns the
table into the plotted points and the thresholds (pandas in, pandas / dicts out), :mod:`.plots` draws
the figures (:mod:`.position`: the layer-position figure, read, joined and drawn; :mod:`.memory`: the
equal-memory figure, joined and drawn), :mod:`.__main__` is the command line. What a run writes is :mod:`prunerep.results.schema`.
"""
from __future__ import annotations

from pathlib import Path

from prunerep.results.store import atomic_write_json, atomic_write_text, atomic_write_with
from prunerep.report.claims import claim_bands, plot_claims
from prunerep.report.analysis import (estimate_points, eval_scores, final_layer_points, format_thresholds, step_curves,
                                      thresholds)
from prunerep.report.load import ReportError, by_method, find_runs, load_sweep
from prunerep.report.memory import equal_memory_points, plot_equal_memory
from prunerep.report.position import layer_positions, plot_layer_position, position_points, varies
from prunerep.report.transitions import plot_sweep_transitions, transition_points
from prunerep.report.plots import plot_estimates, plot_retained, plot_scores, plot_steps, plot_vs_sparsity
from prunerep.sparsity import sparsity_key

__all__ = ["ReportError", "by_method", "equal_memory_points", "estimate_points", "eval_scores", "final_layer_points",
           "find_runs", "format_thresholds", "load_sweep", "make_report", "sparsity_key", "step_curves", "thresholds"]


def make_report(sweep_dir: str | Path, out_dir: str | Path | None = None, tol_pp: float = 1.0) -> dict:
    """Read the sweep under `sweep_dir`, write the report into `out_dir` (default
    ``<sweep_dir>/report``) and return what was written: out_dir, files, table, runs, thresholds,
    text (the printed thresholds) and counts (runs per status). Raises :class:`ReportError`."""
    sweep_dir = Path(sweep_dir)
    table, runs = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {"table_parquet": atomic_write_with(out / "sweep.parquet", lambda p: table.to_parquet(p, index=False)),
             "table_csv": atomic_write_with(out / "sweep.csv", lambda p: table.to_csv(p, index=False)),
             "runs_csv": atomic_write_with(out / "runs.csv", lambda p: runs.to_csv(p, index=False))}
    figs = by_method(table)  # quantized runs apart from their pruner's: "wanda+gptq-w4g64"
    scores = eval_scores(figs)
    th = thresholds(scores, tol_pp)
    files["thresholds"] = atomic_write_json(out / "thresholds.json", {"tolerance_pp": tol_pp, "thresholds": th})
    files["similarity_png"] = plot_vs_sparsity(final_layer_points(figs, "similarity"), "similarity",
                                               out / "similarity_vs_sparsity.png")
    files["kl_png"] = plot_vs_sparsity(final_layer_points(figs, "divergence"), "divergence",
                                       out / "kl_vs_sparsity.png")
    files["scores_png"] = plot_scores(scores, out / "mc_vs_gen_vs_sparsity.png")
    files["retained_png"] = plot_retained(scores, out / "retained_vs_sparsity.png")
    files["steps_png"] = plot_steps(step_curves(figs), out / "divergence_vs_step.png")
    files["estimates_png"] = plot_estimates(estimate_points(figs), out / "estimates_vs_exact.png")
    files["equal_memory_png"] = plot_equal_memory(equal_memory_points(table), out / "equal_memory.png")
    files["claims_png"] = plot_claims(claim_bands(figs), out / "claims_vs_sparsity.png")
    transitions = transition_points(figs)
    if not transitions.empty:  # runs with probe.transitions=true
        files["transitions_png"] = plot_sweep_transitions(transitions, out / "transitions_vs_layer.png")
    positions = layer_positions(runs)
    if varies(positions):  # a sweep over where layer_drop's blocks sit
        files["layer_position_png"] = plot_layer_position(position_points(table, positions),
                                                          out / "layer_position.png")
    text = format_thresholds(th, tol_pp)
    atomic_write_text(out / "thresholds.txt", text + "\n")
    counts = runs["status"].value_counts().to_dict()
    return {"out_dir": out, "files": files, "table": table, "runs": runs, "thresholds": th, "text": text,
            "counts": counts}
