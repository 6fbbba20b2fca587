"""Run untrusted Python in its own process tree, with resource limits, a wall-clock timeout and, where Linux allows,
its own namespaces (``Sandbox``; ``rollflow sandbox run FILE`` on the command line).

What a run gets: a private working directory (removed afterwards) holding the program; a scrubbed environment (a
minimal PATH, LANG, HOME and TMPDIR set to the working directory, nothing of the caller's); ``python -I -B`` (isolated
mode: no PYTHON* variables, no user site, not even the script's directory on ``sys.path``); and, set with
``setrlimit`` in the child, limits on CPU seconds, address space, file size, processes, open files, and no core files.
Its stdout and stderr are read as they come; one byte past ``output_bytes`` on either and the program is killed
(``output_limit``). At the wall timeout, or as soon as the program exits, everything it started is killed, daemons
that left its session with ``setsid`` included: ``run`` returns only when none of them is alive.

How strongly the program is kept from the rest of the machine depends on the isolation tier. ``isolation_tier()``
tries each once, strongest first, with a real run, and caches the answer:

- ``bwrap`` (bubblewrap): new PID, network, IPC and UTS namespaces (and a user namespace unless the caller is root);
  a root made of read-only binds of the system and interpreter directories and a few files of /etc, a fresh /proc, a
  minimal /dev, a private /tmp; only the working directory is writable; no network but its own loopback.
- ``namespaces`` (``unshare`` from util-linux, then this module's launcher; as root, ``/bin/sh`` between them waits
  for the parent to map the user namespace's ids): the same view, built by the launcher:
  user, PID, mount, network, IPC and UTS namespaces, read-only binds, a private /tmp, /dev and /dev/shm, a /proc whose
  writable knobs (/proc/sys, sysrq-trigger, irq, bus) are read-only, ``pivot_root`` so the host's tree is gone.
- ``rlimits``: resource limits, a new session, and the kill of everything the program started. Nothing else: the
  program reads and writes whatever the calling user may, uses the network, sees and can signal the user's other
  processes (the caller included).

In every tier the program starts with ``no_new_privs`` (setuid binaries and file capabilities give it nothing) and,
where the launcher may empty it, an empty capability bounding set. In the namespace tiers the launcher is PID 1 of
the program's namespace, so ``os.kill(os.getppid(), SIGKILL)`` does nothing and the host's processes are invisible;
in ``rlimits`` a program that kills its launcher ends the run as ``killed`` (and is then killed itself).

When the caller is root, the namespace tiers run the program as uid and gid 65534 (nobody), mapped through to the
host: a process of root's uid is exempt from RLIMIT_NPROC (inside a user namespace too) and owns what root owns. The
interpreter must then be readable by others (the binds hide the modes of the directories above it). ``rlimits`` as
root runs the program as root, without capabilities.

What it does NOT protect against. It is not a security boundary against a determined attacker: a kernel exploit
escapes every tier, and there is no seccomp filter, so every system call the kernel allows an unprivileged process
is allowed, creating nested user namespaces included. CPU time, memory and file size are limited per process, not for
the tree (64 processes may use 64 times ``memory_mb``); nothing caps the total size of files in the working directory
(the namespace tiers' /tmp and /dev/shm hold at most 4 x ``file_size_mb`` each), disk bandwidth, or timing and cache
side channels. RLIMIT_NPROC counts the processes of a uid in a user namespace: with one of its own (``namespaces``;
``bwrap`` not as root) the limit is the sandbox's own; as nobody in ``bwrap`` under root it counts every nobody
process of the host; in ``rlimits`` it counts every process the calling user runs (a user already running
``processes`` processes cannot start any) and does not bind root at all, so there a fork bomb is stopped only by the
wall timeout. Killing descendants relies, in ``rlimits``, on the launcher staying alive (it is their child subreaper)
or on the processes keeping the run's marker in their environment: a program that kills its launcher, then
re-executes a daemon with a new environment and a new session, escapes that tier.

Linux only. The launcher is the last part of this very file, run as ``python -I -S`` once per run, so it must import
nothing but the standard library, and of that only what loads fast: the launcher's start and the program's are most of
what a run costs (``benchmarks/sandbox_cost.py``).
"""

from __future__ import annotations

import functools
import marshal
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

TIERS = ("bwrap", "namespaces", "rlimits")  # strongest first
STATUSES = ("ok", "error", "timeout", "memory", "killed", "output_limit")

