"""A Hydra callback that lets a submitit (SLURM) sweep run to its end when some of its jobs are killed.

:func:`resilient_launch` is a copy of hydra-submitit-launcher's ``BaseSubmititLauncher.launch``,
changed to wait for every job and record the dead ones; :class:`ResilientSubmitit` installs it.
The copy was adapted from the release :data:`ADAPTED_FROM_VERSION`, pinned in pyproject.toml;
tests/test_launcher_pin.py fails when the installed plugin's ``launch`` is not that release's.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict
from submitit.core.utils import FailedJobError

from prunerep.results.rundir import record_failure
from prunerep.results.schema import failure_summary
from prunerep.spec import identity_fields

log = logging.getLogger("prunerep.launcher")

#: the hydra-submitit-launcher release whose ``BaseSubmititLauncher.launch`` :func:`resilient_launch`
#: was adapted from
ADAPTED_FROM_VERSION = "1.2.0"
#: sha256 of ``inspect.getsource(BaseSubmititLauncher.launch)`` of that release
ADAPTED_FROM_LAUNCH_SHA256 = "546875669010f80d6ceede740e8bf2d18088cf5bcce2eb4794c735fa3dc2fc0e"


def _record_hard_failure(run_dir: Path, cfg: Any, job_id: str, state: str, error: str,
                         extra: dict | None = None) -> None:
    """A job killed before it could write its own summary (scancel, OOM killer, node failure,
    time limit): record it, so the sweep's table says failed rather than leaving a hole. `extra`
    adds or replaces keys (launcher=local_gpu: no SLURM job, the local job and the device slot)."""
    identity = dict(identity_fields(cfg, run_dir), slurm_job_id=job_id)
    record_failure(run_dir, failure_summary(identity, error, scheduler_state=state, **(extra or {})))


class JobsFailed(RuntimeError):
    """Raised by the multirun after every job has ended, when some ended without a result."""


def resilient_launch(self, job_overrides, initial_job_idx):
    """`launch` of hydra-submitit's launchers, changed in one respect: it waits for *every* job, turns
    the jobs that died without a result (scancel, OOM killer, node failure, time limit) into failed
    points -- a summary.json with the scheduler's state in their run dirs -- and then fails the
    multirun once, naming all of them. The stock launcher raises at the first dead job, in submission
    order, while later jobs still run and nothing records the dead one."""
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
            ret = job.results()[0]
            results.append(ret)
            point = ret.return_value if ret.status == JobStatus.COMPLETED else None
            if isinstance(point, dict) and point.get("status") == "failed":  # the job ran; its point failed
                log.error("point #%d (%s) failed: %s", idx, " ".join(filter_overrides(overrides)), point["error"])
                failed.append((idx, job, point["error"], point.get("run_dir")))
                ret.status = JobStatus.FAILED
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
        exc = JobsFailed(f"{len(failed)} of {len(jobs)} point(s) failed (recorded as failed in their summary.json; "
                         "re-run the same command to redo them):\n" + "\n".join(lines))
        for r in results:
            if r.status == JobStatus.FAILED:
                r._return_value = exc
    return results


class ResilientSubmitit(Callback):
    """Hydra callback (``hydra.callbacks``) that makes hydra-submitit's launchers resilient, see
    :func:`resilient_launch`. Hydra only instantiates launchers from the ``hydra_plugins`` namespace,
    so rather than a launcher subclass, this installs the changed ``launch`` on the submitit launchers
    of the launching process, before the sweep starts (Hydra calls on_multirun_start first)."""

    def on_multirun_start(self, config=None, **kwargs) -> None:
        install_resilient_launch()


def install_resilient_launch() -> bool:
    """Put :func:`resilient_launch` on hydra-submitit's launchers in this process."""
    # imported now, not with this module: Hydra's plugin scan executes the plugin modules again,
    # and the launcher class it instantiates is the one of that last execution
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    if BaseSubmititLauncher.launch is not resilient_launch:
        BaseSubmititLauncher.launch = resilient_launch
    return True


__all__ = ["ADAPTED_FROM_VERSION", "ADAPTED_FROM_LAUNCH_SHA256", "JobsFailed", "resilient_launch",
           "ResilientSubmitit", "install_resilient_launch"]
