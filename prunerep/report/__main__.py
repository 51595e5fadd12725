"""``python -m prunerep.report <sweep_dir> [--out DIR] [--tolerance-pp PP]`` (``make report``):
write the report, print a line per run that did not complete and the thresholds, and log the report
to the sweep's W&B group (:func:`prunerep.tracking.log_report`: ``--wandb``, by default the runs'
own ``wandb.*`` settings). Exit 0, or 2 with one ``prunerep.report: error: ...`` line on stderr when
there is nothing to report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

import prunerep.report as report
from prunerep.config import WandbConfig
from prunerep.report.load import read_config
from prunerep.tracking import log_report

WANDB_MODES = ("auto", "offline", "online", "disabled")


def wandb_target(sweep_dir: Path, runs, mode: str = "auto") -> tuple[WandbConfig, str]:
    """The W&B settings and group of the sweep: the ``wandb.*`` of its first run that has a
    config.yaml (else the defaults), ``mode`` unless ``auto``; the group as the runs were given it:
    ``wandb.group``, else the name of the sweep directory."""
    cfgs = (read_config(Path(d)) for d in runs["run_dir"]) if "run_dir" in runs else iter(())
    first = next((c for c in cfgs if isinstance(c.get("wandb"), dict)), {})
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WandbConfig), first.get("wandb") or {}))
    if mode != "auto":
        settings.mode = mode
    return settings, str(settings.group or Path(sweep_dir).resolve().name)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prunerep.report", description=report.__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", help="a multirun directory (outputs/multirun/<date>) or any folder of run dirs")
    ap.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    ap.add_argument("--tolerance-pp", type=float, default=1.0,
                    help="how far (percentage points) below dense a score may fall (default 1)")
    ap.add_argument("--wandb", choices=WANDB_MODES, default="auto",
                    help="log the report to the sweep's W&B group: auto (the runs' wandb.mode), offline, online, "
                         "disabled")
    args = ap.parse_args(argv)
    try:
        res = report.make_report(args.sweep_dir, args.out, args.tolerance_pp)
    except report.ReportError as e:
        print(f"prunerep.report: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in sorted(res["counts"].items()))
    print(f"{len(res['runs'])} run(s): {counts}; {len(res['table'])} rows -> {res['out_dir']}")
    bad = res["runs"][res["runs"]["status"] != "complete"]
    for _, r in bad.iterrows():
        err = r.get("error") if isinstance(r.get("error"), str) and r.get("error") else "no summary.json"
        print(f"  {r['status']}: {r['run']}: {err.splitlines()[0]}")
    print(res["text"])
    settings, group = wandb_target(Path(args.sweep_dir), res["runs"], args.wandb)
    if (run_id := log_report(res, settings, group)) is not None:
        print(f"W&B: report run {run_id} in group {group} ({settings.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
