"""``python -m prunerep.report <sweep_dir> [--out DIR] [--tolerance-pp PP]`` (``make report``):
write the report, print a line per run that did not complete and the thresholds. Exit 0, or 2
with one ``prunerep.report: error: ...`` line on stderr when there is nothing to report."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import prunerep.report as report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prunerep.report", description=report.__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", help="a multirun directory (outputs/multirun/<date>) or any folder of run dirs")
    ap.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    ap.add_argument("--tolerance-pp", type=float, default=1.0,
                    help="how far (percentage points) below dense a score may fall (default 1)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
