"""What every entry point shares: device choice, dtype names, the command-line runner,
atomic writes, and the one artifact format of the project.

An artifact is a `.safetensors` file plus a `.json` sidecar beside it. The sidecar holds a
format name and version, the full configuration that produced the tensors, and a sha256
that covers the tensor bytes *and* the sidecar's own content:

    sha256 = sha256( sha256(tensor bytes) || canonical JSON of the sidecar without "sha256" )

so editing a rank or a lora_alpha in the JSON is detected exactly like a damaged tensor
file. Adapters (inilora.py), the approximation cache (approximate.py) and the data cache
(data/prepare.py) are all artifacts; reading one also refuses non-finite tensors.

Nothing here runs on its own; every entry point ends with `run_cli(main)`.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

# -----------------------------------------------------------------------------
# devices and dtypes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
# the command-line runner

# Mistakes in a command's input: a bad value (ValueError), a missing or unreachable file or
# model (OSError: FileNotFoundError, ConnectionError, PermissionError), a diverged run
# (FloatingPointError). Every entry point ends on them with one sentence, not a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by SIGINT (128 + 2)


def run_cli(main):
    """Runs an entry point's main(); a user error ends the program with `error: <sentence>`
    (exit 1), Ctrl-C with exit code 130, so `a && b` never goes on after an interrupted `a`."""
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


# -----------------------------------------------------------------------------
# artifacts: safetensors + a JSON sidecar whose checksum covers both


class ArtifactError(ValueError):
    """An artifact is missing, damaged, edited, of another kind or version, or not finite."""


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def _canonical(meta) -> dict:
    # what is hashed is what is read back: tuples become lists, keys are sorted
    return json.loads(json.dumps(meta, allow_nan=False))


def _checksum(data: bytes, meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(hashlib.sha256(data).digest() + body.encode()).hexdigest()


def save_artifact(path, tensors: dict, meta: dict, kind: str, version: int) -> Path:
    """Writes `path` (.safetensors) and its .json sidecar {format, version, **meta, sha256}.

    Each file is written atomically; the sidecar goes last, so a half-written pair never
    passes read_artifact. Tensors must be finite: nothing is written otherwise.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"tensor {name!r} holds inf or nan values; {str(path)!r} was not written.")
    data = safetensors_save(tensors)
    meta = _canonical({"format": kind, "version": version, **meta})
    meta["sha256"] = _checksum(data, meta)
    write_atomic(path, data)
    write_atomic(sidecar_path(path), json.dumps(meta, indent=1, allow_nan=False).encode())
    return Path(path)


def read_artifact(path, kind: str, version: int, remedy: str) -> tuple[dict, dict]:
    """(tensors, sidecar) of an artifact written by save_artifact, after checking that both files
    exist, the format and version are `kind`/`version`, the checksum covers both files as they are,
    and every floating-point tensor is finite. Raises ArtifactError naming what is wrong + `remedy`."""
    path, sidecar = Path(path), sidecar_path(path)
    for p in (path, sidecar):
        if not p.is_file():
            raise ArtifactError(f"{str(p)!r} does not exist: a {kind} is a .safetensors file with a "
                                f".json sidecar beside it. {remedy}")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(sidecar)!r} is not valid JSON ({e}). {remedy}") from None
    found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
    if found != (kind, version):
        raise ArtifactError(f"{str(sidecar)!r} has format={found[0]!r}, version={found[1]!r}; expected a {kind} "
                            f"of version {version}. {remedy}")
    data = path.read_bytes()
    if _checksum(data, meta) != meta.get("sha256"):
        raise ArtifactError(f"{str(path)!r} and its sidecar do not match the checksum the sidecar holds: one "
                            f"was edited, truncated or comes from another save. {remedy}")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{str(path)!r} is not a readable safetensors file ({e}). {remedy}") from None
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"tensor {name!r} in {str(path)!r} holds inf or nan values. {remedy}")
    return tensors, meta


def check_tensors(tensors: dict, expected: dict, path, remedy: str):
    """Raises ArtifactError unless `tensors` has exactly the names of `expected` ({name: shape})
    and every tensor has its expected shape."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ArtifactError(f"{str(path)!r} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''} and has "
                            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. {remedy}")
    for name in sorted(expected):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            raise ArtifactError(f"tensor {name!r} in {str(path)!r} has shape {tuple(tensors[name].shape)}, but "
                                f"its configuration means {tuple(expected[name])}. {remedy}")
