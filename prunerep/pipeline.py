"""The whole experiment, top to bottom: validate -> load -> calibrate -> dense reference ->
prune -> quantize -> probe the three spaces -> evaluate -> record. Every stage is a small module
taking typed objects that :func:`prunerep.spec.build` makes once from the config; this file only
orders the stages, times them and writes the results contract (:mod:`prunerep.results.schema`)
into the run directory.

Every file is staged and moved into the run directory when the run completes, the manifest last
(:mod:`prunerep.results.rundir`); a failed run leaves a summary.json with status "failed" and its error.
"""
from __future__ import annotations

import logging
import resource
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from prunerep import evals, preflight, probes, spec as run_spec
from prunerep.calibration import calibration_batch
from prunerep.compress.accounting import model_compression
from prunerep.compress.measure import measure_sparsity
from prunerep.errors import ConfigError, ModelUnavailable
from prunerep.evals.items import item_table
from prunerep.model import chat
from prunerep.model.load import load_model
from prunerep.model.placement import new_offload_dir, remove_offload_dir
from prunerep.probes import items as item_probes
from prunerep.results.claims import claims, story_fields
from prunerep.results.index import find_completed, mark_completed, reuse_completed
from prunerep.results.rundir import RunDirectory
from prunerep.results.schema import (COMPRESSION_FILE, CONFIG_FILE, EVAL_ITEMS_FILE, EVALS_FILE, ITEMS_FILE,
                                     PROBE_FILES, PRUNING_FILE, RUN_FILES, SUMMARY_FILE, failure_summary)
from prunerep.results.store import atomic_write_json, atomic_write_text, atomic_write_with, file_mode
from prunerep.results.story import story
from prunerep.tracking import Tracker, logged_before
from prunerep.viz.console import format_evals_table, format_story
from prunerep.viz.probes import write_probe_outputs

log = logging.getLogger("prunerep")


class Timings(dict):
    """Seconds per stage, and each stage's peak memory (:attr:`memory`, MB)."""

    def __init__(self):
        super().__init__()
        self.memory: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("stage %s ...", name)
        reset_peak_memory()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - t0, 3)
            self.memory[name] = peak_memory_mb()
            log.info("stage %s done in %.1fs (peak RSS %.0f MB)", name, self[name], self.memory[name]["cpu_rss"])

    def record(self) -> dict:
        """summary.json's ``timings_s`` and ``peak_memory_mb``."""
        return {"timings_s": dict(self), "peak_memory_mb": self.peak_memory()}

    def peak_memory(self) -> dict:
        """The run's peak memory: the largest of every stage's and of now, with the stages'."""
        now = peak_memory_mb()
        overall = {k: max([v, *(m.get(k, 0.0) for m in self.memory.values())]) for k, v in now.items()}
        return {**overall, "stages": dict(self.memory)}


