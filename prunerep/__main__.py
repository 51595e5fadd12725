"""Hydra entrypoint: ``python -m prunerep model=qwen2.5 pruner=wanda sparsity=0.5``.

Bad input fails fast with one line on stderr and exit code 2: unknown config-group options
are caught here before Hydra composes anything; values (sparsity, paths, task names) are
checked by the pipeline before the model is loaded. In a multirun a bad point is recorded
as failed in its own summary.json and the sweep goes on.
"""
from __future__ import annotations

import difflib
import logging
import os
import shutil
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "pruner", "task", "probe", "launcher")
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    print(f"prunerep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """`model=qwen3` -> one line naming the close matches, before Hydra starts."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        options = group_options(key)
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice not in options and not choice.startswith(("choice(", "glob(", "range(")):
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                fail(f"unknown {key} {choice!r}{hint} (available: {', '.join(options)})")


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from prunerep.config import ConfigError, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def main(cfg: DictConfig) -> None:
        from prunerep.models import ModelUnavailable
        from prunerep.pipeline import run

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            summary = run(cfg, run_dir)
        except (ConfigError, ModelUnavailable) as e:
            if multirun:  # recorded in the point's summary.json; the sweep goes on
                logging.getLogger("prunerep").error("point failed: %s", e)
                return None
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written
            fail(str(e))
        except Exception:
            if multirun:
                logging.getLogger("prunerep").exception("point failed (recorded in %s/summary.json)", run_dir)
                return None
            raise
        print(f"prunerep: {summary['status']}: results in {run_dir}", flush=True)
        return None

    main()


def entrypoint() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_group_overrides(sys.argv[1:])
    _main()


if __name__ == "__main__":
    entrypoint()
