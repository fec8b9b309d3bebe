"""Tests of lib/sandbox.py with hostile programs, each asserting how the run ended and what it could not do.

- a legitimate program passes; one that ends early with sys.exit(0), raise SystemExit or os._exit(0) exits 0
  but is "failed" (it did not run to its last statement); one that replaces sys.stdout still passes;
- an infinite loop is a "timeout"; a fork bomb is bounded by max_procs and leaves no process behind, nor
  does a child that left the process group with setsid(); a memory bomb meets MemoryError; a huge file or a
  flood of output meets "File too large"; a segfault through ctypes is "crashed";
- the program sees none of the parent's environment; writes outside its workdir (a root-owned directory,
  /tmp, /var/tmp, /dev/shm) fail or are swept; deleting files under its workdir, or the workdir itself,
  changes nothing outside;
- run_many keeps the order of its programs, and a fork bomb beside a legitimate program does not starve it;
- bad limits are ValueErrors naming the value.
After every test (autouse fixture): no sandbox workdir and no process of a sandbox uid is left.
The checks that rely on the dropped uid (escapes, setsid) run only as root, as these machines do.

    python -m pytest tests/test_sandbox.py -q
"""
import os
import secrets
import tempfile
from pathlib import Path

import pytest

from lib.sandbox import SANDBOX_UIDS, processes_of, run_many, run_program

AS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not AS_ROOT, reason="the check relies on the per-run uid the sandbox uses as root")


def sandbox_processes() -> list[tuple[int, int]]:
    """(pid, uid) of every live process whose real uid is a sandbox uid."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        except FileNotFoundError:
            continue
        uid = int(fields["Uid"].split()[0])
        if uid in SANDBOX_UIDS and fields["State"][0] not in "ZX":
            found.append((int(pid), uid))
    return found


def live_in_group(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid`; a killed child stays a zombie until
    init reaps it, and os.killpg(pgid, 0) still finds zombies."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except FileNotFoundError:
            continue
        if int(pgrp) == pgid and state not in "ZX":
            found.append(int(pid))
    return found


def workdirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sandbox-*"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = workdirs()
    yield
    assert workdirs() <= before, "a sandbox workdir was not removed"
    assert not sandbox_processes(), "a process of a sandbox uid outlived its run"


def assert_gone(outcome):
    """No process of the run's group, nor (as root) of its uid, is alive; its workdir is removed."""
    assert live_in_group(outcome.pid) == []
    if AS_ROOT:
        assert processes_of(outcome.uid) == {}
    assert not os.path.exists(outcome.workdir)


# -----------------------------------------------------------------------------
# passed means: exit 0 and the program ran to its last statement


def test_a_legitimate_program_passes():
    outcome = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert outcome.passed and outcome.status == "passed" and outcome.returncode == 0
    assert outcome.stdout_tail == "ok\n"  # the token line is not shown
    if AS_ROOT:
        assert outcome.uid in SANDBOX_UIDS
    assert_gone(outcome)


@pytest.mark.parametrize("exit_early", ["import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)"])
def test_exiting_0_before_the_checks_fails(exit_early):
    # the checks below the exit would fail; ending early with status 0 must not count as passing
    outcome = run_program(f"def f():\n    return 1\n\n{exit_early}\nassert f() == 2\n")
    assert outcome.returncode == 0 and outcome.status == "failed" and not outcome.passed


def test_a_program_that_replaces_stdout_still_passes():
    outcome = run_program("import io, os, sys\nsys.stdout = io.StringIO()\nprint('hidden')\nos.close(1)\n")
    assert outcome.passed, outcome.stderr_tail


def test_an_exception_fails_with_its_traceback():
    outcome = run_program("assert 1 + 1 == 3, 'wrong sum'\n")
    assert outcome.status == "failed" and outcome.returncode == 1
    assert "AssertionError: wrong sum" in outcome.stderr_tail


# -----------------------------------------------------------------------------
# limits


def test_an_infinite_loop_times_out():
    outcome = run_program("while True:\n    pass\n", timeout_s=1.5)
    assert outcome.status == "timeout" and not outcome.passed
    assert outcome.seconds >= 1.4  # no upper bound: the machine may be busy
    assert_gone(outcome)


def test_the_cpu_limit_ends_a_busy_loop_as_a_timeout():
    # cpu_s below the wall clock: SIGXCPU (or, past the hard limit, SIGKILL) ends it first
    outcome = run_program("while True:\n    pass\n", timeout_s=30, cpu_s=1)
    assert outcome.status == "timeout" and outcome.signal in ("SIGXCPU", "SIGKILL")
    assert_gone(outcome)


def test_fork_is_bounded_by_max_procs():
    # children that sleep, forked until fork() fails: fewer than max_procs, and all killed at the end
    source = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
              "        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    outcome = run_program(source, max_procs=8, timeout_s=20)
    assert outcome.passed, outcome.stderr_tail
    if AS_ROOT:  # as another user, the limit counts that user's other processes too
        assert int(outcome.stdout_tail) == 7  # 8 processes: the program and 7 children
    assert_gone(outcome)


