"""Sweep robustness: config hashes, the completed-points index, reuse of finished results, and a
Hydra callback that lets a submitit (SLURM) sweep run to its end when some of its jobs are killed.

A point of a sweep is identified by the hash of its resolved config minus the keys that do not
change its results (:data:`VOLATILE_KEYS`). When a point completes, the pipeline records its run
directory in ``<outputs>/index/<hash>.json`` (:func:`mark_completed`). Re-running a sweep looks each
point up (:func:`find_completed`) and copies the finished results instead of recomputing them
(:func:`reuse_completed`); missing, failed or half-written points are computed again.

``<outputs>`` is ``$PRUNEREP_OUTPUTS`` when set, else ``outputs`` in the directory the sweep is
launched from (Hydra does not chdir; SLURM jobs start in the submission directory).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf

from prunerep.config import sparsity_label
from prunerep.io import atomic_write_json, read_json, stable_hash

log = logging.getLogger("prunerep.sweep")

#: top-level keys (or dotted paths) that never change a point's results
VOLATILE_KEYS = ("hydra", "launcher", "cache_dir", "skip_completed", "wandb")
#: files of the results contract, copied when a completed point is reused
RESULT_FILES = ("config.yaml", "pruning.json", "probes.parquet", "probes_summary.json", "evals.json")
#: what a reused run directory never takes from its source (per-run logs, tracking, scratch)
NOT_COPIED = {"summary.json", ".hydra", "wandb", "eval_work", ".submitit"}


# --------------------------------------------------------------------------- hashing

def _container(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return dict(cfg)
    if OmegaConf.is_config(cfg):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except Exception:  # an interpolation that only resolves inside a job (${hydra:...})
            return OmegaConf.to_container(cfg, resolve=False)
    raise TypeError(f"expected a DictConfig or dict, got {type(cfg).__name__}")


def hashable_config(cfg: Any, volatile: Iterable[str] = VOLATILE_KEYS) -> dict:
    """The resolved config as a plain dict, minus the volatile keys."""
    d = _container(cfg)
    for key in volatile:
        node, *rest = key.split(".")
        if not rest:
            d.pop(node, None)
            continue
        parent = d
        for part in [node] + rest[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(rest[-1], None)
    if "sparsity" in d:
        d["sparsity"] = sparsity_label(d["sparsity"])  # 0.5, "0.50" hash alike
    return d


def config_hash(cfg: Any) -> str:
    """Stable 16-hex-digit hash of the resolved config minus hydra, launcher, wandb, cache_dir and
    skip_completed: two points with the same hash produce the same results."""
    return stable_hash(hashable_config(cfg))


# --------------------------------------------------------------------------- the index

def outputs_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root if root is not None else os.environ.get("PRUNEREP_OUTPUTS", "outputs"))


def index_path(chash: str, root: str | os.PathLike | None = None) -> Path:
    return outputs_root(root) / "index" / f"{chash}.json"


def is_complete(run_dir: str | os.PathLike, chash: Optional[str] = None) -> bool:
    """summary.json exists, says complete, and (when given) carries this config hash."""
    try:
        summary = read_json(Path(run_dir) / "summary.json")
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("status") != "complete":
        return False
    return chash is None or summary.get("config_hash") in (None, chash)


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise read-modify-write of one index entry across processes (best effort: a file system
    without flock, some NFS mounts, still gets atomic -- last writer wins -- updates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def _read_entry(path: Path) -> dict:
    try:
        entry = read_json(path)
        return entry if isinstance(entry, dict) else {}
    except (OSError, ValueError):
        return {}


def find_completed(cfg: Any, outputs_root: str | os.PathLike | None = None) -> Optional[Path]:
    """Run directory of a completed point with this config hash, or None.

    Entries whose directory was deleted, or whose summary.json is missing or not complete, are
    ignored (and a later :func:`mark_completed` drops them)."""
    chash = config_hash(cfg)
    entry = _read_entry(index_path(chash, outputs_root))
    for d in entry.get("runs", []):
        if is_complete(d, chash):
            return Path(d)
    return None


def mark_completed(cfg: Any, run_dir: str | os.PathLike, outputs_root: str | os.PathLike | None = None) -> Path:
    """Record `run_dir` (whose summary.json says complete) as the place this config's results live.
    Call it right after summary.json is written. Returns the index file."""
    chash = config_hash(cfg)
    return _add_to_index(chash, Path(run_dir), outputs_root,
                         meta={"model": _get(cfg, "model.name"), "pruner": _get(cfg, "pruner.name"),
                               "sparsity": _get(cfg, "sparsity")})


def _add_to_index(chash: str, run_dir: Path, root, meta: Optional[dict] = None) -> Path:
    path = index_path(chash, root)
    run_dir = str(run_dir.resolve())
    with _locked(path):
        entry = _read_entry(path)
        runs = [run_dir] + [d for d in entry.get("runs", []) if d != run_dir and Path(d).is_dir()]
        entry.update(meta or {})
        entry.update(config_hash=chash, runs=runs, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(path, entry)
    return path


def _get(cfg: Any, dotted: str) -> Any:
    try:
        return OmegaConf.select(cfg, dotted) if OmegaConf.is_config(cfg) else _dict_get(cfg, dotted)
    except Exception:
        return None


def _dict_get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def reuse_completed(src_dir: str | os.PathLike, run_dir: str | os.PathLike,
                    outputs_root: str | os.PathLike | None = None) -> dict:
    """Bring a completed point's results into `run_dir` instead of recomputing them.

    Copies the result files (and any other top-level results, e.g. a saved ``model/``), then writes
    summary.json last with ``reused_from`` = the source directory and ``run_dir`` = this one, so a
    kill half-way leaves no complete-looking summary. When `src_dir` is `run_dir` itself (the same
    sweep re-run in place) nothing is copied. Returns the summary."""
    src, dst = Path(src_dir).resolve(), Path(run_dir).resolve()
    summary = read_json(src / "summary.json")
    if src == dst:
        return summary
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name in NOT_COPIED or item.name.startswith(".") or item.suffix == ".log":
            continue
        target = dst / item.name
        if item.is_dir():
            tmp = dst / f".{item.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(item, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        else:
            tmp = dst / f".{item.name}.tmp"
            shutil.copy2(item, tmp)
            os.replace(tmp, target)
    origin = summary.get("reused_from") or str(src)
    summary = dict(summary, reused_from=origin, run_dir=str(dst), slurm_job_id=slurm_job_id())
    atomic_write_json(dst / "summary.json", summary)
    if summary.get("config_hash"):
        try:  # the copy serves too when the original is deleted later
            _add_to_index(summary["config_hash"], dst, outputs_root)
            # ... but the original stays first in line
            _add_to_index(summary["config_hash"], src, outputs_root)
        except OSError as e:
            log.warning("could not update the completed-points index: %s", e)
    return summary


# --------------------------------------------------------------------------- submitit launchers

def slurm_job_id() -> Optional[str]:
    """The SLURM job of this process as submitit and sacct name it: ``<array>_<task>`` for a task of a
    job array (a multirun), else SLURM_JOB_ID; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _record_hard_failure(run_dir: Path, cfg: Any, job_id: str, state: str, error: str) -> None:
    """A job killed before it could write its own summary (scancel, OOM killer, node failure,
    time limit): record it, so the sweep's table says failed rather than leaving a hole."""
    summary_path = run_dir / "summary.json"
    try:
        existing = read_json(summary_path)
        if isinstance(existing, dict) and existing.get("status") in ("complete", "failed"):
            return
    except (OSError, ValueError):
        pass
    try:
        chash = config_hash(cfg)
    except Exception:
        chash = None
    summary = {
        "status": "failed", "error": error, "config_hash": chash,
        "model": _get(cfg, "model.name"), "pruner": _get(cfg, "pruner.name"), "sparsity": _get(cfg, "sparsity"),
        "achieved_sparsity": None, "timings_s": {}, "peak_memory_mb": {}, "run_dir": str(run_dir),
        "slurm_job_id": job_id, "scheduler_state": state, "reused_from": None,
    }
    atomic_write_json(summary_path, summary)


