"""Runs untrusted Python programs, each in its own subprocess under resource limits, and says how each ended.

Evaluating code generation (data/humaneval.py) executes code that a model wrote. What protects the machine:
each program runs as an unprivileged user in its own process group, with no inherited environment or file
descriptors, in a fresh temporary directory, under the limits below; when it ends, every process it started
is killed and every file it left in a temporary directory is removed.

    run_program(source, **limits) -> Outcome               one program
    run_many(sources, workers, **limits) -> list[Outcome]  many at once, one thread waiting on each subprocess

What a run gets:
  - `python -I -S -c BOOTSTRAP`: isolated mode (PYTHON* variables, user site and the current directory are
    ignored) without site-packages, so the standard library only. The bootstrap (below) sets no_new_privs
    (no setuid program can raise its privileges), lowers the limits, runs program.py with runpy, and prints a
    random token once the program's last statement has returned;
  - a fresh directory from tempfile.mkdtemp holding program.py, as its cwd and HOME, removed afterwards
    whatever happens;
  - the environment {PATH, HOME, LANG} only, so nothing of the parent's (keys, tokens) is visible;
  - stdin /dev/null, stdout and stderr to unlinked files of the parent, no other descriptor (close_fds);
  - its own session and process group (start_new_session), killed with SIGKILL at the end, always.
Limits, run_program's keyword arguments (default):
  timeout_s  (10)    wall clock, then the process group is killed            -> status "timeout"
  cpu_s      (timeout_s rounded up) RLIMIT_CPU, CPU seconds per process      -> SIGXCPU, status "timeout"
  memory_mb  (1024)  RLIMIT_AS, address space per process                    -> MemoryError, "failed"
  file_mb    (16)    RLIMIT_FSIZE, largest file written, stdout included      -> OSError EFBIG, "failed"
  max_procs  (16)    RLIMIT_NPROC, processes and threads of the run's user   -> fork() raises, "failed"
  and RLIMIT_CORE = 0 (no core files). A program killed by another signal (SIGSEGV, ...) is "crashed".

Which user runs it. RLIMIT_NPROC does not apply to root, nor do file permissions, and these machines run as
root. So when the parent is root, each run gets its own uid and gid, drawn at random from SANDBOX_UIDS
(numbers no account uses) and never given to two runs in progress at once; its workdir is chowned to it and
subprocess drops to it (setgroups([]), setregid, setreuid) before the interpreter starts. The limits are set by
the bootstrap, not in a preexec_fn: Python documents preexec_fn as unsafe in a process with threads (run_many's).
Then
  - the process limit counts this run's processes only: a fork bomb cannot starve a concurrent run;
  - the program can write only to its workdir and to world-writable directories; what it left at the top of
    /tmp, /var/tmp, /dev/shm (and tempfile.gettempdir()) is owned by its uid and removed after the run;
  - it cannot read root's files, the parent's /proc/<pid>/environ, or signal other users' processes;
  - every process of that uid is killed at the end, also one that left the process group with setsid().
The interpreter must be one that uid can execute: sys.executable when every directory above it can be entered
by others, else /usr/bin/python3 (pyenv's under /root is not reachable); sandbox_python() says which.
When the parent is not root, programs run as the parent's user. RLIMIT_NPROC then counts all of that user's
processes and threads, so it is set to their current number plus max_procs: a fork bomb stays bounded, but
concurrent runs share the margin. Only the process group is killed (a child that called setsid() escapes it),
and temporary directories other than the workdir are not swept.

Not covered: the network (no namespaces are used), reading world-readable files, files left deeper than the top
of a world-writable directory (e.g. in /tmp/.X11-unix), System V IPC objects.

Outcome.passed: the program exited 0 AND the bootstrap printed its token after the program's last statement.
A program that calls sys.exit(0) or os._exit(0) before its checks exits 0 but is "failed". This guards against
programs that end early by mistake, not against one written to forge a pass (the token is in its command line).

    python -m pytest tests/test_sandbox.py -q      (hostile programs: fork bomb, memory bomb, escapes, ...)
"""
import math
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from tqdm import tqdm

SANDBOX_UIDS = range(2_000_000_000, 2_001_000_000)  # uids (and gids) for runs when the parent is root
SWEPT_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable; plus tempfile.gettempdir()
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
ENV_PATH, ENV_LANG = "/usr/bin:/bin", "C.UTF-8"
TAIL_CHARS = 2000  # of stdout and stderr kept in an Outcome
STATUSES = ("passed", "failed", "timeout", "crashed")

