"""Weights & Biases tracking for one experiment point.

    tracker = Tracker(identity, config, settings)  # wandb.init (offline by default), logs the config
    tracker.log_pruning(pruning)         # pruning.json: achieved sparsity, per-module zero fractions
    tracker.log_probes(table, summary)   # probes.parquet: divergence curves per space
    tracker.log_evals(evals)             # evals.json: dense vs pruned per task
    tracker.log_eval_items(items)        # eval_items.parquet: dense vs pruned answers per document
    tracker.log_summary(summary)         # summary.json: status, timings, peak memory
    tracker.finish(exit_code)
    tracker.log_completed(run_dir)       # instead of the calls above: a completed run dir, from its files

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
      ``eval/items``: per task and document, the dense and pruned answers, generations and correctness;
  * pruning: ``pruning/achieved_sparsity`` ... and a per-module table;
  * the run summary (status, achieved sparsity, timings, peak memory) in ``run.summary``.

Runs of one multirun share a W&B group (``wandb.group``, else the name of the Hydra sweep dir) and
are named ``<model>/<pruner>/<sparsity>``. The run id is :func:`run_id`: derived from the point's config
hash and its group (a single run: its run directory), opened with ``resume="allow"``, so a point
that is requeued or run again continues its own W&B run instead of starting a second one. A point
reused from the completed-points index is logged from its files into the new sweep's group
(:meth:`Tracker.log_completed`). ``wandb.mode``: offline (default: a real offline run in
``<run_dir>/wandb``, upload later with ``wandb sync <run_dir>/wandb/offline-run-*``), online, or
disabled. Tracking never breaks an experiment: if wandb fails at any point (no network, bad API key,
a crash of its service), the tracker warns once and every later call is a no-op; the local results
are written by the pipeline regardless. In online mode a failed start falls back to offline.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from prunerep.results.schema import (DIVERGENCE_METRICS, EVAL_ITEMS_FILE, EVALS_FILE, ITEM_LIST_COLUMNS, PROBES_FILE,
                                     PROBES_SUMMARY_FILE, PRUNING_FILE, SIMILARITY_METRICS, SUMMARY_FILE, TOP_TOKENS_FILE,
                                     pick_metric)
from prunerep.results.store import read_json, stable_hash
from prunerep.sparsity import sparsity_label
from prunerep.viz.probes import TRANSITION_ROWS, probe_curves, transition_curves

log = logging.getLogger("prunerep.tracking")

#: per axis of the probe curves: the line plots drawn per space (kind, metric preferences) and the x label
LINE_PLOTS = {"layer": ((("similarity", SIMILARITY_METRICS), ("divergence", DIVERGENCE_METRICS)), "layer"),
              "step": ((("divergence", DIVERGENCE_METRICS),), "decoding step (teacher-forced vs free-running)")}
EVAL_KEYS = ("dense", "pruned", "abs_change", "rel_change")


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


def _numbers(d: Any, prefix: str) -> dict:
    """The numbers (bools included) of the nested dict ``d``, flattened under ``prefix``."""
    return {prefix + k: v for k, v in _flatten(d).items() if isinstance(v, (int, float))}


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
                    if self._wandb is not None:  # its service still holds the failed run's id: a fresh one
                        _tear_down(self._wandb)
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
        import wandb  # here, not at the top: slow to import, and never needed with wandb.mode=disabled

        self._wandb = wandb
        if mode != "online":
            _no_analytics_export(wandb)
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
            dir=str(self.wandb_dir), config=config, settings=settings, id=run_id(ident), resume="allow",
        )
        self._step = int(self.run.step or 0)  # a resumed online run: W&B drops steps below its last one
        # each family of curves has its own x axis (W&B's step stays monotonic across all of them)
        for axis in LINE_PLOTS:
            self.run.define_metric(f"{axis}/index", hidden=True)
            self.run.define_metric(f"{axis}/*", step_metric=f"{axis}/index")
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
        if self._wandb is not None:
            _tear_down(self._wandb)

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

    def log_eval_items(self, items) -> None:
        """The per-item table of :func:`prunerep.evals.items.item_table` as ``eval/items``."""
        if items is not None and len(items):
            self._guard("log_eval_items", self._log_eval_items, items)

    def log_items(self, items) -> None:
        """items.parquet (:mod:`prunerep.probes.items`): each evaluated item's outcome beside its
        measures, as the table ``items``."""
        if items is not None and len(items):
            self._guard("log_items", self._log_items, items)

    def log_summary(self, summary: dict) -> None:
        self._guard("log_summary", self._log_summary, summary)

    def log_completed(self, run_dir) -> None:
        """Log a completed run directory from its files, as the pipeline logs a run it computes:
        a point reused from the completed-points index joins the new sweep's group this way."""
        self._guard("log_completed", self._log_completed, Path(run_dir))

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=int(exit_code))
        except Exception as e:
            self._warn(f"finish failed ({_one_line(e)})")

    # ------------------------------------------------------------------ implementations
    def _table(self, df) -> Any:
        return self._wandb.Table(dataframe=df.reset_index(drop=True))

    def _log_pruning(self, report: dict) -> None:
        wandb = self._wandb
        scalars = _numbers({k: v for k, v in report.items() if k != "modules"}, "pruning/")  # method/... too
        data = dict(scalars)
        modules = report.get("modules") or {}
        if modules:
            rows = [[name, _layer_of(name), name.split(".", 2)[-1], float(frac)] for name, frac in modules.items()]
            data["pruning/modules"] = wandb.Table(columns=["module", "layer", "kind", "zero_fraction"], data=rows)
        method = report.get("method")
        dropped = method.get("dropped") if isinstance(method, dict) else None
        if dropped:
            data["pruning/dropped"] = wandb.Table(columns=["sublayer"], data=[[str(d)] for d in dropped])
        self._log(data)
        self.run.summary.update(scalars)

    def _log_probes(self, df, summary: dict) -> None:
        """The curves of :func:`prunerep.viz.probes.probe_curves`: as history against their own x
        axis (``<axis>/<context>/<space>/<metric>``, so that the runs of a sweep overlay in W&B's
        charts), as tables ``probes/by_<axis>`` and, per space, as line plots (one line per context)."""
        if summary:
            self.run.summary.update(_numbers(summary, "probes/"))
        if df is None or len(df) == 0:
            return
        plots: dict[str, Any] = {}
        for axis, curve in probe_curves(df).items():
            if curve.empty:
                continue
            for x, g in curve.groupby(axis, sort=True):
                row = {f"{axis}/{c}/{s}/{m}": v for c, s, m, v in
                       zip(g["context"], g["space"], g["metric"], g["value"])}
                row[f"{axis}/index"] = int(x)
                self._log(row)
            plots[f"probes/by_{axis}"] = self._table(curve)
            kinds, xlabel = LINE_PLOTS[axis]
            for space, g in curve.groupby("space", sort=True):
                for kind, prefs in kinds:
                    metric = pick_metric(g["metric"].unique(), prefs)
                    if metric is None:  # e.g. the tokens space: agreement only, in the history and table
                        continue
                    sub = g[g["metric"] == metric][["context", axis, "value"]].rename(columns={"value": metric})
                    plots[f"plots/{space}/{kind}_vs_{axis}"] = self._wandb.plot.line(
                        self._table(sub), axis, metric, stroke="context", title=f"{space}: {metric} vs {xlabel}")
        self._log(plots)

    def _log_transitions(self, df) -> None:
        """Sublayer transitions (``probe.transitions``): the curves of
        :func:`prunerep.viz.probes.transition_curves` as a table, and per space and
        comparison a line plot of attention vs MLP against the layer (prompt context)."""
        if df is None or len(df) == 0:
            return
        curves = transition_curves(df)
        if curves.empty:
            return
        plots: dict[str, Any] = {"probes/transitions": self._table(curves)}
        ctx = "prompt" if (curves["context"] == "prompt").any() else "teacher_forced"
        for space, metric, _label in TRANSITION_ROWS:
            for comparison, g in curves[(curves["context"] == ctx) & (curves["space"] == space)
                                        & (curves["metric"] == metric)].groupby("comparison", sort=True):
                tbl = self._table(g[["kind", "layer", "value"]].rename(columns={"value": metric}))
                plots[f"plots/{space}/transitions_{comparison}_{metric}"] = self._wandb.plot.line(
                    tbl, "layer", metric, stroke="kind", title=f"{space}: {metric}, {comparison} (attention vs MLP)")
        self._log(plots)

    def _log_top_tokens(self, top) -> None:
        self._log({"probes/top_tokens": self._table(top)})

    def _log_evals(self, evals: dict) -> None:
        evals = evals or {}
        data, rows = {}, []
        for name, t in (evals.get("tasks") or {}).items():
            if not isinstance(t, dict):
                continue
            data.update({f"eval/{name}/{k}": t[k] for k in EVAL_KEYS if _num(t.get(k)) is not None})
            rows.append([name, str(t.get("type", "")), str(t.get("metric", "")), *(_num(t.get(k)) for k in EVAL_KEYS)])
        data.update({f"eval/{k}": v for k, v in _flatten({"mc_vs_gen_gap": evals.get("mc_vs_gen_gap")}).items()
                     if _num(v) is not None})
        if rows:
            data["eval/table"] = self._wandb.Table(columns=["task", "type", "metric", *EVAL_KEYS], data=rows)
        self._log(data)
        self.run.summary.update({k: v for k, v in data.items() if not k.endswith("/table")})

    def _log_eval_items(self, items) -> None:
        self._log({"eval/items": self._wandb.Table(dataframe=_plain(items))})

    def _log_completed(self, d: Path) -> None:
        if (d / PRUNING_FILE).is_file():
            self._log_pruning(read_json(d / PRUNING_FILE))
        if (d / PROBES_FILE).is_file():
            table = pd.read_parquet(d / PROBES_FILE)
            summary = read_json(d / PROBES_SUMMARY_FILE) if (d / PROBES_SUMMARY_FILE).is_file() else {}
            self._log_probes(table, summary)
            self._log_transitions(table)
        if (d / TOP_TOKENS_FILE).is_file():
            self._log_top_tokens(pd.read_parquet(d / TOP_TOKENS_FILE))
        if (d / EVALS_FILE).is_file():
            self._log_evals(read_json(d / EVALS_FILE))
        if (d / EVAL_ITEMS_FILE).is_file():
            self._log_eval_items(pd.read_parquet(d / EVAL_ITEMS_FILE))
        self._log_summary(read_json(d / SUMMARY_FILE))

    def _log_items(self, items) -> None:
        flat = items.drop(columns=[c for c in ITEM_LIST_COLUMNS if c in items])  # W&B tables take scalars
        self._log({"items": self._table(flat.astype(object).where(flat.notna(), None))})

    def _log_summary(self, summary: dict) -> None:
        keep = {k: v for k, v in summary.items() if k not in ("probes", "traceback")}
        self.run.summary.update({f"run/{k}": v for k, v in _flatten(keep).items()})


