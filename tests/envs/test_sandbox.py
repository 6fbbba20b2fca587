"""The sandbox against hostile programs: each is contained with the status it should get, and nothing it started is
alive afterwards. Then ordinary programs, threads, the tiers, and ``rollflow sandbox run``.

Tests run once per isolation tier that works on this machine; the others are skipped, saying why. What a test
expects of a tier is what the module docstring of ``rollflow.envs.sandbox`` promises: ``bwrap`` and ``namespaces``
hide the host's files, network and processes; ``rlimits`` only limits and kills, and the tests check that it does
exactly that (a program there does reach the host, as documented).

Hostile programs run from a file named after a fresh token, so every process they fork carries the token in its
command line; daemons that exec carry it as an argument. ``alive(token)`` finds any that survived."""

import builtins
import dis
import json
import os
import re
import signal
import socket
import string
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from uuid import uuid4

import pytest

from rollflow.cli import main
from rollflow.envs import sandbox as sandbox_module
from rollflow.envs.sandbox import (
    STATUSES,
    TIERS,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    isolation_tier,
    why_unavailable,
)

ISOLATED = {"bwrap", "namespaces"}  # own root, network and PID namespace
ROOT = os.geteuid() == 0
TIER = [pytest.param(t, id=t, marks=pytest.mark.skipif(why_unavailable(t) is not None, reason=f"{t} does not work "
                                                       f"here: {why_unavailable(t)}")) for t in TIERS]
ISOLATED_TIER = [p for p in TIER if p.values[0] in ISOLATED]


def sandbox(tier: str, **limits) -> Sandbox:
    """Programs that end by themselves get 10 s (it costs nothing, and a busy machine may need it); programs that
    are to time out say how soon."""
    return Sandbox(SandboxLimits(isolation=tier, **{"timeout_s": 10, **limits}))


def alive(token: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds ``token``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(name))
    return found


def run_hostile(tier: str, source: str, tmp_path: Path, **limits) -> tuple[SandboxResult, str]:
    """Run ``source`` (a ``string.Template``: ``$token`` and the limits) from a file named after a fresh token."""
    token = uuid4().hex
    box = sandbox(tier, **limits)
    program = tmp_path / f"hostile_{token}.py"
    program.write_text(string.Template(source).substitute(token=token, **vars(box.limits)))
    return box.run_file(program), token


# --- hostile programs whose containment is their status and leaving nothing behind --------------------------------


@dataclass(frozen=True)
class Hostile:
    source: str
    status: str | dict[str, str]  # by tier when it differs; "*" for the rest
    limits: dict = field(default_factory=dict)
    shows: str | None = None  # a regex stdout + stderr must match
    check: Callable[[SandboxResult], bool] | None = None
    cleans_up_within: float | None = None  # seconds from the program's end to run's return: the launcher killed what
    # it left running (the parent's fallback kill comes only after 3 s: the drain, then the grace)
    skip: Callable[[str], str | None] = lambda tier: None  # why a tier cannot take it

    def expected(self, tier: str) -> str:
        return self.status if isinstance(self.status, str) else self.status.get(tier, self.status["*"])


def nproc_unbound(tier: str) -> str | None:
    if tier == "rlimits" and ROOT:
        return "RLIMIT_NPROC does not bind root: in the rlimits tier only the wall timeout stops a fork bomb"
    return None


