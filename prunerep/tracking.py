"""Weights & Biases tracking for one experiment point.

    tracker = Tracker(identity, config, settings)  # wandb.init (offline by default), logs the config
    tracker.log_pruning(pruning)         # pruning.json: achieved sparsity, per-module zero fractions
    tracker.log_probes(table, summary)   # probes.parquet: divergence curves per space
    tracker.log_evals(evals)             # evals.json: dense vs pruned per task
    tracker.log_summary(summary)         # summary.json: status, timings, peak memory
    tracker.finish(exit_code)

What is logged
  * config: the resolved config, plus config_hash, run_dir and the SLURM job id (as summary.json);
  * history, with their own x axes so that runs of a sweep overlay in W&B's native charts:
      ``layer/<context>/<space>/<metric>`` against ``layer/index`` (mean over prompts), and
      ``step/<context>/<space>/<metric>`` against ``step/index`` (decoding step, teacher-forced and
      free-running);
  * line plots (``wandb.plot.line`` over a ``wandb.Table``): per space, a similarity and a
      divergence vs layer (one line per context) and divergence vs decoding step (teacher-forced vs
      free-running), plus the full aggregated curves as tables ``probes/by_layer``, ``probes/by_step``;
  * evals: ``eval/<task>/{dense,pruned,abs_change,rel_change}``, ``eval/mc_vs_gen_gap`` and a table;
  * pruning: ``pruning/achieved_sparsity`` ... and a per-module table;
  * the run summary (status, achieved sparsity, timings, peak memory) in ``run.summary``.

Runs of one multirun share a W&B group (``wandb.group``, else the name of the Hydra sweep dir) and
are named ``<model>/<pruner>/<sparsity>``. ``wandb.mode``: offline (default: a real offline run in
``<run_dir>/wandb``, upload later with ``wandb sync <run_dir>/wandb/offline-run-*``), online, or
disabled. Tracking never breaks an experiment: if wandb fails at any point (no network, bad API key,
a crash of its service), the tracker warns once and every later call is a no-op; the local results
are written by the pipeline regardless. In online mode a failed start falls back to offline.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from prunerep.sparsity import sparsity_label

from prunerep.results.schema import (DIVERGENCE_METRICS, SIMILARITY_METRICS, STEP_CONTEXTS, at_reference_temperature,
                              per_prompt_mean, pick_metric)

log = logging.getLogger("prunerep.tracking")


def _flatten(d: Any, prefix: str = "", out: Optional[dict] = None) -> dict:
    """Nested dict -> {"a/b/c": scalar}; keeps numbers, bools, strings and None."""
    out = {} if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}{k}/", out)
        return out
    key = prefix.rstrip("/")
    if isinstance(d, bool) or d is None or isinstance(d, str):
        out[key] = d
    elif isinstance(d, (int, float)):
        out[key] = d if (isinstance(d, int) or math.isfinite(d)) else str(d)
    elif hasattr(d, "item"):
        try:
            out[key] = d.item()
        except Exception:
            pass
    return out


class Tracker:
    """One W&B run per experiment point; every method is safe to call whatever wandb does."""

    def __init__(self, identity, config: dict, settings):
        """``identity``: a :class:`prunerep.spec.RunIdentity`; ``config``: the resolved config as a
        dict (logged as the run's config); ``settings``: a :class:`prunerep.config.WandbConfig`."""
        self.identity = identity
        self.config = config
        self.settings = settings
        self.run_dir = Path(identity.run_dir)
        self.run = None
        self._wandb = None
        self._step = 0
        self._warned = False
        self.mode = str(settings.mode)
        if self.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            self.mode = "disabled"
            return
        try:
            self._init(self.mode)
        except Exception as e:
            if self.mode == "online":
                self._warn(f"could not start an online run ({_one_line(e)}); logging offline instead "
                           f"-- upload later with `wandb sync {self.wandb_dir}/wandb/offline-run-*`", once=False)
                try:
                    self._init("offline")
                    self.mode = "offline"
                    return
                except Exception as e2:
                    e = e2
            self._fail("wandb.init", e)

    # ------------------------------------------------------------------ setup
    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def wandb_dir(self) -> Path:
        d = self.settings.dir
        return Path(os.path.expanduser(str(d))) if d else self.run_dir

    def _init(self, mode: str) -> None:
        import wandb

        self._wandb = wandb
        if mode != "online":
            _no_analytics_export()
        w, ident = self.settings, self.identity
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        config = dict(self.config, run_dir=str(self.run_dir), config_hash=ident.config_hash,
                      slurm_job_id=ident.slurm_job_id)
        tags = [str(t) for t in (w.tags or [])]
        tags += [str(ident.model), str(ident.pruner), f"sparsity={sparsity_label(ident.sparsity)}"]
        settings = wandb.Settings(
            init_timeout=float(w.init_timeout),
            finish_timeout=float(w.finish_timeout),
            login_timeout=float(w.init_timeout),
            console="off",  # Hydra already keeps the job's log; no fd redirection inside SLURM jobs
            silent=True,
            reinit="finish_previous",  # the basic launcher runs the points of a sweep in one process
        )
        self.run = wandb.init(
            mode=mode, project=w.project or "prunerep", entity=w.entity or None,
            group=ident.group, job_type="prune", name=ident.name, tags=sorted(set(tags)),
            dir=str(self.wandb_dir), config=config, settings=settings,
        )
        # each family of curves has its own x axis (W&B's step stays monotonic across all of them)
        self.run.define_metric("layer/index", hidden=True)
        self.run.define_metric("layer/*", step_metric="layer/index")
        self.run.define_metric("step/index", hidden=True)
        self.run.define_metric("step/*", step_metric="step/index")
        log.info("wandb %s run %s (%s) in %s", mode, self.run.id, self.run.name, self.wandb_dir)

    def _warn(self, msg: str, once: bool = True) -> None:
        if once and self._warned:
            return
        self._warned = True
        log.warning("wandb: %s", msg)

    def _fail(self, where: str, e: BaseException) -> None:
        """Warn once, then become a no-op; try to close the run without waiting long."""
        self._warn(f"{where} failed ({_one_line(e)}); tracking is off for this run, local results are unaffected")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass
        tear_down_wandb()

    def _log(self, data: dict) -> None:
        """Every log call gets its own explicit step (required for offline runs in wandb >= 0.31)."""
        if not data:
            return
        self.run.log(data, step=self._step)
        self._step += 1

    def _guard(self, where: str, fn, *args) -> None:
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as e:
            self._fail(where, e)

    # ------------------------------------------------------------------ public API
    def log_pruning(self, report: dict) -> None:
        self._guard("log_pruning", self._log_pruning, report)

    def log_probes(self, df, summary: Optional[dict] = None, top_tokens=None) -> None:
        """The probe table's curves and summary; ``top_tokens``: the top-token table
        (:mod:`prunerep.probes.top_tokens`), logged as a W&B table."""
        self._guard("log_probes", self._log_probes, df, summary or {})
        self._guard("log_probes", self._log_transitions, df)
        if top_tokens is not None and len(top_tokens):
            self._guard("log_probes", self._log_top_tokens, top_tokens)

    def log_evals(self, evals: dict) -> None:
        self._guard("log_evals", self._log_evals, evals)

    def log_summary(self, summary: dict) -> None:
        self._guard("log_summary", self._log_summary, summary)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=int(exit_code))
        except Exception as e:
            self._warn(f"finish failed ({_one_line(e)})")

    # ------------------------------------------------------------------ implementations
    def _log_pruning(self, report: dict) -> None:
        wandb = self._wandb
        scalars = {f"pruning/{k}": v for k, v in _flatten(
            {k: v for k, v in report.items() if k not in ("modules", "method")}).items()
            if isinstance(v, (int, float, bool))}
        method = report.get("method")
        if isinstance(method, dict):
            scalars.update({f"pruning/method/{k}": v for k, v in _flatten(method).items()
                            if isinstance(v, (int, float, bool))})
        modules = report.get("modules") or {}
        data = dict(scalars)
        if modules:
            rows = [[name, _layer_of(name), name.split(".", 2)[-1], float(frac)] for name, frac in modules.items()]
            data["pruning/modules"] = wandb.Table(columns=["module", "layer", "kind", "zero_fraction"], data=rows)
        dropped = (method or {}).get("dropped") if isinstance(method, dict) else None
        if dropped:
            data["pruning/dropped"] = wandb.Table(columns=["sublayer"], data=[[str(d)] for d in dropped])
        self._log(data)
        self.run.summary.update(scalars)

    def _log_probes(self, df, summary: dict) -> None:
        import pandas as pd

        wandb = self._wandb
        if summary:
            flat = {f"probes/{k}": v for k, v in _flatten(summary).items() if isinstance(v, (int, float))}
            self.run.summary.update(flat)
        if df is None or len(df) == 0:
            return
        df = pd.DataFrame(df)
        for col in ("context", "space", "metric", "sublayer"):
            if col in df:
                df[col] = df[col].astype("string").fillna("")
        df["value"] = pd.to_numeric(df["value"], errors="coerce")
        df = df[df["value"].notna() & df["value"].map(lambda v: math.isfinite(v))]
        df = at_reference_temperature(df)  # curves at T=1 (else the closest); NaN: T-independent

        by_layer = _curve(df, "layer")
        by_step = _curve(df, "step")

        # native history with custom x axes: runs of a sweep overlay in W&B's charts
        for axis, curve in (("layer", by_layer), ("step", by_step)):
            if curve.empty:
                continue
            for x, g in curve.groupby(axis, sort=True):
                row = {f"{axis}/{c}/{s}/{m}": v for c, s, m, v in
                       zip(g["context"], g["space"], g["metric"], g["value"])}
                row[f"{axis}/index"] = int(x)
                self._log(row)

        # line plots over tables (one per space: similarity and divergence vs layer, divergence vs step)
        plots: dict[str, Any] = {}
        if not by_layer.empty:
            plots["probes/by_layer"] = wandb.Table(dataframe=by_layer.reset_index(drop=True))
            for space, g in by_layer.groupby("space", sort=True):
                for kind, prefs in (("similarity", SIMILARITY_METRICS), ("divergence", DIVERGENCE_METRICS)):
                    metric = pick_metric(g["metric"].unique(), prefs)
                    if metric is None:
                        continue
                    sub = g[g["metric"] == metric][["context", "layer", "value"]].rename(columns={"value": metric})
                    tbl = wandb.Table(dataframe=sub.reset_index(drop=True))
                    plots[f"plots/{space}/{kind}_vs_layer"] = wandb.plot.line(
                        tbl, "layer", metric, stroke="context", title=f"{space}: {metric} vs layer")
        if not by_step.empty:
            plots["probes/by_step"] = wandb.Table(dataframe=by_step.reset_index(drop=True))
            for space, g in by_step.groupby("space", sort=True):
                metric = pick_metric(g["metric"].unique(), DIVERGENCE_METRICS)
                if metric is None:  # e.g. the tokens space: agreement only, in the history and table
                    continue
                sub = g[g["metric"] == metric][["context", "step", "value"]].rename(columns={"value": metric})
                tbl = wandb.Table(dataframe=sub.reset_index(drop=True))
                plots[f"plots/{space}/divergence_vs_step"] = wandb.plot.line(
                    tbl, "step", metric, stroke="context",
                    title=f"{space}: {metric} vs decoding step (teacher-forced vs free-running)")
        self._log(plots)

    def _log_transitions(self, df) -> None:
        """Sublayer transitions (``probe.transitions``): the curves of
        :func:`prunerep.viz.probes.transition_curves` as a table, and per space and
        comparison a line plot of attention vs MLP against the layer (prompt context)."""
        from prunerep.viz.probes import TRANSITION_ROWS, transition_curves

        if df is None or len(df) == 0:
            return
        curves = transition_curves(df)
        if curves.empty:
            return
        wandb = self._wandb
        plots: dict[str, Any] = {"probes/transitions": wandb.Table(dataframe=curves.reset_index(drop=True))}
        ctx = "prompt" if (curves["context"] == "prompt").any() else "teacher_forced"
        for space, metric, _label in TRANSITION_ROWS:
            for comparison, g in curves[(curves["context"] == ctx) & (curves["space"] == space)
                                        & (curves["metric"] == metric)].groupby("comparison", sort=True):
                tbl = wandb.Table(dataframe=g[["kind", "layer", "value"]].rename(columns={"value": metric})
                                  .reset_index(drop=True))
                plots[f"plots/{space}/transitions_{comparison}_{metric}"] = wandb.plot.line(
                    tbl, "layer", metric, stroke="kind", title=f"{space}: {metric}, {comparison} (attention vs MLP)")
        self._log(plots)

    def _log_top_tokens(self, top) -> None:
        self._log({"probes/top_tokens": self._wandb.Table(dataframe=top.reset_index(drop=True))})

    def _log_evals(self, evals: dict) -> None:
        wandb = self._wandb
        tasks = (evals or {}).get("tasks") or {}
        data, rows = {}, []
        for name, t in tasks.items():
            if not isinstance(t, dict):
                continue
            for k in ("dense", "pruned", "abs_change", "rel_change"):
                v = t.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    data[f"eval/{name}/{k}"] = v
            rows.append([name, str(t.get("type", "")), str(t.get("metric", "")), _num(t.get("dense")),
                         _num(t.get("pruned")), _num(t.get("abs_change")), _num(t.get("rel_change"))])
        gap = (evals or {}).get("mc_vs_gen_gap")
        for k, v in _flatten({"mc_vs_gen_gap": gap}).items() if gap is not None else ():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                data[f"eval/{k}"] = v
        if rows:
            data["eval/table"] = wandb.Table(
                columns=["task", "type", "metric", "dense", "pruned", "abs_change", "rel_change"], data=rows)
        self._log(data)
        self.run.summary.update({k: v for k, v in data.items() if not k.endswith("/table")})

    def _log_summary(self, summary: dict) -> None:
        keep = {k: v for k, v in summary.items() if k not in ("probes", "traceback")}
        flat = {f"run/{k}": v for k, v in _flatten(keep).items()}
        self.run.summary.update(flat)