_NOBODY = 65534  # the uid and gid the program runs as when the caller is root (see _as_nobody)
_MARK = "ROLLFLOW_SANDBOX"  # in every sandboxed process's environment: the run's token, so stragglers can be found
_DRAIN_S = 1.0  # after the program exits, how long the output of what it left running is still read
_GRACE_S = 2.0  # how long the launcher gets to kill what the program left running before the parent steps in
_PATIENCE_S = 5.0  # how long the parent waits for what takes milliseconds (unshare, killing stragglers)
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC = ("passwd", "group", "nsswitch.conf", "hosts", "localtime", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
        "ssl/certs", "ca-certificates", "alternatives", "mime.types")  # not all of /etc: it holds the host's secrets
_MEMORY_ERROR = re.compile(r"^[\w.]*MemoryError\b", re.MULTILINE)  # MemoryError, numpy's _ArrayMemoryError, ...


class SandboxError(RuntimeError):
    """The sandbox itself could not run the program (a tier that does not work here, a failed setup); the program's
    own failures are statuses of ``SandboxResult``, never exceptions."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. CPU, memory, file size and open files are limits per process (``setrlimit``)."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the program and all it started are killed (status ``timeout``)."""
    cpu_s: float | None = None
    """CPU seconds per process, rounded up to whole seconds: SIGXCPU, then SIGKILL a second later (status
    ``timeout``). None: ``timeout_s``."""
    memory_mb: int = 512
    """Address space per process in MiB; past it allocations fail and Python raises MemoryError (status ``memory``)."""
    file_size_mb: int = 16
    """Largest file the program may write, in MiB; writing past it fails with EFBIG ("File too large")."""
    processes: int = 64
    """Processes and threads the sandbox's user may have (RLIMIT_NPROC; what it counts per tier: module docstring)."""
    open_files: int = 64
    """File descriptors per process."""
    output_bytes: int = 64 * 1024
    """Bytes each of stdout and stderr may carry; one more and the program is killed (status ``output_limit``). The
    result keeps the last ``output_bytes`` of each."""
    isolation: str = "auto"
    """``"auto"``: the strongest tier that works here; or one of ``TIERS``, to force it (a weaker one, usually;
    forcing one that does not work here raises ``SandboxError``)."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "file_size_mb", "processes", "open_files", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"SandboxLimits.cpu_s must be > 0 or None (= timeout_s), got {self.cpu_s!r}")
        if self.isolation not in ("auto", *TIERS):
            raise ValueError(f"SandboxLimits.isolation must be 'auto' or one of {TIERS}, got {self.isolation!r}")

    @property
    def cpu_limit_s(self) -> int:
        """The CPU seconds RLIMIT_CPU gets (whole seconds)."""
        return math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s)

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """(soft, hard) by ``resource`` name: the one place limits become ``setrlimit`` arguments."""
        mib = 1 << 20
        return {
            "RLIMIT_CPU": (self.cpu_limit_s, self.cpu_limit_s + 1),  # SIGXCPU at soft (catchable), SIGKILL at hard
            "RLIMIT_AS": (self.memory_mb * mib, self.memory_mb * mib),
            "RLIMIT_FSIZE": (self.file_size_mb * mib, self.file_size_mb * mib),
            "RLIMIT_NPROC": (self.processes, self.processes),
            "RLIMIT_NOFILE": (self.open_files, self.open_files),
            "RLIMIT_CORE": (0, 0),  # SIGXCPU and SIGSEGV would otherwise dump the program's memory into its directory
        }


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. ``status`` is one of ``STATUSES``; ``stdout`` and ``stderr`` are the last
    ``output_bytes`` of each, decoded as UTF-8 (undecodable bytes replaced)."""

    status: str  # "ok" | "error" | "timeout" | "memory" | "killed" | "output_limit"
    exit_code: int | None  # None when killed by a signal
    duration_s: float
    stdout: str  # tail, capped
    stderr: str  # tail, capped
    isolation: str  # tier used
    signal: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Sandbox:
    """Runs untrusted Python under ``limits``. Safe to share between threads: each run has its own process tree,
    directory and pipes, and runs block only their caller.

    ``python``: the interpreter the program runs with (default: this process's ``sys.executable``)."""

    def __init__(self, limits: SandboxLimits | None = None, *, python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        self.isolation = _choose_tier(self.limits.isolation, self.python)

    def run(self, source: str, stdin: str = "") -> SandboxResult:
        """Run ``source`` as the file ``main.py`` of a fresh working directory, with ``stdin`` as its standard input."""
        return _execute(source.encode(), "main.py", stdin, self.limits, self.isolation, self.python)

    def run_file(self, path: str | os.PathLike[str], stdin: str = "") -> SandboxResult:
        """Run a copy of the file at ``path``, under its own name, in a fresh working directory (files beside it
        are not copied)."""
        path = Path(path)
        return _execute(path.read_bytes(), path.name, stdin, self.limits, self.isolation, self.python)


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], str | None] = {}