def test_a_fork_bomb_is_bounded_and_leaves_nothing():
    source = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    outcome = run_program(source, max_procs=16, timeout_s=3)
    assert outcome.status == "timeout" and not outcome.passed
    assert_gone(outcome)


@root_only
def test_a_child_that_left_the_process_group_is_killed():
    source = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
              "time.sleep(0.2)\nprint('parent done')\n")
    outcome = run_program(source)
    assert outcome.passed
    assert_gone(outcome)


def test_a_memory_bomb_meets_memory_error():
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    outcome = run_program(source, memory_mb=256)
    assert outcome.status == "failed" and "MemoryError" in outcome.stderr_tail
    assert run_program("x = bytearray(8 << 30)\n", memory_mb=256).status == "failed"


def test_a_huge_file_and_a_flood_of_output_meet_the_file_size_limit():
    outcome = run_program("with open('big.bin', 'wb') as f:\n    for _ in range(8):\n"
                          "        f.write(bytes(1 << 20))\n", file_mb=1)
    assert outcome.status == "failed" and "File too large" in outcome.stderr_tail
    outcome = run_program("import sys\nfor _ in range(8):\n    sys.stdout.write('x' * (1 << 20))\n", file_mb=1)
    assert outcome.status == "failed" and len(outcome.stdout_tail) <= 2000


def test_a_segfault_is_crashed():
    outcome = run_program("import ctypes\nctypes.string_at(0)\n")
    assert outcome.status == "crashed" and outcome.signal == "SIGSEGV" and not outcome.passed
    assert_gone(outcome)


# -----------------------------------------------------------------------------
# what the program can see and change


def test_the_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("INILORA_SECRET", "x-secret-value")
    source = ("import os\nprint(sorted(os.environ))\nassert 'INILORA_SECRET' not in os.environ\n"
              "try:\n    environ = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
              "    print('parent environ readable', b'x-secret-value' in environ)\n"
              "except PermissionError:\n    print('parent environ denied')\n")
    outcome = run_program(source)
    assert outcome.passed, outcome.stderr_tail
    assert "INILORA_SECRET" not in outcome.stdout_tail and "x-secret-value" not in outcome.stdout_tail
    if AS_ROOT:
        assert "parent environ denied" in outcome.stdout_tail


@root_only
def test_writes_outside_the_workdir_fail_or_are_swept(tmp_path):
    name = f"sandbox-escape-{secrets.token_hex(6)}"
    targets = [tmp_path / name, *(Path(d) / name for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d))]
    source = (f"import os\nfor path in {[str(t) for t in targets]!r}:\n    try:\n"
              "        os.makedirs(path + '.d', exist_ok=True)\n"
              "        with open(path, 'w') as f:\n            f.write('escaped')\n        print('wrote', path)\n"
              "    except OSError as e:\n        print('refused', path, e.errno)\n")
    outcome = run_program(source)
    assert outcome.passed, outcome.stderr_tail
    assert f"refused {targets[0]}" in outcome.stdout_tail  # pytest's tmp_path is under root's 0700 directory
    for target in targets:
        assert not target.exists() and not Path(f"{target}.d").exists()


def test_deleting_files_under_the_workdir_changes_nothing_outside(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("stays")
    source = ("import os, shutil\nos.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('x')\nos.remove('a/b/f.txt')\n"
              "os.makedirs('locked/inner')\nopen('locked/inner/g.txt', 'w').write('x')\nos.chmod('locked', 0)\n"
              "os.remove('program.py')\n"
              f"try:\n    os.remove({str(keep)!r})\nexcept OSError:\n    pass\n")
    outcome = run_program(source)
    assert outcome.passed, outcome.stderr_tail
    if AS_ROOT:  # as the parent's own user the program could delete the parent's files
        assert keep.read_text() == "stays"
    assert_gone(outcome)  # also the workdir with its locked directory
    outcome = run_program("import os, shutil\nshutil.rmtree(os.getcwd())\n")  # its whole workdir
    assert outcome.passed, outcome.stderr_tail
    assert_gone(outcome)


# -----------------------------------------------------------------------------
# many at once, and bad limits


def test_run_many_keeps_order_and_a_fork_bomb_does_not_starve_the_others():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    sources = [bomb, "print('a')\n", "import sys\nsys.exit(3)\n", "print('b')\n"]
    outcomes = run_many(sources, workers=2, max_procs=16, timeout_s=3)
    assert [o.status for o in outcomes] == ["timeout", "passed", "failed", "passed"]
    assert [o.stdout_tail for o in outcomes[1::2]] == ["a\n", "b\n"]
    for outcome in outcomes:
        assert_gone(outcome)


def test_bad_limits_name_the_value():
    with pytest.raises(ValueError, match="memory_mb=8"):
        run_program("pass\n", memory_mb=8)
    with pytest.raises(ValueError, match="timeout_s=0"):
        run_program("pass\n", timeout_s=0)
    with pytest.raises(ValueError, match="cpu_s=1.5"):
        run_program("pass\n", cpu_s=1.5)
    with pytest.raises(ValueError, match="workers=0"):
        run_many(["pass\n"], workers=0)
