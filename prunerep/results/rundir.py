"""The directories prunerep writes results into, owned by one run at a time, written so that no
user file is ever lost and "complete" is never claimed for a partial result.

* **Recognised by a marker.** ``.prunerep`` (JSON: what it is -- a run or a sweep --, when and by
  which process prunerep created it, and for a run the point it holds) is written when prunerep
  takes a directory. A directory that already exists is accepted only when it is empty or carries
  the marker; anything else -- a user's directory, a file -- is refused before a byte is written.
* **One run at a time.** A run holds ``.prunerep.lock`` (the OS's ``flock``, released when the
  process dies) for its whole life, a sweep ``.prunerep-sweep.lock``; a second run or sweep on a
  locked directory fails in one line.
* **Staged, then moved into place.** A run writes every result file into ``.staging-<pid>/`` inside
  its directory. When it completes, the staged files replace their namesakes (files an earlier run
  wrote: nothing else is touched; the files of the earlier run's manifest that this run did not
  write again go, when unchanged) and ``manifest.json`` -- the sha256 of every file the run
  promises -- is written last. A run is complete exactly when its manifest's files are all there,
  unchanged (:func:`verify`). A failed run removes only its staging directory and leaves a failed
  summary.json, unless the directory holds a complete run, which is kept as it is.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

from filelock import FileLock, Timeout

from prunerep.errors import ConfigError
from prunerep.logs import LOG_FILE
from prunerep.results.schema import SUMMARY_FILE
from prunerep.results.store import atomic_write_json, file_mode, read_json, sha256_file

log = logging.getLogger("prunerep.rundir")

MARKER = ".prunerep"
LOCK = ".prunerep.lock"
SWEEP_LOCK = ".prunerep-sweep.lock"
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
WORK_PREFIX = ".work-"  # a run's scratch (generated eval task files): never a result


def marker(path: Path) -> Optional[dict]:
    """The marker of a directory prunerep created, or None."""
    try:
        m = read_json(Path(path) / MARKER)
        return m if isinstance(m, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_prunerep_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def check_target(path: Path, what: str) -> None:
    """A directory prunerep may write into: absent, empty, or one it created; one line otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={str(path)!r} is a file, not a directory")
    if path.is_dir() and not is_prunerep_dir(path):
        try:
            empty = not any(path.iterdir())
        except OSError as e:
            raise ConfigError(f"{what}={str(path)!r} cannot be read: {e.strerror}") from None
        if not empty:
            raise ConfigError(f"{what}={str(path)!r} is a non-empty directory that prunerep did not create (no "
                              f"{MARKER} marker); choose a new or empty one")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


