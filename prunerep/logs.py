"""One log format for the whole run; third-party chatter in the run's log file, not the console.

A run logs to the console (stdout) and to ``<run dir>/prunerep.log``, both ``[time][logger][LEVEL]
- message`` (a sweep point's console handler is Hydra's, ``conf/hydra/job_logging/prunerep.yaml``;
:func:`configure` adds the rest). Left alone, three things spoil that console:

* libraries log INFO through the root logger (lm-eval's ``Building contexts ...``, ``Setting
  random seed ...``) and flood it;
* transformers, datasets and huggingface_hub keep their own stderr handler and do not
  propagate, so their lines have their own format and never reach the log file;
* ``lm_eval.simple_evaluate(verbosity=...)`` calls ``lm_eval.utils.setup_logging``, which gives
  the ``lm_eval`` logger its own stderr handler and format and stops it propagating (from the
  first lm-eval call on, every lm-eval line looks different); lm-eval's tasks may also call
  ``logging.basicConfig(force=True)``, which replaces the root handlers.

:func:`configure` (called once per run) puts a filter on the
root's console handler(s) that lets through prunerep's (and Hydra's) own records and every
record at WARNING or above; libraries' INFO still reaches the file handler. It routes the
libraries of :data:`THIRD_PARTY` through the root logger at INFO (their own console handlers
removed). ``verbose=True`` leaves the console unfiltered.

:func:`quiet_third_party` wraps lm-eval calls: whatever the call does to the root and the
``lm_eval`` loggers is undone on exit (handlers, levels, propagation), the routing is
re-applied, and, unless verbose, progress bars other than lm-eval's ``Running ... requests``
(datasets' ``Generating test split``, per-task ``Building contexts`` bars, ``Tokenizing
inputs``) are not drawn.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from tqdm import std

#: loggers whose records reach the console at INFO (and below); others only from WARNING
OWN = ("prunerep", "hydra", "__main__")
#: library root loggers routed through the root logger (their INFO to the log file)
THIRD_PARTY = ("lm_eval", "datasets", "transformers", "huggingface_hub", "accelerate", "evaluate", "urllib3",
               "filelock", "fsspec", "wandb", "sacrebleu", "absl")
#: progress bars kept on a quiet console: lm-eval's requests (the long part of an evaluation)
KEEP_BARS = ("Running ",)
#: the format of a log file prunerep adds itself (Hydra's format)
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
#: a run's log file, in its run directory
LOG_FILE = "prunerep.log"


class ConsoleFilter(logging.Filter):
    """Passes prunerep's own records at any level, everyone's from WARNING up."""

    def __init__(self, own: tuple[str, ...] = OWN, level: int = logging.WARNING):
        super().__init__()
        self.own = own
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        name = record.name
        return any(name == o or name.startswith(o + ".") for o in self.own)


@dataclass
class _State:
    configured: bool = False
    verbose: bool = False
    added: list = field(default_factory=list)  # handlers this module added to the root logger
    root_level: Optional[int] = None  # the root's level before configure() (reset() puts it back)
    console: list = field(default_factory=list)  # the root's console handlers at configure()


_STATE = _State()


def _console_streams() -> tuple:
    return tuple(s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None)


def _is_console(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream in _console_streams() or getattr(stream, "name", None) in ("<stdout>", "<stderr>")


def console_handlers(logger: Optional[logging.Logger] = None) -> list[logging.Handler]:
    """The handlers of ``logger`` (root) that write to the terminal."""
    return [h for h in (logger or logging.getLogger()).handlers if _is_console(h)]


def _filter_console(verbose: bool) -> None:
    for h in dict.fromkeys([*_STATE.console, *console_handlers()]):  # the same handlers, even if
        # sys.stdout was replaced since (wandb's console capture)
        for f in [f for f in h.filters if isinstance(f, ConsoleFilter)]:
            h.removeFilter(f)
        if not verbose:
            h.addFilter(ConsoleFilter())


def route_third_party() -> None:
    """Libraries' root loggers: no console handler of their own, records propagate to the root
    logger (whose handlers carry prunerep's format), level INFO so that INFO reaches the file."""
    existing = logging.Logger.manager.loggerDict
    for name in THIRD_PARTY:
        if name not in existing:  # not imported (yet): routed when it is, at the next lm-eval call
            continue
        lg = logging.getLogger(name)
        for h in console_handlers(lg):
            lg.removeHandler(h)
        lg.propagate = True
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)


