"""``launcher=local_gpu``: the points of a multirun run at once on one machine, one per device slot.

Every point runs in its own process (a fresh CUDA context) pinned to one device with
``CUDA_VISIBLE_DEVICES=<slot>``, so the model sees that one GPU as ``cuda:0``; when a point ends,
the next waiting point starts on the freed slot. The slots are ``hydra.launcher.devices`` when given,
else the entries of ``CUDA_VISIBLE_DEVICES``, else ``0 .. torch.cuda.device_count()-1``; with none of
these the multirun stops before any point runs, with one line and exit code 2 (the profile puts
the model on ``cuda``: a node whose driver is missing should not run its points on the CPU for hours).

The slot of each point reaches it as ``$PRUNEREP_DEVICE_SLOT``; the launcher writes
``<sweep dir>/local_gpu_slots.json`` (atomically, at every start and end): per point its slot, the
submitit job id, start / end times, exit code, status and error, and what the worker process itself
saw (its pid, ``CUDA_VISIBLE_DEVICES``, ``$PRUNEREP_DEVICE_SLOT``, its own start / end times).
Failures end as in the other launchers: a point that fails records it in its summary.json, a worker
that dies without a result (OOM killer, time limit) gets a failed summary.json written here
(:func:`prunerep.launcher._record_hard_failure`), the other points go on, and the multirun ends with
:class:`prunerep.launcher.JobsFailed` naming every failed point (exit 1). Stopping the launching
process (Ctrl-C, SIGTERM) stops the running points too and records them as cancelled.

Why not a library as it is: submitit's ``LocalExecutor`` (and hydra-submitit-launcher's
``submitit_local``, built on it) starts every submitted job at once and gives each the same
``visible_gpus[:gpus_per_node]``: it has no queue and no per-job device. So the queue (one point per
free slot) is written here; each point is still a ``LocalExecutor`` job, submitted when its slot is
free with ``visible_gpus=(slot,)``: submitit gives it its own process (``python -m
submitit.core._submit``), its stdout/stderr and pickled result under ``<sweep dir>/.submitit/<job>/``,
and enforces ``timeout_min``.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace; the class it instantiates is
``hydra_plugins.prunerep_launcher.local_gpu.LocalGpuLauncher`` (a subclass of :class:`SlotLauncher`
with nothing of its own), in the repository's top-level ``hydra_plugins/`` folder. Its config is
``conf/hydra/launcher/prunerep_local_gpu.yaml``; the class is registered with Hydra by
:func:`register_plugin` (from the command line), so it does not depend on Hydra's scan of the
namespace (which does not see packages of an editable install).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import submitit
import torch
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

from prunerep.launcher import JobsFailed, _record_hard_failure
from prunerep.results.schema import DEVICE_SLOT_ENV as SLOT_ENV
from prunerep.results.store import atomic_write_json

log = logging.getLogger("prunerep.local_gpu")

#: the launcher's record of the points it ran, in the sweep directory
RECORD_FILE = "local_gpu_slots.json"
class NoDeviceSlots(HydraException):
    """No device slot to run the points on (raised before any point runs: exit 2, one line)."""


# --------------------------------------------------------------------------- slots

def _cuda_device_count() -> int:
    try:
        return int(torch.cuda.device_count())
    except Exception:  # a broken driver counts as no GPU
        return 0


def _device_id(value: Any, where: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value).strip())
    except ValueError:
        raise NoDeviceSlots(f"launcher=local_gpu: {where} entry {value!r} is not a device index; name the slots "
                            f"by index with hydra.launcher.devices=[0,1,...]") from None


def resolve_slots(devices: Optional[Sequence[Any]] = None) -> tuple[list[int], str]:
    """The device slots and where they came from: `devices` (``hydra.launcher.devices``), else
    ``CUDA_VISIBLE_DEVICES`` (up to its first negative entry, as CUDA reads it), else
    ``range(torch.cuda.device_count())``. Raises :class:`NoDeviceSlots` when there is none."""
    if devices is not None:
        if isinstance(devices, (int, str)):
            devices = [devices]
        ids, source = [_device_id(d, "hydra.launcher.devices") for d in devices], "hydra.launcher.devices"
        if any(i < 0 for i in ids):
            raise NoDeviceSlots(f"launcher=local_gpu: hydra.launcher.devices={ids} has a negative device index")
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        ids, source = [], "CUDA_VISIBLE_DEVICES"
        for entry in os.environ["CUDA_VISIBLE_DEVICES"].split(","):
            if not entry.strip():
                continue
            i = _device_id(entry, "CUDA_VISIBLE_DEVICES")
            if i < 0:
                break
            ids.append(i)
    else:
        ids, source = list(range(_cuda_device_count())), "torch.cuda.device_count()"
    if not ids:
        seen = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
                if source == "CUDA_VISIBLE_DEVICES" else f"{source} is empty" if source.startswith("hydra")
                else "CUDA_VISIBLE_DEVICES is unset and torch.cuda.device_count() is 0")
        raise NoDeviceSlots(f"launcher=local_gpu: no GPU to run the points on ({seen}); name the device slots with "
                            f"hydra.launcher.devices=[0,1,...], or use launcher=local")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise NoDeviceSlots(f"launcher=local_gpu: device {dupes[0]} is listed twice in {source}; each slot is one "
                            f"device")
    return ids, source


def threads_per_point(n_slots: int, cpus_per_point: Optional[int] = None) -> Optional[int]:
    """CPU threads for each point: `cpus_per_point`, else None when OMP_NUM_THREADS is set (the
    user's choice stands), else the cores shared between the slots."""
    if cpus_per_point is not None:
        return max(1, int(cpus_per_point))
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // max(1, n_slots))


# --------------------------------------------------------------------------- the worker

def run_point(hydra_context, config, task_function, overrides: list[str], job_num: int, slot: int,
              threads: Optional[int], singleton_state) -> Any:
    """One point, in the worker process submitit started for it (CUDA_VISIBLE_DEVICES is already the
    slot): what hydra-submitit-launcher's ``BaseSubmititLauncher.__call__`` does, with the slot in
    ``$PRUNEREP_DEVICE_SLOT`` and what this process saw attached to the result for the launcher's record."""
    started = time.time()
    os.environ[SLOT_ENV] = str(slot)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes this point starts
        torch.set_num_threads(threads)
    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    ret.prunerep_worker = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                           SLOT_ENV: os.environ.get(SLOT_ENV), "threads": threads, "start": started,
                           "end": time.time()}
    return ret