# Runs in the child, as the run's user, before any of the program's code. argv: token cpu_s memory_b file_b nproc
BOOTSTRAP = """\
import ctypes, os, resource, runpy, sys
token = sys.argv[1]
cpu_s, memory_b, file_b, nproc = map(int, sys.argv[2:6])
if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # 38 = PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at cpu_s, SIGKILL a second later
resource.setrlimit(resource.RLIMIT_AS, (memory_b, memory_b))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_b, file_b))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
out = os.dup(1)  # the token goes here even if the program replaces or closes sys.stdout
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
sys.stdout.flush()
os.write(out, ("\\n" + token + "\\n").encode())
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int | None = None  # None: timeout_s rounded up
    memory_mb: int = 1024
    file_mb: int = 16
    max_procs: int = 16

    def __post_init__(self):
        for name, lowest in (("timeout_s", 0.1), ("cpu_s", 1), ("memory_mb", 64), ("file_mb", 1), ("max_procs", 1)):
            value = getattr(self, name)
            if value is None and name == "cpu_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lowest:
                raise ValueError(f"sandbox limit {name}={value!r} must be a number of at least {lowest}"
                                 f"{' (the interpreter alone needs about 30 MB)' if name == 'memory_mb' else ''}.")
        if self.cpu_s is not None and self.cpu_s != int(self.cpu_s):
            raise ValueError(f"sandbox limit cpu_s={self.cpu_s!r} must be a whole number of seconds.")

    @property
    def cpu(self) -> int:
        return math.ceil(self.timeout_s) if self.cpu_s is None else int(self.cpu_s)


@dataclass
class Outcome:
    passed: bool  # exited 0 and ran to its last statement
    status: str  # one of STATUSES
    returncode: int  # negative: killed by that signal
    signal: str | None  # "SIGSEGV", "SIGKILL", ... or None
    stdout_tail: str  # the last TAIL_CHARS characters, without the token
    stderr_tail: str
    seconds: float  # wall clock, start to the end of the program's process
    uid: int  # the user it ran as
    pid: int  # its first process, also its process group
    workdir: str  # removed by now


# -----------------------------------------------------------------------------
# processes and users, read from /proc


def _status_fields(pid: str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def processes_of(uid: int) -> dict[int, int]:
    """Live (not zombie) processes with `uid` as real, effective, saved or file uid: {pid: thread count}."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = _status_fields(pid)
        except (FileNotFoundError, ProcessLookupError):  # ended while we looked
            continue
        if fields["State"][0] not in "ZX" and uid in map(int, fields["Uid"].split()):
            found[int(pid)] = int(fields["Threads"])
    return found


_uids_in_use: set[int] = set()  # sandbox uids of runs in progress in this process
_uids_lock = threading.Lock()


def _take_uid() -> int:
    with _uids_lock:
        while True:
            uid = SANDBOX_UIDS[secrets.randbelow(len(SANDBOX_UIDS))]  # not `random`: a seeded generator repeats
            try:
                pwd.getpwuid(uid)
                continue  # an account has it
            except KeyError:
                pass
            if uid not in _uids_in_use and not processes_of(uid):
                _uids_in_use.add(uid)
                return uid


def _others_can_execute(path: str) -> bool:
    """True when a user that is neither owner nor group can reach and execute `path` (and its target)."""
    for p in {os.path.abspath(path), os.path.realpath(path)}:
        if not os.path.isfile(p):
            return False
        parents = [os.path.dirname(p)]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        if not all(os.stat(d).st_mode & stat.S_IXOTH for d in parents) or not os.stat(p).st_mode & stat.S_IXOTH:
            return False
    return True


def sandbox_python() -> str:
    """The interpreter programs run with: sys.executable, or when the parent is root and the sandbox users
    cannot reach it, the first of FALLBACK_PYTHONS they can."""
    if os.geteuid() != 0 or _others_can_execute(sys.executable):
        return sys.executable
    for candidate in FALLBACK_PYTHONS:
        if _others_can_execute(candidate):
            return candidate
    raise FileNotFoundError(
        f"no Python the sandbox's unprivileged users can execute: {sys.executable!r} lies under a directory "
        f"others cannot enter, and none of {list(FALLBACK_PYTHONS)} is there for them. Install python3 system-wide "
        "(apt-get install python3), or run from a Python under world-readable directories.")


