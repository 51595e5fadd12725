"""The completed-points index: config hashes, the index of finished points, and reuse of their results.

A point of a sweep is identified by the hash of its resolved config minus the keys that do not
change its results (:data:`VOLATILE_KEYS`). When a point completes, the pipeline records its run
directory in ``<outputs>/index/<hash>.json`` (:func:`mark_completed`). Re-running a sweep looks each
point up (:func:`find_completed`) and copies the finished results instead of recomputing them
(:func:`reuse_completed`); missing, failed or half-written points are computed again.

``<outputs>`` is ``$PRUNEREP_OUTPUTS`` when set, else ``outputs`` in the directory the sweep is
launched from (Hydra does not chdir; SLURM jobs start in the submission directory).

Each update of an entry holds ``<hash>.json.lock`` (:mod:`filelock`), so points finishing at once in
different processes or on different hosts sharing the file system all get recorded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from filelock import FileLock
from omegaconf import OmegaConf

from prunerep.results.rundir import MANIFEST, RunDirectory, verify
from prunerep.results.schema import SUMMARY_FILE
from prunerep.results.store import atomic_write_json, read_json, stable_hash
from prunerep.sparsity import sparsity_label

log = logging.getLogger("prunerep.index")

#: top-level keys (or dotted paths) that never change a point's results
VOLATILE_KEYS = ("hydra", "launcher", "cache_dir", "skip_completed", "wandb", "verbose")
#: seconds an index update waits for the entry's lock before it goes on unlocked
LOCK_TIMEOUT_S = 60.0


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
    """`root`, else ``$PRUNEREP_OUTPUTS``, else ``outputs`` (relative to the working directory)."""
    return Path(root if root is not None else os.environ.get("PRUNEREP_OUTPUTS", "outputs"))


def index_path(chash: str, root: str | os.PathLike | None = None) -> Path:
    """The index entry of a config hash: ``<outputs>/index/<hash>.json``."""
    return outputs_root(root) / "index" / f"{chash}.json"


def is_complete(run_dir: str | os.PathLike, chash: Optional[str] = None, model_key: Optional[str] = None) -> bool:
    """The run's manifest holds (:func:`prunerep.results.rundir.verify`: every file it promises is
    there, unchanged), its summary.json says complete, and (when given) carries this config hash and
    was run on the dense model files ``model_key`` names (new weights under the same path: not complete)."""
    if verify(run_dir) is not None:
        return False
    try:
        summary = read_json(Path(run_dir) / SUMMARY_FILE)
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("status") != "complete":
        return False
    if model_key is not None and summary.get("model_key") != model_key:
        return False
    return chash is None or summary.get("config_hash") in (None, chash)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold ``<entry>.lock`` for a read-modify-write of one index entry, across processes and hosts.

    The lock is the OS's (flock): a process that dies holding it releases it, so a lock file left on
    disk blocks nobody. When the lock is not had within :data:`LOCK_TIMEOUT_S`, or the file system
    cannot lock (some NFS mounts), this warns and goes on unlocked: the entry is still replaced
    atomically, the last writer wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(f"{path.name}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except (OSError, NotImplementedError) as e:  # filelock.Timeout is an OSError
        log.warning("index entry %s updated without its lock (%s: %s); the last writer wins",
                    path, type(e).__name__, e)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _read_entry(path: Path) -> dict:
    try:
        entry = read_json(path)
        return entry if isinstance(entry, dict) else {}
    except (OSError, ValueError):
        return {}


def find_completed(chash: str, outputs_root: str | os.PathLike | None = None,
                   model_key: Optional[str] = None) -> Optional[Path]:
    """Run directory of a completed point with this config hash (:func:`config_hash`), or None.
    With ``model_key`` (:func:`prunerep.spec.model_key`), only a point run on those same model
    files counts: replacing the weights under the same ``model.path`` runs the point again.

    Entries whose directory was deleted, or whose summary.json is missing or not complete, are
    ignored (and a later :func:`mark_completed` drops them)."""
    entry = _read_entry(index_path(chash, outputs_root))
    for d in entry.get("runs", []):
        if is_complete(d, chash, model_key):
            return Path(d)
    return None


def mark_completed(chash: str, run_dir: str | os.PathLike, outputs_root: str | os.PathLike | None = None,
                   meta: Optional[dict] = None) -> Path:
    """Record `run_dir` (whose summary.json says complete) as the place the results of the config
    with hash `chash` live; `meta` (model, pruner, sparsity) is kept in the entry for people.
    Call it right after summary.json is written. Returns the index file."""
    return _add_to_index(chash, Path(run_dir), outputs_root, meta=meta)


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


def reuse_completed(src_dir: str | os.PathLike, rd: RunDirectory,
                    outputs_root: str | os.PathLike | None = None) -> dict:
    """Bring a completed point's results into the run directory ``rd`` instead of recomputing them.

    The files of the source's manifest but its summary.json (the results, a saved ``model/``) are
    copied into ``rd``'s staging directory with a summary.json whose ``reused_from`` is the source
    and ``run_dir`` this one, then ``rd`` completes: a kill half-way leaves nothing complete-looking.
    When the source is ``rd`` itself (the same sweep re-run in place) nothing is copied. Returns the
    summary."""
    src, dst = Path(src_dir).resolve(), rd.path.resolve()
    summary = read_json(src / SUMMARY_FILE)
    if src == dst:
        return summary
    for rel in (read_json(src / MANIFEST) or {}).get("files", {}):
        if rel == SUMMARY_FILE:
            continue
        (rd.staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, rd.staging / rel)
    origin = summary.get("reused_from") or str(src)
    summary = dict(summary, reused_from=origin, run_dir=str(dst), slurm_job_id=slurm_job_id())
    atomic_write_json(rd.staging / SUMMARY_FILE, summary)
    rd.complete()
    if summary.get("config_hash"):
        try:  # the copy serves too when the original is deleted later
            _add_to_index(summary["config_hash"], dst, outputs_root)
            # ... but the original stays first in line
            _add_to_index(summary["config_hash"], src, outputs_root)
        except OSError as e:
            log.warning("could not update the completed-points index: %s", e)
    return summary


def slurm_job_id() -> Optional[str]:
    """The SLURM job of this process as submitit and sacct name it: ``<array>_<task>`` for a task of a
    job array (a multirun), else SLURM_JOB_ID; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


__all__ = ["VOLATILE_KEYS", "LOCK_TIMEOUT_S", "hashable_config", "config_hash",
           "outputs_root", "index_path", "is_complete", "find_completed", "mark_completed", "reuse_completed",
           "slurm_job_id"]