def why_unavailable(tier: str, python: str | None = None) -> str | None:
    """Why ``tier`` cannot run here, or None when it can. Tried once per interpreter with a real run of
    ``print('ok')``, then cached; concurrent first callers wait for the one trial."""
    if tier not in TIERS:
        raise ValueError(f"unknown isolation tier {tier!r}; the tiers are {TIERS}")
    python = python or sys.executable
    with _probe_lock:
        if (tier, python) not in _probed:
            _probed[tier, python] = _try_tier(tier, python)
        return _probed[tier, python]


def isolation_tier(python: str | None = None) -> str:
    """The strongest tier that works here (``"bwrap"``, ``"namespaces"`` or ``"rlimits"``)."""
    for tier in TIERS:
        if why_unavailable(tier, python) is None:
            return tier
    raise SandboxError(f"no sandbox works here; even 'rlimits' failed: {why_unavailable('rlimits', python)}")


def _choose_tier(requested: str, python: str) -> str:
    if requested == "auto":
        return isolation_tier(python)
    reason = why_unavailable(requested, python)
    if reason is not None:
        raise SandboxError(f"isolation {requested!r} does not work here: {reason}; "
                           f"isolation='auto' takes the strongest that does ({isolation_tier(python)!r})")
    return requested


def _try_tier(tier: str, python: str) -> str | None:
    tool = {"bwrap": "bwrap", "namespaces": "unshare"}.get(tier)
    if tool is not None and shutil.which(tool) is None:
        return f"{tool} is not installed (not on PATH)"
    try:
        result = _execute(b"print('ok')", "probe.py", "", SandboxLimits(timeout_s=10), tier, python)
    except SandboxError as e:
        return str(e)
    if result.status == "ok" and result.stdout == "ok\n":
        return None
    return f"a trial run ended {result.status!r}: {result.stderr.strip()[-500:] or 'without a word'}"


# --- the parent's side: set up, start, watch, kill, classify ---------------------------------------------------


def _execute(code: bytes, name: str, stdin: str, limits: SandboxLimits, tier: str, python: str) -> SandboxResult:
    base = Path(tempfile.mkdtemp(prefix="rollflow-sandbox-"))  # 0700; the program sees only base/work
    try:
        work = base / "work"
        work.mkdir()
        (work / name).write_bytes(code)
        (base / "stdin").write_text(stdin)  # a file, not a pipe: a program that never reads cannot block the writer
        (base / "root").mkdir()  # the namespaces tier's mount point for the new root
        return _supervise(base, [python, "-I", "-B", str(work / name)], limits, tier, python)
    finally:
        _remove_tree(base)