# --------------------------------------------------------------------------- helpers

def run_id(identity) -> str:
    """The W&B run id of a point: 16 hex digits from its config hash and its group (the sweep;
    a single run without a group: its run directory). The same point of the same sweep always
    gets the same id, so W&B resumes its run; the same config in another sweep is another run."""
    where = identity.group if identity.group is not None else str(Path(identity.run_dir).resolve())
    return stable_hash("wandb-run", identity.config_hash, where)


def log_report(report: dict, settings, group: str) -> Optional[str]:
    """The sweep report (:func:`prunerep.report.make_report`'s result) as one W&B run of job type
    ``report`` in the sweep's group ``group``: every figure as ``report/<figure>`` (an image), the
    runs table (``report/runs``), the tidy sweep table (``report/sweep``) and the thresholds
    (``report/thresholds``). Its id is derived from the group, with ``resume="allow"``: a report
    made again continues the same run. ``settings``: the sweep's :class:`prunerep.config.WandbConfig`
    (``dir`` null: ``<report dir>/wandb``). Returns the run id; None when W&B is disabled or failed
    (a warning: the report's files are written regardless)."""
    if settings.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    out = Path(report["out_dir"])
    where = Path(os.path.expanduser(str(settings.dir))) if settings.dir else out
    wandb = None
    try:
        import wandb  # here, not at the top: slow to import, and never needed with wandb.mode=disabled

        if settings.mode != "online":
            _no_analytics_export(wandb)
        where.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            mode=settings.mode, project=settings.project or "prunerep", entity=settings.entity or None, group=group,
            job_type="report", name=f"{group}/report", id=stable_hash("wandb-report", group), resume="allow",
            dir=str(where), config={"sweep_group": group, "tolerance_pp": report.get("tolerance_pp")},
            settings=wandb.Settings(init_timeout=float(settings.init_timeout), console="off", silent=True,
                                    reinit="finish_previous"))
        data = {f"report/{Path(f).stem}": wandb.Image(str(f)) for f in report["files"].values()
                if str(f).endswith(".png")}
        data["report/runs"] = wandb.Table(dataframe=_plain(report["runs"]))
        data["report/sweep"] = wandb.Table(dataframe=_plain(report["table"]))
        # thresholds: {model: {pruner: {family: {"unstructured": sp, "nm": sp, ...}}}}, sp a label or None
        rows = [[str(m), str(p), str(f), *(None if e.get(k) is None else str(e[k]) for k in ("unstructured", "nm"))]
                for m, pruners in (report.get("thresholds") or {}).items() for p, fams in pruners.items()
                for f, e in fams.items()]
        data["report/thresholds"] = wandb.Table(columns=["model", "pruner", "family", "unstructured", "nm"], data=rows)
        run.log(data, step=int(run.step or 0))
        run.summary.update({f"report/runs_{k}": int(v) for k, v in (report.get("counts") or {}).items()})
        run_id = run.id
        run.finish(exit_code=0)
        return run_id
    except Exception as e:
        log.warning("wandb: logging the report failed (%s); the report's files are unaffected", _one_line(e))
        if wandb is not None:
            _tear_down(wandb)
        return None