# --------------------------------------------------------------------------- helpers

def tear_down_wandb(timeout_s: float = 10.0) -> None:
    """After a wandb failure, leave nothing of wandb behind in this process: its import hook
    (which otherwise runs, and can raise, on every later import) and its service connection.
    The service shutdown waits at most ``timeout_s`` (a dead service must not hang the run)."""
    import sys
    import threading

    try:
        from wandb.sdk.lib import import_hooks

        import_hooks.unregister_all_post_import_hooks()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, import_hooks.ImportHookFinder)]
        import_hooks._post_import_hooks_init = False
    except Exception:  # pragma: no cover - wandb's internals moved: nothing more to undo
        pass

    def teardown():
        try:
            import wandb

            wandb.teardown(exit_code=1)
        except BaseException:
            pass

    t = threading.Thread(target=teardown, daemon=True, name="wandb-teardown")
    t.start()
    t.join(timeout_s)


def _no_analytics_export() -> None:
    """An offline run must not touch the network. wandb >= 0.31 exports its own usage metrics
    (OpenTelemetry) to its server from a background thread, and at exit, whatever the run's mode
    (it checks the process-wide setup's mode, not the run's): on a compute node without internet
    that is a DNS lookup and a timeout per export. Turn that exporter off for this process."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
    except Exception:  # pragma: no cover - wandb before 0.31 has no such exporter
        return
    opentelemetry_proxy.disable()


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300]}" if s else type(e).__name__


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _layer_of(name: str) -> int:
    parts = name.split(".")
    try:
        return int(parts[1]) if parts[0] == "layers" else -1
    except (IndexError, ValueError):
        return -1


def _curve(df, axis: str):
    """Curves along `axis` ("layer" or "step"), one per (context, space, metric), mean over prompts.

    layer: every context, averaged over positions / decoding steps. step: the decoding step of the
    teacher-forced and free-running contexts (step >= 0; -1 marks per-trajectory or all-position
    values), at each context's last layer."""
    import pandas as pd

    cols = ["context", "space", "metric", axis, "value"]
    if axis not in df or df.empty:
        return pd.DataFrame(columns=cols)
    sub = df[df[axis].notna()]
    if axis == "step":
        sub = sub[sub["context"].isin(STEP_CONTEXTS) & (sub["step"] >= 0)]
        if "layer" in sub and sub["layer"].notna().any():
            last = sub.groupby(["context", "space"])["layer"].transform("max")
            sub = sub[sub["layer"] == last]
    if "sublayer" in sub and (sub["sublayer"] == "block").any():
        sub = sub[sub["sublayer"] == "block"]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    out = per_prompt_mean(sub, ["context", "space", "metric", axis], skipna=True)
    out[axis] = out[axis].astype(int)
    return out[cols]


__all__ = ["Tracker"]