def _supervise(base: Path, argv: list[str], limits: SandboxLimits, tier: str, python: str) -> SandboxResult:
    """Start the launcher for ``argv``, read its output until the program ends (or must be killed), make sure
    nothing it started is left alive, and say how it ended."""
    work, token = base / "work", uuid.uuid4().hex
    nobody = _as_nobody(tier)
    if nobody:
        for path in (work, Path(argv[-1])):
            os.chown(path, _NOBODY, _NOBODY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe() if nobody and tier == "namespaces" else (None, None)  # "your ids are mapped"
    spec = {
        "tier": tier, "argv": argv, "report_fd": report_w, "go_fd": go_r, "uid": _NOBODY if nobody else None,
        "rlimits": limits.rlimits(),
        "backstop_s": math.ceil(limits.timeout_s + 2 * _GRACE_S),  # the launcher's own deadline, should we vanish
        "root": str(base / "root"), "workdir": str(work), "ro_paths": _visible_paths(python),
        "tmp_mb": 4 * limits.file_size_mb,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", _MARK: token}
    start = time.monotonic()
    try:
        with open(base / "stdin", "rb") as stdin:
            proc = subprocess.Popen(_command(tier, spec, python), stdin=stdin, stdout=out_w, stderr=err_w,
                                    pass_fds=(report_w,) if go_r is None else (report_w, go_r), env=env, cwd=work,
                                    start_new_session=True)
    except OSError as e:
        for fd in (out_r, err_r, report_r, go_w):
            if fd is not None:
                os.close(fd)
        raise SandboxError(f"cannot start the {tier!r} sandbox: {e}") from e
    finally:
        for fd in (out_w, err_w, report_w, go_r):
            if fd is not None:
                os.close(fd)
    map_error = None
    if go_w is not None:
        try:
            _map_ids(proc.pid)
            os.write(go_w, b"1\n")
        except OSError as e:  # the shell waiting for the word reads EOF instead, and gives up
            map_error = e
        finally:
            os.close(go_w)
    watched = None
    try:
        watched = _watch(out_r, err_r, report_r, start + limits.timeout_s, limits.output_bytes)
    finally:
        ended = watched is not None and watched.ended_by is None and bool(watched.report)
        _stop(proc, token, tier, program_ended=ended)
        for fd in (out_r, err_r, report_r):
            os.close(fd)
    if map_error is not None:
        raise SandboxError(f"cannot map the user ids of the {tier!r} sandbox: {map_error}") from map_error
    if "setup_error" in watched.report:
        raise SandboxError(f"the {tier!r} sandbox could not be set up: {watched.report['setup_error']}")
    stderr = watched.stderr.text()
    status, exit_code, sig = _classify(watched, proc.returncode, stderr, limits.cpu_limit_s)
    return SandboxResult(status=status, exit_code=exit_code, duration_s=round(watched.end - start, 4),
                         stdout=watched.stdout.text(), stderr=stderr, isolation=tier, signal=sig)


def _as_nobody(tier: str) -> bool:
    """Whether the program runs as uid and gid 65534: when the caller is root and the tier has namespaces. A process
    of root's uid escapes RLIMIT_NPROC (the kernel exempts it, inside a user namespace too) and owns all that root
    owns; the namespace tiers can give the program another uid and still show it the interpreter."""
    return os.geteuid() == 0 and tier != "rlimits"


def _command(tier: str, spec: dict[str, Any], python: str) -> list[str]:
    launcher = [python, "-I", "-S", *_launcher_args(python), marshal.dumps(spec, 4).hex()]
    if tier == "rlimits":
        return launcher
    if tier == "namespaces":  # --kill-child: unshare's death (our SIGKILL) takes the namespace's init, hence all
        if spec["go_fd"] is None:
            return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--pid", "--fork",
                    "--kill-child", "--mount", "--net", "--ipc", "--uts", *launcher]
        # As root, _map_ids writes a map with nobody in it, once unshare is in its namespace. Capabilities are
        # computed at exec, so the launcher must be exec'd after that (before, it would start with none): a shell
        # waits for the word (through /proc, as dash knows no descriptors past 9), not a second interpreter.
        wait = (f'read -r go < /proc/self/fd/{spec["go_fd"]} && [ "$go" = 1 ] || '
                '{ echo "sandbox: the ids of the user namespace were not mapped" >&2; exit 125; }; exec "$@"')
        return [shutil.which("unshare") or "unshare", "--user", "--pid", "--fork", "--kill-child", "--mount", "--net",
                "--ipc", "--uts", "/bin/sh", "-c", wait, "sh", *launcher]
    work, nobody = spec["workdir"], spec["uid"] is not None
    # The private /tmp first, so that what is bound below it (an interpreter in /tmp/venv) stays visible.
    view = ["--tmpfs", "/tmp", *(arg for path in _ancestors(spec["ro_paths"]) if path != "/tmp"
                                 for arg in ("--dir", path))]  # 0755: bwrap's own are 0700
    for path in spec["ro_paths"]:
        view += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    view += ["--proc", "/proc", "--dev", "/dev"]
    view += [arg for path in _ancestors([work]) if path != "/tmp" for arg in ("--dir", path)]
    # bwrap maps only the caller's uid into a user namespace, so as root it goes without one (root needs none), and
    # the launcher keeps just what it takes to make the program nobody and to kill it then.
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                  "--cap-drop", "ALL", *[arg for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL")
                                         for arg in ("--cap-add", cap)]] if nobody else \
        ["--unshare-all", "--cap-drop", "ALL"]
    return [shutil.which("bwrap") or "bwrap", *namespaces, "--die-with-parent", "--new-session", "--as-pid-1",
            "--hostname", "sandbox", *view, "--bind", work, work, "--chdir", work, *launcher]


def _ancestors(paths: list[str] | tuple[str, ...]) -> list[str]:
    """The directories above ``paths`` (not "/", not the paths themselves), parents first."""
    above = {str(parent) for path in paths for parent in Path(path).parents} - {"/", *paths}
    return sorted(above, key=lambda p: (p.count("/"), p))