def _plain(df):
    """A table W&B takes: missing values as None (not pandas' NA), one index level."""
    df = df.reset_index(drop=True)
    return df.astype(object).where(df.notna(), None)


def logged_before(identity, settings) -> bool:
    """Whether the W&B directory of this point already holds its run (:func:`run_id`): a reused
    point that was logged into this group once is not logged again."""
    d = settings.dir
    where = Path(os.path.expanduser(str(d))) if d else Path(identity.run_dir)
    return any((where / "wandb").glob(f"*run-*-{run_id(identity)}"))


def _tear_down(wandb, timeout_s: float = 10.0) -> None:
    """After a wandb failure, leave nothing of wandb behind in this process: its service connection
    and its import hooks, which otherwise run (and can raise) on every later import.
    ``wandb.teardown`` removes both, but waits on the service: it runs in a thread given
    ``timeout_s`` (a dead service must not hang the run), so the hooks go first, here, whatever
    becomes of that thread."""
    try:
        hooks = wandb.sdk.lib.import_hooks
        hooks.unregister_all_post_import_hooks()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, hooks.ImportHookFinder)]
        hooks._post_import_hooks_init = False
    except Exception:  # pragma: no cover - wandb's internals moved: its teardown still clears them
        pass

    def teardown():
        try:
            wandb.teardown(exit_code=1)
        except BaseException:  # its sys.exit with the service's exit code included
            pass

    t = threading.Thread(target=teardown, daemon=True, name="wandb-teardown")
    t.start()
    t.join(timeout_s)


def _no_analytics_export(wandb) -> None:
    """An offline run must not touch the network. wandb >= 0.31 exports its own usage metrics
    (OpenTelemetry) to its server from a background thread, and at exit, whatever the run's mode
    (it checks the process-wide setup's mode, not the run's): on a compute node without internet
    that is a DNS lookup and a timeout per export. Turn that exporter off for this process."""
    try:
        proxy = wandb.analytics.opentelemetry.opentelemetry_proxy
    except AttributeError:  # pragma: no cover - wandb before 0.31 has no such exporter
        return
    proxy.disable()


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300]}" if s else type(e).__name__


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdecimal() else -1


__all__ = ["Tracker", "run_id", "logged_before", "log_report"]
