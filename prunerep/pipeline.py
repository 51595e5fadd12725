"""The whole experiment, top to bottom: load -> calibrate -> dense reference -> prune ->
probe the three spaces -> evaluate -> record. Every stage is a small module; this file
only orders them, times them and writes the results contract into the run directory:

    config.yaml         the resolved config
    pruning.json        what the pruner did, measured on the weights
    probes.parquet      tidy per-(context, prompt, layer, sublayer, step, space, metric) table
    probes_summary.json headline per-space numbers at the final layer
    evals.json          dense vs pruned scores per task, mc_vs_gen_gap
    summary.json        status, model, pruner, sparsity, achieved sparsity, timings, peak memory

Each file is written atomically. summary.json is written last, with status "complete" only
when everything before it succeeded; a failed run writes status "failed" and its error.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prunerep import evals, probes
from prunerep.calibration import calibration_batch
from prunerep.config import ConfigError, validate
from prunerep.io import atomic_write_json, atomic_write_text, stable_hash
from prunerep.models import load_model, resolve_device, resolve_dtype
from prunerep.pruners import check_pruner, get_pruner
from prunerep.pruners.common import PruneSettings, measure_sparsity
from prunerep.sweep import config_hash, find_completed, mark_completed, reuse_completed, slurm_job_id
from prunerep.tracking import Tracker

log = logging.getLogger("prunerep")

NEEDS_CALIBRATION = {"wanda", "sparsegpt", "layer_drop"}


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - t0, 3)
            log.info("stage %s done in %.1fs", name, self[name])


def model_key(cfg: DictConfig) -> str:
    """Identity of the dense model for the dense-reference caches (probes, evals)."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    device = resolve_device(cfg.model.device)
    m.pop("device", None)
    m["dtype"] = str(resolve_dtype(cfg.model.dtype, device))
    m["device_type"] = device.type
    return f"{cfg.model.name}-{stable_hash(m)}"


def peak_memory_mb() -> dict:
    peak = {"cpu_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def save_pruned_model(model, tokenizer, target: Path) -> None:
    """Hugging Face format with safetensors; appears atomically (built aside, renamed)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one experiment point. Raises ConfigError on bad input before any heavy work."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    chash = config_hash(cfg)
    base = {"config_hash": chash, "model": cfg.model.name, "pruner": cfg.pruner.name,
            "sparsity": cfg.sparsity, "run_dir": str(run_dir), "slurm_job_id": slurm_job_id()}
    try:
        spec = validate(cfg)
        evals.validate_tasks(cfg.task)
        try:
            probes.check_probe_config(cfg.probe)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        _record_failure(run_dir, dict(base), e, Timings())
        raise

    if cfg.skip_completed and (done := find_completed(cfg)) is not None:
        log.info("already complete (config %s) in %s: reusing its results", chash, done)
        return reuse_completed(done, run_dir)

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    timings = Timings()
    tracker = Tracker(cfg, run_dir)
    summary = dict(base, status="running")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    try:
        with timings.stage("load"):
            model, tokenizer = load_model(cfg.model, cache_dir, offload=cfg.offload)
        key = model_key(cfg)
        settings = PruneSettings(spec=spec, pruner=cfg.pruner, device=resolve_device(cfg.model.device),
                                 offload=cfg.offload, batch_size=cfg.calib.batch_size or cfg.calib.nsamples, seed=cfg.seed)
        check_pruner(model, settings)
        prune_fn = get_pruner(cfg.pruner.name)

        calib = None
        if cfg.pruner.name in NEEDS_CALIBRATION:
            with timings.stage("calibration_data"):
                calib = calibration_batch(cfg.calib, tokenizer)

        with timings.stage("probe_dense"):
            reference = probes.dense_reference(model, tokenizer, cfg.probe, cache_dir, model_key=key)
        with timings.stage("eval_dense"):
            dense_scores = evals.dense_scores(model, tokenizer, cfg.task, cache_dir, model_key=key)

        with timings.stage("prune"):
            method_report = prune_fn(model, calib, settings)
        pruning = dict(measure_sparsity(model, settings), method=method_report)
        atomic_write_json(run_dir / "pruning.json", pruning)
        tracker.log_pruning(pruning)
        log.info("pruned: target %s, achieved %.4f", spec, pruning["achieved_sparsity"])

        if cfg.save_model:
            with timings.stage("save_model"):
                save_pruned_model(model, tokenizer, run_dir / "model")

        with timings.stage("probe_pruned"):
            table = probes.compare_to_reference(model, tokenizer, cfg.probe, reference)
            probe_summary = probes.write_probe_outputs(table, run_dir)
        tracker.log_probes(table, probe_summary)

        with timings.stage("eval_pruned"):
            pruned_scores = evals.evaluate_model(model, tokenizer, cfg.task, run_dir / "eval_work")
            eval_report = evals.compare_evals(dense_scores, pruned_scores)
        if eval_report.get("tasks"):
            atomic_write_json(run_dir / "evals.json", eval_report)
            print(evals.format_evals_table(eval_report), flush=True)
        tracker.log_evals(eval_report)

        timings["total"] = round(time.perf_counter() - t_start, 3)
        summary.update(status="complete", error=None, achieved_sparsity=pruning["achieved_sparsity"],
                       timings_s=dict(timings), peak_memory_mb=peak_memory_mb(),
                       probes=probe_summary, mc_vs_gen_gap=eval_report.get("mc_vs_gen_gap"))
        atomic_write_json(run_dir / "summary.json", summary)
        mark_completed(cfg, run_dir)
        tracker.log_summary(summary)
        tracker.finish(0)
        return summary
    except BaseException as e:
        timings["total"] = round(time.perf_counter() - t_start, 3)
        _record_failure(run_dir, summary, e, timings)
        tracker.finish(1)
        raise


def _record_failure(run_dir: Path, summary: dict, error: BaseException, timings: Timings) -> None:
    summary.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(),
                   timings_s=dict(timings), peak_memory_mb=peak_memory_mb())
    atomic_write_json(run_dir / "summary.json", summary)