def _map_ids(pid: int) -> None:
    """As root: once ``unshare`` (``pid``) is in its new user namespace, map root (for the launcher, which builds the
    sandbox) and nobody (for the program) to themselves. util-linux would need newuidmap for a map of two ids."""
    ours = os.readlink("/proc/self/ns/user")
    give_up = time.monotonic() + _PATIENCE_S
    while os.readlink(f"/proc/{pid}/ns/user") == ours:  # FileNotFoundError once unshare has failed and exited
        if time.monotonic() > give_up:
            raise OSError(f"unshare (pid {pid}) did not enter a new user namespace within {_PATIENCE_S} s")
        time.sleep(0.001)
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write(f"0 0 1\n{_NOBODY} {_NOBODY} 1\n")


_LAUNCHER_MARK = "# --- the launcher: the sandbox's first process"


@functools.cache  # two threads may both make it the first time; both get the same
def _launcher_args(python: str) -> tuple[str, ...]:
    """What starts the launcher in ``python`` (after ``-I -S``, before SPEC): its code, compiled here once and
    marshalled, when ``python`` is this interpreter (marshal's format for code is the interpreter's own; compiling the
    source would cost each run ~2 ms), else its source."""
    source = _launcher_source()
    if python != sys.executable:
        return "-c", source
    code = marshal.dumps(compile(source, __file__, "exec"))
    return "-c", "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))", code.hex()


def _launcher_source() -> str:
    """The launcher's part of this file, at its own line numbers (a traceback of the launcher points here)."""
    text = Path(__file__).read_text()
    start = text.index("\n" + _LAUNCHER_MARK) + 1
    return "from __future__ import annotations" + "\n" * text.count("\n", 0, start) + text[start:]


@functools.cache
def _visible_paths(python: str) -> tuple[str, ...]:
    """What the namespace tiers show of the host, read-only: the system directories, a few files of /etc, and the
    interpreter's own directories; parents before children, nothing twice."""
    kept: list[str] = []
    for path in sorted({*_SYSTEM_DIRS, *(f"/etc/{name}" for name in _ETC), *_interpreter_dirs(python)}):
        if os.path.lexists(path) and not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def _interpreter_dirs(python: str) -> list[str]:
    if python == sys.executable:
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        asked = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, "
                                "sys.base_exec_prefix, sep='\\n')"], capture_output=True, text=True, timeout=60)
        if asked.returncode != 0:
            raise SandboxError(f"cannot ask the interpreter {python!r} where it lives: {asked.stderr.strip()[-500:]}")
        prefixes = asked.stdout.splitlines()
    return [*prefixes, os.path.dirname(os.path.realpath(python))]


class _Tail:
    """The last ``cap`` bytes of a stream, and how many it carried in all."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.total = cap, bytearray(), 0

    def add(self, chunk: bytes) -> int:
        self.data += chunk
        self.total += len(chunk)
        if len(self.data) > self.cap:
            del self.data[: len(self.data) - self.cap]
        return self.total

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class _Watched:
    ended_by: str | None  # "timeout" | "output_limit" when we are the ones ending it, else None
    report: dict[str, Any]  # the launcher's: wait_status and cpu_s, or backstop, or setup_error; {} if it had none
    end: float  # monotonic time the program ended or was found over a limit
    stdout: _Tail
    stderr: _Tail


def _watch(out_fd: int, err_fd: int, report_fd: int, deadline: float, cap: int) -> _Watched:
    """Read stdout, stderr and the launcher's report until: the report has come and the output has ended (or
    ``_DRAIN_S`` passed); the launcher is gone without a report; the deadline; or a stream past ``cap``."""
    tails = {out_fd: _Tail(cap), err_fd: _Tail(cap)}
    report = bytearray()
    poller = select.poll()
    for fd in (out_fd, err_fd, report_fd):
        poller.register(fd, select.POLLIN)
    open_fds = {out_fd, err_fd, report_fd}
    ended: float | None = None  # when the report came
    ended_by = None
    while True:
        now = time.monotonic()
        if ended is None and report_fd not in open_fds:  # the launcher is gone without a word: killed
            ended = now
            break
        if ended is not None and not open_fds & set(tails):
            break
        until = deadline if ended is None else ended + _DRAIN_S
        if now >= until:
            if ended is None:
                ended, ended_by = now, "timeout"
            break
        for fd, _ in poller.poll(max(1, math.ceil((until - now) * 1000))):
            data = os.read(fd, 1 << 16)
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == report_fd:
                report += data
                if ended is None and b"\n" in report:
                    ended = time.monotonic()
            elif tails[fd].add(data) > cap:
                ended_by = "output_limit"
        if ended_by == "output_limit":
            ended = time.monotonic()
            break
    parsed = _parse_report(report.split(b"\n")[0].decode(errors="replace")) if b"\n" in report else {}
    return _Watched(ended_by, parsed, ended, tails[out_fd], tails[err_fd])


def _parse_report(line: str) -> dict[str, Any]:
    """The launcher's line (``_write_report``): ``ended WAIT_STATUS CPU_S``, ``backstop`` or ``setup_error WHY``."""
    kind, _, rest = line.partition(" ")
    if kind == "ended":
        wait_status, cpu_s = rest.split()
        return {"wait_status": int(wait_status), "cpu_s": float(cpu_s)}
    if kind == "backstop":
        return {"backstop": True}
    return {"setup_error": rest if kind == "setup_error" else f"the launcher's report makes no sense: {line!r}"}