class JobsFailed(RuntimeError):
    """Raised by the multirun after every job has ended, when some ended without a result."""


def resilient_launch(self, job_overrides, initial_job_idx):
    """`launch` of hydra-submitit's launchers, changed in one respect: it waits for *every* job, turns
    the jobs that died without a result (scancel, OOM killer, node failure, time limit) into failed
    points -- a summary.json with the scheduler's state in their run dirs -- and then fails the
    multirun once, naming all of them. The stock launcher raises at the first dead job, in submission
    order, while later jobs still run and nothing records the dead one."""
    import submitit
    from submitit.core.utils import FailedJobError
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import open_dict

    assert self.config is not None
    params = dict(self.params)
    init_params = {"folder": params["submitit_folder"]}
    specific_init_keys = {"max_num_timeout"}
    init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in specific_init_keys})
    init_keys = specific_init_keys | {"submitit_folder"}
    executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                                  for k, v in params.items() if k not in init_keys})
    sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in self.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
    log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)

    job_params = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(self, *zip(*job_params))
    log.info("submitted %d job(s): %s", len(jobs), ", ".join(j.job_id for j in jobs))

    pending = list(jobs)
    while pending:  # every job, finished or dead, before looking at any result
        pending = [j for j in pending if not j.done()]
        if pending:
            time.sleep(1)

    results, failed = [], []
    for job, (overrides, _, idx, _, _) in zip(jobs, job_params):
        try:
            results.append(job.results()[0])
            continue
        except Exception as e:  # UncompletedJobError (killed) or an exception the job raised
            state = job.state
            error = f"{self._EXECUTOR} job {job.job_id} ended without a result (scheduler state {state})"
            trace = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("---")
                     and not ln.startswith(("You can check", "or at paths", "  - "))]
            if isinstance(e, FailedJobError) and len(trace) > 1:
                error += f": {trace[-1]}"
            error += f"; log: {job.paths.stderr}"
            run_dir = None
            try:
                sweep_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(sweep_cfg.hydra.job):
                    sweep_cfg.hydra.job.num = idx
                run_dir = sweep_dir / str(sweep_cfg.hydra.sweep.subdir)
                task_cfg = OmegaConf.masked_copy(sweep_cfg, [k for k in sweep_cfg if k != "hydra"])
                _record_hard_failure(run_dir, task_cfg, job.job_id, state, error)
            except Exception as rec_err:  # never let the bookkeeping hide the real failure
                log.warning("could not record the failure of job %s: %s", job.job_id, rec_err)
            log.error("point #%d (%s) failed: %s", idx, " ".join(filter_overrides(overrides)), error)
            failed.append((idx, job, error, run_dir))
            results.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=e,
                                     working_dir=str(run_dir or "")))
    if failed:
        lines = [f"  #{idx} {job.job_id}: {err} -> {rd}" for idx, job, err, rd in failed]
        exc = JobsFailed(f"{len(failed)} of {len(jobs)} job(s) ended without a result (recorded as failed in "
                         "their summary.json; re-run the same command to redo them):\n" + "\n".join(lines))
        for r in results:
            if r.status == JobStatus.FAILED:
                r._return_value = exc
    return results


