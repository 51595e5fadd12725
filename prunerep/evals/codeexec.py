"""Run model-written code: only on opt-in, and only inside an OS-level sandbox.

Policy: nothing runs unless the caller passes ``allow=True`` (the pipeline does so only with
``task.allow_code_execution=true``); otherwise :class:`CodeExecutionRefused` is raised with
:data:`REFUSAL`. It is raised too, with one line saying what is missing, where this machine
offers no isolation (see :func:`isolation`).

Name-blocking inside the interpreter cannot be made safe (``posix.system``, ``ctypes``, a
re-imported module ... all get around it), so the program is isolated by the kernel instead.
Each program runs as ``python -I -S -B program.py`` in a fresh process with an empty
environment (only ``PATH``, ``HOME``/``TMPDIR`` = its temp dir and ``LANG``), stdin closed,
stdout discarded and stderr sent to a file the evaluator reads at most 8 KiB of. The first
isolation of this list that works here is used (probed once per process, by running a
program through it):

``bwrap-root``  (root with the right to create namespaces)
    bubblewrap, as root, makes new mount, PID, network, IPC and UTS namespaces; the program
    sees read-only ``/usr`` and the interpreter's prefix, a private ``/proc`` and ``/dev``
    and its temp dir -- nothing else of the machine -- and drops to a fresh unprivileged uid
    (one per run, with no groups) before the program starts.
``bwrap-userns``  (root without that right but with user namespaces, or any non-root user)
    the same view through an unprivileged user namespace; as root the launcher first drops
    to a fresh uid.
``uid-landlock``  (root, no namespaces: e.g. a Docker container)
    a fresh uid, plus a Landlock ruleset: the temp dir is the only writable place and only
    the system and interpreter directories are readable; TCP is denied.

In every mode the program additionally runs under a seccomp filter (no ``socket()``, so no
network at all; no ptrace, ``process_vm_*``, mount, namespaces, io_uring, bpf, keyrings,
userfaultfd, perf), under Landlock where the kernel has it (required for ``uid-landlock``),
with ``no_new_privs`` and with the resource limits ``RLIMIT_NPROC`` (:data:`MAX_PROCESSES`),
``RLIMIT_CPU`` (``timeout_s`` rounded up, +1), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE``
(16 MiB), ``RLIMIT_NOFILE`` (128) and ``RLIMIT_CORE`` (0). It leads its own session; at its
wall-clock ``timeout_s``, and after it exits in any case, the evaluator SIGKILLs its process
group, waits for bwrap's PID namespace to be gone (the kernel kills all of it when its init
dies, and bwrap's init dies with bwrap) and SIGKILLs every process of the run's uid (root
modes), so no ``setsid`` grandchild survives. Every wait has a timeout.

Memory and temporary files are bounded for the program's whole process tree, not only per
process (``RLIMIT_AS`` alone would let its :data:`MAX_PROCESSES` processes take that many times
``memory_mb``):

* **memory**: where this process may create a memory cgroup (cgroup v1 or v2, e.g. root in most
  containers), the program runs in its own, limited to ``memory_mb`` (swap included where the
  kernel accounts it): a hard bound on everything it starts, enforced by the kernel. Elsewhere the
  evaluator sums the resident memory of the program's processes every :data:`POLL_S` seconds and
  kills them all above ``memory_mb``: a bound up to what they can allocate within one interval.
  The mode in use is :func:`memory_bound`.
* **temporary files**: in the bwrap modes the temp dir is a private tmpfs of
  :data:`TMP_LIMIT` bytes in the program's mount namespace (nothing reaches the host's ``/tmp``);
  in ``uid-landlock`` it is a host directory whose total size is polled like the memory and the
  program killed above :data:`TMP_LIMIT`. Each file is at most 16 MiB in every mode.

A program killed for memory or space fails, with the reason on its stderr tail.
``bwrap-userns`` as a non-root user counts ``RLIMIT_NPROC`` per user namespace only on Linux >=
5.14. A run costs about 0.1-0.2 s more than a bare ``python`` (bwrap and a second interpreter start).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class CodeExecutionRefused(RuntimeError):
    """Code execution was requested without the user's opt-in, or cannot be isolated here."""


REFUSAL = ("code execution is disabled: task.allow_code_execution=false (set it to true to run "
           "model-written code in prunerep's OS-level sandbox)")