def _stop(proc: subprocess.Popen[bytes], token: str, tier: str, program_ended: bool) -> None:
    """Leave nothing of the run alive: give the launcher a moment to kill what the program left (when the program
    ended by itself), else kill the launcher's process group (in the namespace tiers that takes the whole PID
    namespace down with it), then kill whatever still carries the run's marker.

    That last sweep reads the environment of every process of the host, so it is skipped where it cannot find
    anything: in the namespace tiers, once unshare or bubblewrap exited 0 on its own. It did so after reaping the
    launcher, which exited 0 only after killing and reaping all it had left, and was the init of the run's PID
    namespace: the kernel reaps an init only when every process of its namespace (nested namespaces included) is
    gone."""
    if program_ended:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_GRACE_S)
        if tier != "rlimits" and proc.returncode == 0:
            return
    if proc.returncode is None:  # not reaped yet, so its pid, the group's id, cannot have been reused
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _sweep(token)


def _sweep(token: str) -> None:
    """Kill every process whose environment holds the run's marker (daemons that left the session and lost their
    launcher), until none is left. Dead and dying processes have no environment left to read."""
    needle = f"{_MARK}={token}".encode()
    give_up = time.monotonic() + _PATIENCE_S
    while True:
        found = [pid for pid in _pids() if needle in _read(f"/proc/{pid}/environ")]
        if not found:
            return
        for pid in found:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > give_up:
            raise SandboxError(f"processes {found} of a sandboxed run survived {_PATIENCE_S} s of SIGKILL")
        time.sleep(0.01)


def _classify(watched: _Watched, returncode: int | None, stderr: str, cpu_limit_s: int) -> tuple[str, int | None,
                                                                                                   int | None]:
    """(status, exit_code, signal) from how the run ended."""
    if watched.ended_by is not None:  # we killed it
        return watched.ended_by, None, int(signal.SIGKILL)
    if watched.report.get("backstop"):  # the launcher's own deadline: we were too slow to kill it at ours
        return "timeout", None, int(signal.SIGKILL)
    if "wait_status" not in watched.report:  # the launcher died first: the program killed it, or someone else did
        return "killed", None, -returncode if returncode is not None and returncode < 0 else None
    code = os.waitstatus_to_exitcode(watched.report["wait_status"])
    if code >= 0:
        status = "ok" if code == 0 else "memory" if _MEMORY_ERROR.search(stderr) else "error"
        return status, code, None
    sig = -code
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and watched.report["cpu_s"] >= cpu_limit_s):
        return "timeout", None, sig
    return "memory" if _MEMORY_ERROR.search(stderr) else "killed", None, sig


def _remove_tree(path: Path) -> None:
    """Remove a run's directory, even the parts the program made unreadable (a directory of mode 000): those are
    opened up only when a first removal left something (root's needs no opening)."""
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        return
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):  # never chmod through a link: it may point anywhere on the host
                with suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise SandboxError(f"cannot remove the sandbox directory {path}")


# --- the launcher: the sandbox's first process -------------------------------------------------------------------
# It runs alone, once per run: ``python -I -S -c <this file from the line above on> SPEC`` (``_launcher_args``: or
# that code compiled once; SPEC is ``marshal`` data in hex). So it has its own imports, here, and only of modules
# that load in a fraction of a millisecond: not json, re, signal, socket, pathlib, contextlib, functools or typing,
# which pull in enum, inspect and more. Those, and compiling the whole module, cost a run several times what the
# launcher does. (Hence imports below the top, some of them again: noqa E402, F811.)