# --------------------------------------------------------------------------- the launcher

@dataclass
class _Point:
    num: int
    overrides: list[str]
    run_dir: Optional[Path] = None
    slot: Optional[int] = None
    job: Any = None
    start: Optional[float] = None
    end: Optional[float] = None
    state: str = "WAITING"
    exit_code: Optional[int] = None
    status: Optional[str] = None
    error: Optional[str] = None
    worker: Optional[dict] = None
    result: Any = None

    def record(self) -> dict:
        return {"job_num": self.num, "overrides": self.overrides, "run_dir": str(self.run_dir) if self.run_dir else None,
                "slot": self.slot, "job_id": self.job.job_id if self.job is not None else None, "start": self.start,
                "end": self.end, "state": self.state, "exit_code": self.exit_code, "status": self.status,
                "error": self.error, "worker": self.worker}


class SlotLauncher(Launcher):
    """The points of a multirun at once, one per device slot (see the module's docstring)."""

    def __init__(self, devices: Optional[Sequence[int]] = None, cpus_per_point: Optional[int] = None,
                 timeout_min: float = 10080.0, submitit_folder: str = ".submitit/%j", poll_s: float = 0.5) -> None:
        self.devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
        self.cpus_per_point = cpus_per_point
        self.timeout_min = float(timeout_min)
        self.submitit_folder = str(submitit_folder)
        self.poll_s = float(poll_s)
        self.config = self.hydra_context = self.task_function = None
        self.slots: list[int] = []
        self.slots_from = ""
        self._threads: Optional[int] = None
        self._points: dict[int, _Point] = {}  # every point this launcher ran, over all its launch() calls

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.slots, self.slots_from = resolve_slots(self.devices)  # before the sweep dir exists
        log.info("launcher=local_gpu: %d device slot(s) %s (from %s)", len(self.slots), self.slots, self.slots_from)

    # ---------------------------------------------------------------- bookkeeping
    def _run_dir(self, sweep_dir: Path, overrides: list[str], num: int) -> Optional[Path]:
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
            return sweep_dir / str(cfg.hydra.sweep.subdir)
        except Exception as e:  # the point itself will say what is wrong with its config
            log.debug("no run dir for point #%d: %s", num, e)
            return None

    def _write_record(self, sweep_dir: Path, started: float, ended: Optional[float] = None) -> None:
        record = {"launcher": "local_gpu", "devices": self.slots, "devices_from": self.slots_from,
                  "threads_per_point": self._threads, "started": started, "ended": ended,
                  "points": [p.record() for _, p in sorted(self._points.items())]}
        try:
            atomic_write_json(sweep_dir / RECORD_FILE, record)
        except OSError as e:  # the record must never stop the sweep
            log.warning("could not write %s: %s", sweep_dir / RECORD_FILE, e)

    def _finish(self, p: _Point) -> None:
        """A worker has ended: its point's status, from its result or, without one, a failed summary."""
        proc = getattr(p.job, "_process", None)
        p.exit_code = proc.poll() if proc is not None else None
        p.state = p.job.state
        try:
            ret = p.job.result()
        except Exception as e:  # killed (OOM killer, time limit, a signal) or failed outside the point
            p.status = "failed"
            p.error = (f"local job {p.job.job_id} on slot {p.slot} ended without a result (state {p.state}, exit code "
                       f"{p.exit_code}): {_last_line(e)}; log: {p.job.paths.stderr}")
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(p.overrides))
                with open_dict(cfg.hydra.job):
                    cfg.hydra.job.num = p.num
                task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                if p.run_dir is not None:
                    _record_hard_failure(p.run_dir, task_cfg, p.job.job_id, p.state, p.error,
                                         extra={"slurm_job_id": None, "local_job_id": p.job.job_id,
                                                "device_slot": p.slot})
            except Exception as rec_err:  # never let the bookkeeping hide the real failure
                log.warning("could not record the failure of point #%d: %s", p.num, rec_err)
            return
        p.result = ret
        p.worker = getattr(ret, "prunerep_worker", None)
        value = ret._return_value
        if ret.status == JobStatus.COMPLETED and isinstance(value, dict) and value.get("status") == "failed":
            p.status, p.error = "failed", str(value.get("error"))
        elif ret.status != JobStatus.COMPLETED:
            p.status, p.error = "failed", f"{type(value).__name__}: {value}"
        else:
            p.status = value.get("status", "complete") if isinstance(value, dict) else "complete"

    # ---------------------------------------------------------------- launch
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        assert self.config is not None, "setup() first"
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        self._threads = threads_per_point(len(self.slots), self.cpus_per_point)
        log.info("local_gpu sweep output dir: %s; %d point(s) on device slot(s) %s, %s thread(s) each",
                 sweep_dir, len(job_overrides), self.slots, self._threads or "OMP_NUM_THREADS")

        executor = submitit.LocalExecutor(folder=self.submitit_folder)
        executor.update_parameters(timeout_min=self.timeout_min, nodes=1, tasks_per_node=1)
        points = [_Point(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for p in points:
            p.run_dir = self._run_dir(sweep_dir, p.overrides, p.num)
            self._points[p.num] = p
        started = time.time()
        self._write_record(sweep_dir, started)

        waiting, free, running = deque(points), deque(self.slots), []
        old_term = _stop_on_sigterm()
        try:
            while waiting or running:
                while waiting and free:  # a free slot takes the next waiting point
                    p = waiting.popleft()
                    p.slot = free.popleft()
                    executor.update_parameters(visible_gpus=(p.slot,), gpus_per_node=1)
                    p.job = executor.submit(run_point, self.hydra_context, self.config, self.task_function,
                                            p.overrides, p.num, p.slot, self._threads, Singleton.get_state())
                    p.start, p.state = time.time(), "RUNNING"
                    running.append(p)
                    log.info("\t#%d on slot %d (job %s): %s", p.num, p.slot, p.job.job_id,
                             " ".join(filter_overrides(p.overrides)))
                    self._write_record(sweep_dir, started)
                time.sleep(self.poll_s)
                for p in [r for r in running if r.job.done()]:
                    p.end = time.time()
                    running.remove(p)
                    free.append(p.slot)
                    self._finish(p)
                    (log.error if p.status == "failed" else log.info)(
                        "\t#%d on slot %d %s%s", p.num, p.slot, p.status, f": {p.error}" if p.error else "")
                    self._write_record(sweep_dir, started)
        except BaseException:  # Ctrl-C, SIGTERM, a bug here: stop the workers rather than leave them running
            for p in running:
                p.state, p.status, p.end = "CANCELLED", "failed", time.time()
                p.error = "cancelled: the launching process stopped"
            _stop_workers([p.job for p in running])
            self._write_record(sweep_dir, started, time.time())
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        self._write_record(sweep_dir, started, time.time())

        results, failed = [], []
        for p in points:
            if p.result is not None:
                ret = p.result
                if p.status == "failed":
                    ret.status = JobStatus.FAILED
            else:
                ret = JobReturn(overrides=p.overrides, status=JobStatus.FAILED, _return_value=RuntimeError(p.error),
                                working_dir=str(p.run_dir or ""))
            if p.status == "failed":
                failed.append(p)
            results.append(ret)
        if failed:
            lines = [f"  #{p.num} slot {p.slot} job {p.job.job_id if p.job else '-'}: {p.error} -> {p.run_dir}"
                     for p in failed]
            exc = JobsFailed(f"{len(failed)} of {len(points)} point(s) failed (recorded as failed in their summary.json; "
                             "re-run the same command to redo them):\n" + "\n".join(lines))
            for r in results:
                if r.status == JobStatus.FAILED:
                    r._return_value = exc
        return results


def _stat(pid) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat after the command name (state first), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for d in entries:
        fields = _stat(d)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _start_time(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot), or None when it is gone: with the pid it
    names one process, never a later one that reuses the pid."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def _stop_workers(jobs: list, grace_s: float = 5.0) -> None:
    """Stop running points: submitit's cancel (SIGINT to its controller, which stops the point), then,
    for what is still there after `grace_s` (SIGINT is ignored by processes a non-interactive shell
    started in the background, and a point busy in native code may outlive its controller),
    SIGKILL to the point's processes and the controller. The processes are listed before the cancel:
    a point whose controller exited is an orphan, no longer found below it."""
    procs = [getattr(job, "_process", None) for job in jobs]
    tree = {pid: t for p in procs if p is not None for pid in _descendants(p.pid)
            if (t := _start_time(pid)) is not None}
    for job in jobs:
        try:
            job.cancel(check=False)
        except Exception:
            pass

    def left() -> list[int]:
        return [pid for pid, t in tree.items() if _start_time(pid) == t]

    deadline = time.time() + grace_s
    while time.time() < deadline and (left() or any(p is not None and p.poll() is None for p in procs)):
        time.sleep(0.1)
    for pid in left():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        if p is not None and p.poll() is None:
            for pid in _descendants(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            p.kill()
            p.wait()


def _stop_on_sigterm():
    """While the points run, SIGTERM (kill, `timeout`) stops the sweep as Ctrl-C does, so that the
    workers are stopped too; returns the handler to restore (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, _term)


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("---")
             and not ln.startswith(("You can check", "or at paths", "  - "))]
    return lines[-1] if lines else type(e).__name__


# --------------------------------------------------------------------------- registration

def register_plugin() -> Optional[str]:
    """Register the launcher class with Hydra (its scan of ``hydra_plugins`` misses the packages of an
    editable install); returns why it cannot be, or None."""
    try:  # the plugin module imports this one: imported when registered
        from hydra_plugins.prunerep_launcher.local_gpu import LocalGpuLauncher
    except ImportError as e:
        return (f"launcher=local_gpu needs the package hydra_plugins.prunerep_launcher ({e}): run from the "
                f"repository's root directory, put it on PYTHONPATH, or reinstall prunerep (pip install -e .)")
    Plugins.instance().register(LocalGpuLauncher)
    return None


__all__ = ["SLOT_ENV", "RECORD_FILE", "NoDeviceSlots", "resolve_slots", "threads_per_point",
           "run_point", "SlotLauncher", "register_plugin"]