try:  # hydra's callback base class; keep this module importable without Hydra's experimental API
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # pragma: no cover
    _Callback = object  # type: ignore[misc,assignment]


class ResilientSubmitit(_Callback):
    """Hydra callback (``hydra.callbacks``) that makes hydra-submitit's launchers resilient, see
    :func:`resilient_launch`. Hydra only instantiates launchers from the ``hydra_plugins`` namespace,
    so rather than a launcher subclass, this installs the changed ``launch`` on the submitit launchers
    of the launching process, before the sweep starts (Hydra calls on_multirun_start first)."""

    def on_multirun_start(self, config=None, **kwargs) -> None:
        install_resilient_launch()


def install_resilient_launch() -> bool:
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
    except ImportError:  # pragma: no cover - the plugin is a dependency
        log.warning("hydra-submitit-launcher is not installed: jobs that die are not recorded")
        return False
    if BaseSubmititLauncher.launch is not resilient_launch:
        BaseSubmititLauncher.launch = resilient_launch
    return True


__all__ = ["VOLATILE_KEYS", "config_hash", "hashable_config", "find_completed", "mark_completed",
           "reuse_completed", "is_complete", "index_path", "slurm_job_id", "ResilientSubmitit",
           "resilient_launch", "install_resilient_launch", "JobsFailed"]