import _signal  # noqa: E402  (signal itself is _signal wrapped in enums)
import ctypes  # noqa: E402
import fcntl  # noqa: E402
import marshal  # noqa: E402, F811
import os  # noqa: E402, F811
import resource  # noqa: E402, F811
import struct  # noqa: E402
import sys  # noqa: E402, F811

_DEVICES = ("null", "zero", "full", "random", "urandom")
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")  # what bubblewrap also covers: writable by root's uid


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# A read-only remount inside a user namespace must keep the flags the mount was made with (the kernel locks them).
_KEPT_FLAGS = {"ST_NOSUID": _MS_NOSUID, "ST_NODEV": _MS_NODEV, "ST_NOEXEC": _MS_NOEXEC, "ST_NOATIME": 1024,
               "ST_NODIRATIME": 2048, "ST_RELATIME": 1 << 21}


def _launch(spec: dict[str, Any]) -> NoReturn:
    """Set the sandbox up, start the program, write how it ended on the report descriptor (one line), kill
    everything it left running, exit. PID 1 of its namespace in the namespace tiers (orphans come to it, and nothing
    inside can signal it); elsewhere the child subreaper of the program's tree."""
    report = spec["report_fd"]
    os.umask(0o022)  # what it creates for the sandbox (and the program's files) must be readable by a program of uid 65534
    try:
        if spec["go_fd"] is not None:  # what the shell before us read "go" from: not for the program
            os.close(spec["go_fd"])
        os.set_inheritable(report, False)
        if spec["tier"] == "namespaces":
            _private_root(spec)
        if os.getpid() != 1:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except OSError as e:
        _write_report(report, "setup_error", e)
        os._exit(125)
    _signal.signal(_signal.SIGALRM, _backstop)
    _signal.alarm(spec["backstop_s"])
    pid = os.fork()
    if pid == 0:
        _start_program(spec)
    try:
        _, status, usage = os.wait4(pid, 0)
        outcome: tuple[Any, ...] = ("ended", status, usage.ru_utime + usage.ru_stime)
    except TimeoutError:
        outcome = ("backstop",)
    _signal.alarm(0)
    _write_report(report, *outcome)
    _kill_descendants()
    os._exit(0)


def _backstop(signum: int, frame: Any) -> NoReturn:
    raise TimeoutError("the launcher's own deadline passed")


def _write_report(fd: int, *words: Any) -> None:
    """One line of words (``_parse_report`` reads it); not JSON, which would cost the launcher its import."""
    os.write(fd, (" ".join(map(str, words)).replace("\n", " ") + "\n").encode())
    os.close(fd)


def _start_program(spec: dict[str, Any]) -> NoReturn:
    """In the forked child: no privileges, the limits, then exec the program. Never returns."""
    argv = spec["argv"]
    try:
        os.close(spec["report_fd"])
        for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGALRM):  # Python ignores the first two; exec keeps that
            _signal.signal(sig, _signal.SIG_DFL)
        _drop_privileges()
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        for name, (soft, hard) in spec["rlimits"].items():
            _lower_limit(getattr(resource, name), soft, hard)
        os.environ.pop("PWD", None)  # bwrap's --chdir sets it; the program's environment is the parent's list
        os.execv(argv[0], argv)
    except BaseException as e:  # whatever it was, the forked child must not return into the launcher's code
        os.write(2, f"sandbox: cannot start {argv[0]}: {e}\n".encode())
    os._exit(127)


def _lower_limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
    resource.setrlimit(which, (min(soft, hard), hard))


