"""Small side-effect helpers shared by every stage: atomic writes, stable hashes, checksummed
cache entries and the locks that let one process compute a cache entry while others wait."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

log = logging.getLogger("prunerep.io")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan" / "inf": visible, never silently dropped
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def file_mode() -> int:
    """0666 less the process's umask: the permissions of any file the user creates (so that a
    collaborator on a shared cluster reads the results; mkstemp alone makes them 0600). Read
    from /proc (thread-safe) where it can be, else by setting and restoring the umask."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A killed process (or a crashed machine) leaves either the old file or the new one, never
    half of one. The file gets the user's usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let `writer(tmp_path)` produce a file (parquet, png, safetensors...), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        writer(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stable_hash(*objs: Any, length: int = 16) -> str:
    """Hash of JSON-serialisable objects, independent of dict order."""
    payload = json.dumps(_jsonable(list(objs)), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


# --------------------------------------------------------------------------- checksummed cache entries
#
# Every on-disk cache entry (the dense probe reference, the dense eval scores, the dequantised model)
# carries a sha256 of its contents. A reader verifies it before use; an entry that does not match (a
# file overwritten in place, truncated, replaced by ``{}``) is never used: the caller warns, naming
# the entry, and computes it again.

#: what :func:`check_entry`-style verifiers return for an entry that simply is not there (no warning)
ABSENT = "absent"


class CacheInvalid(ValueError):
    """A cache entry that is unreadable or does not match its checksum: never to be used."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# path -> (stat signature, digest): a file verified once in this process is not hashed again unless
# it changed (size, mtime, ctime or inode: a rewrite changes the ctime even when mtime is restored)
_DIGESTS: dict[str, tuple[tuple, str]] = {}


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 of a file's bytes (memoised per process while the file is unchanged)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        sig = _signature(os.fstat(f.fileno()))
        known = _DIGESTS.get(path)
        if known is not None and known[0] == sig:
            return known[1]
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    _DIGESTS[path] = (sig, digest)
    return digest


def atomic_write_checked_bytes(path: str | os.PathLike, data: bytes) -> str:
    """:func:`atomic_write_bytes`, returning the sha256 of what was written."""
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _json_digest(payload: Any) -> str:
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return sha256_bytes(canon.encode("utf-8"))


def write_checked_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``{"sha256": <digest of payload>, "payload": payload}`` atomically."""
    payload = json.loads(json.dumps(_jsonable(payload)))  # exactly what a reader will see
    return atomic_write_json(path, {"sha256": _json_digest(payload), "payload": payload})


def read_checked_json(path: str | os.PathLike) -> Any:
    """The payload of a :func:`write_checked_json` file. FileNotFoundError when there is none;
    CacheInvalid when it is unreadable, not in that format, or does not match its checksum."""
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CacheInvalid(f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or set(entry) != {"sha256", "payload"}:
        raise CacheInvalid("not a checksummed cache entry (no sha256/payload)")
    try:
        digest = _json_digest(entry["payload"])
    except ValueError as e:
        raise CacheInvalid(f"unreadable payload ({e})") from None
    if digest != entry["sha256"]:
        raise CacheInvalid("payload does not match its sha256")
    return entry["payload"]


def write_dir_checksums(directory: str | os.PathLike, name: str = "checksums.json") -> Path:
    """Record the sha256 of every file under `directory` (but `name`) in ``directory/name``."""
    d = Path(directory)
    files = {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.relative_to(d).as_posix() != name}
    return write_checked_json(d / name, {"files": files})


def verify_dir_checksums(directory: str | os.PathLike, name: str = "checksums.json") -> str | None:
    """None when every file :func:`write_dir_checksums` recorded is there with its sha256;
    :data:`ABSENT` when the directory does not exist; else what is wrong (naming the file)."""
    d = Path(directory)
    if not d.is_dir():
        return ABSENT
    try:
        files = read_checked_json(d / name)["files"]
    except FileNotFoundError:
        return f"{name} is missing"
    except (CacheInvalid, KeyError, TypeError) as e:
        return f"{name}: {e}"
    for rel, want in sorted(files.items()):
        try:
            if sha256_file(d / rel) != want:
                return f"{rel} does not match its sha256"
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as e:
            return f"{rel} is unreadable ({e})"
    return None


# --------------------------------------------------------------------------- cache locks

#: seconds a process waits for another one computing the same cache entry, before it computes the
#: entry itself (a holder that is alive but stuck, or a lock file system that never releases)
LOCK_TIMEOUT_ENV = "PRUNEREP_CACHE_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 4 * 3600.0
#: ``none`` turns the cache locks off (benchmarks; file systems whose locks hang)
LOCK_MODE_ENV = "PRUNEREP_CACHE_LOCK"


def lock_timeout() -> float:
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.0f", LOCK_TIMEOUT_ENV,
                    os.environ.get(LOCK_TIMEOUT_ENV), DEFAULT_LOCK_TIMEOUT_S)
        return DEFAULT_LOCK_TIMEOUT_S


def lock_file(entry: str | os.PathLike) -> Path:
    """The lock of a cache entry (a file or a directory): ``<entry>.lock`` beside it."""
    entry = Path(entry)
    return entry.with_name(f"{entry.name}.lock")


@contextlib.contextmanager
def cache_lock(entry: str | os.PathLike, what: str | None = None, timeout: float | None = None):
    """Hold ``<entry>.lock`` while computing one cache entry, so that of the processes that need
    it at once (the tasks of a SLURM array, on any host of a shared file system) one computes it
    and the others wait, then find it in the cache. Callers check the cache again once inside.

    The lock is :mod:`filelock`'s: the OS's ``flock`` (NFSv4, Lustre, GPFS, local disks), which the
    kernel releases when its holder dies, so a killed holder never blocks anyone (filelock falls
    back to a lock file where the file system has no ``flock``). A waiter that has not had the lock
    after `timeout` seconds (``$PRUNEREP_CACHE_LOCK_TIMEOUT_S``, default 4 h) warns and goes on
    without it; so does one whose file system cannot lock. Entries are written atomically, so
    the worst case is the same entry computed twice. Yields whether the lock is held."""
    entry = Path(entry)
    what = what or str(entry)
    if os.environ.get(LOCK_MODE_ENV, "").lower() in ("none", "off", "0", "false"):
        yield False
        return
    timeout = lock_timeout() if timeout is None else float(timeout)
    path = lock_file(entry)
    held = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), mode=file_mode())
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another process is computing it; waiting (lock %s, at most %.0fs)", what, path, timeout)
            t0 = time.monotonic()
            lock.acquire(timeout=timeout)
            log.info("%s: waited %.1fs for the other process", what, time.monotonic() - t0)
        held = True
    except Timeout:
        log.warning("%s: still locked by another process after %.0fs (%s); computing it here as well. If "
                    "no process is computing it, delete %s", what, timeout, LOCK_TIMEOUT_ENV, path)
    except (OSError, NotImplementedError, RuntimeError) as e:
        log.warning("%s: cannot lock %s (%s: %s); computing it without the lock", what, path,
                    type(e).__name__, e)
    try:
        yield held
    finally:
        if held:
            lock.release()
