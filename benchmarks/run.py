"""`make bench`: every benchmark, one after another, each printing its ratios.

    python benchmarks/run.py                  # pruning, probes, the dense-cache lock, memory per stage
    python benchmarks/run.py --quick          # smaller calibration set, no Qwen2.5-7B-shaped head, no 1.5B run
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = [[HERE / "bench_pruning.py"] + (["--nsamples", "8"] if args.quick else []),
            [HERE / "bench_probes.py", "--breakdown"] + (["--skip-7b-head", "--lengths", "256,2048"] if args.quick else []),
            [HERE / "bench_caches.py"],
            [HERE / "bench_memory.py"] + (["--only", "embedded"] if args.quick else [])]
    failed = 0
    for cmd in runs:
        print(f"\n=== {cmd[0].name} ===", flush=True)
        failed += subprocess.run([sys.executable, *map(str, cmd)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