def _drop_privileges() -> None:
    """``no_new_privs``, and an empty capability bounding set where we may empty it (root, or root of a user
    namespace): then even uid 0 execs the program without capabilities, so it cannot undo our mounts."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:  # a kernel without ambient capabilities: none to clear
        pass
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError:  # EINVAL past the last capability; EPERM when we hold none to drop
            return


def _kill_descendants() -> None:
    """Kill and reap every process below this one until none is left. Orphans come to this process (PID 1 or
    subreaper), so a daemon that left the session is among them, and a launcher without children has no descendants
    at all: then it need not look for them."""
    me = os.getpid()
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap the dead; ChildProcessError once no child is left
                pass
        except ChildProcessError:
            return
        for pid in [-1] if me == 1 else _descendants(me):  # kill(-1) from init: its whole namespace but itself
            try:
                os.kill(pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _read(f"/proc/{pid}/stat")
        if stat:  # "pid (comm) state ppid ...", and comm may hold ")"
            children.setdefault(int(stat.rsplit(b")", 1)[1].split()[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _private_root(spec: dict[str, Any]) -> None:
    """Inside fresh user, mount, PID and network namespaces: build a root of read-only binds (system and interpreter
    directories, a few files of /etc), a private /tmp, /dev and /dev/shm, a new /proc, the writable working
    directory; then ``pivot_root`` into it and detach the host's tree."""
    root, work = spec["root"], spec["workdir"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount may propagate back to the host
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")  # just mount points
    in_tmp = [path for path in spec["ro_paths"] if path.startswith("/tmp/")]  # e.g. an interpreter in /tmp/venv
    _remount_read_only([root + path for path in spec["ro_paths"] if path not in in_tmp and _bind(path, root + path)])
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={spec['tmp_mb']}m")
    _remount_read_only([root + path for path in in_tmp if _bind(path, root + path)])  # over the private /tmp
    _bind(work, root + work)
    os.makedirs(root + "/dev", exist_ok=True)
    _mount("tmpfs", root + "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for name in _DEVICES:
        _bind(f"/dev/{name}", f"{root}/dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/dev/shm", exist_ok=True)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={spec['tmp_mb']}m")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _remount_read_only([f"{root}/proc/{name}" for name in _PROC_READ_ONLY if os.path.exists(f"{root}/proc/{name}")
                        and _bind(f"{root}/proc/{name}", f"{root}/proc/{name}")])
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    _sethostname(b"sandbox")
    _loopback_up()
    os.chdir(root)
    _pivot_root(".", ".")  # the old root ends up stacked on "/", from where it is detached
    _check(_libc().umount2(b".", _MNT_DETACH), "umount2 of the old root")
    os.chdir(work)


def _bind(source: str, target: str) -> bool:
    """Bind ``source`` (with what is mounted below it) on ``target``, read-write; a link is copied instead. Whether
    it mounted anything."""
    if os.path.islink(source):  # /bin -> usr/bin and the like: the same link, pointing inside the new root
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(source), target)
        return False
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(source, target, None, _MS_BIND | _MS_REC)
    return True


def _remount_read_only(targets: list[str]) -> None:
    """Make each of ``targets`` read-only, with every mount below it: a recursive bind brings the submounts of its
    source, each read-write until told. One read of the mount table for all of them."""
    prefixes = tuple(target.rstrip("/") + "/" for target in targets)
    for line in _read("/proc/self/mountinfo").split(b"\n"):
        if not line:
            continue
        field = line.split(b" ")[4].split(b"\\")  # the mount point; " ", tab, newline and "\" are escaped as \ooo
        point = os.fsdecode(field[0] + b"".join(bytes([int(part[:3], 8)]) + part[3:] for part in field[1:]))
        if point in targets or point.startswith(prefixes):
            kept = os.statvfs(point).f_flag
            flags = sum(ms for st, ms in _KEPT_FLAGS.items() if kept & getattr(os, st, 0))
            _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)


_libc_loaded: list[Any] = []  # the launcher is one thread: no lock, and no functools to import


def _libc() -> Any:
    if not _libc_loaded:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
        libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
        libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        _libc_loaded.append(libc)
    return _libc_loaded[0]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(s: str | None) -> bytes | None:
        return os.fsencode(s) if s is not None else None

    _check(_libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
           f"mount {source or ''} on {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc().prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def _pivot_root(new_root: str, put_old: str) -> None:
    machine = os.uname().machine
    if machine not in _SYS_PIVOT_ROOT:
        raise OSError(f"pivot_root: no system call number known for {machine}")
    _check(_libc().syscall(_SYS_PIVOT_ROOT[machine], new_root.encode(), put_old.encode()), "pivot_root")


def _sethostname(name: bytes) -> None:
    _check(_libc().sethostname(name, len(name)), "sethostname")


def _loopback_up() -> None:
    """Bring up the new network namespace's loopback, so the program may talk to itself (and only to itself)."""
    import _socket  # not socket, whose enums cost more than the rest of the launcher

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 1
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        flags = struct.unpack_from("16sh", fcntl.ioctl(s.fileno(), siocgifflags, struct.pack("16s16x", b"lo")))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
    finally:
        s.close()


if __name__ == "__main__":  # the launcher: python -I -S <_launcher_args(python)> SPEC
    _launch(marshal.loads(bytes.fromhex(sys.argv[-1])))