MAX_PROCESSES = 32        # RLIMIT_NPROC of the run's uid: processes and threads together
FILE_SIZE_LIMIT = 16 << 20
TMP_LIMIT = 64 << 20      # bytes of the program's temp dir, all files together
POLL_S = 0.01             # the watch on memory (without a cgroup) and temp-dir size (without a tmpfs)
OPEN_FILES_LIMIT = 128
STDERR_TAIL_CHARS = 2000
_READ_CAP = 8192          # bytes of the program's stderr the evaluator ever reads
_KILL_WAIT_S = 10.0       # bound on each wait after a SIGKILL
_PROBE_TIMEOUT_S = 60.0
_UID_BASE, _UID_SPAN = 1_700_000_000, 100_000_000  # fresh uids: no user, file or process has them
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs first inside the sandbox, as ``python -I -S -c _BOOTSTRAP <json>``: drops to the run's
# uid (where given), sets the limits, no_new_privs, Landlock and seccomp, then execs the
# program in a fresh interpreter. Exit status 125 (+ a line on stderr): the sandbox could not
# be set up.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
def fail(msg):
    os.write(2, ("prunerep sandbox: " + msg + "\n").encode())
    os._exit(125)
try:
    if cfg["uid"] is not None:
        u = cfg["uid"]
        os.setgroups([])
        os.setresgid(u, u, u)
        os.setresuid(u, u, u)
        if os.getresuid() != (u, u, u) or os.getresgid() != (u, u, u) or os.getgroups():
            fail("could not drop to uid %d" % u)
    if os.getuid() == 0 or os.geteuid() == 0:
        fail("refusing to run the program as root")
    os.chdir(cfg["work"])
    for name, value in cfg["limits"].items():
        lim = getattr(resource, name)
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(lim, (soft, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        fail("no_new_privs: " + os.strerror(ctypes.get_errno()))

    # ---- Landlock: writes only under the temp dir, reads only of the allowed paths, no TCP
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    if abi < 1:
        if cfg["landlock"] == "required":
            fail("Landlock is not available: " + os.strerror(ctypes.get_errno()))
    else:
        EXEC, WRITE, READ, READ_DIR = 1, 2, 4, 8
        fs = (1 << 13) - 1                       # ABI 1: execute .. make_sym
        if abi >= 2: fs |= 1 << 13               # refer
        if abi >= 3: fs |= 1 << 14               # truncate
        file_rights = EXEC | WRITE | READ | (1 << 14)
        class Attr(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
        class Beneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
        attr = Attr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # tcp bind+connect; abstract unix+signals
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        rfd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if rfd < 0:
            fail("landlock_create_ruleset: " + os.strerror(ctypes.get_errno()))
        def allow(path, rights):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                r = rights & fs & (~0 if os.path.isdir(path) else file_rights)
                rule = Beneath(r, fd)
                if r and libc.syscall(445, ctypes.c_int(rfd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    fail("landlock_add_rule %s: %s" % (path, os.strerror(ctypes.get_errno())))
            finally:
                os.close(fd)
        for p in cfg["read_exec"]:
            allow(p, EXEC | READ | READ_DIR)
        for p in cfg["read_files"]:
            allow(p, READ)
        for p in cfg["rw_files"]:
            allow(p, READ | WRITE | (1 << 14))
        allow(cfg["work"], fs & ~EXEC)
        if libc.syscall(446, ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
            fail("landlock_restrict_self: " + os.strerror(ctypes.get_errno()))
        os.close(rfd)

    # ---- seccomp: deny sockets, debugging of other processes, mounts, namespaces, ...
    arch, nr = cfg["seccomp"]["arch"], cfg["seccomp"]["nr"]
    def ins(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000, 0x80000000
    prog = [ins(LD, 4), ins(JEQ, arch, 1, 0), ins(RET, KILL), ins(LD, 0)]
    if cfg["seccomp"]["x32"]:
        prog += [ins(JGE, 0x40000000, 0, 1), ins(RET, ERRNO | 1)]
    for n, err in cfg["seccomp"]["deny"]:
        prog += [ins(JEQ, n, 0, 1), ins(RET, ERRNO | err)]
    # clone() creating namespaces (flags are its first argument)
    prog += [ins(JEQ, nr["clone"], 0, 3), ins(LD, 16), ins(JSET, 0x7E020080, 0, 1), ins(RET, ERRNO | 1),
             ins(RET, ALLOW)]
    buf = ctypes.create_string_buffer(b"".join(prog))
    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = FProg(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(22, 2, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p).value, 0, 0) != 0:
        fail("seccomp: " + os.strerror(ctypes.get_errno()))
    os.closerange(3, 1 << 16)
except SystemExit:
    raise
except BaseException as e:
    fail("%s: %s" % (type(e).__name__, e))
py = cfg["python"]
os.execve(py, [py, "-I", "-S", "-B", cfg["program"]], cfg["env"])
'''

# syscall numbers of the seccomp filter, per architecture
_SECCOMP = {
    "x86_64": {"arch": 0xC000003E, "x32": True, "nr": {
        "socket": 41, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "clone": 56, "clone3": 435, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "pidfd_getfd": 438, "open_by_handle_at": 304}},
    "aarch64": {"arch": 0xC00000B7, "x32": False, "nr": {
        "socket": 198, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
        "clone": 220, "clone3": 435, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "keyctl": 219, "add_key": 217, "request_key": 218, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "pidfd_getfd": 438, "open_by_handle_at": 265}},
}
_EPERM, _EACCES, _ENOSYS = 1, 13, 38


def _seccomp_config() -> dict | None:
    spec = _SECCOMP.get(os.uname().machine)
    if spec is None:
        return None
    nr = spec["nr"]
    # clone3 -> ENOSYS so that libc falls back to clone(), whose flags the filter can see
    deny = [[nr["socket"], _EACCES], [nr["clone3"], _ENOSYS]]
    deny += [[n, _EPERM] for k, n in nr.items() if k not in ("socket", "clone3", "clone")]
    return {"arch": spec["arch"], "x32": spec["x32"], "nr": nr, "deny": deny}


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" (a limit of memory or space included) | "timeout"
    returncode: int | None
    seconds: float
    pid: int  # also the id of the process group that was killed
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- the sandbox

def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(p)


def _interpreters(host_access_by_other_uid: bool) -> list[str]:
    """Interpreters to run programs with: this one's base interpreter first; where a fresh uid
    must reach it through the host's file system, also the system's python3."""
    exe = _real(getattr(sys, "_base_executable", None) or sys.executable)
    found = [exe]
    if host_access_by_other_uid:
        for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(cand) and _real(cand) not in found:
                found.append(_real(cand))
    return found


def _prefix_dirs(exe: str) -> list[str]:
    """Directories the interpreter needs: its bin dir and prefix (stdlib, shared libs)."""
    dirs = [os.path.dirname(exe), os.path.dirname(os.path.dirname(exe))]
    if exe == _real(getattr(sys, "_base_executable", None) or sys.executable):
        dirs += [_real(sys.base_prefix), _real(sys.base_exec_prefix)]
    out: list[str] = []
    for d in dirs:
        if d not in ("/", "") and not any(d == o or d.startswith(o + "/") for o in out + list(_SYSTEM_DIRS)):
            out = [o for o in out if not o.startswith(d + "/")] + [d]
    return out


def _others_can_traverse(path: str) -> bool:
    p = Path(_real(path))
    for d in [p, *p.parents]:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


@dataclass
class _Sandbox:
    mode: str         # "bwrap-root" | "bwrap-userns" | "uid-landlock"
    python: str
    bwrap: str | None = None
    fresh_uid: bool = False     # each run gets its own uid (needs root)
    landlock: str = "optional"  # "required" in uid-landlock
    tmp_base: str | None = None
    tmpfs: bool = False         # the temp dir is a private tmpfs (bwrap with --size)

    # ---- one run
    def run(self, source: str, timeout_s: float, memory_mb: int) -> ExecResult:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if self.fresh_uid else None
        priv = tempfile.mkdtemp(prefix="prunerep-exec-out-")  # the evaluator's only: stderr
        work = tempfile.mkdtemp(prefix="prunerep-exec-", dir=self.tmp_base)  # the program's only
        limit = int(memory_mb) << 20
        cgroup = _RunCgroup.make(limit, owner=uid if self.mode == "bwrap-userns" else None)
        proc = info_r = None
        killed_for = ""
        try:
            os.chmod(work, 0o700)
            prog = os.path.join(work, "program.py")
            with open(prog, "w", encoding="utf-8") as f:
                f.write(source)
            if uid is not None:
                os.chown(work, uid, uid)
                os.chown(prog, uid, uid)
            err_path = os.path.join(priv, "stderr")
            info_r, info_w = os.pipe() if self.bwrap else (None, None)  # bwrap tells its init's pid
            argv = self._argv(work, prog, uid, timeout_s, memory_mb, info_w)
            if cgroup is not None:  # enters its cgroup before anything else runs, then becomes the sandbox
                argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup.procs, *argv]
            try:
                with open(err_path, "wb") as err:
                    kw = {}
                    if uid is not None and self.mode == "bwrap-userns":
                        kw = dict(user=uid, group=uid, extra_groups=[])  # bwrap itself runs unprivileged
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(
                        argv, env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        start_new_session=True, close_fds=True,
                        pass_fds=() if info_w is None else (info_w,), **kw)
            finally:
                if info_w is not None:
                    os.close(info_w)
            # bwrap reports its PID namespace's init as soon as it runs: hold on to it (a pidfd),
            # to see the namespace gone (bwrap itself may return before that)
            ns_init = _namespace_init(info_r, timeout_s)
            timed_out, killed_for = self._watch(proc, t0, timeout_s, limit, cgroup, work, uid)
            seconds = time.perf_counter() - t0
            self._kill_all(proc, uid, ns_init)
            if cgroup is not None and cgroup.oom_killed():
                killed_for = f"its processes together reached memory_mb={memory_mb} (memory cgroup)"
            tail = _read_tail(err_path)
        finally:
            if proc is not None and proc.returncode is None:
                self._kill_all(proc, uid, None)
            if info_r is not None:
                os.close(info_r)
            if cgroup is not None:
                cgroup.remove()
            _remove_tree(work)
            _remove_tree(priv)
        rc = proc.returncode
        if killed_for:
            status, tail = "failed", (tail + f"\nprunerep sandbox: killed: {killed_for}\n")[-STDERR_TAIL_CHARS:]
        elif timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc in self._limit_codes():  # RLIMIT_CPU's SIGXCPU, or a SIGKILL: out of time
            status = "timeout"
        else:
            status = "failed"
        return ExecResult(status, rc, seconds, proc.pid, tail)

    def _watch(self, proc: subprocess.Popen, t0: float, timeout_s: float, limit: int,
               cgroup: "_RunCgroup | None", work: str, uid: int | None) -> tuple[bool, str]:
        """Wait for the program until ``timeout_s``; without a memory cgroup, watch the resident
        memory of its processes, without a tmpfs the size of its temp dir. (timed out, why killed)."""
        watch_memory, watch_disk = cgroup is None, not self.tmpfs
        while True:
            left = timeout_s - (time.perf_counter() - t0)
            if left <= 0:
                return True, ""
            try:
                proc.wait(timeout=min(left, POLL_S) if (watch_memory or watch_disk) else left)
                return False, ""
            except subprocess.TimeoutExpired:
                pass
            if watch_memory and (rss := _tree_rss(proc.pid, uid)) > limit:
                return False, f"its processes together used {rss >> 20} MB, over memory_mb={limit >> 20}"
            if watch_disk and (size := _tree_size(work)) > TMP_LIMIT:
                return False, f"its temp dir holds {size >> 20} MiB, over {TMP_LIMIT >> 20} MiB"

    def _limit_codes(self) -> tuple[int, ...]:
        codes = (-signal.SIGXCPU, -signal.SIGKILL)
        if self.bwrap:  # bubblewrap reports a signalled child as 128 + signal
            codes += (128 + signal.SIGXCPU, 128 + signal.SIGKILL)
        return codes

    def _argv(self, work: str, prog: str, uid: int | None, timeout_s: float, memory_mb: int,
              info_fd: int | None = None) -> list[str]:
        cpu = int(math.ceil(timeout_s)) + 1
        mem = int(memory_mb) << 20
        cfg = {
            "uid": uid if self.mode != "bwrap-userns" else None,
            "work": work, "program": prog, "python": self.python, "landlock": self.landlock,
            "limits": {"RLIMIT_NPROC": MAX_PROCESSES, "RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": mem,
                       "RLIMIT_FSIZE": FILE_SIZE_LIMIT, "RLIMIT_NOFILE": OPEN_FILES_LIMIT, "RLIMIT_CORE": 0},
            "read_exec": [*(_real(d) for d in _SYSTEM_DIRS if os.path.exists(d)), *_prefix_dirs(self.python)],
            "read_files": ["/etc/ld.so.cache", "/dev/urandom", "/dev/random", "/dev/zero"],
            "rw_files": ["/dev/null"],
            "seccomp": _seccomp_config(),
            "env": {"PATH": _SANDBOX_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
        }
        boot = [self.python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)]
        if not self.bwrap:
            return boot
        argv = [self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
        if info_fd is not None:
            argv += ["--info-fd", str(info_fd)]
        if self.mode == "bwrap-root":  # no user namespace: the bootstrap switches to the fresh uid
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user"]
        made: set[str] = {"/"}

        def parents(path: str) -> list[str]:
            out = []
            for d in reversed(Path(path).parents):
                if str(d) not in made:
                    made.add(str(d))
                    out += ["--perms", "0755", "--dir", str(d)]
            return out

        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        for d in _prefix_dirs(self.python):
            argv += parents(d) + ["--ro-bind", d, d]
            made.add(d)
        if os.path.exists("/etc/ld.so.cache"):
            argv += parents("/etc/ld.so.cache") + ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        if self.tmpfs:  # the program's files live in its own namespace, bounded: never on the host
            argv += parents(work) + ["--size", str(TMP_LIMIT), "--perms", "1777", "--tmpfs", work,
                                     "--ro-bind", prog, prog, "--remount-ro", "/"]
        else:
            argv += parents(work) + ["--bind", work, work, "--remount-ro", "/"]
        return argv + boot

    def _kill_all(self, proc: subprocess.Popen, uid: int | None, ns_init: int | None) -> None:
        """SIGKILL the process group, wait for the PID namespace to die with bwrap (its init
        gets SIGKILL when bwrap dies, and the kernel kills the rest), then SIGKILL every
        process of the run's uid, wherever it moved (another session, group or parent)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        if ns_init is not None:
            try:
                _readable(ns_init, _KILL_WAIT_S)  # a pidfd turns readable once the process has exited
            finally:
                os.close(ns_init)
        if uid is not None:
            _kill_uid(uid)


def _namespace_init(info_r: int | None, timeout_s: float) -> int | None:
    """A pidfd of the init of bwrap's PID namespace (``"child-pid"`` of its ``--info-fd``
    JSON, which may arrive in pieces), or None."""
    if info_r is None:
        return None
    data, deadline = b"", time.monotonic() + timeout_s
    while len(data) < 4096:
        m = re.search(rb'"child-pid"\s*:\s*(\d+)\s*[,}]', data)
        if m:
            try:
                return os.pidfd_open(int(m.group(1)))
            except (OSError, AttributeError):
                return None
        if not _readable(info_r, max(0.0, deadline - time.monotonic())):
            return None
        chunk = os.read(info_r, 4096)
        if not chunk:
            return None
        data += chunk
    return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _tree_rss(root: int, uid: int | None) -> int:
    """Resident bytes of ``root`` and its descendants (bwrap's PID namespace reparents orphans to its
    init, inside the tree), and of every process of ``uid`` (an orphan outside a namespace)."""
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += _children(pid)
    if uid is not None:
        seen.update(_live_processes_of(uid))
    return sum(_rss(pid) for pid in seen)


def _tree_size(path: str) -> int:
    """Bytes allocated under ``path`` (never following a link)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class _RunCgroup:
    """A memory cgroup of one run, under the one this process is in (see :func:`_cgroup_parent`)."""

    def __init__(self, path: str, version: str):
        self.path, self.version = path, version
        self.procs = os.path.join(path, "cgroup.procs")

    @classmethod
    def make(cls, limit: int, owner: int | None = None) -> "_RunCgroup | None":
        parent = _cgroup_parent()
        if parent is None:
            return None
        version, base = parent
        path = os.path.join(base, f"prunerep-exec-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            box = cls(path, version)
            box._limit(limit)
            if owner is not None:  # the sandbox starts unprivileged and moves itself in
                for name in ("cgroup.procs", "tasks"):
                    if os.path.exists(os.path.join(path, name)):
                        os.chown(os.path.join(path, name), owner, owner)
            return box
        except OSError:
            _rmdir_quietly(path)
            return None

    def _limit(self, limit: int) -> None:
        if self.version == "v2":
            _write(os.path.join(self.path, "memory.max"), limit)
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                _write(os.path.join(self.path, "memory.swap.max"), 0)
        else:
            _write(os.path.join(self.path, "memory.limit_in_bytes"), limit)
            if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(self.path, "memory.memsw.limit_in_bytes"), limit)

    def oom_killed(self) -> bool:
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name)) as f:
                fields = dict(line.split() for line in f if len(line.split()) == 2)
            if "oom_kill" in fields:
                return int(fields["oom_kill"]) > 0
            with open(os.path.join(self.path, "memory.failcnt")) as f:  # older v1 kernels
                return int(f.read()) > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        deadline = time.monotonic() + _KILL_WAIT_S
        while os.path.isdir(self.path) and time.monotonic() < deadline:
            if _rmdir_quietly(self.path):
                return
            time.sleep(0.005)  # the last processes are still exiting


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _rmdir_quietly(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


@functools.cache  # probed once per process
def _cgroup_parent() -> tuple[str, str] | None:
    """("v1" | "v2", directory) of this process's memory cgroup when it may create limited
    children in it (tried: a child is made, limited and removed), else None."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [ln.strip().split(":", 2) for ln in f if ln.count(":") >= 2]
    except OSError:
        return None
    candidates = []
    for _id, controllers, rel in lines:
        if "memory" in controllers.split(","):
            candidates.append(("v1", f"/sys/fs/cgroup/memory{rel}"))
        elif controllers == "":
            for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    candidates.append(("v2", f"{mount}{rel}"))
    for version, base in candidates:
        probe = os.path.join(base, f"prunerep-probe-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            _RunCgroup(probe, version)._limit(64 << 20)
            return version, base.rstrip("/")
        except OSError:
            continue
        finally:
            _rmdir_quietly(probe)
    return None


def memory_bound() -> str:
    """How the memory of a program's whole process tree is bounded here: ``"cgroup v1"``,
    ``"cgroup v2"`` (the kernel's hard limit) or ``"polled"`` (see the module's doc)."""
    parent = _cgroup_parent()
    return f"cgroup {parent[0]}" if parent else "polled"


def _readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()  # not select.select: fds past 1024 are common in a big evaluator
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


def _kill_uid(uid: int) -> None:
    """kill(-1, SIGKILL) as ``uid`` -- every process that uid may signal, i.e. all of its own,
    wherever it moved -- until none is left alive (bounded by :data:`_KILL_WAIT_S`)."""
    script = "i=0; while [ $i -lt 100 ]; do kill -9 -1 2>/dev/null || exit 0; i=$((i+1)); done"
    deadline = time.monotonic() + _KILL_WAIT_S
    while True:
        try:
            killer = subprocess.Popen(["/bin/sh", "-c", script], user=uid, group=uid, extra_groups=[],
                                      env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
            killer.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, subprocess.SubprocessError):
            pass
        if not _live_processes_of(uid) or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _live_processes_of(uid: int) -> list[int]:
    """Pids whose real or effective uid is ``uid`` and that are not yet zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read(4096)
            fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
            uids = [int(x) for x in fields[b"Uid"].split()[:2]]
            if uid in uids and not fields[b"State"].strip().startswith((b"Z", b"X")):
                found.append(int(entry))
        except (OSError, KeyError, ValueError):
            pass
    return found


def _read_tail(path: str) -> str:
    """The last :data:`STDERR_TAIL_CHARS` characters, reading at most :data:`_READ_CAP` bytes."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _READ_CAP))
            data = f.read(_READ_CAP)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]


def _remove_tree(path: str) -> None:
    """Remove a temp dir whatever modes the program left in it (never following a link)."""
    if not os.path.lexists(path):
        return
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            try:
                if stat.S_ISDIR(os.lstat(p).st_mode):
                    os.chmod(p, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def _tmp_base(fresh_uid_on_host: bool) -> str | None:
    base = tempfile.gettempdir()
    if fresh_uid_on_host and not _others_can_traverse(base):
        return "/tmp"
    return None


def _candidates() -> list[_Sandbox]:
    """Sandboxes to try, strongest first."""
    root = os.geteuid() == 0
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin", "/usr/local/bin"])
    bwrap = shutil.which("bwrap", path=search)
    out: list[_Sandbox] = []
    tmpfs = bool(bwrap) and _bwrap_sizes_tmpfs(bwrap)
    if bwrap and root:
        out += [_Sandbox("bwrap-root", py, bwrap, fresh_uid=True, tmpfs=tmpfs) for py in _interpreters(False)]
    if bwrap:
        # as root: the launcher drops to a fresh uid first, so the interpreter must be reachable by it
        out += [_Sandbox("bwrap-userns", py, bwrap, fresh_uid=root, tmp_base=_tmp_base(root), tmpfs=tmpfs)
                for py in _interpreters(root)]
    if root:
        out += [_Sandbox("uid-landlock", py, None, fresh_uid=True, landlock="required",
                         tmp_base=_tmp_base(True)) for py in _interpreters(True)]
    return out


def _bwrap_sizes_tmpfs(bwrap: str) -> bool:
    """Whether this bubblewrap can size a tmpfs (``--size``, bubblewrap >= 0.7)."""
    try:
        return "--size" in subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False


_PROBE = r'''
import os, sys
assert os.getuid() != 0 and os.geteuid() != 0, "runs as root"
try:
    import socket
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    raise SystemExit("could create an internet socket")
except OSError:
    pass
open("probe.txt", "w").write("ok")
assert open("probe.txt").read() == "ok"
'''


def _probe(box: _Sandbox) -> str | None:
    """None if ``box`` runs a program as intended here, else why not (one line)."""
    if _seccomp_config() is None:
        return f"no seccomp filter for the {os.uname().machine} architecture"
    try:
        res = box.run(_PROBE, _PROBE_TIMEOUT_S, 512)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    if res.passed:
        return None
    lines = [ln.strip() for ln in res.stderr_tail.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {res.returncode}"


@functools.cache  # the machine does not change while this process runs: probed once
def _select_sandbox() -> _Sandbox | str:
    """The strongest sandbox that works here, or why none does (one line)."""
    reasons, boxes = [], _candidates()
    for box in boxes:
        why = _probe(box)
        if why is None:
            return box
        reasons.append(f"{box.mode} ({box.python}): {why}")
    if not any(b.bwrap for b in boxes):
        reasons.append("bubblewrap (bwrap) is not installed")
    return ("code execution refused: no OS-level sandbox works on this machine (" + "; ".join(reasons)
            + "). Install bubblewrap (`make setup` runs scripts/sandbox-setup.sh), or run as root on a kernel "
            "with Landlock and seccomp.")


def _sandbox() -> _Sandbox:
    """The sandbox of :func:`_select_sandbox`; CodeExecutionRefused if none works."""
    box = _select_sandbox()
    if isinstance(box, str):
        raise CodeExecutionRefused(box)
    return box


def isolation() -> str:
    """The isolation model-written code gets here, e.g. ``"bwrap-root"``;
    :class:`CodeExecutionRefused` where there is none."""
    return _sandbox().mode


def run_program(source: str, *, allow: bool, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``source`` (a complete Python program) in the sandbox; exit status 0 means passed.

    Raises :class:`CodeExecutionRefused` unless ``allow`` is true, or where no sandbox works."""
    if not allow:
        raise CodeExecutionRefused(REFUSAL)
    return _sandbox().run(source, float(timeout_s), int(memory_mb))


# --------------------------------------------------------------------------- HumanEval

def humaneval_program(doc: dict, completion: str) -> str:
    """The program whose exit status is the pass/fail of a HumanEval completion."""
    return (doc["prompt"] + completion + "\n\n" + doc["test"] + "\n\n"
            + f"check({doc['entry_point']})\n")


def humaneval_process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` hook of the offline ``humaneval`` task (pass@1, greedy). lm-eval
    hands it the document only, so the opt-in and the limits are the document's
    (:mod:`prunerep.evals.taskfiles` writes them from the task settings)."""
    res = run_program(humaneval_program(doc, results[0]), allow=bool(doc.get("allow_code_execution")),
                      timeout_s=float(doc.get("timeout_s", 5.0)), memory_mb=int(doc.get("memory_mb", 1024)))
    return {"pass@1": 1.0 if res.passed else 0.0}