HOSTILE = {
    "fork_bomb": Hostile("""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", "timeout", {"timeout_s": 0.5, "processes": 16}, skip=nproc_unbound),
    "forks_past_the_process_cap": Hostile("""
import os, time
n = 0
try:
    while n < 4 * $processes:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError:
    pass
print("capped" if n < $processes else "not capped", n)
""", "ok", {"processes": 16}, shows=r"^capped \d+$", skip=nproc_unbound),
    "memory_bomb": Hostile("""
chunks = []
while True:
    chunks.append(bytearray(16 << 20))
""", "memory", {"memory_mb": 256}, shows=r"MemoryError"),
    "one_huge_allocation": Hostile("data = b'x' * (8 << 30)", "memory", shows=r"MemoryError"),
    "infinite_loop": Hostile("while True:\n    pass", "timeout", {"timeout_s": 0.5},
                             check=lambda r: r.signal == signal.SIGKILL and r.duration_s < 2.5),
    "cpu_spin_past_the_cpu_limit": Hostile("while True:\n    pass", "timeout", {"timeout_s": 30, "cpu_s": 1},
                                           check=lambda r: r.signal == signal.SIGXCPU),
    "cpu_spin_ignoring_sigxcpu": Hostile("""
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
while True:
    pass
""", "timeout", {"timeout_s": 30, "cpu_s": 1}, check=lambda r: r.signal == signal.SIGKILL),
    "ignores_sigterm": Hostile("""
import signal, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
time.sleep(30)
""", "timeout", {"timeout_s": 0.5}, check=lambda r: r.duration_s < 2.5),
    "stops_itself": Hostile("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)", "timeout", {"timeout_s": 0.5}),
    "floods_stdout": Hostile("""
import sys
while True:
    sys.stdout.write("x" * 4096)
""", "output_limit", {"output_bytes": 10_000}, check=lambda r: r.stdout == "x" * 10_000),
    "floods_stderr_without_newlines": Hostile("""
import os
while True:
    os.write(2, b"e" * 65536)
""", "output_limit", {"output_bytes": 10_000}, check=lambda r: r.stderr == "e" * 10_000),
    "daemon_by_double_fork_and_setsid": Hostile("""
import os, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"up")
        time.sleep(30)
    os._exit(0)
os.close(w)
print("daemon", os.read(r, 2).decode())
""", "ok", shows=r"daemon up", cleans_up_within=2.5),
    "daemon_that_execs_with_a_clean_environment": Hostile("""
import os, sys
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.dup2(w, 3)
        os.execve(sys.executable, [sys.executable, "-c", "import os, time; os.write(3, b'up'); time.sleep(30)",
                                   "$token"], {})
    os._exit(0)
os.close(w)
print("daemon", os.read(r, 2).decode())
""", "ok", shows=r"daemon up", cleans_up_within=2.5),
    "daemon_writing_to_the_output_forever": Hostile("""
import os, time
if os.fork() == 0:
    os.setsid()
    while True:
        print("tick", flush=True)
        time.sleep(0.01)
time.sleep(0.1)
print("main done", flush=True)
""", "ok", shows=r"main done", cleans_up_within=2.5),
    "kills_its_parent": Hostile("""
import os, signal, time
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError as e:
    print("refused:", e.strerror, flush=True)
time.sleep(30)
""", {"rlimits": "killed", "*": "timeout"}, {"timeout_s": 0.5}),  # a namespace's init is out of its reach: it sleeps
    "kills_its_process_group": Hostile("""
import os, signal, time
os.killpg(0, signal.SIGKILL)
time.sleep(30)
""", "killed", {"timeout_s": 2}),
    "kills_itself": Hostile("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed",
                            check=lambda r: r.signal == signal.SIGKILL and r.exit_code is None),
    "segfaults": Hostile("import ctypes\nctypes.string_at(0)", "killed", check=lambda r: r.signal == signal.SIGSEGV),
    "fills_the_disk": Hostile("""
with open("big", "wb") as f:
    while True:
        f.write(b"0" * (1 << 20))
""", "error", {"file_size_mb": 1}, shows=r"File too large"),
    "exhausts_file_descriptors": Hostile("""
import os
fds = []
try:
    while len(fds) < 4 * $open_files:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print("capped" if len(fds) < $open_files else "not capped", len(fds), e.strerror)
""", "ok", {"open_files": 32}, shows=r"^capped \d+ Too many open files$"),
}


@pytest.mark.parametrize("tier", TIER)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained_and_leaves_nothing_alive(name, tier, tmp_path):
    hostile = HOSTILE[name]
    if (reason := hostile.skip(tier)) is not None:
        pytest.skip(reason)
    start = time.monotonic()
    result, token = run_hostile(tier, hostile.source, tmp_path, **hostile.limits)
    cleanup = time.monotonic() - start - result.duration_s
    assert (result.status, result.isolation) == (hostile.expected(tier), tier), result
    assert alive(token) == []
    if hostile.shows is not None:
        assert re.search(hostile.shows, result.stdout + result.stderr, re.MULTILINE), result
    if hostile.check is not None:
        assert hostile.check(result), result
    if hostile.cleans_up_within is not None:
        assert cleanup < hostile.cleans_up_within, (cleanup, result)


# --- hostile programs reaching for the host: what each tier keeps from them ---------------------------------------


@pytest.mark.parametrize("tier", TIER)
def test_the_callers_environment_is_not_passed_on(tier, monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLFLOW_TEST_SECRET", "hunter2")
    result, _ = run_hostile(tier, "import json, os\nprint(json.dumps(dict(os.environ)))", tmp_path)
    env = json.loads(result.stdout)
    assert "hunter2" not in result.stdout
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
                        "ROLLFLOW_SANDBOX"}
    assert env["HOME"] == env["TMPDIR"] and env["HOME"].endswith("/work")


@pytest.mark.parametrize("tier", ISOLATED_TIER)
def test_other_processes_and_their_environments_are_out_of_sight(tier, monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLFLOW_TEST_SECRET", "hunter2")
    result, token = run_hostile(tier, """
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
found = []
for pid in pids:
    try:
        found += ["hunter2" in open(f"/proc/{pid}/environ", errors="replace").read()]
    except OSError:
        pass
print(len(pids), "processes,", "found" if any(found) else "not found")
""", tmp_path)
    # The launcher and the program: nothing of the host. (rlimits shows the user's processes, as documented.)
    assert (result.status, result.stdout) == ("ok", "2 processes, not found\n"), result
    assert alive(token) == []


@pytest.mark.parametrize("tier", TIER)
def test_host_files_outside_the_working_directory(tier, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    result, _ = run_hostile(tier, f"""
for path in ({str(secret)!r}, {__file__!r}):
    try:
        print(open(path).read()[:7])
    except OSError as e:
        print("blocked", type(e).__name__)
""", tmp_path)
    assert result.status == "ok", result
    if tier in ISOLATED:  # the test's tmp dir is under the private /tmp, the repository is not bound at all
        assert result.stdout == "blocked FileNotFoundError\nblocked FileNotFoundError\n"
    else:
        assert result.stdout == f"hunter2\n{Path(__file__).read_text()[:7]}\n"  # rlimits reads what the user may


@pytest.mark.parametrize("tier", TIER)
def test_writing_outside_the_working_directory(tier, tmp_path):
    target = tmp_path / "escaped.txt"
    result, _ = run_hostile(tier, f"""
try:
    open({str(target)!r}, "w").write("x")
    print("written")
except OSError as e:
    print("blocked", type(e).__name__)
""", tmp_path)
    assert result.status == "ok", result
    if tier in ISOLATED:
        assert (result.stdout, target.exists()) == ("blocked FileNotFoundError\n", False)
    else:
        assert (result.stdout, target.read_text()) == ("written\n", "x")  # rlimits writes where the user may


@pytest.mark.parametrize("tier", ISOLATED_TIER)
def test_the_read_only_view_cannot_be_remounted_writable(tier, tmp_path):
    """With the uid the program has (root of the sandbox's user namespace, or nobody when the caller is root), and
    again from a user namespace of its own, a remount fails and the interpreter's directory stays read-only."""
    result, token = run_hostile(tier, """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_REMOUNT, MS_BIND, CLONE_NEWUSER, CLONE_NEWNS = 32, 4096, 0x10000000, 0x00020000

def attempt(where):
    if libc.mount(None, sys.prefix.encode(), None, MS_REMOUNT | MS_BIND, None) == 0:
        print(where, "remounted")
    try:
        open(os.path.join(sys.prefix, "escaped-$token"), "w").close()
        print(where, "written")
    except OSError as e:
        print(where, "blocked", e.strerror)

attempt("as is:")
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0:
    attempt("own namespace:")
""", tmp_path)
    assert result.status == "ok", result
    assert "remounted" not in result.stdout and "written" not in result.stdout, result
    assert "as is: blocked Read-only file system" in result.stdout
    assert not (Path(sys.prefix) / f"escaped-{token}").exists()


@pytest.mark.parametrize("tier", TIER)
def test_connecting_to_a_server_of_the_host(tier, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        result, _ = run_hostile(tier, f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=1).close()
    print("connected")
except OSError as e:
    print("blocked", type(e).__name__)
""", tmp_path)
        assert result.status == "ok", result
        if tier in ISOLATED:  # its own network namespace: its loopback is not the host's
            assert result.stdout == "blocked ConnectionRefusedError\n"
            with pytest.raises(BlockingIOError):
                server.accept()
        else:
            assert result.stdout == "connected\n"  # rlimits shares the host's network, as documented
            server.accept()[0].close()


@pytest.mark.parametrize("tier", TIER)
def test_signalling_the_host_process(tier, tmp_path):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        result, _ = run_hostile(tier, f"""
import os, signal
try:
    os.kill({os.getpid()}, signal.SIGUSR1)
    print("sent")
except OSError as e:
    print("blocked", type(e).__name__)
""", tmp_path)
        time.sleep(0.05)  # had it been sent, its handler would have run by now (between this thread's bytecodes)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.status == "ok", result
    if tier in ISOLATED:  # its PID namespace has no such process
        assert (result.stdout, received) == ("blocked ProcessLookupError\n", [])
    else:
        assert (result.stdout, received) == ("sent\n", [signal.SIGUSR1])  # rlimits: the user's processes, documented


# --- ordinary programs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIER)
@pytest.mark.parametrize(("source", "status", "exit_code", "stdout", "stderr_ends"), [
    ("print('hello')", "ok", 0, "hello\n", ""),
    ("print('partial', flush=True)\nraise ValueError('boom')", "error", 1, "partial\n", "ValueError: boom\n"),
    ("import sys\nsys.exit(3)", "error", 3, "", ""),
], ids=["ok", "exception", "exit_3"])
def test_ordinary_program(tier, source, status, exit_code, stdout, stderr_ends):
    result = sandbox(tier).run(source)
    assert (result.status, result.exit_code, result.signal, result.stdout) == (status, exit_code, None, stdout)
    assert result.stderr.endswith(stderr_ends)
    if status == "error" and stderr_ends:
        assert result.stderr.startswith("Traceback (most recent call last):\n") and "main.py" in result.stderr
    assert result.isolation == tier and result.duration_s > 0


@pytest.mark.parametrize("tier", TIER)
def test_stdin_is_passed_and_need_not_be_read(tier):
    box = sandbox(tier)
    assert box.run("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="héllo\nworld\n").stdout == \
        "HÉLLO\nWORLD\n"
    ignored = box.run("print('did not read')", stdin="x" * (4 << 20))  # more than a pipe holds
    assert (ignored.status, ignored.stdout) == ("ok", "did not read\n")


@pytest.mark.parametrize("tier", TIER)
def test_the_working_directory_is_private_and_removed_even_when_locked(tier, tmp_path):
    result, _ = run_hostile(tier, """
import os
print(os.getcwd())
print(sorted(os.listdir(".")))
os.makedirs("locked/inner")
open("locked/inner/file", "w").write("x")
os.chmod("locked/inner", 0)
os.chmod("locked", 0)
""", tmp_path)
    assert result.status == "ok", result
    cwd, listing = result.stdout.splitlines()
    assert listing == f"[{repr(next(tmp_path.glob('hostile_*.py')).name)}]"  # only the program, only this run's
    assert not Path(cwd).exists() and not Path(cwd).parent.exists()


def test_run_file_keeps_the_file_name_and_reports_a_missing_file(tmp_path):
    program = tmp_path / "scorer.py"
    program.write_text("raise KeyError('answer')\n")
    result = Sandbox(SandboxLimits(timeout_s=10)).run_file(program)
    assert result.status == "error" and 'scorer.py", line 1' in result.stderr
    with pytest.raises(FileNotFoundError, match="nope.py"):
        Sandbox().run_file(tmp_path / "nope.py")


def test_eight_runs_from_eight_threads_take_about_as_long_as_one():
    box = Sandbox(SandboxLimits(timeout_s=10))
    program = "import time\ntime.sleep(1)\nprint('done')"
    start = time.monotonic()
    assert box.run(program).status == "ok"
    one = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: box.run(program), range(8)))
    eight = time.monotonic() - start
    assert [(r.status, r.stdout) for r in results] == [("ok", "done\n")] * 8
    assert eight < 4 * one, (one, eight)  # one after another would take 8 times as long


# --- tiers, limits, the result ----------------------------------------------------------------------------------


def test_isolation_tier_is_the_strongest_that_works():
    tier = isolation_tier()
    assert tier == next(t for t in TIERS if why_unavailable(t) is None)
    assert Sandbox().isolation == tier == Sandbox().run("pass").isolation
    if why_unavailable("namespaces") is None:  # where user namespaces work, auto never settles for rlimits
        assert tier in ISOLATED


def test_forcing_a_tier_that_does_not_work_here_says_why():
    with pytest.raises(ValueError, match="unknown isolation tier 'chroot'"):
        why_unavailable("chroot")
    missing = [t for t in TIERS if why_unavailable(t) is not None]
    if not missing:
        pytest.skip("every tier works here")
    with pytest.raises(SandboxError, match=f"isolation '{missing[0]}' does not work here: .+; isolation='auto'"):
        Sandbox(SandboxLimits(isolation=missing[0]))


@pytest.mark.parametrize(("field_name", "value"), [("timeout_s", 0), ("memory_mb", -1), ("output_bytes", 0),
                                                   ("cpu_s", 0), ("isolation", "docker")])
def test_limits_are_checked(field_name, value):
    with pytest.raises(ValueError, match=f"SandboxLimits.{field_name} must be"):
        SandboxLimits(**{field_name: value})


def test_limits_become_setrlimit_arguments():
    limits = SandboxLimits(timeout_s=2.5, memory_mb=100, file_size_mb=3, processes=7, open_files=20).rlimits()
    assert limits == {"RLIMIT_CPU": (3, 4), "RLIMIT_AS": (100 << 20, 100 << 20), "RLIMIT_FSIZE": (3 << 20, 3 << 20),
                      "RLIMIT_NPROC": (7, 7), "RLIMIT_NOFILE": (20, 20), "RLIMIT_CORE": (0, 0)}
    assert SandboxLimits(timeout_s=30, cpu_s=1.2).rlimits()["RLIMIT_CPU"] == (2, 3)


def test_result_to_json():
    result = SandboxResult("killed", None, 0.5, "out", "err", "rlimits", signal.SIGKILL)
    assert json.loads(json.dumps(result.to_json())) == {"status": "killed", "exit_code": None, "duration_s": 0.5,
                                                        "stdout": "out", "stderr": "err", "isolation": "rlimits",
                                                        "signal": 9}
    assert set(STATUSES) == {"ok", "error", "timeout", "memory", "killed", "output_limit"}


# --- the launcher -----------------------------------------------------------------------------------------------


def test_the_launcher_stands_alone_on_modules_that_load_fast():
    """The launcher runs as its own part of the module, once per run: every global name its code reads must be
    defined in that part, and it must not import what would cost each run milliseconds (enum, which signal, json, re
    and socket pull in; typing; inspect)."""
    source = sandbox_module._launcher_source()
    defined = {"__name__": "launcher"}  # not "__main__": define, do not launch
    exec(compile(source, sandbox_module.__file__, "exec"), defined)
    read, todo = set(), [compile(source, sandbox_module.__file__, "exec")]
    while todo:
        code = todo.pop()
        read |= {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        todo += [const for const in code.co_consts if isinstance(const, types.CodeType)]
    assert read - set(defined) - set(dir(builtins)) == set()
    done = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; exec(sys.argv[1], {'__name__': 'launcher'}); "
                           "print(*sys.modules)", source], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {"enum", "json", "re", "typing", "inspect", "socket", "signal"}.isdisjoint(done.stdout.split())


@pytest.mark.parametrize("tier", TIER)
def test_the_launcher_goes_as_source_to_another_interpreter(tier, monkeypatch):
    """This interpreter gets the launcher compiled once; another gets its source (marshalled code is an
    interpreter's own), and runs the same."""
    source = sandbox_module._launcher_source()
    assert source not in sandbox_module._launcher_args(sys.executable)
    assert sandbox_module._launcher_args("/opt/another/python3") == ("-c", source)
    monkeypatch.setattr(sandbox_module, "_launcher_args", lambda python: ("-c", source))
    box = sandbox(tier)
    assert (box.run("x=[1,2];print(sum(x))").stdout, box.run("import sys\nsys.exit(3)").exit_code) == ("3\n", 3)
    killed = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (killed.status, killed.signal) == ("killed", signal.SIGKILL)


@pytest.mark.skipif(why_unavailable("namespaces") is not None, reason="the namespaces tier does not work here")
def test_a_view_the_launcher_cannot_build_raises_saying_why(monkeypatch):
    box = sandbox("namespaces")
    visible = sandbox_module._visible_paths
    monkeypatch.setattr(sandbox_module, "_visible_paths", lambda python: (*visible(python), "/nonexistent-rollflow/x"))
    why = r"^the 'namespaces' sandbox could not be set up: \[Errno 2\] mount /nonexistent-rollflow/x on /\S+/root/"
    with pytest.raises(SandboxError, match=why + r"nonexistent-rollflow/x: No such file"):
        box.run("print('never')")


# --- rollflow sandbox run ---------------------------------------------------------------------------------------


def test_cli_json_through_the_entry_point_exits_1_when_the_program_failed(tmp_path):
    """One real process, as a user runs it (the other CLI tests call ``main``: each process imports torch)."""
    (tmp_path / "fails.py").write_text("import sys\nprint('partial')\nsys.exit(4)\n")
    done = subprocess.run([sys.executable, "-m", "rollflow.cli", "sandbox", "run", str(tmp_path / "fails.py"),
                           "--json", "--timeout", "5"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert {k: result[k] for k in ("status", "exit_code", "stdout", "stderr", "signal")} == \
        {"status": "error", "exit_code": 4, "stdout": "partial\n", "stderr": "", "signal": None}
    assert result["isolation"] == isolation_tier() and result["duration_s"] > 0


def test_cli_prints_a_summary_and_exits_0_when_the_program_ran_ok(tmp_path, capsys):
    (tmp_path / "hello.py").write_text("print('hello from the sandbox')\n")
    assert main(["sandbox", "run", str(tmp_path / "hello.py"), "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert out == f"ok (exit 0) in {out.split(' in ')[1].split(' s,')[0]} s, isolation {isolation_tier()}\n" \
        "--- stdout ---\nhello from the sandbox\n"


def test_cli_summary_of_a_killed_program(tmp_path, capsys):
    (tmp_path / "spin.py").write_text("while True:\n    pass\n")
    assert main(["sandbox", "run", str(tmp_path / "spin.py"), "--timeout", "0.5"]) == 1
    assert re.fullmatch(r"timeout \(signal SIGKILL\) in 0\.\d\d s, isolation \w+\n", capsys.readouterr().out)


@pytest.mark.parametrize(("argv", "message"), [
    (["nope.py"], "no file '{tmp}/nope.py' to run in the sandbox"),
    (["hello.py", "--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0"),
])
def test_cli_bad_input_exits_2_and_says_what_was_wrong(tmp_path, capsys, argv, message):
    (tmp_path / "hello.py").write_text("print('hello')\n")
    assert main(["sandbox", "run", str(tmp_path / argv[0]), *argv[1:]]) == 2
    assert capsys.readouterr() == ("", f"rollflow: {message.format(tmp=tmp_path)}\n")


@pytest.mark.parametrize("tier", ISOLATED_TIER)
def test_an_interpreter_under_tmp_stays_visible_over_the_private_tmp(tier, tmp_path):
    # A virtual environment in /tmp (a CI checkout, say) lies where the sandbox mounts its own /tmp: it is bound
    # over it, read-only, so the isolated tiers still work with it.
    assert str(tmp_path).startswith("/tmp/")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    assert why_unavailable(tier, python) is None
    result = Sandbox(SandboxLimits(timeout_s=10, isolation=tier), python=python).run("import sys; print(sys.prefix)")
    assert (result.status, result.stdout.strip(), result.isolation) == ("ok", str(venv), tier)