def configure(run_dir: Optional[Path] = None, verbose: bool = False) -> None:
    """Set the run's logging up (idempotent; call once per run, after Hydra configured logging).

    The root logger is put at INFO; a file handler ``<run_dir>/prunerep.log`` is added when the
    root has no file handler, and a console handler (stdout, :data:`FORMAT`) when it has none (a
    single run, which Hydra does not run)."""
    root = logging.getLogger()
    for h in _STATE.added:
        root.removeHandler(h)
        h.close()
    _STATE.added.clear()
    if _STATE.root_level is None:
        _STATE.root_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    if run_dir is not None and not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / LOG_FILE)
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
        _STATE.added.append(fh)
    if not console_handlers(root):
        ch = logging.StreamHandler(sys.stdout)
        ch.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(ch)
        _STATE.added.append(ch)
    _STATE.configured, _STATE.verbose = True, bool(verbose)
    _STATE.console = console_handlers(root)
    _filter_console(_STATE.verbose)
    route_third_party()
    _quiet_lm_eval_setup()


def reset() -> None:
    """Undo :func:`configure`: its filters, handlers and the root's level."""
    root = logging.getLogger()
    for h in _STATE.added:
        root.removeHandler(h)
        h.close()
    _STATE.added.clear()
    _filter_console(True)
    if _STATE.root_level is not None:
        root.setLevel(_STATE.root_level)
    _STATE.configured, _STATE.verbose, _STATE.console, _STATE.root_level = False, False, [], None


def _quiet_lm_eval_setup() -> None:
    """Tell lm-eval its logging is configured, so ``setup_logging`` never adds its own handler."""
    mod = sys.modules.get("lm_eval.utils")
    if mod is not None and hasattr(mod, "_LOGGING_CONFIGURED"):
        mod._LOGGING_CONFIGURED = True


@contextlib.contextmanager
def _bars_kept(prefixes: tuple[str, ...]) -> Iterator[None]:
    """tqdm bars whose description does not start with one of ``prefixes`` are not drawn."""
    original = std.tqdm.__dict__["__init__"]

    def __init__(self, *args, **kwargs):
        desc = kwargs.get("desc", args[1] if len(args) > 1 else None)
        if len(args) <= 10 and not str(desc or "").startswith(prefixes):
            kwargs["disable"] = True
        return original.__get__(self, type(self))(*args, **kwargs)

    std.tqdm.__init__ = __init__
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@contextlib.contextmanager
def quiet_third_party(verbose: Optional[bool] = None) -> Iterator[None]:
    """Around a third-party call that reconfigures logging (lm-eval): restore the root and
    ``lm_eval`` loggers on exit; unless verbose, draw only the progress bars of
    :data:`KEEP_BARS`. ``verbose`` defaults to :func:`configure`'s (off when not configured)."""
    verbose = _STATE.verbose if verbose is None else verbose
    root, lm = logging.getLogger(), logging.getLogger("lm_eval")
    saved_root = (list(root.handlers), root.level)
    saved_lm = (list(lm.handlers), lm.level, lm.propagate)
    if _STATE.configured:
        route_third_party()
        _quiet_lm_eval_setup()
    try:
        with contextlib.ExitStack() as stack:
            if _STATE.configured and not verbose:
                stack.enter_context(_bars_kept(KEEP_BARS))
            yield
    finally:
        handlers, level = saved_root
        if root.handlers != handlers:  # basicConfig(force=True) or a handler of its own
            for h in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(h)
                h.close()
            root.handlers[:] = handlers  # a closed FileHandler reopens on its next record
        root.setLevel(level)
        handlers, level, propagate = saved_lm
        for h in [h for h in lm.handlers if h not in handlers]:
            lm.removeHandler(h)
        lm.setLevel(level)
        lm.propagate = propagate
        if _STATE.configured:
            _filter_console(_STATE.verbose)
            route_third_party()
            _quiet_lm_eval_setup()