def reset_peak_memory() -> None:
    """Start a new peak: the kernel's RSS high-water mark (Linux; elsewhere the peak stays the
    process's) and CUDA's peak allocation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict:
    """Peak resident memory (and CUDA allocation) since :func:`reset_peak_memory`, in MB."""
    try:
        with open("/proc/self/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = {"cpu_rss": round(rss, 1)}
    if torch.cuda.is_available():
        peak["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def describe_model(model, mcfg, placement) -> dict:
    """What was actually loaded (recorded in summary.json): never the wrong model's numbers."""
    where = mcfg.path or (f"{mcfg.package}/{mcfg.gguf_file}" if mcfg.source == "package" else None)
    described = {"name": mcfg.name, "class": type(model).__name__,
                 "parameters": sum(p.numel() for p in model.parameters()), "source": mcfg.source, "path": where,
                 "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if placement.dispatched:
        described["placement"] = placement.describe()
        described["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    return described


def save_pruned_model(model, tokenizer, target: Path) -> None:
    """Hugging Face format with safetensors, each file 0666 less the umask like every result
    (safetensors and tokenizers write some 0600)."""
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    mode = file_mode()
    for f in target.rglob("*"):
        if f.is_file():
            f.chmod(mode)


def run(rs: run_spec.RunSpec, rd: RunDirectory) -> dict:
    """Run one experiment point into the run directory ``rd`` (taken by the caller): every file is
    staged and moved into place when the run completes (:meth:`RunDirectory.complete`). Bad input
    found once the model is loaded (ConfigError, ModelUnavailable) is raised with nothing written;
    any other failure leaves a failed summary.json and is raised."""
    ident = rs.identity
    if rs.skip_completed and (done := find_completed(ident.config_hash, rs.index_root, ident.model_key)) is not None:
        log.info("already complete (config %s) in %s: reusing its results", ident.config_hash, done)
        summary = reuse_completed(done, rd, rs.index_root)
        # another sweep's point: this sweep's W&B group gets it too, once
        if done.resolve() != rd.path.resolve() and not logged_before(ident, rs.wandb):
            tracker = Tracker(ident, rs.config, rs.wandb)
            tracker.log_completed(rd.path)
            tracker.finish(0)
        return summary

    offload_dir = new_offload_dir(rs.cache_dir) if rs.placement.device_map is not None else None
    try:
        return _run(rs, rd, offload_dir)
    finally:
        remove_offload_dir(offload_dir)


def _run(rs: run_spec.RunSpec, rd: RunDirectory, offload_dir: Optional[Path]) -> dict:
    ident = rs.identity
    out = rd.staging
    timings = Timings()
    summary = dict(ident.summary_fields(), status="running")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    try:  # the checks that need the model or its tokenizer; bad input here leaves nothing written
        with timings.stage("load"):
            model, tokenizer = load_model(rs.model, rs.cache_dir, rs.placement, offload_dir)
        summary["loaded_model"] = describe_model(model, rs.model, rs.placement)
        log.info("model: %s", summary["loaded_model"])
        log.info("chat template: evals %s, probes %s", *(  # true without a template is bad input, found here
            "on" if chat.resolve(v, tokenizer, what) else "off" for v, what in (
                (rs.task.apply_chat_template, "task.apply_chat_template"), (rs.probe.chat_template, "probe.chat_template"))))
        if not rs.checked_before_loading:  # a hub model not cached here: its shape is known only now
            preflight.against_the_model(model, None, rs)
        calib = None
        if rs.needs_calibration:
            with timings.stage("calibration_data"):
                calib = calibration_batch(rs.calib, tokenizer)
    except (ConfigError, ModelUnavailable):
        raise
    except BaseException as e:
        rd.fail(failure_summary(summary, e, traceback=traceback.format_exc(), **timings.record()))
        raise

    atomic_write_text(out / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(rs.config)))
    tracker = Tracker(ident, rs.config, rs.wandb)
    try:
        with timings.stage("eval_dense"):  # first: probe.prompts=tasks probes the items it evaluated
            dense_scores = evals.dense_scores(model, tokenizer, rs.task, rs.cache_dir, model_key=rs.model_key)
        with timings.stage("probe_dense"):
            reference = probes.dense_reference(model, tokenizer, rs.probe, rs.cache_dir, model_key=rs.model_key,
                                               dense_scores=dense_scores)
        with timings.stage("probe_items_dense"):
            item_reference = item_probes.dense_items(model, tokenizer, rs.probe, dense_scores, rs.cache_dir,
                                                     model_key=rs.model_key)

        with timings.stage("prune"):
            method_report = rs.pruner.prune(model, calib, rs.prune)
        pruning = dict(measure_sparsity(model, rs.prune), method=method_report)
        atomic_write_json(out / PRUNING_FILE, pruning)
        tracker.log_pruning(pruning)
        log.info("pruned: target %s, achieved %.4f", rs.sparsity, pruning["achieved_sparsity"])
        check_target(rs, pruning["achieved_sparsity"])

        quant_report = None
        if rs.quant.quantizes:  # after the pruner, on the pruned model
            with timings.stage("quantize"):
                quant_report = rs.quant.quantize(model, calib, rs.prune)
        compression = model_compression(model, pruner=rs.pruner, spec=rs.sparsity, pruning=pruning, quant=rs.quant,
                                        quant_report=quant_report)
        atomic_write_json(out / COMPRESSION_FILE, compression)
        log.info("effective bits per weight of the decoder Linear weights: %.4f (dense %d)",
                 compression["effective_bits"], compression["dense_bits"])

        if rs.save_model:
            with timings.stage("save_model"):
                save_pruned_model(model, tokenizer, out / "model")

        with timings.stage("probe_pruned"):
            probed = probes.compare_to_reference(model, tokenizer, rs.probe, reference)
            probe_summary = write_probe_outputs(probed, out)
        tracker.log_probes(probed.table, probe_summary, top_tokens=probed.top_tokens)

        with timings.stage("eval_pruned"):
            pruned_scores = evals.evaluate_model(model, tokenizer, rs.task, rd.scratch)
            eval_report = evals.compare_evals(dense_scores, pruned_scores)
        if eval_report.tasks:
            atomic_write_json(out / EVALS_FILE, eval_report.to_json())
            print(format_evals_table(eval_report), flush=True)
        tracker.log_evals(eval_report.to_json())
        items = item_table(dense_scores, pruned_scores)
        if len(items):
            atomic_write_with(out / EVAL_ITEMS_FILE, lambda p: items.to_parquet(p, index=False))
        tracker.log_eval_items(items)
        with timings.stage("probe_items_pruned"):
            probed_items = item_probes.item_table(item_probes.compare_items(model, item_reference, rs.probe),
                                                  dense_scores, pruned_scores)
        if len(probed_items):
            atomic_write_with(out / ITEMS_FILE, lambda p: probed_items.to_parquet(p, index=False))
        tracker.log_items(probed_items)
        found = claims(probed.table, eval_report, dense_scores, pruned_scores, items=probed_items)
        run_story = story(probe_summary, eval_report,
                          story_fields(found, probed.table, dense_scores, pruned_scores, probed_items))
        label = f"{ident.pruner} {ident.sparsity}" + (f" + {ident.quant}" if ident.quant != "none" else "")
        if text := format_story(run_story, label=label):
            print(text, flush=True)

        timings["total"] = round(time.perf_counter() - t_start, 3)
        summary.update(status="complete", error=None, achieved_sparsity=pruning["achieved_sparsity"],
                       effective_bits=compression["effective_bits"],
                       timings_s=dict(timings), peak_memory_mb=timings.peak_memory(),
                       probes=probe_summary, mc_vs_gen_gap=eval_report.mc_vs_gen_gap, story=run_story)
        atomic_write_json(out / SUMMARY_FILE, summary)
        rd.complete(expected=RUN_FILES + (PROBE_FILES if len(probed.table) else ())
                    + ((EVALS_FILE,) if eval_report.tasks else ()) + ((EVAL_ITEMS_FILE,) if len(items) else ())
                    + ((ITEMS_FILE,) if len(probed_items) else ()))
        try:  # bookkeeping: a failure here never changes the run's result
            mark_completed(ident.config_hash, rd.path, rs.index_root,
                           meta={"model": ident.model, "pruner": ident.pruner, "sparsity": ident.sparsity,
                                 "quant": ident.quant})
        except Exception as e:
            log.warning("could not record the run in the completed-points index (%s: %s); a re-run of this "
                        "config will compute it again", type(e).__name__, e)
        tracker.log_summary(summary)
        tracker.finish(0)
        return summary
    except BaseException as e:
        timings["total"] = round(time.perf_counter() - t_start, 3)
        rd.fail(failure_summary(summary, e, traceback=traceback.format_exc(), **timings.record()))
        tracker.finish(1)
        raise


#: how far (in points of sparsity) the achieved sparsity may be from the target
TARGET_TOLERANCE_PP = 0.5


class TargetMissed(RuntimeError):
    """The pruner did not do what was asked: the numbers would be about another sparsity."""


def check_target(rs: run_spec.RunSpec, achieved: float) -> None:
    """Fail the run when a method that promises its target (``zeroes_weights`` and ``meets_target``) misses it."""
    miss_pp = 100 * abs(achieved - rs.sparsity.ratio)
    if rs.pruner.zeroes_weights and rs.pruner.meets_target and miss_pp > TARGET_TOLERANCE_PP:
        raise TargetMissed(f"achieved sparsity {achieved:.4f} is {miss_pp:.2f} points from the target "
                           f"{rs.sparsity} (more than {TARGET_TOLERANCE_PP}); see pruning.json")