# -----------------------------------------------------------------------------
# ending a run: kill, sweep, remove


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Waits for `pid` to exit without reaping it (its zombie keeps the process group id from reuse until the
    group is killed). True when it exited, False on timeout."""
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.05)
    return True


def _kill_all(pgid: int, uid: int | None):
    """SIGKILL to the process group, then (uid given) to every process of the uid until none is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while uid is not None and (pids := processes_of(uid)):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} of sandbox uid {uid} survived SIGKILL for 30 s.")
        time.sleep(0.005)


def _remove(path: str):
    """Removes a file, link or tree (shutil.rmtree does not follow links), also one the program made unwritable."""
    def unlock_and_retry(function, failed, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return
        os.chmod(os.path.dirname(failed), 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
            shutil.rmtree(failed, onerror=unlock_and_retry)
        else:
            os.unlink(failed)

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=unlock_and_retry)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _sweep(uid: int):
    """Removes what `uid` left at the top of the world-writable directories (after all its processes ended)."""
    for directory in {*SWEPT_DIRS, tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    _remove(entry.path)
            except FileNotFoundError:
                pass


def _tail(f, chars: int = TAIL_CHARS, token: str = "") -> tuple[str, bool]:
    """(last `chars` characters of an output file without the token line, whether the token line was there)."""
    f.seek(0)
    data = f.read().decode("utf-8", errors="replace")
    line = f"\n{token}\n"
    found = bool(token) and line in data
    return (data.replace(line, "", 1) if found else data)[-chars:], found


# -----------------------------------------------------------------------------
# running


def run_program(source: str, timeout_s: float = Limits.timeout_s, cpu_s: int | None = Limits.cpu_s,
                memory_mb: int = Limits.memory_mb, file_mb: int = Limits.file_mb,
                max_procs: int = Limits.max_procs) -> Outcome:
    """Runs the Python program `source` in a sandbox (see the module docstring) and returns how it ended."""
    limits = Limits(timeout_s, cpu_s, memory_mb, file_mb, max_procs)
    as_root = os.geteuid() == 0
    python = sandbox_python()
    uid, gid = (_take_uid(),) * 2 if as_root else (os.getuid(), os.getgid())
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if as_root:
            os.chown(os.path.join(workdir, "program.py"), uid, gid)
            os.chown(workdir, uid, gid)
        nproc = limits.max_procs if as_root else sum(processes_of(uid).values()) + limits.max_procs
        token = secrets.token_hex(16)
        argv = [python, "-I", "-S", "-c", BOOTSTRAP, token, str(limits.cpu), str(limits.memory_mb << 20),
                str(limits.file_mb << 20), str(nproc)]
        user = dict(user=uid, group=gid, extra_groups=[]) if as_root else {}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(argv, cwd=workdir, env={"PATH": ENV_PATH, "HOME": workdir, "LANG": ENV_LANG},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                    start_new_session=True, umask=0o077, **user)
            try:
                timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
                seconds = time.monotonic() - start
            finally:
                _kill_all(proc.pid, uid if as_root else None)  # always: also after a clean exit
                proc.wait()
            stdout, ran_to_end = _tail(out, token=token)
            stderr, _ = _tail(err)
    finally:
        if as_root:
            _sweep(uid)
            with _uids_lock:
                _uids_in_use.discard(uid)
        _remove(workdir)

    rc = proc.returncode
    signal_name = signal.Signals(-rc).name if rc < 0 else None
    if timed_out or signal_name == "SIGXCPU":
        status = "timeout"
    elif signal_name is not None:
        status = "crashed"
    else:
        status = "passed" if rc == 0 and ran_to_end else "failed"
    return Outcome(status == "passed", status, rc, signal_name, stdout, stderr, seconds, uid, proc.pid, workdir)


def run_many(sources: list[str], workers: int | None = None, progress: str | None = None, **limits) -> list[Outcome]:
    """Runs each program with run_program, `workers` at a time (default: the CPU count), and returns their
    Outcomes in the order of `sources`. `progress` labels a tqdm bar (None: no bar)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a whole number of at least 1 (programs run at once).")
    limits = asdict(Limits(**limits))  # checked once, before anything runs
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, source, **limits) for source in sources]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=progress, disable=progress is None):
            pass
        return [future.result() for future in futures]