class _OwnedDirectory:
    """Checks, creates, marks and locks a directory (see the module's doc)."""

    kind = "run"
    lock_name = LOCK

    def __init__(self, path: Path, what: str):
        self.path = Path(path).expanduser().absolute()
        self.what = what
        self.created = False
        self._lock: Optional[FileLock] = None

    def _take(self, point: Optional[dict] = None) -> None:
        check_target(self.path, self.what)
        if not self.path.exists():
            base = _existing_ancestor(self.path)
            if not os.access(base, os.W_OK | os.X_OK):
                raise ConfigError(f"{self.what}={str(self.path)!r} cannot be created: {str(base)!r} is not writable")
            try:
                self.path.mkdir(parents=True)
            except OSError as e:
                raise ConfigError(f"{self.what}={str(self.path)!r} cannot be created: {e.strerror}") from None
            self.created = True
        elif not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"{self.what}={str(self.path)!r} is not writable")
        lock = FileLock(str(self.path / self.lock_name), mode=file_mode())
        try:
            lock.acquire(timeout=0)
            self._lock = lock
        except Timeout:
            raise ConfigError(f"{self.what}={str(self.path)!r} is in use by another prunerep "
                              f"{'sweep' if self.kind == 'sweep' else 'run'}; give this one its own directory") from None
        except (OSError, NotImplementedError) as e:  # a file system without locks (some NFS mounts)
            log.warning("%s is used without a lock (%s): two runs on it at once would mix", self.path, e)
        previous = marker(self.path) or {}
        atomic_write_json(self.path / MARKER, {
            "kind": previous.get("kind", self.kind), "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "pid": os.getpid(), "host": os.uname().nodename, **({"point": point} if point else {})})

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def discard(self) -> None:
        """Bad input found after the directory was taken: leave nothing this invocation made."""
        self.release()
        if self.created:
            for name in (MARKER, self.lock_name, LOG_FILE):
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()  # only when nothing else is in it
            except OSError:
                pass


class SweepDirectory(_OwnedDirectory):
    """A multirun's ``hydra.sweep.dir``, taken before any point starts and held until the sweep ends."""

    kind = "sweep"
    lock_name = SWEEP_LOCK

    def __init__(self, path: Path, what: str = "hydra.sweep.dir"):
        super().__init__(path, what)

    def __enter__(self) -> "SweepDirectory":
        self._take()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirectory(_OwnedDirectory):
    """One run's directory. ``with RunDirectory(path).open(point):`` takes it and makes a fresh
    staging directory; :meth:`complete` or :meth:`fail` ends the run; leaving the block removes
    the staging directory and releases the lock."""

    def __init__(self, path: Path, what: str = "hydra.run.dir"):
        super().__init__(path, what)
        self.staging = self.path / f"{STAGING_PREFIX}{os.getpid()}"
        self.scratch = self.path / f"{WORK_PREFIX}{os.getpid()}"
        self._staging_fd: Optional[int] = None  # held open: its inode cannot be reused by a new directory

    def open(self, point: Optional[dict] = None) -> "RunDirectory":
        """``point``: the run's identity fields, kept in the marker (a run that never ends still says
        what it was)."""
        self._take(point)
        for prefix in (STAGING_PREFIX, WORK_PREFIX):  # of runs that died: the lock is ours
            for stale in self.path.glob(f"{prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.staging.mkdir()
        self._staging_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY)
        return self

    def __enter__(self) -> "RunDirectory":
        if self._staging_fd is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for d in (self.staging, self.scratch):
            shutil.rmtree(d, ignore_errors=True)
        if self._staging_fd is not None:
            os.close(self._staging_fd)
            self._staging_fd = None
        self.release()

    def discard(self) -> None:
        self.close()
        super().discard()

    def _staging_intact(self) -> bool:
        if self._staging_fd is None:
            return False
        try:
            held, now = os.fstat(self._staging_fd), self.staging.stat()
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def complete(self, expected: Iterable[str] = ()) -> dict:
        """Move every staged file into the directory, then write the manifest last; returns it.
        Raises when the staging directory is not the one the run started with (the directory was
        removed or unmounted during the run) or lacks one of the ``expected`` files."""
        if not self._staging_intact():
            raise RuntimeError(f"the staging directory {self.staging} is not the one this run wrote into (the run "
                               f"directory was removed or unmounted during the run): nothing is complete")
        missing = [name for name in expected if not (self.staging / name).exists()]
        if missing:
            raise RuntimeError(f"the run did not write {', '.join(missing)}: nothing is complete")
        files = {rel: sha256_file(self.staging / rel) for rel in _files(self.staging)}
        earlier = _manifest_files(self.path)
        (self.path / MANIFEST).unlink(missing_ok=True)  # from here on the directory reads incomplete
        for name in sorted(p.name for p in self.staging.iterdir()):
            src, dst = self.staging / name, self.path / name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(src, dst)
        for rel, digest in earlier.items():  # the earlier run's files this run did not write again
            old = self.path / rel
            if rel not in files and old.is_file() and sha256_file(old) == digest:
                old.unlink()
        manifest = {"files": files, "completed": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest

    def fail(self, summary: dict) -> None:
        """A failed run: its staged files go and its failed summary is written (see :func:`record_failure`)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        record_failure(self.path, summary)


def record_failure(path: Path, summary: dict) -> bool:
    """Write a failed run's summary.json into ``path``, unless ``path`` holds a complete run (kept as
    it is: a failed attempt never replaces a result) or a failed summary already (the run's own, more
    precise than a launcher's). Returns whether it wrote."""
    path = Path(path)
    if not is_prunerep_dir(path):
        if path.is_dir() and any(path.iterdir()):  # never write into a directory that is not prunerep's
            log.error("%s is not a prunerep run directory: its failure is not recorded there (%s)", path,
                      summary.get("error"))
            return False
        path.mkdir(parents=True, exist_ok=True)  # a point whose job died before it started
        atomic_write_json(path / MARKER, {"kind": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "pid": os.getpid(), "host": os.uname().nodename})
    if verify(path) is None:
        log.error("%s keeps its complete results; this attempt failed: %s", path, summary.get("error"))
        return False
    try:
        if (read_json(path / SUMMARY_FILE) or {}).get("status") == "failed" and summary.get("scheduler_state"):
            return False
    except (OSError, ValueError, AttributeError):
        pass
    atomic_write_json(path / SUMMARY_FILE, summary)
    return True


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]


def _manifest_files(path: Path) -> dict:
    try:
        files = json.loads((Path(path) / MANIFEST).read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def verify(path: Path) -> Optional[str]:
    """None when ``path`` holds a complete run -- its manifest and every file it lists, unchanged --,
    else what is missing or wrong."""
    try:
        files = json.loads((Path(path) / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, digest in files.items():
        f = Path(path) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"{rel} does not match its sha256"
    return None


__all__ = ["MARKER", "LOCK", "SWEEP_LOCK", "MANIFEST", "LOG_FILE", "marker", "is_prunerep_dir", "check_target",
           "SweepDirectory", "RunDirectory", "record_failure", "verify"]
